"""What a search leaves for people: DIR/tune.json (every trial with its hyperparameters,
objective, best epoch, epochs run, seconds and status), DIR/report.md and a self-contained
DIR/report.html (the trials sorted by objective, the objective over trials, each
hyperparameter against the objective, the best against the defaults on the test split), and the
line each finished trial logs (`trial_line`)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerastune_flow import reports, rundir
from kerastune_flow.errors import ConfigError
from kerastune_flow.reports import plots

TUNE_JSON = "tune.json"
OBJECTIVES = ("val_accuracy", "val_loss", "accuracy", "loss")
# After a search, a mean difference (tuned minus defaults, over the final seeds) under this many
# standard errors is reported as within noise (about a 95 % interval).
NOISE_STANDARD_ERRORS = 2.0
TRIALS_DIR = "trials"


def trial_run_dir(run_dir: str | os.PathLike, trial_id: str) -> Path:
    """DIR/trials/NNN: the run directory of one trial (with --folds K, of its K runs)."""
    return Path(run_dir) / TRIALS_DIR / f"{int(trial_id):03d}"


def fold_run_dirs(trial_dir: Path, folds: int) -> list[Path]:
    """The run directories of a trial: the trial's own, or with `folds` > 1 one per fold
    (DIR/trials/NNN/fold-k, k from 0), each a whole run that resumes on its own."""
    return [trial_dir] if folds <= 1 else [trial_dir / f"fold-{k}" for k in range(folds)]


def objective_value(history: list[dict[str, Any]], objective: str) -> float:
    """The objective's best value over a run's epochs, as KerasTuner scores a Keras fit."""
    values = [r[objective] for r in history if r.get(objective) is not None]
    if not values:
        raise ConfigError(f"The runs log no {objective!r}; choose --objective from {', '.join(OBJECTIVES)}.")
    return float(min(values) if "loss" in objective else max(values))


def fold_records(trial_dir: Path, folds: int, objective: str) -> list[dict[str, Any]]:
    """Each finished fold run of a trial: its objective, best epoch, epochs and training seconds."""
    records = []
    for k, fold_dir in enumerate(fold_run_dirs(trial_dir, folds)):
        if not (fold_dir / rundir.RESULTS_JSON).exists():
            continue
        results = rundir.read_json(fold_dir / rundir.RESULTS_JSON)
        records.append(
            {
                "fold": k,
                "objective": objective_value(rundir.read_history(fold_dir), objective),
                "best_epoch": results.get("best_epoch"),
                "epochs_run": results.get("epochs_run"),
                "seconds": results.get("train_seconds"),
            }
        )
    return records


def spread(values: Sequence[float]) -> float | None:
    """The sample standard deviation of `values` (the folds' objectives, the seeds' differences);
    None under two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def shown_values(trial, knobs: Sequence[Any]) -> dict[str, Any]:
    """A trial's hyperparameters by knob name (KerasTuner's own "tuner/..." entries left out)."""
    values = trial.hyperparameters.values
    return {knob.name: values[knob.name] for knob in knobs if knob.name in values}


def trial_records(
    run_dir: Path, oracle, knobs: Sequence[Any], *, folds: int = 1, objective: str = ""
) -> list[dict[str, Any]]:
    """One record per trial the oracle started, in the order it started them; with `folds` > 1,
    each fold's record (`fold_records`) and the folds' spread."""
    records = []
    order = list(getattr(oracle, "start_order", [])) or sorted(oracle.trials)
    for trial_id in order:
        trial = oracle.trials[trial_id]
        trial_dir = trial_run_dir(run_dir, trial_id)
        record = {"trial": trial_id, "status": str(trial.status), "hyperparameters": shown_values(trial, knobs)}
        record["objective"] = trial.score
        if folds > 1:  # the mean over the folds is the objective; each fold's own, and their spread
            runs = fold_records(trial_dir, folds, objective)
            seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
            record.update(best_epoch=None, epochs_run=sum(r["epochs_run"] or 0 for r in runs) or None)
            record.update(seconds=round(sum(seconds), 3) if seconds else None, folds=runs)
            record["spread"] = spread([r["objective"] for r in runs])
        else:
            results_path = trial_dir / rundir.RESULTS_JSON
            results = rundir.read_json(results_path) if results_path.exists() else {}
            record.update(best_epoch=results.get("best_epoch"), epochs_run=results.get("epochs_run"))
            record["seconds"] = results.get("train_seconds")
        records.append({**record, "run_dir": str(trial_dir)})
    return records


def write_tune_json(run_dir: Path, oracle, started: dict[str, Any], knobs: Sequence[Any]) -> dict[str, Any]:
    """Writes DIR/tune.json as the oracle knows the search now; returns it."""
    run_dir = Path(run_dir)
    direction = oracle.objective.direction
    folds = started.get("folds") or 1
    summary = {
        **started,
        "direction": direction,
        "space": [knob.name for knob in knobs],
        "scales": {knob.name: knob.scale for knob in knobs},
        "seconds": round(oracle.spent_seconds(), 1),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "trials": trial_records(run_dir, oracle, knobs, folds=folds, objective=started["objective"]),
    }
    rundir.atomic_write_json(run_dir / TUNE_JSON, summary)
    return summary


def _sorted_trials(summary: dict[str, Any]) -> list[dict[str, Any]]:
    sign = -1 if summary["direction"] == "max" else 1
    done = [t for t in summary["trials"] if t["objective"] is not None]
    rest = [t for t in summary["trials"] if t["objective"] is None]
    return sorted(done, key=lambda t: sign * t["objective"]) + rest


def display_value(value: Any) -> str:
    """A hyperparameter as people read it: a float to 3 significant digits (0.30000000000000004
    reads 0.3, 0.0015848931924611134 reads 0.00158), anything else as it is. tune.json and
    best_config.json keep the exact values."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def display_values(values: dict[str, Any]) -> str:
    """Hyperparameters as "name=value, ..." (see `display_value`)."""
    return ", ".join(f"{name}={display_value(value)}" for name, value in values.items())


def trial_line(
    trial_id: str,
    values: dict[str, Any],
    objective: str,
    value: float,
    *,
    best: tuple[str, float] | None,
    seconds: float,
    train_seconds: float | None = None,
    minutes_left: float | None = None,
    folds: Sequence[float] | None = None,
) -> str:
    """The log line of one finished trial: its settings, its objective, how it stands against the
    best earlier trial, and its time.

    Args:
        trial_id: the trial's id.
        values: its hyperparameters by name.
        objective: the objective's name ("loss" in it: lower is better).
        value: this trial's objective.
        best: (trial id, objective) of the best trial finished before this one, or None.
        seconds: the trial's wall time (reading the data, building the model, training).
        train_seconds: the part of it spent in fit (tune.json's "seconds", the report's "training s").
        minutes_left: the search's time budget left, or None without one.
        folds: with --folds K, each fold's objective (`value` is their mean).

    Returns:
        One line, e.g. "Trial 2: dropout=0.3 -> val_accuracy 0.9832, new best (was 0.9274, trial 0);
        6.3 s, training 4.3 s".
    """
    shown = display_values(values)
    if best is None:
        standing = "best so far (the first result)"
    else:
        better = value < best[1] if "loss" in objective else value > best[1]
        if better:
            standing = f"new best (was {best[1]:.4f}, trial {best[0]})"
        else:
            standing = f"best so far {best[1]:.4f} (trial {best[0]})"
    timing = f"{seconds:.1f} s" + (f", training {train_seconds:.1f} s" if train_seconds is not None else "")
    left = f"; {minutes_left:.1f} min left" if minutes_left is not None else ""
    score = f"{objective} {value:.4f}"
    if folds and len(folds) > 1:
        score += f" (mean of {len(folds)} folds: {', '.join(f'{v:.4f}' for v in folds)}; sd {spread(folds):.4f})"
    return f"Trial {trial_id}: {shown} -> {score}, {standing}; {timing}{left}"


def _table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = summary["space"]
    folds = summary.get("folds") or 1
    shown = f"{summary['objective']} (mean of {folds} folds)" if folds > 1 else summary["objective"]
    header = ["trial", *names, shown, *(["spread (sd)"] if folds > 1 else []), "best epoch", "epochs", "training s"]
    header.append("status")
    rows = [
        [
            t["trial"],
            *["-" if n not in t["hyperparameters"] else display_value(t["hyperparameters"][n]) for n in names],
            reports.cell(t["objective"], "{:.4g}"),
            *([reports.cell(t.get("spread"), "{:.3g}")] if folds > 1 else []),
            reports.cell(t["best_epoch"]),
            reports.cell(t["epochs_run"]),
            reports.cell(t["seconds"], "{:.1f}"),
            t["status"].lower(),
        ]
        for t in _sorted_trials(summary)
    ]
    return header, rows


def summary_lines(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """The findings in sentences: the best trial, the test figures, the budget, how to replay."""
    best, test = summary["best"], summary["test"]
    values = display_values(best["hyperparameters"])
    finished = sum(t["status"] == "COMPLETED" for t in summary["trials"])
    lines = [
        f"Best: trial {best['trial']} ({values}), {summary['objective']} {best['objective']:.4f}.",
        f"Test accuracy: {100 * test['best']['accuracy']:.2f} % tuned against "
        f"{100 * test['defaults']['accuracy']:.2f} % with the recipe's defaults, on the same "
        f"{test['best']['examples']} test images (looked at once, after the search).",
        *([seeds_sentence(summary["test_seeds"])] if "test_seeds" in summary else []),
        f"Budget: {finished} trial(s) finished of {summary['trials_asked']} asked"
        + (f", {summary['max_minutes']:g} minutes allowed" if summary.get("max_minutes") else "")
        + f"; {summary['seconds'] / 60:.1f} minutes searched; seed {summary['seed']}; tuner {summary['tuner']}.",
        "Training s: each trial's time in fit (its epochs, validation included); the trial time the log "
        "shows also counts loading the data and building the model.",
        f"Replay the best: kerastune-flow train {summary['recipe']} --config {run_dir / 'best_config.json'}",
    ]
    return lines


def write_reports(run_dir: str | os.PathLike, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Writes the plots, report.md and report.html (with its plots inlined) beside tune.json."""
    run_dir = Path(run_dir)
    figures = plots.tuning_plots(summary, run_dir)
    header, rows = _table(summary)
    title = f"Tuning {summary['recipe']}"
    page = reports.Report(
        title=title,
        findings=summary_lines(summary, run_dir),
        header=header,
        rows=rows,
        figures=figures,
        page_title=f"kerastune_flow: {title}",
    )
    return page.write(run_dir)


def difference(best: Sequence[float], defaults: Sequence[float]) -> dict[str, Any]:
    """The best's test accuracy minus the defaults', seed by seed: the mean, its spread (sample sd),
    its standard error, and whether it is within noise (under `NOISE_STANDARD_ERRORS` standard
    errors; with one seed there is no spread to judge by: None)."""
    diffs = np.asarray(best, dtype=float) - np.asarray(defaults, dtype=float)
    mean = float(diffs.mean())
    sd = spread(diffs)
    se = sd / math.sqrt(diffs.size) if sd is not None else None
    within = None if se is None else bool(abs(mean) <= NOISE_STANDARD_ERRORS * se)
    return {
        "best_mean": float(np.mean(best)),
        "defaults_mean": float(np.mean(defaults)),
        "differences": [float(d) for d in diffs],
        "mean": mean,
        "sd": sd,
        "standard_error": se,
        "within_noise": within,
    }


def seeds_sentence(comparison: dict[str, Any]) -> str:
    """The comparison over seeds in one sentence, the verdict plainly."""
    acc = comparison.get("accuracy")
    seeds = len(comparison["seeds"])
    if acc is None:
        return f"The best and the defaults were each trained with {seeds} seed(s); they log no accuracy to compare."
    points = 100 * acc["mean"]
    said = (
        f"Over {seeds} seed(s) on the whole training split, test accuracy {100 * acc['best_mean']:.2f} % tuned "
        f"against {100 * acc['defaults_mean']:.2f} % with the defaults: {points:+.2f} points"
    )
    if acc["standard_error"] is None:
        return said + " (one seed: no spread to judge it by; --final-seeds 3 gives one)."
    said += f" (sd {100 * acc['sd']:.2f}, standard error {100 * acc['standard_error']:.2f} over the seeds)"
    if acc["within_noise"]:
        return said + f": within noise (under {NOISE_STANDARD_ERRORS:g} standard errors), not a shown gain."
    verdict = "better" if points > 0 else "worse"
    return said + f": the tuned settings are {verdict} beyond the noise ({NOISE_STANDARD_ERRORS:g} standard errors)."
