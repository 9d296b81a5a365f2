"""A run's set-up, shared by `train` and `find-lr`: settings, seed, data, pipelines and the model.

`set_up` does, in this order, what both commands need before their first fit: the checks that
need no data, the user's base, the splits (the `val_` monitor falling back to the training
metric without a validation split), the fit context, the pipelines, and the recipe's model built
in the strategy's scope with the seed set just before its weights are drawn. The model comes
uncompiled: each stage compiles what it fits once its rate is known (`fitting.compile_stage`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models
from kerastune_flow.config import Config, new_seed
from kerastune_flow.errors import DataError
from kerastune_flow.recipes import Recipe, check_image_size, get_recipe
from kerastune_flow.runtime.device import DeviceSettings, device_kind, device_settings
from kerastune_flow.runtime.strategy import (
    broadcast_from_first_replica,
    global_batch_size,
    is_chief,
    is_multi_worker,
)
from kerastune_flow.training import fitting, resume
from kerastune_flow.training.fitting import FitContext
from kerastune_flow.training.guards import InterruptGuard
from kerastune_flow.training.stages import parse_progressive

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSetup:
    """What a run has before its first fit.

    Attributes:
        config: the run's config (seeded, its steps per execution and monitor resolved).
        recipe: the config's recipe.
        splits: the data.
        context: the fit context every stage shares.
        pipes: the pipelines (see `make_pipelines`).
        model: the recipe's model, built in the strategy's scope and not compiled.
    """

    config: Config
    recipe: Recipe
    splits: data_lib.DataSplits
    context: FitContext
    pipes: dict[str, tf.data.Dataset | None]
    model: keras.Model


def set_up(
    config: Config,
    run_dir: Path,
    strategy: tf.distribute.Strategy,
    settings: DeviceSettings,
    guard: InterruptGuard | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> RunSetup:
    """Everything before a run's first fit: checks, data, context, pipelines, the model.

    Args:
        config: the run's config, seeded and with its device's settings (see `run_settings`).
        run_dir: where the fits write.
        strategy: the run's strategy.
        settings: its device's settings.
        guard: the run's `interrupt_guard`, which its fits obey (None: signals act as usual).
        callbacks: Keras callbacks every fit of the run calls after the package's own
            (`FitContext.callbacks`).

    Raises:
        KerastuneFlowError: (a subclass) for the data, the weights or the image size.
    """
    keras.utils.set_random_seed(config.train.seed)
    recipe = get_recipe(config.model.recipe)
    check_before_data(config)
    with strategy.scope():  # the base's variables are the model's: loaded outside, stage 2 could not train them
        base = load_base(config)
    if base is not None:  # the user's base decides the images: its size and channels
        splits = data_lib.load_splits(
            config, image_size=tuple(base.input_shape[1:3]), channels=int(base.input_shape[-1])
        )
    else:
        splits = data_lib.load_splits(config, channels=3 if recipe.transfer else None)
    if splits.sizes["validation"] == 0 and config.train.monitor.startswith("val_"):
        monitor = config.train.monitor.removeprefix("val_")
        log.info("No validation split: early stopping and the best model watch %s instead", monitor)
        config = config.replace(monitor=monitor)
    t = config.train
    context = FitContext(
        config=config,
        run_dir=run_dir,
        strategy=strategy,
        settings=settings,
        steps_per_epoch=fitting.steps_per_epoch(
            splits.sizes["train"], global_batch_size(config.data.batch_size, strategy), settings
        ),
        clock=data_lib.EpochClock(),
        epochs=t.head_epochs + t.epochs if recipe.staged else t.epochs,
        guard=guard,
        callbacks=tuple(callbacks),
        held_out=splits.held_out,
    )
    pipes = make_pipelines(splits, context, recipe.head_spec(splits.num_classes))
    # Again, just before the weights are drawn: reading the data may have drawn from the global
    # generators (tfds preparing a data set does), and the first run must start as every later one.
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        model = build_model(context, input_shape=splits.image_shape, num_classes=splits.num_classes, base=base)
    return RunSetup(config=config, recipe=recipe, splits=splits, context=context, pipes=pipes, model=model)


def load_base(config: Config) -> keras.Model | None:
    """The user's own pre-trained base (`--base PATH --base-output LAYER`), or None."""
    m = config.model
    if not m.base:
        return None
    return models.cut_base(m.base, m.base_output, unsafe_deserialization=m.unsafe_deserialization)


def build_model(
    context: FitContext,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    base: keras.Model | None = None,
) -> keras.Model:
    """Builds the recipe's model, not compiled (call inside `strategy.scope()`).

    For a transfer recipe this is the frozen base (`config.model.backbone`, or `base`: the
    user's own model, see `load_base`) under a new head; a staged recipe's second stage is
    `finetune.fit_staged`. Each stage compiles it (`fitting.compile_stage`) once its rate is known.
    """
    m = context.config.model
    recipe = get_recipe(m.recipe)
    kwargs: dict[str, Any] = dict(
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        kernel_initializer=m.initializer,
        dropout=m.dropout,
        l1=m.l1,
        l2=m.l2,
        compile=False,
    )
    if recipe.transfer:
        kwargs.update(backbone=m.backbone, base=base, weights=m.weights, pooling=m.pooling, dense_units=m.dense_units)
    return recipe.build(**kwargs)


def make_pipelines(
    splits: data_lib.DataSplits, context: FitContext, head: models.HeadSpec
) -> dict[str, tf.data.Dataset | None]:
    """Batched train / validation / test pipelines at the global batch size, and "_ordered"
    variants (no shuffle, no augmentation) for one-pass feature extraction (and "merged_ordered" with
    folds: the merged training and validation examples).

    Raises:
        DataError: when the training split is smaller than one global batch.
    """
    config, settings = context.config, context.settings
    batch = context.global_batch_size
    if splits.sizes["train"] < batch:
        raise DataError(
            f"The training split has {splits.sizes['train']} examples, fewer than one global batch of {batch}; "
            f"lower --batch-size or add data. Received: batch_size={config.data.batch_size}"
        )
    augmenter = data_lib.make_augmenter(config.data.augment, splits.image_shape)
    common = dict(
        batch_size=batch, label_mode=head.label_mode, num_classes=splits.num_classes, autotune=settings.data_autotune
    )
    out: dict[str, tf.data.Dataset | None] = {}
    for name in ("train", "validation", "test"):
        training = name == "train"
        # unshuffled, unaugmented: one pass for feature caching
        out[f"{name}_ordered"] = data_lib.prepare(getattr(splits, name), cache=False, **common)
        out[name] = data_lib.prepare(
            getattr(splits, name),
            training=training,
            cache=data_lib.should_cache(splits.sizes[name], splits.image_shape, config.data.cache, uint8=splits.uint8),
            uint8=splits.uint8,
            augmenter=augmenter if training else None,
            drop_remainder=training and settings.drop_remainder,
            seed=config.train.seed,
            clock=context.clock if training else None,
            epochs=context.epochs,
            # Several workers serialize the pipeline's graph to shard it: no images held in it.
            indexed=not is_multi_worker(context.strategy),
            **common,
        )
    if is_multi_worker(context.strategy):
        # Each worker keeps every n-th example: correct for any source (a folder's file list,
        # tfds shards fewer than workers), where sharding by file can fail or unbalance.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        out = {name: ds.with_options(options) for name, ds in out.items()}
    # With folds, the merged examples in order: a frozen part's output is computed once for all the
    # folds and each fold's rows gathered (`finetune.cached_feature_pipelines`); not for one of several
    # workers, whose pipelines are shards.
    if splits.merged is not None and not is_multi_worker(context.strategy):
        out["merged_ordered"] = data_lib.prepare(splits.merged, cache=False, **common)
    if splits.sizes["validation"] == 0:  # --validation-fraction 0: train on all of train, as some references do
        out["validation"] = out["validation_ordered"] = None
    return out


def check_before_data(config: Config) -> None:
    """Checks what can be checked before reading any data, so a typo costs no waiting.

    Raises:
        ConfigError: for an image size below the model's minimum or a malformed
            `progressive` spec.
    """
    check_image_size(config)
    if get_recipe(config.model.recipe).staged:
        parse_progressive(config.model.progressive)


def run_settings(config: Config, strategy: tf.distribute.Strategy) -> tuple[DeviceSettings, Config]:
    """The device settings of a run of `config` on `strategy` (its flags over the device's and the
    recipe's defaults), and `config` with the steps per execution they resolve."""
    t = config.train
    settings = device_settings(
        device_kind(strategy),
        steps_per_execution=t.steps_per_execution,
        mixed_precision=t.mixed_precision,
        jit_compile=t.jit_compile,
        replicas=strategy.num_replicas_in_sync,
        xla_on_cpu=get_recipe(config.model.recipe).xla_on_cpu,
    )
    return settings, config.replace(steps_per_execution=settings.steps_per_execution)


def with_seed(config: Config, run_dir: str | Path, strategy: tf.distribute.Strategy) -> Config:
    """The config with a seed: its own; else an interrupted run's in `run_dir`, so that the same
    command resumes the same run; else a new one (the same on every worker). It is recorded in
    config.json and results.json, so every run can be replayed."""
    if config.train.seed is not None:
        return config
    recorded = resume.recorded_seed(run_dir) if is_chief(strategy) else None
    seed = broadcast_from_first_replica(strategy, new_seed() if recorded is None else recorded)
    if recorded is None:
        # The seed cuts the folds too: the other folds' runs must be given it, or they cut others.
        folds = " and to every other fold's run: it cuts the folds" if (config.data.folds or 1) > 1 else ""
        log.info("No --seed given: this run's seed is %d (pass --seed %d to repeat it%s)", seed, seed, folds)
    return config.replace(seed=seed)
