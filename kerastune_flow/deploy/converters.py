"""The converters of `export`: a Keras model as a SavedModel, a LiteRT flatbuffer or an ONNX file,
optionally quantized, each through Keras's own `Model.export` where it works (ONNX falls back to
tf2onnx on the SavedModel, see `_to_onnx`); and the float32 copy every artifact is made from.

Each converter takes (model, path, quantize, calibration images) and returns how it converted, in
words, for export.json's "converter".
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow.deploy.artifacts import import_optional
from kerastune_flow.errors import RunDirError

log = logging.getLogger(__name__)


def check_packages(format: str) -> None:
    """Imports what the format's converter and runtime need before any long work starts."""
    if format == "onnx":
        for module in ("tf2onnx", "onnx", "onnxruntime"):
            import_optional(module, module, why="Exporting to ONNX")


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
    _teach_erfc()
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


def _teach_erfc() -> None:
    """Gives tf2onnx a handler for TensorFlow's Erfc, which it lacks (it writes an op onnxruntime
    refuses): Keras' exact GELU, the MLP of a ViT (a KerasHub preset), computes 0.5 x erfc(-x / sqrt 2).
    Erfc(x) becomes ONNX's Erf (opset 9 on) subtracted from 1. Once per process; a handler of
    tf2onnx's own, should it ever have one, is kept."""
    handler = import_optional("tf2onnx.handler", "tf2onnx", why="Exporting to ONNX")
    utils = import_optional("tf2onnx.utils", "tf2onnx", why="Exporting to ONNX")
    domain = import_optional("tf2onnx.constants", "tf2onnx", why="Exporting to ONNX").ONNX_DOMAIN
    if any("Erfc" in ops for ops in handler.tf_op.get_opsets().get(domain, [])):
        return

    def erfc(ctx: Any, node: Any, **kwargs: Any) -> None:
        node.type = "Erf"
        dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
        one = ctx.make_const(utils.make_name("erfc_one"), np.array(1, dtype=dtype))
        ctx.insert_new_node_on_output("Sub", node.output[0], inputs=[one.output[0], node.output[0]])

    handler.tf_op.register_handler(erfc, 9, ["Erfc"], domain, {})


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
