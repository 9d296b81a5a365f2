"""The sample shipped in the package: `--data digits` (the default) from any folder, a user's path first."""

from pathlib import Path

from conftest import write_image_folder

from kerastune_flow import data
from kerastune_flow.data.samples import SAMPLES, resolve_sample, sample_folder
from kerastune_flow.recipes import make_config

PACKAGE = Path(data.__file__).resolve().parents[1]
DIGITS_CLASSES = [str(i) for i in range(10)]


def test_digits_names_the_packaged_folder_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SAMPLES == ("digits",)
    folder = Path(resolve_sample("digits"))
    assert folder == sample_folder("digits") == PACKAGE / "sample_data" / "digits"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == DIGITS_CLASSES
    assert Path(resolve_sample("digits/7")) == folder / "7"  # predict's images: `digits/7`
    assert Path(resolve_sample("digits/7/0000.png")).is_file()


def test_other_sources_are_left_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in ("mnist", "cifar10", "does/not/exist", "digitsx", "", "/abs/digits"):
        assert resolve_sample(source) == source


def test_a_users_own_digits_folder_wins_over_the_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "digits", classes=("ones", "twos"), per_class=4, size=8)
    assert resolve_sample("digits") == "digits"
    splits = data.load_data("digits", image_size=(8, 8), validation_fraction=0.25, test_fraction=0.25)
    assert splits.class_names == ["ones", "twos"]


def test_load_data_reads_the_sample_by_name_outside_the_clone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = data.load_data("digits", image_size=(8, 8), max_examples=4)
    assert splits.class_names == DIGITS_CLASSES
    assert Path(splits.source) == sample_folder("digits")
    assert splits.sizes["train"] == 4


def test_the_default_data_of_a_config_is_the_sample_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = make_config("cifar10_cnn")
    assert config.data.data == "digits"  # config.json says the name, not a path of this machine
    assert Path(resolve_sample(config.data.data)).is_dir()
