"""Image folders: a folder per class, or train/ and test/ each with a folder per class.

The file list is indexed here so that the three-way split is stratified (every class in every
split), seeded and fixed in membership across epochs; every file is decoded once up front
(`images.check_images`), so a corrupt one is named now rather than failing an epoch later.
"""

from __future__ import annotations

import collections
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from kerastune_flow.data.images import IMAGE_EXTENSIONS, check_images, decode_image, detect_channels, image_files
from kerastune_flow.data.sources import DataSplits
from kerastune_flow.errors import DataError

log = logging.getLogger(__name__)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
                items.extend((path, label) for path in image_files(class_dir))
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
        image = decode_image(tf.io.read_file(path), channels)
        image = tf.image.resize(image, size)
        image.set_shape((*size, channels))
        return image, label

    def to_dataset(items):
        paths = [p for p, _ in items]
        labels = [label for _, label in items]
        ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    return DataSplits(
        train=to_dataset(train),
        validation=to_dataset(val),
        test=to_dataset(test),
        class_names=class_names,
        image_shape=(*size, channels),
        sizes={"train": len(train), "validation": len(val), "test": len(test)},
        source=str(root),
        test_source=(
            f"{Path(root) / 'test'}"
            if "all" not in indexed
            else f"{test_fraction:g} of {root} per class, held out with seed {seed}"
        ),
    )
