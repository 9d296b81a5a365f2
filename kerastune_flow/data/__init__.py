"""Data: tfds data sets and image folders in, `tf.data` pipelines out.

    sources.py   DataSplits; the tfds data sets (mnist, cifar10), prepared offline from --manual-dir
    folders.py   image folders: indexed, split per class, scanned for bad files up front
    images.py    decoding, the parallel scan, reading files for prediction
    loading.py   load_data (either source) and load_splits (the data a Config names)
    augment.py   random augmentation as a function of a seed (stateless), batch by batch
    pipeline.py  the tf.data tail: cache, shuffle, batch, augment, encode labels, prefetch; the
                 epoch clock that makes each epoch's order and augmentation follow from (seed, epoch)

An image folder is either `train/` and `test/` sub-folders with one folder per class each (the
validation set is then taken from train), or class folders directly (validation and test are then
taken per class, seeded, so every class appears in every split).
"""

from kerastune_flow.data.augment import make_augmenter
from kerastune_flow.data.folders import index_image_folder, load_image_folder
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
from kerastune_flow.data.pipeline import (
    LABEL_RANGE_MARKER,
    SHUFFLE_BUFFER,
    EpochClock,
    encode_labels,
    epoch_ordered,
    epoch_seed,
    label_range_error,
    prepare,
    should_cache,
    with_autotune,
)
from kerastune_flow.data.sources import TFDS_ARCHIVES, TFDS_NAMES, DataSplits, is_tfds_name, load_tfds

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_RANGE_MARKER",
    "SHUFFLE_BUFFER",
    "TFDS_ARCHIVES",
    "TFDS_NAMES",
    "DataSplits",
    "EpochClock",
    "ImageScan",
    "check_images",
    "detect_channels",
    "encode_labels",
    "epoch_ordered",
    "epoch_seed",
    "expand_image_arguments",
    "has_test_split",
    "index_image_folder",
    "is_tfds_name",
    "label_range_error",
    "load_data",
    "load_image_folder",
    "load_images",
    "load_splits",
    "load_tfds",
    "make_augmenter",
    "prepare",
    "scan_images",
    "should_cache",
    "with_autotune",
]
