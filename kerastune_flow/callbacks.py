"""The standard callback set of a run directory, and the atomic writers it relies on.

    callbacks = standard_callbacks(run_dir)
    model.fit(train, validation_data=val, epochs=10, callbacks=callbacks)

writes, in `run_dir`:
    history.csv, history.jsonl   one row / one JSON object per epoch: metrics, lr, wall time
    model.keras                  the best model so far (by `monitor`), replaced atomically
    tensorboard/                 TensorBoard event files
    backup/                      BackupAndRestore state, so the same command resumes after a crash
Every file is replaced atomically (written beside, then renamed), so a kill at any moment leaves
the previous complete version, never a truncated one.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerastune_flow.errors import KerastuneFlowError, RunDirError, RunInterrupted, TrainingDivergedError

log = logging.getLogger(__name__)

BEST_MODEL = "model.keras"
HISTORY_CSV = "history.csv"
HISTORY_JSONL = "history.jsonl"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tensorboard"
BACKUP_WEIGHTS = "latest.weights.h5"  # what keras.callbacks.BackupAndRestore writes in its folder


# --------------------------------------------------------------------------- atomic writes


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError or TensorFlow error that says the disk (or quota) is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in DISK_FULL_TEXTS)


def _free_space(folder: Path) -> str:
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"
    unit = "bytes"
    for unit in ("bytes", "KB", "MB", "GB"):
        if free < 1024 or unit == "GB":
            break
        free /= 1024
    return f"{free:,.0f} {unit}" if unit == "bytes" else f"{free:,.1f} {unit}"


def write_error(folder: str | os.PathLike, name: str, error: BaseException) -> RunDirError:
    """The RunDirError for a file `name` in `folder` that could not be written.

    Args:
        folder: the folder written to (its disk is named in the message).
        name: the file, or words such as "a checkpoint".
        error: the OSError or TensorFlow error raised.
    """
    folder = Path(folder)
    received = " ".join(str(error).split())[:160]
    if is_disk_full(error):
        return RunDirError(
            f"The disk holding {folder} is full ({_free_space(folder)} free), so {name} could not be written and "
            f"the files written before are kept; free some space or choose a --run-dir on another disk, then run "
            f"the same command to resume. Received: {received}"
        )
    reason = getattr(error, "strerror", None) or received
    return RunDirError(
        f"Cannot write {name} in {folder} ({reason}), so the files written before are kept; make the run "
        f"directory writable or choose another --run-dir. Received: {received}"
    )


@contextlib.contextmanager
def _writing(path: str | os.PathLike):
    """Turns an OSError while writing `path` into a RunDirError that says what to do."""
    try:
        yield
    except KerastuneFlowError:
        raise
    except OSError as error:
        path = Path(path)
        raise write_error(path.parent, path.name, error) from None


def _atomic_target(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
    return path, tmp


def _commit(tmp: str, path: Path) -> None:
    with _writing(path):
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes text so that readers see the old file or the new one, never a partial one.

    Raises:
        RunDirError: when the file cannot be written (a full disk, no permission); the old
            file is then untouched.
    """
    path, tmp = _atomic_target(path)
    try:
        with _writing(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write_text` of indented JSON."""
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")


def atomic_save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save` to a temporary `.keras` file, then rename over `path`.

    Raises:
        RunDirError: when the file cannot be written (a full disk, no permission); the
            previous model at `path` is then untouched.
    """
    path, tmp = _atomic_target(path)
    try:
        with _writing(path):
            model.save(tmp)
        _commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_jsonable(value: Any) -> Any:
    """Converts numpy scalars and arrays, tuples and paths into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    # Through to_jsonable again, so that a numpy NaN becomes None like a Python one.
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def current_learning_rate(model: keras.Model) -> float | None:
    """The optimizer's learning rate now (schedules evaluated at the current step)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    lr = optimizer.learning_rate
    if callable(lr):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


def _h5_readable(path: Path) -> bool:
    """True when every dataset of an HDF5 file reads back."""

    def read(name, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]
        return None  # visititems stops at the first value that is not None

    try:
        import h5py

        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception:  # OSError for a truncated file, KeyError / ValueError for a damaged one
        return False
    return True


def discard_damaged_backup(backup_dir: str | os.PathLike) -> bool:
    """Removes a BackupAndRestore folder whose weights cannot be read back and that holds no
    readable previous copy, so that the same command starts that fit over instead of failing.

    That happens when the disk filled up, or the process was killed, while the first backup
    was written. With a readable previous copy (`.bkp`), BackupAndRestore falls back to it.

    Returns:
        True when the folder was removed.
    """
    weights = Path(backup_dir) / BACKUP_WEIGHTS
    if not weights.exists() or _h5_readable(weights):
        return False
    previous = weights.with_name(weights.name + ".bkp")
    if previous.exists() and _h5_readable(previous):
        return False
    log.warning(
        "The backup in %s cannot be read (was the disk full, or the run killed, while it was written?); "
        "this fit starts over",
        backup_dir,
    )
    shutil.rmtree(backup_dir, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- callbacks


class HistoryLogger(keras.callbacks.Callback):
    """Appends one row per epoch to history.csv and one JSON object to history.jsonl.

    Each record holds the epoch, every metric, the learning rate, the epoch's wall time and the
    time since the run started, plus `stage` when given (the staged fine-tune logs two stages
    into one continuous history). On the first epoch of a `fit` it drops records of that epoch
    and later ones, so a run resumed by BackupAndRestore does not log an epoch twice.

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

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / HISTORY_JSONL

    @property
    def csv_path(self) -> Path:
        return self.run_dir / HISTORY_CSV

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
        # Without history.jsonl, read history.csv back: otherwise csv-only logging keeps one row.
        if self.jsonl_log:
            return read_history(self.run_dir)
        return _read_csv_history(self.csv_path)

    def _truncate(self, epoch: int) -> None:
        records = self._read()
        kept = [r for r in records if r["epoch"] < epoch]
        if len(kept) != len(records):
            log.info("Dropping %d logged epoch(s) >= %d that a resume repeats", len(records) - len(kept), epoch)
            self._write(kept)

    def _write(self, records: list[dict[str, Any]]) -> None:
        if self.jsonl_log:
            atomic_write_text(self.jsonl_path, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
        if self.csv_log:
            atomic_write_text(self.csv_path, records_to_csv(records))


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads history.jsonl (one dict per epoch), or [] when there is none yet."""
    path = Path(run_dir) / HISTORY_JSONL
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_csv_history(path: Path) -> list[dict[str, Any]]:
    """Reads history.csv back into records: empty cells dropped, numbers parsed."""
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _parse_cell(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """CSV text with the union of keys as header, in first-seen order."""
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


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

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            log.warning("BestModelCheckpoint: %r is not among the logs %s", self.monitor, sorted(logs or {}))
            return
        value = float(value)
        if math.isfinite(value) and self._improved(value):
            self.best, self.best_epoch = value, epoch
            atomic_save_model(self.save_model or self.model, self.filepath)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first NaN or infinite loss with a TrainingDivergedError naming where.

    It raises instead of setting `stop_training`, so no later callback runs on bad weights: the
    best model and the last backup stay those of the last good epoch (Keras'
    `TerminateOnNaN(raise_error=True)` does the same, with a bare RuntimeError).
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            # With steps_per_execution > 1 Keras reports once per group of steps, at its last.
            group = int(getattr(self.model, "steps_per_execution", 1) or 1)
            last = min(batch + 1, (self.params or {}).get("steps") or batch + 1)
            where = f"batch {last}" if group == 1 else f"batches {max(1, batch + 2 - group)}-{last}"
            raise TrainingDivergedError(
                f"The loss became {float(loss)} at epoch {self._epoch + 1}, {where}; the last good "
                "model and backup are kept in the run directory; lower --learning-rate or add --l2. "
                f"Received: loss={float(loss)}"
            )


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


DISK_MARGIN_BYTES = 1024**2


def state_bytes(model: keras.Model) -> int:
    """Bytes of a model's weights and its optimizer's variables: about one checkpoint."""
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        variables += list(optimizer.variables)
    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize for v in variables)


class DiskSpaceGuard(keras.callbacks.Callback):
    """Stops with a RunDirError before an epoch's files are written when the disk cannot hold
    them: the best model (written beside, then renamed) and the backup, twice the model's state.

    Writing into a full disk fails half-way (and HDF5 then reports the file it cannot close
    as a traceback); stopping first keeps every file as it was, and the same command resumes
    at this epoch once there is room.

    Args:
        run_dir: the folder written to.
        save_model: the model the checkpoint saves, if not the one being fitted.
    """

    def __init__(self, run_dir: str | os.PathLike, *, save_model: keras.Model | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.save_model = save_model
        self.needed = DISK_MARGIN_BYTES

    def on_epoch_end(self, epoch, logs=None):
        # Measured now, not at train begin: the optimizer creates its variables on the first step.
        self.needed = 2 * state_bytes(self.save_model or self.model) + DISK_MARGIN_BYTES
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            return  # cannot tell: the writers say so if they fail
        if free < self.needed:
            raise RunDirError(
                f"The disk holding {self.run_dir} is full ({_free_space(self.run_dir)} free, one epoch's checkpoints "
                f"need {self.needed / 1024**2:,.1f} MB), so epoch {epoch + 1} is not saved and the files written "
                f"before are kept; free some space or choose a --run-dir on another disk, then run the same "
                f"command to resume. Received: free_bytes={free}"
            )


class InterruptGuard(keras.callbacks.Callback):
    """Ends `fit` at the next batch boundary once a stop was requested (see `interrupt_guard`).

    It raises instead of setting `stop_training`, so the half-done epoch is neither logged nor
    backed up: the backup stays at the last finished epoch, where the same command resumes.
    """

    def __init__(self):
        super().__init__()
        self.signal_name: str | None = None

    def on_train_batch_end(self, batch, logs=None):
        if self.signal_name:
            raise RunInterrupted(self.signal_name)


_ACTIVE_GUARD: contextvars.ContextVar[InterruptGuard | None] = contextvars.ContextVar("guard", default=None)


@contextlib.contextmanager
def interrupt_guard(signals=(signal.SIGINT, signal.SIGTERM)):
    """Turns SIGINT / SIGTERM into "stop after the current batch" for every `standard_callbacks`
    set made inside the block; a second signal stops at once. Handlers are restored on exit.
    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    guard = InterruptGuard()
    token = _ACTIVE_GUARD.set(guard)
    previous = {}

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if guard.signal_name is not None:
            raise RunInterrupted(name)
        guard.signal_name = name
        log.warning("%s received: stopping after the current batch (send it again to stop at once)", name)

    try:
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                previous[sig] = signal.signal(sig, handler)
        yield guard
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _ACTIVE_GUARD.reset(token)


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
) -> list[keras.callbacks.Callback]:
    """The callbacks of a run directory; each can be switched off.

    Order matters: DiskSpaceGuard comes before every writer, so a full disk stops the epoch
    before any file is touched; BackupAndRestore comes last, so that an epoch is marked done in
    the backup only after its log records and best model are written.

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
        backup: BackupAndRestore under backup/, so the same command resumes after a crash.
        terminate_on_nan: stop on a NaN or infinite loss.
        best: best monitored value reached by an earlier stage, so the checkpoint keeps it.
        save_model: the model the checkpoint saves, if not the one being fitted.

    Returns:
        A list of callbacks for `model.fit`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[keras.callbacks.Callback] = []
    guard = _ACTIVE_GUARD.get()
    if guard is not None:
        callbacks.append(guard)
    if terminate_on_nan:
        callbacks.append(NaNGuard())
    if checkpoint or backup:
        callbacks.append(DiskSpaceGuard(run_dir, save_model=save_model))
    if csv_log or jsonl_log:
        callbacks.append(HistoryLogger(run_dir, stage=stage, csv_log=csv_log, jsonl_log=jsonl_log))
    if checkpoint:
        callbacks.append(BestModelCheckpoint(run_dir / BEST_MODEL, monitor=monitor, best=best, save_model=save_model))
    if early_stopping:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True, verbose=1)
        )
    if tensorboard:
        callbacks.append(
            keras.callbacks.TensorBoard(str(run_dir / TENSORBOARD_DIR), write_graph=False, profile_batch=0)
        )
    if backup:
        backup_dir = run_dir / BACKUP_DIR / (stage or "fit")
        discard_damaged_backup(backup_dir)
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True))
    return callbacks
