"""`train_and_evaluate(config, run_dir)`: the one function the CLI, notebooks and tests call.

It chooses the strategy, sets the run up (`setup.py`: data, pipelines, the model built in the
strategy's scope), fits the recipe's stages (each compiles what it fits once its rate is known:
`fitting.compile_stage`; two fits with a compile between them for a staged recipe, see
`finetune.py`), evaluates on the test split, and leaves a complete run directory (see `rundir`),
recorded in MLflow too with `track="mlflow"` (`tracking.py`).
Running the same call again after a crash resumes from the last finished epoch (`resume.py`).
`deploy/inference.py` uses the run directory afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir
from kerastune_flow.config import Config
from kerastune_flow.errors import KerastuneFlowError
from kerastune_flow.reports import plots
from kerastune_flow.runtime import process
from kerastune_flow.runtime.device import DeviceSettings, dtype_policy
from kerastune_flow.runtime.strategy import barrier, describe, get_strategy, is_chief
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import finetune, fitting, resume, tracking
from kerastune_flow.training.guards import InterruptGuard
from kerastune_flow.training.setup import RunSetup, run_settings, set_up, with_seed

# The set-up's steps, also reached from here (their former home) by tune and the tests.
from kerastune_flow.training.setup import build_model as build_model
from kerastune_flow.training.setup import check_before_data as check_before_data
from kerastune_flow.training.setup import load_base as load_base
from kerastune_flow.training.setup import make_pipelines as make_pipelines
from kerastune_flow.training.stages import FIRST_STAGE, resolve_steps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run directory.
        model: the trained model (best weights when early stopping is on).
        history: one dict per epoch, as in history.jsonl.
        results: the content of results.json.
    """

    run_dir: Path
    model: keras.Model
    history: list[dict[str, Any]]
    results: dict[str, Any]

    @property
    def test_metrics(self) -> dict[str, float]:
        return self.results["test"]


# --------------------------------------------------------------------------- the run


def train_and_evaluate(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    evaluate_test: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    workdir: str | Path | None = None,
) -> RunResult:
    """Trains the configured recipe and leaves a complete run directory.

    Running the same call again after a crash resumes from the last finished epoch.

    Args:
        config: what to train and how (see `recipes.make_config`).
        run_dir: the run directory.
        overwrite: replace a finished run in `run_dir` instead of refusing.
        evaluate_test: False leaves the test split unseen (`results["test"]` is None): a tuning
            trial must choose by validation only.
        callbacks: your own Keras callbacks (e.g. `WandbMetricsLogger()`), called in every fit of
            the run, both stages of a fine-tune, after the package's own: when one sees an epoch
            end, that epoch is already in history.jsonl, model.keras and the resume backup (and in
            MLflow with `track="mlflow"`); Keras' progress bar comes last. In the frozen stage
            on cached features the fit trains the head alone, so there `self.model` is the head
            model (features in), not the whole model. Not called in a learning-rate range test's
            steps, and not saved in config.json. A resumed run calls them from the epoch it resumes at.
        workdir: `run_dir`'s former name (flax's), kept one release; it warns.

    Returns:
        RunResult with the model, history and results.

    Raises:
        KerastuneFlowError: (a subclass) for every user error: data, weights, strategy, run dir.
        TypeError: without a run directory, with both names, or `callbacks` that are not a
            sequence of Keras callbacks.
    """
    if workdir is not None:
        warnings.warn("`workdir=` is now `run_dir=`; the old name goes in the next release.", DeprecationWarning, 2)
        if run_dir is not None:
            raise TypeError(f"Pass run_dir only. Received: run_dir={run_dir}, workdir={workdir}")
        run_dir = workdir
    if run_dir is None:
        raise TypeError("train_and_evaluate needs a run directory. Received: run_dir=None")
    extra = check_callbacks(callbacks)
    tracking.require(config)  # mlflow missing: one sentence, before anything runs
    process.prepare_process(config.train.strategy, deterministic=config.train.deterministic)
    strategy = get_strategy(config.train.strategy)  # first: multi-worker collectives precede any op
    chief = is_chief(strategy)  # the other workers of a cluster write private folders: no lock
    if chief:  # refused before anything is written
        rundir.claim_dir(run_dir, kinds=rundir.RUN_KINDS, overwrite=overwrite)
    with rundir.run_lock(run_dir, take=chief):
        return _locked_run(config, run_dir, strategy, overwrite=overwrite, evaluate_test=evaluate_test, callbacks=extra)


def _locked_run(
    config: Config,
    given_dir: str | Path,
    strategy: tf.distribute.Strategy,
    *,
    overwrite: bool,
    evaluate_test: bool,
    callbacks: tuple[keras.callbacks.Callback, ...],
) -> RunResult:
    config = with_seed(config, given_dir, strategy)
    keras.utils.set_random_seed(config.train.seed)
    if is_chief(strategy):
        run_dir = Path(given_dir)
        resumed = rundir.prepare_run_dir(run_dir, overwrite=overwrite)
    else:
        run_dir, resumed = resume.worker_copy(given_dir), False
    if resumed:
        log.info("Found a backup in %s: resuming the interrupted run", run_dir)
    settings, config = run_settings(config, strategy)
    try:
        with dtype_policy(settings.dtype_policy), cb.interrupt_guard() as guard:
            return _train_and_evaluate(config, run_dir, strategy, resumed, settings, evaluate_test, guard, callbacks)
    except KerastuneFlowError:
        raise
    except (OSError, tf.errors.OpError) as error:
        translated = _translate_runtime_error(error, run_dir)
        if translated is None:
            raise
        raise translated from None
    finally:
        if not is_chief(strategy):
            shutil.rmtree(run_dir, ignore_errors=True)


def check_callbacks(callbacks: Sequence[keras.callbacks.Callback] | None) -> tuple[keras.callbacks.Callback, ...]:
    """The user's callbacks as a tuple, checked before anything runs.

    Raises:
        TypeError: for anything but a sequence of `keras.callbacks.Callback`.
    """
    if callbacks is None:
        return ()
    if isinstance(callbacks, keras.callbacks.Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks= takes a list of Keras callbacks. Received: callbacks={callbacks!r}")
    wrong = [c for c in callbacks if not isinstance(c, keras.callbacks.Callback)]
    if wrong:
        raise TypeError(f"callbacks= takes keras.callbacks.Callback objects only. Received: {wrong[0]!r}")
    return tuple(callbacks)


def _translate_runtime_error(error: Exception, run_dir: Path) -> KerastuneFlowError | None:
    """The user error behind an exception raised while training or evaluating, or None
    when it is not one (then it is a bug, and travels on unchanged)."""
    if isinstance(error, tf.errors.InvalidArgumentError):
        return data_lib.label_range_error(error)
    if isinstance(error, (OSError, tf.errors.OpError)) and rundir.is_disk_full(error):
        return rundir.write_error(run_dir, "a checkpoint or log", error)
    return None


def _train_and_evaluate(
    config: Config,
    run_dir: Path,
    strategy: tf.distribute.Strategy,
    resumed: bool,
    settings: DeviceSettings,
    evaluate_test: bool,
    guard: InterruptGuard,
    callbacks: tuple[keras.callbacks.Callback, ...],
) -> RunResult:
    _log_settings(config, strategy, settings)
    run = set_up(config, run_dir, strategy, settings, guard, callbacks)
    config, splits = run.config, run.splits
    log.info(
        "Data %s: %s train / %s validation / %s test, %d classes, images %s",
        splits.source,
        splits.sizes["train"],
        splits.sizes["validation"],
        splits.sizes["test"],
        splits.num_classes,
        "x".join(map(str, splits.image_shape)),
    )
    metadata = _metadata(run, strategy, settings)
    # Only now, with the data read and the model built, does an overwritten run go.
    rundir.clear_finished_run(run_dir)
    rundir.atomic_write_json(run_dir / rundir.CONFIG_JSON, metadata)
    tracker = tracking.Tracker()  # only the chief tracks
    if is_chief(strategy):
        tracker = tracking.start(config, run_dir, experiment=config.model.recipe, continue_run=resumed)
    with tracking.tracked(tracker):
        tracker.log_params(tracking.config_params(config))
        if tracker.active:  # after the package's own callbacks, before the user's
            epochs = tracking.EpochMetrics(tracker, run_dir)
            run.context = dataclasses.replace(run.context, callbacks=(epochs, *run.context.callbacks))
        result = _fit_and_evaluate(run, strategy, settings, resumed=resumed, evaluate_test=evaluate_test)
        tracking.log_run_results(tracker, run_dir, result.results, result.history)
    resume.discard(run_dir)
    barrier(strategy)
    if result.results["test"] is not None:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.results["test"].items())
        log.info("Test %s; run directory %s", shown, run_dir)
    return result


def _fit_and_evaluate(
    run: RunSetup, strategy: tf.distribute.Strategy, settings: DeviceSettings, *, resumed: bool, evaluate_test: bool
) -> RunResult:
    """Fits the recipe's stages, evaluates, and writes results.json, curves.png and the model."""
    config, splits, run_dir = run.config, run.splits, run.context.run_dir
    start = time.perf_counter()
    boundaries = _fit(run)
    train_seconds = time.perf_counter() - start

    model = run.model
    test = model.evaluate(run.pipes["test"], verbose=0, return_dict=True) if evaluate_test else None
    history = rundir.read_history(run_dir)
    results = {
        "recipe": config.model.recipe,
        "test": {k: float(v) for k, v in test.items()} if test is not None else None,
        "train_seconds": round(train_seconds, 3),
        "epochs_run": len(history),
        "best_epoch": best_epoch(history, config.train.monitor),
        "stage_boundaries": boundaries,
        "examples_seen": splits.sizes["train"] * len(history),
        **models.count_params(model),
        "strategy": describe(strategy),
        "dtype_policy": settings.dtype_policy,
        "jit_compile": settings.jit_compile,
        "resumed": resumed,
        "seed": config.train.seed,
        "weights_sha256": weights_digest(model),
    }
    found = resume.found_learning_rates(run_dir)  # by stage, with --learning-rate / --finetune-learning-rate auto
    if found:
        results["learning_rate_found"] = found
    rundir.atomic_write_json(run_dir / rundir.RESULTS_JSON, results)
    if history:
        plots.save_curves(history, run_dir / rundir.CURVES_PNG, title=f"{config.model.recipe} on {splits.source}")
    if config.train.checkpoint and not (run_dir / rundir.BEST_MODEL).exists():
        rundir.atomic_save_model(model, run_dir / rundir.BEST_MODEL)
    return RunResult(run_dir=run_dir, model=model, history=history, results=results)


def _log_settings(config: Config, strategy: tf.distribute.Strategy, settings: DeviceSettings) -> None:
    why = ""
    if config.train.mixed_precision == "auto" and settings.kind == "cpu":
        native = settings.dtype_policy == "mixed_bfloat16"  # what device_settings chose, not read again
        why = " (auto: this CPU has native bfloat16)" if native else " (auto: no native bfloat16 here)"
    log.info(
        "Strategy: %s; XLA %s; %s%s; %d step(s) per execution; inter-op threads %s",
        describe(strategy),
        "on" if settings.jit_compile else "off",
        settings.dtype_policy,
        why,
        settings.steps_per_execution,
        tf.config.threading.get_inter_op_parallelism_threads() or "TensorFlow's default",
    )


def _metadata(run: RunSetup, strategy: tf.distribute.Strategy, settings: DeviceSettings) -> dict[str, Any]:
    """config.json: the config, the data's classes, shape, sizes and sources, the device, versions,
    and for a staged recipe the fine-tune boundaries resolved on the built base."""
    splits = run.splits
    metadata = {
        "config": run.config.to_dict(),
        "class_names": splits.class_names,
        "image_shape": list(splits.image_shape),
        "head": dataclasses.asdict(run.recipe.head_spec(splits.num_classes)),  # the key a saved run keeps
        "sizes": splits.sizes,
        "test_source": splits.test_source,
        "split_sources": splits.split_sources,  # which folder, rows or tfds split served each split
        "strategy": describe(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "global_batch_size": run.context.global_batch_size,
        "jit_compile": settings.jit_compile,
        "device": dataclasses.asdict(settings),
        "versions": _versions(),
    }
    if run.recipe.staged:
        metadata["unfreeze"] = resolve_steps(run.config, models.find_base(run.model))
        for step in metadata["unfreeze"]:
            log.info("Stage %s will unfreeze the base from layer %d (%s)", step["stage"], step["index"], step["layer"])
    return metadata


def _fit(run: RunSetup) -> list[int]:
    """Fits the recipe's stages; returns the first epoch of each fine-tune step (none unless staged)."""
    config, context, model, pipes = run.config, run.context, run.model, run.pipes
    if run.recipe.staged:
        return finetune.fit_staged(model, pipes, context)
    if run.recipe.transfer:
        finetune.fit_frozen(model, pipes, context, epochs=config.train.epochs, stage=None)
        return []
    epochs = config.train.epochs
    fitting.compile_stage(model, pipes["train"], context, stage=FIRST_STAGE, epochs=epochs)
    callbacks = fitting.stage_callbacks(context, epochs=epochs)
    fitting.fit(model, pipes["train"], pipes["validation"], context, callbacks, epochs=epochs)
    return []


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight's bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def best_epoch(history: list[dict[str, Any]], monitor: str) -> int | None:
    """The 1-based epoch where `monitor` was best (highest for accuracy-like metrics)."""
    values = [(r[monitor], r["epoch"]) for r in history if r.get(monitor) is not None]
    if not values:
        return None
    pick = max if ("acc" in monitor or "auc" in monitor) else min
    return int(pick(values)[1]) + 1


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
    }
