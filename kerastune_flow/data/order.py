"""The order of a training split's epochs: the epoch clock, and shuffles whose order follows
from (seed, epoch) alone, so that a resumed run repeats the epochs of an uninterrupted one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

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


def with_batch_seeds(seed: int, epochs: int) -> Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset]:
    """`epoch_ordered`'s `per_epoch` tail for batches: each batch with its epoch's augmentation
    seed and its index in the epoch, (batch, epoch seed, i), for the batch map to stack into the
    batch's seed (no function of its own: each iterator instantiates every one anew)."""
    augment = tf.constant([epoch_seed(seed, e, "augment") for e in range(epochs)], tf.int64)

    def zipped(batches: tf.data.Dataset, epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seeds = tf.data.Dataset.from_tensors(tf.gather(augment, epoch)).repeat()
        return tf.data.Dataset.zip(batches, epoch_seeds, tf.data.Dataset.range(1 << 62))

    return zipped


def clocked_batches(
    ds: tf.data.Dataset,
    *,
    clock: EpochClock,
    epochs: int | None,
    seed: int | None,
    shuffle_buffer: int,
    batch: Callable[[tf.data.Dataset], tf.data.Dataset],
) -> tf.data.Dataset:
    """`ds` in each epoch's order (`epoch_ordered`), `batch`ed, as (batch, epoch seed, index)
    (`with_batch_seeds`): the training pipelines that follow the run's clock.

    Raises:
        ValueError: without `epochs` (the clock's pipelines are built for a number of epochs).
    """
    if epochs is None:
        raise ValueError("A training pipeline with a clock needs epochs. Received: epochs=None")
    seeds = with_batch_seeds(seed, epochs)
    return epoch_ordered(
        ds,
        clock=clock,
        epochs=epochs,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        per_epoch=lambda shuffled, e: seeds(batch(shuffled), e),
    )


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
        # Each epoch holds indices only: the gather (and its captured examples) follows the epoch.
        ds = clocked_batches(
            indices,
            clock=clock,
            epochs=epochs,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            batch=lambda shuffled: shuffled.batch(batch_size, drop_remainder=drop_remainder),
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
