"""`load_data`: a tfds data set by name, an image folder or a CSV/TSV file of image paths and
labels by path, as train/validation/test splits; `load_splits`: the same for the data a Config names.

The splits are unbatched (image, label) pairs with float32 images in 0..255 and int32 labels;
each model does its own scaling, so a saved model takes raw pixels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kerastune_flow.config import Config
from kerastune_flow.data.folders import folder_splits, index_image_folder, load_index
from kerastune_flow.data.folds import fold_splits
from kerastune_flow.data.samples import resolve_sample
from kerastune_flow.data.sources import DataSplits, is_tfds_name, load_tfds, tfds_has_test
from kerastune_flow.data.tables import index_table, is_table


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
    csv_columns: tuple[str, ...] = (),
) -> DataSplits:
    """Loads a tfds data set by name, or an image folder or a CSV/TSV file by path.

    A validation or test split the data brings (a valid/, val/, validation/ or test/ folder,
    rows of a split column, a tfds split) is used as it is, by every recipe; the fractions size
    only the splits carved from train. `DataSplits.split_sources` says which is which.

    Args:
        source: "mnist", "cifar10", a path to an image folder, or "digits" (the sample shipped in
            the package, unless a path of that name exists).
        image_size: (height, width) to resize to; None keeps a tfds set's native size, and
            a folder's images are then resized to 32x32.
        channels: 1 or 3 to convert to; None keeps the data's own (a folder of grayscale
            images gives 1).
        validation_fraction: share of the training data held out for validation when the
            source has no validation split.
        test_fraction: share held out for test when the source has no test split.
        data_dir: tfds data directory (default ~/tensorflow_datasets).
        manual_dir: folder with the original archives, so tfds prepares without a download.
        max_examples: keep at most this many examples of each split (smoke runs).
        train_fraction: keep this share of the training split (data-size sweeps); the
            validation and test splits stay whole, so results stay comparable.
        seed: seeds the split of a folder without train/ and test/.
        skip_bad_images: leave out a folder's files that cannot be decoded, with a warning
            naming each, instead of refusing the folder.
        csv_columns: a CSV/TSV file's path, label and (optional) split column names; (): found
            by their common names.

    Returns:
        DataSplits.

    Raises:
        DataError: a folder that is missing, empty, has one class, holds files that cannot
            be decoded (unless `skip_bad_images`), or a tfds set that cannot be prepared.
    """
    source = resolve_sample(source)  # `digits`: the sample shipped in the package; a path that exists wins
    if is_tfds_name(source):
        splits = load_tfds(
            source,
            image_size=image_size,
            channels=channels,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            data_dir=data_dir,
            manual_dir=manual_dir,
        )
    else:
        index = index_table(source, columns=csv_columns) if is_table(source) else index_image_folder(source)
        splits = load_index(
            index,
            image_size=image_size or (32, 32),
            channels=channels,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
            skip_bad_images=skip_bad_images,
        )
    return _trimmed(splits, max_examples=max_examples, train_fraction=train_fraction)


def _trimmed(splits: DataSplits, *, max_examples: int | None, train_fraction: float) -> DataSplits:
    """`splits` with at most `max_examples` of each split, then `train_fraction` of train."""
    if max_examples:
        if splits.sizes["test"] > max_examples:
            splits.test_source += f" (its first {max_examples})"
            splits.split_sources["test"] = splits.test_source
        for name in ("train", "validation", "test"):
            setattr(splits, name, getattr(splits, name).take(max_examples))
            splits.sizes[name] = min(splits.sizes[name], max_examples)
    if train_fraction < 1.0:
        keep = max(1, int(round(splits.sizes["train"] * train_fraction)))
        splits.train = splits.train.take(keep)  # the split is shuffled across classes already
        splits.sizes["train"] = keep
    return splits


def has_test_split(source: str, *, data_dir: str | None = None) -> bool:
    """True when `source` brings its own test split: a tfds data set with one (or not prepared
    yet: most have one), a folder with train/ and test/, or a CSV/TSV file with test rows.

    Raises:
        DataError: for a folder of an ambiguous layout or a CSV file that cannot be read.
    """
    if is_tfds_name(source):
        return tfds_has_test(source, data_dir=data_dir)
    if is_table(source):
        return "test" in index_table(source).parts
    return Path(source).is_dir() and "test" in folder_splits(source)


def load_splits(
    config: Config, *, image_size: tuple[int, int] | None = None, channels: int | None = None, **changes: Any
) -> DataSplits:
    """Loads the data a Config names, split as its run splits it (fractions, seed and folds).

    Args:
        config: the run's settings.
        image_size: the size the model takes; None: the config's (then the data's own).
        channels: 1 or 3, what the model takes; None: the data's own.
        **changes: fields of the config's DataConfig to change first, e.g. `data=` to
            evaluate on another source or `max_examples=`.

    Raises:
        DataError: see `load_data`.
    """
    d = dataclasses.replace(config.data, **changes)
    splits = load_data(
        d.data,
        image_size=image_size or d.image_size,
        channels=channels,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
        data_dir=d.data_dir,
        manual_dir=d.manual_dir,
        max_examples=d.max_examples,
        train_fraction=d.train_fraction,
        seed=config.train.seed,
        skip_bad_images=d.skip_bad_images,
        csv_columns=d.csv_columns,
    )
    if (d.folds or 1) > 1:  # cross-validation: train and validation merged, fold `d.fold` held out
        splits = fold_splits(splits, folds=d.folds, fold=d.fold, seed=config.train.seed)
    return splits
