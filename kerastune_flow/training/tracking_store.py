"""The MLflow store of `tracking.py`: a `Tracker` (one MLflow run, whose failures cost one warning),
and opening a folder's MLflow run, new or continued from the ID kept in the folder
(`rundir.TRACKING_JSON`). MLflow is imported here only, when a tracked run starts."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kerastune_flow import rundir
from kerastune_flow.errors import MissingPackageError

log = logging.getLogger(__name__)

EXTRA = "pip install 'kerastune_flow[track]'"
CONNECT_SECONDS = 3.0  # a tracking server that does not answer this soon is down: MLflow would retry for minutes
PARENT_TAG = "mlflow.parentRunId"
RUN_DIR_TAG = "kerastune_flow.run_dir"
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit


def import_mlflow() -> Any:
    """The mlflow module, or the one sentence that says how to install it.

    Raises:
        MissingPackageError: when mlflow is not installed.
    """
    try:
        return importlib.import_module("mlflow")
    except ImportError as error:
        raise MissingPackageError(
            f"--track mlflow needs MLflow, which is not installed; run {EXTRA} (or pip install mlflow). "
            f"Received: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
        ) from None


@dataclasses.dataclass(frozen=True)
class Parent:
    """The parent run of the runs a search or comparison trains (see `parent_run`)."""

    run_id: str
    experiment: str
    tracking_uri: str
    folder: Path


class Tracker:
    """One MLflow run, or nothing: every call is a no-op once tracking is off or has failed.

    Args:
        client: an `mlflow.MlflowClient` of the store, or None (not tracked).
        run_id: the MLflow run's ID.
        tracking_uri: the store.
        experiment: the experiment's name.
    """

    def __init__(
        self,
        client: Any = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
    ):
        self.client, self.run_id, self.tracking_uri, self.experiment = client, run_id, tracking_uri, experiment

    @property
    def active(self) -> bool:
        return self.client is not None

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls the client; the first failure is one warning, and the run goes on untracked."""
        if self.client is None:
            return None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as error:  # any failure of the store: a tracker never fails a run
            log.warning(
                "MLflow tracking stopped: %s failed in the store %s (%s); the run goes on untracked",
                what,
                self.tracking_uri,
                " ".join(str(error).split())[:200],
            )
            self.client = None
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs parameters; on a continued run, only those it lacks (MLflow refuses to change one)."""
        if self.client is None or not params:
            return
        run = self._call("reading the run", "get_run", self.run_id)
        had = run.data.params if run is not None else {}
        changed = sorted(k for k, v in params.items() if k in had and had[k] != v)
        if changed:
            log.info("MLflow keeps the parameters this run started with: %s not updated", ", ".join(changed))
        items = [(k, v) for k, v in params.items() if k not in had]
        param = importlib.import_module("mlflow.entities").Param
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            chunk = [param(k, v) for k, v in items[start : start + MAX_PARAMS_PER_CALL]]
            self._call("logging the parameters", "log_batch", self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int = 0) -> None:
        """Logs numeric metrics at `step`."""
        if self.client is None or not metrics:
            return
        metric = importlib.import_module("mlflow.entities").Metric
        now = int(time.time() * 1000)
        batch = [metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("logging metrics", "log_batch", self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._call("setting a tag", "set_tag", self.run_id, key, str(value))

    def log_files(self, paths: Iterable[Path]) -> None:
        """Logs the files (and folders) of `paths` that exist as the run's artifacts."""
        for path in paths:
            if path.is_dir():
                self._call(f"storing {path.name}", "log_artifacts", self.run_id, str(path), path.name)
            elif path.is_file():
                self._call(f"storing {path.name}", "log_artifact", self.run_id, str(path))

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run has `key` logged."""
        history = self._call("reading a metric", "get_metric_history", self.run_id, key)
        return {m.step for m in history or ()}

    def end(self, status: str) -> None:
        self._call("ending the run", "set_terminated", self.run_id, status)


def store_error(uri: str) -> str | None:
    """Why the tracking server at `uri` cannot be reached, or None (a local store, or it answers)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "localhost", port), timeout=CONNECT_SECONDS):
            return None
    except OSError as error:
        return f"{error.strerror or error} at {parsed.hostname}:{port}"


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def read_record(folder: Path) -> dict[str, Any] | None:
    """The MLflow run recorded in `folder` (`rundir.TRACKING_JSON`), or None."""
    try:
        record = rundir.read_json(folder / rundir.TRACKING_JSON)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"run_id", "experiment", "tracking_uri"} <= set(record) else None


def _continued(client: Any, folder: Path, uri: str) -> str | None:
    """The MLflow run recorded in `folder`, reopened, when it is in this store; else None."""
    record = read_record(folder)
    if record is None:
        return None
    if record.get("tracking_uri") != uri:
        log.info(
            "The MLflow run of %s is in another store (%s): starting a new one", folder, record.get("tracking_uri")
        )
        return None
    try:
        run = client.get_run(record["run_id"])
    except Exception:  # deleted, or a store that was replaced
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def open_run(
    mlflow: Any, folder: Path, *, experiment: str, uri: str, parent: Parent | None, continue_run: bool
) -> tuple[Any, str, str, bool]:
    """Connects to the store and opens the folder's MLflow run: the recorded one when
    `continue_run`, else a new one (recorded). Returns (client, run ID, experiment, continued)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = _continued(client, folder, uri) if continue_run else None
    if run_id is not None:
        return client, run_id, experiment, True
    tags, name = {RUN_DIR_TAG: str(folder.resolve())}, folder.name
    if parent is not None:
        tags[PARENT_TAG] = parent.run_id
        if folder.resolve().is_relative_to(parent.folder.resolve()):  # trials/003, not 003
            name = str(folder.resolve().relative_to(parent.folder.resolve()))
    run = client.create_run(_experiment_id(client, experiment), tags=tags, run_name=name)
    record = {"run_id": run.info.run_id, "experiment": experiment, "tracking_uri": uri}
    rundir.atomic_write_json(folder / rundir.TRACKING_JSON, record)
    return client, run.info.run_id, experiment, False


@contextlib.contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """Ends `tracker`'s run as the block ends: FINISHED, KILLED on an interrupt, else FAILED."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def reopen(folder: Path) -> Tracker:
    """The finished MLflow run recorded in `folder`, to log more to it; untracked when there is none."""
    record = read_record(folder)
    if record is None:
        return Tracker()
    try:
        client = import_mlflow().MlflowClient(tracking_uri=record["tracking_uri"])
    except Exception:  # mlflow gone, or a store that no longer opens: nothing more is logged
        return Tracker()
    return Tracker(client, record["run_id"], record["tracking_uri"], record.get("experiment"))
