"""The tf.data tail: cache, shuffle, batch, augment, labels in the form the head expects, prefetch."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from kerastune_flow import strategy as strategy_lib
from kerastune_flow.errors import ConfigError, DataError

LABEL_MODES = ("int", "binary", "categorical")
# Marks the in-pipeline label check, so that a failing fit can be told from other errors.
LABEL_RANGE_MARKER = "kerastune_flow: label out of range"
_DEFAULT_CACHE_BUDGET = 2 * 1024**3


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
