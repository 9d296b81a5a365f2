"""`run export`: a trained model as a SavedModel, a LiteRT flatbuffer or an ONNX file, checked.

The artifact is written by converters.py (Keras's own `Model.export` where it works), optionally
quantized (float16, or int8 calibrated on at most 500 training images of the run's own data),
then run with its own runtime on the run's test split and compared with the Keras model (here,
`measure_parity`): a float artifact must agree on every top-1 and differ by at most 1e-4, or
nothing is written; a quantized one is measured (accuracy drop, size) and written. Everything
is made in a temporary folder beside the output and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import rundir
from kerastune_flow.deploy import artifacts, inference
from kerastune_flow.deploy.artifacts import ARTIFACT_NAMES, FORMATS, QUANTIZATIONS
from kerastune_flow.deploy.converters import CONVERTERS, check_packages, float32_copy
from kerastune_flow.errors import ConfigError, DataError, ExportParityError, KerastuneFlowError
from kerastune_flow.runtime import progress

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # the largest absolute difference a float artifact may show
CALIBRATION_IMAGES = 500  # int8: at most this many training images set the activation ranges
GENERATED_IMAGES = 64  # a bare model without data is checked on this many generated images
AIM_INT8_DROP_POINTS = 1.0
AIM_SIZE_RATIO = 0.3
PARITY_BATCH = 32
# What the model's single output means, by its head's activation (the artifact returns the same).
OUTPUT_MEANING = {
    None: "one logit per class (softmax them for probabilities)",
    "softmax": "class probabilities",
    "sigmoid": "P(second class): one sigmoid unit, 1 minus it for the first",
}


def default_out(source: str | os.PathLike, format: str, quantize: str | None = None) -> Path:
    """RUN_DIR/export-FORMAT[-QUANTIZE] for a run directory, DIR/STEM-FORMAT[-QUANTIZE] beside a file."""
    source = Path(source)
    suffix = format + (f"-{quantize}" if quantize else "")
    if source.is_dir():
        return source / f"{rundir.EXPORT_PREFIX}{suffix}"
    return source.with_name(f"{source.stem}-{suffix}")


def check_choices(format: str, quantize: str | None) -> None:
    """Refuses an unknown format or quantization, and quantizing a SavedModel.

    Raises:
        ConfigError: naming the valid values.
    """
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}. Received: {format}")
    if quantize not in (None, *QUANTIZATIONS):
        raise ConfigError(
            f"Unknown quantization {quantize!r}; choose {' or '.join(QUANTIZATIONS)}, or leave it out for float32. "
            f"Received: quantize={quantize}"
        )
    if quantize and format == "saved_model":
        raise ConfigError(
            "A SavedModel is exported in float32 only; quantize with --format litert or onnx. "
            f"Received: format={format}, quantize={quantize}"
        )


# --------------------------------------------------------------------------- data and parity


def _images(saved: inference.SavedRun, data: str | None, max_examples: int | None, quantize: str | None):
    """The parity images (test split, or generated), their labels or None, in words; and for int8
    the calibration images.

    Raises:
        DataError: int8 for a bare model file without --data (nothing to calibrate on).
    """
    if saved.config is None and data is None:
        if quantize == "int8":
            raise DataError(
                f"{saved.path} has no config.json beside it, so there are no training images to calibrate int8 on; "
                "pass --data a tfds name or a folder with train/ and test/, or the run directory. Received: data=None"
            )
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 255, (GENERATED_IMAGES, *saved.image_shape)).astype(np.float32)
        what = f"{GENERATED_IMAGES} generated images (uniform random pixels, seed 0): no test data, no accuracy"
        return tf.data.Dataset.from_tensor_slices((images, np.zeros(len(images), np.int32))), False, what, None
    changes = {"max_examples": max_examples} if max_examples else {}
    splits = inference.test_split(saved, data, **changes)
    calibration = None
    if quantize == "int8":
        calibration = np.stack([image.numpy() for image, _ in splits.train.take(CALIBRATION_IMAGES)])
    return splits.test, True, f"the test split: {splits.test_source}", calibration


def measure_parity(
    saved: inference.SavedRun,
    artifact: artifacts.Artifact,
    test: tf.data.Dataset,
    *,
    labelled: bool,
    model: keras.Model | None = None,
    trained_policy: str | None = None,
) -> dict[str, Any]:
    """Runs the Keras model and the artifact on the same images, at batch 32 and batch 1.

    Args:
        saved: the run (its head, image shape and model).
        artifact: the export, with its runtime.
        test: unbatched (image, label) examples.
        labelled: whether the labels are real (else accuracy is not reported).
        model: the Keras model to compare with (default `saved.model`), e.g. its float32 copy.
        trained_policy: when `model` is a float32 copy of a mixed-precision `saved.model`, its
            policy: the artifact is then also compared with the model as trained.

    Returns:
        "examples", "top1_agreement", "max_abs_diff", "batch_sizes", and with labels the accuracy
        of each ("keras_accuracy", "artifact_accuracy") and the drop in points; with
        `trained_policy`, "against_trained_model": the same figures against `saved.model`.
    """
    model = model or saved.model
    ours, theirs, trained, labels = [], [], [], []
    with progress.Progress("Parity check", total=progress.count(test), unit="image") as shown:
        for images, batch_labels in test.batch(PARITY_BATCH):
            ours.append(model.predict_on_batch(images))
            theirs.append(artifact(images, batch_size=PARITY_BATCH))
            if trained_policy:
                trained.append(saved.model.predict_on_batch(images))
            labels.append(batch_labels.numpy())
            shown.advance(len(images))
    if not ours:
        raise DataError(f"The test split of {saved.path} is empty, so the export cannot be checked. Received: 0 images")
    ours, theirs, labels = (np.concatenate(a) for a in (ours, theirs, labels))
    # The batch dimension is dynamic: a full batch (test images repeated when there are fewer)
    # and one image alone must give the Keras model's outputs too.
    full = np.resize(next(iter(test.batch(PARITY_BATCH)))[0].numpy(), (PARITY_BATCH, *saved.image_shape))
    expected = model.predict_on_batch(full)
    diffs = [ours - theirs, expected - artifact(full, batch_size=PARITY_BATCH), expected[:1] - artifact(full[:1])]
    diff = max(float(np.max(np.abs(d))) for d in diffs)
    top_ours = inference.probabilities(ours, saved.head).argmax(axis=1)
    top_theirs = inference.probabilities(theirs, saved.head).argmax(axis=1)
    out: dict[str, Any] = {
        "examples": len(ours),
        "top1_agreement": float(np.mean(top_ours == top_theirs)),
        "max_abs_diff": diff,
        "batch_sizes": [1, PARITY_BATCH],
    }
    if labelled:
        keras_accuracy, artifact_accuracy = float(np.mean(top_ours == labels)), float(np.mean(top_theirs == labels))
        out.update(
            keras_accuracy=keras_accuracy,
            artifact_accuracy=artifact_accuracy,
            accuracy_drop_points=round(100 * (keras_accuracy - artifact_accuracy), 4),
        )
    if trained_policy:
        trained = np.concatenate(trained)
        top_trained = inference.probabilities(trained, saved.head).argmax(axis=1)
        out["against_trained_model"] = {
            "dtype_policy": trained_policy,
            "top1_agreement": float(np.mean(top_trained == top_theirs)),
            "max_abs_diff": float(np.max(np.abs(trained - theirs))),
            **({"keras_accuracy": float(np.mean(top_trained == labels))} if labelled else {}),
        }
    return out


def _check_float_parity(parity: dict[str, Any], format: str) -> None:
    if parity["top1_agreement"] < 1.0 or parity["max_abs_diff"] > PARITY_TOLERANCE:
        raise ExportParityError(
            f"The {format} export disagrees with the Keras model (top-1 agreement "
            f"{100 * parity['top1_agreement']:.2f} %, largest difference {parity['max_abs_diff']:.2e}, allowed 100 % "
            f"and {PARITY_TOLERANCE:g}), so it was not written; export another format and report the model. "
            f"Received: {parity['examples']} images"
        )


def _readable(folder: Path) -> None:
    """Gives the export the umask's permissions: mkdtemp and mkstemp make them private (0700 and
    0600), which a server running as another user (TF Serving in a container) cannot read."""
    umask = rundir.umask()
    for path in (folder, *folder.rglob("*")):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished export over `out` (an old export, which `rundir.claim_dir` allowed, is
    moved aside first, then removed, and the log says so)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        if rundir.folder_kind(out) is not None:
            log.info("Replacing the export in %s: removing its previous %s", out, ", ".join(sorted(_names(out))))
        os.replace(out, old)
    os.replace(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.is_dir() else [folder.name]


def export_model(
    source: str | os.PathLike,
    *,
    format: str,
    quantize: str | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    data: str | None = None,
    max_examples: int | None = None,
    unsafe_deserialization: bool = False,
) -> dict[str, Any]:
    """Exports a run directory's model (or a `.keras` file), checks it with its runtime, and writes it.

    Args:
        source: a run directory of `train_and_evaluate`, or a `.keras` file.
        format: "saved_model", "litert" or "onnx".
        quantize: None (float32), "float16" or "int8" (LiteRT and ONNX only).
        out: the export folder to write (default: see `default_out`).
        overwrite: replace an existing `out`.
        data: the data whose test split checks the export (default: the run's own; a bare
            `.keras` file without it is checked on generated images).
        max_examples: check on at most this many test images (and calibrate on at most as many).
        unsafe_deserialization: allow Lambda layers in the model (see `inference.load_saved`).

    Returns:
        The record written to export.json, with "out" (the folder).

    Raises:
        ConfigError: an unknown format or quantization; MissingPackageError: a converter or
            runtime that is not installed; RunDirError: no model at `source`, an `out` that is not
            an export of the package's, or one without `overwrite`; DataError: see
            `inference.test_split`; ExportParityError: a float artifact that does not match the
            Keras model (nothing is written).
    """
    check_choices(format, quantize)
    check_packages(format)
    out = Path(out) if out else default_out(source, format, quantize)
    rundir.claim_dir(out, kinds=("export",), overwrite=overwrite, flag="--out")  # only an export is replaced
    saved = inference.load_saved(source, unsafe_deserialization=unsafe_deserialization)
    test, labelled, checked_on, calibration = _images(saved, data, max_examples, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model, trained_policy = float32_copy(saved.model, safe_mode=not unsafe_deserialization)
        record = _write_export(saved, model, tmp, format, quantize, calibration, trained_policy)
        record["runtime"], parity = _checked_parity(
            saved, model, tmp, format, test, labelled=labelled, trained_policy=trained_policy
        )
        if quantize is None:
            _check_float_parity(parity, format)
        else:
            parity["size_ratio"] = round(record["size_bytes"] / record["float32_weights_bytes"], 4)
            parity["aims"] = {"accuracy_drop_points": AIM_INT8_DROP_POINTS, "size_ratio": AIM_SIZE_RATIO}
        record["parity"] = parity | {"checked_on": checked_on}
        (tmp / artifacts.LABELS_TXT).write_text("\n".join(saved.class_names) + "\n", encoding="utf-8")
        rundir.atomic_write_json(tmp / artifacts.EXPORT_JSON, record)
        _readable(tmp)
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Exported %s to %s (%s bytes)", saved.path, out, f"{record['size_bytes']:,}")
    return record | {"out": str(out)}


def _write_export(
    saved: inference.SavedRun,
    model: keras.Model,
    tmp: Path,
    format: str,
    quantize: str | None,
    calibration: np.ndarray | None,
    trained_policy: str | None,
) -> dict[str, Any]:
    """Converts `model` (the float32 copy of `saved.model`) into `tmp`; returns export.json's
    record without its runtime and parity."""
    # Model.export(format="onnx") refuses a model never called, as a loaded one is.
    model(np.zeros((1, *saved.image_shape), np.float32), training=False)
    start = time.perf_counter()
    with progress.timed(f"Converting the model to {format}" + (f" ({quantize})" if quantize else "")):
        converter = CONVERTERS[format](model, tmp / ARTIFACT_NAMES[format], quantize, calibration)
    seconds = time.perf_counter() - start
    return _record(saved, tmp, format, quantize, converter, seconds, trained_policy)


def _checked_parity(
    saved: inference.SavedRun,
    model: keras.Model,
    tmp: Path,
    format: str,
    test: tf.data.Dataset,
    *,
    labelled: bool,
    trained_policy: str | None,
) -> tuple[str, dict[str, Any]]:
    """`measure_parity` of the artifact in `tmp` against `model`.

    Returns:
        (the artifact's runtime in words, the parity figures).

    Raises:
        ExportParityError: the artifact's runtime refuses it (an op it lacks, a bad graph).
    """
    try:
        artifact = artifacts.Artifact(format, tmp / ARTIFACT_NAMES[format])
        parity = measure_parity(saved, artifact, test, labelled=labelled, model=model, trained_policy=trained_policy)
        return artifact.runtime, parity
    except (KerastuneFlowError, tf.errors.OpError):
        raise
    except Exception as error:  # the runtime's own exceptions, whatever it raises
        raise ExportParityError(
            f"The {format} export could not be run by its runtime, so it was not written; export another format "
            f"and report the model. Received: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        ) from None


def _record(
    saved: inference.SavedRun,
    folder: Path,
    format: str,
    quantize: str | None,
    converter: str,
    seconds: float,
    trained_policy: str | None,
) -> dict[str, Any]:
    """export.json's record of the artifact in `folder`, but its "runtime" and "parity"."""
    model = saved.model
    training = None
    if saved.config is not None:
        training = rundir.read_json(saved.path.parent / rundir.CONFIG_JSON)
    return {
        "format": format,
        "quantize": quantize,
        "file": ARTIFACT_NAMES[format],
        "source": str(saved.path),
        "input": {
            "shape": [None, *saved.image_shape],
            "dtype": str(model.inputs[0].dtype),
            "values": "raw RGB (or grey) pixels 0..255, resized to the shape, as the .keras model takes them: "
            "any preprocessing is inside the model",
            "batch": "dynamic: any batch size",
        },
        "output": {
            "shape": [None, int(model.output_shape[-1])],
            "dtype": "float32",
            "values": OUTPUT_MEANING[saved.head.activation] + ", as the .keras model returns (computed in float32)",
        },
        "class_names": saved.class_names,
        "image_shape": list(saved.image_shape),
        "head": {"units": saved.head.units, "activation": saved.head.activation, "label_mode": saved.head.label_mode},
        "size_bytes": artifacts.size_bytes(folder / ARTIFACT_NAMES[format]),
        "float32_weights_bytes": 4 * model.count_params(),
        "converter": converter,
        "export_seconds": round(seconds, 2),
        "compute_dtype": "float32",
        "trained_dtype_policy": trained_policy or "float32",
        "parity_rule": None
        if quantize
        else f"top-1 agreement 100 % and largest absolute difference at most {PARITY_TOLERANCE:g}, against the "
        "Keras model computing in float32",
        "training": training,
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    }
