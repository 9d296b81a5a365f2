"""Looking at a trained model: its predictions on the test split, the confusion matrix,
per-class accuracy, and which layers train. The plots of these are in `plots.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerastune_flow import data as data_lib
from kerastune_flow.deploy import inference


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
    """Predicts the test split of the run's own data (or of `data`, see `inference.test_split`)
    with the run's best model.

    `unsafe_deserialization` allows a model holding Lambda layers (see `inference.load_saved`).
    """
    saved = inference.load_saved(run_dir, unsafe_deserialization=unsafe_deserialization)
    changes = {"max_examples": max_examples} if max_examples else {}
    splits = inference.test_split(saved, data, **changes)
    test = data_lib.prepare(splits.test, batch_size=128, cache=False)
    images, labels, probs = [], [], []
    for x, y in test:
        images.append(x.numpy())
        labels.append(y.numpy())
        probs.append(inference.probabilities(saved.model.predict(x, verbose=0), saved.head))
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
