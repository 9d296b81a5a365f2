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
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, reports, rundir, runlock
from kerastune_flow.config import new_seed
from kerastune_flow.deploy import analysis, inference
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.reports import plots
from kerastune_flow.runtime import process
from kerastune_flow.training.train import train_and_evaluate

log = logging.getLogger(__name__)

APPROACHES = {
    "scratch": ("cifar10_cnn", "a CNN trained from scratch"),
    "features": ("vgg16_features", "feature extraction: frozen pre-trained base, new head"),
    "finetune": ("vgg16_finetune", "staged fine-tune: head first, then the top of the base"),
}


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
    **overrides: Any,
) -> dict[str, Any]:
    """Trains each approach on the same split and budget and writes the report.

    Args:
        data: a tfds name or an image folder, as for `train`.
        run_dir: the comparison's directory; each approach gets a sub-directory.
        approaches: any of "scratch", "features", "finetune".
        train_fractions: shares of the training split, for a data-size sweep.
        preset: a config preset ("smoke" for a tiny run).
        **overrides: config fields shared by every approach (epochs, head_epochs, batch_size,
            image_size, backbone, base, base_output, weights, patience, seed, ...).

    Returns:
        The content of results.json.

    Raises:
        ConfigError: for an unknown approach or a fraction outside (0, 1].
    """
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise ConfigError(f"Unknown approach {unknown[0]!r}; choose from {', '.join(APPROACHES)}. Received: {unknown}")
    if not train_fractions or any(not 0 < f <= 1 for f in train_fractions):
        raise ConfigError(f"Training fractions must lie in (0, 1]. Received: {list(train_fractions)}")
    run_dir = Path(run_dir)
    if rundir.claim_dir(run_dir, kinds=("compare",)) is not None:
        log.info("Replacing the comparison in %s: its approaches resume or train again", run_dir)
    with runlock.run_lock(run_dir):
        return _compare(data, run_dir, approaches, train_fractions, preset, overrides)


def _compare(
    data: str,
    run_dir: Path,
    approaches: Sequence[str],
    train_fractions: Sequence[float],
    preset: str,
    overrides: dict[str, Any],
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
    results: list[ApproachResult] = []
    total = len(approaches) * len(train_fractions)
    unsafe = bool(overrides.get("unsafe_deserialization"))
    source_before = source_accuracy(base, unsafe_deserialization=unsafe) if base and Path(base).is_dir() else None
    # The same images and batches for every approach: the base's input size when there is a
    # base, else the transfer recipes' size; one batch size.
    common = dict(overrides)
    if base and not common.get("image_size"):
        cut = models.cut_base(base, overrides.get("base_output"), unsafe_deserialization=unsafe)
        common["image_size"] = tuple(cut.input_shape[1:3])
    defaults = make_config("vgg16_features", preset).data
    for name in ("image_size", "batch_size", "validation_fraction"):  # one split and one batch for all
        if common.get(name) is None:
            common[name] = getattr(defaults, name)
    step = 0
    for fraction in sorted(train_fractions):
        for approach in approaches:
            step += 1
            recipe, _ = APPROACHES[approach]
            shared = dict(common)
            if not get_recipe(recipe).transfer:  # from scratch: no base
                shared.pop("base", None)
                shared.pop("base_output", None)
            config = make_config(recipe, preset, data=data, train_fraction=fraction, **shared)
            name = approach if len(train_fractions) == 1 else f"{approach}_{fraction:g}"
            log.info("[%d/%d] %s (%s), %s: starting", step, total, approach, recipe, share_text(fraction))
            run = train_and_evaluate(config, run_dir / name, overwrite=True)
            meta = rundir.read_json(run.run_dir / rundir.CONFIG_JSON)
            epoch_times = [r["epoch_seconds"] for r in run.history if "epoch_seconds" in r]
            after = None
            if approach == "finetune" and source_before is not None:
                after = source_accuracy(base, models.find_base(run.model), unsafe_deserialization=unsafe)
            result = ApproachResult(
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
            results.append(result)
            log.info(
                "[%d/%d] %s: test accuracy %.4f in %.1f s (%d epochs) on %s",
                step,
                total,
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


def recommend(report: dict[str, Any]) -> list[str]:
    """Sentences computed from the measured numbers (never canned text)."""
    rows = report["results"]
    full = max(r["fraction"] for r in rows)
    at_full = [r for r in rows if r["fraction"] == full]
    best = max(at_full, key=lambda r: r["test_accuracy"])
    fastest = max(at_full, key=lambda r: r["test_accuracy"] / max(r["train_seconds"] / 60, 1e-9))
    lines = [
        f"Best test accuracy: {best['approach']} with {100 * best['test_accuracy']:.1f} % "
        f"({best['train_images']} training images, {best['train_seconds']:.0f} s of training).",
        f"Most accuracy per minute of training: {fastest['approach']} "
        f"({100 * fastest['test_accuracy']:.1f} % in {fastest['train_seconds']:.0f} s).",
    ]
    others = [r for r in at_full if r is not best]
    if others:
        runner = max(others, key=lambda r: r["test_accuracy"])
        gap = 100 * (best["test_accuracy"] - runner["test_accuracy"])
        if gap < 0.05:
            lines.append(f"{best['approach']} and {runner['approach']} tie on test accuracy.")
        else:
            lines.append(f"{best['approach']} beats {runner['approach']} by {gap:.1f} points of accuracy.")
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) > 1 and any(r["approach"] == "scratch" for r in rows):
        crossing = None
        for f in fractions:
            at = {r["approach"]: r for r in rows if r["fraction"] == f}
            transfer = [r["test_accuracy"] for a, r in at.items() if a != "scratch"]
            if "scratch" in at and transfer and at["scratch"]["test_accuracy"] >= max(transfer):
                crossing = at["scratch"]
                break
        if crossing is None:
            lines.append("Transfer beat training from scratch at every data size measured.")
        else:
            lines.append(
                f"Transfer stops helping at about {crossing['train_images']} training images "
                f"({percent(crossing['fraction'])} of the data): from there the CNN from scratch is as good or better."
            )
    if not report["meaningful"]:
        lines.append(
            "Caution: no pre-trained weights were available, so the transfer rows start from random weights; "
            "this comparison says nothing about transfer learning."
        )
    if report.get("source_accuracy_before") is not None:
        after = [r for r in at_full if r["source_accuracy_after"] is not None]
        for r in after:
            lines.append(
                f"Forgetting: on its own task the base went from {100 * report['source_accuracy_before']:.1f} % to "
                f"{100 * r['source_accuracy_after']:.1f} % after {r['approach']}; feature extraction leaves it "
                "unchanged."
            )
    return lines


# --------------------------------------------------------------------------- report


def percent(fraction: float) -> str:
    """A share of the training split as people write it: 1.0 -> "100 %", 0.3 -> "30 %"."""
    return f"{100 * fraction:.3g} %"


def share_text(fraction: float, train_images: int | None = None) -> str:
    """How much of the training split an approach trained on, in words: "all 1,800 training
    images", "540 training images (30 % of the training split)"; without a count, "all the
    training images" or "30 % of the training images"."""
    if train_images is None:
        return "all the training images" if fraction == 1 else f"{percent(fraction)} of the training images"
    if fraction == 1:
        return f"all {train_images:,} training images"
    return f"{train_images:,} training images ({percent(fraction)} of the training split)"


_COLUMNS = (
    ("approach", "approach", "{}"),
    ("fraction", "share of train", percent),
    ("train_images", "train images", "{:,}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("best_epoch", "best epoch", "{}"),
    ("epochs_run", "epochs", "{}"),
    ("train_seconds", "wall time s", "{:.1f}"),
    ("seconds_per_epoch", "s / epoch", "{:.2f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("total_params", "total params", "{:,}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("examples_seen", "examples seen", "{:,}"),
)


def _cell(value: Any, fmt: str | Callable[[Any], str]) -> str:
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def _table_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[_cell(r[key], fmt) for key, _, fmt in _COLUMNS] for r in report["results"]]


def write_report(report: dict[str, Any], run_dir: str | Path) -> tuple[Path, Path]:
    """Writes report.md and a self-contained report.html (plots inlined as data URIs)."""
    run_dir = Path(run_dir)
    plots_written = plots.comparison_plots(report, run_dir)
    header = [title for _, title, _ in _COLUMNS]
    rows = _table_rows(report)
    caution = (
        ""
        if report["meaningful"]
        else (
            "\n**This comparison is meaningless for transfer learning: no pre-trained weights were "
            "available, so the transfer approaches started from random weights.**\n"
        )
    )
    # The caution stands apart, in bold (red in HTML), instead of as one more bullet.
    bullets = [line for line in report["recommendation"] if not (caution and line.startswith("Caution:"))]
    md = [
        f"# Comparison on {report['data']}",
        "",
        *[f"- {line}" for line in bullets],
        caution,
        f"Hardware: {report['hardware']}. Pre-trained weights: {report['pretrained']}. Date: {report['date']}.",
        "",
        *reports.md_table(header, rows),
        "",
        "Peak RSS is the process's peak resident memory so far (it never decreases), after each approach.",
        "",
    ]
    md += [f"![{name}]({path.name})" for name, path in plots_written.items()]
    md_path = run_dir / "report.md"
    rundir.atomic_write_text(md_path, "\n".join(md) + "\n")

    body = [
        f"<h1>Comparison on {html.escape(report['data'])}</h1>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in bullets) + "</ul>",
        f"<p class='caution'><strong>{html.escape(caution.strip(chr(10) + ' *'))}</strong></p>" if caution else "",
        f"<p>Hardware: {html.escape(report['hardware'])}. Pre-trained weights: "
        f"{html.escape(report['pretrained'])}. Date: {html.escape(report['date'])}.</p>",
        reports.html_table(header, rows),
        *[reports.html_figure(path, name.replace("_", " ")) for name, path in plots_written.items()],
    ]
    page = reports.html_page("kerastune_flow comparison", body)
    html_path = run_dir / "report.html"
    rundir.atomic_write_text(html_path, page)
    return md_path, html_path
