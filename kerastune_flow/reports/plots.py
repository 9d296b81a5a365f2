"""Plots: learning curves, confusion matrices, misclassified images, the comparison's and the search's.

Every plot uses matplotlib's object API (no pyplot state), so it works headless and in threads;
files are written atomically (`rundir.atomic_file`). A `Plot` shows itself in Jupyter as a PNG.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kerastune_flow import rundir

if TYPE_CHECKING:  # for the annotation only: analysis sits above plots
    from kerastune_flow.deploy.analysis import SplitPredictions

DPI = 100


class Plot:
    """A matplotlib Figure that shows itself in Jupyter (as PNG) without pyplot's global state.

    Attributes:
        figure: the `matplotlib.figure.Figure`.
    """

    def __init__(self, figure: Figure):
        self.figure = figure

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()

    def savefig(self, path: str | os.PathLike) -> Path:
        """Writes the figure as a PNG file, atomically; returns the path."""
        return save_figure(self.figure, path)


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Writes `figure` to a PNG file through `rundir.atomic_file`; returns the path."""
    with rundir.atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def save_curves(history: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Plots loss and accuracy per epoch (train and validation); marks every stage change."""
    epochs = [r["epoch"] + 1 for r in history]
    changes = [
        (cur["epoch"] + 1, cur["stage"])
        for prev, cur in itertools.pairwise(history)
        if cur.get("stage") and cur.get("stage") != prev.get("stage")
    ]
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            key = prefix + metric
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=key, markersize=3)
        for i, (epoch, stage) in enumerate(changes):
            label = "fine-tune starts" if i == 0 else None
            ax.axvline(epoch - 0.5, color="grey", linestyle=":", label=label)
            ax.annotate(
                stage,
                (epoch - 0.5, 1),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                color="grey",
                xytext=(3, -12),
                textcoords="offset points",
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: list[str], *, title: str = "") -> Plot:
    """A confusion-matrix heat map with the counts written in."""
    n = len(class_names)
    fig = Figure(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    dark = matrix.max() / 2 if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):  # white on the dark cells, black on the light ones
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > dark else "black")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    return Plot(fig)


def plot_misclassified(predictions: SplitPredictions, *, limit: int = 16) -> Plot:
    """A grid of misclassified test images (see `analysis.predict_test_split`), titled
    "true -> predicted (probability)"."""
    labels, predicted, names = predictions.labels, predictions.predicted, predictions.class_names
    wrong = np.flatnonzero(labels != predicted)[:limit]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, wrong, strict=False):  # more axes than images
        image = predictions.images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image.astype("uint8"), cmap="gray")
        p = predictions.probabilities[i, predicted[i]]
        ax.set_title(f"{names[labels[i]]} -> {names[predicted[i]]} ({p:.2f})", fontsize=8)
    if not len(wrong):
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return Plot(fig)


def lr_find_title(record: dict[str, Any]) -> str:
    """A range test's title: what was fitted (the record's "fitted", e.g. "the cifar10_cnn model",
    "the head on the frozen base", "the fine-tune stage"; else its stage) and the suggestion."""
    fitted = record.get("fitted") or f"the {record.get('stage', 'head')} stage"
    return f"Range test of {fitted}: suggestion {record['suggestion']:.2g} ({record['rule']})"


def plot_lr_find(record: dict[str, Any], *, title: str = "") -> Plot:
    """A range test (`lr_range.RangeTest.record()`) against the rate on a log axis: each step's
    loss faint, the loss smoothed exponentially (fastai's and Lightning's curve) and, when the
    record has it, smoothed without lag (the "descent" rule's), the suggestion marked on the
    curve its rule reads. Titled `title`, else by `lr_find_title`."""
    lrs = np.asarray(record["lrs"])
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, np.asarray(record["losses"], dtype=float), color="C0", alpha=0.2, linewidth=1, label="loss")
    curves = {"smoothed": np.asarray(record["smoothed"], dtype=float)}
    ax.plot(lrs, curves["smoothed"], color="C0", linewidth=1, label="smoothed (exponential)")
    if record.get("centered"):
        curves["centered"] = np.asarray(record["centered"], dtype=float)
        ax.plot(lrs[: len(curves["centered"])], curves["centered"], color="C1", label="smoothed (no lag)")
    finite = np.concatenate([c[np.isfinite(c)] for c in curves.values()])
    if finite.size:  # the raw losses of the diverging end would flatten the curves
        low, high = finite.min(), finite.max()
        ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.05 * (high - low + 1e-12))
    suggestion = record["suggestion"]
    ax.axvline(suggestion, color="C3", linestyle="--", label=f"suggestion {suggestion:.2g} ({record['rule']})")
    curve = curves.get("centered") if record["rule"] == "descent" else None
    curve = curves["smoothed"] if curve is None else curve
    if lrs[0] <= suggestion <= lrs[len(curve) - 1]:
        ax.plot([suggestion], [np.interp(np.log(suggestion), np.log(lrs[: len(curve)]), curve)], "o", color="C3")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="training loss", title=title or lr_find_title(record))
    ax.grid(alpha=0.3)
    ax.legend()
    return Plot(fig)


# --------------------------------------------------------------------------- the comparison

# One look per approach, so that identical curves stay visible: the features run and a fine-tune's
# stage 1 train the same head on the same features, so their first epochs coincide. The second
# approach is drawn as a wide pale band beneath, the others as thin lines on top of it.
CURVE_STYLES = (
    dict(linestyle="-", marker="o", linewidth=1.8, markersize=4, zorder=3),
    dict(linestyle="-", marker="s", linewidth=6, markersize=9, alpha=0.4, zorder=2),
    dict(linestyle="--", marker="^", linewidth=1.5, markersize=5, zorder=4),
)


def plot_learning_curves(rows: list[dict[str, Any]]) -> Plot:
    """Validation accuracy (training accuracy for a run that held none out) per epoch of each
    `compare` result row, each approach in its own line style and marker (`CURVE_STYLES`), and a
    staged run's stage changes marked."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(rows):
        history = r["history"]
        xs = [h["epoch"] + 1 for h in history]
        key = "val_accuracy" if any("val_accuracy" in h for h in history) else "accuracy"
        style = CURVE_STYLES[i % len(CURVE_STYLES)]
        (line,) = ax.plot(xs, [h.get(key, np.nan) for h in history], label=r["approach"], **style)
        changes = [
            cur for prev, cur in itertools.pairwise(history) if cur.get("stage") and cur["stage"] != prev.get("stage")
        ]
        for n, cur in enumerate(changes):
            ax.axvline(cur["epoch"] + 0.5, color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(
                f"{r['approach']}: " + ("stage 2" if n == 0 else cur["stage"]),
                (cur["epoch"] + 0.5, 0.02),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=8,
                color=line.get_color(),
            )
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Learning curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return Plot(fig)


def comparison_plots(report: dict[str, Any], run_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes the plots of a `compare` report into `run_dir`: validation curves of every approach,
    accuracy against training time, a confusion matrix per approach and, with several training
    fractions, accuracy against data size.

    Returns:
        {name: path} of each PNG written.
    """
    run_dir = Path(run_dir)
    rows = report["results"]
    full = max(r["fraction"] for r in rows)
    at_full = [r for r in rows if r["fraction"] == full]
    paths = {}

    paths["curves"] = plot_learning_curves(at_full).savefig(run_dir / "curves.png")

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for r in at_full:
        point = (r["train_seconds"], 100 * r["test_accuracy"])
        ax.scatter(*point, s=60)
        ax.annotate(r["approach"], point, xytext=(5, 5), textcoords="offset points")
    ax.margins(0.25)  # room for the labels inside the frame
    ax.set(xlabel="training time (s)", ylabel="test accuracy (%)", title="Accuracy vs time")
    ax.grid(alpha=0.3)
    paths["accuracy_vs_time"] = save_figure(fig, run_dir / "accuracy_vs_time.png")

    for r in at_full:
        plot = plot_confusion(
            np.array(r["confusion"]), report["class_names"], title=f"{r['approach']}: {100 * r['test_accuracy']:.1f} %"
        )
        paths[f"confusion_{r['approach']}"] = plot.savefig(run_dir / f"confusion_{r['approach']}.png")

    if len({r["fraction"] for r in rows}) > 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for approach in dict.fromkeys(r["approach"] for r in rows):
            points = sorted((r["train_images"], 100 * r["test_accuracy"]) for r in rows if r["approach"] == approach)
            ax.plot(*zip(*points, strict=True), "-o", label=approach)
        ax.set(xlabel="training images", ylabel="test accuracy (%)", title="Accuracy vs data size")
        ax.grid(alpha=0.3)
        ax.legend()
        paths["sweep"] = save_figure(fig, run_dir / "sweep.png")
    return paths


def tuning_plots(summary: dict[str, Any], run_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes the plots of a `tune` summary into `run_dir`: the objective over trials with the
    best so far, each hyperparameter against the objective, and the best against the defaults
    on the test split.

    Returns:
        {name: path} of each PNG written.
    """
    run_dir = Path(run_dir)
    objective = summary["objective"]
    done = [t for t in summary["trials"] if t["objective"] is not None]
    better = max if summary["direction"] == "max" else min
    paths = {}

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    xs = [int(t["trial"]) for t in done]
    ys = [t["objective"] for t in done]
    ax.scatter(xs, ys, s=30, label="trial")
    ax.step(xs, list(itertools.accumulate(ys, better)), where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=objective, title=f"{objective} over trials")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    paths["objective_over_trials"] = save_figure(fig, run_dir / "objective_over_trials.png")

    names = summary["space"]
    if names and done:
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for ax, name in zip(axes, names, strict=False):
            values = [t["hyperparameters"].get(name) for t in done]
            scale = summary.get("scales", {}).get(name, "choice")
            if scale in ("log", "linear"):
                ax.scatter(values, ys, s=30)
                ax.set_xscale(scale)
            else:
                labels = sorted({str(v) for v in values}, key=lambda v: (len(v), v))
                ax.scatter([labels.index(str(v)) for v in values], ys, s=30)
                ax.set_xticks(range(len(labels)), labels, rotation=20)
                ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.set(xlabel=name, ylabel=objective)
            ax.grid(alpha=0.3)
        for ax in axes[len(names) :]:
            ax.set_visible(False)
        paths["hyperparameters"] = save_figure(fig, run_dir / "hyperparameters.png")

    test = summary.get("test")
    if test:
        plot = plot_best_vs_defaults(100 * test["defaults"]["accuracy"], 100 * test["best"]["accuracy"])
        paths["best_vs_defaults"] = plot.savefig(run_dir / "best_vs_defaults.png")
    return paths


def plot_best_vs_defaults(defaults: float, tuned: float) -> Plot:
    """Two bars, the test accuracy (%) of the recipe's defaults and of the tuned settings, each
    value written on its bar. The axis is zoomed to the values (a 1-point difference would
    vanish on 0 to 100) and says so, with room above the bars for their labels."""
    values = [defaults, tuned]
    low, high = min(values), max(values)
    span = max(high - low, 1.0)  # a tie still gets a readable scale
    bottom = max(0.0, low - 2 * span)
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(["defaults", "tuned"], [v - bottom for v in values], bottom=bottom, color=["C7", "C2"], width=0.6)
    ax.bar_label(bars, labels=[f"{v:.2f} %" for v in values], padding=3)
    ax.set_ylim(bottom, high + 0.8 * span)
    difference = tuned - defaults
    ax.set(
        ylabel="test accuracy (%)" + (", zoomed" if bottom > 0 else ""),
        title=f"Tuned against the defaults, test split: {difference:+.2f} points",
    )
    ax.grid(axis="y", alpha=0.3)
    return Plot(fig)
