"""The tf.data tail: cache, shuffle, batch, augment, labels in the form the head expects, prefetch."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from kerastune_flow.data.augment import Augmenter
from kerastune_flow.errors import ConfigError, DataError
from kerastune_flow.runtime import strategy as strategy_lib

LABEL_MODES = ("int", "binary", "categorical")
# Marks the in-pipeline label check, so that a failing fit can be told from other errors.
LABEL_RANGE_MARKER = "kerastune_flow: label out of range"
_DEFAULT_CACHE_BUDGET = 2 * 1024**3
SHUFFLE_BUFFER = 10_000  # examples


class EpochClock:
    """The epoch a run is in, for the training pipeline to read when an epoch's data begins.

    Keras makes the next epoch's iterator before the epoch begins, and a resumed run starts at an
    epoch the pipeline cannot count to, so the pipeline asks the clock: `callbacks.EpochSeeds`
    sets it as each epoch begins, and tf.data reads it when the epoch's first batch is made (its
    threads start at the first request, after `on_epoch_begin`).

    Attributes:
        variable: the epoch, a scalar int64 `tf.Variable`.
    """

    def __init__(self):
        self.variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_clock")

    def set(self, epoch: int) -> None:
        self.variable.assign(epoch)


def epoch_seed(seed: int, epoch: int, purpose: str = "order") -> int:
    """A 31-bit seed for one epoch of a run: the same (seed, epoch, purpose), the same number."""
    words = [seed & 0xFFFFFFFF, epoch, sum(purpose.encode())]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_ordered(
    ds: tf.data.Dataset,
    *,
    clock: EpochClock,
    epochs: int,
    seed: int,
    shuffle_buffer: int,
    per_epoch: Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset] = lambda ds, epoch: ds,
) -> tf.data.Dataset:
    """One epoch of `ds` in an order that depends only on (seed, epoch): the epoch the clock shows.

    Each iterator reads the clock once, at its first element, and serves that epoch: `ds`
    buffer-shuffled with the epoch's seed (the order `ds.shuffle(shuffle_buffer,
    seed=epoch_seed(seed, epoch))` gives), then `per_epoch(shuffled, epoch)`, e.g. batching and
    augmenting with the epoch's seed (`epoch` is then a scalar int64 tensor). So epoch 7 is the
    same whether the run got there in one go or was resumed at it. Nothing is built per epoch: an
    earlier version held one branch per possible epoch, and every iterator paid for them all.

    Args:
        ds: the (cached) examples.
        clock: the run's epoch clock.
        epochs: how many epochs the run has at most (the clock reads 0 to epochs - 1).
        seed: the run's seed.
        shuffle_buffer: examples in the shuffle buffer.
        per_epoch: what follows the shuffle, given the epoch.
    """
    # The seed pair each epoch's `ds.shuffle(seed=...)` would resolve to, here, now (the global
    # seed included): the shuffle op takes it as a tensor, `Dataset.shuffle` only as an int.
    pairs = tf.constant([tf.compat.v1.random.get_seed(epoch_seed(seed, e)) for e in range(epochs)], tf.int64)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        return per_epoch(_shuffled(ds, shuffle_buffer, tf.gather(pairs, epoch)), epoch)

    steps = int(per_epoch(ds, tf.constant(0, tf.int64)).cardinality())
    # Every function of a pipeline is instantiated (and optimized) again by each new iterator,
    # a few ms apiece: one function here reads the clock and builds the epoch.
    out = tf.data.Dataset.from_tensors(0).flat_map(lambda _: one_epoch(clock.variable.read_value()))
    # Keras counts an epoch's steps from the cardinality, which flat_map hides; every epoch has it.
    return out.apply(tf.data.experimental.assert_cardinality(steps)) if steps >= 0 else out


def _shuffled(ds: tf.data.Dataset, buffer: int, seeds: tf.Tensor) -> tf.data.Dataset:
    """`ds.shuffle(buffer, reshuffle_each_iteration=False)` with its seed pair as a tensor."""
    specs = tf.nest.flatten(ds.element_spec)
    variant = tf.raw_ops.ShuffleDatasetV3(
        input_dataset=tf.data.experimental.to_variant(ds),
        buffer_size=tf.constant(buffer, tf.int64),
        seed=seeds[0],
        seed2=seeds[1],
        seed_generator=tf.raw_ops.DummySeedGenerator(),
        reshuffle_each_iteration=False,
        output_types=[spec.dtype for spec in specs],
        output_shapes=[spec.shape for spec in specs],
    )
    return tf.data.experimental.from_variant(variant, ds.element_spec)


def _with_batch_seeds(seed: int, epochs: int) -> Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset]:
    """`epoch_ordered`'s `per_epoch` tail for batches: each batch with its epoch's augmentation
    seed and its index in the epoch, (batch, epoch seed, i), for the batch map to stack into the
    batch's seed (no function of its own: each iterator instantiates every one anew)."""
    augment = tf.constant([epoch_seed(seed, e, "augment") for e in range(epochs)], tf.int64)

    def zipped(batches: tf.data.Dataset, epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seeds = tf.data.Dataset.from_tensors(tf.gather(augment, epoch)).repeat()
        return tf.data.Dataset.zip(batches, epoch_seeds, tf.data.Dataset.range(1 << 62))

    return zipped


def gathered_batches(
    num_examples: int,
    gather: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
    *,
    batch_size: int,
    seed: int = 0,
    training: bool = True,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    drop_remainder: bool = False,
    clock: EpochClock | None = None,
    epochs: int | None = None,
    seeded: bool = True,
) -> tf.data.Dataset:
    """Batches of examples held in memory (or a memory-mapped file), gathered by index.

    A buffer shuffle's order depends only on its seed and the number of elements, never on what
    they hold, so shuffling the indices 0..n-1 and gathering each batch gives exactly the batches
    that shuffling the examples themselves gives (the same seeds, buffer and, with a clock, the
    same order per epoch as `epoch_ordered`), without pushing every example through the buffer at
    the start of each epoch: the fixed cost of a short epoch.

    Args:
        num_examples: how many examples there are.
        gather: (index batch int64 [b], batch seed int64 [2]) -> (inputs, labels) of the batch.
        batch_size: the global batch size.
        seed: the run's seed (order, and the per-batch seeds handed to `gather`).
        training: shuffle (with the epoch's order); else the examples in order, once.
        shuffle_buffer: elements in the shuffle buffer, as for the examples.
        drop_remainder: static batch shapes (training only).
        clock: the run's epoch clock; `epochs` is then the most epochs.
        epochs: with `clock`, how many epochs the run has at most.
        seeded: hand `gather` each batch's augmentation seed (else zeros: no seed stream).
    """
    indices = tf.data.Dataset.range(num_examples)
    if not training:
        ds = indices.batch(batch_size)
        return ds.map(lambda index: gather(index, tf.zeros(2, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
    if clock is not None:
        if epochs is None:
            raise ValueError("A training pipeline with a clock needs epochs. Received: epochs=None")
        # Each epoch holds indices only: the gather (and its captured examples) follows the epoch.
        seeds = _with_batch_seeds(seed, epochs)
        ds = epoch_ordered(
            indices,
            clock=clock,
            epochs=epochs,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            per_epoch=lambda shuffled, e: seeds(shuffled.batch(batch_size, drop_remainder=drop_remainder), e),
        )

        def batch(index, augment_seed, i):  # one function: each iterator instantiates every one anew
            return gather(index, tf.stack([augment_seed, i]) if seeded else tf.zeros(2, tf.int64))

        return ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE)
    ds = indices.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if not seeded:
        return ds.map(lambda index: gather(index, tf.zeros(2, tf.int64)), num_parallel_calls=tf.data.AUTOTUNE)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(ds, seeds).map(gather, num_parallel_calls=tf.data.AUTOTUNE)


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
    augmenter: Augmenter | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    drop_remainder: bool = False,
    seed: int = 0,
    clock: EpochClock | None = None,
    epochs: int | None = None,
    autotune: bool | None = None,
    indexed: bool = True,
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
            (`strategy.data_autotune`: off on the CPU, where it slows every epoch).
        indexed: a cached training split is shuffled by index and gathered from memory (the
            same batches as the buffer shuffle of the images); False keeps the buffer shuffle.

    Returns:
        A batched, prefetched data set of (images, labels).
    """
    parallel = tf.data.AUTOTUNE
    encode = encode_labels(label_mode, num_classes)
    # Each new iterator (one per epoch) instantiates and optimizes every function of the pipeline
    # again, a few ms apiece: augmenting and encoding share one map.
    if training and cache and indexed:
        # In memory and shuffled by index (see `gathered_batches`): the same batches, without
        # refilling a shuffle buffer of images at the start of every epoch.
        images, labels = _in_memory(ds)

        def gather(index, batch_seed):
            x, y = tf.gather(images, index), tf.gather(labels, index)
            return encode(augmenter(x, batch_seed) if augmenter is not None else x, y)

        ds = gathered_batches(
            int(labels.shape[0]),
            gather,
            batch_size=batch_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            drop_remainder=drop_remainder,
            clock=clock,
            epochs=epochs,
            seeded=augmenter is not None,
        )
        return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)
    if cache:
        ds = ds.cache()

    def finish(x, y, batch_seed=None):
        return encode(augmenter(x, batch_seed) if augmenter is not None else x, y)

    if training and clock is not None:
        if epochs is None:
            raise ValueError("A training pipeline with a clock needs epochs. Received: epochs=None")
        seeds = _with_batch_seeds(seed, epochs)
        ds = epoch_ordered(
            ds,
            clock=clock,
            epochs=epochs,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            per_epoch=lambda shuffled, e: seeds(
                shuffled.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel), e
            ),
        )
        ds = ds.map(lambda xy, augment_seed, i: finish(*xy, tf.stack([augment_seed, i])), num_parallel_calls=parallel)
    elif training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel)
        if augmenter is None:
            ds = ds.map(encode, num_parallel_calls=parallel)
        else:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip(ds, seeds).map(lambda xy, s: finish(*xy, s), num_parallel_calls=parallel)
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel).map(
            encode, num_parallel_calls=parallel
        )
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def _in_memory(ds: tf.data.Dataset) -> tuple[tf.Tensor, tf.Tensor]:
    """Every (image, label) example of `ds`, stacked: one pass, as the first epoch of a cache."""
    images, labels = [], []
    for x, y in ds.batch(1024).prefetch(2):
        images.append(x)
        labels.append(y)
    if not images:
        spec = ds.element_spec
        return tf.zeros((0, *spec[0].shape), spec[0].dtype), tf.zeros((0, *spec[1].shape), spec[1].dtype)
    return tf.concat(images, 0), tf.concat(labels, 0)


def with_autotune(ds: tf.data.Dataset, autotune: bool | None = None) -> tf.data.Dataset:
    """`ds` with tf.data's autotuning on or off for its whole pipeline; None: the device's choice
    (`strategy.data_autotune`: off on the CPU, where it slows every epoch)."""
    options = tf.data.Options()
    options.autotune.enabled = strategy_lib.data_autotune() if autotune is None else autotune
    return ds.with_options(options)
