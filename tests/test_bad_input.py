"""Issue 9: bad input never crashes with a traceback or loses work.

A corpus of bad folders, model files, run directories and flags goes through the CLI in
process (`run.main`); every case must end with exit code 2 and one line on stderr, and leave
every file outside its run directory, and every file already in it, as it was. The tests after
the corpus check the Python API of each answer: the exception class, the scan of image
files, `--skip-bad-images`, `--unsafe-deserialization`, a full disk while writing the best
model, labels out of range, and the last-resort handler for errors that are not the user's.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, write_image_folder
from kerastune_flow import callbacks as cb
from kerastune_flow import data, models, run, train
from kerastune_flow.config import make_config
from kerastune_flow.errors import ConfigError, DataError, KerastuneFlowError, RunDirError

PER_CLASS = 4
SIZE = 16  # pixels of the generated images
TINY = 8  # below every model's minimum
CLASSES = ("circle", "square", "triangle")
FAST = ["--epochs", "1", "--batch-size", "2", "--weights", "none", "--quiet", "--no-tensorboard"]


# --------------------------------------------------------------------------- the corpus


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _save_mode(path: Path, mode: str, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def _tiny_classifier(input_shape=(SIZE, SIZE, 3), num_classes=3, lambda_layer=False) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = keras.layers.Lambda(lambda t: t / 255.0)(inputs) if lambda_layer else keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(8, activation="relu", name="dense")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x))


def _write_run_dir(folder: Path, model: keras.Model, *, finished: bool) -> Path:
    """A run directory as `train` leaves it, without training (the corpus needs only its files)."""
    folder.mkdir(parents=True)
    model.save(folder / cb.BEST_MODEL)
    meta = {
        "config": make_config("cifar10_cnn", image_size=(SIZE, SIZE)).to_dict(),
        "class_names": list(CLASSES),
        "image_shape": [SIZE, SIZE, 3],
        "head": {"units": 3, "activation": None, "label_mode": "int"},
    }
    (folder / train.CONFIG_JSON).write_text(json.dumps(meta))
    (folder / cb.HISTORY_JSONL).write_text('{"epoch": 0, "loss": 1.0}\n')
    (folder / cb.HISTORY_CSV).write_text("epoch,loss\n0,1.0\n")
    if finished:
        (folder / train.RESULTS_JSON).write_text('{"test": {"accuracy": 0.5}}')
        (folder / train.CURVES_PNG).write_bytes(b"\x89PNG not really")
    else:  # interrupted: the backup BackupAndRestore resumes from
        (folder / cb.BACKUP_DIR / "fit").mkdir(parents=True)
        (folder / cb.BACKUP_DIR / "fit" / "checkpoint").write_text("epoch 1")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Bad (and a few good) folders, model files and run directories, made once."""
    root = tmp_path_factory.mktemp("corpus")
    good = write_image_folder(root / "good", classes=CLASSES, per_class=PER_CLASS, size=SIZE)
    (root / "empty").mkdir()
    for name in CLASSES:  # class folders holding no image at all
        (root / "no_images" / name).mkdir(parents=True)
        (root / "no_images" / name / "notes.txt").write_text("no pictures here")
    write_image_folder(root / "one_class", classes=("only",), per_class=PER_CLASS, size=SIZE)
    (root / "a_file").write_text("not a folder")

    bad = {
        "not_an_image": ("png", lambda p: p.write_text("this is text, not a PNG")),
        "empty_file": ("jpg", lambda p: p.write_bytes(b"")),
        "truncated_jpeg": ("jpg", _truncate),
        "truncated_png": ("png", _truncate),
        "one_bit_bmp": ("bmp", lambda p: _save_mode(p, "1", 0)),  # Pillow reads it, TensorFlow cannot
    }
    for name, (fmt, spoil) in bad.items():
        folder = write_image_folder(root / name, classes=CLASSES, per_class=PER_CLASS, size=SIZE, fmt=fmt)
        spoil(folder / "square" / f"001.{fmt}")
    write_image_folder(root / "tiny", classes=CLASSES, per_class=PER_CLASS, size=TINY)

    # Every class in its own format, every colour mode: all are converted to RGB and train.
    modes = {"circle": ["L", "RGBA", "LA"], "square": ["P", "I;16", "RGB"], "triangle": ["CMYK", "L", "RGB"]}
    formats = {"circle": "png", "square": "png", "triangle": "jpg"}
    for label, (name, names) in enumerate(modes.items()):
        (root / "mixed" / name).mkdir(parents=True)
        for i, mode in enumerate(names * 2):
            fmt = "gif" if (mode == "RGB" and i > 2) else formats[name]
            _save_mode(root / "mixed" / name / f"{i}.{fmt}", mode, seed=10 * label + i)

    _tiny_classifier().save(root / "classifier.keras")
    _tiny_classifier(lambda_layer=True).save(root / "lambda.keras")
    (root / "garbage.keras").write_bytes(b"PK\x03\x04 not a zip at all")
    (root / "truncated.keras").write_bytes((root / "classifier.keras").read_bytes()[:900])
    inputs = keras.Input((4,))  # a tabular model: no image input
    keras.Model(inputs, keras.layers.Dense(3)(inputs)).save(root / "tabular.keras")
    inputs = keras.Input((SIZE, SIZE, 3))  # an image-to-image model: no class scores
    keras.Model(inputs, keras.layers.Conv2D(3, 3, padding="same")(inputs)).save(root / "segmenter.keras")

    _write_run_dir(root / "finished", _tiny_classifier(), finished=True)
    _write_run_dir(root / "interrupted", _tiny_classifier(), finished=False)
    damaged = _write_run_dir(root / "damaged_config", _tiny_classifier(), finished=True)
    (damaged / train.CONFIG_JSON).write_text('{"config": ')
    _write_run_dir(root / "three_classes", _tiny_classifier(), finished=True)
    write_image_folder(root / "two_classes", classes=("a", "b"), per_class=PER_CLASS, size=SIZE)
    assert good.is_dir()
    return root


def _deny_probe(monkeypatch):
    """A run directory without write permission (the tests run as root, where chmod does not bite)."""
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == ".write_test":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def _bad_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", ')


T, E, P = "train", "evaluate", "predict"
# (id, argv, what the one line must say, optional set-up). {run} is a fresh run directory in the
# test's working directory; every other {name} is a file or folder of the corpus.
CASES = [
    # data folders
    ("data-missing", [T, "cifar10_cnn", "--data", "{missing}", "--run-dir", "{run}"], r"does not exist", None),
    ("data-a-file", [T, "cifar10_cnn", "--data", "{a_file}", "--run-dir", "{run}"], r"not a file", None),
    ("data-empty", [T, "cifar10_cnn", "--data", "{empty}", "--run-dir", "{run}"], r"at least two class", None),
    ("data-no-images", [T, "cifar10_cnn", "--data", "{no_images}", "--run-dir", "{run}"], r"No images", None),
    ("data-one-class", [T, "cifar10_cnn", "--data", "{one_class}", "--run-dir", "{run}"], r"classes=\['only'\]", None),
    ("data-not-an-image", [T, "cifar10_cnn", "--data", "{not_an_image}", "--run-dir", "{run}"], r"001\.png \(not an image\).*--skip-bad-images", None),
    ("data-empty-file", [T, "cifar10_cnn", "--data", "{empty_file}", "--run-dir", "{run}"], r"001\.jpg \(empty file\)", None),
    ("data-truncated-jpeg", [T, "cifar10_cnn", "--data", "{truncated_jpeg}", "--run-dir", "{run}"], r"001\.jpg \(corrupt or truncated JPEG\)", None),
    ("data-truncated-png", [T, "cifar10_cnn", "--data", "{truncated_png}", "--run-dir", "{run}"], r"001\.png \(corrupt or truncated PNG\)", None),
    ("data-one-bit-bmp", [T, "cifar10_cnn", "--data", "{one_bit_bmp}", "--run-dir", "{run}"], r"001\.bmp \(a BMP image .*re-save it as PNG", None),
    ("data-tiny-vgg16", [T, "vgg16_features", "--data", "{tiny}", "--image-size", "8", "--run-dir", "{run}"], r"at least 32x32", None),
    ("evaluate-corrupt-jpeg", [E, "{three_classes}", "--data", "{truncated_jpeg}"], r"corrupt or truncated JPEG", None),
    ("predict-not-an-image", [P, "{three_classes}", "{not_an_image}/square"], r"not an image", None),
    # classes and labels
    ("evaluate-other-classes", [E, "{three_classes}", "--data", "{two_classes}"], r"2 classes but the model was trained on 3", None),
    # sizes, layers, epochs, batches, rates
    ("size-vgg16", [T, "vgg16_features", "--data", "{good}", "--image-size", "16", "--run-dir", "{run}"], r"at least 32x32", None),
    ("size-mobilenetv2", [T, "vgg16_finetune", "--backbone", "mobilenetv2", "--data", "{good}", "--image-size", "24x40", "--run-dir", "{run}"], r"on mobilenetv2 needs images of at least 32x32", None),
    ("size-cnn", [T, "cifar10_cnn", "--data", "{good}", "--image-size", "12", "--run-dir", "{run}"], r"at least 18x18", None),
    ("unfreeze-index", [T, "vgg16_finetune", "--data", "{good}", "--image-size", "32", "--unfreeze-at", "99", "--run-dir", "{run}"], r"from 0 to 18", None),
    ("unfreeze-negative", [T, "vgg16_finetune", "--data", "{good}", "--image-size", "32", "--unfreeze-at", "-1", "--run-dir", "{run}"], r"from 0 to 18", None),
    ("unfreeze-name", [T, "vgg16_finetune", "--data", "{good}", "--image-size", "32", "--unfreeze-at", "block9_conv1", "--run-dir", "{run}"], r"no layer named 'block9_conv1'", None),
    ("unfreeze-fraction", [T, "vgg16_finetune", "--data", "{good}", "--image-size", "32", "--unfreeze-at", "1.5", "--run-dir", "{run}"], r"\[0, 1\]", None),
    ("progressive-name", [T, "vgg16_finetune", "--data", "{good}", "--image-size", "32", "--progressive", "0:block5_conv1:1e-5,2:nope:1e-6", "--run-dir", "{run}"], r"no layer named 'nope'", None),
    ("epochs-zero", [T, "cifar10_cnn", "--data", "{good}", "--epochs", "0", "--run-dir", "{run}"], r"epochs must be at least 1", None),
    ("epochs-negative", [T, "cifar10_cnn", "--data", "{good}", "--epochs", "-3", "--run-dir", "{run}"], r"epochs must be at least 1", None),
    ("head-epochs-zero", [T, "vgg16_finetune", "--data", "{good}", "--head-epochs", "0", "--run-dir", "{run}"], r"head_epochs must be at least 1", None),
    ("batch-too-large", [T, "cifar10_cnn", "--data", "{good}", "--image-size", "32", "--batch-size", "64", "--run-dir", "{run}"], r"fewer than one global batch", None),
    ("batch-zero", [T, "cifar10_cnn", "--data", "{good}", "--batch-size", "0", "--run-dir", "{run}"], r"batch_size must be at least 1", None),
    ("lr-zero", [T, "cifar10_cnn", "--data", "{good}", "--learning-rate", "0", "--run-dir", "{run}"], r"learning_rate must be positive", None),
    ("lr-negative", [T, "cifar10_cnn", "--data", "{good}", "--learning-rate", "-0.1", "--run-dir", "{run}"], r"learning_rate must be positive", None),
    ("finetune-lr-zero", [T, "vgg16_finetune", "--data", "{good}", "--finetune-lr", "0", "--run-dir", "{run}"], r"finetune_learning_rate must be positive", None),
    # run directories
    ("run-dir-finished", [T, "cifar10_cnn", "--data", "{good}", "--image-size", "32", "--run-dir", "{finished}"], r"already holds a finished run; pass --overwrite", None),
    ("run-dir-overwrite-bad-data", [T, "cifar10_cnn", "--data", "{truncated_png}", "--run-dir", "{finished}", "--overwrite"], r"corrupt or truncated PNG", None),
    ("run-dir-overwrite-bad-size", [T, "cifar10_cnn", "--data", "{good}", "--image-size", "12", "--run-dir", "{finished}", "--overwrite"], r"at least 18x18", None),
    ("run-dir-resume-bad-data", [T, "cifar10_cnn", "--data", "{truncated_jpeg}", "--run-dir", "{interrupted}"], r"corrupt or truncated JPEG", None),
    ("run-dir-under-a-file", [T, "cifar10_cnn", "--data", "{good}", "--run-dir", "{a_file}/run"], r"Cannot write to the run directory .*Not a directory", None),
    ("run-dir-is-a-file", [T, "cifar10_cnn", "--data", "{good}", "--run-dir", "{a_file}"], r"Cannot write to the run directory .*File exists", None),
    ("run-dir-not-writable", [T, "cifar10_cnn", "--data", "{good}", "--run-dir", "{run}"], r"Permission denied\); choose a writable --run-dir", _deny_probe),
    # model files
    ("evaluate-garbage-keras", [E, "{garbage.keras}", "--data", "{good}"], r"Cannot load the model .*garbage\.keras: it is corrupt", None),
    ("evaluate-truncated-keras", [E, "{truncated.keras}", "--data", "{good}"], r"Cannot load the model .*truncated\.keras: it is corrupt", None),
    ("predict-garbage-keras", [P, "{garbage.keras}", "{good}/circle/000.png"], r"it is corrupt", None),
    ("base-garbage-keras", [T, "vgg16_features", "--data", "{good}", "--base", "{garbage.keras}", "--run-dir", "{run}"], r"Cannot load the base model", None),
    ("evaluate-tabular-model", [E, "{tabular.keras}", "--data", "{good}"], r"does not take one batch of images", None),
    ("predict-tabular-model", [P, "{tabular.keras}", "{good}/circle/000.png"], r"does not take one batch of images", None),
    ("base-tabular-model", [T, "vgg16_features", "--data", "{good}", "--base", "{tabular.keras}", "--run-dir", "{run}"], r"does not take one batch of images", None),
    ("evaluate-segmenter", [E, "{segmenter.keras}", "--data", "{good}"], r"does not end in one layer of class scores", None),
    ("evaluate-damaged-config", [E, "{damaged_config}", "--data", "{good}"], r"config\.json is damaged", None),
    ("evaluate-lambda", [E, "{lambda.keras}", "--data", "{good}"], r"Lambda layer.*pass --unsafe-deserialization", None),
    ("predict-lambda", [P, "{lambda.keras}", "{good}/circle/000.png"], r"Lambda layer.*pass --unsafe-deserialization", None),
    ("base-lambda", [T, "vgg16_features", "--data", "{good}", "--base", "{lambda.keras}", "--run-dir", "{run}"], r"Lambda layer.*pass --unsafe-deserialization", None),
    # names, environment, divergence
    ("unknown-recipe", [T, "resnet", "--data", "{good}"], r"invalid choice: 'resnet' \(choose from .*cifar10_cnn", None),
    ("unknown-backbone", [T, "vgg16_features", "--backbone", "alexnet", "--data", "{good}"], r"invalid choice: 'alexnet' \(choose from .*mobilenetv2", None),
    ("unknown-strategy", [T, "cifar10_cnn", "--strategy", "cluster", "--data", "{good}"], r"invalid choice: 'cluster' \(choose from .*multiworker", None),
    ("unknown-augmentation", [T, "cifar10_cnn", "--augment", "blur", "--data", "{good}", "--run-dir", "{run}"], r"Unknown augmentation 'blur'; choose from flip", None),
    ("unknown-approach", ["compare", "--approaches", "scratch,magic", "--data", "{good}", "--run-dir", "{run}"], r"Unknown approach 'magic'; choose from scratch", None),
    ("tf-config-not-json", [T, "cifar10_cnn", "--data", "{good}", "--run-dir", "{run}"], r"TF_CONFIG is not valid JSON", _bad_tf_config),
    ("loss-diverges", [T, "scratch_mlp", "--data", "{good}", "--optimizer", "sgd", "--learning-rate", "1e30", "--run-dir", "{run}"], r"The loss became (nan|inf|-inf) at epoch 1, batch \d+;", None),
]  # fmt: skip


def snapshot(root: Path, *, exclude: Path | None = None) -> dict[str, tuple[int, int, str]]:
    """Size, mtime and SHA-256 of every file under `root` (but not under `exclude`)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (exclude is not None and path.is_relative_to(exclude)):
            files[str(path.relative_to(root))] = (
                path.stat().st_size,
                path.stat().st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return files


def _argv(template: list[str], corpus: Path, run_dir: Path) -> list[str]:
    names = {p.name: str(p) for p in corpus.iterdir()} | {"missing": str(corpus / "missing"), "run": str(run_dir)}
    return [re.sub(r"\{([\w.]+)\}", lambda m: names[m.group(1)], arg) for arg in template]


def _run_case(case_id, argv, match, setup, corpus: Path, cwd: Path, capsys) -> str | None:
    """Runs one corpus case; returns what went wrong, or None."""
    run_dir = cwd / case_id / "run"
    argv = _argv(argv, corpus, run_dir)
    if argv[0] == T:  # small and quick; the case's own flags come later, and argparse keeps the last
        argv = argv[:2] + FAST + argv[2:]
    corpus_before, cwd_before = snapshot(corpus), snapshot(cwd, exclude=run_dir)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as monkeypatch:
        if setup is not None:
            setup(monkeypatch)
        code = run.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    if code != 2:
        return f"exit code {code}: {err[-600:]}"
    if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err:
        return f"stderr is not one line starting with 'error: ': {err[-600:]!r}"
    if not re.search(match, lines[0]):
        return f"{match!r} not in {lines[0]!r}"
    if snapshot(corpus) != corpus_before:
        return "changed files of the corpus (data, models or an existing run directory)"
    if snapshot(cwd, exclude=run_dir) != cwd_before:
        return "changed files in the working directory outside the run directory"
    return None


def test_every_corpus_case_is_one_sentence_exit_2_and_touches_nothing(corpus, tmp_path, capsys):
    """The table above through `run.main`, in process (one test: each case costs less than the
    Keras session clean-up between tests)."""
    failures = {}
    for case_id, argv, match, setup in CASES:
        problem = _run_case(case_id, argv, match, setup, corpus, tmp_path, capsys)
        if problem:
            failures[case_id] = problem
    assert not failures, "\n".join(f"{case_id}: {problem}" for case_id, problem in failures.items())
    assert len(CASES) == len({case[0] for case in CASES})


def test_the_real_command_exits_2_without_a_traceback(corpus, tmp_path):
    """One case through `python -m kerastune_flow.run` in a subprocess: the process's exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["train", "cifar10_cnn", "--data", str(corpus / "truncated_jpeg"), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "kerastune_flow.run", *argv], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "001.jpg (corrupt or truncated JPEG)" in errors[0]
    assert proc.stderr.rstrip().endswith(errors[0])  # the last word is the sentence


# --------------------------------------------------------------------------- what must succeed


def test_mixed_modes_and_formats_train_as_rgb(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [T, "cifar10_cnn", "--data", str(corpus / "mixed"), "--image-size", "32", "--run-dir", str(run_dir), *FAST]

    assert run.main(argv) == 0, capsys.readouterr().err

    meta = json.loads((run_dir / train.CONFIG_JSON).read_text())
    assert meta["image_shape"] == [32, 32, 3] and sum(meta["sizes"].values()) == 18


def test_skip_bad_images_trains_on_the_rest_and_names_each_skipped_file(corpus, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    argv = [T, "cifar10_cnn", "--data", str(corpus / "truncated_png"), "--image-size", "32", "--run-dir", str(run_dir),
            "--skip-bad-images", *FAST]  # fmt: skip

    with caplog.at_level("WARNING"):
        assert run.main(argv) == 0, capsys.readouterr().err

    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"  skipped {corpus / 'truncated_png' / 'square' / '001.png'} (corrupt or truncated PNG)"]
    meta = json.loads((run_dir / train.CONFIG_JSON).read_text())
    assert sum(meta["sizes"].values()) == len(CLASSES) * PER_CLASS - 1
    assert meta["config"]["data"]["skip_bad_images"] is True


def test_unsafe_deserialization_loads_a_lambda_model_when_asked(corpus, capsys):
    model = str(corpus / "lambda.keras")
    image = str(corpus / "good" / "circle" / "000.png")
    with pytest.raises(RunDirError, match="Lambda layer") as info:  # the Python API: refused by default
        train.load_saved(model)
    assert isinstance(info.value, (KerastuneFlowError, OSError))

    assert run.main([E, model, "--data", str(corpus / "good"), "--unsafe-deserialization"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] > 0
    assert run.main([P, model, image, "--json", "--unsafe-deserialization"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["file"] == image
    base = models.cut_base(model, "flatten", unsafe_deserialization=True)
    assert base.output_shape == (None, SIZE * SIZE * 3)
    config = make_config("vgg16_features", base=model, base_output="dense", unsafe_deserialization=True)
    assert train.load_base(config).output_shape == (None, 8)


def test_predict_skips_bad_images_when_asked(corpus, capsys):
    folder = corpus / "not_an_image" / "square"

    assert run.main([P, str(corpus / "three_classes"), str(folder), "--json", "--skip-bad-images"]) == 0

    files = [row["file"] for row in json.loads(capsys.readouterr().out)]
    assert len(files) == PER_CLASS - 1 and str(folder / "001.png") not in files


# --------------------------------------------------------------------------- the image scan


def test_scan_names_every_bad_file_with_its_reason(corpus):
    paths = [str(corpus / name / "square" / f"001.{fmt}") for name, fmt in [
        ("not_an_image", "png"), ("empty_file", "jpg"), ("truncated_jpeg", "jpg"), ("truncated_png", "png"),
        ("one_bit_bmp", "bmp"), ("good", "png")]]  # fmt: skip

    scan = data.scan_images(paths)

    assert dict(scan.bad) == {
        paths[0]: "not an image",
        paths[1]: "empty file",
        paths[2]: "corrupt or truncated JPEG",
        paths[3]: "corrupt or truncated PNG",
        paths[4]: "a BMP image (mode 1) that TensorFlow cannot decode, re-save it as PNG",
    }
    assert scan.sizes == {paths[5]: (SIZE, SIZE)}


def test_many_bad_files_are_counted_after_the_first_three(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=PER_CLASS, size=SIZE)
    for i in range(PER_CLASS):
        (root / "a" / f"{i:03d}.png").write_bytes(b"")

    with pytest.raises(DataError) as info:
        data.load_data(str(root))

    message = str(info.value)
    assert message.startswith(f"4 of 8 image files under {root} cannot be decoded: ")
    assert message.count("(empty file)") == 3 and "and 1 more;" in message and "--skip-bad-images" in message
    assert message.endswith("Received: bad_files=4") and "\n" not in message


def test_a_folder_with_nothing_readable_left_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=2, size=SIZE)
    for path in root.rglob("*.png"):
        path.write_text("text")

    with pytest.raises(DataError, match="No readable image is left"):
        data.load_data(str(root), skip_bad_images=True)


def test_files_without_an_image_extension_are_ignored_with_a_warning(tmp_path, caplog):
    root = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=PER_CLASS, size=SIZE)
    (root / "a" / "labels.csv").write_text("x")
    (root / "b" / "photo.webp").write_bytes(b"RIFF")
    (root / "b" / ".DS_Store").write_bytes(b"\0")

    with caplog.at_level("WARNING"):
        splits = data.load_data(str(root))

    assert sum(splits.sizes.values()) == 2 * PER_CLASS
    assert "Ignoring 2 file(s)" in caplog.text and ".csv x1" in caplog.text and ".webp x1" in caplog.text


def test_images_smaller_than_the_model_are_upscaled_and_logged(corpus, caplog):
    with caplog.at_level("INFO"):
        splits = data.load_data(str(corpus / "tiny"), image_size=(32, 32), channels=3)

    assert splits.image_shape == (32, 32, 3)
    assert next(iter(splits.train))[0].shape == (32, 32, 3)
    assert f"12 of 12 images are smaller than 32x32 and are upscaled (the smallest is {TINY}x{TINY})" in caplog.text


@pytest.mark.slow
def test_the_scan_is_fast_on_thousands_of_files(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    paths = []
    for i in range(3000):
        paths.append(str(tmp_path / f"{i:04d}.{'jpg' if i % 2 else 'png'}"))
        Image.fromarray(np.roll(pixels, i, axis=0)).save(paths[-1])
    data.scan_images(paths[:10])  # warm up

    import time

    start = time.perf_counter()
    scan = data.scan_images(paths)
    seconds = time.perf_counter() - start

    assert not scan.bad and len(scan.sizes) == 3000
    assert seconds < 10, f"{seconds:.1f} s for 3000 files"  # about 0.4 s on 2 idle cores


# --------------------------------------------------------------------------- labels and classes


def test_check_labels_names_the_first_label_out_of_range():
    with pytest.raises(DataError, match=r"Label 5 at position 2 is not a class index in \[0, 3\) \(2 such"):
        data.check_labels(np.array([0, 2, 5, 1, -1]), 3)
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2)), np.array([0, 1, 2, 3])))
    with pytest.raises(DataError, match=r"Label 3 at position 3"):
        data.check_labels(ds, 3)
    data.check_labels(np.array([0, 1, 2]), 3)


def test_the_pipeline_stops_at_a_label_out_of_range_for_every_head():
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), "float32"), np.array([0, 1, 7, 1], "int32")))
    for label_mode in ("int", "binary", "categorical"):
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            list(data.prepare(ds, batch_size=4, label_mode=label_mode, num_classes=2))

        translated = data.label_range_error(info.value)
        assert isinstance(translated, DataError), label_mode
        assert "labels from 0 to 7, outside the 2 classes [0, 2)" in str(translated)
    assert len(list(data.prepare(ds, batch_size=4))) == 1  # no num_classes, no check (as before)


def test_labels_out_of_range_from_tfds_end_the_cli_with_one_sentence(tmp_path, monkeypatch, capsys):
    images = np.full((16, 28, 28, 1), 128.0, "float32")
    labels = np.array([3, 4] * 8, "int32")  # the head has 3 classes: 3 and 4 are out of range

    def fake_tfds(name, **kwargs):
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        return data.DataSplits(ds, ds, ds, ["0", "1", "2"], (28, 28, 1), {"train": 16, "validation": 16, "test": 16}, name)

    monkeypatch.setattr(data, "load_tfds", fake_tfds)
    argv = [T, "scratch_mlp", "--data", "mnist", "--run-dir", str(tmp_path / "run"), *FAST, "--batch-size", "4"]

    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The data holds labels from 3 to 4, outside the 3 classes [0, 3)")
    assert len(err.splitlines()) == 1


def test_one_class_is_refused_by_every_head():
    for head in (models.logits_head, models.transfer_head):
        with pytest.raises(ConfigError, match="at least two classes"):
            head(1)


# --------------------------------------------------------------------------- run directory and disk


def _fail_second_save(monkeypatch, *, code=errno.ENOSPC):
    """Patches Model.save: the first save works, later ones write half a file and fail."""
    real_save, seen = keras.Model.save, {}

    def save(self, filepath, *args, **kwargs):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 1:
            return real_save(self, filepath, *args, **kwargs)
        seen["best_before"] = hashlib.sha256((Path(filepath).parent / cb.BEST_MODEL).read_bytes()).hexdigest()
        Path(filepath).write_bytes(b"PK\x03\x04 half a model")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(keras.Model, "save", save)
    monkeypatch.setattr(cb.BestModelCheckpoint, "_improved", lambda self, value: True)  # save every epoch
    return seen


def test_a_full_disk_while_saving_the_best_model_keeps_the_previous_one(corpus, tmp_path, monkeypatch, capsys):
    seen = _fail_second_save(monkeypatch)
    run_dir = tmp_path / "run"
    argv = [T, "scratch_mlp", "--data", str(corpus / "good"), "--run-dir", str(run_dir), *FAST, "--epochs", "2"]

    assert run.main(argv) == 2

    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: The disk holding {re.escape(str(run_dir))} is full \([\d,.]+ \w+ free\), so model\.keras could not "
        r"be written and the files written before are kept; free some space or choose a --run-dir on another "
        r"disk, then run the same command to resume\. Received: \[Errno 28\] No space left on device\n",
        err,
    )
    assert hashlib.sha256((run_dir / cb.BEST_MODEL).read_bytes()).hexdigest() == seen["best_before"]
    assert keras.saving.load_model(run_dir / cb.BEST_MODEL).output_shape == (None, 3)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left
    # The epoch whose model could not be saved is logged but not backed up: the same command
    # resumes at it, and the history logger drops its record then.
    assert [r["epoch"] for r in cb.read_history(run_dir)] == [0, 1]
    assert (run_dir / cb.BACKUP_DIR / "fit").is_dir()


def test_a_read_only_file_system_while_saving_is_a_run_dir_error(tmp_path, monkeypatch):
    _fail_second_save(monkeypatch, code=errno.EROFS)
    model = _tiny_classifier()
    cb.atomic_save_model(model, tmp_path / cb.BEST_MODEL)

    with pytest.raises(RunDirError, match=r"Cannot write model\.keras in .*\(Read-only file system\)"):
        cb.atomic_save_model(model, tmp_path / cb.BEST_MODEL)
    assert os.listdir(tmp_path) == [cb.BEST_MODEL]


def test_a_full_disk_in_a_checkpoint_or_log_names_the_disk_and_other_errors_pass(tmp_path):
    full = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        tf.errors.ResourceExhaustedError(None, None, "backup/fit/ckpt-1.data; No space left on device"),
        tf.errors.UnknownError(None, None, "Failed to flush: No space left on device"),
    ]
    for error in full:
        translated = train._translate_runtime_error(error, tmp_path)
        assert isinstance(translated, RunDirError), error
        assert str(translated).startswith(f"The disk holding {tmp_path} is full (")
    # Not the user's doing: these travel on as they are, to the last-resort handler.
    assert train._translate_runtime_error(tf.errors.InvalidArgumentError(None, None, "shape mismatch"), tmp_path) is None
    assert train._translate_runtime_error(OSError(errno.EIO, "I/O error"), tmp_path) is None


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_can_start(corpus, tmp_path):
    finished = tmp_path / "finished"
    _write_run_dir(finished, _tiny_classifier(), finished=True)
    before = snapshot(finished)

    with pytest.raises(DataError):
        train.train_and_evaluate(make_config("cifar10_cnn", "smoke", data=str(corpus / "truncated_jpeg")), finished,
                                 overwrite=True)  # fmt: skip
    assert snapshot(finished) == before

    train.clear_finished_run(finished)
    assert sorted(p.name for p in finished.iterdir()) == []


# --------------------------------------------------------------------------- the last resort


def test_an_unexpected_error_is_one_line_exit_1_and_a_debug_hint(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something\nthe package did not foresee")

    monkeypatch.setitem(run.COMMANDS, "list", broken)
    monkeypatch.delenv(run.DEBUG_ENV, raising=False)

    assert run.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: unexpected RuntimeError: something the package did not foresee; this is probably a bug in "
        "kerastune_flow: rerun with KERASTUNE_FLOW_DEBUG=1 to see the traceback and report it\n"
    )
    monkeypatch.setenv(run.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="did not foresee"):
        run.main(["list"])
