"""Transfer learning: a frozen pre-trained base under a new head, cutting a user's model into a
base, and unfreezing a base from a layer for a fine-tune.

The base (a `keras.applications` backbone, a KerasHub preset rebuilt by `hub.py`, or a cut of
the user's model) is a nested model inside the transfer model (see `find_base`); it always runs in
inference mode (`base(x, training=False)`), which keeps BatchNormalization statistics fixed even
after unfreezing, as the Keras transfer-learning guide prescribes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
from keras import layers

from kerastune_flow.config import POOLINGS
from kerastune_flow.errors import ConfigError, RunDirError
from kerastune_flow.models.backbones import VGG16_UNFREEZE_AT, is_preprocessing, pool
from kerastune_flow.models.heads import compile_if, regularizer, transfer_head
from kerastune_flow.models.hub import base_record, pretrained_base
from kerastune_flow.models.saving import load_keras_model

log = logging.getLogger(__name__)

CUSTOM_BASE_NAME = "base"


@dataclasses.dataclass(frozen=True)
class TransferSpec:
    """The architecture of a transfer model: a frozen pre-trained base, then pooling -> Dense ReLU
    -> a new head (see `transfer_model`).

    Attributes:
        backbone: a name of `BACKBONES`, a KerasHub preset `hub:NAME` or a local preset folder
            (ignored when `base` is given).
        base: a ready base model instead, e.g. `cut_base(...)` of the user's own model; its
            input shape wins over `input_shape` and no preprocessing is added.
        input_shape: (height, width, 3), at least 32x32.
        num_classes: classes of the new head.
        weights: "imagenet", None (random, for tests), or a path to a local weights file.
        pooling: "flatten", "avg", or "auto" (the backbone's; flatten for a user's base).
        dense_units: width of the new hidden layer.
        kernel_initializer: for the new dense layers.
        dropout: rate after the hidden dense layer.
        l1: L1 weight penalty on the new hidden dense kernel.
        l2: L2 weight penalty on the new hidden dense kernel.
        name: the model's name; default "<base>_features".
    """

    backbone: str = "vgg16"
    base: keras.Model | None = None
    input_shape: Sequence[int] = (150, 150, 3)
    num_classes: int = 2
    weights: str | None = "imagenet"
    pooling: str = "auto"
    dense_units: int = 256
    kernel_initializer: str = "glorot_uniform"
    dropout: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    name: str | None = None


def transfer_model(spec: TransferSpec) -> keras.Model:
    """The transfer model `spec` describes, not compiled: the backbone's own preprocessing first (it
    takes raw 0..255 pixels), the base in inference mode (see the module's docstring), and a head
    of 1 sigmoid unit for two classes, else a softmax (`transfer_head`).

    Returns:
        A keras.Model whose nested model (see `find_base`) is the frozen base.

    Raises:
        ConfigError: for an unknown pooling or backbone.
        WeightsError, MissingPackageError: see `hub.pretrained_base`.
    """
    head = transfer_head(spec.num_classes)
    base, input_shape = spec.base, spec.input_shape
    if spec.pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}. Received: pooling={spec.pooling}")
    if base is None:
        base, preprocess, auto_pooling = pretrained_base(spec.backbone, input_shape=input_shape, weights=spec.weights)
    else:
        input_shape = tuple(int(d) for d in base.input_shape[1:])
        preprocess, auto_pooling = None, "flatten"
    base.trainable = False
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = preprocess(inputs) if preprocess is not None else inputs
    x = pool(base(x, training=False), auto_pooling if spec.pooling == "auto" else spec.pooling)
    x = layers.Dense(
        spec.dense_units,
        activation="relu",
        kernel_initializer=spec.kernel_initializer,
        kernel_regularizer=regularizer(spec.l1, spec.l2),
        name="dense",
    )(x)
    if spec.dropout:
        x = layers.Dropout(spec.dropout, name="dropout")(x)
    outputs = layers.Dense(
        head.units,
        activation=head.activation,
        kernel_initializer=spec.kernel_initializer,
        dtype="float32",  # probabilities and the loss in float32 under a mixed-precision policy
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=spec.name or f"{base.name}_features")


def build_transfer_model(
    *,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    compile: bool = True,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
    **architecture: Any,
) -> keras.Model:
    """A frozen pre-trained base, then pooling -> Dense ReLU -> a new head (`transfer_model`).

    The head is 1 sigmoid unit with binary cross-entropy for two classes, softmax with
    categorical cross-entropy otherwise.

    Args:
        optimizer: optimizer name.
        learning_rate: for the head.
        compile: compile with the head's loss and accuracy.
        jit_compile: XLA (train leaves it off on the CPU, where convolutions run slower under it).
        steps_per_execution: training steps per call into the graph.
        **architecture: the fields of `TransferSpec` (backbone, base, input_shape, num_classes,
            weights, pooling, dense_units, kernel_initializer, dropout, l1, l2, name).

    Returns:
        A keras.Model whose nested model (see `find_base`) is the frozen base.

    Raises:
        ConfigError: for an unknown pooling or backbone.
        TypeError: for a keyword that is not a field of `TransferSpec`.
    """
    spec = TransferSpec(**architecture)
    model = transfer_model(spec)
    head = transfer_head(spec.num_classes)
    return compile_if(compile, model, head, optimizer, learning_rate, jit_compile, steps_per_execution)


def build_vgg16_feature_extractor(
    *,
    input_shape: Sequence[int] = (150, 150, 3),
    num_classes: int = 2,
    weights: str | None = "imagenet",
    dense_units: int = 256,
    kernel_initializer: str = "glorot_uniform",
    dropout: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    compile: bool = True,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
) -> keras.Model:
    """VGG16 (include_top=False) frozen, then Flatten -> Dense 256 ReLU -> new head.

    The reference feature extractor; `build_transfer_model(backbone="vgg16")` with the
    reference settings. The head is 1 sigmoid unit with binary cross-entropy for two classes,
    softmax with categorical cross-entropy otherwise; VGG16's own `preprocess_input` is the
    first layer, and the base runs in inference mode (`training=False`).

    Args:
        input_shape: (height, width, 3), at least 32x32; 150x150 and 224x224 in the references.
        num_classes: classes of the new head.
        weights: "imagenet", None (random, for tests), or a path to a local weights file.
        dense_units: width of the new hidden layer.
        kernel_initializer: for the new dense layers.
        dropout: rate after the hidden dense layer.
        l1: L1 weight penalty on the new dense kernels.
        l2: L2 weight penalty on the new dense kernels.
        optimizer: optimizer name.
        learning_rate: for the head.
        compile: compile with the head's loss and accuracy.
        jit_compile: XLA (train leaves it off on the CPU, where convolutions run slower under it).
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "vgg16_features" whose layer "vgg16" is the frozen base.
    """
    spec = TransferSpec(
        backbone="vgg16",
        input_shape=input_shape,
        num_classes=num_classes,
        weights=weights,
        pooling="flatten",
        dense_units=dense_units,
        kernel_initializer=kernel_initializer,
        dropout=dropout,
        l1=l1,
        l2=l2,
    )
    head = transfer_head(num_classes)
    return compile_if(compile, transfer_model(spec), head, optimizer, learning_rate, jit_compile, steps_per_execution)


def cut_base(
    path: str | os.PathLike, output_layer: str | None = None, *, unsafe_deserialization: bool = False
) -> keras.Model:
    """A user's saved model cut at a named layer, to serve as a pre-trained base.

    Args:
        path: a `.keras` file, or a run directory holding model.keras (e.g. a full-training run).
        output_layer: the layer whose output becomes the base's output; None keeps everything
            up to the layer before the last one (the old head is dropped).
        unsafe_deserialization: allow Lambda layers (see `load_keras_model`).

    Returns:
        A keras.Model named "base" that shares the saved model's layers and weights; it takes
        the saved model's inputs (raw pixels for models saved by this package).

    Raises:
        RunDirError: when the file is missing, cannot be loaded, or does not take images.
        ConfigError: when `output_layer` is not a layer of the model.
    """
    path = Path(path)
    model_path = path / "model.keras" if path.is_dir() else path
    if not model_path.is_file():
        raise RunDirError(
            f"No saved model at {model_path}; pass --base a .keras file or a run directory of `run train`. "
            f"Received: base={path}"
        )
    saved = load_keras_model(model_path, unsafe_deserialization=unsafe_deserialization, what="base model")
    names = [layer.name for layer in saved.layers]
    if output_layer is None:
        output_layer = names[-2]
    if output_layer not in names:
        raise ConfigError(
            f"{model_path} has no layer named {output_layer!r}; pass --base-output one of {', '.join(names[1:])}. "
            f"Received: base_output={output_layer}"
        )
    return keras.Model(saved.inputs, saved.get_layer(output_layer).output, name=CUSTOM_BASE_NAME)


def find_base(model: keras.Model) -> keras.Model:
    """The nested base model (the backbone or a cut user model) inside a transfer model.

    Raises:
        ValueError: when the model has no nested model.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    names = [layer.name for layer in model.layers]
    raise ValueError(f"{model.name} has no nested base model. Received: layers={names}")


def default_unfreeze_at(base: keras.Model) -> int | str:
    """The fine-tune boundary of a base: its backbone's last block, or for a user's own base the
    second-to-last layer that has weights (the top block and what follows it)."""
    record = base_record(base)
    if record is not None:
        return record.default_unfreeze_at(base)
    weighted = _learnable(base)
    return weighted[-2] if len(weighted) >= 2 else (weighted[-1] if weighted else 0)


def _learnable(base: keras.Model) -> list[int]:
    """Indices of the layers of a user's base that have weights to learn: not its preprocessing
    (a base cut from a transfer model of this package starts with a frozen `Dense(3)`)."""
    return [i for i, layer in enumerate(base.layers) if layer.weights and not is_preprocessing(layer)]


def block_starts(base: keras.Model) -> list[int]:
    """Indices of the layers where a block of the base starts: the places a fine-tune can unfreeze
    from without cutting a block in half (keras-io#995). For a backbone, the first layer of each
    of its blocks; for a user's own base, every layer with weights (but its preprocessing)."""
    spec = base_record(base)
    if spec is None:
        return _learnable(base)
    starts, previous = [], None
    for i, layer in enumerate(base.layers):
        block = spec.block_of(layer.name)
        if block is not None and block != previous:
            starts.append(i)
        previous = block if block is not None else previous
    return starts


def resolve_unfreeze_at(base: keras.Model, unfreeze_at: int | float | str) -> int:
    """Turns a layer index, a layer name, or a fraction of the base's depth into an index.

    A fraction is snapped to a block start: the first at or after `round(layers * fraction)`
    (see `block_starts`); past the last block start nothing is unfrozen.

    Raises:
        ConfigError: for an index out of range or a name that is not a layer of the base.
    """
    n = len(base.layers)
    value: Any = unfreeze_at
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                names = [layer.name for layer in base.layers]
                if text not in names:
                    raise ConfigError(
                        f"{base.name} has no layer named {text!r}; pass an index, a fraction or one of "
                        f"its layer names such as {', '.join(names[-4:])}. Received: unfreeze_at={text}"
                    ) from None
                return names.index(text)
    if isinstance(value, float):
        if not 0 <= value <= 1:
            raise ConfigError(
                f"A fractional unfreeze_at must lie in [0, 1] (0.8 keeps the first 80% frozen). "
                f"Received: unfreeze_at={value}"
            )
        index = int(round(n * value))
        return next((start for start in block_starts(base) if start >= index), n)
    index = int(value)
    if not 0 <= index < n:
        raise ConfigError(
            f"unfreeze_at must be a layer index from 0 to {n - 1} of {base.name}. Received: unfreeze_at={index}"
        )
    return index


def describe_layer(base: keras.Model, index: int) -> str:
    """ "15 (block5_conv1)", or "19 (none: nothing unfrozen)" past the last layer."""
    name = base.layers[index].name if index < len(base.layers) else "none: nothing unfrozen"
    return f"{index} ({name})"


def unfreeze_from(base: keras.Model, unfreeze_at: int | float | str) -> int:
    """Makes base layers `[unfreeze_at:]` trainable and `[:unfreeze_at]` frozen.

    BatchNormalization layers stay frozen, as the Keras transfer-learning guide prescribes, and so
    does a preprocessing layer inside the base (see `is_preprocessing`). Recompile afterwards:
    `trainable` only takes effect at compile time.

    Returns:
        The resolved index.
    """
    index = resolve_unfreeze_at(base, unfreeze_at)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        frozen = isinstance(layer, layers.BatchNormalization) or is_preprocessing(layer)
        layer.trainable = i >= index and not frozen
    return index


def build_vgg16_finetune(
    *,
    model: keras.Model | None = None,
    unfreeze_at: int | float | str = VGG16_UNFREEZE_AT,
    learning_rate: float = 1e-5,
    optimizer: str = "adam",
    num_classes: int = 2,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
    **feature_extractor_kwargs: Any,
) -> keras.Model:
    """Stage two of the staged fine-tune: block5 of VGG16 unfrozen, recompiled at a low rate.

    Args:
        model: the feature extractor after stage one (its head trained); None builds a fresh
            one with `feature_extractor_kwargs`.
        unfreeze_at: base layers `[:unfreeze_at]` stay frozen; 15 is block5_conv1.
        learning_rate: 10x to 100x below the head's (default 1e-5).
        optimizer: optimizer name.
        num_classes: classes of the head (when building a fresh model).
        jit_compile: XLA (train leaves it off on the CPU, where convolutions run slower under it).
        steps_per_execution: training steps per call into the graph.
        **feature_extractor_kwargs: passed to `build_vgg16_feature_extractor`.

    Returns:
        The same model, partly unfrozen and recompiled.
    """
    if model is None:
        model = build_vgg16_feature_extractor(num_classes=num_classes, compile=False, **feature_extractor_kwargs)
    unfreeze_from(find_base(model), unfreeze_at)
    head = transfer_head(max(2, model.output_shape[-1]))
    return compile_if(True, model, head, optimizer, learning_rate, jit_compile, steps_per_execution)
