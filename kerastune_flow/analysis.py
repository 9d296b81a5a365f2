"""Looking at a trained model: test predictions, confusion matrix, per-class accuracy, the
misclassified images, and which layers train. Plots are `Plot`s: a matplotlib `Figure` (no pyplot
state) that Jupyter shows inline as a PNG and `savefig` writes to a file.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerastune_flow import data as data_lib


class Plot:
    """A matplotlib Figure that shows itself in Jupyter (as PNG) without pyplot's global state.

    Attributes:
        figure: the `matplotlib.figure.Figure`.
    """

    def __init__(self, figure):
        self.figure = figure

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def savefig(self, *args: Any, **kwargs: Any) -> None:
        """`Figure.savefig`."""
        self.figure.savefig(*args, **kwargs)


@dataclasses.dataclass
class SplitPredictions:
    """A model's predictions on a test split.

    Attributes:
        images: (N, H, W, C) float32 pixels in 0..255.
        labels: (N,) true class indices.
        predicted: (N,) predicted class indices.
        probabilities: (N, classes).
        class_names: index -> name.
    """

    images: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    class_names: list[str]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.labels == self.predicted)) if len(self.labels) else float("nan")


def predict_test_split(
    run_dir: str | Path,
    data: str | None = None,
    *,
    max_examples: int | None = None,
    unsafe_deserialization: bool = False,
) -> SplitPredictions:
    """Predicts the test split of the run's own data (or of `data`) with the run's best model.

    `unsafe_deserialization` allows a model holding Lambda layers (see `train.load_saved`).
    """
    from kerastune_flow.train import load_saved, probabilities

    saved = load_saved(run_dir, unsafe_deserialization=unsafe_deserialization)
    cfg = saved.config
    splits = data_lib.load_data(
        data or (cfg.data.data if cfg else ""),
        image_size=saved.image_shape[:2],
        channels=saved.image_shape[2],
        validation_fraction=cfg.data.validation_fraction if cfg else 0.1,
        test_fraction=cfg.data.test_fraction if cfg else 0.1,
        data_dir=cfg.data.data_dir if cfg else None,
        manual_dir=cfg.data.manual_dir if cfg else None,
        max_examples=max_examples or (cfg.data.max_examples if cfg else None),
        seed=cfg.train.seed if cfg else 0,
        skip_bad_images=cfg.data.skip_bad_images if cfg else False,
    )
    test = data_lib.prepare(splits.test, batch_size=128, cache=False)
    images, labels, probs = [], [], []
    for x, y in test:
        images.append(x.numpy())
        labels.append(y.numpy())
        probs.append(probabilities(saved.model.predict(x, verbose=0), saved.head))
    n = len(saved.class_names)
    probs_all = np.concatenate(probs) if probs else np.zeros((0, n))
    return SplitPredictions(
        images=np.concatenate(images) if images else np.zeros((0, *saved.image_shape), "float32"),
        labels=np.concatenate(labels) if labels else np.zeros((0,), int),
        predicted=probs_all.argmax(axis=1),
        probabilities=probs_all,
        class_names=saved.class_names,
    )


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predicted, int)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Recall of each class: correct / examples of that class (NaN for a class with none)."""
    totals = matrix.sum(axis=1)
    return {
        name: (float(matrix[i, i] / totals[i]) if totals[i] else float("nan")) for i, name in enumerate(class_names)
    }


def plot_confusion(matrix: np.ndarray, class_names: list[str], *, title: str = ""):
    """A confusion-matrix heat map with the counts written in."""
    from matplotlib.figure import Figure

    n = len(class_names)
    fig = Figure(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    return Plot(fig)


def plot_misclassified(predictions: SplitPredictions, *, limit: int = 16):
    """A grid of misclassified test images, titled "true -> predicted (probability)"."""
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(predictions.labels != predictions.predicted)[:limit]
    cols = 4
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    names = predictions.class_names
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, wrong):
        image = predictions.images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image.astype("uint8"), cmap="gray")
        p = predictions.probabilities[i, predictions.predicted[i]]
        ax.set_title(f"{names[predictions.labels[i]]} -> {names[predictions.predicted[i]]} ({p:.2f})", fontsize=8)
    if not len(wrong):
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return Plot(fig)


def trainable_table(model: keras.Model) -> list[dict[str, Any]]:
    """One row per layer (nested base models expanded): name, trainable, parameter count."""
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                rows.append(
                    {
                        "layer": f"{layer.name}/{inner.name}",
                        "trainable": bool(layer.trainable and inner.trainable),
                        "params": int(sum(np.prod(w.shape) for w in inner.weights)),
                    }
                )
        else:
            rows.append(
                {
                    "layer": layer.name,
                    "trainable": bool(layer.trainable),
                    "params": int(sum(np.prod(w.shape) for w in layer.weights)),
                }
            )
    return rows
