"""Using a trained model: load a run directory, a `.keras` file or an exported model (`run export`),
evaluate it on its test split, and predict the classes of image files (also with the stock VGG16
ImageNet classifier)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import data as data_lib
from kerastune_flow import models, rundir
from kerastune_flow.config import Config
from kerastune_flow.data.samples import resolve_sample
from kerastune_flow.deploy import artifacts
from kerastune_flow.errors import DataError, RunDirError, WeightsError
from kerastune_flow.runtime import progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SavedRun:
    """A model and what its run directory remembers.

    Attributes:
        model: the loaded keras.Model; None for an exported model.
        class_names: label index -> name.
        image_shape: (height, width, channels) the model takes.
        head: the Head (output activation and label mode).
        config: the training Config, or None for a bare `.keras` file (or its export).
        path: the `.keras` file, or the exported artifact.
        artifact: the exported model run by its own runtime, or None for a Keras model.
    """

    model: keras.Model | None
    class_names: list[str]
    image_shape: tuple[int, int, int]
    head: models.HeadSpec
    config: Config | None
    path: Path
    artifact: artifacts.Artifact | None = None

    def outputs(self, images: Any, *, batch_size: int = 32) -> np.ndarray:
        """What the model (Keras or exported) returns for a batch of 0..255 images."""
        if self.artifact is not None:
            return self.artifact(images, batch_size=batch_size)
        return self.model.predict(images, batch_size=batch_size, verbose=0)


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
    model_path = path / rundir.BEST_MODEL if path.is_dir() else path
    meta_path = (path if path.is_dir() else path.parent) / rundir.CONFIG_JSON
    if not model_path.exists():
        raise RunDirError(
            f"No model at {model_path}; pass a run directory written by `run train` or a .keras file. Received: {path}"
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
            meta = rundir.read_json(meta_path)
            head = models.HeadSpec(**meta["head"])
            saved = SavedRun(
                model=model,
                class_names=list(meta["class_names"]),
                image_shape=tuple(meta["image_shape"]),
                head=head,
                config=Config.from_dict(meta["config"]),
                path=model_path,
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
    head = models.HeadSpec(
        units=units,
        activation=name if name in ("sigmoid", "softmax") else None,
        label_mode={"sigmoid": "binary", "softmax": "categorical"}.get(name, "int"),
    )
    n = 2 if head.activation == "sigmoid" else units
    model.compile(loss=head.loss(), metrics=["accuracy"])
    return SavedRun(model, [str(i) for i in range(n)], shape, head, None, model_path)


def load_for_inference(path: str | Path, *, unsafe_deserialization: bool = False) -> SavedRun:
    """`load_saved`, or an export folder of `run export` (or its artifact) run by its own runtime.

    Raises:
        RunDirError: see `load_saved` and `artifacts.read_export`.
        MissingPackageError: when the artifact's runtime is not installed.
    """
    folder = artifacts.export_dir_of(path)
    if folder is None:
        return load_saved(path, unsafe_deserialization=unsafe_deserialization)
    artifact, record = artifacts.load_artifact(folder)
    training = record.get("training")
    return SavedRun(
        model=None,
        class_names=record["class_names"],
        image_shape=tuple(record["image_shape"]),
        head=models.HeadSpec(**record["head"]),
        config=Config.from_dict(training["config"]) if training else None,
        path=artifact.path,
        artifact=artifact,
    )


def _evaluate_artifact(saved: SavedRun, test: tf.data.Dataset, shown: progress.Progress) -> dict[str, float]:
    """The metrics `keras.Model.evaluate` reports, of an exported model's outputs.

    The artifact's outputs go through an identity model compiled as `load_saved` compiles the
    Keras model, with the same batches, so that loss and accuracy are computed by the same code.
    """
    outputs, labels = [], []
    for images, batch_labels in test:
        outputs.append(saved.artifact(images.numpy(), batch_size=len(images)))
        labels.append(batch_labels.numpy())
        shown.advance(len(images))
    identity = keras.Sequential([keras.Input(outputs[0].shape[1:]), keras.layers.Identity()])
    identity.compile(loss=saved.head.loss(), metrics=["accuracy"])
    pairs = tf.data.Dataset.from_tensor_slices((np.concatenate(outputs), np.concatenate(labels)))
    return identity.evaluate(pairs.batch(len(outputs[0])), verbose=0, return_dict=True)


def test_split(saved: SavedRun, data: str | None = None, **changes: Any) -> data_lib.DataSplits:
    """The test images of a saved model: the run's own test split, or the test split of `data`.

    With a run directory (config.json beside the model), `data` (default: the run's own data) is
    split with the run's fractions and seed, so a folder without train/ and test/ gives the very
    test images the run held out. A bare `.keras` file does not say how its data was split, so
    `data` must bring its own test split: a tfds data set, or a folder with train/ and test/.

    Args:
        saved: from `load_saved`.
        data: a tfds name or an image folder; None: the run's own data.
        **changes: DataConfig fields to change, e.g. `max_examples=`, `data_dir=`.

    Raises:
        DataError: for a bare `.keras` file without `data`, or with data that has no test split
            of its own; when the data's classes do not match the model's; see `data.load_data`.
    """
    if saved.config is None:
        if not data or not data_lib.has_test_split(data):
            raise DataError(
                f"{saved.path} has no config.json beside it, so the images it trained on are unknown; pass --data "
                "a tfds name or a folder with train/ and test/ sub-folders (its test/ images are evaluated), or "
                f"the run directory. Received: data={data}"
            )
        config = Config().replace(seed=0)  # its own test split: the seed only orders the images
    else:
        config = saved.config
    if data:
        changes["data"] = data
    splits = data_lib.load_splits(
        config, image_size=saved.image_shape[:2], channels=saved.image_shape[2], train_fraction=1.0, **changes
    )
    expected = len(saved.class_names)
    if splits.num_classes != expected:
        raise DataError(
            f"{splits.source} has {splits.num_classes} classes but the model was trained on {expected} "
            f"({', '.join(saved.class_names[:5])}...); evaluate on data with the same classes. "
            f"Received: classes={splits.class_names[:5]}"
        )
    return splits


def evaluate_saved(
    path: str | Path,
    data: str | None = None,
    *,
    batch_size: int = 64,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
    skip_bad_images: bool = False,
    unsafe_deserialization: bool = False,
) -> dict[str, Any]:
    """Test metrics of a saved model, and which images they were measured on.

    Args:
        path: a run directory, `.keras` file or export folder (see `load_for_inference`).
        data: a tfds name or an image folder; None: the run's own data (see `test_split`).
        batch_size: examples per evaluation step.
        data_dir: tfds data directory (default: the run's).
        manual_dir: folder with the original tfds archives (default: the run's).
        max_examples: evaluate at most this many test examples.
        skip_bad_images: leave out image files that cannot be decoded, with a warning.
        unsafe_deserialization: allow Lambda layers in the model (see `load_saved`).

    Returns:
        The metrics, "examples" (how many were evaluated) and "test_split" (which, in words).

    Raises:
        DataError: see `test_split`.
        RunDirError: see `load_saved`.
    """
    saved = load_for_inference(path, unsafe_deserialization=unsafe_deserialization)
    given = dict(data_dir=data_dir, manual_dir=manual_dir, skip_bad_images=skip_bad_images or None)
    splits = test_split(saved, data, max_examples=max_examples, **{k: v for k, v in given.items() if v is not None})
    test = data_lib.prepare(
        splits.test,
        batch_size=batch_size,
        label_mode=saved.head.label_mode,
        num_classes=len(saved.class_names),
        cache=False,
    )
    shown = progress.Progress("Evaluating", total=splits.sizes["test"], unit="image")
    try:
        with shown:
            if saved.artifact is not None:
                metrics = _evaluate_artifact(saved, test, shown)
            else:
                callback = progress.keras_callback(shown, batch_size=batch_size)
                metrics = saved.model.evaluate(test, verbose=0, return_dict=True, callbacks=[callback])
    except tf.errors.InvalidArgumentError as error:
        translated = data_lib.label_range_error(error)
        if translated is None:
            raise
        raise translated from None
    return {k: float(v) for k, v in metrics.items()} | {
        "examples": splits.sizes["test"],
        "test_split": splits.test_source,
    }


def probabilities(outputs: np.ndarray, head: models.HeadSpec) -> np.ndarray:
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
        path: a run directory, `.keras` file or export folder; None uses the stock VGG16 ImageNet classifier
            ("use a pre-trained model as it is"), with `weights` "imagenet" or a local file.
        images: image files or folders; `digits/7` names a folder of the shipped sample (see
            `data.samples`) unless that path exists.
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
    files = data_lib.expand_image_arguments([resolve_sample(str(item)) for item in images])  # digits/7: the sample
    if path is not None:
        saved = load_for_inference(path, unsafe_deserialization=unsafe_deserialization)
    scan = data_lib.check_images(files, channels=3, skip_bad_images=skip_bad_images)
    bad = {p for p, _ in scan.bad}
    files = [f for f in files if f not in bad]
    if not files:
        raise DataError(f"None of the images can be decoded; pass readable JPEG/PNG/GIF/BMP files. Received: {images}")
    if path is None:
        return _predict_imagenet(files, top_k=top_k, weights=weights or "imagenet", batch_size=batch_size)
    top_k = max(1, min(top_k, len(saved.class_names)))
    out = []
    for chunk in progress.chunks("Predicting", files, batch_size):
        batch = data_lib.load_images(chunk, image_size=saved.image_shape[:2], channels=saved.image_shape[2])
        probs = probabilities(saved.outputs(batch), saved.head)
        for file, row in zip(chunk, probs, strict=True):
            order = np.argsort(-row)[:top_k]
            out.append(
                {
                    "file": file,
                    "predictions": [{"class": saved.class_names[i], "probability": float(row[i])} for i in order],
                }
            )
    return out


def _predict_imagenet(files: list[str], *, top_k: int, weights: str, batch_size: int) -> list[dict[str, Any]]:
    try:
        model = keras.applications.VGG16(weights=weights, include_top=True)
    except Exception as error:
        raise WeightsError(
            "The ImageNet weights for the full VGG16 classifier could not be loaded; put "
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5 (553,467,096 bytes) in ~/.keras/models/ or pass "
            f"--weights PATH to a local copy. Received: {type(error).__name__}: {str(error)[:160]}"
        ) from None
    out = []
    for chunk in progress.chunks("Predicting", files, batch_size):
        batch = data_lib.load_images(chunk, image_size=(224, 224), channels=3)
        probs = model.predict(keras.applications.vgg16.preprocess_input(batch), verbose=0)
        try:
            decoded = keras.applications.vgg16.decode_predictions(probs, top=top_k)
            rows = [[{"class": name, "probability": float(p)} for _, name, p in d] for d in decoded]
        except Exception:  # the class index file is fetched from the network on first use
            log.warning("ImageNet class names unavailable offline: showing class indices")
            rows = [
                [{"class": f"imagenet_{i}", "probability": float(p[i])} for i in np.argsort(-p)[:top_k]] for p in probs
            ]
        out.extend({"file": f, "predictions": r} for f, r in zip(chunk, rows, strict=True))
    return out
