"""Shared fixtures and helpers. The CPU is split into two logical devices before TensorFlow starts,
so that MirroredStrategy runs with two real replicas on a machine without a GPU.

Test modules import the plain helpers by name (`from conftest import REPO, smoke`); pytest finds the
fixtures itself.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# `--mixed-precision auto` (the default) picks bfloat16 on CPUs with native bfloat16: the tests see a
# CPU without it, here and in the processes they start (fake_cpu/sitecustomize.py, first on PYTHONPATH),
# so they run float32 on every CPU; test_device_settings.py fakes one with it.
FAKE_CPU = Path(__file__).resolve().parent / "fake_cpu"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE_CPU), os.environ.get("PYTHONPATH")) if p)
# The PYTHONPATH of a process a test starts: the fake CPU first, then this clone's package.
CHILD_PYTHONPATH = os.pathsep.join((str(FAKE_CPU), str(Path(__file__).resolve().parents[1])))
exec(compile((FAKE_CPU / "sitecustomize.py").read_text(), str(FAKE_CPU / "sitecustomize.py"), "exec"), {})

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker is one process on one of the cores: one thread for each op, instead
    # of two workers' two threads each spinning on two cores.
    tf.config.threading.set_intra_op_parallelism_threads(1)
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

from kerastune_flow import models, rundir  # noqa: E402  (after the devices are split)
from kerastune_flow.recipes import make_config  # noqa: E402
from kerastune_flow.training import caches, callbacks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
NUM_CLASSES = 3
IMAGES_PER_CLASS = 12
# The command line as a user's shell runs it, in a child process: `[*CLI, "train", ...]`.
CLI = (sys.executable, "-m", "kerastune_flow.run")
TIMINGS = ("epoch_seconds", "wall_time")  # the history's columns that differ between equal runs


def smoke(recipe: str, folder, **overrides):
    """The recipe's smoke preset on the images in `folder`, with `overrides` (config field names)."""
    return make_config(recipe, "smoke", data=str(folder), **overrides)


def staged(folder, base_model, **overrides):
    """A staged fine-tune (`vgg16_finetune`, smoke preset) of the `base_model` fixture's small CNN,
    cut before its head (no ImageNet weights exist here), on the images in `folder`."""
    return smoke("vgg16_finetune", folder, **{"base": str(base_model), "base_output": "dense", **overrides})


def add_callbacks(monkeypatch, *extra) -> None:
    """Appends the Keras callbacks `extra` to every fit the package runs while the test lasts."""
    original = callbacks.standard_callbacks
    monkeypatch.setattr(callbacks, "standard_callbacks", lambda *a, **k: original(*a, **k) + list(extra))


def backed_up_epoch(run_dir: Path) -> int:
    """The epoch count in the fit's backup of a run (or a trial) folder; 0 before the first backup
    and while a backup is half written."""
    try:
        return rundir.read_json(run_dir / rundir.BACKUP_DIR / "fit" / "state.json")["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def run_outcome(run_dir: Path) -> tuple:
    """What a run ends with, to compare two runs: its weights' hash, its test metrics and its
    history without the timings (which no two runs share)."""
    results = rundir.read_json(run_dir / rundir.RESULTS_JSON)
    history = [{k: v for k, v in r.items() if k not in TIMINGS} for r in rundir.read_history(run_dir)]
    return results["weights_sha256"], results["test"], history


def hide_modules(monkeypatch, names: Iterable[str]) -> None:
    """Importing any package in `names` (top-level names) fails while the test lasts, as when an
    optional extra is not installed: the package imports its optional dependencies through
    `importlib.import_module`."""
    names = tuple(names)
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name.split(".")[0] in names:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)


@contextlib.contextmanager
def package_log_lines() -> Iterator[list[str]]:
    """The messages the package logs at INFO and above inside the block (for module-scoped
    fixtures, where pytest's caplog is not available)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("kerastune_flow")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def write_tfds_metadata(tfds, name: str, data_dir: Path, splits: dict[str, int], *, label_names=None) -> None:
    """Writes the metadata files a prepared tfds dataset `name` leaves in `data_dir`, with the split
    sizes `splits` (and the class names `label_names`, when given), and no examples."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    if label_names is not None:
        builder.info.features["label"].names = label_names
    infos = [tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0) for split, n in splits.items()]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)


def write_image_folder(
    root: Path,
    *,
    classes=("circle", "square", "triangle"),
    per_class: int = IMAGES_PER_CLASS,
    size: int = 20,
    mode: str = "RGB",
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Writes a learnable image folder: each class has its own mean brightness and a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(exist_ok=True)
        level = 40 + 170 * label / max(1, len(classes) - 1)
        for i in range(per_class):
            channels = 1 if mode == "L" else 3
            pixels = np.clip(rng.normal(level, 15, size=(size, size, channels)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
            image.save(folder / f"{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A flat folder of 3 classes x 12 RGB 20x20 PNG images."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A user's own pre-trained base: a small CNN for 4 classes saved by Keras, to cut before its
    head with `base_output="dense"` (no ImageNet weights exist here)."""
    keras.utils.set_random_seed(5)
    path = tmp_path_factory.mktemp("base") / "cnn.keras"
    models.build_cifar10_cnn(input_shape=(32, 32, 3), num_classes=4).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 16 RGB 20x20 PNG images, written once for the test module whose runs share them."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=16)


@pytest.fixture
def split_image_folder(tmp_path: Path) -> Path:
    """A folder with train/ (12 per class) and test/ (4 per class) sub-folders."""
    root = tmp_path / "split"
    write_image_folder(root / "train", seed=1)
    write_image_folder(root / "test", per_class=4, seed=2)
    return root


@pytest.fixture(autouse=True)
def _seed_and_cwd(tmp_path, monkeypatch):
    """Every test starts from the same seeds, with no frozen part's output kept from an earlier
    test (`caches.shared`), and writes nothing outside its tmp_path."""
    keras.utils.set_random_seed(0)
    caches.forget()
    monkeypatch.chdir(tmp_path)
    yield
    # Names and graph state start over; free_memory=False skips the gc.collect() that costs 0.2 s a
    # test (Python's own collector frees the models soon enough).
    keras.backend.clear_session(free_memory=False)
