"""`find_lr(config, run_dir)`: the learning-rate range test on the fit that matters, as a command.

    kerastune-flow find-lr RECIPE --data DATA [--stage head|finetune] [--run-dir DIR]

It sets the run up as `train` does (strategy, seed, data, pipelines, the model built and
compiled in the strategy's scope), runs `lr_range.range_test` on the stage asked for, and writes
DIR/lr_find.json (the suggestion, its rule, every rule's suggestion, the curve) and
DIR/lr_find.png (the smoothed loss against the rate, the suggestion marked). Nothing is trained
for the head stage; for the fine-tune stage, stage 1 is trained first, as `train` would.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir
from kerastune_flow.config import Config
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import fitted, get_recipe
from kerastune_flow.runtime import process
from kerastune_flow.runtime.device import DeviceSettings, dtype_policy
from kerastune_flow.runtime.strategy import get_strategy, is_chief
from kerastune_flow.training import finetune, fitting, lr_range
from kerastune_flow.training.setup import run_settings, set_up, with_seed
from kerastune_flow.training.stages import FIRST_STAGE, finetune_steps

log = logging.getLogger(__name__)

STAGES = (FIRST_STAGE, "finetune")
# Stage 1 before a fine-tune's range test writes none of a run's files (it is thrown away).
QUIET_STAGE_ONE = dict(checkpoint=False, backup=False, tensorboard=False, csv_log=False, jsonl_log=False)


def find_lr(
    config: Config, run_dir: str | Path, *, stage: str = "head", max_steps: int = lr_range.MAX_STEPS
) -> dict[str, Any]:
    """Runs the range test on one stage of a recipe and writes lr_find.json and lr_find.png.

    Args:
        config: the recipe and its settings, as for `train.train_and_evaluate`.
        run_dir: where the two files go (created if missing).
        stage: "head": the recipe's first fit, that is the model of a from-scratch recipe, or the
            head on the frozen base's cached features of a transfer recipe (the whole model
            when augmentation is on or the cache is off). "finetune": stage 2 of a staged
            recipe, on the model as stage 2 trains it (unfrozen from `unfreeze_at`, with any
            `base_lr_multiplier`), after training stage 1 as `train` would.
        max_steps: the most steps of the range test.

    Returns:
        The record written to lr_find.json, with "json" and "png", the files' paths.

    Raises:
        ConfigError: for a stage the recipe does not have, or `progressive` with the fine-tune
            stage; any `KerastuneFlowError` of `train` for the data, weights or strategy.
    """
    recipe = get_recipe(config.model.recipe)
    if stage not in STAGES:
        raise ConfigError(f"The stage must be one of {', '.join(STAGES)}. Received: stage={stage}")
    if stage == "finetune" and not recipe.staged:
        raise ConfigError(
            f"{recipe.name} trains in one fit, so it has no fine-tune stage; use --stage head, or a staged recipe "
            f"such as vgg16_finetune. Received: stage={stage}"
        )
    if stage == "finetune" and config.model.progressive:
        raise ConfigError(
            "--stage finetune tests one stage-2 rate; --progressive gives each step its own, so leave it out. "
            f"Received: progressive={config.model.progressive}"
        )
    process.prepare_process(config.train.strategy, deterministic=config.train.deterministic)
    strategy = get_strategy(config.train.strategy)
    config = with_seed(config, run_dir, strategy)
    chief = is_chief(strategy)
    if chief:  # a range test goes in a new folder, its own earlier one's, or a run's
        rundir.claim_dir(run_dir, kinds=("lr_find", "run"))
    out_dir = Path(run_dir) if chief else Path(tempfile.mkdtemp(prefix="kerastune_flow_worker_"))
    settings, config = run_settings(config, strategy)
    try:
        with rundir.run_lock(out_dir, take=chief), dtype_policy(settings.dtype_policy):
            record = _find_lr(config, out_dir, strategy, settings, stage, max_steps)
    except tf.errors.InvalidArgumentError as error:  # labels outside the head's classes: a user error
        translated = data_lib.label_range_error(error)
        if translated is None:
            raise
        raise translated from None
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)
    return record


def _find_lr(
    config: Config,
    run_dir: Path,
    strategy: tf.distribute.Strategy,
    settings: DeviceSettings,
    stage: str,
    max_steps: int,
) -> dict[str, Any]:
    run = set_up(config, run_dir, strategy, settings)  # as `train` sets its run up
    config, recipe, splits, context = run.config, run.recipe, run.splits, run.context
    pipes, model = run.pipes, run.model
    t = config.train
    log.info(
        "Range test of %s, stage %s, on %s (%d training examples, global batch %d)",
        f"{recipe.name} on {config.model.base}" if config.model.base else recipe.model_name(config.model.backbone),
        stage,
        splits.source,
        splits.sizes["train"],
        context.global_batch_size,
    )
    epoch = 0
    if stage == FIRST_STAGE:
        # What the first fit trains: the head on cached features, or the whole model.
        fit_model, train_ds, _ = (
            finetune.frozen_stage(model, pipes, context) if recipe.transfer else (model, pipes["train"], None)
        )
        fitting.compile_for(fit_model, context, epochs=t.head_epochs if recipe.staged else t.epochs)
    else:
        with tempfile.TemporaryDirectory(prefix="kerastune_flow_stage1_") as scratch:
            quiet = dataclasses.replace(context, run_dir=Path(scratch), config=config.replace(**QUIET_STAGE_ONE))
            log.info("Stage 1: training the head on the frozen base for up to %d epoch(s) first", t.head_epochs)
            epoch, _ = finetune.fit_frozen(model, pipes, quiet, epochs=t.head_epochs, stage=FIRST_STAGE)
        step = finetune_steps(config, models.find_base(model))[0]
        finetune.compile_finetune_step(model, context, step, rate=step.learning_rate, epochs=t.epochs)
        fit_model, train_ds = model, pipes["train"]
    record = fitting.range_test_record(context, fit_model, train_ds, stage=stage, epoch=epoch, max_steps=max_steps)
    record.update(recipe=config.model.recipe, data=splits.source, seed=config.train.seed, fitted=fitted(config, stage))
    json_path, png_path = fitting.write_range_test(record, run_dir)
    log.info(
        "Suggested learning rate %.3g (rule %s); %s, %s", record["suggestion"], record["rule"], json_path, png_path
    )
    return {**record, "json": str(json_path), "png": str(png_path)}
