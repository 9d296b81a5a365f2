"""The splits every loader returns (`DataSplits`), and the tfds data sets (mnist, cifar10)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf
import tensorflow_datasets as tfds

from kerastune_flow.errors import DataError

TFDS_NAMES = ("mnist", "cifar10")
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
        source: the tfds name or the folder it came from.
        test_source: which images the test split holds, in words, for the output of `evaluate`.
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    image_shape: tuple[int, int, int]
    sizes: dict[str, int]
    source: str
    test_source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_tfds_name(source: str) -> bool:
    """True when `source` names a supported tfds data set rather than a folder."""
    return source in TFDS_NAMES and not os.path.isdir(source)


def load_tfds(
    name: str,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    validation_fraction: float = 0.1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
) -> DataSplits:
    """Loads mnist or cifar10 with tfds (builder, download_and_prepare, as_dataset: what
    `tfds.load` does), as_supervised, with a validation split.

    The validation set is the last `validation_fraction` of the official train split, so it
    never overlaps the official test split. With `manual_dir`, tfds prepares the data set from
    the original archives in that folder instead of downloading them.

    Raises:
        DataError: naming the expected archive files when the manual folder lacks them or they
            do not match tfds' checksums, or when the download fails.
    """
    expected = TFDS_ARCHIVES.get(name, ())
    if manual_dir:
        folder = Path(manual_dir)
        missing = [f for f in expected if not (folder / f).is_file()]
        if not folder.is_dir() or missing:
            raise DataError(
                f"--manual-dir {folder} must hold the original {name} archives {', '.join(expected)}; "
                f"missing: {', '.join(missing or expected)}. Received: manual_dir={folder}"
            )
    builder = tfds.builder(name, data_dir=data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=download_config)
    except Exception as error:  # tfds raises many types: network, checksum, missing file
        hint = (
            f"check that {manual_dir} holds the original, unmodified archives {', '.join(expected)}"
            if manual_dir
            else f"there is no network: pass --manual-dir with the original archives {', '.join(expected)}"
        )
        raise DataError(
            f"tfds could not prepare {name!r} into {builder.data_dir}; {hint}. "
            f"Received: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        ) from None
    info = builder.info
    if "train" in info.splits:
        n_train = info.splits["train"].num_examples
    else:  # no split metadata, as under tfds.testing.mock_data: ask the data set itself
        n_train = int(builder.as_dataset(split="train").cardinality())
    n_val = int(round(n_train * validation_fraction))
    split_names = [f"train[:{n_train - n_val}]", f"train[{n_train - n_val}:]", "test"]
    if n_val == 0:
        split_names[1] = "train[:1]"  # tfds rejects an empty slice ("corresponds to no data")
    datasets = builder.as_dataset(split=split_names, as_supervised=True, shuffle_files=False)
    if n_val == 0:
        datasets[1] = datasets[1].take(0)
    native = tuple(info.features["image"].shape)
    out_channels = channels or native[-1]
    size = tuple(image_size) if image_size else tuple(native[:2])
    convert = _converter(native[-1], out_channels, size, resize=size != tuple(native[:2]))
    train, val, test = (ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE) for ds in datasets)
    return DataSplits(
        train=train,
        validation=val,
        test=test,
        class_names=list(info.features["label"].names),
        image_shape=(*size, out_channels),
        sizes={name: int(ds.cardinality()) for name, ds in zip(("train", "validation", "test"), datasets, strict=True)},
        source=name,
        test_source=f"the test split of {name}",
    )


def _converter(in_channels: int, out_channels: int, size, *, resize: bool) -> Callable:
    def convert(image, label):
        image = tf.cast(image, tf.float32)
        if in_channels == 1 and out_channels == 3:
            image = tf.image.grayscale_to_rgb(image)
        elif in_channels == 3 and out_channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        if resize:
            image = tf.image.resize(image, size)
        return image, tf.cast(label, tf.int32)

    return convert
