"""`run export`: a trained model as a SavedModel, a LiteRT flatbuffer or an ONNX file, checked.

The artifact is written with Keras's own `Model.export` where it works (ONNX falls back to
tf2onnx on the SavedModel when Model.export leaves constants as graph inputs, see
`_to_onnx`), optionally quantized (float16, or int8 calibrated on at most 500 training images of
the run's own data), then run with its own runtime on the run's test split and compared with
the Keras model: a float artifact must agree on every top-1 and differ by at most 1e-4, or
nothing is written; a quantized one is measured (accuracy drop, size) and written. Everything
is made in a temporary folder beside the output and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow import rundir
from kerastune_flow.deploy import artifacts, inference
from kerastune_flow.deploy.artifacts import ARTIFACT_NAMES, FORMATS, QUANTIZATIONS, import_optional
from kerastune_flow.errors import ConfigError, DataError, ExportParityError, KerastuneFlowError, RunDirError
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


def _check_packages(format: str) -> None:
    """Imports what the format's converter and runtime need before any long work starts."""
    if format == "onnx":
        for module in ("tf2onnx", "onnx", "onnxruntime"):
            import_optional(module, module, why="Exporting to ONNX")


# --------------------------------------------------------------------------- converters


def _policies(model: keras.Model) -> set[str]:
    found = set()
    for layer in model.layers:
        found.add(layer.dtype_policy.name)
        if isinstance(layer, keras.Model):
            found |= _policies(layer)
    return found


def _float32_config(config: Any) -> Any:
    if isinstance(config, dict):
        return {
            key: "float32"
            if key == "dtype" and isinstance(value, dict) and "DTypePolicy" in str(value.get("class_name"))
            else _float32_config(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_float32_config(value) for value in config]
    return config


def float32_copy(model: keras.Model, *, safe_mode: bool = True) -> tuple[keras.Model, str | None]:
    """The model computing in float32 throughout, with the same weights (they are float32 already).

    A run trained with mixed precision (`--mixed-precision auto` picks bfloat16 on CPUs with native
    bfloat16, float16 on GPUs) saves its layers with that policy. Measured: tf2onnx then emits
    float16 and bfloat16 inputs to one op, which onnxruntime refuses, and the LiteRT converter needs
    TensorFlow ops the LiteRT interpreter lacks (tensorflow/tensorflow#46380: mixed-precision
    models do not convert; its workaround is this one), so every artifact is made in float32.

    Returns:
        (the copy, the mixed policy the model had), or (the model itself, None) when it is float32.
    """
    mixed = sorted(_policies(model) - {"float32"})
    if not mixed:
        return model, None
    config = _float32_config(keras.saving.serialize_keras_object(model))
    copy = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)  # False: Lambda layers the user allowed
    copy.set_weights(model.get_weights())
    return copy, ", ".join(mixed)


def _to_saved_model(model: keras.Model, path: Path, quantize: str | None, calibration: np.ndarray | None) -> str:
    model.export(str(path), format="tf_saved_model", verbose=False)
    return f"keras {keras.__version__} Model.export(format='tf_saved_model')"


def _to_litert(model: keras.Model, path: Path, quantize: str | None, calibration: np.ndarray | None) -> str:
    # Model.export passes these on to tf.lite.TFLiteConverter; the input and output stay float32
    # (quantize and dequantize ops at the edges), so the artifact takes the same pixels.
    options: dict[str, Any] = {}
    if quantize:
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    if quantize == "int8":
        options["representative_dataset"] = lambda: ([image[None]] for image in calibration)
    model.export(str(path), format="litert", verbose=False, **options)
    how = f"keras {keras.__version__} Model.export(format='litert') via tf.lite.TFLiteConverter"
    if quantize == "float16":
        return how + ", float16 weights"
    if quantize == "int8":
        return how + f", int8 calibrated on {len(calibration)} training images (float32 input and output kept)"
    return how


def _graph_inputs(onnx_module: Any, path: Path) -> list[str]:
    graph = onnx_module.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    return [i.name for i in graph.input if i.name not in constants]


def _to_onnx(model: keras.Model, path: Path, quantize: str | None, calibration: np.ndarray | None) -> str:
    onnx = import_optional("onnx", "onnx", why="Exporting to ONNX")
    tf2onnx = import_optional("tf2onnx", "tf2onnx", why="Exporting to ONNX")
    how = f"keras {keras.__version__} Model.export(format='onnx') (tf2onnx {tf2onnx.__version__})"
    try:
        model.export(str(path), format="onnx", verbose=False)
        inputs = _graph_inputs(onnx, path)
        problem = None if len(inputs) == 1 else f"left {len(inputs) - 1} captured constants as graph inputs"
    except Exception as error:  # tf2onnx raises whatever its op handlers raise
        problem = f"failed ({type(error).__name__}: {' '.join(str(error).split())[:100]})"
    if problem:
        # Measured: EfficientNet's Normalization constants are captured tensors that tf2onnx's
        # from_function turns into inputs the runtime then demands; converting the SavedModel
        # (tf2onnx's documented command line) freezes them.
        log.warning("Model.export(format='onnx') %s; converting its SavedModel with tf2onnx instead", problem)
        with tempfile.TemporaryDirectory(dir=path.parent) as folder:
            saved_model = Path(folder) / "saved_model"
            model.export(str(saved_model), format="tf_saved_model", verbose=False)
            command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model)]
            done = subprocess.run(
                [*command, "--signature_def", "serve", "--output", str(path)], capture_output=True, text=True
            )
        if done.returncode != 0 or len(_graph_inputs(onnx, path)) != 1:
            raise RunDirError(
                f"The model cannot be converted to ONNX: Model.export {problem} and tf2onnx on its SavedModel "
                f"failed too; export --format saved_model or litert instead. Received: {done.stderr.strip()[-200:]}"
            )
        how = f"tf2onnx {tf2onnx.__version__} on the SavedModel of Model.export (Model.export {problem})"
    if quantize == "float16":
        float16 = import_optional("onnxruntime.transformers.float16", "onnxruntime", why="float16 ONNX")
        onnx.save(float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))
        how += ", float16 by onnxruntime.transformers.float16 (float32 input and output kept)"
    if quantize == "int8":
        _quantize_onnx_int8(path, calibration)
        how += f", int8 by onnxruntime.quantization.quantize_static (QDQ, per channel) on {len(calibration)} images"
    return how


def _quantize_onnx_int8(path: Path, calibration: np.ndarray) -> None:
    quantization = import_optional("onnxruntime.quantization", "onnxruntime", why="int8 ONNX")
    onnx = import_optional("onnx", "onnx", why="int8 ONNX")
    name = _graph_inputs(onnx, path)[0]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches: Iterator[np.ndarray] = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    prepared = path.with_name("prepared.onnx")
    quantization.quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)  # no sympy needed
    quantization.quantize_static(
        str(prepared),
        str(path),
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    prepared.unlink()


CONVERTERS = {"saved_model": _to_saved_model, "litert": _to_litert, "onnx": _to_onnx}


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
    _check_packages(format)
    out = Path(out) if out else default_out(source, format, quantize)
    rundir.claim_dir(out, kinds=("export",), overwrite=overwrite, flag="--out")  # only an export is replaced
    saved = inference.load_saved(source, unsafe_deserialization=unsafe_deserialization)
    test, labelled, checked_on, calibration = _images(saved, data, max_examples, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model, trained_policy = float32_copy(saved.model, safe_mode=not unsafe_deserialization)
        # Model.export(format="onnx") refuses a model never called, as a loaded one is.
        model(np.zeros((1, *saved.image_shape), np.float32), training=False)
        start = time.perf_counter()
        artifact_path = tmp / ARTIFACT_NAMES[format]
        with progress.timed(f"Converting the model to {format}" + (f" ({quantize})" if quantize else "")):
            converter = CONVERTERS[format](model, artifact_path, quantize, calibration)
        seconds = time.perf_counter() - start
        try:
            artifact = artifacts.Artifact(format, artifact_path)
            parity = measure_parity(
                saved, artifact, test, labelled=labelled, model=model, trained_policy=trained_policy
            ) | {"checked_on": checked_on}
        except (KerastuneFlowError, tf.errors.OpError):
            raise
        except Exception as error:  # the runtime refuses the artifact (an op it lacks, a bad graph)
            raise ExportParityError(
                f"The {format} export could not be run by its runtime, so it was not written; export another format "
                f"and report the model. Received: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
            ) from None
        if quantize is None:
            _check_float_parity(parity, format)
        size = artifacts.size_bytes(artifact_path)
        float_bytes = 4 * saved.model.count_params()
        if quantize:
            parity["size_ratio"] = round(size / float_bytes, 4)
            parity["aims"] = {"accuracy_drop_points": AIM_INT8_DROP_POINTS, "size_ratio": AIM_SIZE_RATIO}
        record = _record(saved, format, quantize, converter, artifact, size, float_bytes, parity, seconds)
        record["compute_dtype"] = "float32"
        record["trained_dtype_policy"] = trained_policy or "float32"
        (tmp / artifacts.LABELS_TXT).write_text("\n".join(saved.class_names) + "\n", encoding="utf-8")
        rundir.atomic_write_json(tmp / artifacts.EXPORT_JSON, record)
        _readable(tmp)
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Exported %s to %s (%s bytes)", saved.path, out, f"{size:,}")
    return record | {"out": str(out)}


def _record(saved, format, quantize, converter, artifact, size, float_bytes, parity, seconds) -> dict[str, Any]:
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
        "size_bytes": size,
        "float32_weights_bytes": float_bytes,
        "converter": converter,
        "runtime": artifact.runtime,
        "export_seconds": round(seconds, 2),
        "parity": parity,
        "parity_rule": None
        if quantize
        else f"top-1 agreement 100 % and largest absolute difference at most {PARITY_TOLERANCE:g}, against the "
        "Keras model computing in float32",
        "training": training,
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    }
