"""KerasTuner's side of `tune`: the oracle (atomic files, the time budget, the trial cap, the
recipe's defaults as the first trial), the Tuner whose trial is one whole run, and the chief that
serves the oracle to the workers of a distributed search.

KerasTuner drives the search (its oracles: Bayesian optimisation, random search, Hyperband; its
trial records; its chief/worker mode); everything here adapts it to the package's runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import keras
import keras_tuner as kt
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.distribute import utils as kt_distribute

from kerastune_flow import rundir
from kerastune_flow.config import Config
from kerastune_flow.errors import KerastuneFlowError
from kerastune_flow.runtime import environment
from kerastune_flow.search import tune_report as report_lib
from kerastune_flow.search.tune_report import objective_value
from kerastune_flow.training import tracking
from kerastune_flow.training.train import train_and_evaluate

if TYPE_CHECKING:  # tune_space ranks beside this module: the annotation only
    from kerastune_flow.search.tune_space import SearchSpace

log = logging.getLogger(__name__)

TUNERS = ("bayesian", "random", "hyperband")
PROJECT = "keras_tuner"  # KerasTuner's own files: DIR/keras_tuner/oracle.json, trial_N/trial.json
SERVER_POLL_SECONDS = 0.5


class AtomicOracleFiles:
    """Mixed into a KerasTuner oracle: its state and trial files are written atomically (a kill
    during KerasTuner's own write leaves a half file that makes the search unloadable), the
    time budget and a trial cap hold for every oracle (Hyperband has no max_trials), the first
    trial is the recipe's defaults (`defaults_first`), and DIR/tune.json is brought up to date
    whenever a trial ends, wherever the oracle runs."""

    budget_seconds: float | None = None
    trial_cap: int | None = None
    defaults_first = False
    on_trial_ended: Callable[[], None] | None = None
    _seconds_before = 0.0
    _session_start = 0.0

    def spent_seconds(self) -> float:
        return self._seconds_before + (time.monotonic() - self._session_start)

    def get_state(self):
        return {**super().get_state(), "kerastune_flow_seconds": self.spent_seconds()}

    def set_state(self, state):
        super().set_state(state)
        self._seconds_before = float(state.get("kerastune_flow_seconds", 0.0))
        self._session_start = time.monotonic()

    def save(self):
        rundir.atomic_write_text(self._get_oracle_fname(), json.dumps(self.get_state()))

    def _save_trial(self, trial):
        path = os.path.join(self._get_trial_dir(trial.trial_id), "trial.json")
        rundir.atomic_write_text(path, json.dumps(trial.get_state()))

    def over_budget(self) -> bool:
        """The time budget or the trial cap is spent: no new trial starts."""
        # The time budget stops the next trial, never the first: a search always has a result.
        over_time = (
            bool(self.trials) and self.budget_seconds is not None and self.spent_seconds() >= self.budget_seconds
        )
        over_count = self.trial_cap is not None and len(self.trials) >= self.trial_cap
        return over_time or over_count

    def populate_space(self, trial_id):
        # The first trial is the recipe's defaults: a search then never reports a best worse on
        # validation than the settings it replaces, and that trial's run is the defaults' run.
        if self.defaults_first and not self.trials:
            return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": self.get_space().values}
        return super().populate_space(trial_id)

    def create_trial(self, tuner_id):
        if tuner_id not in self.ongoing_trials and not self._retry_queue and self.over_budget():
            self.tuner_ids.discard(tuner_id)
            return kt.engine.trial.Trial(self.get_space(), status=kt.engine.trial.TrialStatus.STOPPED)
        return super().create_trial(tuner_id)

    def end_trial(self, trial):
        super().end_trial(trial)
        if self.on_trial_ended is not None:
            self.on_trial_ended()


_ORACLES = {
    "bayesian": kt.oracles.BayesianOptimizationOracle,
    "random": kt.oracles.RandomSearchOracle,
    "hyperband": kt.oracles.HyperbandOracle,
}


def make_oracle(tuner: str, objective: str, *, trials: int, epochs: int, seed: int, max_minutes: float | None):
    """The KerasTuner oracle of `tuner`, with atomic files, the time budget and the trial cap."""
    cls = type(f"Atomic{_ORACLES[tuner].__name__}", (AtomicOracleFiles, _ORACLES[tuner]), {})
    direction = "min" if "loss" in objective else "max"
    kwargs: dict[str, Any] = dict(objective=kt.Objective(objective, direction), seed=seed)
    if tuner == "hyperband":
        kwargs.update(max_epochs=max(epochs, 2), factor=3)
    else:
        kwargs["max_trials"] = trials
    oracle = cls(**kwargs)
    oracle._session_start = time.monotonic()
    oracle.budget_seconds = None if max_minutes is None else 60.0 * max_minutes
    oracle.trial_cap = trials
    oracle.defaults_first = tuner != "hyperband"  # Hyperband's brackets decide their own first trials
    return oracle


class TrialUserError(kt.errors.FatalError):
    """A user error inside a trial: KerasTuner would retry a failing trial, but bad data fails
    them all alike, so the search stops and the error is told as every other command tells it."""

    def __init__(self, error: KerastuneFlowError):
        super().__init__(str(error))
        self.error = error


class RunTuner(kt.Tuner):
    """KerasTuner's Tuner, where one trial is one `train_and_evaluate` run in DIR/trials/NNN/
    (with the user's `run_callbacks` in its fits)."""

    def __init__(
        self,
        oracle,
        space: SearchSpace,
        run_dir: Path,
        *,
        objective: str,
        epochs_field: str,
        run_callbacks: Sequence[keras.callbacks.Callback] | None = None,
        **kwargs,
    ):
        super().__init__(oracle=oracle, hypermodel=space, directory=str(run_dir), project_name=PROJECT, **kwargs)
        self.run_dir, self.space, self.objective, self.epochs_field = run_dir, space, objective, epochs_field
        self.run_callbacks = tuple(run_callbacks or ())

    def save(self):
        rundir.atomic_write_text(self._get_tuner_fname(), json.dumps(self.get_state()))

    def trial_config(self, trial) -> Config:
        hp = trial.hyperparameters
        values = {knob.field: knob.to_config(hp.get(knob.name)) for knob in self.space.knobs if knob.name in hp}
        if "tuner/epochs" in hp.values:  # Hyperband's budget for this trial (trained from the start)
            values[self.epochs_field] = int(hp.values["tuner/epochs"])
        return self.space.config.replace(**values)

    def run_trial(self, trial, *args, **kwargs):
        run_dir = report_lib.trial_run_dir(self.run_dir, trial.trial_id)
        config = self.trial_config(trial)
        folds = config.data.folds or 1
        started = time.perf_counter()
        scores = []
        for k, fold_dir in enumerate(report_lib.fold_run_dirs(run_dir, folds)):
            try:
                if (fold_dir / rundir.RESULTS_JSON).exists():  # finished before a kill, not yet recorded
                    log.info("Trial %s had finished %s before the interruption: kept", trial.trial_id, fold_dir.name)
                else:
                    fold_config = config.replace(fold=k) if folds > 1 else config
                    train_and_evaluate(fold_config, fold_dir, evaluate_test=False, callbacks=self.run_callbacks)
                scores.append(objective_value(rundir.read_history(fold_dir), self.objective))
            except KerastuneFlowError as error:
                raise TrialUserError(error) from None
            finally:
                keras.backend.clear_session()
        value = float(sum(scores) / len(scores))  # with --folds K, the mean of the K folds' objectives
        _log_trial(self, trial, value, time.perf_counter() - started, run_dir, scores if folds > 1 else None)
        tracking.log_trial(run_dir, trial.hyperparameters.values, self.objective, value)  # with --track mlflow
        return {self.objective: value}


def _log_trial(tuner: RunTuner, trial, value: float, seconds: float, run_dir: Path, scores: list[float] | None) -> None:
    earlier = [t for t in tuner.oracle.get_best_trials(1) if t.score is not None and t.trial_id != trial.trial_id]
    oracle = getattr(tuner.oracle, "_oracle", tuner.oracle)  # a worker's OracleClient wraps its local oracle
    budget = getattr(oracle, "budget_seconds", None)
    dirs = report_lib.fold_run_dirs(run_dir, len(scores) if scores else 1)
    train_seconds = [
        rundir.read_json(d / rundir.RESULTS_JSON).get("train_seconds")
        for d in dirs
        if (d / rundir.RESULTS_JSON).exists()
    ]
    line = report_lib.trial_line(
        trial.trial_id,
        {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")},
        tuner.objective,
        value,
        best=(earlier[0].trial_id, earlier[0].score) if earlier else None,
        seconds=seconds,
        train_seconds=sum(t for t in train_seconds if t is not None) if any(train_seconds) else None,
        minutes_left=max(0.0, budget - oracle.spent_seconds()) / 60 if budget else None,
        folds=scores,
    )
    log.info("%s", line)


# --------------------------------------------------------------------------- distributed search


def is_chief() -> bool:
    """This process is KerasTuner's chief (KERASTUNER_TUNER_ID holds "chief"): it serves the oracle."""
    return kt_distribute.is_chief_oracle()


def is_worker() -> bool:
    """This process is a KerasTuner worker: it asks the chief for trials and runs them."""
    return kt_distribute.has_chief_oracle() and not is_chief()


def serve(oracle) -> None:
    """KerasTuner's chief: serves the oracle to the workers until every trial has ended.

    KerasTuner's own `start_server` polls every 20 s once stopping; this one polls often, and
    also stops when the time budget is spent (workers then stop asking)."""
    oracle.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = (
        f"{environment.read(environment.KERASTUNER_ORACLE_IP)}:{environment.read(environment.KERASTUNER_ORACLE_PORT)}"
    )
    server.add_insecure_port(address)
    server.start()
    log.info("Chief oracle serving on %s", address)
    try:
        while True:
            time.sleep(SERVER_POLL_SECONDS)
            idle = not oracle.ongoing_trials
            if idle and ((servicer.stop_triggered and not oracle.tuner_ids) or oracle.over_budget()):
                break
    finally:
        server.stop(grace=1)
