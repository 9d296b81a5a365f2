"""Resume: every file of a run's resume state, and how the same command continues a run exactly.

A run's resume state is its backup/ folder (`rundir.BACKUP_DIR`), written here only:

    backup/<stage>/        one fit's epochs (`RunBackup`, below); "fit" for a single-stage recipe
    backup/stages/         the finished stages of a staged fine-tune (`StageLedger`)
    backup/learning_rates.json   the rates "auto" found, by stage (`record_learning_rate`)

and the seed the interrupted run recorded in config.json (`recorded_seed`). A worker of a cluster
starts from a copy of the chief's backup (`worker_copy`); a finished run's backup goes
(`discard`).

At the end of each epoch `RunBackup` writes, into the fit's folder under backup/:

    weights-N.weights.h5   the model's weights and the optimizer's state (its step count, so a
                           learning-rate schedule continues where it was) after N epochs
                           (`save_state`: the variables as arrays in order); the last two are
                           kept, and the best epoch's (early stopping's best weights)
    state.json             N, the weights file, and the state of every callback that has one
                           (the best value so far, early stopping's wait count and best epoch),
                           with the previous epoch's entry kept as a fallback

Each file is written beside and renamed, and state.json is renamed last: a kill at any moment
leaves the previous epoch's state whole. `RunBackup.restore`, called before `fit` (or by the
callback itself when the fit begins), loads the newest entry whose files read back (else the
previous one, else none: the fit starts over) and says where the fit continues; the callbacks
get their state back in `on_train_begin`. The data
order, the augmentation and dropout follow from (seed, epoch) (see `data.EpochClock`), so the
resumed epochs are the uninterrupted run's epochs, bit for bit on the same machine and versions.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import h5py
import keras
import numpy as np

from kerastune_flow import rundir

log = logging.getLogger(__name__)

STATE_JSON = "state.json"
STAGES_DIR = "stages"  # under backup/: the stage ledger of a staged fine-tune
SINGLE_FIT = "fit"  # the backup folder of a recipe's only fit (a stage's is named after it)


def backup_dir(run_dir: str | os.PathLike) -> Path:
    """The folder of a run's resume state."""
    return Path(run_dir) / rundir.BACKUP_DIR


def fit_folder(run_dir: str | os.PathLike, stage: str | None = None) -> Path:
    """Where `RunBackup` keeps the epochs of one fit: backup/<stage>, or backup/fit."""
    return backup_dir(run_dir) / (stage or SINGLE_FIT)


def is_interrupted(run_dir: str | os.PathLike) -> bool:
    """True when `run_dir` holds an interrupted run: a backup and no results."""
    run_dir = Path(run_dir)
    return backup_dir(run_dir).exists() and not (run_dir / rundir.RESULTS_JSON).exists()


def recorded_seed(run_dir: str | os.PathLike) -> int | None:
    """The seed an interrupted run in `run_dir` recorded in config.json, or None."""
    if not is_interrupted(run_dir):
        return None
    try:
        return rundir.read_json(Path(run_dir) / rundir.CONFIG_JSON)["config"]["train"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def worker_copy(chief_dir: str | os.PathLike) -> Path:
    """A non-chief worker's private run directory: the same files are written, then thrown away.
    It starts from the chief's backup, if any, so a restarted cluster resumes in step."""
    private = Path(tempfile.mkdtemp(prefix="kerastune_flow_worker_"))
    if backup_dir(chief_dir).is_dir():
        shutil.copytree(backup_dir(chief_dir), backup_dir(private))
    return private


def discard(run_dir: str | os.PathLike) -> None:
    """Removes a run's resume state (the run finished: nothing is left to resume)."""
    shutil.rmtree(backup_dir(run_dir), ignore_errors=True)


def found_learning_rates(run_dir: str | os.PathLike) -> dict[str, float]:
    """The rates "auto" found so far in an unfinished run, by stage ({} when none)."""
    try:
        rates = rundir.read_json(backup_dir(run_dir) / rundir.LEARNING_RATES_JSON)
        return {str(k): float(v) for k, v in rates.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_learning_rate(run_dir: str | os.PathLike, stage: str, rate: float) -> None:
    """Records the rate "auto" found for `stage`, so that a resumed run takes it instead of testing again."""
    rates = {**found_learning_rates(run_dir), stage: rate}
    rundir.atomic_write_json(backup_dir(run_dir) / rundir.LEARNING_RATES_JSON, rates)


class StageLedger:
    """Remembers finished stages (weights and where they ended) under backup/stages, so a resumed
    run skips them; removed with the backup when the run finishes."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self.folder = backup_dir(run_dir) / STAGES_DIR
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


class Stateful(Protocol):
    """A callback whose state a resumed fit needs (see `callbacks.BestModelCheckpoint`).

    `get_state(weights_file)` returns a JSON-ready dict. The model's weights of an earlier epoch
    (early stopping's best) are not written again: `weights_file(epochs)` names the backup's file
    of the weights after that many epochs, to put under a key ending in "_file", and the backup
    keeps it. `set_state(state, load_weights)` takes the dict back; `load_weights(file)` gives
    that file's model weights (as `model.get_weights()` gave them).
    """

    def get_state(self, weights_file: Callable[[int], str]) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any], load_weights: Callable[[str], list[np.ndarray]]) -> None: ...


def _readable(path: Path) -> bool:
    """True when every dataset of an HDF5 file reads back."""

    def read(name, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]
        return None  # visititems stops at the first value that is not None

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception:  # OSError for a truncated file, KeyError / ValueError for a damaged one
        return False
    return True


class RunBackup(keras.callbacks.Callback):
    """Saves what a resumed fit needs at the end of every epoch; `restore` reads it back.

    Put it last among the callbacks, so that an epoch counts as done only once its log records
    and best model are written (the resumed fit repeats an epoch that was logged but not saved).

    Args:
        folder: the fit's folder (backup/<stage>).
        stateful: the callbacks whose state is saved, by a name that stays the same between runs.
    """

    def __init__(self, folder: str | os.PathLike, stateful: dict[str, Stateful] | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.stateful = dict(stateful or {})
        self._restored: dict[str, Any] | None = None
        self._earlier: dict[str, list[np.ndarray]] = {}
        self._tried = False

    # ------------------------------------------------------------------ saving

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = weights_file(done)
        with rundir.atomic_file(self.folder / weights) as tmp:
            save_state(self.model, tmp)
        previous = self._read_state()
        entry = {
            "epoch": done,
            "weights": weights,
            "callbacks": {name: c.get_state(weights_file) for name, c in self.stateful.items()},
        }
        if previous is not None:
            previous.pop("previous", None)
            entry["previous"] = previous
        rundir.atomic_write_json(self.folder / STATE_JSON, entry)
        self._prune(entry)

    def _prune(self, entry: dict[str, Any]) -> None:
        """Removes the files neither this epoch's entry nor the previous one needs."""
        keep = {STATE_JSON, *_files(entry), *_files(entry.get("previous") or {})}
        for path in self.folder.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return rundir.read_json(self.folder / STATE_JSON)
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ restoring

    def restore(self, model: keras.Model) -> int | None:
        """Loads the newest readable state into `model` (weights and optimizer state) and keeps
        the callbacks' states for `on_train_begin`.

        Returns:
            The number of epochs the state holds (where the fit continues), or None when there
            is nothing to resume from (then the folder is cleared and the fit starts over).
        """
        self._tried = True
        state = self._read_state()
        for entry in (state, (state or {}).get("previous")):
            if entry and all(_readable(self.folder / f) for f in _files(entry)):
                optimizer = getattr(model, "optimizer", None)
                if optimizer is not None and not optimizer.built:
                    optimizer.build(model.trainable_variables)
                self._earlier = {}  # the weights of other epochs the callbacks keep (best weights)
                for file in set(_files(entry)[1:]):  # the callbacks' files (possibly this epoch's own)
                    self._earlier[file] = load_state(model, self.folder / file)
                load_state(model, self.folder / entry["weights"])
                self._restored = entry
                if entry is not state:
                    log.warning("The last backup in %s cannot be read back: resuming from the one before", self.folder)
                return int(entry["epoch"])
        if self.folder.exists():
            log.warning(
                "The backup in %s cannot be read (was the disk full, or the run killed, while it was written?); "
                "this fit starts over",
                self.folder,
            )
            shutil.rmtree(self.folder, ignore_errors=True)
        return None

    def apply_states(self) -> None:
        """Hands the restored states to the callbacks (their `on_train_begin` resets them first)."""
        if self._restored is None:
            return
        for name, callback in self.stateful.items():
            if name in self._restored["callbacks"]:
                callback.set_state(self._restored["callbacks"][name], self._earlier.__getitem__)

    def on_train_begin(self, logs=None):
        # A plain `model.fit` with these callbacks resumes too, as with keras.callbacks.BackupAndRestore:
        # the trainer reads `_initial_epoch` after on_train_begin. `fitting.fit` restores first instead,
        # so that a fit that had ended is not started again.
        if not self._tried:
            epoch = self.restore(self.model)
            if epoch is not None:
                self.model._initial_epoch = epoch
        self.apply_states()


# The HDF5 attribute that marks a backup file written by `save_state` (older backups are Keras' own).
STATE_FORMAT = "kerastune_flow_state"
STATE_GROUPS = ("model", "optimizer")


def _state_variables(model: keras.Model) -> dict[str, list]:
    optimizer = getattr(model, "optimizer", None)
    built = optimizer is not None and optimizer.built
    return {"model": list(model.weights), "optimizer": list(optimizer.variables) if built else []}


def save_state(model: keras.Model, path: str | os.PathLike) -> None:
    """Writes the model's weights and its optimizer's state (its step count, its moments) to an
    HDF5 file, each variable an array in the order Keras lists them: what `load_state` reads back.

    Keras' `save_weights` writes the same values through its saving machinery, which walks every
    layer: about 30 ms for a small head against 4 ms here, paid at every epoch's end (a cached
    head's epoch is 0.13 s).
    """
    with h5py.File(path, "w") as f:
        f.attrs[STATE_FORMAT] = 1
        for name, variables in _state_variables(model).items():
            group = f.create_group(name)
            for i, variable in enumerate(variables):
                group.create_dataset(str(i), data=keras.ops.convert_to_numpy(variable))


def load_state(model: keras.Model, path: str | os.PathLike) -> list[np.ndarray]:
    """Puts a `save_state` file's weights and optimizer state into `model` (a Keras weights file
    of an older backup through `load_weights`); returns the weights (as `get_weights` would).

    A file written before the optimizer had any state (no step taken) leaves the optimizer as it is.

    Raises:
        ValueError: the file holds another model's variables (their number or shapes differ).
    """
    with h5py.File(path, "r") as f:
        if not f.attrs.get(STATE_FORMAT):
            model.load_weights(path)
            return model.get_weights()
        arrays = {name: [f[name][str(i)][()] for i in range(len(f[name]))] for name in STATE_GROUPS}
    variables = _state_variables(model)
    if not arrays["optimizer"]:
        variables["optimizer"] = []
    for name in STATE_GROUPS:
        shapes = [tuple(v.shape) for v in variables[name]]
        if shapes != [a.shape for a in arrays[name]]:
            raise ValueError(
                f"{path} holds the {name} variables of another model: {len(arrays[name])} against {len(shapes)}"
            )
    for name in STATE_GROUPS:
        for variable, array in zip(variables[name], arrays[name], strict=True):
            variable.assign(array)
    return arrays["model"]


def weights_file(epochs: int) -> str:
    """The backup's file of the weights after `epochs` epochs."""
    return f"weights-{epochs}.weights.h5"


def _files(entry: dict[str, Any]) -> list[str]:
    """The files a state entry needs: its weights first, then the files its callbacks keep."""
    if not entry:
        return []
    files = [entry["weights"]]
    for state in entry.get("callbacks", {}).values():
        files.extend(v for k, v in state.items() if k.endswith("_file") and v)
    return files
