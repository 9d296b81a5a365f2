"""Learning on a frozen base, and the staged fine-tune.

The frozen stage trains the head on the base's features, computed once when nothing random
touches the images (`split_at_base`, `cached_feature_pipelines`); stage 2 likewise trains the
unfrozen layers and the head on the output of the frozen layers below them (`split_at_prefix`,
`prefix_stage`), computed once per step. The staged fine-tune is two
(or, with `progressive`, more) `fit()` calls with a `compile()` between them: `trainable` only
takes effect at compile time. A finished stage is recorded in the stage ledger, so a resumed run
starts at the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir
from kerastune_flow.config import AUTO, Config
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import fitted
from kerastune_flow.training import caches, fitting
from kerastune_flow.training.fitting import FitContext

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
    """One pass of the frozen part over a batched, unshuffled (images, labels) data set, kept in
    memory or on disk (see `caches.compute`)."""
    return caches.compute(features, ds, policy=policy, folder=folder, name=name)


def cache_policy(config: Config, run_dir: str | Path | None) -> str:
    """Where a cache goes: `feature_cache`'s "memory" or "disk", or for "auto" memory while it fits
    (on disk beside the run only when there is a run directory to hold it)."""
    policy = config.model.feature_cache
    if policy == "auto" and run_dir is None:
        return "memory"
    return policy


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
) -> dict[str, tf.data.Dataset | None]:
    """Computes what `features` outputs once for train and validation and serves it from memory
    or from a memory-mapped file.

    The training batches come in the order `data.prepare` gives the images (the same seeds,
    buffer and, with a clock, the same order per epoch: `data.gathered_batches`), so a model
    trained on them sees the batches the uncached path would.

    Args:
        features: the model from pixels to what is cached (see `split_at_base`, `split_at_prefix`).
        pipes: "train_ordered" and "validation_ordered": batched, unshuffled, unaugmented.
        batch_size: the global batch size.
        seed: the shuffle seed.
        drop_remainder: static batch shapes (TPUs).
        autotune: tf.data's autotuning; None: the device's choice.
        clock: the run's epoch clock; `epochs` is then the most epochs (see `data.epoch_ordered`).
        epochs: with `clock`, how many epochs the run has at most.
        policy: "memory", "disk" or "auto" (see `caches.compute`).
        folder: the run directory, where a cache on disk goes (under `caches.CACHE_DIR`).
        what: what is cached, for the log and the file names.
    """
    out: dict[str, tf.data.Dataset | None] = {"validation": None}
    where = []
    for name in ("train", "validation"):
        if pipes[f"{name}_ordered"] is None:
            continue
        cache_dir = Path(folder) / caches.CACHE_DIR if folder is not None else None
        cached = extract_features(
            features, pipes[f"{name}_ordered"], policy=policy, folder=cache_dir, name=f"{what}_{name}"
        )
        place = "in memory" if cached.where == "memory" else f"on disk ({cache_dir})"
        where.append(f"{name} {cached.nbytes / 2**20:.1f} MiB {place}")
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
    log.info("Cached the %s: %s", what.replace("_", " "), ", ".join(where))
    return out


def frozen_stage(
    model: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext, *, epochs: int
) -> tuple[keras.Model, tf.data.Dataset, tf.data.Dataset | None]:
    """What the frozen stage fits, and on what: (model, train, validation).

    Features are cached unless `feature_cache` is "off" or random augmentation is on (with
    augmentation every epoch sees new images, so the full forward pass is needed, and the log
    says so): then the head alone, compiled at the head's rate for `epochs`, on the cached
    features; else the whole model (compiled by its builder) on the images.
    """
    config = context.config
    if not _can_cache(config):
        return model, pipes["train"], pipes["validation"]
    start = time.perf_counter()
    with context.strategy.scope():  # a model made in the scope fits in it (its optimizer's variables too)
        features, head = split_at_base(model)
    cached = _cached_pipelines(features, pipes, context, what="frozen_base_features")
    log.info("The frozen base's features took %.1f s to compute", time.perf_counter() - start)
    with context.strategy.scope():
        models.compile_model(
            head,
            models.transfer_head(max(2, model.output_shape[-1])),
            learning_rate=fitting.learning_rate(context, config.model.learning_rate, epochs=epochs),
            **fitting.compile_kwargs(context),
        )
    return head, cached["train"], cached["validation"]


def _can_cache(config: Config) -> bool:
    """Whether a frozen part's output may be cached: asked for, and nothing random touches the
    images (the base runs with training=False, so no dropout or noise inside it draws)."""
    if config.model.feature_cache == "off":
        return False
    if config.data.augment:
        log.info("Random augmentation is on: training with the full forward pass (no feature cache)")
        return False
    return True


def _cached_pipelines(
    features: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext, *, what: str
) -> dict[str, tf.data.Dataset | None]:
    caches.remove(context.run_dir)  # an earlier attempt's, or the previous step's, is never read
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
    fit_model, train_ds, val_ds = frozen_stage(model, pipes, context, epochs=epochs)
    if context.config.model.learning_rate == AUTO:
        words = fitted(context.config, "head")
        rate = fitting.auto_learning_rate(context, fit_model, train_ds, stage="head", fitted=words)
        with context.strategy.scope():  # compiled again, at the rate found
            models.compile_model(
                fit_model,
                models.transfer_head(max(2, model.output_shape[-1])),
                learning_rate=fitting.learning_rate(context, rate, epochs=epochs),
                **fitting.compile_kwargs(context),
            )
    save_model = model if fit_model is not model else None
    callbacks = fitting.stage_callbacks(context, epochs=epochs, stage=stage, save_model=save_model)
    end = fitting.fit(fit_model, train_ds, val_ds, context, callbacks, epochs=epochs)
    caches.remove(context.run_dir)
    return end, fitting.best_so_far(callbacks)


# --------------------------------------------------------------------------- the staged fine-tune


@dataclasses.dataclass(frozen=True)
class FinetuneStep:
    """One step of stage two: from `offset` epochs after its start, the base is unfrozen from
    `unfreeze_at` and trains at `learning_rate`."""

    offset: int
    unfreeze_at: int | float | str
    learning_rate: float


def parse_progressive(spec: str | None) -> list[FinetuneStep]:
    """Parses progressive unfreezing steps "EPOCH:UNFREEZE_AT:LR,...", epochs counted from the
    start of stage two; the first step must start at 0.

    Raises:
        ConfigError: naming the malformed step.
    """
    if not spec:
        return []
    steps = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            epoch, at, lr = int(fields[0]), fields[1], float(fields[2])
            if epoch < 0 or lr <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                "--progressive takes EPOCH:UNFREEZE_AT:LR steps separated by commas, such as "
                f"0:block5_conv1:1e-5,3:block4_conv1:5e-6. Received: {part.strip()!r}"
            ) from None
        steps.append(FinetuneStep(epoch, at, lr))
    epochs = [step.offset for step in steps]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise ConfigError(f"--progressive steps must start at epoch 0 and increase. Received: epochs={epochs}")
    return steps


def finetune_steps(config: Config, base: keras.Model) -> list[FinetuneStep]:
    """The steps of stage two: `progressive`'s, or one step from `unfreeze_at` (default: the
    base's last block) at `finetune_learning_rate`."""
    m = config.model
    unfreeze_at = m.unfreeze_at if m.unfreeze_at is not None else models.default_unfreeze_at(base)
    return parse_progressive(m.progressive) or [FinetuneStep(0, unfreeze_at, m.finetune_learning_rate)]


def resolve_steps(config: Config, base: keras.Model) -> list[dict[str, Any]]:
    """Resolves every fine-tune boundary on the built base before stage one trains, so that an
    `unfreeze_at` out of range or a layer name that does not exist fails at once.

    Returns:
        Per step: the stage name, what was asked ("at"), the layer index and name it resolved
        to (a fraction snapped to a block start), and the learning rate: for config.json.

    Raises:
        ConfigError: from `models.resolve_unfreeze_at`.
    """
    out = []
    for i, step in enumerate(finetune_steps(config, base)):
        index = models.resolve_unfreeze_at(base, step.unfreeze_at)
        layer = base.layers[index].name if index < len(base.layers) else None
        out.append(
            {"stage": _stage_name(i), "at": step.unfreeze_at, "index": index, "layer": layer, "lr": step.learning_rate}
        )
    return out


def _stage_name(i: int) -> str:
    return "finetune" if i == 0 else f"finetune_{i + 1}"


def compile_finetune_step(
    model: keras.Model,
    context: FitContext,
    step: FinetuneStep,
    *,
    rate: float | str,
    epochs: int,
    fit_model: keras.Model | None = None,
) -> int:
    """Unfreezes the base from `step.unfreeze_at` and compiles the whole model (or `fit_model`,
    the part above a cached prefix, see `split_at_prefix`) at `rate` for a fit of `epochs` (the
    base at `rate` x `base_lr_multiplier` when that is given).

    Returns:
        The index of the first unfrozen layer of the base.
    """
    m = context.config.model
    base = models.find_base(model)
    with context.strategy.scope():
        index = models.unfreeze_from(base, step.unfreeze_at)
        models.compile_model(
            fit_model or model,
            models.transfer_head(max(2, model.output_shape[-1])),
            learning_rate=fitting.learning_rate(context, rate, epochs=epochs),
            base_variables=base.trainable_variables if m.base_lr_multiplier is not None else None,
            base_multiplier=m.base_lr_multiplier,
            **fitting.compile_kwargs(context),
        )
    return index


def prefix_stage(
    model: keras.Model, pipes: dict[str, tf.data.Dataset | None], context: FitContext, index: int
) -> tuple[keras.Model, tf.data.Dataset | None, tf.data.Dataset | None]:
    """What a stage-2 step fits, and on what: (model, train, validation).

    The frozen layers below the unfreeze point compute the same output in every epoch when
    nothing random touches the images, so it is computed once per step (a progressive step
    unfreezes more, and computes its own) and the unfrozen layers and the head train on it,
    as for the frozen stage. Else, or when the base cannot be cut at `index`, the whole model on
    the images; the log says which.
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


class StageLedger:
    """Remembers finished stages (weights and where they ended) under backup/, so a resumed run
    skips them; removed with the backup when the run finishes."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.folder = Path(run_dir) / rundir.BACKUP_DIR / "stages"
        self.enabled = enabled

    def done(self, stage: str, model: keras.Model) -> dict | None:
        """The state recorded when `stage` finished (its weights loaded into `model`), or None."""
        marker = self.folder / f"{stage}.json"
        if not (self.enabled and marker.exists()):
            return None
        model.load_weights(self.folder / f"{stage}.weights.h5")
        return rundir.read_json(marker)

    def record(self, stage: str, model: keras.Model, **state: Any) -> None:
        """Records that `stage` finished, with the model's weights and `state`."""
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            model.save_weights(self.folder / f"{stage}.weights.h5")
            rundir.atomic_write_json(self.folder / f"{stage}.json", state)


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
    m, t = context.config.model, context.config.train
    base = models.find_base(model)
    ledger = StageLedger(context.run_dir, t.backup)
    state = ledger.done("head", model)
    if state is None:
        log.info("Stage 1: training the head on the frozen base for up to %d epoch(s)", t.head_epochs)
        end, best = fit_frozen(model, pipes, context, epochs=t.head_epochs, stage="head")
        ledger.record("head", model, end=end, best=best)
    else:
        end, best = state["end"], state["best"]
        log.info("Stage 1 (head) finished in an earlier attempt: continuing at epoch %d", end + 1)
    plan = finetune_steps(context.config, base)
    stage2_start, final = end, end + t.epochs
    boundaries = []
    for i, step in enumerate(plan):
        stage = _stage_name(i)
        start = max(end, stage2_start + step.offset)
        stop = stage2_start + plan[i + 1].offset if i + 1 < len(plan) else final
        boundaries.append(start)
        index = compile_finetune_step(model, context, step, rate=step.learning_rate, epochs=stop - start)
        state = ledger.done(stage, model)
        if state is not None:
            end, best = state["end"], state["best"]
            continue
        if start >= stop:
            log.info("Step %s has no epochs left (stage ends at epoch %d): skipped", stage, stop)
            continue
        fit_model, train_ds, val_ds = prefix_stage(model, pipes, context, index)
        rate = step.learning_rate
        if fit_model is not model:
            compile_finetune_step(model, context, step, rate=rate, epochs=stop - start, fit_model=fit_model)
        if rate == AUTO:  # tested on what stage 2 trains: unfrozen, with any base multiplier
            words = fitted(context.config, "finetune")
            rate = fitting.auto_learning_rate(context, fit_model, train_ds, stage=stage, fitted=words, epoch=start)
            compile_finetune_step(model, context, step, rate=rate, epochs=stop - start, fit_model=fit_model)
        log.info(
            "Stage %s: base layers from %s unfrozen, learning rate %g%s, epochs %d to %d",
            stage,
            models.describe_layer(base, index),
            rate,
            f" (base x{m.base_lr_multiplier:g})" if m.base_lr_multiplier else "",
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
    return boundaries
