"""`compare`: from scratch vs feature extraction vs fine-tuning, measured on the user's data.

Every approach trains on the same train / validation / test split (the same data source, seed
and fractions) under the same budget rules (max epochs, early stopping), through
`train_and_evaluate`, each in its own sub-directory of the comparison's directory. The
comparison then writes:

    results.json      every number below, per approach and training fraction
    report.md         a recommendation computed from the numbers, then the tables
    report.html       the same, self-contained (plots inlined), for a browser
    curves.png        validation accuracy per epoch, every approach overlaid
    accuracy_vs_time.png, confusion_<approach>.png, and with several fractions sweep.png

The approaches are "cnn" (the CIFAR-10 CNN from scratch), "features" and "finetune"; the report's
words and files are written in compare_report.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir
from kerastune_flow.config import new_seed
from kerastune_flow.config.settings import TRACKING_FIELDS
from kerastune_flow.deploy import analysis, inference
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.runtime import process
from kerastune_flow.search.compare_report import FROM_SCRATCH, recommend, share_text, write_report
from kerastune_flow.training import tracking
from kerastune_flow.training.train import check_callbacks, train_and_evaluate

log = logging.getLogger(__name__)

APPROACHES = {
    FROM_SCRATCH: ("cifar10_cnn", "the CIFAR-10 CNN trained from scratch"),
    "features": ("vgg16_features", "feature extraction: frozen pre-trained base, new head"),
    "finetune": ("vgg16_finetune", "staged fine-tune: head first, then the top of the base"),
}
OLD_APPROACHES = {"scratch": FROM_SCRATCH}  # accepted until the next release, with a deprecation line


@dataclasses.dataclass
class ApproachResult:
    """One trained approach at one training fraction."""

    approach: str
    fraction: float
    run_dir: str
    train_images: int
    test_accuracy: float
    test_loss: float
    best_epoch: int | None
    epochs_run: int
    train_seconds: float
    seconds_per_epoch: float
    trainable_params: int
    total_params: int
    peak_rss_mb: float
    examples_seen: int
    confusion: list[list[int]]
    history: list[dict[str, Any]]
    source_accuracy_after: float | None = None


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the process's peak so far (it never goes down)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _confusion(run_dir: Path, *, unsafe_deserialization: bool = False) -> list[list[int]]:
    split = analysis.predict_test_split(run_dir, unsafe_deserialization=unsafe_deserialization)
    return analysis.confusion_matrix(split.labels, split.predicted, len(split.class_names)).tolist()


def source_accuracy(
    source: str | Path, base: keras.Model | None = None, *, unsafe_deserialization: bool = False
) -> float | None:
    """Accuracy of a pre-trained run on its own test data, optionally with the layers of a
    (fine-tuned) base copied in: the forgetting the articles warn about, measured.

    Returns None when the run directory does not say what its data was.
    """
    saved = inference.load_saved(source, unsafe_deserialization=unsafe_deserialization)
    if saved.config is None:
        return None
    model = saved.model
    if base is not None:
        for layer in base.layers:
            if layer.weights and layer.name in {inner.name for inner in model.layers}:
                model.get_layer(layer.name).set_weights(layer.get_weights())
    splits = inference.test_split(saved)
    test = data_lib.prepare(
        splits.test, batch_size=64, label_mode=saved.head.label_mode, num_classes=len(saved.class_names), cache=False
    )
    return float(model.evaluate(test, verbose=0, return_dict=True)["accuracy"])


def compare(
    data: str,
    run_dir: str | Path,
    *,
    approaches: Sequence[str] = tuple(APPROACHES),
    train_fractions: Sequence[float] = (1.0,),
    preset: str = "reference",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Trains each approach on the same split and budget and writes the report.

    Args:
        data: a tfds name or an image folder, as for `train`.
        run_dir: the comparison's directory; each approach gets a sub-directory.
        approaches: any of "cnn" (from scratch), "features", "finetune".
        train_fractions: shares of the training split, for a data-size sweep.
        preset: a config preset ("smoke" for a tiny run).
        callbacks: your own Keras callbacks, for every approach's fits (see `train_and_evaluate`).
        **overrides: config fields shared by every approach (epochs, head_epochs, batch_size,
            image_size, backbone, base, base_output, weights, patience, seed, ...).

    Returns:
        The content of results.json.

    Raises:
        ConfigError: for an unknown approach or a fraction outside (0, 1].
    """
    callbacks = check_callbacks(callbacks)  # refused before anything is written, as train refuses them
    unknown = [a for a in approaches if a not in APPROACHES and a not in OLD_APPROACHES]
    if unknown:
        raise ConfigError(f"Unknown approach {unknown[0]!r}; choose from {', '.join(APPROACHES)}. Received: {unknown}")
    if not train_fractions or any(not 0 < f <= 1 for f in train_fractions):
        raise ConfigError(f"Training fractions must lie in (0, 1]. Received: {list(train_fractions)}")
    approaches = [_current_name(a) for a in approaches]  # after the checks: a refused command says one thing
    tracked = make_config(
        APPROACHES[approaches[0]][0], preset, **{k: overrides[k] for k in TRACKING_FIELDS if k in overrides}
    )
    tracking.require(tracked)
    run_dir = Path(run_dir)
    if rundir.claim_dir(run_dir, kinds=("compare",)) is not None:
        log.info("Replacing the comparison in %s: its approaches resume or train again", run_dir)
    params = dict(data=data, approaches=approaches, train_fractions=list(train_fractions), preset=preset, **overrides)
    again = not (run_dir / rundir.RESULTS_JSON).exists()  # an interrupted comparison continues its MLflow run
    with rundir.run_lock(run_dir):
        # --track mlflow: the comparison's parent run, each approach a nested run.
        with tracking.parent_run(tracked, run_dir, experiment="compare", params=params, continue_run=again) as parent:
            report = _compare(data, run_dir, approaches, train_fractions, preset, overrides, callbacks)
            parent.log_metrics(
                {f"{Path(r['run_dir']).name}.test_accuracy": r["test_accuracy"] for r in report["results"]}
            )
            parent.log_files(run_dir / name for name in (rundir.RESULTS_JSON, "report.md", "report.html", "curves.png"))
            return report


def _current_name(approach: str) -> str:
    """An approach's name, an old spelling replaced (with the deprecation line)."""
    if approach not in OLD_APPROACHES:
        return approach
    new = OLD_APPROACHES[approach]
    log.warning("`--approaches %s` is now `--approaches %s`; the old name goes in the next release.", approach, new)
    return new


def _compare(
    data: str,
    run_dir: Path,
    approaches: Sequence[str],
    train_fractions: Sequence[float],
    preset: str,
    overrides: dict[str, Any],
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> dict[str, Any]:
    """The comparison of `compare`, its arguments checked, with its folder held."""
    # Before a base is read starts TensorFlow: then the process still sets its threads itself.
    defaults = make_config("cifar10_cnn", preset).train
    process.prepare_process(
        overrides.get("strategy") or defaults.strategy, deterministic=bool(overrides.get("deterministic"))
    )
    if overrides.get("seed") is None:  # one seed for every approach: the same split of a folder
        overrides["seed"] = defaults.seed
        if overrides["seed"] is None:
            overrides["seed"] = new_seed()
            log.info("No --seed given: the comparison's seed is %d", overrides["seed"])
    base = overrides.get("base")
    unsafe = bool(overrides.get("unsafe_deserialization"))
    source_before = source_accuracy(base, unsafe_deserialization=unsafe) if base and Path(base).is_dir() else None
    common = _common_settings(preset, overrides)
    runs = [(fraction, approach) for fraction in sorted(train_fractions) for approach in approaches]
    results: list[ApproachResult] = []
    for step, (fraction, approach) in enumerate(runs, start=1):
        name = approach if len(train_fractions) == 1 else f"{approach}_{fraction:g}"
        log.info(
            "[%d/%d] %s (%s), %s: starting", step, len(runs), approach, APPROACHES[approach][0], share_text(fraction)
        )
        measure_forgetting = approach == "finetune" and source_before is not None
        result = _run_approach(
            data, run_dir / name, approach, fraction, preset, common, measure_forgetting, callbacks=callbacks
        )
        results.append(result)
        log.info(
            "[%d/%d] %s: test accuracy %.4f in %.1f s (%d epochs) on %s",
            step,
            len(runs),
            approach,
            result.test_accuracy,
            result.train_seconds,
            result.epochs_run,
            share_text(fraction, result.train_images),
        )
        keras.backend.clear_session()
    class_names = rundir.read_json(Path(results[0].run_dir) / rundir.CONFIG_JSON)["class_names"]
    weights = overrides.get("weights", make_config("vgg16_features", preset).model.weights)
    report = {
        "data": data,
        "class_names": class_names,
        "hardware": _hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "pretrained": _pretrained_description(base, weights),
        "meaningful": bool(base) or weights not in (None, "none"),
        "source_accuracy_before": source_before,
        "results": [dataclasses.asdict(r) for r in results],
    }
    report["recommendation"] = recommend(report)
    rundir.atomic_write_json(run_dir / rundir.RESULTS_JSON, report)
    write_report(report, run_dir)
    return report


def _common_settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings every approach shares: the same images and batches for all, so the base's
    input size when there is a base, else the transfer recipes' size; one batch size; one split."""
    common = dict(overrides)
    base = overrides.get("base")
    if base and not common.get("image_size"):
        unsafe = bool(overrides.get("unsafe_deserialization"))
        cut = models.cut_base(base, overrides.get("base_output"), unsafe_deserialization=unsafe)
        common["image_size"] = tuple(cut.input_shape[1:3])
    defaults = make_config("vgg16_features", preset).data
    for name in ("image_size", "batch_size", "validation_fraction"):
        if common.get(name) is None:
            common[name] = getattr(defaults, name)
    return common


def _run_approach(
    data: str,
    run_dir: Path,
    approach: str,
    fraction: float,
    preset: str,
    common: dict[str, Any],
    measure_forgetting: bool,
    *,
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> ApproachResult:
    """Trains one approach on `fraction` of the training split in `run_dir`, and measures it."""
    recipe = APPROACHES[approach][0]
    shared = dict(common)
    if not get_recipe(recipe).transfer:  # from scratch: no base
        shared.pop("base", None)
        shared.pop("base_output", None)
    config = make_config(recipe, preset, data=data, train_fraction=fraction, **shared)
    run = train_and_evaluate(config, run_dir, overwrite=True, callbacks=callbacks)
    meta = rundir.read_json(run.run_dir / rundir.CONFIG_JSON)
    epoch_times = [r["epoch_seconds"] for r in run.history if "epoch_seconds" in r]
    unsafe = bool(common.get("unsafe_deserialization"))
    after = None
    if measure_forgetting:
        after = source_accuracy(common["base"], models.find_base(run.model), unsafe_deserialization=unsafe)
    return ApproachResult(
        approach=approach,
        fraction=fraction,
        run_dir=str(run.run_dir),
        train_images=meta["sizes"]["train"],
        test_accuracy=run.test_metrics["accuracy"],
        test_loss=run.test_metrics["loss"],
        best_epoch=run.results["best_epoch"],
        epochs_run=run.results["epochs_run"],
        train_seconds=run.results["train_seconds"],
        seconds_per_epoch=round(float(np.mean(epoch_times)), 3) if epoch_times else math.nan,
        trainable_params=run.results["trainable_params"],
        total_params=run.results["total_params"],
        peak_rss_mb=_peak_rss_mb(),
        examples_seen=run.results["examples_seen"],
        confusion=_confusion(run.run_dir, unsafe_deserialization=unsafe),
        history=run.history,
        source_accuracy_after=after,
    )


def _hardware() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    accel = f"{len(gpus)} GPU(s)" if gpus else "no GPU or TPU"
    versions = f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {accel}; {versions}"


def _pretrained_description(base: str | None, weights: str | None) -> str:
    if base:
        return f"the user's own pre-trained model {base}"
    if weights in (None, "none"):
        return "none: the backbone has random weights"
    return f"{weights} weights"
