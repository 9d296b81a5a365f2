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
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CHILD_PYTHONPATH, CLI, hide_modules, write_image_folder

from kerastune_flow import data, models, run, rundir
from kerastune_flow.deploy import inference
from kerastune_flow.errors import ConfigError, DataError, RunDirError
from kerastune_flow.recipes import make_config
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import resume, train

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
    model.save(folder / rundir.BEST_MODEL)
    meta = {
        "config": make_config("cifar10_cnn", image_size=(SIZE, SIZE)).to_dict(),
        "class_names": list(CLASSES),
        "image_shape": [SIZE, SIZE, 3],
        "head": {"units": 3, "activation": None, "label_mode": "int"},
    }
    (folder / rundir.CONFIG_JSON).write_text(json.dumps(meta))
    (folder / rundir.HISTORY_JSONL).write_text('{"epoch": 0, "loss": 1.0}\n')
    (folder / rundir.HISTORY_CSV).write_text("epoch,loss\n0,1.0\n")
    if finished:
        (folder / rundir.RESULTS_JSON).write_text('{"test": {"accuracy": 0.5}}')
        (folder / rundir.CURVES_PNG).write_bytes(b"\x89PNG not really")
    else:  # interrupted: a backup to resume from (one that cannot be read: the fit starts over)
        (folder / rundir.BACKUP_DIR / "fit").mkdir(parents=True)
        (folder / rundir.BACKUP_DIR / "fit" / "state.json").write_text('{"epoch": 1, "weights": "w.weights.h5"}')
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Bad (and a few good) folders, model files and run directories, made once."""
    root = tmp_path_factory.mktemp("corpus")
    good = write_image_folder(root / "good", classes=CLASSES, per_class=PER_CLASS, size=SIZE)
    for split, seed in (("train", 1), ("test", 2)):  # a folder with its own test split
        write_image_folder(root / "good_split" / split, classes=CLASSES, per_class=PER_CLASS, size=SIZE, seed=seed)
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
    (damaged / rundir.CONFIG_JSON).write_text('{"config": ')
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


def _no_onnx(monkeypatch):
    """The [export] extra not installed: importing its ONNX packages fails."""
    hide_modules(monkeypatch, ("tf2onnx", "onnx", "onnxruntime"))


def _bad_tf_config(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", ')


T, E, P = "train", "evaluate", "predict"
CNN, FEATURES, FINETUNE = "train cifar10_cnn", "train vgg16_features", "train vgg16_finetune"
# (id, command, what its one line must say[, set-up]). {name} is a file or folder of the corpus;
# `train` commands get FAST flags and a fresh --run-dir {run} first (their own flags win).
CASES = [
    # data folders
    ("data-missing", f"{CNN} --data {{missing}}", r"does not exist"),
    ("data-a-file", f"{CNN} --data {{a_file}}", r"not a file"),
    ("data-empty", f"{CNN} --data {{empty}}", r"at least two class folders"),
    ("data-no-images", f"{CNN} --data {{no_images}}", r"No images"),
    ("data-one-class", f"{CNN} --data {{one_class}}", r"at least two class folders.*classes=\['only'\]"),
    ("data-not-an-image", f"{CNN} --data {{not_an_image}}", r"001\.png \(not an image\).*--skip-bad-images"),
    ("data-empty-file", f"{CNN} --data {{empty_file}}", r"001\.jpg \(empty file\)"),
    ("data-truncated-jpeg", f"{CNN} --data {{truncated_jpeg}}", r"001\.jpg \(corrupt or truncated JPEG\)"),
    ("data-truncated-png", f"{CNN} --data {{truncated_png}}", r"001\.png \(corrupt or truncated PNG\)"),
    ("data-one-bit-bmp", f"{CNN} --data {{one_bit_bmp}}", r"001\.bmp \(a BMP image .*re-save it as PNG"),
    ("data-tiny-vgg16", f"{FEATURES} --data {{tiny}} --image-size 8", r"at least 32x32"),
    ("evaluate-corrupt-jpeg", "evaluate {three_classes} --data {truncated_jpeg}", r"corrupt or truncated JPEG"),
    ("predict-not-an-image", "predict {three_classes} {not_an_image}/square", r"not an image"),
    # classes
    ("evaluate-other-classes", "evaluate {three_classes} --data {two_classes}", r"2 classes but .* trained on 3"),
    # sizes, layers, epochs, batches, rates
    ("size-vgg16", f"{FEATURES} --image-size 16", r"at least 32x32"),
    ("size-mobilenetv2", f"{FINETUNE} --backbone mobilenetv2 --image-size 24x40", r"on mobilenetv2 needs .* 32x32"),
    ("size-cnn", f"{CNN} --image-size 12", r"at least 18x18"),
    ("unfreeze-index", f"{FINETUNE} --image-size 32 --unfreeze-at 99", r"from 0 to 18"),
    ("unfreeze-negative", f"{FINETUNE} --image-size 32 --unfreeze-at -1", r"from 0 to 18"),
    ("unfreeze-name", f"{FINETUNE} --image-size 32 --unfreeze-at block9_conv1", r"no layer named 'block9_conv1'"),
    ("unfreeze-fraction", f"{FINETUNE} --image-size 32 --unfreeze-at 1.5", r"\[0, 1\]"),
    ("progressive-name", f"{FINETUNE} --image-size 32 --progressive 0:block5_conv1:1e-5,2:nope:1e-6", r"named 'nope'"),
    ("epochs-zero", f"{CNN} --epochs 0", r"epochs must be at least 1"),
    ("epochs-negative", f"{CNN} --epochs -3", r"epochs must be at least 1"),
    ("head-epochs-zero", f"{FINETUNE} --head-epochs 0", r"head_epochs must be at least 1"),
    ("batch-too-large", f"{CNN} --image-size 32 --batch-size 64", r"fewer than one global batch"),
    ("batch-zero", f"{CNN} --batch-size 0", r"batch_size must be at least 1"),
    ("lr-zero", f"{CNN} --learning-rate 0", r"learning_rate must be positive"),
    ("lr-negative", f"{CNN} --learning-rate -0.1", r"learning_rate must be positive"),
    ("finetune-lr-zero", f"{FINETUNE} --finetune-learning-rate 0", r"finetune_learning_rate must be positive"),
    # run directories
    ("run-dir-finished", f"{CNN} --image-size 32 --run-dir {{finished}}", r"holds a finished run; pass --overwrite"),
    ("run-dir-overwrite-bad-data", f"{CNN} --data {{truncated_png}} --run-dir {{finished}} --overwrite", r"PNG"),
    ("run-dir-overwrite-bad-size", f"{CNN} --image-size 12 --run-dir {{finished}} --overwrite", r"at least 18x18"),
    ("run-dir-resume-bad-data", f"{CNN} --data {{truncated_jpeg}} --run-dir {{interrupted}}", r"truncated JPEG"),
    ("run-dir-under-a-file", f"{CNN} --run-dir {{a_file}}/run", r"Cannot write to the run .*Not a directory"),
    ("run-dir-is-a-file", f"{CNN} --run-dir {{a_file}}", r"Cannot write to the run directory .*File exists"),
    ("run-dir-not-writable", CNN, r"Permission denied\); choose a writable --run-dir", _deny_probe),
    # model files
    ("evaluate-garbage-keras", "evaluate {garbage.keras} --data {good}", r"Cannot load the model .*: it is corrupt"),
    ("evaluate-truncated-keras", "evaluate {truncated.keras} --data {good}", r"Cannot load the model .*corrupt"),
    ("predict-garbage-keras", "predict {garbage.keras} {good}/circle/000.png", r"it is corrupt"),
    ("base-garbage-keras", f"{FEATURES} --base {{garbage.keras}}", r"Cannot load the base model"),
    ("evaluate-tabular-model", "evaluate {tabular.keras} --data {good}", r"does not take one batch of images"),
    ("predict-tabular-model", "predict {tabular.keras} {good}/circle/000.png", r"does not take one batch of images"),
    ("base-tabular-model", f"{FEATURES} --base {{tabular.keras}}", r"does not take one batch of images"),
    ("evaluate-segmenter", "evaluate {segmenter.keras} --data {good}", r"does not end in one layer of class scores"),
    ("evaluate-damaged-config", "evaluate {damaged_config} --data {good}", r"config\.json is damaged"),
    ("evaluate-lambda", "evaluate {lambda.keras} --data {good}", r"Lambda layer.*pass --unsafe-deserialization"),
    # A bare .keras file does not say how its data was split: its "test" images could be training images.
    (
        "evaluate-bare-model-flat-folder",
        "evaluate {classifier.keras} --data {good}",
        r"no config\.json beside it.*test/",
    ),
    ("evaluate-bare-model-no-data", "evaluate {classifier.keras}", r"no config\.json beside it.*Received: data=None"),
    ("predict-lambda", "predict {lambda.keras} {good}/circle/000.png", r"Lambda layer.*pass --unsafe-deserialization"),
    ("base-lambda", f"{FEATURES} --base {{lambda.keras}}", r"Lambda layer.*pass --unsafe-deserialization"),
    # exports
    ("export-no-model", "export {empty} --format litert", r"No model at .*model\.keras"),
    ("export-unknown-format", "export {finished} --format coreml", r"--format: invalid choice: 'coreml'"),
    ("export-int8-saved-model", "export {finished} --format saved_model --quantize int8", r"float32 only"),
    ("export-out-exists", "export {finished} --format litert --out {good}", r"did not write.*new or empty --out"),
    (
        "export-no-runtime",
        "export {finished} --format onnx --out {run}",
        r"tf2onnx.*kerastune_flow\[export\]",
        _no_onnx,
    ),
    ("export-bare-int8", "export {classifier.keras} --format litert --quantize int8 --out {run}", r"calibrate int8"),
    # names, environment, divergence
    ("unknown-recipe", "train resnet --data {good}", r"invalid choice: 'resnet' \(choose from .*cifar10_cnn"),
    ("unknown-backbone", f"{FEATURES} --backbone alexnet", r"one of vgg16, .*mobilenetv2.*backbone='alexnet'"),
    ("unknown-strategy", f"{CNN} --strategy cluster", r"invalid choice: 'cluster' \(choose from .*multiworker"),
    ("unknown-augmentation", f"{CNN} --augment blur", r"augment must be one of flip, .*Received: augment='blur'"),
    (
        "jit-compile-not-a-choice",
        f"{CNN} --jit-compile yes",
        r"--jit-compile: invalid choice: 'yes' \(choose from 'auto', 'true', 'false'\)",
    ),
    ("unknown-approach", "compare --approaches scratch,magic --data {good} --run-dir {run}", r"'magic'; choose"),
    ("tf-config-not-json", CNN, r"TF_CONFIG is not valid JSON", _bad_tf_config),
    ("loss-diverges", "train scratch_mlp --optimizer sgd --learning-rate 1e30", r"loss became \S+ at epoch 1, batch"),
]


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


def _argv(command: str, corpus: Path, run_dir: Path) -> list[str]:
    words = command.split()
    if words[0] == T:  # small, quick and in the right place; the case's own flags come later and win
        words[2:2] = [*FAST, "--data", "{good}", "--run-dir", "{run}"]
    names = {p.name: str(p) for p in corpus.iterdir()} | {"missing": str(corpus / "missing"), "run": str(run_dir)}
    return [re.sub(r"\{([\w.]+)\}", lambda m: names[m.group(1)], word) for word in words]


def _run_case(case_id, command, match, setup, corpus: Path, cwd: Path, capsys) -> str | None:
    """Runs one corpus case; returns what went wrong, or None."""
    run_dir = cwd / case_id / "run"
    argv = _argv(command, corpus, run_dir)
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
    for case_id, command, match, *setup in CASES:
        problem = _run_case(case_id, command, match, setup[0] if setup else None, corpus, tmp_path, capsys)
        if problem:
            failures[case_id] = problem
    assert not failures, "\n".join(f"{case_id}: {problem}" for case_id, problem in failures.items())
    assert len(CASES) == len({case[0] for case in CASES})


def test_the_real_command_exits_2_without_a_traceback(corpus, tmp_path):
    """One case through `python -m kerastune_flow.run` in a subprocess: the process's exit code."""
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH}
    argv = ["train", "cifar10_cnn", "--data", str(corpus / "truncated_jpeg"), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120, env=env)
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

    meta = json.loads((run_dir / rundir.CONFIG_JSON).read_text())
    assert meta["image_shape"] == [32, 32, 3] and sum(meta["sizes"].values()) == 18


def test_skip_bad_images_trains_on_the_rest_and_names_each_skipped_file(corpus, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    argv = [
        T,
        "cifar10_cnn",
        "--data",
        str(corpus / "truncated_png"),
        "--image-size",
        "32",
        "--run-dir",
        str(run_dir),
        "--skip-bad-images",
        *FAST,
    ]

    with caplog.at_level("WARNING"):
        assert run.main(argv) == 0, capsys.readouterr().err

    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == [f"  skipped {corpus / 'truncated_png' / 'square' / '001.png'} (corrupt or truncated PNG)"]
    meta = json.loads((run_dir / rundir.CONFIG_JSON).read_text())
    assert sum(meta["sizes"].values()) == len(CLASSES) * PER_CLASS - 1
    assert meta["config"]["data"]["skip_bad_images"] is True


def test_unsafe_deserialization_loads_a_lambda_model_when_asked(corpus, capsys):
    model = str(corpus / "lambda.keras")
    image = str(corpus / "good" / "circle" / "000.png")
    with pytest.raises(RunDirError, match="Lambda layer"):  # the Python API: refused by default
        inference.load_saved(model)

    assert run.main([E, model, "--data", str(corpus / "good_split"), "--unsafe-deserialization"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == len(CLASSES) * PER_CLASS
    assert out["test_split"] == str(corpus / "good_split" / "test")
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
    paths = [
        str(corpus / name / "square" / f"001.{fmt}")
        for name, fmt in [
            ("not_an_image", "png"),
            ("empty_file", "jpg"),
            ("truncated_jpeg", "jpg"),
            ("truncated_png", "png"),
            ("one_bit_bmp", "bmp"),
            ("good", "png"),
        ]
    ]

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
    (root / "b" / "photo.heic").write_bytes(b"ftypheic")  # an iPhone photo: no decoder here (WebP is read)
    (root / "b" / ".DS_Store").write_bytes(b"\0")

    with caplog.at_level("WARNING"):
        splits = data.load_data(str(root))

    assert sum(splits.sizes.values()) == 2 * PER_CLASS
    assert "Ignoring 2 file(s)" in caplog.text and ".csv x1" in caplog.text and ".heic x1" in caplog.text


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
        sizes = {"train": 16, "validation": 16, "test": 16}
        return data.DataSplits(ds, ds, ds, ["0", "1", "2"], (28, 28, 1), sizes, name, "the test split")

    monkeypatch.setattr(data.loading, "load_tfds", fake_tfds)
    argv = [T, "scratch_mlp", "--data", "mnist", "--run-dir", str(tmp_path / "run"), *FAST, "--batch-size", "4"]

    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(r"error: A batch holds labels from [34] to [34], outside the 3 classes \[0, 3\)", err)
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
        seen["best_before"] = hashlib.sha256((Path(filepath).parent / rundir.BEST_MODEL).read_bytes()).hexdigest()
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
    assert hashlib.sha256((run_dir / rundir.BEST_MODEL).read_bytes()).hexdigest() == seen["best_before"]
    assert keras.saving.load_model(run_dir / rundir.BEST_MODEL).output_shape == (None, 3)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left
    # The epoch whose model could not be saved is logged but not backed up: the same command
    # resumes at it, and the history logger drops its record then.
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == [0, 1]
    assert (run_dir / rundir.BACKUP_DIR / "fit").is_dir()


def test_a_disk_too_full_for_the_next_epoch_stops_before_writing_anything(corpus, tmp_path, monkeypatch, capsys):
    import shutil

    real_usage, calls = shutil.disk_usage, []

    def usage(path):  # room for the first epoch's files, then 10 KB
        calls.append(path)
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, used, free if len(calls) == 1 else 10 * 1024)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    run_dir = tmp_path / "run"
    argv = [T, "scratch_mlp", "--data", str(corpus / "good"), "--run-dir", str(run_dir), *FAST, "--epochs", "3"]
    before = {}

    class Snapshot(keras.callbacks.Callback):  # what the run directory held when epoch 1 ended
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                before.update(snapshot(run_dir, exclude=run_dir / rundir.TENSORBOARD_DIR))

    original = cb.standard_callbacks
    monkeypatch.setattr(cb, "standard_callbacks", lambda *a, **k: [Snapshot(), *original(*a, **k)])

    assert run.main(argv) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"error: The disk holding {run_dir} is full (10.0 KB free, one epoch's checkpoints need ")
    assert "so epoch 2 is not saved and the files written before are kept" in err and len(err.splitlines()) == 1
    before.pop(".lock")  # held while the run lived, released when it ended
    assert snapshot(run_dir, exclude=run_dir / rundir.TENSORBOARD_DIR) == before  # not one byte written for epoch 2
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == [0]


def test_a_backup_that_cannot_be_read_back_falls_back_or_starts_over(tmp_path, caplog):
    folder = tmp_path / rundir.BACKUP_DIR / "fit"
    model = _tiny_classifier()
    model.compile("sgd", "mse")
    backup = resume.RunBackup(folder)
    backup.set_model(model)
    kernel = model.layers[-1].kernel
    for epoch in range(3):  # three epochs: the folder keeps the last two
        kernel.assign(np.full(kernel.shape, epoch, "float32"))
        backup.on_epoch_end(epoch)
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "weights-2.weights.h5", "weights-3.weights.h5"]

    kernel.assign(np.zeros(kernel.shape, "float32"))
    assert resume.RunBackup(folder).restore(model) == 3
    np.testing.assert_array_equal(kernel.numpy(), 2.0)

    _truncate(folder / "weights-3.weights.h5")  # killed, or the disk full, while the last was written
    with caplog.at_level("WARNING"):
        assert resume.RunBackup(folder).restore(model) == 2
    np.testing.assert_array_equal(kernel.numpy(), 1.0)
    assert "resuming from the one before" in caplog.text

    _truncate(folder / "weights-2.weights.h5")
    with caplog.at_level("WARNING"):
        assert resume.RunBackup(folder).restore(model) is None
    assert not folder.exists() and "this fit starts over" in caplog.text


def test_a_read_only_file_system_while_saving_is_a_run_dir_error(tmp_path, monkeypatch):
    _fail_second_save(monkeypatch, code=errno.EROFS)
    model = _tiny_classifier()
    rundir.atomic_save_model(model, tmp_path / rundir.BEST_MODEL)

    with pytest.raises(RunDirError, match=r"Cannot write model\.keras in .*\(Read-only file system\)"):
        rundir.atomic_save_model(model, tmp_path / rundir.BEST_MODEL)
    assert os.listdir(tmp_path) == [rundir.BEST_MODEL]


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
    shapes = tf.errors.InvalidArgumentError(None, None, "shape mismatch")
    assert train._translate_runtime_error(shapes, tmp_path) is None
    assert train._translate_runtime_error(OSError(errno.EIO, "I/O error"), tmp_path) is None


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_can_start(corpus, tmp_path):
    finished = tmp_path / "finished"
    _write_run_dir(finished, _tiny_classifier(), finished=True)
    before = snapshot(finished)

    with pytest.raises(DataError):
        train.train_and_evaluate(
            make_config("cifar10_cnn", "smoke", data=str(corpus / "truncated_jpeg")), finished, overwrite=True
        )
    assert snapshot(finished) == before

    rundir.clear_finished_run(finished)
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
