"""The splits every loader returns (`DataSplits`), the file index a folder or CSV file gives
(`ImageIndex`), and the tfds image-classification data sets (mnist, cifar10, tf_flowers, beans, ...)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kerastune_flow.errors import DataError

log = logging.getLogger(__name__)

TFDS_NAMES = ("mnist", "cifar10")  # the examples the help names; any tfds image-classification set is read
# name[/config][:version], as tfds.builder takes it
_TFDS_NAME = re.compile(r"[a-z][a-z0-9_]*(/[\w.-]+)?(:[\w.*]+)?")
# The names a validation split goes by (split folders, a CSV file's split column, tfds splits).
VALIDATION_NAMES = ("validation", "valid", "val")
SPLITS = ("train", "validation", "test")
# The original archives tfds looks for in a manual directory (the basenames of its URLs).
TFDS_ARCHIVES = {
    "mnist": (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ),
    "cifar10": ("cifar-10-binary.tar.gz",),
}


@dataclasses.dataclass
class DataSplits:
    """Unbatched train/validation/test data sets and what is known about them.

    Attributes:
        train: (image float32 HxWxC in 0..255, label int32) examples.
        validation: same structure, never shuffled.
        test: same structure, never shuffled.
        class_names: label index -> name.
        image_shape: (height, width, channels) of every image.
        sizes: number of examples per split name.
        source: the tfds name, folder or file it came from.
        test_source: which images the test split holds, in words, for the output of `evaluate`.
        split_sources: split name -> where its examples come from, in words (a folder, the rows
            of a file, a tfds split, or what was carved from which), for the log and config.json.
        uint8: every pixel is a whole number in 0..255 (decoded from 8-bit files or a tfds image
            feature, rounded after resizing), so a cache may hold the images as uint8: a quarter
            of their float32 size, with nothing lost.
        merged: with cross-validation folds (`folds.fold_splits`), the training and validation
            examples merged, in the order the folds were cut from; else None.
        held_out: with folds, a bool per example of `merged`: True where it is in the validation
            fold (`train` is the others, `validation` these, each in `merged`'s order); else None.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    image_shape: tuple[int, int, int]
    sizes: dict[str, int]
    source: str
    test_source: str
    split_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    uint8: bool = False
    merged: tf.data.Dataset | None = None
    held_out: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class ImageIndex:
    """Image files by split, before they are read: what a folder or a CSV file lists.

    Attributes:
        parts: split name -> [(path, label)]: "train" always, "validation" and "test" when the
            source brings them (the rest is carved from train).
        class_names: label index -> name.
        sources: split name -> where its files are, in words (a folder, rows of a file).
        root: the folder or file given.
    """

    parts: dict[str, list[tuple[str, int]]]
    class_names: list[str]
    sources: dict[str, str]
    root: str


def nfc(name: str) -> str:
    """A class name in Unicode NFC, the form typed on every system (macOS writes file names in NFD)."""
    return unicodedata.normalize("NFC", name)


def is_tfds_name(source: str) -> bool:
    """True when `source` names a tfds data set (name[/config][:version]) and is no path that exists."""
    if os.path.exists(source) or not _TFDS_NAME.fullmatch(source):
        return False
    try:
        tfds.builder_cls(re.split(r"[/:]", source)[0])
    except tfds.core.registered.DatasetNotFoundError:
        return False
    return True


def tfds_has_test(name: str, *, data_dir: str | None = None) -> bool:
    """True when the tfds data set has a test split, or is not prepared yet (most have one)."""
    try:
        splits = tfds.builder(name, data_dir=data_dir).info.splits
    except Exception:  # a name tfds cannot build: load_tfds says why
        return True
    return not splits or "test" in splits


def _image_and_label(name: str, features) -> tuple[str, str]:
    """The keys of the image feature and of the class-label feature (by type; "image" and "label"
    win a tie).

    Raises:
        DataError: naming what the data set has instead.
    """
    items = dict(features.items()) if hasattr(features, "items") else {}
    images = [key for key, f in items.items() if isinstance(f, tfds.features.Image)]
    labels = [key for key, f in items.items() if isinstance(f, tfds.features.ClassLabel)]
    image = "image" if "image" in images else (images[0] if len(images) == 1 else None)
    label = "label" if "label" in labels else (labels[0] if len(labels) == 1 else None)
    if image is None or label is None:
        has = ", ".join(f"{key} ({type(f).__name__})" for key, f in items.items()) or type(features).__name__
        raise DataError(
            f"tfds data set {name!r} is not an image-classification set (one Image feature and one ClassLabel "
            f"feature); it has {has}; pass another data set or an image folder. Received: data={name}"
        )
    return image, label


def _prepare(builder, name: str, *, manual_dir: str | None) -> None:
    """`download_and_prepare` unless prepared already (offline then).

    Raises:
        DataError: naming what to do when tfds cannot prepare it.
    """
    expected = TFDS_ARCHIVES.get(name, ())
    if manual_dir and expected:
        folder = Path(manual_dir)
        missing = [f for f in expected if not (folder / f).is_file()]
        if not folder.is_dir() or missing:
            raise DataError(
                f"--manual-dir {folder} must hold the original {name} archives {', '.join(expected)}; "
                f"missing: {', '.join(missing or expected)}. Received: manual_dir={folder}"
            )
    if builder.is_prepared():
        return
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as error:  # tfds raises many types: network, checksum, missing file
        files = f"the original archives {', '.join(expected)}" if expected else "the files tfds asks for"
        if manual_dir:
            hint = f"check that {manual_dir} holds {files}, unmodified"
        else:
            hint = (
                f"there is no network: prepare it where there is one (`tfds build {name} --data_dir DIR`) and pass "
                f"--data-dir DIR, or pass --manual-dir with {files}"
            )
        raise DataError(
            f"tfds could not prepare {name!r} into {builder.data_dir}; {hint}. "
            f"Received: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        ) from None


def _split_plan(
    name: str, available: set[str], n_train: int, validation_fraction: float, test_fraction: float
) -> dict[str, tuple[str, str]]:
    """split -> (tfds split instruction, where from in words): the data set's own splits, the
    missing ones carved from the end of train (validation before test)."""
    validation = next((v for v in VALIDATION_NAMES if v in available), None)
    n_test = 0 if "test" in available else int(round(n_train * test_fraction))
    n_val = 0 if validation else int(round(n_train * validation_fraction))
    n_rest = n_train - n_val - n_test
    plan = {"train": (f"train[:{n_rest}]", f"the train split of {name}")}
    if n_val or n_test:
        plan["train"] = (plan["train"][0], f"the first {n_rest} of the train split of {name}")
    if validation:
        plan["validation"] = (validation, f"the {validation} split of {name}")
    else:
        plan["validation"] = (
            f"train[{n_rest}:{n_rest + n_val}]",
            f"carved from the train split of {name}: {n_val} examples after the first {n_rest}",
        )
    if "test" in available:
        plan["test"] = ("test", f"the test split of {name}")
    else:
        plan["test"] = (f"train[{n_train - n_test}:]", f"carved from the train split of {name}: its last {n_test}")
    return plan


def load_tfds(
    name: str,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> DataSplits:
    """Loads a tfds image-classification data set (builder, download_and_prepare, as_dataset: what
    `tfds.load` does) as train/validation/test.

    The data set's own validation and test splits are used when it has them; a missing one is
    carved from the end of its train split (`validation_fraction`, `test_fraction`), so it never
    overlaps the others. A prepared data set (in `data_dir`, or tfds's own folder) is read
    offline; with `manual_dir`, tfds prepares it from the files in that folder instead of
    downloading them. The image and label are the features of type Image and ClassLabel.

    Raises:
        DataError: a data set without an image and a class label, or without a train split; the
            manual folder lacks the expected archives; tfds cannot prepare it.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # a config or version that does not exist
        raise DataError(
            f"tfds cannot make a builder for {name!r}: {str(error).splitlines()[0][:200]}. Received: data={name}"
        ) from None
    image_key, label_key = _image_and_label(name, builder.info.features)
    _prepare(builder, name, manual_dir=manual_dir)
    info = builder.info
    # No split metadata, as under tfds.testing.mock_data: the train and test splits most sets have.
    available = set(info.splits) or {"train", "test"}
    if "train" not in available:
        raise DataError(
            f"tfds data set {name!r} has no train split; its splits are {', '.join(sorted(available))}. "
            f"Received: data={name}"
        )
    if "train" in info.splits:
        n_train = info.splits["train"].num_examples
    else:  # no split metadata: ask the data set itself
        n_train = int(builder.as_dataset(split="train").cardinality())
    plan = _split_plan(name, available, n_train, validation_fraction, test_fraction)
    datasets = []
    for split in SPLITS:
        instruction = plan[split][0]
        if instruction.startswith("train[") and _empty(instruction, n_train):
            # tfds rejects an empty slice ("corresponds to no data"): one example, none taken
            ds = builder.as_dataset(split="train[:1]", shuffle_files=False).take(0)
        else:
            ds = builder.as_dataset(split=instruction, shuffle_files=False)
        datasets.append(ds.map(lambda x: (x[image_key], x[label_key])))
    native = tuple(info.features[image_key].shape)
    in_channels = native[-1] or 3
    out_channels = channels or in_channels
    size = tuple(image_size) if image_size else (tuple(native[:2]) if None not in native[:2] else (32, 32))
    eight_bit = info.features[image_key].dtype == tf.uint8
    convert = _converter(in_channels, out_channels, size, resize=size != tuple(native[:2]), round_=eight_bit)
    train, val, test = (ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE) for ds in datasets)
    sources = {split: plan[split][1] for split in SPLITS}
    return DataSplits(
        train=train,
        validation=val,
        test=test,
        class_names=list(info.features[label_key].names),
        image_shape=(*size, out_channels),
        sizes={split: int(ds.cardinality()) for split, ds in zip(SPLITS, datasets, strict=True)},
        source=name,
        test_source=sources["test"],
        split_sources=sources,
        uint8=eight_bit,
    )


def whole_pixels(image: tf.Tensor) -> tf.Tensor:
    """`image` (float, 0..255 up to resampling) rounded to whole values in 0..255: what an 8-bit
    image holds, so that a uint8 cache keeps it exactly."""
    # through uint8, which also makes a rounded -0.0 a plain 0 (the same bytes in every path)
    return tf.cast(tf.saturate_cast(tf.round(image), tf.uint8), image.dtype)


def _empty(instruction: str, n_train: int) -> bool:
    """True when a `train[a:b]` slice holds no example."""
    start, _, stop = instruction[len("train[") : -1].partition(":")
    return (int(stop) if stop else n_train) - (int(start) if start else 0) <= 0


def _converter(in_channels: int, out_channels: int, size, *, resize: bool, round_: bool) -> Callable:
    """float32 images of `size` and `out_channels`; `round_`: to whole pixel values, as 8-bit
    images hold (resizing and grey conversion leave fractions)."""

    def convert(image, label):
        image = tf.cast(image, tf.float32)
        if in_channels == 1 and out_channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif in_channels == 3 and out_channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        if resize:
            image = tf.image.resize(image, size)
        if round_ and (resize or in_channels != out_channels):
            image = whole_pixels(image)
        return image, tf.cast(label, tf.int32)

    return convert
