"""`tune`: a KerasTuner search over the knobs the articles say decide the result.

KerasTuner drives the search (its side, the oracle and the Tuner, is in tuner.py), and one trial
is one whole run of the package's own training, `train_and_evaluate` in `DIR/trials/NNN/`, with
everything a run has: logs, curves, the best model, exact resume, the bad-input checks. Both
stages of a fine-tune are one trial. The knobs are in tune_space.py, the report in tune_report.py,
TensorBoard's HParams view of the trials (DIR/tensorboard/) in tune_hparams.py.

The test split is never looked at during the search: trials choose by validation. At the end
the best trial's settings are written to `DIR/best_config.json` (the shape of a run's
config.json, so `train RECIPE --config DIR/best_config.json` replays it), and the best model and
a run of the recipe's defaults are each evaluated once on the test split.

A search killed at any moment resumes with the same command: KerasTuner reloads its trials, no
finished trial runs again, and the interrupted trial's run directory resumes at its last
finished epoch (KerasTuner alone reruns it from the start, keras-tuner#439). The oracle's and
the trials' files are written atomically, so a kill never leaves one half-written.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from kerastune_flow import data as data_lib
from kerastune_flow import rundir
from kerastune_flow.config import Config, new_seed
from kerastune_flow.config.settings import TRACKING_FIELDS
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.runtime import environment, process
from kerastune_flow.search import tune_final as final
from kerastune_flow.search import tune_hparams as hparams_lib
from kerastune_flow.search import tune_report as report_lib
from kerastune_flow.search import tuner as tuner_lib
from kerastune_flow.search.tune_report import OBJECTIVES, objective_value
from kerastune_flow.search.tune_space import Knob, SearchSpace, current_knob_names, resolve_space, unfreeze_choices
from kerastune_flow.search.tuner import TUNERS
from kerastune_flow.training import tracking
from kerastune_flow.training.train import best_epoch, check_before_data, check_callbacks

log = logging.getLogger(__name__)

SEARCH_JSON = "search.json"  # what the search was started with: the same command resumes it
BEST_CONFIG = "best_config.json"
DEFAULTS_DIR = "defaults"
BEST_DIR = "best"  # with --folds: the best settings trained on the whole training split
DEFAULT_TRIALS = 10


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
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    final_seeds: int = final.FINAL_SEEDS,
    **overrides: Any,
) -> dict[str, Any]:
    """Searches the recipe's knobs and writes tune.json, best_config.json and the report.

    Args:
        recipe: one of the recipes.
        run_dir: the search's directory; the same call resumes an interrupted search there.
        tuner: bayesian, random or hyperband (KerasTuner's oracles).
        trials: at most this many trials.
        max_minutes: stop starting trials once the search has run this long (over all sessions).
        space: knob names to search (default: the recipe's `space`); see `tune_space.KNOBS`.
        objective: a validation metric the runs log (the test split is never used to choose).
        preset: a config preset, as for train.
        callbacks: your own Keras callbacks, for every trial's fits and the defaults' run (see
            `train_and_evaluate`).
        final_seeds: seeds of the best's and the defaults' whole-split runs judged on test (`tune_final`).
        **overrides: config fields fixed for every trial (a knob given here is not searched).

    Returns:
        The summary written to tune.json, with "best" and "test" filled in.

    Raises:
        ConfigError: a bad tuner, objective, space or setting; DataError and the rest as `train` raises them.
    """
    spec = get_recipe(recipe)
    _check_search_flags(tuner, objective, trials, max_minutes, final_seeds)
    callbacks = check_callbacks(callbacks)  # refused before anything is written, as train refuses them
    space = current_knob_names(space)
    run_dir = Path(run_dir)
    worker = tuner_lib.is_worker()  # a distributed search's chief holds the folder for its workers
    if not worker:
        rundir.claim_dir(run_dir, kinds=("search",))
    # The data and the settings checked before anything is written: a typo leaves no search behind.
    given = make_config(recipe, preset, **overrides)
    check_before_data(given)
    tracking.require(given)
    # Before reading the data starts TensorFlow: then the process still sets its threads itself.
    process.prepare_process(given.train.strategy, deterministic=given.train.deterministic)
    folds = _folds(given, data_lib.load_splits(given).sizes, overrides, run_dir / SEARCH_JSON)
    with rundir.run_lock(run_dir, take=not worker):  # released at the end, on errors and Ctrl-C too
        asked = search_settings(recipe, tuner=tuner, objective=objective, preset=preset, space=space, **overrides)
        budget = dict(trials_asked=trials, max_minutes=max_minutes, final_seeds=final_seeds)  # may change on resume
        started = _search_record(run_dir, {**asked, "folds": folds}, budget=budget)
        fixed = _fixed_settings(recipe, preset, objective, started["seed"], {**overrides, "folds": folds})
        config = make_config(recipe, preset, **fixed)
        knobs = resolve_space(spec, space, fixed=tuple(overrides))
        blocks = unfreeze_choices(config) if any(k.name == "unfreeze_at" for k in knobs) else []
        oracle = tuner_lib.make_oracle(
            tuner, objective, trials=trials, epochs=config.train.epochs, seed=started["seed"], max_minutes=max_minutes
        )
        oracle.on_trial_ended = lambda: _trial_ended(run_dir, oracle, started, knobs)
        search = _run_tuner(oracle, SearchSpace(knobs, config, blocks), run_dir, objective, callbacks)
        _log_start(recipe, tuner, knobs, trials, max_minutes, objective)
        # --track mlflow: the search's parent run, each trial a nested run (a worker's nest in the chief's).
        with tracking.parent_run(config, run_dir, experiment=recipe, params=started, join=worker) as parent:
            try:
                if tuner_lib.is_chief():
                    tuner_lib.serve(oracle)
                else:
                    search.search(verbose=0)
            except tuner_lib.TrialUserError as error:
                raise error.error from None
            if worker:  # the chief writes the summary once every trial has ended
                return {"worker": environment.read(environment.KERASTUNER_TUNER_ID) or None}
            summary = finish(run_dir, oracle, started, knobs, config, callbacks=callbacks)
            _track_summary(parent, run_dir, summary)
            return summary


def _log_start(recipe: str, tuner: str, knobs: Sequence[Knob], trials: int, minutes: float | None, objective: str):
    names = ", ".join(k.name for k in knobs)
    budget = f"{trials} trials" + (f", {minutes:g} min" if minutes else "")
    log.info("Searching %s with %s over %s (%s), objective %s", recipe, tuner, names, budget, objective)


def _run_tuner(
    oracle, space: SearchSpace, run_dir: Path, objective: str, callbacks: Sequence[keras.callbacks.Callback] | None
) -> tuner_lib.RunTuner:
    """The search's KerasTuner Tuner; an interrupted search's trials reloaded (the log says so)."""
    with contextlib.redirect_stdout(io.StringIO()) as chatter:  # KerasTuner prints; the log says it once
        search = tuner_lib.RunTuner(
            oracle, space, run_dir, objective=objective, epochs_field="epochs", run_callbacks=callbacks
        )
    if "Reloading" in chatter.getvalue():
        done = sum(t.status == "COMPLETED" for t in oracle.trials.values())
        log.info("Resuming the search in %s: %d trial(s) finished, none is run again", run_dir, done)
    return search


def _track_summary(parent: tracking.Tracker, run_dir: Path, summary: dict[str, Any]) -> None:
    """The search's result on its parent MLflow run: the best trial and objective, both on the
    test split, and the search's files."""
    best, test = summary["best"], summary["test"]
    parent.set_tags({"best_trial": best["trial"]})
    numbers = {f"best_{summary['objective']}": best["objective"]}
    numbers.update({f"test_{k}_{which}": v for which in ("best", "defaults") for k, v in test[which].items()})
    parent.log_metrics({k: v for k, v in numbers.items() if isinstance(v, (int, float))})
    names = (report_lib.TUNE_JSON, BEST_CONFIG, "report.md", "report.html")
    parent.log_files(run_dir / name for name in names)


def _check_search_flags(tuner: str, objective: str, trials: int, max_minutes: float | None, seeds: int = 1) -> None:
    """Refuses an unknown tuner or objective, and a budget or a seed count that is not positive."""
    if tuner not in TUNERS:
        raise ConfigError(f"--tuner must be one of {', '.join(TUNERS)}. Received: tuner={tuner}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}. Received: objective={objective}")
    if trials < 1 or (max_minutes is not None and max_minutes <= 0):
        raise ConfigError(f"--trials and --max-minutes must be positive. Received: trials={trials}, {max_minutes=}")
    if seeds < 1:
        raise ConfigError(f"--final-seeds must be at least 1. Received: final_seeds={seeds}")


def _folds(given: Config, sizes: dict[str, int], overrides: dict[str, Any], record: Path | None = None) -> int:
    """The folds each trial cross-validates over: --folds; a resumed search's own (`record`, its
    search.json: one hold-out for a search from before folds); or by the data's size
    (`data.default_folds`). The log says which and why.

    Raises:
        ConfigError: --fold given (a search runs every fold).
    """
    if "fold" in overrides:
        raise ConfigError(f"tune runs every fold of --folds; leave --fold out. Received: fold={overrides['fold']}")
    images = sizes["train"] + sizes["validation"]
    if given.data.folds:
        folds, why = given.data.folds, f"folds={given.data.folds} given"
    elif record is not None and record.is_file():
        folds, why = rundir.read_json(record).get("folds") or 1, f"as the search in {record.parent} started"
    else:
        folds = data_lib.default_folds(sizes)
        why = f"{images:,} training and validation images, {'under' if folds > 1 else 'at least'} "
        why += f"{data_lib.FOLDS_BELOW:,}"
    if folds > 1:
        log.info("Each trial cross-validates over %d stratified folds (%s): its score is their mean", folds, why)
    else:
        log.info("Each trial holds out one validation split (%s; --folds K cross-validates)", why)
    return folds


def _fixed_settings(recipe: str, preset: str, objective: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings every trial shares: the flags given, the search's seed and folds, and a
    validation split when the objective is a validation metric (a fold is one with --folds).

    Raises:
        ConfigError: a validation objective with --validation-fraction 0 given, without folds.
    """
    fixed = {**overrides, "seed": seed}
    if (fixed.get("folds") or 1) > 1:
        return fixed
    if objective.startswith("val_") and make_config(recipe, preset, **fixed).data.validation_fraction == 0:
        if "validation_fraction" in overrides:
            raise ConfigError(
                "tune chooses by validation, so --validation-fraction must be above 0. Received: validation_fraction=0"
            )
        fixed["validation_fraction"] = 0.1  # the from-scratch recipes hold none out by default
    return fixed


def search_settings(
    recipe: str, *, tuner: str, objective: str, preset: str, space: Sequence[str] | None, **overrides: Any
) -> dict[str, Any]:
    """What a search is started with (search.json's settings): the same command resumes it."""
    space = current_knob_names(space, warn=False)  # an old knob name is the same search as its new one
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
        previous.setdefault("folds", 1)  # a search from before --folds held out one validation split
        differs = {k for k in set(previous) | set(started) if previous.get(k) != started.get(k)}
        differs -= set(TRACKING_FIELDS)  # where the search is recorded may change, not what it is
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


def _trial_ended(run_dir: Path, oracle, started: dict[str, Any], knobs: Sequence[Knob]) -> None:
    """Whenever a trial ends, where the oracle runs (a distributed search's chief): tune.json and
    TensorBoard's HParams view brought up to date."""
    report_lib.write_tune_json(run_dir, oracle, started, knobs)
    hparams_lib.write_trials(run_dir, oracle, knobs)


def finish(
    run_dir: Path,
    oracle,
    started: dict[str, Any],
    knobs: Sequence[Knob],
    config: Config,
    *,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> dict[str, Any]:
    """After the search: the best trial's config; the best and the defaults trained on the whole
    training split with the search's final seeds (`tune_final`) and each run evaluated once on the
    test split; tune.json and the reports. `callbacks` go to every run trained here."""
    summary = report_lib.write_tune_json(run_dir, oracle, started, knobs)
    hparams_lib.write_trials(run_dir, oracle, knobs)  # a trial a kill left out of TensorBoard
    best = oracle.get_best_trials(1)
    if not best:
        raise ConfigError(
            f"No trial of the search in {run_dir} finished; see the trials' logs in {run_dir / report_lib.TRIALS_DIR}."
        )
    folds = started.get("folds") or 1
    best_dir = report_lib.trial_run_dir(run_dir, best[0].trial_id)
    best_config = rundir.read_json(report_lib.fold_run_dirs(best_dir, folds)[0] / rundir.CONFIG_JSON)["config"]
    if folds > 1:  # replayed, the best settings train one run on the whole training split
        best_config["data"].update(folds=None, fold=0)
    record = {"config": best_config, "trial": best[0].trial_id, "objective": best[0].score}
    rundir.atomic_write_json(run_dir / BEST_CONFIG, record)
    defaults_trial = _defaults_trial(run_dir, oracle)
    defaults_dir = (defaults_trial if folds == 1 else None) or run_dir / DEFAULTS_DIR
    best_is_defaults = defaults_trial == best_dir
    whole = Config.from_dict(best_config)
    if folds > 1:  # each fold's model saw part of the data: the best settings train once more on all of it
        best_dir = defaults_dir if best_is_defaults else run_dir / BEST_DIR
        if not best_is_defaults:
            final.train_once(whole, best_dir, "The best trial's settings", callbacks)
    defaults_config = config.replace(folds=None, fold=0)
    final.train_once(defaults_config, defaults_dir, "The recipe's defaults", callbacks)
    runs = final.seed_runs(
        run_dir,
        (whole, best_dir),
        (defaults_config, defaults_dir),
        seeds=started.get("final_seeds") or 1,
        callbacks=callbacks or (),
    )
    seeds = final.evaluate_seeds(runs, max_examples=config.data.max_examples)
    test = {"best": seeds["best"][0], "defaults": seeds["defaults"][0]}  # the search's own seed
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
        test_seeds=seeds,
    )
    rundir.atomic_write_json(run_dir / report_lib.TUNE_JSON, summary)
    _, html_path = report_lib.write_reports(run_dir, summary)
    log.info(
        "Best: trial %s, %s %.4f; test accuracy %.4f (defaults %.4f); report %s",
        best[0].trial_id,
        started["objective"],
        best[0].score,
        test["best"].get("accuracy", float("nan")),
        test["defaults"].get("accuracy", float("nan")),
        html_path,
    )
    log.info("%s", report_lib.seeds_sentence(seeds))
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
