"""The tf.data tail: cache, shuffle, batch, augment, labels in the form the head expects, prefetch;
and the memory a cache may fill (`memory_budget`)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import tensorflow as tf

from kerastune_flow.data.augment import Augmenter
from kerastune_flow.data.order import SHUFFLE_BUFFER, EpochClock, clocked_batches, gathered_batches
from kerastune_flow.errors import ConfigError, DataError
from kerastune_flow.runtime import device as device_lib

LABEL_MODES = ("int", "binary", "categorical")
# Marks the in-pipeline label check, so that a failing fit can be told from other errors.
LABEL_RANGE_MARKER = "kerastune_flow: label out of range"
UNKNOWN_MEMORY = 8 * 1024**3  # taken as available when the memory cannot be read


def available_memory() -> int:
    """Bytes of memory available now: Linux' MemAvailable, else a quarter of the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return UNKNOWN_MEMORY


def memory_budget() -> int:
    """The most bytes a cache may fill in memory: a quarter of the memory available now.

    Available, not physical: a cache is filled by this process from now on, so what other
    processes already hold is not its to take; the quarter leaves room for the copies that
    exist for a moment (an array and the tensor served from it) and for the model's training.
    The one budget of the package: the decoded images (`should_cache`) and the frozen layers'
    outputs (`training/caches.py`).
    """
    return available_memory() // 4


def cache_bytes(num_examples: int, image_shape: Sequence[int], *, uint8: bool = False, peak: bool = False) -> int:
    """The bytes a cache of a split holds: one value per pixel and channel, 1 byte as uint8
    (`prepare(uint8=True)`), else 4 (float32); `peak`: while it is filled, when the batches read
    and their stack exist together for a moment (twice that; checked against the measured
    memory in tests/test_cache_memory.py)."""
    size = num_examples * (1 if uint8 else 4) * (2 if peak else 1)
    for dim in image_shape:
        size *= int(dim)
    return size


def should_cache(num_examples: int, image_shape: Sequence[int], policy: str = "auto", *, uint8: bool = False) -> bool:
    """Caching policy: "memory" always, "off" never, "auto" when filling the cache (its peak,
    `cache_bytes`) fits in `memory_budget()`."""
    if policy != "auto":
        return policy == "memory"
    return cache_bytes(num_examples, image_shape, uint8=uint8, peak=True) <= memory_budget()


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
    augmenter: Augmenter | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    drop_remainder: bool = False,
    seed: int = 0,
    clock: EpochClock | None = None,
    epochs: int | None = None,
    autotune: bool | None = None,
    indexed: bool = True,
    uint8: bool = False,
) -> tf.data.Dataset:
    """The pipeline tail: cache, shuffle (training only), batch, augment, encode labels, prefetch.

    A training pipeline with a `clock` serves each epoch in an order, and with augmentation,
    that follow from (seed, epoch) alone (see `epoch_ordered`), so that a resumed run repeats
    the epochs of an uninterrupted one; without one, it reshuffles every time it is iterated
    (reproducible from the seed for a run in one go).

    Args:
        ds: unbatched (image, int label) examples.
        batch_size: the global batch size (per replica x replicas).
        label_mode: "int", "binary" or "categorical", as the head's loss needs.
        num_classes: the head's classes: needed for one-hot labels; when given, every batch is
            checked to hold labels in [0, num_classes).
        training: shuffle every epoch and apply the augmenter.
        cache: keep decoded examples in memory after the first epoch (for training, with
            `indexed`: read into memory here, in one pass, and gathered by shuffled index).
        augmenter: `augment.make_augmenter`'s function, applied to training batches.
        shuffle_buffer: examples in the shuffle buffer.
        drop_remainder: static batch shapes, as TPUs need.
        seed: the seed of the order and the augmentation.
        clock: the run's epoch clock (training only); `epochs` is then the most epochs.
        epochs: with `clock`, how many epochs the run has at most.
        autotune: tf.data's autotuning for the whole pipeline; None: the device's choice
            (`device.data_autotune`: off on the CPU, where it slows every epoch).
        indexed: a cached training split is shuffled by index and gathered from memory (the
            same batches as the buffer shuffle of the images); False keeps the buffer shuffle.
        uint8: the images hold whole values in 0..255 (`DataSplits.uint8`): a cache (and the
            shuffle buffer of a streamed training split) keeps them as uint8, a quarter of the
            memory, and batches come out as float32 as ever.

    Returns:
        A batched, prefetched data set of (images, labels).
    """
    encode = encode_labels(label_mode, num_classes)
    stored = uint8 and (cache or training)
    if stored:
        # Whole values, nothing lost; the augmenter and `plain` give float32 batches. Streamed
        # training data passes through the shuffle buffer (10,000 images), a quarter as uint8.
        ds = ds.map(lambda x, y: (tf.cast(x, tf.uint8), y), num_parallel_calls=tf.data.AUTOTUNE)
    # Each new iterator (one per epoch) instantiates and optimizes every function of the pipeline
    # again, a few ms apiece: augmenting and encoding share one map.
    plain = (lambda x, y: encode(tf.cast(x, tf.float32), y)) if stored else encode
    finish = plain if augmenter is None else lambda x, y, batch_seed: encode(augmenter(x, batch_seed), y)
    order = dict(
        batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer, drop_remainder=drop_remainder, clock=clock
    )
    if training and cache and indexed:
        # In memory and shuffled by index (see `gathered_batches`): the same batches, without
        # refilling a shuffle buffer of images at the start of every epoch.
        images, labels = _in_memory(ds)
        gather = _gathering(images, labels, finish, seeded=augmenter is not None)
        ds = gathered_batches(int(labels.shape[0]), gather, epochs=epochs, seeded=augmenter is not None, **order)
    else:
        ds = ds.cache() if cache else ds
        if training:
            ds = _training_batches(ds, finish, seeded=augmenter is not None, epochs=epochs, **order)
        else:
            batches = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
            ds = batches.map(plain, num_parallel_calls=tf.data.AUTOTUNE)
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def _gathering(images: tf.Tensor, labels: tf.Tensor, finish: Callable, *, seeded: bool) -> Callable:
    """`gathered_batches`' gather: a batch of examples by index, augmented (when `seeded`) and encoded."""

    def gather(index, batch_seed):
        x, y = tf.gather(images, index), tf.gather(labels, index)
        return finish(x, y, batch_seed) if seeded else finish(x, y)

    return gather


def _training_batches(
    ds: tf.data.Dataset,
    finish: Callable,
    *,
    batch_size: int,
    seed: int,
    shuffle_buffer: int,
    drop_remainder: bool,
    clock: EpochClock | None,
    epochs: int | None,
    seeded: bool,
) -> tf.data.Dataset:
    """Shuffled training batches through the buffer, each `finish`ed: with a clock in the epoch's
    order (`epoch_ordered`), else reshuffled at every iteration; `seeded`: `finish` takes each
    batch's augmentation seed."""
    parallel = tf.data.AUTOTUNE
    if clock is not None:
        ds = clocked_batches(
            ds,
            clock=clock,
            epochs=epochs,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            batch=lambda shuffled: shuffled.batch(
                batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel
            ),
        )
        if not seeded:
            return ds.map(lambda xy, augment_seed, i: finish(*xy), num_parallel_calls=parallel)
        return ds.map(lambda xy, augment_seed, i: finish(*xy, tf.stack([augment_seed, i])), num_parallel_calls=parallel)
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel)
    if not seeded:
        return ds.map(finish, num_parallel_calls=parallel)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(ds, seeds).map(lambda xy, s: finish(*xy, s), num_parallel_calls=parallel)


def _in_memory(ds: tf.data.Dataset) -> tuple[tf.Tensor | tf.Variable, tf.Tensor]:
    """Every (image, label) example of `ds`, stacked: one pass, as the first epoch of a cache.

    The images are held once, in a variable on the CPU: a tensor captured by a tf.data function
    is copied into the pipeline's graph when tf.data rewrites it, at every epoch's iterator (a
    second copy of the split, measured), while a variable is passed by handle. In a distribution
    strategy's scope, where a variable would be mirrored per replica, a tensor instead.
    """
    images, labels = [], []
    for x, y in ds.batch(1024).prefetch(2):
        images.append(x)
        labels.append(y)
    if not images:
        spec = ds.element_spec
        return tf.zeros((0, *spec[0].shape), spec[0].dtype), tf.zeros((0, *spec[1].shape), spec[1].dtype)
    stacked = tf.concat(images, 0)
    del images  # the batches go before the variable is made: two copies at most, for a moment
    if tf.distribute.has_strategy():
        return stacked, tf.concat(labels, 0)
    with tf.device("/CPU:0"):
        held = tf.Variable(stacked, trainable=False, name="cached_images")
    return held, tf.concat(labels, 0)


def with_autotune(ds: tf.data.Dataset, autotune: bool | None = None) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning on or off for its whole pipeline; None: the device's choice
    (`device.data_autotune`: off on the CPU, where it slows every epoch)."""
    options = tf.data.Options()
    options.autotune.enabled = device_lib.data_autotune() if autotune is None else autotune
    return ds.with_options(options)
