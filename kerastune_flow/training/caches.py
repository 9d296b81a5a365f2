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

Within one process, a cache held in memory is kept for the runs after it (`shared`), keyed by what
the frozen part computes (its weights and its output on a fixed probe) and by what it reads (the
data's settings, seed and batch): a search's trials, and the K folds of a cross-validated trial
(`data.fold_splits`: computed once over the merged examples, each fold's rows taken by `Cached.take`),
compute the frozen base's features once. What is kept is what the run would compute, the same
values: only the time is saved.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
        inputs: (m, ...) float array, a `np.memmap` when on disk.
        labels: (n, ...) labels as the head's loss expects them (already encoded).
        where: "memory" or "disk".
        index: None (row i of `inputs` is example i, m = n), or (n,) int64: the row of `inputs`
            holding example i (a fold's part of a cache computed over more examples: `take`).
    """

    inputs: np.ndarray
    labels: np.ndarray
    where: str
    index: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """The bytes of this cache's examples (a part taken from a larger one: its rows' share)."""
        if self.index is None:
            return int(self.inputs.nbytes)
        return int(self.inputs.nbytes // max(1, len(self.inputs)) * len(self.index))

    def take(self, rows: np.ndarray) -> Cached:
        """The examples at `rows` (int or bool over this cache's examples), in their order, reading
        this cache's arrays (nothing copied but the labels)."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else np.asarray(rows, np.int64)
        index = rows if self.index is None else self.index[rows]
        return Cached(self.inputs, self.labels[rows], self.where, index=index)

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
    taken = None if cached.index is None else tf.constant(cached.index)
    if cached.where == "memory":
        inputs = tf.constant(cached.inputs)
        if taken is None:
            return lambda index: tf.gather(inputs, index)
        return lambda index: tf.gather(inputs, tf.gather(taken, index))
    array, rows_of = cached.inputs, cached.index
    row_shape = array.shape[1:]

    def read(index):
        return np.ascontiguousarray(array[index if rows_of is None else rows_of[index]])

    def rows(index):
        out = tf.numpy_function(read, [index], tf.as_dtype(array.dtype), stateful=False)
        out.set_shape((None, *row_shape))
        return out

    return rows


# --------------------------------------------------------------------------- kept for later runs

_KEPT: collections.OrderedDict[str, Any] = collections.OrderedDict()  # key -> Cached or view_cache.Views


def fingerprint(model: keras.Model) -> str:
    """What a frozen part computes, as a hex digest: its weights and its output on a fixed probe
    batch (two parts with the same weights but other layers, e.g. another preprocessing, differ in
    the output). Layer names, which Keras numbers anew for each model built, play no part."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    shape = tuple(2 if size is None else size for size in model.input_shape)
    probe = np.random.default_rng(0).uniform(0, 255, size=shape).astype(np.float32)
    out = model(probe, training=False)  # eager: no predict function traced for the probe's shape
    digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(out)).tobytes())
    return digest.hexdigest()


def key(printed: str, ds: tf.data.Dataset, **reads: Any) -> str:
    """The key under which `shared` keeps what a frozen part outputs for `ds`: the part's `fingerprint`
    (`printed`), the data set's element spec (image and label shapes, dtypes) and `reads`, the settings
    that decide which examples `ds` yields in which batches (JSON-serializable)."""
    spec = json.dumps(reads, sort_keys=True, default=str)
    return hashlib.sha256(f"{printed}|{ds.element_spec}|{spec}".encode()).hexdigest()


def shared(key: str, make: Callable[[], Any], *, budget: int | None = None) -> tuple[Any, bool]:
    """What `make()` returns (a `Cached`, or anything with its `where` and `nbytes`), kept in this
    process under `key` while it is in memory and the kept ones fit in `budget` (default
    `memory_budget()`; the least recently used go first), so the next run asking for the same key
    reads it instead of computing it. A cache on disk is never kept (it lives in its run's directory).

    Returns:
        (the cache, whether it was kept from an earlier run).
    """
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key], True
    made = make()
    budget = memory_budget() if budget is None else budget
    if made.where == "memory" and made.nbytes <= budget:
        _KEPT[key] = made
        while sum(kept.nbytes for kept in _KEPT.values()) > budget:
            _KEPT.popitem(last=False)
    return made, False


class Keeper:
    """The caches one frozen part computes in a run, each kept for later runs (`shared`) under the
    `key` of the part's `fingerprint`, taken once (and only when something is to be kept), the
    ordered pipeline it reads and `reads` (None: nothing kept, each cache made).

    Attributes:
        kept: whether any cache came from an earlier run (for the log: `whence`).
    """

    def __init__(self, model: keras.Model, reads: dict[str, Any] | None):
        self.model, self.reads, self.kept = model, reads, False
        self._printed: str | None = None

    def get(self, make: Callable[[], Any], ds: tf.data.Dataset, **more: Any) -> Any:
        """What `make()` returns for the ordered pipeline `ds`, or the same kept from an earlier run
        (`more`: what else decides it, e.g. the views' count)."""
        if self.reads is None:
            return make()
        if self._printed is None:
            self._printed = fingerprint(self.model)
        made, kept = shared(key(self._printed, ds, **more, **self.reads), make)
        self.kept = self.kept or kept
        return made


def whence(folds: bool, kept: bool) -> str:
    """For a cache's log line: where its values came from, when not from the run's own pass over
    its splits (`shared`; with folds, one pass over the merged examples)."""
    if kept:
        return " (computed by an earlier run in this process" + (" over every fold's images)" if folds else ")")
    return " (computed once over every fold's images, this fold's rows taken)" if folds else ""


def forget() -> None:
    """Drops every cache kept for later runs in this process (the memory is freed once no run uses it)."""
    _KEPT.clear()
