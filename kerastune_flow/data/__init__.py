"""Data: tfds data sets, image folders and CSV files in, `tf.data` pipelines out.

    sources.py   DataSplits, ImageIndex; any tfds image-classification set, read offline once prepared
    folders.py   image folders: indexed, split per class, scanned for bad files up front
    tables.py    a CSV/TSV file of image paths and labels (and splits), indexed as a folder is
    images.py    decoding (WebP too), the parallel scan, litter, reading files for prediction
    loading.py   load_data (any source) and load_splits (the data a Config names)
    folds.py     cross-validation: train and validation merged, cut into K stratified folds, one held out
    augment.py   random augmentation as a function of a seed (stateless), batch by batch
    pipeline.py  the tf.data tail: cache, shuffle, batch, augment, encode labels, prefetch; the
                 memory a cache may fill (`memory_budget`: a quarter of what is available)
    order.py     the epoch clock that makes each epoch's order and augmentation follow from (seed, epoch)

An image folder is either split folders (`train/`, and `valid/`, `val/` or `validation/`, and
`test/`) with one folder per class each, or class folders directly. The splits the data does not
bring are taken from train per class, seeded, so every class appears in every split; those it
brings are used as they are (`DataSplits.split_sources` says which is which). Litter (`._*`, `.*`,
`__MACOSX/`, `Thumbs.db`, `desktop.ini`) is left out and counted in one log line.
"""

from kerastune_flow.data.augment import make_augmenter
from kerastune_flow.data.folders import index_image_folder, load_image_folder, load_index
from kerastune_flow.data.folds import DEFAULT_FOLDS, FOLDS_BELOW, default_folds, fold_splits
from kerastune_flow.data.images import (
    IMAGE_EXTENSIONS,
    ImageScan,
    check_images,
    detect_channels,
    expand_image_arguments,
    load_images,
    scan_images,
)
from kerastune_flow.data.loading import has_test_split, load_data, load_splits
from kerastune_flow.data.order import SHUFFLE_BUFFER, EpochClock, epoch_ordered, epoch_seed, gathered_batches
from kerastune_flow.data.pipeline import (
    LABEL_RANGE_MARKER,
    available_memory,
    cache_bytes,
    encode_labels,
    label_range_error,
    memory_budget,
    prepare,
    should_cache,
    with_autotune,
)
from kerastune_flow.data.sources import TFDS_ARCHIVES, TFDS_NAMES, DataSplits, ImageIndex, is_tfds_name, load_tfds
from kerastune_flow.data.tables import index_table

__all__ = [
    "DEFAULT_FOLDS",
    "FOLDS_BELOW",
    "default_folds",
    "fold_splits",
    "IMAGE_EXTENSIONS",
    "LABEL_RANGE_MARKER",
    "SHUFFLE_BUFFER",
    "TFDS_ARCHIVES",
    "TFDS_NAMES",
    "DataSplits",
    "EpochClock",
    "ImageIndex",
    "ImageScan",
    "check_images",
    "detect_channels",
    "available_memory",
    "encode_labels",
    "epoch_ordered",
    "epoch_seed",
    "expand_image_arguments",
    "gathered_batches",
    "has_test_split",
    "index_image_folder",
    "index_table",
    "is_tfds_name",
    "label_range_error",
    "load_data",
    "load_image_folder",
    "load_index",
    "load_images",
    "load_splits",
    "load_tfds",
    "make_augmenter",
    "memory_budget",
    "prepare",
    "scan_images",
    "cache_bytes",
    "should_cache",
    "with_autotune",
]
