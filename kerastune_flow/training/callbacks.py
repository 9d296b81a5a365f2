"""The standard callback set of a run directory.

    callbacks = standard_callbacks(run_dir)
    model.fit(train, validation_data=val, epochs=10, callbacks=callbacks)

writes, in `run_dir`:
    history.csv, history.jsonl   one row / one JSON object per epoch: metrics, lr, wall time
    model.keras                  the best model so far (by `monitor`), replaced atomically
    tensorboard/                 TensorBoard event files
    backup/                      the resume state (`resume.RunBackup`): the same command continues exactly
Every file is replaced atomically (see `rundir.atomic_file`), so a kill at any moment leaves the
previous complete version, never a truncated one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerastune_flow import rundir
from kerastune_flow.training import guards, resume

# The guards, also reached from here: the standard set puts them in, and callers know them here.
from kerastune_flow.training.guards import DiskSpaceGuard as DiskSpaceGuard
from kerastune_flow.training.guards import NaNGuard as NaNGuard
from kerastune_flow.training.guards import interrupt_guard as interrupt_guard

log = logging.getLogger(__name__)


def current_learning_rate(model: keras.Model) -> float | None:
    """The optimizer's learning rate now (schedules evaluated at the current step)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    lr = optimizer.learning_rate
    if callable(lr):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


# --------------------------------------------------------------------------- callbacks


class HistoryLogger(keras.callbacks.Callback):
    """Appends one row per epoch to history.csv and one JSON object to history.jsonl.

    Each record holds the epoch, every metric, the learning rate, the epoch's wall time and the
    time since the run started, plus `stage` when given (the staged fine-tune logs two stages
    into one continuous history). On the first epoch of a `fit` it drops records of that epoch
    and later ones, so a resumed run does not log an epoch twice.

    Args:
        run_dir: where the two files live.
        stage: a label written into every record (e.g. "head", "finetune"), or None.
        csv_log: write history.csv.
        jsonl_log: write history.jsonl.
    """

    def __init__(self, run_dir: str | os.PathLike, *, stage: str | None = None, csv_log=True, jsonl_log=True):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.csv_log = csv_log
        self.jsonl_log = jsonl_log
        self._epoch_start = 0.0
        self._first_epoch_seen = False

    def on_train_begin(self, logs=None):
        self._first_epoch_seen = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            self._truncate(epoch)
        self._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        record: dict[str, Any] = {"epoch": epoch}
        if self.stage is not None:
            record["stage"] = self.stage
        record.update({k: float(v) for k, v in (logs or {}).items()})
        lr = current_learning_rate(self.model)
        if lr is not None:
            record.setdefault("learning_rate", lr)
        record["epoch_seconds"] = round(time.time() - self._epoch_start, 4)
        record["wall_time"] = round(time.time(), 3)
        records = self._read() + [record]
        self._write(records)

    def _read(self) -> list[dict[str, Any]]:
        return rundir.read_history(self.run_dir)

    def _truncate(self, epoch: int) -> None:
        records = self._read()
        kept = [r for r in records if r["epoch"] < epoch]
        if len(kept) != len(records):
            log.info("Dropping %d logged epoch(s) >= %d that a resume repeats", len(records) - len(kept), epoch)
            self._write(kept)

    def _write(self, records: list[dict[str, Any]]) -> None:
        rundir.write_history(self.run_dir, records, csv_log=self.csv_log, jsonl_log=self.jsonl_log)


class BestModelCheckpoint(keras.callbacks.Callback):
    """Saves the model to `filepath` whenever `monitor` improves, atomically.

    Unlike `keras.callbacks.ModelCheckpoint`, the file is written beside and renamed, so a kill
    during the save leaves the previous best model intact.

    Args:
        filepath: the `.keras` file.
        monitor: a log key such as "val_loss" or "val_accuracy".
        mode: "min", "max", or "auto" (max for accuracy-like keys).
        best: the best value already reached (when continuing a run), or None.
        save_model: the model to save instead of the one being fitted (when a head is trained
            on cached features, the full model that shares its layers is what is worth saving).
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        *,
        monitor: str = "val_loss",
        mode: str = "auto",
        best=None,
        save_model: keras.Model | None = None,
    ):
        super().__init__()
        self.filepath = Path(filepath)
        self.save_model = save_model
        self.monitor = monitor
        if mode == "auto":
            mode = "max" if ("acc" in monitor or "auc" in monitor) else "min"
        self.mode = mode
        self.best = best
        self.best_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def get_state(self, weights_file) -> dict[str, Any]:
        """The best value and epoch so far, for `resume.RunBackup`."""
        return {"best": self.best, "best_epoch": self.best_epoch}

    def set_state(self, state: dict[str, Any], load_weights) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            log.warning("BestModelCheckpoint: %r is not among the logs %s", self.monitor, sorted(logs or {}))
            return
        value = float(value)
        if math.isfinite(value) and self._improved(value):
            self.best, self.best_epoch = value, epoch
            rundir.atomic_save_model(self.save_model or self.model, self.filepath)


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping, with a state a resumed fit takes back (`resume.RunBackup`): the best
    value and epoch, the epochs waited, whether it has stopped, and the best weights."""

    def get_state(self, weights_file) -> dict[str, Any]:
        # The best weights are the backup's weights of the best epoch, which it keeps for this.
        keep = self.restore_best_weights and self.best_weights is not None
        best_file = weights_file(self.best_epoch + 1) if keep else None
        return {
            "wait": self.wait,
            "best": None if self.best is None else float(self.best),
            "best_epoch": self.best_epoch,
            "stopped_epoch": self.stopped_epoch,
            "best_weights_file": best_file,
        }

    def set_state(self, state: dict[str, Any], load_weights) -> None:
        self.wait, self.best = state["wait"], state["best"]
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]
        if state["best_weights_file"]:
            self.best_weights = load_weights(state["best_weights_file"])

    @property
    def stopped(self) -> bool:
        """True once it has stopped the fit (then a resumed fit has nothing left to train)."""
        return self.stopped_epoch > 0


class EpochSeeds(keras.callbacks.Callback):
    """Makes an epoch's randomness a function of (seed, epoch) alone, when the epoch begins.

    It sets the run's epoch clock, which the training pipeline reads to order and augment the
    epoch (see `data.EpochClock`), and moves every random layer's seed (Dropout) to a point that
    depends on the epoch only: Keras saves no seed state with the weights, so a resumed fit
    would otherwise draw the masks of epoch 0 again.

    Args:
        clock: the run's `data.EpochClock`, or None for a pipeline without one.
    """

    STRIDE = 1 << 24  # random draws per epoch and layer before two epochs could overlap

    def __init__(self, clock=None):
        super().__init__()
        self.clock = clock

    def on_epoch_begin(self, epoch, logs=None):
        if self.clock is not None:
            self.clock.set(epoch)
        for layer in self.model._flatten_layers(include_self=True, recursive=True):
            for generator in getattr(layer, "_seed_generators", ()):
                state = keras.ops.convert_to_numpy(generator.state)
                generator.state.assign(np.array([state[0], epoch * self.STRIDE], dtype=state.dtype))


class ProgressBar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, counting the training steps actually run.

    With steps_per_execution > 1, Keras 3.15 reports the last step of a group even when the
    epoch ends inside it, so an epoch of 23 steps run 16 at a time shows "32/23", and a data set
    of unknown length keeps the overshoot as its step count (keras-team/keras#20861). This bar
    counts training steps by the optimizer's iterations and keeps evaluation steps within the
    epoch. Given to `fit` among the callbacks, it replaces Keras' default bar.
    """

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._first_iteration = self._iterations()

    def _iterations(self) -> int | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        try:  # a MirroredVariable under tf.distribute: read through a tensor
            return int(keras.ops.convert_to_numpy(optimizer.iterations))
        except (TypeError, ValueError):
            return None

    def _clamped(self, batch: int) -> int:
        return batch if self.target is None else min(batch, self.target - 1)

    def on_train_batch_end(self, batch, logs=None):
        first = getattr(self, "_first_iteration", None)
        # verbose=0 shows nothing: no need to read the step count back from the device
        now = self._iterations() if first is not None and self.verbose else None
        super().on_train_batch_end(self._clamped(batch if now is None else now - first - 1), logs)

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(self._clamped(batch), logs)

    def on_predict_batch_end(self, batch, logs=None):
        super().on_predict_batch_end(self._clamped(batch), logs)


def standard_callbacks(
    run_dir: str | os.PathLike,
    *,
    stage: str | None = None,
    monitor: str = "val_loss",
    csv_log: bool = True,
    jsonl_log: bool = True,
    tensorboard: bool = True,
    early_stopping: bool = True,
    patience: int = 3,
    checkpoint: bool = True,
    backup: bool = True,
    terminate_on_nan: bool = True,
    best: float | None = None,
    save_model: keras.Model | None = None,
    clock=None,
    guard: guards.InterruptGuard | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of a run directory; each can be switched off.

    Order matters: DiskSpaceGuard comes before every writer, so a full disk stops the epoch
    before any file is touched; RunBackup comes last, so that an epoch is marked done in the
    backup only after its log records and best model are written.

    Args:
        run_dir: the run directory (created if missing).
        stage: a label for the loggers and a sub-folder for the backup (staged fine-tune).
        monitor: the metric that early stopping and the best-model checkpoint watch.
        csv_log: history.csv.
        jsonl_log: history.jsonl.
        tensorboard: TensorBoard event files under tensorboard/.
        early_stopping: stop after `patience` epochs without improvement and restore the best
            weights.
        patience: epochs without improvement before stopping.
        checkpoint: model.keras, the best model so far.
        backup: `resume.RunBackup` under backup/, so the same command resumes after a crash
            (call its `restore` before `fit`, as `fitting.fit` does).
        terminate_on_nan: stop on a NaN or infinite loss.
        best: best monitored value reached by an earlier stage, so the checkpoint keeps it.
        save_model: the model the checkpoint saves, if not the one being fitted.
        clock: the run's `data.EpochClock` (see `EpochSeeds`), or None.
        guard: the `interrupt_guard` of the run, which ends the fit at the next batch on SIGINT / SIGTERM.

    Returns:
        A list of callbacks for `model.fit`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[keras.callbacks.Callback] = [EpochSeeds(clock)]
    stateful: dict[str, Any] = {}
    if guard is not None:
        callbacks.append(guard)
    if terminate_on_nan:
        callbacks.append(NaNGuard())
    if checkpoint or backup:
        callbacks.append(DiskSpaceGuard(run_dir, save_model=save_model))
    if csv_log or jsonl_log:
        callbacks.append(HistoryLogger(run_dir, stage=stage, csv_log=csv_log, jsonl_log=jsonl_log))
    if checkpoint:
        stateful["checkpoint"] = BestModelCheckpoint(
            run_dir / rundir.BEST_MODEL, monitor=monitor, best=best, save_model=save_model
        )
        callbacks.append(stateful["checkpoint"])
    if early_stopping:
        stateful["early_stopping"] = EarlyStopping(
            monitor=monitor, patience=patience, restore_best_weights=True, verbose=1
        )
        callbacks.append(stateful["early_stopping"])
    if tensorboard:
        callbacks.append(
            keras.callbacks.TensorBoard(str(run_dir / rundir.TENSORBOARD_DIR), write_graph=False, profile_batch=0)
        )
    if backup:
        callbacks.append(resume.RunBackup(resume.fit_folder(run_dir, stage), stateful))
    return callbacks
