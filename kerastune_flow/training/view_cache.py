"""Augmented views of the training images through a frozen part, computed once.

With random augmentation what a frozen part outputs changes with every epoch's images, so it cannot
be cached as it is (`caches`). Instead K augmented views of each training image pass through it
once (`augment_views`): view k of the ordered pipeline's batch j is the run's augmenter with the
seed (`view_seed(seed, k)`, j), the same at every attempt. Each training epoch serves, for every
image, one of its K cached views, drawn from the batch's seed, which follows from (seed, epoch,
batch) as the image pipeline's augmentation does (`data.gathered_batches`): a resumed run repeats
the epochs of an uninterrupted one. Validation stays unaugmented (one view, as `caches` computes
it). The K views count K times against the memory budget (`caches.compute`), and beyond it go to a
memory-mapped file in the run directory, as any cache.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow.data.augment import Augmenter
from kerastune_flow.training import caches
from kerastune_flow.training.fitting import FitContext

log = logging.getLogger(__name__)

# How the log names what is cached (`finetune`'s names for its caches; others are spelled out).
DESCRIBED = {"frozen_base_features": "the frozen base's features"}
# The most pixels one call of the frozen part takes in the view pass: a batch of 32 at the transfer
# recipes' 150x150. Each call costs a few ms beyond its work (8 ms for a small CNN at 32x32 here),
# so at small sizes several views of a batch go through at once.
PASS_PIXELS = 32 * 150 * 150


@dataclasses.dataclass
class Views:
    """The K cached views of a training split.

    Attributes:
        cached: every view's output, in the order computed (`augmented_views`).
        rows: (n, K) int64: the row of `cached` holding view k of image i.
        labels: (n, ...) each image's label, as the head's loss expects it.
    """

    cached: caches.Cached
    rows: np.ndarray
    labels: np.ndarray

    @property
    def views(self) -> int:
        return int(self.rows.shape[1])

    @property
    def where(self) -> str:
        return self.cached.where

    @property
    def nbytes(self) -> int:
        return self.cached.nbytes

    def take(self, examples: np.ndarray) -> Views:
        """The views of the examples at `examples` (bool or int), in their order (nothing copied
        but the row map and labels)."""
        return Views(cached=self.cached, rows=self.rows[examples], labels=self.labels[examples])


def view_seed(seed: int, view: int) -> int:
    """The augmentation seed of view `view` of a run (its batches add their index to it)."""
    return data_lib.epoch_seed(seed, view, "view")


def row_map(num_examples: int, views: int, batch_size: int) -> np.ndarray:
    """(n, K) int64: where view k of image i lands when each batch of `batch_size` images is
    followed by its K views in turn (`augmented_views`): batch j's view k fills the rows from
    start_j x K + k x b_j, for the b_j images of the batch starting at image start_j."""
    index = np.arange(num_examples, dtype=np.int64)
    start = index // batch_size * batch_size
    size = np.minimum(batch_size, num_examples - start)
    view = np.arange(views, dtype=np.int64)
    return start[:, None] * views + view[None, :] * size[:, None] + (index - start)[:, None]


def views_per_call(views: int, batch_size: int, image_shape: tuple[int, ...]) -> int:
    """How many views of a batch go through the frozen part in one call: the most that divides K
    and fits in `PASS_PIXELS` (a call costs a few ms whatever its size, so small images go many
    views at a time), at least one."""
    pixels = max(1, int(np.prod(image_shape[:2])))
    most = max(1, min(views, PASS_PIXELS // (pixels * batch_size)))
    return max(n for n in range(1, most + 1) if views % n == 0)


def augmented_views(
    ds: tf.data.Dataset, augmenter: Augmenter, *, views: int, seed: int, batch_size: int, per_call: int = 1
) -> tf.data.Dataset:
    """The batches of `ds` (unshuffled (images, labels)) rebatched to `batch_size`, each followed by
    its K augmented copies in turn, `per_call` (a divisor of K) views to an element, stacked view
    after view, so that the rows are those of `row_map` either way: batch j's view k with the seed
    (`view_seed(seed, k)`, j)."""
    seeds = tf.constant([view_seed(seed, k) for k in range(views)], tf.int64)
    groups = views // per_call

    def expand(j, images, labels):
        images = tf.cast(images, tf.float32)  # the augmenter's input, whatever the pipeline holds
        out = tf.map_fn(
            lambda k_seed: augmenter(images, tf.stack([k_seed, j])),
            seeds,
            fn_output_signature=tf.TensorSpec(images.shape, tf.float32),
        )  # (K, b, ...): view after view
        shape = tf.shape(images)
        out = tf.reshape(out, tf.concat([[groups, per_call * shape[0]], shape[1:]], 0))
        tiled = tf.tile(labels[None], [groups, per_call] + [1] * (labels.shape.rank - 1))
        return out, tiled

    batches = ds.unbatch().batch(batch_size)  # the sizes `row_map` assumes, whatever `ds` had
    out = batches.enumerate().map(lambda j, batch: expand(j, *batch)).unbatch()
    count = int(ds.cardinality())
    # The progress bar's total; the ordered pipelines are batched at the global batch size already.
    return out.apply(tf.data.experimental.assert_cardinality(count * groups)) if count >= 0 else out


def compute_views(
    model: keras.Model,
    ds: tf.data.Dataset,
    augmenter: Augmenter,
    *,
    views: int,
    seed: int,
    batch_size: int,
    policy: str = "auto",
    folder: str | Path | None = None,
    name: str = "views",
    budget: int | None = None,
) -> Views:
    """One pass of `model` over K augmented views of every image of `ds`, kept in memory or on disk.

    Args:
        model: the frozen part, from images to what is cached (in inference mode).
        ds: batched (images, labels), unshuffled and unaugmented.
        augmenter: the run's augmentation (`data.make_augmenter`).
        views: K, at least 1.
        seed: the run's seed, from which each view's seed follows (`view_seed`).
        batch_size: the images per batch of the pass.
        policy: "memory", "disk" or "auto" (see `caches.compute`; all K views count).
        folder: where a cache on disk goes; needed unless "memory".
        name: the file's name stem.
        budget: bytes kept in memory under "auto"; default `data.memory_budget()`.

    Returns:
        The views, their rows and each image's label.
    """
    per_call = views_per_call(views, batch_size, tuple(model.input_shape[1:]))
    stream = augmented_views(ds, augmenter, views=views, seed=seed, batch_size=batch_size, per_call=per_call)
    cached = caches.compute(model, stream, policy=policy, folder=folder, name=name, budget=budget)
    rows = row_map(len(cached.labels) // views, views, batch_size)
    return Views(cached=cached, rows=rows, labels=cached.labels[rows[:, 0]])


def pipeline(
    views: Views,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle_buffer: int,
    drop_remainder: bool = False,
    clock: data_lib.EpochClock | None = None,
    epochs: int | None = None,
    autotune: bool | None = None,
) -> tf.data.Dataset:
    """Training batches from the views: the images in the order the image pipeline gives them
    (`data.gathered_batches`), each as one of its views, drawn per image from the batch's seed."""
    rows, labels, count = tf.constant(views.rows), tf.constant(views.labels), views.views
    read = caches.reader(views.cached)

    def gather(index, batch_seed):
        view = tf.random.stateless_uniform(tf.shape(index), batch_seed, minval=0, maxval=count, dtype=tf.int64)
        return read(tf.gather_nd(rows, tf.stack([index, view], axis=1))), tf.gather(labels, index)

    ds = data_lib.gathered_batches(
        len(views.labels),
        gather,
        batch_size=batch_size,
        seed=seed,
        training=True,
        shuffle_buffer=shuffle_buffer,
        drop_remainder=drop_remainder,
        clock=clock,
        epochs=epochs,
    )
    return data_lib.with_autotune(ds.prefetch(tf.data.AUTOTUNE), autotune)


def cached_view_pipelines(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset | None],
    context: FitContext,
    *,
    what: str,
    reads: dict[str, Any] | None = None,
) -> dict[str, tf.data.Dataset | None]:
    """What `model` outputs for K augmented views of each training image and for the unaugmented
    validation images, computed once and served as training and validation pipelines.

    Args:
        model: the frozen part (see `finetune.split_at_base`, `finetune.split_at_prefix`).
        pipes: the run's pipelines: "train_ordered" and "validation_ordered" are read; with folds
            (`context.held_out`), "merged_ordered": the views and the unaugmented outputs of the
            merged examples, each fold taking its rows.
        context: the run's fit context: its config (augmentation, `augment_views`, seed, the
            `feature_cache` policy), batch size, clock and run directory.
        what: what is cached, for the log and the file names.
        reads: the settings that decide the examples and batches (`FitContext.cache_reads`): the views
            and outputs in memory are kept for later runs of this process (`caches.shared`).

    Returns:
        {"train": ..., "validation": ... or None}.
    """
    settings, k, seed = context.settings, context.config.model.augment_views, context.config.train.seed
    folder, batch = Path(context.run_dir) / caches.CACHE_DIR, context.global_batch_size
    train, validation, whence = _computed(model, pipes, context, what=what, reads=reads)
    out: dict[str, tf.data.Dataset | None] = {"validation": None}
    out["train"] = pipeline(
        train,
        batch_size=batch,
        seed=seed,
        shuffle_buffer=data_lib.SHUFFLE_BUFFER,
        drop_remainder=settings.drop_remainder,
        clock=context.clock,
        epochs=context.epochs,
        autotune=settings.data_autotune,
    )
    where = [train.cached.describe("train", folder)]
    if validation is not None:
        out["validation"] = caches.pipeline(
            validation,
            batch_size=batch,
            training=False,
            shuffle_buffer=data_lib.SHUFFLE_BUFFER,
            autotune=settings.data_autotune,
        )
        where.append(validation.describe("validation", folder))
    described = DESCRIBED.get(what, "the " + what.replace("_", " "))
    log.info("Cached %d augmented views of %s: %s%s", k, described, ", ".join(where), whence)
    return out


def _computed(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset | None],
    context: FitContext,
    *,
    what: str,
    reads: dict[str, Any] | None,
) -> tuple[Views, caches.Cached | None, str]:
    """The training views and the validation outputs `cached_view_pipelines` serves, computed or
    kept from an earlier run (`caches.Keeper`); with folds, the merged examples' and each
    split's rows. Returns (train, validation or None, where they came from for the log)."""
    config = context.config
    k, seed, policy = config.model.augment_views, config.train.seed, config.model.feature_cache
    augmenter = data_lib.make_augmenter(config.data.augment, model.input_shape[1:])
    folder, batch = Path(context.run_dir) / caches.CACHE_DIR, context.global_batch_size
    folds = context.held_out is not None and pipes.get("merged_ordered") is not None
    keeper = caches.Keeper(model, reads)

    def views_of(name: str) -> Views:
        ordered = pipes[f"{name}_ordered"]
        return keeper.get(
            lambda: compute_views(
                model,
                ordered,
                augmenter,
                views=k,
                seed=seed,
                batch_size=batch,
                policy=policy,
                folder=folder,
                name=f"{what}_{name}_views",
            ),
            ordered,
            split=name,
            views=k,
        )

    def plain(name: str) -> caches.Cached:
        ordered = pipes[f"{name}_ordered"]
        make = lambda: caches.compute(model, ordered, policy=policy, folder=folder, name=f"{what}_{name}")  # noqa: E731
        return keeper.get(make, ordered, split=name)

    if folds:
        train, validation = views_of("merged").take(~context.held_out), plain("merged").take(context.held_out)
    else:
        train = views_of("train")
        validation = plain("validation") if pipes["validation_ordered"] is not None else None
    return train, validation, caches.whence(folds, keeper.kept)
