"""The folders and files people have: split folders by name, CSV/TSV label files, any tfds
image-classification set, litter from Macs and Windows, WebP and TIFF, class names as typed."""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_image_folder, write_tfds_metadata
from PIL import Image

from kerastune_flow import data, run, rundir
from kerastune_flow.data import sources
from kerastune_flow.deploy import inference
from kerastune_flow.errors import DataError

SIZE = 8  # pixels of every generated image
IMAGE_SIZE = (SIZE, SIZE)
CLASSES = ("cat", "dog")
SPLITS = ("train", "validation", "test")
NUM_MOCK_EXAMPLES = 4


def files(ds: tf.data.Dataset) -> set[bytes]:
    """The pixels of every example of a split, as a set (each generated image is different)."""
    return {image.numpy().tobytes() for image, _ in ds}


def on_disk(folder: Path, channels: int = 3) -> set[bytes]:
    """The pixels of every image under `folder`, decoded as the loader decodes them."""
    paths = data.expand_image_arguments([str(folder)])
    return {x.tobytes() for x in data.load_images(paths, image_size=IMAGE_SIZE, channels=channels).numpy()}


def write_split(root: Path, name: str, per_class: int, seed: int) -> Path:
    return write_image_folder(root / name, classes=CLASSES, per_class=per_class, size=SIZE, seed=seed)


# --------------------------------------------------------------------------- split folders


@pytest.mark.parametrize("valid", ["valid", "Validation"])  # val/: below; any case
def test_train_and_valid_folders_are_splits_not_classes(tmp_path, valid):
    root = tmp_path / "fastai"
    write_split(root, "train", per_class=10, seed=1)
    write_split(root, valid, per_class=3, seed=2)

    splits = data.load_data(str(root), image_size=IMAGE_SIZE)

    assert splits.class_names == list(CLASSES)
    assert files(splits.validation) == on_disk(root / valid)  # the folder, not carved from train
    assert files(splits.train) | files(splits.test) == on_disk(root / "train")
    assert splits.sizes == {"train": 18, "validation": 6, "test": 2}  # test: 1 of 10 per class, carved
    assert splits.split_sources["validation"] == str(root / valid)
    assert splits.split_sources["test"] == f"0.1 of {root / 'train'} per class, held out with seed 0"
    assert splits.test_source == splits.split_sources["test"]


def test_train_val_test_folders_each_serve_their_split(tmp_path):
    root = tmp_path / "kaggle"
    write_split(root, "train", per_class=6, seed=1)
    write_split(root, "val", per_class=2, seed=2)
    write_split(root, "test", per_class=3, seed=3)

    splits = data.load_data(str(root), image_size=IMAGE_SIZE, validation_fraction=0.25, test_fraction=0.25)

    assert splits.class_names == list(CLASSES)
    assert {name: files(getattr(splits, name)) for name in SPLITS} == {
        "train": on_disk(root / "train"),  # nothing carved: the fractions size only what is missing
        "validation": on_disk(root / "val"),
        "test": on_disk(root / "test"),
    }
    assert splits.split_sources == {
        name: str(root / folder) for name, folder in zip(SPLITS, ("train", "val", "test"), strict=True)
    }


@pytest.mark.parametrize(
    ("folders", "match"),
    [
        (("train", "val", "valid"), r"2 folders for the validation split \(val/, valid/\)"),
        (("train", "test", "cats"), r"mixes split folders \(test/, train/\) with other folders \(cats/\)"),
        (("test", "valid"), r"has split folders but no train/ \(test/, valid/\)"),
    ],
    ids=["val-and-valid", "splits-and-classes", "no-train"],
)
def test_an_ambiguous_layout_is_refused_naming_the_folders(tmp_path, folders, match):
    root = tmp_path / "ambiguous"
    for seed, name in enumerate(folders):
        write_split(root, name, per_class=2, seed=seed)

    with pytest.raises(DataError, match=match):
        data.load_data(str(root), image_size=IMAGE_SIZE)


def test_unlabelled_test_images_are_named_as_such(tmp_path):
    root = tmp_path / "kaggle"
    write_split(root, "train", per_class=4, seed=1)
    (root / "test").mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(root / "test" / "0001.png")

    with pytest.raises(DataError, match=r"under .*test in class folders \(its images are not in class folders"):
        data.load_data(str(root), image_size=IMAGE_SIZE)


def test_has_test_split_follows_the_layout(tmp_path):
    write_split(tmp_path / "a", "train", per_class=2, seed=1)
    write_split(tmp_path / "a", "valid", per_class=2, seed=2)
    write_split(tmp_path / "b", "train", per_class=2, seed=1)
    write_split(tmp_path / "b", "Test", per_class=2, seed=2)

    assert not data.has_test_split(str(tmp_path / "a"))
    assert data.has_test_split(str(tmp_path / "b"))


@pytest.mark.slow  # 9-19 s here (a train, then predict loading the model); the loading itself is tested above
def test_a_valid_folder_trains_and_the_run_records_which_folder_served_which_split(tmp_path, capsys):
    typed = ["crème brûlée", "grey cat"]
    root = tmp_path / "desserts"
    for seed, (split, per_class) in enumerate((("train", 6), ("valid", 2))):
        names = [unicodedata.normalize("NFD", name) for name in typed]  # as macOS writes them
        write_image_folder(root / split, classes=names, per_class=per_class, size=SIZE, seed=seed)
    run_dir = tmp_path / "run"

    argv = ["train", "scratch_mlp", "--data", str(root), "--preset", "smoke", "--image-size", str(SIZE)]
    assert run.main([*argv, "--run-dir", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()

    text = (run_dir / "config.json").read_text(encoding="utf-8")
    config = json.loads(text)
    assert config["class_names"] == typed and '"crème brûlée"' in text  # as typed, not \u escapes
    assert config["split_sources"]["validation"] == str(root / "valid")
    seed = config["config"]["train"]["seed"]
    assert config["split_sources"]["test"] == f"0.1 of {root / 'train'} per class, held out with seed {seed}"
    assert config["sizes"]["validation"] == 4  # the whole valid/ folder, not carved from train
    image = next((root / "valid").rglob("*.png"))
    predicted = inference.predict_images(run_dir, [str(image)], top_k=2)
    assert {p["class"] for p in predicted[0]["predictions"]} == set(typed)


# --------------------------------------------------------------------------- litter


def test_mac_and_windows_litter_is_ignored_and_counted_in_one_line(tmp_path, caplog):
    root = write_image_folder(tmp_path / "unzipped", classes=CLASSES, per_class=4, size=SIZE)
    for name in CLASSES:
        (root / name / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
        (root / name / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")
    write_image_folder(root / "__MACOSX", classes=CLASSES, per_class=2, size=SIZE)

    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        splits = data.load_data(str(root), image_size=IMAGE_SIZE)

    assert splits.class_names == list(CLASSES)
    assert sum(splits.sizes.values()) == 8
    lines = [r.getMessage() for r in caplog.records if "litter file" in r.getMessage()]
    assert len(lines) == 1
    for counted in ("Ignored 7 litter", "._* x2", "Thumbs.db x2", "desktop.ini x1", ".* x1", "__MACOSX/ x1"):
        assert counted in lines[0]
    assert not [r for r in caplog.records if "without an image extension" in r.getMessage()]


def test_predicting_a_folder_skips_appledouble_files(tmp_path):
    root = write_image_folder(tmp_path / "pics", classes=("a",), per_class=2, size=SIZE)
    (root / "a" / "._000.png").write_bytes(b"\x00\x05\x16\x07")

    assert data.expand_image_arguments([str(root)]) == [str(root / "a" / "000.png"), str(root / "a" / "001.png")]


# --------------------------------------------------------------------------- formats, names


def test_webp_images_are_read(tmp_path):
    root = tmp_path / "webp"
    rng = np.random.default_rng(0)
    for name, mode in (("rgb", "RGB"), ("rgba", "RGBA")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (SIZE, SIZE, len(mode)), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.webp", lossless=True)

    splits = data.load_data(str(root), image_size=IMAGE_SIZE)
    gray = data.load_data(str(root), image_size=IMAGE_SIZE, channels=1)

    assert splits.class_names == ["rgb", "rgba"] and sum(splits.sizes.values()) == 6
    assert splits.image_shape == (SIZE, SIZE, 3) and gray.image_shape == (SIZE, SIZE, 1)
    assert sum(1 for _ in gray.train) == gray.sizes["train"]
    with Image.open(root / "rgba" / "0.webp") as image:
        expected = np.asarray(image.convert("RGB"), np.float32)
    loaded = data.load_images([str(root / "rgba" / "0.webp")], image_size=IMAGE_SIZE, channels=3)
    np.testing.assert_allclose(loaded[0], expected, atol=1e-3)


def test_tiff_files_are_refused_with_the_command_that_converts_them(tmp_path):
    root = write_image_folder(tmp_path / "scans", classes=CLASSES, per_class=3, size=SIZE)
    Image.new("RGB", (SIZE, SIZE)).save(root / "cat" / "scan.tif")

    with pytest.raises(DataError, match=r"1 TIFF file\(s\) under .*scan\.tif.*`mogrify -format png \*/\*\.tif`"):
        data.load_data(str(root), image_size=IMAGE_SIZE)
    with pytest.raises(DataError, match=r"TIFF.*mogrify"):
        data.expand_image_arguments([str(root / "cat" / "scan.tif")])


def test_json_files_keep_names_as_typed(tmp_path):
    path = tmp_path / "config.json"

    rundir.atomic_write_json(path, {"class_names": ["crème brûlée", "grey cat"]})

    assert '"crème brûlée"' in path.read_text(encoding="utf-8")  # not "cr\\u00e8me br\\u00fbl\\u00e9e"
    assert json.loads(path.read_text(encoding="utf-8"))["class_names"] == ["crème brûlée", "grey cat"]


def test_class_names_with_spaces_and_accents_are_kept_in_nfc(tmp_path):
    typed = ["crème brûlée", "grey cat"]
    decomposed = [unicodedata.normalize("NFD", name) for name in typed]  # as macOS writes them
    assert decomposed[0] != typed[0]
    root = write_image_folder(tmp_path / "desserts", classes=decomposed, per_class=3, size=SIZE)

    splits = data.load_data(str(root), image_size=IMAGE_SIZE)

    assert splits.class_names == typed
    assert sum(splits.sizes.values()) == 6


# --------------------------------------------------------------------------- CSV / TSV


def _labelled_images(tmp_path: Path, per_class: int = 4) -> list[tuple[str, str]]:
    """(path relative to tmp_path, label) of images written under tmp_path/images/."""
    write_image_folder(tmp_path / "images", classes=("grey cat", "dog"), per_class=per_class, size=SIZE)
    return [(f"images/{label}/{i:03d}.png", label) for label in ("grey cat", "dog") for i in range(per_class)]


def test_a_csv_of_paths_and_labels_loads_relative_to_its_folder(tmp_path, monkeypatch):
    rows = _labelled_images(tmp_path / "set")
    table = tmp_path / "set" / "labels.csv"
    table.write_text("filename,class\n" + "".join(f"{p},{label}\n" for p, label in rows))
    monkeypatch.chdir(tmp_path)  # not the file's folder

    splits = data.load_data(str(Path("set") / "labels.csv"), image_size=IMAGE_SIZE, test_fraction=0.25)

    assert splits.class_names == ["dog", "grey cat"]
    assert splits.sizes == {"train": 4, "validation": 2, "test": 2}
    everything = set().union(*(files(getattr(splits, name)) for name in SPLITS))
    assert everything == on_disk(tmp_path / "set" / "images")


def test_a_split_column_gives_the_splits(tmp_path):
    rows = _labelled_images(tmp_path, per_class=4)
    split_of = ["train", "train", "valid", "test"] * 2
    table = tmp_path / "labels.csv"
    table.write_text(
        "path,label,split\n" + "".join(f"{p},{lb},{s}\n" for (p, lb), s in zip(rows, split_of, strict=True))
    )

    splits = data.load_data(str(table), image_size=IMAGE_SIZE)

    for name, value in (("train", "train"), ("validation", "valid"), ("test", "test")):
        chosen = [str(tmp_path / p) for (p, _), s in zip(rows, split_of, strict=True) if s == value]
        expected = {x.tobytes() for x in data.load_images(chosen, image_size=IMAGE_SIZE, channels=3).numpy()}
        assert files(getattr(splits, name)) == expected, name
    assert splits.split_sources["validation"] == f"the 2 rows of {table} whose split says validation"
    assert data.has_test_split(str(table))


def test_fastais_is_valid_column_marks_the_validation_rows(tmp_path):
    rows = _labelled_images(tmp_path, per_class=4)
    valid = [i % 4 == 0 for i in range(len(rows))]
    lines = [f"{p},{label},{flag}\n" for (p, label), flag in zip(rows, valid, strict=True)]
    (tmp_path / "labels.csv").write_text("fname,label,is_valid\n" + "".join(lines))

    splits = data.load_data(
        str(tmp_path / "labels.csv"), image_size=IMAGE_SIZE, csv_columns=("fname", "label", "is_valid")
    )

    chosen = [str(tmp_path / p) for (p, _), flag in zip(rows, valid, strict=True) if flag]
    assert files(splits.validation) == {
        x.tobytes() for x in data.load_images(chosen, image_size=IMAGE_SIZE, channels=3).numpy()
    }
    assert splits.sizes == {"train": 4, "validation": 2, "test": 2}


def test_a_tsv_and_a_semicolon_csv_with_named_columns(tmp_path):
    rows = _labelled_images(tmp_path, per_class=3)
    (tmp_path / "a.tsv").write_text("Breed\tFile\n" + "".join(f"{lb}\t{p}\n" for p, lb in rows))
    (tmp_path / "b.csv").write_text("Breed;File\n" + "".join(f"{lb};{p}\n" for p, lb in rows))

    for name in ("a.tsv", "b.csv"):
        splits = data.load_data(str(tmp_path / name), image_size=IMAGE_SIZE, csv_columns=("file", "breed"))
        assert splits.class_names == ["dog", "grey cat"], name
        assert sum(splits.sizes.values()) == 6, name


@pytest.mark.parametrize(
    ("content", "columns", "match"),
    [
        ("", (), r"labels\.csv is empty"),
        (
            "picture,kind\nimages/dog/000.png,dog\n",
            (),
            r"no path column .* header is: picture, kind.*--csv-columns",
        ),
        ("path,label\nimages/dog/000.png,dog\n", ("path", "breed"), r"no column 'breed' .* header is: path, label"),
        ("path,label\nimages/dog/000.png,dog\nimages/dog/nope.png,dog\n", (), r"nope\.png \(row 3\)"),
        ("path,label,split\nimages/dog/000.png,dog,train\nimages/dog/001.png,dog,holdout\n", (), r"row 3 .*holdout"),
        ("path,label\nimages/dog/000.png,\n", (), r"row 2 has no label"),
    ],
    ids=["empty", "no-path-column", "named-column-missing", "missing-file", "unknown-split", "no-label"],
)
def test_a_bad_csv_names_the_file_the_row_and_the_fix(tmp_path, content, columns, match):
    _labelled_images(tmp_path, per_class=2)
    (tmp_path / "labels.csv").write_text(content)

    with pytest.raises(DataError, match=match):
        data.load_data(str(tmp_path / "labels.csv"), **({"csv_columns": columns} if columns else {}))


# --------------------------------------------------------------------------- tfds


def _sliced(self, split, decoders=None, read_config=None, shuffle_files=False):
    """As many SIZE x SIZE examples as the split (slice) asks for; the first pixel tells them apart."""
    del decoders, read_config, shuffle_files
    n = self.info.splits[split].num_examples
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    names = self.info.features["label"].names
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(n) % len(names)})


def _never_download(self, *args, **kwargs):
    raise ConnectionError("no network in this test")


@pytest.mark.parametrize(
    ("name", "on_disk_splits", "sizes"),
    [
        ("tf_flowers", {"train": 20}, {"train": 16, "validation": 2, "test": 2}),
        ("beans", {"train": 10, "validation": 3, "test": 4}, {"train": 10, "validation": 3, "test": 4}),
    ],
)
def test_a_prepared_tfds_image_set_is_read_offline_with_its_splits(tmp_path, name, on_disk_splits, sizes):
    tfds = pytest.importorskip("tensorflow_datasets")
    write_tfds_metadata(tfds, name, tmp_path / "tfds", on_disk_splits)

    with (
        tfds.testing.mock_data(data_dir=str(tmp_path / "tfds"), as_dataset_fn=_sliced),
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", _never_download),
    ):
        splits = data.load_data(name, data_dir=str(tmp_path / "tfds"), image_size=IMAGE_SIZE)
        counts = {split: sum(1 for _ in getattr(splits, split)) for split in SPLITS}

    assert splits.class_names == tfds.builder(name).info.features["label"].names
    assert splits.sizes == counts == sizes
    assert splits.image_shape == (SIZE, SIZE, 3)
    if name == "beans":
        assert splits.split_sources == {s: f"the {s} split of beans" for s in SPLITS}
    else:
        assert splits.split_sources["test"] == "carved from the train split of tf_flowers: its last 2"


def test_an_unprepared_tfds_set_downloads_under_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES):
        splits = data.load_data("cats_vs_dogs", data_dir=str(tmp_path / "tfds"), image_size=IMAGE_SIZE)
        image, label = next(iter(splits.train))

    assert splits.class_names == ["cat", "dog"]
    assert image.shape == (SIZE, SIZE, 3) and label.dtype == tf.int32


def test_a_tfds_set_without_images_is_refused_by_name(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with mock.patch("tensorflow_datasets.core.DatasetBuilder.download_and_prepare") as prepare:
        with pytest.raises(DataError, match=r"'imdb_reviews' is not an image-classification set.*text \(Text\)"):
            data.load_data("imdb_reviews", data_dir=str(tmp_path / "tfds"))
    prepare.assert_not_called()  # refused before any download


def test_the_image_and_label_features_are_found_by_type():
    tfds = pytest.importorskip("tensorflow_datasets")
    features = tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "picture": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "kind": tfds.features.ClassLabel(names=["a", "b"]),
        }
    )

    assert sources._image_and_label("custom", features) == ("picture", "kind")


def test_a_failed_download_says_how_to_prepare_it(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", _never_download):
        expected = r"could not prepare 'tf_flowers'.*tfds build tf_flowers.*--data-dir.*--manual-dir"
        with pytest.raises(DataError, match=expected):
            data.load_data("tf_flowers", data_dir=str(tmp_path / "tfds"))


def test_any_tfds_name_is_a_tfds_name_unless_a_path_exists(tmp_path):
    assert data.is_tfds_name("tf_flowers") and data.is_tfds_name("beans") and data.is_tfds_name("mnist:3.*.*")
    assert not data.is_tfds_name("no_such_set") and not data.is_tfds_name("data/digits")
    (tmp_path / "beans").mkdir()  # tmp_path is the working directory
    assert not data.is_tfds_name("beans")
