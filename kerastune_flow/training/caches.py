"""What a frozen part of a model computes, computed once and kept in memory or on disk.

The frozen stage caches the base's features (`finetune.split_at_base`), stage 2 of a fine-tune the
output of the base's frozen layers below the unfreeze point (`finetune.split_at_prefix`). Either
cache is computed in one pass over the unshuffled, unaugmented images and served as the batches
the image pipeline would give (`data.gathered_batches`: the same order per epoch). It stays in
memory while it fits in the package's one memory budget (`data.memory_budget`: a quarter of the
memory available); beyond that, or with `feature_cache="disk"`,
it goes to a file in the run directory that is memory-mapped. A cache is never trusted across
attempts: each attempt computes its own (written under a temporary name, then renamed), so a
crash leaves nothing a resumed run could read half-written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow.data.pipeline import EpochClock, gathered_batches, memory_budget, with_autotune
from kerastune_flow.runtime import progress

log = logging.getLogger(__name__)

CACHE_DIR = "feature_cache"  # in the run directory, while a run computes or reads a cache on disk


@dataclasses.dataclass
class Cached:
    """One split's cached outputs and labels, in the order of its unshuffled pipeline.

    Attributes:
        inputs: (n, ...) float array, a `np.memmap` when on disk.
        labels: (n, ...) labels as the head's loss expects them (already encoded).
        where: "memory" or "disk".
    """

    inputs: np.ndarray
    labels: np.ndarray
    where: str

    @property
    def nbytes(self) -> int:
        return int(self.inputs.nbytes)

    def describe(self, name: str, folder: str | os.PathLike | None) -> str:
        """For the log: "train 1.8 MiB in memory" or "... on disk (FOLDER)"."""
        place = "in memory" if self.where == "memory" else f"on disk ({folder})"
        return f"{name} {self.nbytes / 2**20:.1f} MiB {place}"


def compute(
    model: keras.Model,
    ds: tf.data.Dataset,
    *,
    policy: str = "auto",
    folder: str | os.PathLike | None = None,
    name: str = "cache",
    budget: int | None = None,
) -> Cached:
    """One pass of `model` over a batched, unshuffled (images, labels) data set, kept in memory or
    on disk. A pass longer than a couple of seconds shows its progress by batch (`progress.Progress`).

    Args:
        model: the frozen part, from images to what is cached (in inference mode).
        ds: batched (images, labels), in the order the cache keeps.
        policy: "memory", "disk", or "auto": memory while the outputs fit in `budget`, else the
            rest spills to disk (the memory part moves there too).
        folder: where a cache on disk goes (inside the run directory); needed unless "memory".
        name: the file's name stem.
        budget: bytes kept in memory under "auto"; default `memory_budget()`.

    Returns:
        The outputs and labels, in order.
    """
    budget = memory_budget() if budget is None else budget
    shown = progress.Progress(f"Caching {name.replace('_', ' ')}", total=progress.count(ds), unit="batch")
    chunks: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held = 0
    writer = None
    tmp = None
    try:
        for x, y in ds.prefetch(tf.data.AUTOTUNE):
            out = np.asarray(model.predict_on_batch(x))  # in inference mode
            labels.append(y.numpy())
            if writer is None and (policy == "disk" or (policy == "auto" and held + out.nbytes > budget)):
                tmp = Path(folder) / f"{name}.{uuid.uuid4().hex[:8]}.tmp"
                tmp.parent.mkdir(parents=True, exist_ok=True)
                writer = open(tmp, "wb")  # noqa: SIM115 - closed below
                for chunk in chunks:
                    writer.write(np.ascontiguousarray(chunk).tobytes())
                chunks = []
            shape, dtype = out.shape[1:], out.dtype
            if writer is not None:
                writer.write(np.ascontiguousarray(out).tobytes())
            else:
                chunks.append(out)
            held += out.nbytes
            shown.advance()
        shown.close()
    except BaseException:  # a kill or an error mid-pass: no half-written file stays behind
        shown.close(finished=False)
        if writer is not None:
            writer.close()
            tmp.unlink(missing_ok=True)
        raise
    all_labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    if writer is None:
        inputs = np.concatenate(chunks) if chunks else np.zeros((0, *model.output_shape[1:]), np.float32)
        return Cached(inputs, all_labels, "memory")
    try:
        writer.flush()
        os.fsync(writer.fileno())
    finally:
        writer.close()
    final = tmp.with_suffix(".npy.raw")
    os.replace(tmp, final)  # whole, or not there under this name
    inputs = np.memmap(final, dtype=dtype, mode="r", shape=(len(all_labels), *shape))
    return Cached(inputs, all_labels, "disk")


def remove(folder: str | os.PathLike) -> None:
    """Removes a run's caches on disk (before an attempt computes its own, and when a run ends)."""
    shutil.rmtree(Path(folder) / CACHE_DIR, ignore_errors=True)


def pipeline(
    cached: Cached,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int,
    drop_remainder: bool = False,
    clock: EpochClock | None = None,
    epochs: int | None = None,
    autotune: bool | None = None,
) -> tf.data.Dataset:
    """The batches the image pipeline would give, from the cache: in memory a gather from the
    array, on disk a read of the memory-mapped rows of the batch."""
    labels, rows = tf.constant(cached.labels), reader(cached)

    def gather(index, batch_seed):
        return rows(index), tf.gather(labels, index)

    ds = gathered_batches(
        len(cached.labels),
        gather,
        batch_size=batch_size,
        seed=seed,
        training=training,
        shuffle_buffer=shuffle_buffer,
        drop_remainder=drop_remainder and training,
        clock=clock,
        epochs=epochs,
        seeded=False,
    )
    return with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def reader(cached: Cached) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function from int64 row numbers [b] to those rows of the cache, for a tf.data map: in
    memory a gather from the array, on disk a read of the memory-mapped rows."""
    if cached.where == "memory":
        inputs = tf.constant(cached.inputs)
        return lambda index: tf.gather(inputs, index)
    array = cached.inputs
    row_shape = array.shape[1:]

    def read(index):
        return np.ascontiguousarray(array[index])

    def rows(index):
        out = tf.numpy_function(read, [index], tf.as_dtype(array.dtype), stateful=False)
        out.set_shape((None, *row_shape))
        return out

    return rows
