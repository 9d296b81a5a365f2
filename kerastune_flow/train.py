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
from kerastune_flow import compat
from kerastune_flow import data as data_lib
from kerastune_flow import models
from kerastune_flow.config import Config
from kerastune_flow.errors import DataError, RunDirError
from kerastune_flow.strategy import default_jit_compile, describe, get_strategy, global_batch_size, is_tpu

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
CURVES_PNG = "curves.png"
STAGE1_DONE = "head_done.json"
STAGE1_WEIGHTS = "head_done.weights.h5"
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

    Raises:
        RunDirError: when it holds a finished run and `overwrite` is False, or is not writable.
    """
    workdir = Path(workdir)
    if (workdir / RESULTS_JSON).exists():
        if not overwrite:
            raise RunDirError(
                f"{workdir} already holds a finished run; pass --overwrite to replace it or choose another "
                f"--run-dir. Received: run_dir={workdir}"
            )
        for name in RUN_FILES:
            target = workdir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
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
    return (workdir / cb.BACKUP_DIR).exists()


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "machine": f"{platform.machine()} {platform.system()}",
    }


# --------------------------------------------------------------------------- building


def build_model(
    config: Config,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    jit_compile: bool = False,
) -> keras.Model:
    """Builds and compiles the recipe's model (call inside `strategy.scope()`).

    For vgg16_finetune this is stage one: the frozen feature extractor.
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
        learning_rate=m.learning_rate,
        jit_compile=jit_compile,
        steps_per_execution=t.steps_per_execution,
    )
    if m.recipe.startswith("vgg16"):
        common.update(weights=m.weights, dense_units=m.dense_units)
    return models.BUILDERS[m.recipe](**common)


def make_pipelines(
    splits: data_lib.DataSplits,
    config: Config,
    head: models.Head,
    strategy: tf.distribute.Strategy,
) -> dict[str, tf.data.Dataset]:
    """Batched train / validation / test pipelines at the global batch size."""
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
        out[name] = data_lib.prepare(
            getattr(splits, name),
            training=training,
            cache=data_lib.should_cache(splits.sizes[name], splits.image_shape, config.data.cache),
            augmenter=augmenter if training else None,
            drop_remainder=training and is_tpu(strategy),
            seed=config.train.seed,
            **common,
        )
    return out


def load_splits(config: Config) -> data_lib.DataSplits:
    """Loads the data of a config; VGG16 recipes get RGB images."""
    d = config.data
    return data_lib.load_data(
        d.data,
        image_size=d.image_size,
        channels=3 if config.model.recipe.startswith("vgg16") else None,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
        data_dir=d.data_dir,
        manual_dir=d.manual_dir,
        max_examples=d.max_examples,
        seed=config.train.seed,
    )


# --------------------------------------------------------------------------- fitting


def _callbacks(config: Config, run_dir: Path, *, stage: str | None = None, best=None):
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
    )


def _best_so_far(callbacks: list[keras.callbacks.Callback]):
    for callback in callbacks:
        if isinstance(callback, cb.BestModelCheckpoint):
            return callback.best
    return None


def _fit(model, pipes, config, callbacks, *, epochs, initial_epoch=0) -> keras.callbacks.History:
    return model.fit(
        pipes["train"],
        validation_data=pipes["validation"],
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        verbose=config.train.verbose,
        shuffle=False,  # the pipeline shuffles; Keras would only warn that it cannot
    )


def fit_staged(
    model: keras.Model,
    pipes: dict[str, tf.data.Dataset],
    config: Config,
    run_dir: Path,
    *,
    strategy: tf.distribute.Strategy,
    jit_compile: bool = False,
) -> int:
    """The staged fine-tune: head on the frozen base, then unfreeze and continue at a low rate.

    Stage one trains the head for up to `head_epochs` (with early stopping, best weights
    restored); stage two unfreezes the base from `unfreeze_at`, recompiles (trainable changes
    take effect only at compile time) with `finetune_learning_rate`, and continues with
    `initial_epoch` where stage one stopped, for `epochs` more, so the history is one continuous
    run. A finished stage one is recorded in the backup folder, so a resumed run skips it.

    Returns:
        The first epoch of stage two (the boundary).
    """
    m, t = config.model, config.train
    done_marker = run_dir / cb.BACKUP_DIR / STAGE1_DONE
    done_weights = run_dir / cb.BACKUP_DIR / STAGE1_WEIGHTS
    if done_marker.exists():
        state = json.loads(done_marker.read_text())
        model.load_weights(done_weights)
        boundary, best = state["boundary"], state["best"]
        log.info("Stage 1 (head) already done in an earlier attempt: resuming at stage 2, epoch %d", boundary + 1)
    else:
        log.info("Stage 1: training the head on the frozen base for up to %d epoch(s)", t.head_epochs)
        callbacks = _callbacks(config, run_dir, stage="head")
        history = _fit(model, pipes, config, callbacks, epochs=t.head_epochs)
        boundary = (history.epoch[-1] + 1) if history.epoch else t.head_epochs
        best = _best_so_far(callbacks)
        if t.backup:
            model.save_weights(done_weights)
            cb.atomic_write_json(done_marker, {"boundary": boundary, "best": best})
    base = model.get_layer(models.VGG16_BASE_NAME)
    with strategy.scope():
        index = models.unfreeze_from(base, m.unfreeze_at)
        models.compile_model(
            model,
            models.transfer_head(max(2, model.output_shape[-1])),
            optimizer=m.optimizer,
            learning_rate=m.finetune_learning_rate,
            jit_compile=jit_compile,
            steps_per_execution=t.steps_per_execution,
        )
    log.info(
        "Stage 2: base layers from %d (%s) unfrozen, learning rate %g, epochs %d to %d",
        index,
        base.layers[index].name if index < len(base.layers) else "none",
        m.finetune_learning_rate,
        boundary + 1,
        boundary + t.epochs,
    )
    callbacks = _callbacks(config, run_dir, stage="finetune", best=best)
    _fit(model, pipes, config, callbacks, epochs=boundary + t.epochs, initial_epoch=boundary)
    return boundary


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
    run_dir = Path(workdir)
    resumed = prepare_run_dir(run_dir, overwrite=overwrite)
    if resumed:
        log.info("Found a backup in %s: resuming the interrupted run", run_dir)
    keras.utils.set_random_seed(config.train.seed)
    compat.apply()  # TODO(move into get_strategy)
    strategy = get_strategy(config.train.strategy)
    jit_compile = default_jit_compile(strategy, config.train.jit_compile)
    log.info("Strategy: %s; XLA %s", describe(strategy), "on" if jit_compile else "off")

    splits = load_splits(config)
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
        "versions": _versions(),
    }
    cb.atomic_write_json(run_dir / CONFIG_JSON, metadata)

    with strategy.scope():
        model = build_model(
            config, input_shape=splits.image_shape, num_classes=splits.num_classes, jit_compile=jit_compile
        )
    start = time.perf_counter()
    boundary = None
    if config.model.recipe == "vgg16_finetune":
        boundary = fit_staged(model, pipes, config, run_dir, strategy=strategy, jit_compile=jit_compile)
    else:
        _fit(model, pipes, config, _callbacks(config, run_dir), epochs=config.train.epochs)
    train_seconds = time.perf_counter() - start

    test = model.evaluate(pipes["test"], verbose=0, return_dict=True)
    history = cb.read_history(run_dir)
    results = {
        "recipe": config.model.recipe,
        "test": {k: float(v) for k, v in test.items()},
        "train_seconds": round(train_seconds, 3),
        "epochs_run": len(history),
        "best_epoch": _best_epoch(history, config.train.monitor),
        "stage_boundary": boundary,
        "examples_seen": splits.sizes["train"] * len(history),
        **models.count_params(model),
        "strategy": describe(strategy),
        "resumed": resumed,
    }
    cb.atomic_write_json(run_dir / RESULTS_JSON, results)
    if history:
        save_curves(history, run_dir / CURVES_PNG, title=f"{config.model.recipe} on {splits.source}")
    if config.train.checkpoint and not (run_dir / cb.BEST_MODEL).exists():
        cb.atomic_save_model(model, run_dir / cb.BEST_MODEL)
    shutil.rmtree(run_dir / cb.BACKUP_DIR, ignore_errors=True)
    log.info("Test %s; run directory %s", _format_metrics(results["test"]), run_dir)
    return RunResult(run_dir=run_dir, model=model, history=history, results=results)


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
    """Plots loss and accuracy per epoch (train and validation); marks the fine-tune boundary.

    Uses matplotlib's object API (no pyplot state), so it works headless and in threads.
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] + 1 for r in history]
    boundary = next((r["epoch"] + 1 for r in history if r.get("stage") == "finetune"), None)
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            key = prefix + metric
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=key, markersize=3)
        if boundary is not None:
            ax.axvline(boundary - 0.5, color="grey", linestyle=":", label="fine-tune starts")
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


def load_saved(path: str | Path) -> SavedRun:
    """Loads a run directory (model.keras + config.json) or a bare `.keras` file.

    Raises:
        RunDirError: when the path is missing, holds no model, or the file cannot be loaded.
    """
    path = Path(path)
    model_path = path / cb.BEST_MODEL if path.is_dir() else path
    meta_path = (path if path.is_dir() else path.parent) / CONFIG_JSON
    if not model_path.exists():
        raise RunDirError(
            f"No model at {model_path}; pass a run directory written by `run train` or a .keras file. "
            f"Received: {path}"
        )
    try:
        model = keras.saving.load_model(model_path, safe_mode=True)
    except Exception as error:  # zip errors, unknown layers, unsafe lambdas
        raise RunDirError(
            f"Cannot load the model {model_path}: it is corrupt or was not saved by Keras 3 / kerastune_flow. "
            f"Received: {type(error).__name__}: {str(error)[:160]}"
        ) from None
    shape = tuple(int(d) for d in model.input_shape[1:])
    units = int(model.output_shape[-1])
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return SavedRun(
            model=model,
            class_names=list(meta["class_names"]),
            image_shape=tuple(meta["image_shape"]),
            head=models.Head(**meta["head"]),
            config=Config.from_dict(meta["config"]),
        )
    activation = getattr(model.layers[-1], "activation", None)
    name = getattr(activation, "__name__", None)
    head = models.Head(
        units=units,
        activation=name if name in ("sigmoid", "softmax") else None,
        label_mode={"sigmoid": "binary", "softmax": "categorical"}.get(name, "int"),
    )
    n = 2 if head.activation == "sigmoid" else units
    return SavedRun(model, [str(i) for i in range(n)], shape, head, None)


def evaluate_saved(
    path: str | Path,
    data: str,
    *,
    batch_size: int = 64,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
) -> dict[str, float]:
    """Test metrics of a saved model on the test split of `data`.

    A folder without train/ and test/ is split with the fractions and seed of the training
    run, so the test images are the same ones.

    Raises:
        DataError: when the data's classes do not match the model's.
    """
    saved = load_saved(path)
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
    metrics = saved.model.evaluate(test, verbose=0, return_dict=True)
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
) -> list[dict[str, Any]]:
    """Class names and probabilities for image files, best first.

    Args:
        path: a run directory or `.keras` file; None uses the stock VGG16 ImageNet classifier
            ("use a pre-trained model as it is"), with `weights` "imagenet" or a local file.
        images: image files or folders.
        top_k: how many classes per image.
        weights: for the stock classifier only.
        batch_size: images per forward pass.

    Returns:
        [{"file": path, "predictions": [{"class": name, "probability": p}, ...]}, ...]
    """
    files = data_lib.expand_image_arguments(images)
    if path is None:
        return _predict_imagenet(files, top_k=top_k, weights=weights or "imagenet", batch_size=batch_size)
    saved = load_saved(path)
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
