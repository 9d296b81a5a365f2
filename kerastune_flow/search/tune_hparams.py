"""A search in TensorBoard's HParams view: `tensorboard --logdir DIR/tensorboard` shows every
finished trial in a table and in parallel coordinates, one column per knob searched (with the
domain the search declared) and per metric (the objective, and val_accuracy and val_loss when the
runs log them).

Layout (TensorBoard's own for HParams): the experiment (the knobs and the metrics) in
DIR/tensorboard/, written once per search; one folder per trial, DIR/tensorboard/trial_NNN/,
holding its knob values, its metrics at the epoch where its objective was best (that epoch as the
step), and its end. A trial's folder is written beside (DIR/.tensorboard_partial/) and renamed
into place, so a kill leaves a trial whole or absent, and a folder present is never written
again: a resumed search adds only the trials it has not written (`write_trials` catches up on
any that ended before a kill). Only the process that holds the oracle writes (the chief of a
distributed search), where tune.json is written too.

TensorBoard is a view: a write that fails (a full disk) is a warning and is retried when the next
trial ends, never a lost search.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras_tuner as kt
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hparams_summary

from kerastune_flow import rundir
from kerastune_flow.search import tune_report as report_lib

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # DIR/tensorboard: `tensorboard --logdir DIR/tensorboard`
PARTIAL_DIR = ".tensorboard_partial"  # beside it, so that TensorBoard never reads a half-written trial
VALIDATION_METRICS = ("val_accuracy", "val_loss")  # shown beside the objective when the runs log them
EVENTS_PREFIX = "events.out.tfevents"


def trial_folder_name(trial_id: str) -> str:
    """The TensorBoard run of a trial: trial_NNN (as its run directory, trials/NNN)."""
    return f"trial_{int(trial_id):03d}"


def write_trials(run_dir: str | Path, oracle, knobs: Sequence[Any]) -> list[str]:
    """Writes the finished trials the HParams view lacks (and the experiment, the first time).

    Args:
        run_dir: the search's directory.
        oracle: the search's KerasTuner oracle (its space, objective and trials).
        knobs: the knobs searched (`tune_space.Knob`).

    Returns:
        The trial folders written now (trial_NNN), none when the view was up to date or the write
        failed (a warning is logged; the next call tries again).
    """
    run_dir = Path(run_dir)
    log_dir, partial = run_dir / TENSORBOARD_DIR, run_dir / PARTIAL_DIR
    finished = [
        t
        for t in oracle.trials.values()
        if str(t.status) == kt.engine.trial.TrialStatus.COMPLETED and t.score is not None
    ]
    pending = sorted(
        (t for t in finished if not (log_dir / trial_folder_name(t.trial_id)).exists()), key=lambda t: int(t.trial_id)
    )
    written = []
    try:
        if pending and not _has_experiment(log_dir):
            _write_experiment(
                log_dir, partial, _hparams(oracle, knobs), _metrics(run_dir, pending[0], oracle.objective)
            )
            log.info("The trials in TensorBoard's HParams view: tensorboard --logdir %s", log_dir)
        for trial in pending:
            _write_trial(run_dir, log_dir, partial, trial, knobs, oracle.objective)
            written.append(trial_folder_name(trial.trial_id))
    except (OSError, tf.errors.OpError) as error:
        log.warning(
            "Could not write the trials to TensorBoard in %s (tried again at the next trial): %s", log_dir, error
        )
    shutil.rmtree(partial, ignore_errors=True)  # what a write a kill interrupted left
    return written


def _metrics(run_dir: Path, trial, objective) -> list[hp.Metric]:
    """The objective, then val_accuracy and val_loss when the trial's history logs them."""
    best = _best_record(run_dir, trial, objective.name, objective.direction)
    names = [objective.name, *(m for m in VALIDATION_METRICS if m != objective.name and m in best)]
    return [
        hp.Metric(
            name,
            display_name=f"{name} (objective)" if name == objective.name else name,
            description="The trial's best over its epochs: what the search chooses by."
            if name == objective.name
            else f"At the epoch where the trial's {objective.name} was best.",
            dataset_type=hp.Metric.VALIDATION if name.startswith("val_") else hp.Metric.TRAINING,
        )
        for name in names
    ]


def _has_experiment(log_dir: Path) -> bool:
    return log_dir.is_dir() and any(p.name.startswith(EVENTS_PREFIX) for p in log_dir.iterdir())


def _hparams(oracle, knobs: Sequence[Any]) -> list[hp.HParam]:
    """The knobs as HParams, each with the domain the search declared on KerasTuner."""
    declared = {h.name: h for h in oracle.get_space().space}
    return [hp.HParam(knob.name, _domain(declared.get(knob.name))) for knob in knobs]


def _domain(declared) -> hp.Domain | None:
    """TensorBoard's domain of a KerasTuner hyperparameter (None when it has no such domain)."""
    types = kt.engine.hyperparameters
    if isinstance(declared, types.Float):
        return hp.RealInterval(float(declared.min_value), float(declared.max_value))
    if isinstance(declared, types.Int):
        return hp.IntInterval(int(declared.min_value), int(declared.max_value))
    if isinstance(declared, types.Choice):
        return hp.Discrete(list(declared.values))
    if isinstance(declared, types.Boolean):
        return hp.Discrete([False, True])
    return None


def _write_experiment(log_dir: Path, partial: Path, hparams: list[hp.HParam], metrics: list[hp.Metric]) -> None:
    """The experiment's event file, written beside and moved into DIR/tensorboard/."""
    folder = _fresh(partial / "experiment")
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()
    log_dir.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        path.replace(log_dir / path.name)


def _write_trial(run_dir: Path, log_dir: Path, partial: Path, trial, knobs: Sequence[Any], objective) -> None:
    """One trial's folder: its knob values, its metrics at its best epoch, its end."""
    name = trial_folder_name(trial.trial_id)
    folder = _fresh(partial / name)
    best = _best_record(run_dir, trial, objective.name, objective.direction)
    values = {**{m: best[m] for m in VALIDATION_METRICS if best.get(m) is not None}, objective.name: trial.score}
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default():
        hp.hparams(report_lib.shown_values(trial, knobs), trial_id=name)
        for metric, value in values.items():
            tf.summary.scalar(metric, float(value), step=int(best.get("epoch", 0)))
        end = hparams_summary.session_end_pb(api_pb2.STATUS_SUCCESS)
        tf.summary.experimental.write_raw_pb(end.SerializeToString(), step=0)
    writer.close()
    log_dir.mkdir(parents=True, exist_ok=True)
    folder.replace(log_dir / name)


def _best_record(run_dir: Path, trial, objective: str, direction: str) -> dict[str, Any]:
    """The trial's history record of the epoch where its objective was best ({} without one)."""
    history = [
        r
        for r in rundir.read_history(report_lib.trial_run_dir(run_dir, trial.trial_id))
        if r.get(objective) is not None
    ]
    if not history:
        return {}
    pick = min if direction == "min" else max
    return pick(history, key=lambda r: r[objective])


def _fresh(folder: Path) -> Path:
    """An empty `folder` (what a killed write left there removed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
