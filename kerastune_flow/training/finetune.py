"""Learning on a frozen base, and the staged fine-tune.

The frozen stage trains the head on the base's features, computed once (`split_at_base`,
`cached_feature_pipelines`; with random augmentation, of K augmented views of each image:
`view_cache`; with folds, once for all of them); stage 2 likewise trains the unfrozen layers and
the head on the output of the frozen layers below them (`split_at_prefix`, `prefix_stage`), computed
once per step. The staged fine-tune is two (or, with `progressive`, more) `fit()` calls with a
`compile()` between them: `trainable` only takes effect at compile time. A finished stage is
recorded in the stage ledger, so a resumed run starts at the next one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models
from kerastune_flow.config import Config
from kerastune_flow.training import caches, fitting, resume, view_cache
from kerastune_flow.training.fitting import FitContext
from kerastune_flow.training.stages import FIRST_STAGE, FinetuneStep, finetune_steps, stage_name

# The plan's names, also reached from here by callers of this module's earlier home of them.
from kerastune_flow.training.stages import parse_progressive as parse_progressive
from kerastune_flow.training.stages import resolve_steps as resolve_steps

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- feature caching


def split_at_base(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a transfer model into (features, head) sharing the same layers and weights.

    `features` maps pixels to the frozen base's output (preprocessing included); `head` maps
    those features to predictions. Training `head` trains the full model's head, because the
    layers are the same objects. Works for the linear models of `models.build_transfer_model`.
    """
    base = models.find_base(model)
    index = model.layers.index(base)
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    x = pixels
    for layer in model.layers[1 : index + 1]:
        x = layer(x, training=False) if layer is base else layer(x)
    features = keras.Model(pixels, x, name="features")
    feature_input = keras.Input(shape=tuple(x.shape[1:]), name="features")
    y = feature_input
    for layer in model.layers[index + 1 :]:
        y = layer(y)
    return features, keras.Model(feature_input, y, name="head")


def extract_features(
    features: keras.Model,
    ds: tf.data.Dataset,
    *,
    policy: str = "memory",
    folder: str | Path | None = None,
    name: str = "features",
) -> caches.Cached:
    """One pass of the frozen part over batched, unshuffled (images, labels): `caches.compute`."""
    return caches.compute(features, ds, policy=policy, folder=folder, name=name)


def cached_feature_pipelines(
    features: keras.Model,
    pipes: dict[str, tf.data.Dataset | None],
    *,
    batch_size: int,
    seed: int,
    drop_remainder: bool = False,
    autotune: bool | None = None,
    clock: data_lib.EpochClock | None = None,
    epochs: int | None = None,
    policy: str = "memory",
    folder: str | Path | None = None,
    what: str = "features",
    held_out: np.ndarray | None = None,
    reads: dict[str, Any] | None = None,
) -> dict[str, tf.data.Dataset | None]:
    """Computes what `features` outputs once for train and validation and serves it from memory
    or from a memory-mapped file.

    The training batches come in the order `data.prepare` gives the images (the same seeds,
    buffer and, with a clock, the same order per epoch: `data.gathered_batches`), so a model
    trained on them sees the batches the uncached path would.

    Args:
        features: the model from pixels to what is cached (see `split_at_base`, `split_at_prefix`).
        pipes: "train_ordered" and "validation_ordered": batched, unshuffled, unaugmented; with
            `held_out`, "merged_ordered" instead (the merged examples of cross-validation).
        batch_size: the global batch size.
        seed: the shuffle seed.
        drop_remainder: static batch shapes (TPUs).
        autotune: tf.data's autotuning; None: the device's choice.
        clock: the run's epoch clock; `epochs` is then the most epochs (see `data.epoch_ordered`).
        epochs: with `clock`, how many epochs the run has at most.
        policy: "memory", "disk" or "auto" (see `caches.compute`).
        folder: the run directory, where a cache on disk goes (under `caches.CACHE_DIR`).
        what: what is cached, for the log and the file names.
        held_out: with folds, the merged examples in the validation fold: "merged_ordered"'s
            output is computed (once for all folds, with `reads`) and each split takes its rows.
        reads: what decides the examples and batches (`FitContext.cache_reads`): a cache in memory
            is kept for this process's later runs (`caches.shared`); None: not kept.
    """
    cache_dir = Path(folder) / caches.CACHE_DIR if folder is not None else None
    keeper = caches.Keeper(features, reads)

    def cache(name: str) -> caches.Cached:
        ordered = pipes[f"{name}_ordered"]
        make = lambda: extract_features(features, ordered, policy=policy, folder=cache_dir, name=f"{what}_{name}")  # noqa: E731
        return keeper.get(make, ordered, split=name)

    folds = held_out is not None and pipes.get("merged_ordered") is not None
    names = ["merged"] if folds else [name for name in ("train", "validation") if pipes[f"{name}_ordered"] is not None]
    parts = {name: cache(name) for name in names}
    if folds:  # each split its rows of the merged examples' output
        parts = {"train": parts["merged"].take(~held_out), "validation": parts["merged"].take(held_out)}
    out: dict[str, tf.data.Dataset | None] = {"validation": None}
    for name, cached in parts.items():
        out[name] = caches.pipeline(
            cached,
            batch_size=batch_size,
            training=name == "train",
            seed=seed,
            shuffle_buffer=data_lib.SHUFFLE_BUFFER,
            drop_remainder=drop_remainder,
            clock=clock,
            epochs=epochs,
            autotune=autotune,
        )
    where = ", ".join(cached.describe(name, cache_dir) for name, cached in parts.items())
    log.info("Cached the %s: %s%s", what.replace("_", " "), where, caches.whence(folds, keeper.kept))
    return out


def frozen_stage(
    model: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext
) -> tuple[keras.Model, tf.data.Dataset, tf.data.Dataset | None]:
    """What the frozen stage fits, and on what: (model, train, validation), not yet compiled.

    Features are cached (with random augmentation, of K augmented views of each image:
    `view_cache`) unless `feature_cache` is "off" or augmentation is on with `augment_views` 0
    (the full forward pass, and the log says so): then the head alone, on the cached features;
    else the whole model on the images.
    """
    if not _can_cache(context.config):
        return model, pipes["train"], pipes["validation"]
    start = time.perf_counter()
    with context.strategy.scope():  # a model made in the scope fits in it (its optimizer's variables too)
        features, head = split_at_base(model)
    cached = _cached_pipelines(features, pipes, context, what="frozen_base_features")
    log.info("The frozen base's features took %.1f s to compute", time.perf_counter() - start)
    return head, cached["train"], cached["validation"]


def _can_cache(config: Config) -> bool:
    """Whether a frozen part's output may be cached: asked for, and nothing random touches the
    images, or augmentation with `augment_views` to cache (the base runs with training=False, so
    no dropout or noise inside it draws)."""
    if config.model.feature_cache == "off":
        return False
    if config.data.augment and not config.model.augment_views:
        log.info("Random augmentation is on: training with the full forward pass (no feature cache)")
        return False
    return True


def _cached_pipelines(
    features: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext, *, what: str
) -> dict[str, tf.data.Dataset | None]:
    caches.remove(context.run_dir)  # an earlier attempt's, or the previous step's, is never read
    if context.config.data.augment:  # K augmented views of each training image (`_can_cache`)
        return view_cache.cached_view_pipelines(features, pipes, context, what=what, reads=context.cache_reads())
    return cached_feature_pipelines(
        features,
        pipes,
        batch_size=context.global_batch_size,
        seed=context.config.train.seed,
        drop_remainder=context.settings.drop_remainder,
        autotune=context.settings.data_autotune,
        clock=context.clock,
        epochs=context.epochs,
        policy=context.config.model.feature_cache,
        folder=context.run_dir,
        what=what,
        held_out=context.held_out,
        reads=context.cache_reads(),
    )


def split_at_prefix(model: keras.Model, index: int) -> tuple[keras.Model, keras.Model] | None:
    """Splits a partly unfrozen transfer model at base layer `index` into (prefix, rest), sharing
    the same layers and weights, or None when the base cannot be cut there.

    `prefix` maps pixels to the input of base layer `index` (preprocessing and the frozen layers
    below the unfreeze point); `rest` maps that to predictions (the unfrozen layers, the head).
    The cut needs one tensor to cross it: a residual connection over the boundary (not at a block
    start) leaves the upper part disconnected, and then the full pass is used. Both parts run the
    base's layers with training=False, as the full model does.
    """
    base = models.find_base(model)
    position = model.layers.index(base)
    if index <= 1:  # nothing but the input below the boundary: nothing worth caching
        return None
    if index >= len(base.layers):
        return split_at_base(model)
    boundary = base.layers[index].input
    if isinstance(boundary, (list, tuple)):
        return None
    try:
        lower = keras.Model(base.input, boundary, name=f"{base.name}_frozen")
        upper = keras.Model(boundary, base.output, name=f"{base.name}_unfrozen")
    except ValueError:
        return None
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    x = pixels
    for layer in model.layers[1:position]:
        x = layer(x)
    prefix = keras.Model(pixels, lower(x, training=False), name="frozen_prefix")
    cached = keras.Input(shape=tuple(boundary.shape[1:]), name="frozen_prefix_output")
    y = upper(cached, training=False)
    for layer in model.layers[position + 1 :]:
        y = layer(y)
    return prefix, keras.Model(cached, y, name="unfrozen_part")


def fit_frozen(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset | None],
    context: FitContext,
    *,
    epochs: int,
    stage: str | None,
) -> tuple[int, float | None]:
    """Trains the head on the frozen base, on cached features when that gives the same result
    (see `frozen_stage`). The head model shares the full model's layers, so nothing needs
    copying back. With `learning_rate="auto"` a range test on what the stage fits finds the rate.

    Returns:
        (the epoch the stage ended at, the best monitored value).
    """
    fit_model, train_ds, val_ds = frozen_stage(model, pipes, context)
    fitting.compile_stage(fit_model, train_ds, context, stage=FIRST_STAGE, epochs=epochs, full_model=model)
    save_model = model if fit_model is not model else None
    callbacks = fitting.stage_callbacks(context, epochs=epochs, stage=stage, save_model=save_model)
    end = fitting.fit(fit_model, train_ds, val_ds, context, callbacks, epochs=epochs)
    caches.remove(context.run_dir)
    return end, fitting.best_so_far(callbacks)


# --------------------------------------------------------------------------- the staged fine-tune


def compile_finetune_step(
    model: keras.Model, context: FitContext, step: FinetuneStep, *, rate: float | str, epochs: int
) -> int:
    """Unfreezes the base from `step.unfreeze_at` and compiles the whole model at `rate` (for
    "auto", the placeholder a range test is run at: see `fitting.compile_stage`) for `epochs`.

    Returns:
        The index of the first unfrozen layer of the base.
    """
    index = unfreeze(model, context, step)
    fitting.compile_for(model, context, learning_rate=rate, epochs=epochs, base=models.find_base(model))
    return index


def unfreeze(model: keras.Model, context: FitContext, step: FinetuneStep) -> int:
    """Unfreezes the base from `step.unfreeze_at` (it takes effect at the next compile); returns
    the index of the first unfrozen layer of the base."""
    with context.strategy.scope():
        return models.unfreeze_from(models.find_base(model), step.unfreeze_at)


def prefix_stage(
    model: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext, index: int
) -> tuple[keras.Model, tf.data.Dataset | None, tf.data.Dataset | None]:
    """What a stage-2 step fits, and on what: (model, train, validation).

    The frozen layers below the unfreeze point compute the same output in every epoch when
    nothing random touches the images, so it is computed once per step (a progressive step
    unfreezes more, and computes its own) and the unfrozen layers and the head train on it,
    as for the frozen stage (with augmentation, on K augmented views: `view_cache`). Else, or when
    the base cannot be cut at `index`, the whole model on the images; the log says which.
    """
    if not _can_cache(context.config):
        return model, pipes["train"], pipes["validation"]
    with context.strategy.scope():  # as for the frozen stage's head
        parts = split_at_prefix(model, index)
    if parts is None:
        log.info("The base cannot be cut at layer %d: stage 2 runs the full forward pass", index)
        return model, pipes["train"], pipes["validation"]
    prefix, rest = parts
    start = time.perf_counter()
    cached = _cached_pipelines(prefix, pipes, context, what=f"frozen_prefix_below_layer_{index}")
    log.info("The frozen prefix's output took %.1f s to compute", time.perf_counter() - start)
    return rest, cached["train"], cached["validation"]


def fit_staged(model: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext) -> list[int]:
    """The staged fine-tune: head on the frozen base, then unfreeze and continue at a low rate.

    Stage one trains the head for up to `head_epochs` (feature-cached when possible, early
    stopping with the best weights restored). Stage two unfreezes the base from `unfreeze_at`
    (default: the backbone's last block, block5_conv1 = 15 for VGG16), recompiles (trainable
    changes take effect only at compile time) with `finetune_learning_rate`, and continues with
    `initial_epoch` where stage one stopped, for `epochs` more, so the history is one
    continuous run. With `progressive`, stage two is several steps, each unfreezing more and
    recompiling. A finished stage is recorded, so a resumed run starts at the next one.

    Returns:
        The first epoch of each fine-tune step (the stage boundaries).
    """
    t = context.config.train
    ledger = resume.StageLedger(context.run_dir, t.backup)
    state = ledger.done(FIRST_STAGE, model)
    if state is None:
        log.info("Stage 1: training the head on the frozen base for up to %d epoch(s)", t.head_epochs)
        end, best = fit_frozen(model, pipes, context, epochs=t.head_epochs, stage=FIRST_STAGE)
        ledger.record(FIRST_STAGE, model, end=end, best=best)
    else:
        end, best = state["end"], state["best"]
        log.info("Stage 1 (head) finished in an earlier attempt: continuing at epoch %d", end + 1)
    plan = finetune_steps(context.config, models.find_base(model))
    stage2_start, final = end, end + t.epochs
    boundaries = []
    for i, step in enumerate(plan):
        start = max(end, stage2_start + step.offset)
        stop = stage2_start + plan[i + 1].offset if i + 1 < len(plan) else final
        boundaries.append(start)
        ended = _finetune_step(model, pipes, context, ledger, stage_name(i), step, (start, stop), best)
        end, best = ended if ended is not None else (end, best)
    return boundaries


def _finetune_step(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset | None],
    context: FitContext,
    ledger: resume.StageLedger,
    stage: str,
    step: FinetuneStep,
    epochs: tuple[int, int],
    best: float | None,
) -> tuple[int, float | None] | None:
    """One step of stage two over epochs [start, stop): unfreeze, compile once the rate is known,
    fit; a step the ledger holds is skipped with its weights. Returns (end epoch, best value), or
    None when the step has no epochs left."""
    start, stop = epochs
    base = models.find_base(model)
    index = unfreeze(model, context, step)
    state = ledger.done(stage, model)
    if state is not None or start >= stop:
        # Skipped, yet compiled as the step left it: the model is evaluated and saved at the end.
        recorded = resume.found_learning_rates(context.run_dir).get(stage, step.learning_rate)
        fitting.compile_for(model, context, learning_rate=recorded, epochs=max(1, stop - start), base=base)
        if state is not None:
            return state["end"], state["best"]
        log.info("Step %s has no epochs left (stage ends at epoch %d): skipped", stage, stop)
        return None
    fit_model, train_ds, val_ds = prefix_stage(model, pipes, context, index)
    rate = fitting.compile_stage(  # tested, for "auto", on what stage 2 trains: with any base multiplier
        fit_model,
        train_ds,
        context,
        stage=stage,
        learning_rate=step.learning_rate,
        epochs=stop - start,
        epoch=start,
        full_model=model,
        base=base,
    )
    multiplier = context.config.model.base_lr_multiplier
    log.info(
        "Stage %s: base layers from %s unfrozen, learning rate %g%s, epochs %d to %d",
        stage,
        models.describe_layer(base, index),
        rate,
        f" (base x{multiplier:g})" if multiplier else "",
        start + 1,
        stop,
    )
    save_model = model if fit_model is not model else None
    callbacks = fitting.stage_callbacks(context, epochs=stop - start, stage=stage, best=best, save_model=save_model)
    end = fitting.fit(fit_model, train_ds, val_ds, context, callbacks, epochs=stop, initial_epoch=start)
    best = fitting.best_so_far(callbacks)
    ledger.record(stage, model, end=end, best=best)
    del fit_model, train_ds, val_ds  # the step's cache, before the next step computes its own
    caches.remove(context.run_dir)
    return end, best
