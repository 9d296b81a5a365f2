"""Shared fixtures. The CPU is split into two logical devices before TensorFlow starts, so that
MirroredStrategy runs with two real replicas on a machine without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# `--mixed-precision auto` (the default) picks bfloat16 on CPUs with native bfloat16: the tests run
# float32 on every CPU (their subprocesses inherit this), and test_device_settings.py turns it on.
os.environ.setdefault("KERASTUNE_FLOW_CPU_BF16", "0")

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

from kerastune_flow import models  # noqa: E402  (after the devices are split)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
NUM_CLASSES = 3
IMAGES_PER_CLASS = 12


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


@pytest.fixture
def split_image_folder(tmp_path: Path) -> Path:
    """A folder with train/ (12 per class) and test/ (4 per class) sub-folders."""
    root = tmp_path / "split"
    write_image_folder(root / "train", seed=1)
    write_image_folder(root / "test", per_class=4, seed=2)
    return root


@pytest.fixture(autouse=True)
def _seed_and_cwd(tmp_path, monkeypatch):
    """Every test starts from the same seeds and writes nothing outside its tmp_path."""
    keras.utils.set_random_seed(0)
    monkeypatch.chdir(tmp_path)
    yield
    # Names and graph state start over; free_memory=False skips the gc.collect() that costs 0.2 s a
    # test (Python's own collector frees the models soon enough).
    keras.backend.clear_session(free_memory=False)
