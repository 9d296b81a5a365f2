"""`tune`: a KerasTuner search over the knobs the articles say decide the result.

KerasTuner drives the search (its oracles: Bayesian optimisation, random search, Hyperband; its
trial records; its chief/worker mode), and one trial is one whole run of the package's own
training, `train_and_evaluate` in `DIR/trials/NNN/`, with everything a run has: logs, curves, the
best model, exact resume, the bad-input checks. Both stages of a fine-tune are one trial.

The test split is never looked at during the search: trials choose by validation. At the end
the best trial's settings are written to `DIR/best_config.json` (the shape of a run's
config.json, so `train RECIPE --config DIR/best_config.json` replays it), and the best model and
a run of the recipe's defaults are each evaluated once on the test split.

A search killed at any moment resumes with the same command: KerasTuner reloads its trials, no
finished trial runs again, and the interrupted trial's run directory resumes at its last
finished epoch (KerasTuner alone reruns it from the start, keras-tuner#439). The oracle's and
the trials' files are written atomically here, so a kill never leaves one half-written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import keras
import keras_tuner as kt
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.distribute import utils as kt_distribute

from kerastune_flow import data as data_lib
from kerastune_flow import rundir, runlock
from kerastune_flow.config import Config, new_seed
from kerastune_flow.deploy import inference
from kerastune_flow.errors import ConfigError, KerastuneFlowError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.runtime import process
from kerastune_flow.search import tune_report as report_lib
from kerastune_flow.search.tune_space import Knob, SearchSpace, resolve_space, unfreeze_choices
from kerastune_flow.training.train import best_epoch, check_before_data, train_and_evaluate

log = logging.getLogger(__name__)

TUNERS = ("bayesian", "random", "hyperband")
OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")
SEARCH_JSON = "search.json"  # what the search was started with: the same command resumes it
BEST_CONFIG = "best_config.json"
DEFAULTS_DIR = "defaults"
PROJECT = "keras_tuner"  # KerasTuner's own files: DIR/keras_tuner/oracle.json, trial_N/trial.json
DEFAULT_TRIALS = 10
SERVER_POLL_SECONDS = 0.5


# --------------------------------------------------------------------------- KerasTuner's side


class AtomicOracleFiles:
    """Mixed into a KerasTuner oracle: its state and trial files are written atomically (a kill
    during KerasTuner's own write leaves a half file that makes the search unloadable), the
    time budget and a trial cap hold for every oracle (Hyperband has no max_trials), and
    DIR/tune.json is brought up to date whenever a trial ends, wherever the oracle runs."""

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

    def _over_budget(self) -> bool:
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
        if tuner_id not in self.ongoing_trials and not self._retry_queue and self._over_budget():
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


class _UserError(kt.errors.FatalError):
    """A user error inside a trial: KerasTuner would retry a failing trial, but bad data fails
    them all alike, so the search stops and the error is told as every other command tells it."""

    def __init__(self, error: KerastuneFlowError):
        super().__init__(str(error))
        self.error = error


class RunTuner(kt.Tuner):
    """KerasTuner's Tuner, where one trial is one `train_and_evaluate` run in DIR/trials/NNN/."""

    def __init__(self, oracle, space: SearchSpace, run_dir: Path, *, objective: str, epochs_field: str, **kwargs):
        super().__init__(oracle=oracle, hypermodel=space, directory=str(run_dir), project_name=PROJECT, **kwargs)
        self.run_dir, self.space, self.objective, self.epochs_field = run_dir, space, objective, epochs_field

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
        started = time.perf_counter()
        try:
            if (run_dir / rundir.RESULTS_JSON).exists():  # finished before a kill, not yet recorded by the oracle
                log.info("Trial %s had finished before the interruption: its results are kept", trial.trial_id)
            else:
                train_and_evaluate(self.trial_config(trial), run_dir, evaluate_test=False)
            value = objective_value(rundir.read_history(run_dir), self.objective)
        except KerastuneFlowError as error:
            raise _UserError(error) from None
        finally:
            keras.backend.clear_session()
        _log_trial(self, trial, value, time.perf_counter() - started, run_dir)
        return {self.objective: value}


def objective_value(history: list[dict[str, Any]], objective: str) -> float:
    """The objective's best value over a run's epochs, as KerasTuner scores a Keras fit."""
    values = [r[objective] for r in history if r.get(objective) is not None]
    if not values:
        raise ConfigError(f"The runs log no {objective!r}; choose --objective from {', '.join(OBJECTIVES)}.")
    return float(min(values) if "loss" in objective else max(values))


def _log_trial(tuner: RunTuner, trial, value: float, seconds: float, run_dir: Path) -> None:
    earlier = [t for t in tuner.oracle.get_best_trials(1) if t.score is not None and t.trial_id != trial.trial_id]
    oracle = getattr(tuner.oracle, "_oracle", tuner.oracle)  # a worker's OracleClient wraps its local oracle
    budget = getattr(oracle, "budget_seconds", None)
    results_path = run_dir / rundir.RESULTS_JSON
    results = rundir.read_json(results_path) if results_path.exists() else {}
    line = report_lib.trial_line(
        trial.trial_id,
        {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")},
        tuner.objective,
        value,
        best=(earlier[0].trial_id, earlier[0].score) if earlier else None,
        seconds=seconds,
        train_seconds=results.get("train_seconds"),
        minutes_left=max(0.0, budget - oracle.spent_seconds()) / 60 if budget else None,
    )
    log.info("%s", line)


# --------------------------------------------------------------------------- the search


def tune(
    recipe: str,
    run_dir: str | Path,
    *,
    tuner: str = "bayesian",
    trials: int = DEFAULT_TRIALS,
    max_minutes: float | None = None,
    space: Sequence[str] | None = None,
    objective: str = "val_accuracy",
    preset: str = "reference",
    **overrides: Any,
) -> dict[str, Any]:
    """Searches the recipe's knobs and writes tune.json, best_config.json and the report.

    Args:
        recipe: one of the recipes.
        run_dir: the search's directory; the same call resumes an interrupted search there.
        tuner: bayesian, random or hyperband (KerasTuner's oracles).
        trials: at most this many trials.
        max_minutes: stop starting trials once the search has run this long (over all sessions).
        space: knob names to search (default: the recipe's `space`); see `KNOBS`.
        objective: a validation metric the runs log (the test split is never used to choose).
        preset: a config preset, as for train.
        **overrides: config fields fixed for every trial (a knob given here is not searched).

    Returns:
        The summary written to tune.json, with "best" and "test" filled in.

    Raises:
        ConfigError: for a bad tuner, objective, space or setting; DataError and the rest of the
            package's user errors as `train` raises them.
    """
    spec = get_recipe(recipe)
    if tuner not in TUNERS:
        raise ConfigError(f"--tuner must be one of {', '.join(TUNERS)}. Received: tuner={tuner}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}. Received: objective={objective}")
    if trials < 1 or (max_minutes is not None and max_minutes <= 0):
        raise ConfigError(f"--trials and --max-minutes must be positive. Received: trials={trials}, {max_minutes=}")
    run_dir = Path(run_dir)
    worker = kt_is_worker()  # a distributed search's chief holds the folder for its workers
    if not worker:
        rundir.claim_dir(run_dir, kinds=("search",))
    # The data and the settings checked before anything is written: a typo leaves no search behind.
    given = make_config(recipe, preset, **overrides)
    check_before_data(given)
    # Before reading the data starts TensorFlow: then the process still sets its threads itself.
    process.prepare_process(given.train.strategy, deterministic=given.train.deterministic)
    data_lib.load_splits(given)
    with runlock.run_lock(run_dir, take=not worker):  # released at the end, on errors and Ctrl-C too
        asked = search_settings(recipe, tuner=tuner, objective=objective, preset=preset, space=space, **overrides)
        started = _search_record(run_dir, asked, budget=dict(trials_asked=trials, max_minutes=max_minutes))
        fixed = {**overrides, "seed": started["seed"]}
        if objective.startswith("val_") and make_config(recipe, preset, **fixed).data.validation_fraction == 0:
            if "validation_fraction" in overrides:
                raise ConfigError(
                    "tune chooses by validation, so --validation-fraction must be above 0. "
                    "Received: validation_fraction=0"
                )
            fixed["validation_fraction"] = 0.1  # the from-scratch recipes hold none out by default
        config = make_config(recipe, preset, **fixed)
        knobs = resolve_space(spec, space, fixed=tuple(overrides))
        blocks = unfreeze_choices(config) if any(k.name == "unfreeze_at" for k in knobs) else []
        epochs_field = "epochs"
        oracle = make_oracle(
            tuner, objective, trials=trials, epochs=config.train.epochs, seed=started["seed"], max_minutes=max_minutes
        )
        oracle.on_trial_ended = lambda: report_lib.write_tune_json(run_dir, oracle, started, knobs)
        with contextlib.redirect_stdout(io.StringIO()) as chatter:  # KerasTuner prints; the log says it once
            tuner_obj = RunTuner(
                oracle, SearchSpace(knobs, config, blocks), run_dir, objective=objective, epochs_field=epochs_field
            )
        if "Reloading" in chatter.getvalue():
            done = sum(t.status == "COMPLETED" for t in oracle.trials.values())
            log.info("Resuming the search in %s: %d trial(s) finished, none is run again", run_dir, done)
        log.info(
            "Searching %s with %s over %s (%s trials%s), objective %s",
            recipe,
            tuner,
            ", ".join(k.name for k in knobs),
            trials,
            f", {max_minutes:g} min" if max_minutes else "",
            objective,
        )
        try:
            if kt_is_chief():
                _serve(oracle)
            else:
                tuner_obj.search(verbose=0)
        except _UserError as error:
            raise error.error from None
        if kt_is_worker():  # the chief writes the summary once every trial has ended
            return {"worker": os.environ.get("KERASTUNER_TUNER_ID")}
        return finish(run_dir, oracle, started, knobs, config)


def kt_is_chief() -> bool:
    """This process is KerasTuner's chief (KERASTUNER_TUNER_ID holds "chief"): it serves the oracle."""
    return kt_distribute.is_chief_oracle()


def kt_is_worker() -> bool:
    """This process is a KerasTuner worker: it asks the chief for trials and runs them."""
    return kt_distribute.has_chief_oracle() and not kt_is_chief()


def _serve(oracle) -> None:
    """KerasTuner's chief: serves the oracle to the workers until every trial has ended.

    KerasTuner's own `start_server` polls every 20 s once stopping; this one polls often, and
    also stops when the time budget is spent (workers then stop asking)."""
    oracle.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server.add_insecure_port(address)
    server.start()
    log.info("Chief oracle serving on %s", address)
    try:
        while True:
            time.sleep(SERVER_POLL_SECONDS)
            idle = not oracle.ongoing_trials
            if idle and ((servicer.stop_triggered and not oracle.tuner_ids) or oracle._over_budget()):
                break
    finally:
        server.stop(grace=1)


def search_settings(
    recipe: str, *, tuner: str, objective: str, preset: str, space: Sequence[str] | None, **overrides: Any
) -> dict[str, Any]:
    """What a search is started with (search.json's settings): the same command resumes it."""
    asked = dict(recipe=recipe, tuner=tuner, objective=objective, preset=preset, space=space, **overrides)
    asked["seed"] = make_config(recipe, preset, **overrides).train.seed  # a flag's or the preset's; None: picked
    return asked


def _search_record(run_dir: Path, asked: dict[str, Any], *, budget: dict[str, Any]) -> dict[str, Any]:
    """DIR/search.json: the command's settings and the seed every trial shares. A resumed
    search must be the same search (its budget may grow); a new one picks a seed (recorded, so
    it can be replayed)."""
    path = run_dir / SEARCH_JSON
    started = rundir.to_jsonable(asked)
    if path.exists():
        previous = {k: v for k, v in rundir.read_json(path).items() if k not in budget}
        differs = {k for k in set(previous) | set(started) if previous.get(k) != started.get(k)}
        if started.get("seed") is None:  # none given: the search's own, picked when it started
            differs.discard("seed")
        if differs:
            key = sorted(differs)[0]
            raise ConfigError(
                f"{run_dir} holds a search started with other settings ({key}: {previous.get(key)!r}); run that "
                f"command to resume it, or choose another --run-dir. Received: {key}={started.get(key)!r}"
            )
        record = {**previous, **budget}
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        seed = started.get("seed")
        record = {**started, **budget, "seed": seed if seed is not None else new_seed()}
    rundir.atomic_write_json(path, record)
    return record


def finish(run_dir: Path, oracle, started: dict[str, Any], knobs: Sequence[Knob], config: Config) -> dict[str, Any]:
    """After the search: the best trial's config, the best and the defaults on the test split
    (once each), tune.json and the reports."""
    summary = report_lib.write_tune_json(run_dir, oracle, started, knobs)
    best = oracle.get_best_trials(1)
    if not best:
        raise ConfigError(
            f"No trial of the search in {run_dir} finished; see the trials' logs in {run_dir / report_lib.TRIALS_DIR}."
        )
    best_dir = report_lib.trial_run_dir(run_dir, best[0].trial_id)
    best_meta = rundir.read_json(best_dir / rundir.CONFIG_JSON)
    rundir.atomic_write_json(
        run_dir / BEST_CONFIG, {"config": best_meta["config"], "trial": best[0].trial_id, "objective": best[0].score}
    )
    defaults_dir = _defaults_trial(run_dir, oracle) or run_dir / DEFAULTS_DIR
    if not (defaults_dir / rundir.RESULTS_JSON).exists():
        log.info("The recipe's defaults, for comparison on the test split, in %s", defaults_dir)
        train_and_evaluate(config, defaults_dir)
        keras.backend.clear_session()
    max_examples = config.data.max_examples
    test = {
        "best": inference.evaluate_saved(best_dir, max_examples=max_examples),
        "defaults": inference.evaluate_saved(defaults_dir, max_examples=max_examples),
    }
    defaults_history = rundir.read_history(defaults_dir)
    summary.update(
        best={
            "trial": best[0].trial_id,
            "objective": best[0].score,
            "hyperparameters": report_lib.shown_values(best[0], knobs),
            "run_dir": str(best_dir),
            "config": str(run_dir / BEST_CONFIG),
        },
        defaults={
            "run_dir": str(defaults_dir),
            "objective": _maybe_objective(defaults_history, started["objective"]),
            "best_epoch": best_epoch(defaults_history, config.train.monitor),
        },
        test=test,
    )
    rundir.atomic_write_json(run_dir / report_lib.TUNE_JSON, summary)
    report_lib.write_reports(run_dir, summary)
    log.info(
        "Best: trial %s, %s %.4f; test accuracy %.4f (defaults %.4f); report %s",
        best[0].trial_id,
        started["objective"],
        best[0].score,
        test["best"].get("accuracy", float("nan")),
        test["defaults"].get("accuracy", float("nan")),
        run_dir / report_lib.REPORT_HTML,
    )
    return summary


def _defaults_trial(run_dir: Path, oracle) -> Path | None:
    """The finished trial that ran the recipe's defaults exactly (the first, unless Hyperband
    chose), or None."""
    first = oracle.trials.get(next(iter(getattr(oracle, "start_order", [])), None))
    if first is None or str(first.status) != "COMPLETED":
        return None
    defaults = oracle.get_space().values
    values = {k: v for k, v in first.hyperparameters.values.items() if not k.startswith("tuner/")}
    return report_lib.trial_run_dir(run_dir, first.trial_id) if values == defaults else None


def _maybe_objective(history: list[dict[str, Any]], objective: str) -> float | None:
    try:
        return objective_value(history, objective)
    except ConfigError:
        return None
