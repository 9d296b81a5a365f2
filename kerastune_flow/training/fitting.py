"""One fit of one stage: its compile, its learning rate ("auto" found by a range test), steps per
epoch, callbacks, and the `fit` call.

`compile_for` is the one place training compiles, and `compile_stage` calls it once a stage's rate
is known; the builders' own compile (`models`) is for the public API, and training builds its
models uncompiled (`setup.build_model`). Both `train.py` (single-stage recipes) and `finetune.py`
(the frozen stage and the staged fine-tune) fit through here, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import models, rundir
from kerastune_flow.config import AUTO, Config
from kerastune_flow.data.pipeline import EpochClock
from kerastune_flow.recipes import fitted, get_recipe
from kerastune_flow.reports import plots
from kerastune_flow.runtime.device import DeviceSettings
from kerastune_flow.runtime.strategy import global_batch_size
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import lr_range, resume
from kerastune_flow.training.guards import InterruptGuard

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitContext:
    """What every fit of a run shares.

    Attributes:
        config: the run's settings (with the device's steps per execution filled in).
        run_dir: where the callbacks write.
        strategy: the strategy whose scope builds and compiles.
        settings: the device's settings (XLA, static batches, steps per execution).
        steps_per_epoch: training steps in one epoch at the global batch size.
        clock: the epoch clock the training pipelines read (see `data.EpochClock`).
        epochs: the most epochs the run has (all stages), which the pipelines are built for.
        guard: the run's `interrupt_guard`: SIGINT / SIGTERM end a fit at the next batch.
        callbacks: more Keras callbacks for every fit of the run (the user's own, and the
            tracker's), called after the package's own (`stage_callbacks`); never in a range
            test's fits. Not part of the config: nothing saves them.
        held_out: with cross-validation folds, which of the merged examples the validation fold
            holds (`data.DataSplits.held_out`), for caches computed once for all folds; else None.
    """

    config: Config
    run_dir: Path
    strategy: tf.distribute.Strategy
    settings: DeviceSettings
    steps_per_epoch: int
    clock: EpochClock
    epochs: int
    guard: InterruptGuard | None = None
    callbacks: tuple[keras.callbacks.Callback, ...] = ()
    held_out: np.ndarray | None = None

    @property
    def global_batch_size(self) -> int:
        return global_batch_size(self.config.data.batch_size, self.strategy)

    def cache_reads(self) -> dict[str, Any] | None:
        """What decides which examples the run's ordered pipelines yield, in which batches
        (`caches.key`): the data settings but the fold held out (every fold reads the same merged
        examples), the seed (it cuts the validation split and the folds, and seeds augmented views)
        and the global batch. None with `feature_cache="disk"`: such a run keeps its caches in its
        own directory and reads none kept in memory (`caches.shared`)."""
        if self.config.model.feature_cache == "disk":
            return None
        data = {k: v for k, v in dataclasses.asdict(self.config.data).items() if k != "fold"}
        return {"data": data, "seed": self.config.train.seed, "batch": self.global_batch_size}


def steps_per_epoch(num_train: int, batch_size: int, settings: DeviceSettings) -> int:
    """Training steps in one epoch of `num_train` examples at the global `batch_size` (a partial
    last batch counts, unless the device drops it)."""
    return num_train // batch_size if settings.drop_remainder else -(-num_train // batch_size)


# What a model is compiled at for a range test when its rate is "auto": no step ever runs at it, since the
# test runs on its own copy of the optimizer and `compile_stage` compiles again at the rate found.
AUTO_PLACEHOLDER_RATE = 1e-3


def compile_for(
    model: keras.Model,
    context: FitContext,
    *,
    epochs: int,
    learning_rate: float | str | None = None,
    base: keras.Model | None = None,
) -> keras.Model:
    """Compiles `model` for a fit of `epochs` epochs at `learning_rate`: the one place training compiles.

    The loss follows from the recipe's head on the model's output; the optimizer, XLA and steps
    per execution from the run's settings; with `lr_schedule="cosine"` the rate decays to 0 over
    the fit (a CosineDecay). Call it after the rate is known and `trainable` is set: both only
    take effect at compile time.

    Args:
        model: the model the fit trains (or the full model that shares its layers).
        context: the run's fit context.
        learning_rate: the rate; None: the config's `learning_rate` (the first stage's); "auto":
            `AUTO_PLACEHOLDER_RATE`, for a range test (see `compile_stage`).
        epochs: the fit's epochs, over which a cosine schedule decays.
        base: the pre-trained base, whose trainable variables train at `learning_rate` x
            `base_lr_multiplier` when that is set (discriminative rates, stage 2).

    Returns:
        The model, compiled.
    """
    m = context.config.model
    rate: Any = m.learning_rate if learning_rate is None else learning_rate
    rate = AUTO_PLACEHOLDER_RATE if rate == AUTO else float(rate)
    if m.lr_schedule == "cosine" and context.steps_per_epoch:
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, epochs * context.steps_per_epoch))
    discriminative = base is not None and m.base_lr_multiplier is not None
    with context.strategy.scope():  # a model compiled in the scope fits in it (its optimizer's variables too)
        return models.compile_model(
            model,
            get_recipe(m.recipe).head_spec(max(2, model.output_shape[-1])),  # 1 sigmoid unit: two classes
            optimizer=m.optimizer,
            learning_rate=rate,
            jit_compile=context.settings.jit_compile,
            steps_per_execution=context.config.train.steps_per_execution,
            base_variables=base.trainable_variables if discriminative else None,
            base_multiplier=m.base_lr_multiplier if discriminative else None,
        )


def compile_stage(
    fit_model: keras.Model,
    train_ds: tf.data.Dataset,
    context: FitContext,
    *,
    stage: str,
    epochs: int,
    learning_rate: float | str | None = None,
    epoch: int = 0,
    full_model: keras.Model | None = None,
    base: keras.Model | None = None,
) -> float:
    """Compiles what a stage fits once its rate is known; returns the rate.

    For "auto" the rate is found first by a range test on `fit_model` (`auto_learning_rate`),
    which needs a compiled model (its loss, its optimizer's class): so it is compiled at
    `AUTO_PLACEHOLDER_RATE` for the test, then at the rate found.

    Args:
        fit_model: what the stage fits (the head alone on cached features, or the whole model).
        train_ds: the stage's training pipeline (what a range test reads).
        context: the run's fit context.
        stage: "head" for the first fit of a run, "finetune" (or "finetune_N") for stage 2.
        learning_rate: the rate, or "auto"; None: the config's `learning_rate` (the first stage's).
        epochs: the stage's epochs.
        epoch: the stage's first epoch, whose data a range test reads.
        full_model: the model that shares `fit_model`'s layers, when the stage fits a part of it:
            compiled the same way, for its checkpoint and the evaluation at the end.
        base: the pre-trained base, for discriminative rates (see `compile_for`).
    """
    if learning_rate is None:
        learning_rate = context.config.model.learning_rate
    if learning_rate == AUTO:
        compile_for(fit_model, context, learning_rate=AUTO, epochs=epochs, base=base)
        words = fitted(context.config, "finetune" if stage.startswith("finetune") else "head")
        learning_rate = auto_learning_rate(context, fit_model, train_ds, stage=stage, fitted=words, epoch=epoch)
    for model in {id(m): m for m in (fit_model, full_model) if m is not None}.values():
        compile_for(model, context, learning_rate=float(learning_rate), epochs=epochs, base=base)
    return float(learning_rate)


def auto_learning_rate(
    context: FitContext, model: keras.Model, train_ds: tf.data.Dataset, *, stage: str, fitted: str, epoch: int = 0
) -> float:
    """The rate that "auto" stands for in the fit about to start: a range test (`lr_range`) on
    `model`, compiled as the fit will be, with the data and dropout of the fit's first epoch.

    The test's record goes to lr_find.json and lr_find.png in the run directory (for stage 2,
    lr_find_finetune.*) and the rate also into the resume state (`resume.record_learning_rate`),
    so that a resumed run takes the rate its first attempt found instead of testing again on
    other weights.

    Args:
        context: the run's fit context.
        model: the model the fit trains (the head alone on cached features), compiled.
        train_ds: the fit's training pipeline.
        stage: "head" for the first fit of a run, "finetune" for stage 2.
        fitted: what the fit trains, in words (`recipes.fitted`): the record's "fitted", its plot's title.
        epoch: the fit's first epoch, whose data the test reads.

    Returns:
        The rate found (or recorded).
    """
    recorded = resume.found_learning_rates(context.run_dir)
    if stage in recorded:
        log.info("learning rate auto: %.3g, found by the interrupted run (%s)", recorded[stage], stage)
        return recorded[stage]
    record = {**range_test_record(context, model, train_ds, stage=stage, epoch=epoch), "fitted": fitted}
    write_range_test(record, context.run_dir, stage=stage)
    resume.record_learning_rate(context.run_dir, stage, record["suggestion"])
    log.info(
        "learning rate auto: %.3g (rule %s, %d range-test steps; %s)",
        record["suggestion"],
        record["rule"],
        record["steps"],
        rundir.lr_find_paths(context.run_dir, stage)[0].name,
    )
    return record["suggestion"]


def range_test_record(
    context: FitContext,
    model: keras.Model,
    train_ds: tf.data.Dataset,
    *,
    stage: str,
    epoch: int = 0,
    max_steps: int = lr_range.MAX_STEPS,
) -> dict[str, Any]:
    """A range test of at most `max_steps` on `model` and `train_ds` with the data order,
    augmentation and dropout of `epoch` (so the same seed gives the same curve however the run got
    there); returns its record (`lr_range.RangeTest.record`) with the stage and the global batch."""
    seeds = cb.EpochSeeds(context.clock)
    seeds.set_model(model)
    seeds.on_epoch_begin(epoch)
    test = lr_range.range_test(model, train_ds, max_steps=max_steps)
    return {**test.record(), "stage": stage, "global_batch_size": context.global_batch_size}


def write_range_test(record: dict[str, Any], run_dir: str | Path, *, stage: str | None = None) -> tuple[Path, Path]:
    """Writes a range test's record and plot (see `rundir.lr_find_paths`); returns their paths."""
    json_path, png_path = rundir.lr_find_paths(run_dir, stage)
    rundir.atomic_write_json(json_path, record)
    plots.plot_lr_find(record).savefig(png_path)  # titled by what was fitted (plots.lr_find_title)
    return json_path, png_path


MIN_PATIENCE = 3


def patience(config: Config, epochs: int) -> int:
    """Early stopping's patience for a fit of `epochs` epochs: the config's, or half of them, at
    least `MIN_PATIENCE`. A fixed 3 stopped the reference MLP at epoch 6 of 10 and kept epoch 3,
    still underfit, on one CPU (issue 16); half the epochs lets a short run reach its best."""
    if config.train.patience is not None:
        return config.train.patience
    return max(MIN_PATIENCE, epochs // 2)


def stage_callbacks(
    context: FitContext,
    *,
    epochs: int,
    stage: str | None = None,
    best: float | None = None,
    save_model: keras.Model | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one stage (a fit of `epochs` epochs): the standard ones, as the config
    switches them, then `context.callbacks`.

    The order is the package's own (ending with `resume.RunBackup`: an epoch is in history.jsonl,
    model.keras and the backup before anything after it sees the epoch end), then
    `context.callbacks` in their order; `fit` adds the progress bar last.
    """
    t = context.config.train
    standard = cb.standard_callbacks(
        context.run_dir,
        stage=stage,
        monitor=t.monitor,
        csv_log=t.csv_log,
        jsonl_log=t.jsonl_log,
        tensorboard=t.tensorboard,
        early_stopping=t.early_stopping,
        patience=patience(context.config, epochs),
        checkpoint=t.checkpoint,
        backup=t.backup,
        terminate_on_nan=t.terminate_on_nan,
        best=best,
        save_model=save_model,
        clock=context.clock,
        guard=context.guard,
    )
    return [*standard, *context.callbacks]


def best_so_far(callbacks: list[keras.callbacks.Callback]) -> float | None:
    """The best monitored value the stage's checkpoint reached, to hand on to the next stage."""
    for callback in callbacks:
        if isinstance(callback, cb.BestModelCheckpoint):
            return callback.best
    return None


def epoch_steps(train_ds: tf.data.Dataset) -> int | None:
    """The `steps_per_epoch` to hand `model.fit` for a training pipeline: its batches, when known.

    Keras counts them itself, but without them it makes two iterators an epoch and throws one
    away (keras/src/trainers/epoch_iterator.py, `_enumerate_iterator`, Keras 3.15), each paying
    the pipeline's start again (its functions instantiated anew: a few ms apiece); with them, the
    iterator made as an epoch ends serves the next one (the epoch clock is read at its first
    batch, after the next epoch began).
    """
    steps = int(train_ds.cardinality())
    return steps if steps > 0 else None


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    context: FitContext,
    callbacks: list[keras.callbacks.Callback],
    *,
    epochs: int,
    initial_epoch: int = 0,
) -> int:
    """`model.fit` with the package's progress bar, continuing from the stage's backup if there
    is one; returns the epoch the fit ended at (`epochs`, or earlier when early stopping
    stopped it).

    A backup (`resume.RunBackup` among the callbacks) is read before `fit` starts: the model
    gets its weights and optimizer state back and the fit continues at the epoch after the last
    one saved. A fit that had already ended (early stopping stopped it, or every epoch was done)
    is not started again: the best weights are put back as early stopping would have.
    """
    backup = next((c for c in callbacks if isinstance(c, resume.RunBackup)), None)
    with context.strategy.scope():  # the optimizer's variables are built here when it has none yet
        saved = backup.restore(model) if backup is not None else None
    if saved is not None:
        initial_epoch = max(initial_epoch, saved)
        stopper = next((c for c in callbacks if isinstance(c, cb.EarlyStopping)), None)
        backup.apply_states()
        if initial_epoch >= epochs or (stopper is not None and stopper.stopped):
            if stopper is not None and stopper.restore_best_weights and stopper.best_weights is not None:
                model.set_weights(stopper.best_weights)
            return stopper.stopped_epoch + 1 if stopper is not None and stopper.stopped else initial_epoch
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=epoch_steps(train_ds),
        callbacks=[*callbacks, cb.ProgressBar()],  # Keras' bar, counting the steps run (verbose only)
        verbose=context.config.train.verbose,
        shuffle=False,  # the pipeline shuffles; Keras would only warn that it cannot
    )
    return (history.epoch[-1] + 1) if history.epoch else epochs
