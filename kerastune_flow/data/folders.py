"""Image folders: a folder per class, or split folders (train/, and valid/, val/ or validation/,
and test/) each with a folder per class; and the split, scan and decoding every file index shares.

The file list is indexed here so that the three-way split is stratified (every class in every
split), seeded and fixed in membership across epochs; a split the data does not bring is carved
from train. Every file is decoded once up front (`images.check_images`), so a corrupt one is named
now rather than failing an epoch later. Litter (`._*`, `.*`, `__MACOSX/`, `Thumbs.db`,
`desktop.ini`) is never a class and never read. Class names are kept as typed, in Unicode NFC
(macOS writes file names decomposed, NFD: "crème" typed and "crème" from a Mac are one class).
"""

from __future__ import annotations

import collections
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from kerastune_flow.data.images import (
    IMAGE_EXTENSIONS,
    FileWalk,
    check_images,
    decode_image,
    detect_channels,
    litter_kind,
    log_litter,
    refuse_tiff,
    walk_files,
)
from kerastune_flow.data.sources import SPLITS, VALIDATION_NAMES, DataSplits, ImageIndex, nfc, whole_pixels
from kerastune_flow.errors import DataError

log = logging.getLogger(__name__)


# Split folder name (in any case) -> the split it serves.
SPLIT_FOLDERS = {"train": "train", "test": "test", **dict.fromkeys(VALIDATION_NAMES, "validation")}


def _subfolders(folder: Path, litter: collections.Counter) -> list[Path]:
    """The sub-folders of `folder` that are not litter, sorted by name; the litter beside them
    (folders and files) is counted in `litter`."""
    found = []
    for path in sorted(folder.iterdir()):
        kind = litter_kind(path.name)
        if kind:
            litter[f"{kind}/" if path.is_dir() else kind] += 1
        elif path.is_dir():
            found.append(path)
    return found


def _split_folders(root: Path, folders: list[Path]) -> dict[str, Path] | None:
    """{split: folder} when `root` holds split folders, None when it holds class folders.

    Raises:
        DataError: for a layout that is ambiguous, naming the folders found.
    """
    splits = {p: SPLIT_FOLDERS[p.name.lower()] for p in folders if p.name.lower() in SPLIT_FOLDERS}
    if not splits:
        return None
    found = ", ".join(f"{p.name}/" for p in folders)
    others = [p.name for p in folders if p not in splits]
    if others:
        raise DataError(
            f"{root} mixes split folders ({', '.join(f'{p.name}/' for p in splits)}) with other folders "
            f"({', '.join(f'{n}/' for n in others)}), so neither layout fits; put the class folders inside train/ "
            f"(and valid/ or test/), or rename the split-named folders if they are classes. Received: folders={found}"
        )
    by_split: dict[str, list[Path]] = {}
    for path, split in splits.items():
        by_split.setdefault(split, []).append(path)
    for split, paths in by_split.items():
        if len(paths) > 1:
            raise DataError(
                f"{root} has {len(paths)} folders for the {split} split ({', '.join(f'{p.name}/' for p in paths)}); "
                f"keep one. Received: folders={found}"
            )
    if "train" not in by_split:
        raise DataError(
            f"{root} has split folders but no train/ ({found}); add train/ with one folder per class, or pass the "
            f"split folder itself as --data. Received: folders={found}"
        )
    return {split: paths[0] for split, paths in by_split.items()}


def folder_splits(root: str | os.PathLike) -> set[str]:
    """The splits a folder's own sub-folders serve: {"train"} for class folders directly.

    Raises:
        DataError: for an ambiguous layout (see `index_image_folder`).
    """
    root = Path(root)
    return set(_split_folders(root, _subfolders(root, collections.Counter())) or {"train": root})


def _class_folders(folder: Path, subfolders: list[Path]) -> dict[str, Path]:
    """class name (NFC) -> its folder, of the `subfolders` of `folder`.

    Raises:
        DataError: when two folder names are one name in NFC.
    """
    classes: dict[str, Path] = {}
    for path in subfolders:
        name = nfc(path.name)
        if name in classes:
            raise DataError(
                f"{folder} has two class folders named {name!r} (one in composed, one in decomposed Unicode, as "
                f"macOS writes names); merge them. Received: folders={classes[name].name!r}, {path.name!r}"
            )
        classes[name] = path
    return classes


def _class_files(class_names: list[str], folders: dict[str, Path], walk: FileWalk) -> list[tuple[str, int]]:
    """(path, label) of the images in each class's folder; what else is found is added to `walk`."""
    items = []
    for label, name in enumerate(class_names):
        if name in folders:
            found = walk_files(folders[name])
            items.extend((path, label) for path in found.images)
            walk.other.update(found.other)
            walk.litter.update(found.litter)
            walk.tiff.extend(found.tiff)
    return items


def index_image_folder(root: str | os.PathLike) -> ImageIndex:
    """Lists the images of a folder by split without reading them.

    Args:
        root: a folder with split folders (train/, and valid/, val/ or validation/, and test/),
            each with one folder per class, or class folders directly.

    Returns:
        ImageIndex: "train", and "validation" and "test" when their folders are there.

    Raises:
        DataError: naming the folder and what it should contain; for an ambiguous layout,
            naming the folders found; for TIFF files, with the command that converts them.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"Data folder {root} does not exist; pass --data a tfds name (mnist, tf_flowers, ...), a CSV file of "
            f"image paths and labels, or a folder with one sub-folder per class. Received: data={root}"
        )
    if not root.is_dir():
        raise DataError(
            f"--data must be a folder of class folders or a .csv/.tsv file of image paths and labels, not a file "
            f"of another kind. Received: data={root}"
        )
    litter: collections.Counter = collections.Counter()
    top = _subfolders(root, litter)
    folders = _split_folders(root, top) or {"train": root}
    listed = {root: top}  # each folder listed once, so that its litter is counted once
    for folder in folders.values():
        if folder not in listed:
            listed[folder] = _subfolders(folder, litter)
    classes = _class_folders(folders["train"], listed[folders["train"]])
    class_names = list(classes)
    if len(class_names) < 2:
        raise DataError(
            f"{folders['train']} needs at least two class folders (one sub-folder of images per class). "
            f"Received: classes={class_names}"
        )
    parts: dict[str, list[tuple[str, int]]] = {}
    walk = FileWalk(images=[], tiff=[], other=collections.Counter(), litter=litter)  # the whole folder's
    for split, folder in folders.items():
        split_classes = classes if split == "train" else _class_folders(folder, listed[folder])
        extra = sorted(set(split_classes) - set(classes))
        if extra:
            raise DataError(
                f"{folder} has classes that {folders['train']} lacks; both need the same class folders. "
                f"Received: extra={extra}"
            )
        parts[split] = _class_files(class_names, split_classes, walk)
    refuse_tiff(walk.tiff, root)
    log_litter(litter, root)
    other = walk.other
    if other:
        log.warning(
            "Ignoring %d file(s) under %s without an image extension (%s): only %s files are read",
            sum(other.values()),
            root,
            ", ".join(f"{ext} x{n}" for ext, n in other.most_common()),
            ", ".join(IMAGE_EXTENSIONS),
        )
    for split, items in parts.items():
        if not items:
            loose = folders[split] != root and bool(walk_files(folders[split]).images)
            why = " (its images are not in class folders: unlabelled?)" if loose else ""
            raise DataError(
                f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {folders[split]} in class folders{why}; "
                f"put the images in one folder per class. Received: data={root}"
            )
    return ImageIndex(
        parts=parts, class_names=class_names, sources={s: str(f) for s, f in folders.items()}, root=str(root)
    )


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


def split_index(
    index: ImageIndex, *, validation_fraction: float, test_fraction: float, seed: int
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """The three splits of an index: its own, and those it lacks carved from train per class.

    A validation or test split the source brings (a folder, rows of a file) is used as it is,
    whatever the fractions say; the fractions size only what is carved from train.

    Returns:
        ({split: [(path, label)]}, {split: where from, in words}).
    """
    parts, train_source = index.parts, index.sources["train"]
    carved = [s for s in ("validation", "test") if s not in parts]
    fractions = {"validation": validation_fraction, "test": test_fraction}
    # Each layout keeps the calls (and so the membership) of the runs made before split folders were read.
    held = _stratified_split(parts["train"], [fractions[s] for s in carved], seed)
    out = {"train": held[0], **dict(zip(carved, held[1:], strict=True))}
    for split in ("validation", "test"):
        if split not in carved:
            out[split] = _stratified_split(parts[split], [], seed)[0]  # class-sorted on disk; mix it
    sources = {"train": train_source, **{s: index.sources[s] for s in SPLITS if s in parts and s != "train"}}
    for split in carved:
        sources[split] = (
            f"{fractions[split]:g} of {train_source} per class, held out with seed {seed}"
            if fractions[split] > 0
            else f"none ({split}_fraction is 0)"
        )
    held_out = [split for split in carved if fractions[split] > 0]
    if held_out:
        sources["train"] = f"{train_source}, less the {' and '.join(held_out)} images held out"
    return out, sources


def load_image_folder(root: str | os.PathLike, **kwargs) -> DataSplits:
    """Loads an image folder into train/validation/test splits: `load_index` of `index_image_folder`.

    Args:
        root: the folder.
        **kwargs: `load_index`'s settings (image_size, channels, fractions, seed, skip_bad_images).

    Raises:
        DataError: see `index_image_folder` and `load_index`.
    """
    return load_index(index_image_folder(root), **kwargs)


def load_index(
    index: ImageIndex,
    *,
    image_size: tuple[int, int] = (32, 32),
    channels: int | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Loads the files of an index (a folder's or a CSV file's) into train/validation/test splits.

    Images are decoded and resized the way `keras.utils.image_dataset_from_directory` does
    (bilinear, float32 0..255); the split (`split_index`) is stratified, seeded and fixed in
    membership across epochs. Every file is decoded once up front (`scan_images`), so a corrupt
    one is named now rather than failing an epoch later. Grayscale, palette and RGBA images are
    converted to the channel count of the data.

    Raises:
        DataError: see `check_images`; also when no readable image is left in the training split.
    """
    root = index.root
    parts, sources = split_index(index, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed)
    log.info("Splits of %s: %s", root, "; ".join(f"{split} from {sources[split]}" for split in SPLITS))
    train, val, test = parts["train"], parts["validation"], parts["test"]
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

    webp = any(p.lower().endswith(".webp") for p, _ in train + val + test)  # else no WebP branch per image

    def decode(path, label):
        image = decode_image(tf.io.read_file(path), channels, webp=webp)
        image = whole_pixels(tf.image.resize(image, size))  # 8-bit values: a cache keeps them as uint8
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
        class_names=index.class_names,
        image_shape=(*size, channels),
        sizes={"train": len(train), "validation": len(val), "test": len(test)},
        source=str(root),
        test_source=sources["test"],
        split_sources=sources,
        uint8=True,
    )
