"""`train_and_evaluate(config, workdir)`: the one function the CLI, notebooks and tests call.

It chooses the strategy, loads the data, builds and compiles the model inside the strategy's
scope, fits with the standard callbacks (two fits with a compile between them for the staged
fine-tune), evaluates on the test split, and leaves a complete run directory:

    config.json     the Config, class names, image shape, head, strategy, versions
    history.csv     one row per epoch (history.jsonl: the same as JSON lines)
    model.keras     the best model (by the monitored metric)
    results.json    test metrics, wall time, parameter counts, best epoch
    curves.png      loss and accuracy per epoch, the fine-tune boundary marked

`evaluate_saved` and `predict_images` use a run directory (or a `.keras` file) afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import callbacks as cb
from kerastune_flow import data as data_lib
from kerastune_flow import models
from kerastune_flow.config import Config
from kerastune_flow.errors import ConfigError, DataError, KerastuneFlowError, RunDirError
from kerastune_flow.strategy import (
    DeviceSettings,
    barrier,
    describe,
    device_kind,
    device_settings,
    get_strategy,
    global_batch_size,
    is_chief,
    is_multi_worker,
    is_tpu,
)

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
CURVES_PNG = "curves.png"
RUN_FILES = (
    CONFIG_JSON,
    RESULTS_JSON,
    CURVES_PNG,
    cb.BEST_MODEL,
    cb.HISTORY_CSV,
    cb.HISTORY_JSONL,
    cb.BACKUP_DIR,
    cb.TENSORBOARD_DIR,
)


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


# --------------------------------------------------------------------------- run directory


def prepare_run_dir(workdir: str | Path, *, overwrite: bool = False) -> bool:
    """Creates the run directory; returns True when an interrupted run is resumed.

    A finished run that `overwrite` replaces is left in place here: `clear_finished_run`
    removes it once the new run's data and model are known to be good, so a bad input never
    costs the previous results.

    Raises:
        RunDirError: when it holds a finished run and `overwrite` is False, or is not writable.
    """
    workdir = Path(workdir)
    if (workdir / RESULTS_JSON).exists() and not overwrite:
        raise RunDirError(
            f"{workdir} already holds a finished run; pass --overwrite to replace it or choose another "
            f"--run-dir. Received: run_dir={workdir}"
        )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot write to the run directory {workdir} ({error.strerror}); choose a writable --run-dir. "
            f"Received: run_dir={workdir}"
        ) from None
    return (workdir / cb.BACKUP_DIR).exists() and not (workdir / RESULTS_JSON).exists()


def clear_finished_run(workdir: str | Path) -> None:
    """Removes the files of a finished run (the caller asked to overwrite it); no-op otherwise.

    Raises:
        RunDirError: when a file cannot be removed.
    """
    workdir = Path(workdir)
    if not (workdir / RESULTS_JSON).exists():
        return
    try:
        for name in RUN_FILES:
            target = workdir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot replace the finished run in {workdir} ({error.strerror}); make it writable or choose another "
            f"--run-dir. Received: {error.filename}"
        ) from None


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
    }


# --------------------------------------------------------------------------- building


TRANSFER_RECIPES = ("vgg16_features", "vgg16_finetune")


def load_base(config: Config) -> keras.Model | None:
    """The user's own pre-trained base (`--base PATH --base-output LAYER`), or None."""
    m = config.model
    if not m.base:
        return None
    return models.cut_base(m.base, m.base_output, unsafe_deserialization=m.unsafe_deserialization)


def learning_rate(config: Config, rate: float, *, epochs: int, steps_per_epoch: int | None):
    """The rate, or with `lr_schedule="cosine"` a CosineDecay from it to 0 over `epochs`."""
    if config.model.lr_schedule == "cosine" and steps_per_epoch:
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(1, epochs * steps_per_epoch))
    return rate


def steps_per_epoch(splits: data_lib.DataSplits, config: Config, strategy: tf.distribute.Strategy) -> int:
    """Training steps in one epoch at the global batch size."""
    batch = global_batch_size(config.data.batch_size, strategy)
    n = splits.sizes["train"]
    return n // batch if is_tpu(strategy) else -(-n // batch)


def build_model(
    config: Config,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    jit_compile: bool = False,
    base: keras.Model | None = None,
    steps: int | None = None,
) -> keras.Model:
    """Builds and compiles the recipe's model (call inside `strategy.scope()`).

    For the transfer recipes this is the frozen feature extractor on `config.model.backbone`,
    or on `base` (the user's own model, see `load_base`); vgg16_finetune's stage two is
    `fit_staged`.
    """
    m, t = config.model, config.train
    common: dict[str, Any] = dict(
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        kernel_initializer=m.initializer,
        dropout=m.dropout,
        l1=m.l1,
        l2=m.l2,
        optimizer=m.optimizer,
        learning_rate=learning_rate(
            config,
            m.learning_rate,
            epochs=t.head_epochs if m.recipe == "vgg16_finetune" else t.epochs,
            steps_per_epoch=steps,
        ),
        jit_compile=jit_compile,
        steps_per_execution=t.steps_per_execution,
    )
    if m.recipe in TRANSFER_RECIPES:
        return models.build_transfer_model(
            backbone=m.backbone,
            base=base,
            weights=m.weights,
            pooling=m.pooling,
            dense_units=m.dense_units,
            **common,
        )
    return models.BUILDERS[m.recipe](**common)


def make_pipelines(
    splits: data_lib.DataSplits,
    config: Config,
    head: models.Head,
    strategy: tf.distribute.Strategy,
) -> dict[str, tf.data.Dataset]:
    """Batched train / validation / test pipelines at the global batch size, and "_ordered"
    variants (no shuffle, no augmentation) for one-pass feature extraction."""
    batch = global_batch_size(config.data.batch_size, strategy)
    if splits.sizes["train"] < batch:
        raise DataError(
            f"The training split has {splits.sizes['train']} examples, fewer than one global batch of {batch}; "
            f"lower --batch-size or add data. Received: batch_size={config.data.batch_size}"
        )
    augmenter = data_lib.make_augmenter(config.data.augment, splits.image_shape, seed=config.train.seed)
    common = dict(batch_size=batch, label_mode=head.label_mode, num_classes=splits.num_classes)
    out = {}
    for name in ("train", "validation", "test"):
        training = name == "train"
        out[f"{name}_ordered"] = data_lib.prepare(
            getattr(splits, name), cache=False, **common
        )  # unshuffled, unaugmented: one pass for feature caching
        out[name] = data_lib.prepare(
            getattr(splits, name),
            training=training,
            cache=data_lib.should_cache(splits.sizes[name], splits.image_shape, config.data.cache),
            augmenter=augmenter if training else None,
            drop_remainder=training and is_tpu(strategy),
            seed=config.train.seed,
            **common,
        )
    if is_multi_worker(strategy):
        # Each worker keeps every n-th example: correct for any source (a folder's file list,
        # tfds shards fewer than workers), where sharding by file can fail or unbalance.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        out = {name: ds.with_options(options) for name, ds in out.items()}
    if splits.sizes["validation"] == 0:  # --validation-fraction 0: train on all of train, as some references do
        out["validation"] = out["validation_ordered"] = None
    return out


def load_splits(config: Config, base: keras.Model | None = None) -> data_lib.DataSplits:
    """Loads the data of a config: transfer recipes get RGB images, or the size and channels
    of the user's own base when there is one."""
    d = config.data
    image_size, channels = d.image_size, None
    if base is not None:
        image_size, channels = tuple(base.input_shape[1:3]), int(base.input_shape[-1])
    elif config.model.recipe in TRANSFER_RECIPES:
        channels = 3
    return data_lib.load_data(
        d.data,
        image_size=image_size,
        channels=channels,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
        data_dir=d.data_dir,
        manual_dir=d.manual_dir,
        max_examples=d.max_examples,
        train_fraction=d.train_fraction,
        seed=config.train.seed,
        skip_bad_images=d.skip_bad_images,
    )


# --------------------------------------------------------------------------- fitting


def _callbacks(config: Config, run_dir: Path, *, stage: str | None = None, best=None, save_model=None):
    t = config.train
    return cb.standard_callbacks(
        run_dir,
        stage=stage,
        monitor=t.monitor,
        csv_log=t.csv_log,
        jsonl_log=t.jsonl_log,
        tensorboard=t.tensorboard,
        early_stopping=t.early_stopping,
        patience=t.patience,
        checkpoint=t.checkpoint,
        backup=t.backup,
        terminate_on_nan=t.terminate_on_nan,
        best=best,
        save_model=save_model,
    )


def _best_so_far(callbacks: list[keras.callbacks.Callback]):
    for callback in callbacks:
        if isinstance(callback, cb.BestModelCheckpoint):
            return callback.best
    return None


def _fit(model, train_ds, val_ds, config, callbacks, *, epochs, initial_epoch=0) -> keras.callbacks.History:
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[*callbacks, cb.ProgressBar()],  # Keras' bar, counting the steps run (verbose only)
        verbose=config.train.verbose,
        shuffle=False,  # the pipeline shuffles; Keras would only warn that it cannot
    )


# --------------------------------------------------------------------------- feature caching


def split_at_base(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a transfer model into (features, head) sharing the same layers and weights.

    `features` maps pixels to the frozen base's output (preprocessing included); `head` maps
    those features to predictions. Training `head` trains the full model's head, because the
    layers are the same objects. Works for the linear models of `models.build_transfer_model`.
    """
    base = models.find_base(model)
    index = model.layers.index(base)
    pixels = keras.Input(shape=model.input_shape[1:], name="pixels")
    x = pixels
    for layer in model.layers[1 : index + 1]:
        x = layer(x, training=False) if layer is base else layer(x)
    features = keras.Model(pixels, x, name="features")
    feature_input = keras.Input(shape=tuple(x.shape[1:]), name="features")
    y = feature_input
    for layer in model.layers[index + 1 :]:
        y = layer(y)
    return features, keras.Model(feature_input, y, name="head")


def extract_features(features: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the frozen base over a batched, unshuffled (images, labels) data set."""
    feats = features.predict(ds.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([y.numpy() for y in ds.map(lambda x, y: y)]) if feats.shape[0] else np.zeros((0,))
    return feats, labels


def cached_feature_pipelines(
    features: keras.Model,
    pipes: dict[str, tf.data.Dataset],
    *,
    batch_size: int,
    seed: int,
    drop_remainder: bool = False,
) -> dict[str, tf.data.Dataset]:
    """Computes the base's features once for train and validation and serves them from memory.

    The training features are shuffled with the same seed and buffer as `data.prepare`, so a
    head trained on them sees the batches the uncached path would.
    """
    out: dict[str, tf.data.Dataset | None] = {"validation": None}
    for name in ("train", "validation"):
        if pipes[f"{name}_ordered"] is None:
            continue
        feats, labels = extract_features(features, pipes[f"{name}_ordered"])
        ds = tf.data.Dataset.from_tensor_slices((feats, labels))
        if name == "train":
            ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
        out[name] = data_lib.with_autotune(
            ds.batch(batch_size, drop_remainder=drop_remainder and name == "train").prefetch(tf.data.AUTOTUNE)
        )
    return out


def fit_frozen(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset],
    config: Config,
    run_dir: Path,
    *,
    strategy: tf.distribute.Strategy,
    jit_compile: bool,
    epochs: int,
    stage: str | None,
    steps: int | None = None,
) -> tuple[int, float | None]:
    """Trains the head on the frozen base, on cached features when that gives the same result.

    Features are cached when `feature_cache` is "auto" and no random augmentation is on (with
    augmentation every epoch sees new images, so the full forward pass is needed, and the log
    says so). The head model shares the full model's layers, so nothing needs copying back.

    Returns:
        (epochs finished, best monitored value).
    """
    m, t = config.model, config.train
    use_cache = m.feature_cache == "auto" and not config.data.augment
    if not use_cache:
        if config.data.augment and m.feature_cache == "auto":
            log.info("Random augmentation is on: training the head with the full forward pass (no feature cache)")
        callbacks = _callbacks(config, run_dir, stage=stage)
        history = _fit(model, pipes["train"], pipes["validation"], config, callbacks, epochs=epochs)
        return _last_epoch(history, epochs), _best_so_far(callbacks)
    start = time.perf_counter()
    features, head = split_at_base(model)
    cached = cached_feature_pipelines(
        features,
        pipes,
        batch_size=global_batch_size(config.data.batch_size, strategy),
        seed=t.seed,
        drop_remainder=is_tpu(strategy),
    )
    log.info("Cached the frozen base's features of train and validation in %.1f s", time.perf_counter() - start)
    with strategy.scope():
        models.compile_model(
            head,
            models.transfer_head(max(2, model.output_shape[-1])),
            optimizer=m.optimizer,
            learning_rate=learning_rate(config, m.learning_rate, epochs=epochs, steps_per_epoch=steps),
            jit_compile=jit_compile,
            steps_per_execution=t.steps_per_execution,
        )
    callbacks = _callbacks(config, run_dir, stage=stage, save_model=model)
    history = _fit(head, cached["train"], cached["validation"], config, callbacks, epochs=epochs)
    return _last_epoch(history, epochs), _best_so_far(callbacks)


def _last_epoch(history: keras.callbacks.History, planned: int) -> int:
    return (history.epoch[-1] + 1) if history.epoch else planned


# --------------------------------------------------------------------------- staged fine-tune


def parse_progressive(spec: str | None) -> list[tuple[int, str, float]]:
    """Parses progressive unfreezing steps "EPOCH:UNFREEZE_AT:LR,...", epochs counted from the
    start of stage two; the first step must start at 0.

    Raises:
        ConfigError: naming the malformed step.
    """
    if not spec:
        return []
    steps = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            epoch, at, lr = int(fields[0]), fields[1], float(fields[2])
            if epoch < 0 or lr <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                "--progressive takes EPOCH:UNFREEZE_AT:LR steps separated by commas, such as "
                f"0:block5_conv1:1e-5,3:block4_conv1:5e-6. Received: {part.strip()!r}"
            ) from None
        steps.append((epoch, at, lr))
    epochs = [step[0] for step in steps]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise ConfigError(f"--progressive steps must start at epoch 0 and increase. Received: epochs={epochs}")
    return steps


class _StageLedger:
    """Remembers finished stages (weights and where they ended) under backup/, so a resumed run
    skips them; removed with the backup when the run finishes."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.folder = run_dir / cb.BACKUP_DIR / "stages"
        self.enabled = enabled

    def done(self, stage: str, model: keras.Model) -> dict | None:
        marker = self.folder / f"{stage}.json"
        if not (self.enabled and marker.exists()):
            return None
        model.load_weights(self.folder / f"{stage}.weights.h5")
        return json.loads(marker.read_text())

    def record(self, stage: str, model: keras.Model, **state: Any) -> None:
        if self.enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            model.save_weights(self.folder / f"{stage}.weights.h5")
            cb.atomic_write_json(self.folder / f"{stage}.json", state)


def fit_staged(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset],
    config: Config,
    run_dir: Path,
    *,
    strategy: tf.distribute.Strategy,
    jit_compile: bool = False,
    steps: int | None = None,
) -> list[int]:
    """The staged fine-tune: head on the frozen base, then unfreeze and continue at a low rate.

    Stage one trains the head for up to `head_epochs` (feature-cached when possible, early
    stopping with the best weights restored). Stage two unfreezes the base from `unfreeze_at`
    (default: the backbone's last block, block5_conv1 = 15 for VGG16), recompiles (trainable
    changes take effect only at compile time) with `finetune_learning_rate`, and continues with
    `initial_epoch` where stage one stopped, for `epochs` more, so the history is one
    continuous run. With `progressive`, stage two is several steps, each unfreezing more and
    recompiling. A finished stage is recorded, so a resumed run starts at the next one.

    Returns:
        The first epoch of each fine-tune step (the stage boundaries).
    """
    m, t = config.model, config.train
    base = models.find_base(model)
    head_spec = models.transfer_head(max(2, model.output_shape[-1]))
    ledger = _StageLedger(run_dir, t.backup)
    state = ledger.done("head", model)
    if state is None:
        log.info("Stage 1: training the head on the frozen base for up to %d epoch(s)", t.head_epochs)
        end, best = fit_frozen(
            model,
            pipes,
            config,
            run_dir,
            strategy=strategy,
            jit_compile=jit_compile,
            epochs=t.head_epochs,
            stage="head",
            steps=steps,
        )
        ledger.record("head", model, end=end, best=best)
    else:
        end, best = state["end"], state["best"]
        log.info("Stage 1 (head) finished in an earlier attempt: continuing at epoch %d", end + 1)
    unfreeze_at = m.unfreeze_at if m.unfreeze_at is not None else models.default_unfreeze_at(base)
    steps = parse_progressive(m.progressive) or [(0, unfreeze_at, m.finetune_learning_rate)]
    stage2_start, final = end, end + t.epochs
    boundaries = []
    for i, (offset, at, lr) in enumerate(steps):
        stage = "finetune" if i == 0 else f"finetune_{i + 1}"
        start = max(end, stage2_start + offset)
        stop = stage2_start + steps[i + 1][0] if i + 1 < len(steps) else final
        boundaries.append(start)
        with strategy.scope():
            index = models.unfreeze_from(base, at)
            models.compile_model(
                model,
                head_spec,
                optimizer=m.optimizer,
                learning_rate=learning_rate(config, lr, epochs=stop - start, steps_per_epoch=steps),
                jit_compile=jit_compile,
                steps_per_execution=t.steps_per_execution,
                base_multiplier=m.base_lr_multiplier,
            )
        state = ledger.done(stage, model)
        if state is not None:
            end, best = state["end"], state["best"]
            continue
        if start >= stop:
            log.info("Step %s has no epochs left (stage ends at epoch %d): skipped", stage, stop)
            continue
        log.info(
            "Stage %s: base layers from %d (%s) unfrozen, learning rate %g%s, epochs %d to %d",
            stage,
            index,
            base.layers[index].name if index < len(base.layers) else "none",
            lr,
            f" (base x{m.base_lr_multiplier:g})" if m.base_lr_multiplier else "",
            start + 1,
            stop,
        )
        callbacks = _callbacks(config, run_dir, stage=stage, best=best)
        history = _fit(model, pipes["train"], pipes["validation"], config, callbacks, epochs=stop, initial_epoch=start)
        end, best = _last_epoch(history, stop), _best_so_far(callbacks)
        ledger.record(stage, model, end=end, best=best)
    return boundaries


def train_and_evaluate(config: Config, workdir: str | Path, *, overwrite: bool = False) -> RunResult:
    """Trains the configured recipe and leaves a complete run directory.

    Running the same call again after a crash resumes from the last finished epoch.

    Args:
        config: what to train and how (see `config.make_config`).
        workdir: the run directory.
        overwrite: replace a finished run in `workdir` instead of refusing.

    Returns:
        RunResult with the model, history and results.

    Raises:
        KerastuneFlowError: (a subclass) for every user error: data, weights, strategy, run dir.
    """
    strategy = get_strategy(config.train.strategy)  # first: multi-worker collectives precede any op
    keras.utils.set_random_seed(config.train.seed)
    if is_chief(strategy):
        run_dir = Path(workdir)
        resumed = prepare_run_dir(run_dir, overwrite=overwrite)
    else:
        run_dir, resumed = _worker_run_dir(Path(workdir)), False
    if resumed:
        log.info("Found a backup in %s: resuming the interrupted run", run_dir)
    t = config.train
    settings = device_settings(
        device_kind(strategy),
        steps_per_execution=t.steps_per_execution,
        mixed_precision=t.mixed_precision,
        jit_compile=t.jit_compile,
        replicas=strategy.num_replicas_in_sync,
    )
    config = dataclasses.replace(config, train=dataclasses.replace(t, steps_per_execution=settings.steps_per_execution))
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(settings.dtype_policy)
    try:
        with cb.interrupt_guard():
            return _train_and_evaluate(config, run_dir, strategy, resumed, settings)
    except KerastuneFlowError:
        raise
    except (OSError, tf.errors.OpError) as error:
        translated = _translate_runtime_error(error, run_dir)
        if translated is None:
            raise
        raise translated from None
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if not is_chief(strategy):
            shutil.rmtree(run_dir, ignore_errors=True)


def _worker_run_dir(chief_dir: Path) -> Path:
    """A non-chief worker's private run directory: the same files are written, then thrown
    away. It starts from the chief's backup, if any, so a restarted cluster resumes in step."""
    import tempfile

    private = Path(tempfile.mkdtemp(prefix="kerastune_flow_worker_"))
    if (chief_dir / cb.BACKUP_DIR).is_dir():
        shutil.copytree(chief_dir / cb.BACKUP_DIR, private / cb.BACKUP_DIR)
    return private


def check_before_data(config: Config) -> None:
    """Checks what can be checked before reading any data, so a typo costs no waiting.

    Raises:
        ConfigError: for an image size below the model's minimum or a malformed
            `progressive` spec.
    """
    m, d = config.model, config.data
    if d.image_size is not None and not m.base:
        models.check_image_size(m.recipe, d.image_size, backbone=m.backbone)
    if m.recipe == "vgg16_finetune":
        parse_progressive(m.progressive)


def check_unfreeze_steps(config: Config, base: keras.Model) -> None:
    """Resolves every fine-tune boundary on the built base before stage one trains, so an
    `unfreeze_at` out of range or a layer name that does not exist fails at once.

    Raises:
        ConfigError: from `models.resolve_unfreeze_at`.
    """
    m = config.model
    default = m.unfreeze_at if m.unfreeze_at is not None else models.default_unfreeze_at(base)
    for _, at, _ in parse_progressive(m.progressive) or [(0, default, m.finetune_learning_rate)]:
        models.resolve_unfreeze_at(base, at)


def _translate_runtime_error(error: Exception, run_dir: Path) -> KerastuneFlowError | None:
    """The user error behind an exception raised while training or evaluating, or None
    when it is not one (then it is a bug, and travels on unchanged)."""
    if isinstance(error, tf.errors.InvalidArgumentError):
        return data_lib.label_range_error(error)
    if isinstance(error, (OSError, tf.errors.OpError)) and cb.is_disk_full(error):
        return cb.write_error(run_dir, "a checkpoint or log", error)
    return None


def _train_and_evaluate(
    config: Config, run_dir: Path, strategy: tf.distribute.Strategy, resumed: bool, settings: DeviceSettings
) -> RunResult:
    jit_compile = settings.jit_compile
    log.info(
        "Strategy: %s; XLA %s; %s; %d step(s) per execution; inter-op threads %s",
        describe(strategy),
        "on" if jit_compile else "off",
        settings.dtype_policy,
        settings.steps_per_execution,
        tf.config.threading.get_inter_op_parallelism_threads() or "TensorFlow's default",
    )

    check_before_data(config)
    base = load_base(config)
    splits = load_splits(config, base)
    if splits.sizes["validation"] == 0 and config.train.monitor.startswith("val_"):
        monitor = config.train.monitor.removeprefix("val_")
        log.info("No validation split: early stopping and the best model watch %s instead", monitor)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, monitor=monitor))
    head = models.head_for(config.model.recipe, splits.num_classes)
    pipes = make_pipelines(splits, config, head, strategy)
    log.info(
        "Data %s: %s train / %s validation / %s test, %d classes, images %s",
        splits.source,
        splits.sizes["train"],
        splits.sizes["validation"],
        splits.sizes["test"],
        splits.num_classes,
        "x".join(map(str, splits.image_shape)),
    )
    metadata = {
        "config": config.to_dict(),
        "class_names": splits.class_names,
        "image_shape": list(splits.image_shape),
        "head": dataclasses.asdict(head),
        "sizes": splits.sizes,
        "strategy": describe(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "global_batch_size": global_batch_size(config.data.batch_size, strategy),
        "jit_compile": jit_compile,
        "device": dataclasses.asdict(settings),
        "versions": _versions(),
    }
    steps = steps_per_epoch(splits, config, strategy)
    with strategy.scope():
        model = build_model(
            config,
            input_shape=splits.image_shape,
            num_classes=splits.num_classes,
            jit_compile=jit_compile,
            base=base,
            steps=steps,
        )
    if config.model.recipe == "vgg16_finetune":
        check_unfreeze_steps(config, models.find_base(model))
    # Only now, with the data read and the model built, does an overwritten run go.
    clear_finished_run(run_dir)
    cb.atomic_write_json(run_dir / CONFIG_JSON, metadata)

    start = time.perf_counter()
    boundaries: list[int] = []
    recipe, epochs = config.model.recipe, config.train.epochs
    if recipe == "vgg16_finetune":
        boundaries = fit_staged(
            model, pipes, config, run_dir, strategy=strategy, jit_compile=jit_compile, steps=steps
        )
    elif recipe == "vgg16_features":
        fit_frozen(
            model,
            pipes,
            config,
            run_dir,
            strategy=strategy,
            jit_compile=jit_compile,
            epochs=epochs,
            stage=None,
            steps=steps,
        )
    else:
        _fit(model, pipes["train"], pipes["validation"], config, _callbacks(config, run_dir), epochs=epochs)
    train_seconds = time.perf_counter() - start

    test = model.evaluate(pipes["test"], verbose=0, return_dict=True)
    history = cb.read_history(run_dir)
    results = {
        "recipe": config.model.recipe,
        "test": {k: float(v) for k, v in test.items()},
        "train_seconds": round(train_seconds, 3),
        "epochs_run": len(history),
        "best_epoch": _best_epoch(history, config.train.monitor),
        "stage_boundaries": boundaries,
        "examples_seen": splits.sizes["train"] * len(history),
        **models.count_params(model),
        "strategy": describe(strategy),
        "resumed": resumed,
        "weights_sha256": weights_digest(model),
    }
    cb.atomic_write_json(run_dir / RESULTS_JSON, results)
    if history:
        save_curves(history, run_dir / CURVES_PNG, title=f"{config.model.recipe} on {splits.source}")
    if config.train.checkpoint and not (run_dir / cb.BEST_MODEL).exists():
        cb.atomic_save_model(model, run_dir / cb.BEST_MODEL)
    shutil.rmtree(run_dir / cb.BACKUP_DIR, ignore_errors=True)
    barrier(strategy)
    log.info("Test %s; run directory %s", _format_metrics(results["test"]), run_dir)
    return RunResult(run_dir=run_dir, model=model, history=history, results=results)


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of every weight's bytes: equal digests mean bit-identical models."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _best_epoch(history: list[dict[str, Any]], monitor: str) -> int | None:
    values = [(r[monitor], r["epoch"]) for r in history if r.get(monitor) is not None]
    if not values:
        return None
    pick = max if ("acc" in monitor or "auc" in monitor) else min
    return int(pick(values)[1]) + 1


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# --------------------------------------------------------------------------- plots


def save_curves(history: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Plots loss and accuracy per epoch (train and validation); marks every stage change.

    Uses matplotlib's object API (no pyplot state), so it works headless and in threads.
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] + 1 for r in history]
    changes = [
        (cur["epoch"] + 1, cur["stage"])
        for prev, cur in zip(history, history[1:])
        if cur.get("stage") and cur.get("stage") != prev.get("stage")
    ]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            key = prefix + metric
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=key, markersize=3)
        for i, (epoch, stage) in enumerate(changes):
            label = "fine-tune starts" if i == 0 else None
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", label=label)
            ax.annotate(stage, (epoch - 0.5, 1), xycoords=("data", "axes fraction"), fontsize=8, color="grey",
                        xytext=(3, -12), textcoords="offset points")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    path, tmp = cb._atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        cb._commit(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- using a saved run


@dataclasses.dataclass
class SavedRun:
    """A model and what its run directory remembers.

    Attributes:
        model: the loaded keras.Model.
        class_names: label index -> name.
        image_shape: (height, width, channels) the model takes.
        head: the Head (output activation and label mode).
        config: the training Config, or None for a bare `.keras` file.
    """

    model: keras.Model
    class_names: list[str]
    image_shape: tuple[int, int, int]
    head: models.Head
    config: Config | None


def load_saved(path: str | Path, *, unsafe_deserialization: bool = False) -> SavedRun:
    """Loads a run directory (model.keras + config.json) or a bare `.keras` file.

    Args:
        path: a run directory of `train_and_evaluate`, or a `.keras` file.
        unsafe_deserialization: allow Lambda layers, whose Python code runs on loading
            (see `models.load_keras_model`); only for files you trust.

    Raises:
        RunDirError: when the path is missing or holds no model; when the model is corrupt,
            holds Python code (without `unsafe_deserialization`), or is not an image
            classifier; or when config.json is unreadable.
    """
    path = Path(path)
    model_path = path / cb.BEST_MODEL if path.is_dir() else path
    meta_path = (path if path.is_dir() else path.parent) / CONFIG_JSON
    if not model_path.exists():
        raise RunDirError(
            f"No model at {model_path}; pass a run directory written by `run train` or a .keras file. "
            f"Received: {path}"
        )
    # compile=False inside: the optimizer state is of no use to evaluate or predict, and the
    # model is compiled below with its head's loss, whatever optimizer it trained with.
    model = models.load_keras_model(model_path, unsafe_deserialization=unsafe_deserialization)
    if len(model.outputs) != 1 or len(model.output_shape) != 2:
        raise RunDirError(
            f"The model {model_path} does not end in one layer of class scores; pass a classifier, such as a run "
            f"directory of `run train`. Received: output_shape={model.output_shape}"
        )
    shape = tuple(int(d) for d in model.input_shape[1:])
    units = int(model.output_shape[-1])
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            head = models.Head(**meta["head"])
            saved = SavedRun(
                model=model,
                class_names=list(meta["class_names"]),
                image_shape=tuple(meta["image_shape"]),
                head=head,
                config=Config.from_dict(meta["config"]),
            )
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise RunDirError(
                f"{meta_path} is damaged or was not written by kerastune_flow; restore it, or pass the .keras file "
                f"alone. Received: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
            ) from None
        model.compile(loss=head.loss(), metrics=["accuracy"])
        return saved
    activation = getattr(model.layers[-1], "activation", None)
    name = getattr(activation, "__name__", None)
    head = models.Head(
        units=units,
        activation=name if name in ("sigmoid", "softmax") else None,
        label_mode={"sigmoid": "binary", "softmax": "categorical"}.get(name, "int"),
    )
    n = 2 if head.activation == "sigmoid" else units
    model.compile(loss=head.loss(), metrics=["accuracy"])
    return SavedRun(model, [str(i) for i in range(n)], shape, head, None)


def evaluate_saved(
    path: str | Path,
    data: str,
    *,
    batch_size: int = 64,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
    skip_bad_images: bool = False,
    unsafe_deserialization: bool = False,
) -> dict[str, float]:
    """Test metrics of a saved model on the test split of `data`.

    A folder without train/ and test/ is split with the fractions and seed of the training
    run, so the test images are the same ones.

    Args:
        path: a run directory or `.keras` file.
        data: a tfds name or an image folder.
        batch_size: examples per evaluation step.
        data_dir: tfds data directory.
        manual_dir: folder with the original tfds archives.
        max_examples: evaluate at most this many test examples.
        skip_bad_images: leave out image files that cannot be decoded, with a warning.
        unsafe_deserialization: allow Lambda layers in the model (see `load_saved`).

    Raises:
        DataError: when the data's classes do not match the model's, or it cannot be read.
        RunDirError: see `load_saved`.
    """
    saved = load_saved(path, unsafe_deserialization=unsafe_deserialization)
    cfg = saved.config
    splits = data_lib.load_data(
        data,
        image_size=saved.image_shape[:2],
        channels=saved.image_shape[2],
        validation_fraction=cfg.data.validation_fraction if cfg else 0.1,
        test_fraction=cfg.data.test_fraction if cfg else 0.1,
        data_dir=data_dir,
        manual_dir=manual_dir,
        max_examples=max_examples,
        seed=cfg.train.seed if cfg else 0,
        skip_bad_images=skip_bad_images,
    )
    expected = len(saved.class_names)
    if splits.num_classes != expected:
        raise DataError(
            f"{data} has {splits.num_classes} classes but the model was trained on {expected} "
            f"({', '.join(saved.class_names[:5])}...); evaluate on data with the same classes. "
            f"Received: classes={splits.class_names[:5]}"
        )
    test = data_lib.prepare(
        splits.test,
        batch_size=batch_size,
        label_mode=saved.head.label_mode,
        num_classes=expected,
        cache=False,
    )
    try:
        metrics = saved.model.evaluate(test, verbose=0, return_dict=True)
    except tf.errors.InvalidArgumentError as error:
        translated = data_lib.label_range_error(error)
        if translated is None:
            raise
        raise translated from None
    return {k: float(v) for k, v in metrics.items()} | {"examples": splits.sizes["test"]}


def probabilities(outputs: np.ndarray, head: models.Head) -> np.ndarray:
    """Turns model outputs into class probabilities (N, classes) whatever the head."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if head.activation == "sigmoid":
        p = outputs.reshape(-1, 1)
        return np.concatenate([1.0 - p, p], axis=1)
    if head.activation is None:
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)
    return outputs


def predict_images(
    path: str | Path | None,
    images: Sequence[str],
    *,
    top_k: int = 3,
    weights: str | None = None,
    batch_size: int = 32,
    skip_bad_images: bool = False,
    unsafe_deserialization: bool = False,
) -> list[dict[str, Any]]:
    """Class names and probabilities for image files, best first.

    Args:
        path: a run directory or `.keras` file; None uses the stock VGG16 ImageNet classifier
            ("use a pre-trained model as it is"), with `weights` "imagenet" or a local file.
        images: image files or folders.
        top_k: how many classes per image.
        weights: for the stock classifier only.
        batch_size: images per forward pass.
        skip_bad_images: leave out files that cannot be decoded, with a warning naming each.
        unsafe_deserialization: allow Lambda layers in the model (see `load_saved`).

    Returns:
        [{"file": path, "predictions": [{"class": name, "probability": p}, ...]}, ...]

    Raises:
        DataError: naming the files that cannot be decoded (unless `skip_bad_images`).
        RunDirError: see `load_saved`.
    """
    files = data_lib.expand_image_arguments(images)
    if path is not None:
        saved = load_saved(path, unsafe_deserialization=unsafe_deserialization)
    scan = data_lib.check_images(files, channels=3, skip_bad_images=skip_bad_images)
    bad = {p for p, _ in scan.bad}
    files = [f for f in files if f not in bad]
    if not files:
        raise DataError(f"None of the images can be decoded; pass readable JPEG/PNG/GIF/BMP files. Received: {images}")
    if path is None:
        return _predict_imagenet(files, top_k=top_k, weights=weights or "imagenet", batch_size=batch_size)
    top_k = max(1, min(top_k, len(saved.class_names)))
    out = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = data_lib.load_images(chunk, image_size=saved.image_shape[:2], channels=saved.image_shape[2])
        probs = probabilities(saved.model.predict(batch, verbose=0), saved.head)
        for file, row in zip(chunk, probs):
            order = np.argsort(-row)[:top_k]
            out.append(
                {
                    "file": file,
                    "predictions": [
                        {"class": saved.class_names[i], "probability": float(row[i])} for i in order
                    ],
                }
            )
    return out


def _predict_imagenet(files: list[str], *, top_k: int, weights: str, batch_size: int) -> list[dict[str, Any]]:
    from kerastune_flow.errors import WeightsError

    try:
        model = keras.applications.VGG16(weights=weights, include_top=True)
    except Exception as error:
        raise WeightsError(
            "The ImageNet weights for the full VGG16 classifier could not be loaded; put "
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5 (553,467,096 bytes) in ~/.keras/models/ or pass "
            f"--weights PATH to a local copy. Received: {type(error).__name__}: {str(error)[:160]}"
        ) from None
    out = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = data_lib.load_images(chunk, image_size=(224, 224), channels=3)
        probs = model.predict(keras.applications.vgg16.preprocess_input(batch), verbose=0)
        try:
            decoded = keras.applications.vgg16.decode_predictions(probs, top=top_k)
            rows = [[{"class": name, "probability": float(p)} for _, name, p in d] for d in decoded]
        except Exception:  # the class index file is fetched from the network on first use
            log.warning("ImageNet class names unavailable offline: showing class indices")
            rows = [
                [{"class": f"imagenet_{i}", "probability": float(p[i])} for i in np.argsort(-p)[:top_k]]
                for p in probs
            ]
        out.extend({"file": f, "predictions": r} for f, r in zip(chunk, rows))
    return out
