"""`train_and_evaluate(config, workdir)`: the one function the CLI, notebooks and tests call.

It chooses the strategy, loads the data, builds and compiles the model inside the strategy's
scope, fits with the standard callbacks (two fits with a compile between them for a staged
recipe, see `finetune.py`), evaluates on the test split, and leaves a complete run directory
(see `rundir.py`). Running the same call again after a crash resumes from the last finished
epoch. `inference.py` uses the run directory afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import platform
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir, runlock
from kerastune_flow.config import AUTO, Config, new_seed
from kerastune_flow.errors import DataError, KerastuneFlowError
from kerastune_flow.recipes import check_image_size, fitted, get_recipe
from kerastune_flow.reports import plots
from kerastune_flow.runtime import process
from kerastune_flow.runtime.strategy import (
    DeviceSettings,
    barrier,
    broadcast_from_first_replica,
    describe,
    device_kind,
    device_settings,
    get_strategy,
    global_batch_size,
    is_chief,
    is_multi_worker,
)
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import finetune, fitting
from kerastune_flow.training.fitting import FitContext

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


# --------------------------------------------------------------------------- building


def load_base(config: Config) -> keras.Model | None:
    """The user's own pre-trained base (`--base PATH --base-output LAYER`), or None."""
    m = config.model
    if not m.base:
        return None
    return models.cut_base(m.base, m.base_output, unsafe_deserialization=m.unsafe_deserialization)


def build_model(
    context: FitContext,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    base: keras.Model | None = None,
) -> keras.Model:
    """Builds and compiles the recipe's model (call inside `strategy.scope()`).

    For a transfer recipe this is the frozen base (`config.model.backbone`, or `base`: the
    user's own model, see `load_base`) under a new head; a staged recipe's second stage is
    `finetune.fit_staged`.
    """
    config = context.config
    m, t = config.model, config.train
    recipe = get_recipe(m.recipe)
    first_fit_epochs = t.head_epochs if recipe.staged else t.epochs
    kwargs: dict[str, Any] = dict(
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        kernel_initializer=m.initializer,
        dropout=m.dropout,
        l1=m.l1,
        l2=m.l2,
        learning_rate=fitting.learning_rate(context, m.learning_rate, epochs=first_fit_epochs),
        **fitting.compile_kwargs(context),
    )
    if recipe.transfer:
        kwargs.update(backbone=m.backbone, base=base, weights=m.weights, pooling=m.pooling, dense_units=m.dense_units)
    return recipe.build(**kwargs)


def make_pipelines(
    splits: data_lib.DataSplits, context: FitContext, head: models.Head
) -> dict[str, tf.data.Dataset | None]:
    """Batched train / validation / test pipelines at the global batch size, and "_ordered"
    variants (no shuffle, no augmentation) for one-pass feature extraction.

    Raises:
        DataError: when the training split is smaller than one global batch.
    """
    config, settings = context.config, context.settings
    batch = context.global_batch_size
    if splits.sizes["train"] < batch:
        raise DataError(
            f"The training split has {splits.sizes['train']} examples, fewer than one global batch of {batch}; "
            f"lower --batch-size or add data. Received: batch_size={config.data.batch_size}"
        )
    augmenter = data_lib.make_augmenter(config.data.augment, splits.image_shape)
    common = dict(
        batch_size=batch, label_mode=head.label_mode, num_classes=splits.num_classes, autotune=settings.data_autotune
    )
    out: dict[str, tf.data.Dataset | None] = {}
    for name in ("train", "validation", "test"):
        training = name == "train"
        # unshuffled, unaugmented: one pass for feature caching
        out[f"{name}_ordered"] = data_lib.prepare(getattr(splits, name), cache=False, **common)
        out[name] = data_lib.prepare(
            getattr(splits, name),
            training=training,
            cache=data_lib.should_cache(splits.sizes[name], splits.image_shape, config.data.cache),
            augmenter=augmenter if training else None,
            drop_remainder=training and settings.drop_remainder,
            seed=config.train.seed,
            clock=context.clock if training else None,
            epochs=context.epochs,
            # Several workers serialize the pipeline's graph to shard it: no images held in it.
            indexed=not is_multi_worker(context.strategy),
            **common,
        )
    if is_multi_worker(context.strategy):
        # Each worker keeps every n-th example: correct for any source (a folder's file list,
        # tfds shards fewer than workers), where sharding by file can fail or unbalance.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        out = {name: ds.with_options(options) for name, ds in out.items()}
    if splits.sizes["validation"] == 0:  # --validation-fraction 0: train on all of train, as some references do
        out["validation"] = out["validation_ordered"] = None
    return out


def check_before_data(config: Config) -> None:
    """Checks what can be checked before reading any data, so a typo costs no waiting.

    Raises:
        ConfigError: for an image size below the model's minimum or a malformed
            `progressive` spec.
    """
    check_image_size(config)
    if get_recipe(config.model.recipe).staged:
        finetune.parse_progressive(config.model.progressive)


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to `policy` inside, and put back after: a run in a notebook
    leaves the session's policy as it found it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def run_settings(config: Config, strategy: tf.distribute.Strategy) -> tuple[DeviceSettings, Config]:
    """The device settings of a run of `config` on `strategy` (its flags over the device's and the
    recipe's defaults), and `config` with the steps per execution they resolve."""
    t = config.train
    settings = device_settings(
        device_kind(strategy),
        steps_per_execution=t.steps_per_execution,
        mixed_precision=t.mixed_precision,
        jit_compile=t.jit_compile,
        replicas=strategy.num_replicas_in_sync,
        xla_on_cpu=get_recipe(config.model.recipe).xla_on_cpu,
    )
    return settings, config.replace(steps_per_execution=settings.steps_per_execution)


def train_and_evaluate(
    config: Config, workdir: str | Path, *, overwrite: bool = False, evaluate_test: bool = True
) -> RunResult:
    """Trains the configured recipe and leaves a complete run directory.

    Running the same call again after a crash resumes from the last finished epoch.

    Args:
        config: what to train and how (see `recipes.make_config`).
        workdir: the run directory.
        overwrite: replace a finished run in `workdir` instead of refusing.
        evaluate_test: False leaves the test split unseen (`results["test"]` is None): a tuning
            trial must choose by validation only.

    Returns:
        RunResult with the model, history and results.

    Raises:
        KerastuneFlowError: (a subclass) for every user error: data, weights, strategy, run dir.
    """
    process.prepare_process(config.train.strategy, deterministic=config.train.deterministic)
    strategy = get_strategy(config.train.strategy)  # first: multi-worker collectives precede any op
    chief = is_chief(strategy)  # the other workers of a cluster write private folders: no lock
    if chief:  # refused before anything is written
        rundir.claim_dir(workdir, kinds=rundir.RUN_KINDS, overwrite=overwrite)
    with runlock.run_lock(workdir, take=chief):
        return _locked_run(config, workdir, strategy, overwrite=overwrite, evaluate_test=evaluate_test)


def _locked_run(
    config: Config, workdir: str | Path, strategy: tf.distribute.Strategy, *, overwrite: bool, evaluate_test: bool
) -> RunResult:
    config = with_seed(config, workdir, strategy)
    keras.utils.set_random_seed(config.train.seed)
    if is_chief(strategy):
        run_dir = Path(workdir)
        resumed = rundir.prepare_run_dir(run_dir, overwrite=overwrite)
    else:
        run_dir, resumed = rundir.worker_run_dir(workdir), False
    if resumed:
        log.info("Found a backup in %s: resuming the interrupted run", run_dir)
    settings, config = run_settings(config, strategy)
    try:
        with dtype_policy(settings.dtype_policy), cb.interrupt_guard():
            return _train_and_evaluate(config, run_dir, strategy, resumed, settings, evaluate_test)
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


def with_seed(config: Config, workdir: str | Path, strategy: tf.distribute.Strategy) -> Config:
    """The config with a seed: its own; else an interrupted run's in `workdir`, so that the same
    command resumes the same run; else a new one (the same on every worker). It is recorded in
    config.json and results.json, so every run can be replayed."""
    if config.train.seed is not None:
        return config
    recorded = rundir.interrupted_run_seed(workdir) if is_chief(strategy) else None
    seed = broadcast_from_first_replica(strategy, new_seed() if recorded is None else recorded)
    if recorded is None:
        log.info("No --seed given: this run's seed is %d (pass --seed %d to repeat it)", seed, seed)
    return config.replace(seed=seed)


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
) -> RunResult:
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
    recipe = get_recipe(config.model.recipe)
    check_before_data(config)
    base = load_base(config)
    if base is not None:  # the user's base decides the images: its size and channels
        splits = data_lib.load_splits(
            config, image_size=tuple(base.input_shape[1:3]), channels=int(base.input_shape[-1])
        )
    else:
        splits = data_lib.load_splits(config, channels=3 if recipe.transfer else None)
    if splits.sizes["validation"] == 0 and config.train.monitor.startswith("val_"):
        monitor = config.train.monitor.removeprefix("val_")
        log.info("No validation split: early stopping and the best model watch %s instead", monitor)
        config = config.replace(monitor=monitor)
    head = recipe.head(splits.num_classes)
    batch = global_batch_size(config.data.batch_size, strategy)
    context = FitContext(
        config=config,
        run_dir=run_dir,
        strategy=strategy,
        settings=settings,
        steps_per_epoch=fitting.steps_per_epoch(splits.sizes["train"], batch, settings),
        clock=data_lib.EpochClock(),
        epochs=config.train.head_epochs + config.train.epochs if recipe.staged else config.train.epochs,
    )
    pipes = make_pipelines(splits, context, head)
    log.info(
        "Data %s: %s train / %s validation / %s test, %d classes, images %s",
        splits.source,
        splits.sizes["train"],
        splits.sizes["validation"],
        splits.sizes["test"],
        splits.num_classes,
        "x".join(map(str, splits.image_shape)),
    )
    # Again, just before the weights are drawn: reading the data may have drawn from the global
    # generators (tfds preparing a data set does), and the first run must start as every later one.
    keras.utils.set_random_seed(config.train.seed)
    with strategy.scope():
        model = build_model(context, input_shape=splits.image_shape, num_classes=splits.num_classes, base=base)
    metadata = {
        "config": config.to_dict(),
        "class_names": splits.class_names,
        "image_shape": list(splits.image_shape),
        "head": dataclasses.asdict(head),
        "sizes": splits.sizes,
        "test_source": splits.test_source,
        "split_sources": splits.split_sources,  # which folder, rows or tfds split served each split
        "strategy": describe(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "global_batch_size": batch,
        "jit_compile": settings.jit_compile,
        "device": dataclasses.asdict(settings),
        "versions": _versions(),
    }
    if recipe.staged:
        metadata["unfreeze"] = finetune.resolve_steps(config, models.find_base(model))
        for step in metadata["unfreeze"]:
            log.info("Stage %s will unfreeze the base from layer %d (%s)", step["stage"], step["index"], step["layer"])
    # Only now, with the data read and the model built, does an overwritten run go.
    rundir.clear_finished_run(run_dir)
    rundir.atomic_write_json(run_dir / rundir.CONFIG_JSON, metadata)

    start = time.perf_counter()
    boundaries: list[int] = []
    if recipe.staged:
        boundaries = finetune.fit_staged(model, pipes, context)
    elif recipe.transfer:
        finetune.fit_frozen(model, pipes, context, epochs=config.train.epochs, stage=None)
    else:
        if config.model.learning_rate == AUTO:
            words = fitted(config, "head")
            rate = fitting.auto_learning_rate(context, model, pipes["train"], stage="head", fitted=words)
            with strategy.scope():  # compiled again, at the rate found
                models.compile_model(
                    model,
                    head,
                    learning_rate=fitting.learning_rate(context, rate, epochs=config.train.epochs),
                    **fitting.compile_kwargs(context),
                )
        fitting.fit(
            model,
            pipes["train"],
            pipes["validation"],
            context,
            fitting.stage_callbacks(context, epochs=config.train.epochs),
            epochs=config.train.epochs,
        )
    train_seconds = time.perf_counter() - start

    test = model.evaluate(pipes["test"], verbose=0, return_dict=True) if evaluate_test else None
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
    found = fitting.found_learning_rates(run_dir)  # by stage, with --learning-rate / --finetune-lr auto
    if found:
        results["learning_rate_found"] = found
    rundir.atomic_write_json(run_dir / rundir.RESULTS_JSON, results)
    if history:
        plots.save_curves(history, run_dir / rundir.CURVES_PNG, title=f"{config.model.recipe} on {splits.source}")
    if config.train.checkpoint and not (run_dir / rundir.BEST_MODEL).exists():
        rundir.atomic_save_model(model, run_dir / rundir.BEST_MODEL)
    shutil.rmtree(run_dir / rundir.BACKUP_DIR, ignore_errors=True)
    barrier(strategy)
    if test is not None:
        log.info("Test %s; run directory %s", ", ".join(f"{k} {v:.4f}" for k, v in results["test"].items()), run_dir)
    return RunResult(run_dir=run_dir, model=model, history=history, results=results)


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
