"""Loading a `.keras` file safely: Python code inside it (a `Lambda` layer) runs only when asked."""

from __future__ import annotations

import os

import keras

from kerastune_flow.errors import RunDirError

UNSAFE_FLAG = "--unsafe-deserialization"


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
