"""Experiment tracking in MLflow (`track="mlflow"`): one MLflow run per run directory.

A tracked run logs its config as parameters (`model.learning_rate` style keys) once, its epochs as
they end (`EpochMetrics`, after the package's own callbacks: step = the run's epoch from 0, the same
callback in both stages of a fine-tune, so stage 2 continues the curves), then its results and its
files (config.json, results.json, curves.png, history.csv, model.keras). `tune` and `compare` open a
parent run (`parent_run`), under which every run they train is a nested run (the tag
`mlflow.parentRunId`) in the parent's experiment; a run of its own goes to the experiment named
after its recipe.

The MLflow run's ID is kept in the folder (`rundir.TRACKING_JSON`), so the same command continues the
same MLflow run after a kill. MLflow is an optional dependency (`[track]`), imported when a tracked
run starts; everything goes through an `MlflowClient` of the run's store (`tracking_uri`, else
MLflow's own choice: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder), so nothing
of MLflow's process-wide state changes. A store that fails (unwritable, a server down) costs one
warning, and the run goes on untracked: tracking never loses or fails a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import keras

from kerastune_flow import rundir
from kerastune_flow.config import Config
from kerastune_flow.config.settings import TRACKING_FIELDS

# Tracker and tracked are also reached from here: train, tune and compare know this module only.
from kerastune_flow.training.tracking_store import (
    Parent,
    Tracker,
    import_mlflow,
    open_run,
    read_record,
    reopen,
    store_error,
    tracked,
)

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's MAX_PARAM_VAL_LENGTH (3.x): a longer value is refused
NOT_METRICS = ("epoch", "wall_time")  # history columns that are the step, or a clock reading
RUN_FILES = (rundir.CONFIG_JSON, rundir.RESULTS_JSON, rundir.CURVES_PNG, rundir.HISTORY_CSV, rundir.BEST_MODEL)


def tracking_on(config: Config) -> bool:
    """Whether `config` asks for tracking."""
    return config.train.track != "off"


def require(config: Config) -> None:
    """Checks, before anything runs, that the tracking `config` asks for can be done.

    Raises:
        MissingPackageError: `track="mlflow"` without mlflow installed.
    """
    if tracking_on(config):
        import_mlflow()


# The parent run that `tune` or `compare` has open while it trains, set by `parent_run` for its duration
# only: a run trained meanwhile (in this thread or context) becomes its nested run.
_PARENT: contextvars.ContextVar[Parent | None] = contextvars.ContextVar("kerastune_flow_parent_run", default=None)


class EpochMetrics(keras.callbacks.Callback):
    """Logs each epoch's record to the tracker as the epoch ends, at step = the epoch (from 0).

    The record is the epoch's line of history.jsonl (the metrics, the learning rate, the epoch's
    seconds) when the run logs one, else Keras' logs: it comes after the package's own callbacks.
    """

    def __init__(self, tracker: Tracker, run_dir: Path):
        super().__init__()
        self.tracker, self.run_dir = tracker, Path(run_dir)

    def on_epoch_end(self, epoch, logs=None):
        if not self.tracker.active:
            return
        logged = [r for r in rundir.read_history(self.run_dir) if r.get("epoch") == epoch]
        record = logged[-1] if logged else {"epoch": epoch, **(logs or {})}
        self.tracker.log_metrics(epoch_metrics(record), step=epoch)


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a history record worth a curve (not the epoch, a label or the clock)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def config_params(config: Config) -> dict[str, str]:
    """The config as MLflow parameters: `section.field` keys, text values (see `param_value`),
    the tracking settings left out (where a run is recorded is not what it is)."""
    return {
        f"{section}.{name}": param_value(value)
        for section, values in config.to_dict().items()
        for name, value in values.items()
        if name not in TRACKING_FIELDS
    }


def param_value(value: Any) -> str:
    """A parameter's text: a list joined by commas, cut to MLflow's longest value."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


# --------------------------------------------------------------------------- opening a run


def start(config: Config, folder: Path, *, experiment: str, continue_run: bool, what: str = "run") -> Tracker:
    """Opens the MLflow run of `folder` (see `tracked`); an untracked `Tracker` when tracking is
    off or the store fails (with one warning)."""
    if not tracking_on(config):
        return Tracker()
    mlflow = import_mlflow()
    parent = _PARENT.get()
    uri = parent.tracking_uri if parent is not None else (config.train.tracking_uri or mlflow.get_tracking_uri())
    experiment = parent.experiment if parent is not None else experiment
    unreachable = store_error(uri)
    if unreachable is not None:
        log.warning("MLflow tracking is off for this %s: the store %s does not answer (%s)", what, uri, unreachable)
        return Tracker()
    try:
        client, run_id, experiment, continued = open_run(
            mlflow, folder, experiment=experiment, uri=uri, parent=parent, continue_run=continue_run
        )
    except Exception as error:  # any failure of the store: the run goes on untracked
        reason = " ".join(str(error).split())[:200]
        log.warning("MLflow tracking is off for this %s: the store %s failed (%s)", what, uri, reason)
        return Tracker()
    log.info(
        "Tracking in MLflow: experiment %s, %s run %s%s, store %s",
        experiment,
        "continuing" if continued else "new",
        run_id,
        f" (nested in {parent.run_id})" if parent is not None else "",
        uri,
    )
    return Tracker(client, run_id, uri, experiment)


@contextlib.contextmanager
def parent_run(
    config: Config,
    folder: Path,
    *,
    experiment: str,
    params: Mapping[str, Any],
    continue_run: bool = True,
    join: bool = False,
) -> Iterator[Tracker]:
    """The parent MLflow run of a search or comparison in `folder`, open for the block: every run
    trained in it is its nested run. Untracked (a no-op) when `config` asks for no tracking.

    Args:
        config: the settings of the runs (`track`, `tracking_uri`).
        folder: the search's or comparison's folder, where the parent run's ID is kept.
        experiment: the experiment of a new parent run.
        params: the parent's parameters (the command's settings).
        continue_run: continue the parent run recorded in `folder` (a resumed search).
        join: a distributed search's worker: its trials nest in the parent run the chief recorded in
            the shared `folder`, which the worker neither starts nor ends.
    """
    if join:
        record = read_record(folder) if tracking_on(config) else None
        parent = Parent(record["run_id"], record["experiment"], record["tracking_uri"], folder) if record else None
        token = _PARENT.set(parent)
        try:
            yield Tracker()
        finally:
            _PARENT.reset(token)
        return
    tracker = start(config, folder, experiment=experiment, continue_run=continue_run, what=folder.name)
    if not tracker.active:
        yield tracker
        return
    tracker.log_params({k: param_value(v) for k, v in params.items() if k not in TRACKING_FIELDS})
    token = _PARENT.set(Parent(tracker.run_id, tracker.experiment, tracker.tracking_uri, folder))
    try:
        with tracked(tracker):
            yield tracker
    finally:
        _PARENT.reset(token)


def log_run_results(tracker: Tracker, run_dir: Path, results: Mapping[str, Any], history: list[dict[str, Any]]) -> None:
    """At a run's end: its results as metrics (test_*, train_seconds, best_epoch, epochs_run), any
    epoch the store missed (a kill between an epoch's backup and its logging), and its files."""
    if not tracker.active:
        return
    numbers = {f"test_{k}": v for k, v in (results.get("test") or {}).items()}
    numbers.update({k: results[k] for k in ("train_seconds", "best_epoch", "epochs_run") if results.get(k) is not None})
    tracker.log_metrics(numbers)
    if history:
        key = next(iter(epoch_metrics(history[0])), None)
        logged = tracker.logged_steps(key) if key else set()
        for record in history:
            if record["epoch"] not in logged:
                tracker.log_metrics(epoch_metrics(record), step=record["epoch"])
    tracker.log_files(run_dir / name for name in RUN_FILES)


def log_trial(run_dir: Path, hyperparameters: Mapping[str, Any], objective: str, value: float) -> None:
    """A search's trial on its MLflow run, when it was tracked: its hyperparameters (`hp.NAME`) and
    its objective's best value (`best_OBJECTIVE`)."""
    tracker = reopen(run_dir)
    tracker.log_params({f"hp.{k}": param_value(v) for k, v in hyperparameters.items()})
    tracker.log_metrics({f"best_{objective}": value})
