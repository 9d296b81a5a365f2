"""Guards: callbacks that stop a fit before it does harm, and the signal handler behind a clean stop.

    NaNGuard        a loss that is not finite stops the fit at once, naming the batch
    DiskSpaceGuard  a disk too full for the epoch's checkpoints stops it before any file is touched
    InterruptGuard  SIGINT / SIGTERM stop it at the next batch (see `interrupt_guard`)

Each raises instead of setting `stop_training`, so no later callback runs: the best model and the
last backup stay those of the last good epoch, where the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import keras
import numpy as np

from kerastune_flow import rundir
from kerastune_flow.errors import RunDirError, RunInterrupted, TrainingDivergedError

log = logging.getLogger(__name__)


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
    them: the best model (written beside, then renamed) and the backup's new weights and optimizer
    state: twice the model's state.

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
                f"The disk holding {self.run_dir} is full ({rundir.free_space(self.run_dir)} free, one epoch's "
                f"checkpoints need {self.needed / 1024**2:,.1f} MB), so epoch {epoch + 1} is not saved and the files "
                f"written before are kept; free some space or choose a --run-dir on another disk, then run the same "
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


@contextlib.contextmanager
def interrupt_guard(signals=(signal.SIGINT, signal.SIGTERM)):
    """Turns SIGINT / SIGTERM into "stop after the current batch" for the fits given the guard it
    yields (`standard_callbacks(guard=...)`, `FitContext.guard`); a second signal stops at once.
    Handlers are restored on exit. Outside the main thread (where Python cannot install handlers)
    the guard never fires.
    """
    guard = InterruptGuard()
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
