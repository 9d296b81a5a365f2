"""Loading a `.keras` file safely: Python code inside it (a `Lambda` layer) runs only when asked; a
model with KerasHub layers (a ViT base, see `hub.py`) says which extra it needs."""

from __future__ import annotations

import importlib
import os
import zipfile

import keras

from kerastune_flow.errors import MissingPackageError, RunDirError

UNSAFE_FLAG = "--unsafe-deserialization"
HUB_EXTRA = "pip install 'kerastune_flow[hub]'"


def names_keras_hub(path: str | os.PathLike) -> bool:
    """True when a `.keras` file's config names a KerasHub class (Keras imports KerasHub to load it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return '"keras_hub' in archive.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _keras_hub_missing() -> bool:
    try:
        importlib.import_module("keras_hub")
    except ImportError:
        return True
    return False


def load_keras_model(
    path: str | os.PathLike, *, unsafe_deserialization: bool = False, what: str = "model"
) -> keras.Model:
    """Loads a `.keras` file without its optimizer, refusing unsafe code unless asked.

    Keras' safe mode refuses to deserialise Python code (a `Lambda` layer's function), which
    would run on loading; `unsafe_deserialization=True` allows it, for files the user trusts.

    Args:
        path: the `.keras` file.
        unsafe_deserialization: load Lambda layers and other Python code (`safe_mode=False`).
        what: how the message names the file ("model", "base model").

    Returns:
        The uncompiled keras.Model.

    Raises:
        RunDirError: when the file holds Python code (without `unsafe_deserialization`), is
            corrupt, or is not a Keras 3 model whose input is one image.
        MissingPackageError: when it holds KerasHub layers and keras-hub is not installed.
    """
    try:
        model = keras.saving.load_model(path, safe_mode=not unsafe_deserialization, compile=False)
    except Exception as error:  # zip errors, unknown layers, refused lambdas
        text = " ".join(str(error).split())
        if "safe_mode=False" in text:
            raise RunDirError(
                f"The {what} {path} holds Python code (a Lambda layer) that would run on loading; pass "
                f"{UNSAFE_FLAG} to load it, only if you trust where the file comes from. Received: {path}"
            ) from None
        if names_keras_hub(path) and _keras_hub_missing():
            raise MissingPackageError(
                f"The {what} {path} holds KerasHub layers (a KerasHub backbone), and keras-hub is not installed; "
                f"run {HUB_EXTRA}. Received: {type(error).__name__}: {text[:120]}"
            ) from None
        raise RunDirError(
            f"Cannot load the {what} {path}: it is corrupt or was not saved by Keras 3 / kerastune_flow. "
            f"Received: {type(error).__name__}: {text[:160]}"
        ) from None
    if not isinstance(model, keras.Model) or len(model.inputs) != 1 or len(model.input_shape) != 4:
        shape = getattr(model, "input_shape", None)
        raise RunDirError(
            f"The {what} {path} does not take one batch of images (height, width, channels); pass a model "
            f"trained on images, such as a run directory of `run train`. Received: input_shape={shape}"
        )
    return model
