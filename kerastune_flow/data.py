"""Data: tfds data sets and image folders in, `tf.data` pipelines out.

`load_data` returns unbatched splits of (image, label) with float32 images in 0..255 and int32
labels; each model does its own scaling, so a saved model takes raw pixels. `prepare` adds the
pipeline tail: cache, shuffle, batch at the global batch size, augmentation, labels in the form
the head expects, prefetch.

An image folder is either `train/` and `test/` sub-folders with one folder per class each (the
validation set is then taken from train), or class folders directly (validation and test are then
taken per class, seeded, so every class appears in every split).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import strategy as strategy_lib
from kerastune_flow.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
LABEL_MODES = ("int", "binary", "categorical")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SKIP_BAD_IMAGES_FLAG = "--skip-bad-images"
BAD_FILES_NAMED = 3  # bad files named in an error message; the rest are counted
SCAN_BATCH = 1024  # scan results per Python round trip (one per file costs 0.7 ms)
# Marks the in-pipeline label check, so that a failing fit can be told from other errors.
LABEL_RANGE_MARKER = "kerastune_flow: label out of range"
_DEFAULT_CACHE_BUDGET = 2 * 1024**3


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
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    class_names: list[str]
    image_shape: tuple[int, int, int]
    sizes: dict[str, int]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def is_tfds_name(source: str) -> bool:
    """True when `source` names a supported tfds data set rather than a folder."""
    return source in TFDS_NAMES and not os.path.isdir(source)


def load_data(
    source: str,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Loads a tfds data set by name or an image folder by path.

    Args:
        source: "mnist", "cifar10", or a path to an image folder.
        image_size: (height, width) to resize to; None keeps a tfds set's native size, and
            a folder's images are then resized to 32x32.
        channels: 1 or 3 to convert to; None keeps the data's own (a folder of grayscale
            images gives 1).
        validation_fraction: share of the training data held out for validation.
        test_fraction: share held out for test when the source has no test split.
        data_dir: tfds data directory (default ~/tensorflow_datasets).
        manual_dir: folder with the original archives, so tfds prepares without a download.
        max_examples: keep at most this many examples of each split (smoke runs).
        train_fraction: keep this share of the training split (data-size sweeps); the
            validation and test splits stay whole, so results stay comparable.
        seed: seeds the split of a folder without train/ and test/.
        skip_bad_images: leave out a folder's files that cannot be decoded, with a warning
            naming each, instead of refusing the folder.

    Returns:
        DataSplits.

    Raises:
        DataError: a folder that is missing, empty, has one class, holds files that cannot
            be decoded (unless `skip_bad_images`), or a tfds set that cannot be prepared.
    """
    if is_tfds_name(source):
        splits = load_tfds(
            source,
            image_size=image_size,
            channels=channels,
            validation_fraction=validation_fraction,
            data_dir=data_dir,
            manual_dir=manual_dir,
        )
    else:
        splits = load_image_folder(
            source,
            image_size=image_size or (32, 32),
            channels=channels,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
            skip_bad_images=skip_bad_images,
        )
    if max_examples:
        for name in ("train", "validation", "test"):
            setattr(splits, name, getattr(splits, name).take(max_examples))
            splits.sizes[name] = min(splits.sizes[name], max_examples)
    if train_fraction < 1.0:
        keep = max(1, int(round(splits.sizes["train"] * train_fraction)))
        splits.train = splits.train.take(keep)  # the split is shuffled across classes already
        splits.sizes["train"] = keep
    return splits


# --------------------------------------------------------------------------- tfds


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
    import tensorflow_datasets as tfds  # heavy import, only when a tfds set is asked for

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
        sizes={
            name: int(ds.cardinality()) for name, ds in zip(("train", "validation", "test"), datasets)
        },
        source=name,
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


# --------------------------------------------------------------------------- image folders


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    return sorted(
        str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def index_image_folder(root: str | os.PathLike) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Lists the images of a folder by split without reading them.

    Args:
        root: a folder with `train/` and `test/` class folders, or class folders directly.

    Returns:
        ({"train": [(path, label)], "test": [...]} or {"all": [...]}, class_names).

    Raises:
        DataError: naming the folder and what it should contain.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"Data folder {root} does not exist; pass --data with mnist, cifar10 or a folder with one "
            f"sub-folder per class. Received: data={root}"
        )
    if not root.is_dir():
        raise DataError(f"--data must be a folder of class folders, not a file. Received: data={root}")
    layout = {"train": root / "train", "test": root / "test"}
    if all(p.is_dir() for p in layout.values()):
        class_names = [p.name for p in _class_dirs(layout["train"])]
        test_names = [p.name for p in _class_dirs(layout["test"])]
        if set(test_names) - set(class_names):
            raise DataError(
                f"{layout['test']} has classes that {layout['train']} lacks; both need the same class "
                f"folders. Received: extra={sorted(set(test_names) - set(class_names))}"
            )
        parts = {name: folder for name, folder in layout.items()}
    else:
        class_names = [p.name for p in _class_dirs(root)]
        parts = {"all": root}
    if len(class_names) < 2:
        raise DataError(
            f"{root} needs at least two class folders (one sub-folder of images per class). "
            f"Received: classes={class_names}"
        )
    indexed = {}
    ignored: collections.Counter = collections.Counter()
    for split, folder in parts.items():
        items = []
        for label, name in enumerate(class_names):
            class_dir = folder / name
            if class_dir.is_dir():
                items.extend((path, label) for path in _image_files(class_dir))
                ignored.update(
                    p.suffix.lower() or "(no extension)"
                    for p in class_dir.rglob("*")
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_EXTENSIONS
                )
        indexed[split] = items
    if ignored:
        log.warning(
            "Ignoring %d file(s) under %s without an image extension (%s): only %s files are read",
            sum(ignored.values()),
            root,
            ", ".join(f"{ext} x{n}" for ext, n in ignored.most_common()),
            ", ".join(IMAGE_EXTENSIONS),
        )
    for split, items in indexed.items():
        if not items:
            raise DataError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {parts[split]}; put the images "
                f"in one folder per class. Received: data={root}"
            )
    return indexed, class_names


def _stratified_split(
    items: Sequence[tuple[str, int]], fractions: Sequence[float], seed: int
) -> list[list[tuple[str, int]]]:
    """Splits per class so that every class lands in every split; the rest goes first."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    out: list[list[tuple[str, int]]] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        start = 0
        held = []
        for fraction in fractions:
            n = int(round(len(members) * fraction))
            if fraction > 0 and n == 0 and len(members) > len(fractions):
                n = 1
            held.append(members[start : start + n])
            start += n
        out[0].extend(members[start:])
        for i, part in enumerate(held):
            out[i + 1].extend(part)
    for part in out:
        rng.shuffle(part)  # mix classes so that a take(n) still sees all of them
    return out


def detect_channels(paths: Sequence[str], sample: int = 32) -> int:
    """Returns 1 when every sampled image is grayscale, else 3."""
    from PIL import Image  # Pillow comes with matplotlib

    step = max(1, len(paths) // sample)
    for path in list(paths)[::step][:sample]:
        try:
            with Image.open(path) as image:
                if image.mode not in _GRAY_MODES:
                    return 3
        except OSError:
            continue  # unreadable files are reported by the decoder with their name
    return 1


def _decode_image(raw: tf.Tensor, channels: int) -> tf.Tensor:
    """`tf.io.decode_image` to `channels`; TF decodes GIF and BMP only to 3 or 4 channels, so a
    grayscale request decodes those to RGB first."""
    if channels != 1:
        return tf.io.decode_image(raw, channels=channels, expand_animations=False)
    gif_or_bmp = tf.logical_or(
        tf.strings.substr(raw, 0, 3) == "GIF", tf.strings.substr(raw, 0, 2) == "BM"
    )
    return tf.cond(
        gif_or_bmp,
        lambda: tf.image.rgb_to_grayscale(
            tf.io.decode_image(raw, channels=3, expand_animations=False)
        ),
        lambda: tf.io.decode_image(raw, channels=1, expand_animations=False),
    )


def _probe_image(raw: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes `raw` as the pipeline would, and returns its (height, width).

    A JPEG is decoded at 1/8 scale: libjpeg still reads every coefficient, so a truncated or
    corrupt file fails the same way, at half the cost; its size comes from the header.
    """

    def jpeg():
        small = tf.io.decode_jpeg(raw, channels=channels, ratio=8)
        # The header's size, plus zeros that make the decode (the actual check) run.
        return tf.io.extract_jpeg_shape(raw)[:2] + 0 * tf.shape(small)[:2]

    def other():
        return tf.shape(_decode_image(raw, channels))[:2]

    size = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    tf.debugging.assert_positive(tf.reduce_min(size), message="the image has no pixels")
    return size


def _bad_image_reason(path: str, channels: int) -> str:
    """Why one file fails to decode, in a few words (eager, for the few that do)."""
    try:
        raw = tf.io.read_file(path)
        if int(tf.strings.length(raw)) == 0:
            return "empty file"
        _probe_image(raw, channels)
    except tf.errors.OpError as error:
        message = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "", error.message.strip().splitlines()[0])
    else:
        return "decoded on a second try (a flaky file system?)"
    if "Unknown image file format" in message:
        return "not an image"
    if "jpeg::" in message:
        return "corrupt or truncated JPEG"
    if "Invalid PNG" in message:
        return "corrupt or truncated PNG"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            kind = f"{image.format} image (mode {image.mode})"
    except Exception:  # Pillow cannot read it either: TensorFlow's words are the best we have
        return message[:120]
    return f"a {kind} that TensorFlow cannot decode, re-save it as PNG"


@dataclasses.dataclass
class ImageScan:
    """What a scan of image files found.

    Attributes:
        bad: (path, reason) of every file that cannot be decoded, sorted by path.
        sizes: (height, width) of every readable file, by path.
    """

    bad: list[tuple[str, str]]
    sizes: dict[str, tuple[int, int]]

    def smaller_than(self, size: Sequence[int]) -> list[str]:
        """Readable files smaller than `size` (height, width) in either dimension."""
        return [p for p, (h, w) in self.sizes.items() if h < size[0] or w < size[1]]


def scan_images(paths: Sequence[str], *, channels: int = 3) -> ImageScan:
    """Decodes every file once, in parallel, to find those that would fail the pipeline.

    The decoder is the pipeline's own (`tf.io.decode_image`), so a file that passes the scan
    decodes in training; JPEGs are decoded at 1/8 scale, which still reads all of their data.
    About 0.1 ms per small image and 0.3 ms per 400x300 JPEG on 2 CPU cores.

    Args:
        paths: image files.
        channels: the channel count the pipeline will decode to (1 or 3).

    Returns:
        ImageScan.
    """
    paths = [str(p) for p in paths]
    if not paths:
        return ImageScan(bad=[], sizes={})

    def probe(path):
        return path, _probe_image(tf.io.read_file(path), channels)

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = with_autotune(ds.ignore_errors(log_warning=False).batch(SCAN_BATCH))
    sizes: dict[str, tuple[int, int]] = {}
    for names, shapes in ds.as_numpy_iterator():
        sizes.update((n.decode(), (int(h), int(w))) for n, (h, w) in zip(names, shapes))
    bad = sorted(p for p in set(paths) if p not in sizes)
    return ImageScan(bad=[(p, _bad_image_reason(p, channels)) for p in bad], sizes=sizes)


def check_images(
    paths: Sequence[str], *, channels: int = 3, skip_bad_images: bool = False, where: str | os.PathLike = ""
) -> ImageScan:
    """`scan_images`, then refuse the bad files or, with `skip_bad_images`, warn about each.

    Raises:
        DataError: naming the first bad files, how many there are, and the flag that skips
            them (unless `skip_bad_images`).
    """
    scan = scan_images(paths, channels=channels)
    if not scan.bad:
        return scan
    where = f" under {where}" if str(where) else ""
    if not skip_bad_images:
        named = ", ".join(f"{p} ({reason})" for p, reason in scan.bad[:BAD_FILES_NAMED])
        more = f" and {len(scan.bad) - BAD_FILES_NAMED} more" if len(scan.bad) > BAD_FILES_NAMED else ""
        raise DataError(
            f"{len(scan.bad)} of {len(paths)} image files{where} cannot be decoded: {named}{more}; "
            f"delete or re-save them, or pass {SKIP_BAD_IMAGES_FLAG} to leave them out. "
            f"Received: bad_files={len(scan.bad)}"
        )
    log.warning("Leaving out %d of %d image files%s that cannot be decoded:", len(scan.bad), len(paths), where)
    for path, reason in scan.bad:
        log.warning("  skipped %s (%s)", path, reason)
    return scan


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (32, 32),
    channels: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Loads an image folder into train/validation/test splits.

    Images are decoded and resized the way `keras.utils.image_dataset_from_directory` does
    (bilinear, float32 0..255); the file list is indexed here so that the three-way split is
    stratified, seeded and fixed in membership across epochs. Every file is decoded once up
    front (`scan_images`), so a corrupt one is named now rather than failing an epoch later.
    Grayscale, palette and RGBA images are converted to the channel count of the folder.

    Raises:
        DataError: see `index_image_folder` and `check_images`; also when no readable image
            is left in the training split.
    """
    indexed, class_names = index_image_folder(root)
    if "all" in indexed:
        train, val, test = _stratified_split(indexed["all"], [validation_fraction, test_fraction], seed)
    else:
        train, val = _stratified_split(indexed["train"], [validation_fraction], seed)
        test = _stratified_split(indexed["test"], [], seed)[0]  # class-sorted on disk; mix it
    channels = channels or detect_channels([p for p, _ in train])
    size = tuple(image_size)
    scan = check_images(
        [p for p, _ in train + val + test], channels=channels, skip_bad_images=skip_bad_images, where=root
    )
    if scan.bad:
        bad = {p for p, _ in scan.bad}
        train, val, test = ([item for item in part if item[0] not in bad] for part in (train, val, test))
        if not train:
            raise DataError(
                f"No readable image is left in the training split of {root}; replace the files named above. "
                f"Received: bad_files={len(bad)}"
            )
    small = scan.smaller_than(size)
    if small:
        smallest = min((scan.sizes[p] for p in small), key=lambda hw: hw[0] * hw[1])
        log.info(
            "%d of %d images are smaller than %dx%d and are upscaled (the smallest is %dx%d)",
            len(small),
            len(scan.sizes),
            size[0],
            size[1],
            *smallest,
        )

    def decode(path, label):
        image = _decode_image(tf.io.read_file(path), channels)
        image = tf.image.resize(image, size)
        image.set_shape((*size, channels))
        return image, label

    def to_dataset(items):
        paths = [p for p, _ in items]
        labels = [label for _, label in items]
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int32))
        )
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    return DataSplits(
        train=to_dataset(train),
        validation=to_dataset(val),
        test=to_dataset(test),
        class_names=class_names,
        image_shape=(*size, channels),
        sizes={"train": len(train), "validation": len(val), "test": len(test)},
        source=str(root),
    )


def load_images(paths: Sequence[str], *, image_size: tuple[int, int], channels: int) -> tf.Tensor:
    """Reads image files into one float32 batch (N, H, W, C) in 0..255, for prediction.

    Raises:
        DataError: naming the first file that is missing or cannot be decoded.
    """
    images = []
    for path in paths:
        try:
            image = _decode_image(tf.io.read_file(path), channels)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
            raise DataError(
                f"Cannot read image {path}: it is missing or not a JPEG/PNG/GIF/BMP file. "
                f"Received: {type(error).__name__}"
            ) from None
        images.append(tf.image.resize(image, image_size))
    return tf.stack(images)


def expand_image_arguments(items: Sequence[str]) -> list[str]:
    """Turns files and folders (searched recursively for images) into a sorted file list."""
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths.extend(_image_files(p))
        elif p.exists():
            paths.append(str(p))
        else:
            raise DataError(f"Image or folder {p} does not exist. Received: {item}")
    if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(items)}.")
    return paths


# --------------------------------------------------------------------------- pipeline tail


def make_augmenter(names: Sequence[str], image_shape: tuple[int, int, int], seed: int = 0):
    """Returns a Keras Sequential of random preprocessing layers, or None for no augmentation.

    Args:
        names: any of "flip", "rotation", "zoom", "crop" (pad by 1/8, then random crop back).
        image_shape: (height, width, channels) of the images.
        seed: seeds every layer.
    """
    if not names:
        return None
    height, width = image_shape[:2]
    layers = []
    if "crop" in names:
        pad_h, pad_w = max(1, height // 8), max(1, width // 8)
        layers += [
            keras.layers.ZeroPadding2D((pad_h, pad_w)),
            keras.layers.RandomCrop(height, width, seed=seed),
        ]
    if "flip" in names:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if "rotation" in names:
        layers.append(keras.layers.RandomRotation(0.1, seed=seed))
    if "zoom" in names:
        layers.append(keras.layers.RandomZoom(0.1, seed=seed))
    return keras.Sequential(layers, name="augmentation")


def _memory_budget() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return _DEFAULT_CACHE_BUDGET


def should_cache(num_examples: int, image_shape: Sequence[int], policy: str = "auto") -> bool:
    """Caching policy: "memory" always, "none" never, "auto" when the decoded split fits in a
    quarter of the machine's memory."""
    if policy != "auto":
        return policy == "memory"
    size = num_examples * 4
    for dim in image_shape:
        size *= dim
    return size <= _memory_budget()


def check_labels(labels: Any, num_classes: int) -> None:
    """Checks that every label is an integer class index in [0, num_classes).

    Args:
        labels: an array-like of labels, or a `tf.data.Dataset` of (example, label) pairs
            (iterated once; use it on in-memory data, the pipeline checks the rest as it runs).
        num_classes: the classes of the head.

    Raises:
        DataError: naming the first label out of range and where it is.
    """
    if isinstance(labels, tf.data.Dataset):
        labels = np.concatenate([np.reshape(y, -1) for y in labels.map(lambda x, y: y).as_numpy_iterator()] or [[]])
    values = np.reshape(np.asarray(labels), -1)
    bad = np.flatnonzero((values < 0) | (values >= num_classes) | (values != np.round(values)))
    if bad.size:
        raise DataError(
            f"Label {values[bad[0]]} at position {bad[0]} is not a class index in [0, {num_classes}) "
            f"({bad.size} such labels); relabel the data as 0 to {num_classes - 1} or use a head with more "
            f"classes. Received: num_classes={num_classes}"
        )


def label_range_error(error: Exception) -> DataError | None:
    """The DataError for a fit that the pipeline's label check stopped, else None."""
    text = str(error)
    if LABEL_RANGE_MARKER not in text:
        return None
    found = re.search(re.escape(LABEL_RANGE_MARKER) + r"\D*?(\d+)\D+?(-?\d+)\D+?(-?\d+)", text)
    classes, low, high = found.groups() if found else ("?", "?", "?")
    return DataError(
        f"A batch holds labels from {low} to {high}, outside the {classes} classes [0, {classes}) of the head; "
        f"relabel the data as 0 to {int(classes) - 1 if classes.isdigit() else 'num_classes - 1'} or use a "
        f"head with more classes. Received: num_classes={classes}"
    )


def encode_labels(label_mode: str, num_classes: int | None = None) -> Callable:
    """Returns a batch map that turns int labels into what the head's loss expects.

    With `num_classes`, every batch is also checked to hold labels in [0, num_classes): a
    one-hot or sigmoid head would otherwise learn from a wrong label without a word. The
    failure is an InvalidArgumentError carrying `LABEL_RANGE_MARKER` (see `label_range_error`).
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}. Received: label_mode={label_mode}")
    if label_mode == "categorical" and num_classes is None:
        raise ConfigError("label_mode='categorical' needs num_classes for the one-hot labels. Received: None")

    def encode(images, labels):
        if num_classes is not None:
            low, high = tf.reduce_min(labels), tf.reduce_max(labels)
            check = tf.debugging.Assert(
                tf.logical_or(tf.size(labels) == 0, tf.logical_and(low >= 0, high < num_classes)),
                [LABEL_RANGE_MARKER, num_classes, low, high],
            )
            with tf.control_dependencies([check]):
                labels = tf.identity(labels)
        if label_mode == "binary":
            labels = tf.cast(tf.expand_dims(labels, -1), tf.float32)
        elif label_mode == "categorical":
            labels = tf.one_hot(labels, num_classes)
        return images, labels

    return encode


def prepare(
    ds: tf.data.Dataset,
    *,
    batch_size: int,
    label_mode: str = "int",
    num_classes: int | None = None,
    training: bool = False,
    cache: bool = True,
    augmenter: Callable | None = None,
    shuffle_buffer: int = 10_000,
    drop_remainder: bool = False,
    seed: int = 0,
    autotune: bool | None = None,
) -> tf.data.Dataset:
    """The pipeline tail: cache, shuffle (training only), batch, augment, encode labels, prefetch.

    Args:
        ds: unbatched (image, int label) examples.
        batch_size: the global batch size (per replica x replicas).
        label_mode: "int", "binary" or "categorical", as the head's loss needs.
        num_classes: the head's classes: needed for one-hot labels; when given, every batch is
            checked to hold labels in [0, num_classes).
        training: shuffle every epoch and apply the augmenter.
        cache: keep decoded examples in memory after the first epoch.
        augmenter: a callable (e.g. `make_augmenter`) applied to training batches.
        shuffle_buffer: examples in the shuffle buffer.
        drop_remainder: static batch shapes, as TPUs need.
        seed: shuffle seed.
        autotune: tf.data's autotuning for the whole pipeline; None: the device's choice
            (`strategy.data_autotune`: off on the CPU, where it slows every epoch).

    Returns:
        A batched, prefetched data set of (images, labels).
    """
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(encode_labels(label_mode, num_classes), num_parallel_calls=tf.data.AUTOTUNE)
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def with_autotune(ds: tf.data.Dataset, autotune: bool | None = None) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning on or off for its whole pipeline; None: the device's choice
    (`strategy.data_autotune`: off on the CPU, where it slows every epoch)."""
    options = tf.data.Options()
    options.autotune.enabled = strategy_lib.data_autotune() if autotune is None else autotune
    return ds.with_options(options)
