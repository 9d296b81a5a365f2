"""Exported models (`run export`): their folder layout, and running each with its own runtime.

An export folder holds the artifact (`saved_model/`, `model.tflite` or `model.onnx`), `labels.txt`
(one class name a line, in output order) and `export.json` (what goes in and comes out, how it
was made, the parity measured). Every artifact takes a batch of raw 0..255 pixels of any size,
float32, and returns what the `.keras` model returns. The runtimes are optional packages (the
`[export]` extra); each is imported only when an artifact of its format is loaded.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kerastune_flow import rundir
from kerastune_flow.errors import MissingPackageError, RunDirError

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "litert", "onnx")
QUANTIZATIONS = ("float16", "int8")
ARTIFACT_NAMES = {"saved_model": "saved_model", "litert": "model.tflite", "onnx": "model.onnx"}
EXPORT_JSON = rundir.EXPORT_JSON
LABELS_TXT = "labels.txt"
EXTRA = "pip install 'kerastune_flow[export]'"
# What each format needs at run time: (module, pip package).
RUNTIMES = {
    "saved_model": ("tensorflow", "tensorflow-cpu"),
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "onnx": ("onnxruntime", "onnxruntime"),
}


def import_optional(module: str, package: str, *, why: str) -> Any:
    """Imports an optional dependency, or says in one sentence which package to install.

    Raises:
        MissingPackageError: when the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingPackageError(
            f"{why} needs the package {package}, which is not installed; run {EXTRA} (or pip install {package}). "
            f"Received: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
        ) from None


def size_bytes(path: str | os.PathLike) -> int:
    """The bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_dir_of(path: str | os.PathLike) -> Path | None:
    """The export folder `path` is or lies in (the folder of an export.json), else None."""
    path = Path(path)
    for folder in (path, path.parent):
        if folder.is_dir() and (folder / EXPORT_JSON).is_file():
            return folder
    return None


def read_export(folder: str | os.PathLike) -> dict[str, Any]:
    """export.json of an export folder, with "class_names" read from labels.txt.

    Raises:
        RunDirError: when either file is missing, unreadable or does not match the other.
    """
    folder = Path(folder)
    try:
        record = rundir.read_json(folder / EXPORT_JSON)
        names = (folder / LABELS_TXT).read_text(encoding="utf-8").splitlines()
        if record["format"] not in FORMATS or len(names) != len(record["class_names"]):
            raise ValueError(f"format={record['format']}, {len(names)} labels for {len(record['class_names'])}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunDirError(
            f"{folder} is not a complete export folder ({EXPORT_JSON}, {LABELS_TXT} and the model); export it again "
            f"with `run export`. Received: {type(error).__name__}: {' '.join(str(error).split())[:120]}"
        ) from None
    return record | {"class_names": names}


class Artifact:
    """An exported model run with its own runtime: float32 pixels (N, H, W, C) in, outputs out.

    Attributes:
        format: one of FORMATS.
        path: the artifact (the saved_model folder, or the .tflite / .onnx file).
        runtime: the runtime and its version, in words.
    """

    def __init__(self, format: str, path: str | os.PathLike):
        if format not in FORMATS:
            raise RunDirError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}. Received: {format}")
        self.format = format
        self.path = Path(path)
        if not self.path.exists():
            raise RunDirError(f"No exported model at {self.path}; export it again with `run export`. Received: {path}")
        self._run: Callable[[np.ndarray], np.ndarray] = getattr(self, f"_load_{format}")()

    def __call__(self, images: Any, *, batch_size: int = 32) -> np.ndarray:
        """The outputs for a batch of images, run `batch_size` at a time."""
        images = np.asarray(images, dtype=np.float32)
        parts = [self._run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(parts, axis=0)

    def _load_saved_model(self):
        loaded = tf.saved_model.load(str(self.path))
        self.runtime = f"tf.saved_model {tf.__version__}"
        return lambda x: loaded.serve(tf.constant(x)).numpy()

    def _load_litert(self):
        try:
            module = importlib.import_module(RUNTIMES["litert"][0])
            self.runtime = f"ai_edge_litert {_version('ai-edge-litert')}"
        except ImportError:
            # tf.lite.Interpreter is the same interpreter, deprecated in favour of ai-edge-litert.
            module = tf.lite
            self.runtime = f"tf.lite.Interpreter {tf.__version__}"
            log.warning("ai-edge-litert is not installed: running %s with tf.lite.Interpreter", self.path)
        interpreter = module.Interpreter(model_path=str(self.path))
        source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]
        shape: list[tuple[int, ...]] = [()]

        def run(x: np.ndarray) -> np.ndarray:
            if x.shape != shape[0]:  # the batch is dynamic: resize the input, then re-plan the tensors
                interpreter.resize_tensor_input(source["index"], x.shape)
                interpreter.allocate_tensors()
                shape[0] = x.shape
            interpreter.set_tensor(source["index"], x)
            interpreter.invoke()
            return np.array(interpreter.get_tensor(target["index"]))

        return run

    def _load_onnx(self):
        ort = import_optional(*RUNTIMES["onnx"], why="Running an ONNX model")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings about unused initializers
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        self.runtime = f"onnxruntime {ort.__version__}"
        return lambda x: session.run(None, {name: x})[0]


def load_artifact(folder: str | os.PathLike) -> tuple[Artifact, dict[str, Any]]:
    """Loads the artifact of an export folder with its runtime, and its export.json.

    Raises:
        RunDirError: see `read_export`; MissingPackageError: when the runtime is not installed.
    """
    record = read_export(folder)
    return Artifact(record["format"], Path(folder) / record["file"]), record


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
