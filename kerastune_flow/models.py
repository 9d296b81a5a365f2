"""The four reference models as plain keyword-only builders, and the freezing helpers.

Every builder returns a compiled `keras.Model` (pass `compile=False` for an uncompiled one) that
takes raw 0..255 pixels: the scaling each reference example applies to its inputs is the model's
first layer, so a saved `.keras` file predicts on images as they come.

Call builders inside `strategy.scope()` so that variables are created on the right devices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Sequence

import keras
from keras import layers, ops

from kerastune_flow.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

VGG16_UNFREEZE_AT = 15  # block5_conv1: the first layer of VGG16's last convolutional block
VGG16_BASE_NAME = "vgg16"
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_BYTES = 58_889_256
VGG16_MIN_SIZE = 32
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


# --------------------------------------------------------------------------- heads and compile


@dataclasses.dataclass(frozen=True)
class Head:
    """What the output layer emits and what the labels must look like.

    Attributes:
        units: output units.
        activation: None for logits, "sigmoid" or "softmax".
        label_mode: "int", "binary" or "categorical" (see `data.prepare`).
    """

    units: int
    activation: str | None
    label_mode: str

    def loss(self) -> keras.losses.Loss:
        if self.activation is None:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if self.activation == "sigmoid":
            return keras.losses.BinaryCrossentropy()
        return keras.losses.CategoricalCrossentropy()


def logits_head(num_classes: int) -> Head:
    """The from-scratch examples' head: one logit per class, sparse integer labels."""
    _check_num_classes(num_classes)
    return Head(units=num_classes, activation=None, label_mode="int")


def transfer_head(num_classes: int) -> Head:
    """The transfer examples' head: 1 sigmoid unit for two classes, else softmax."""
    _check_num_classes(num_classes)
    if num_classes == 2:
        return Head(units=1, activation="sigmoid", label_mode="binary")
    return Head(units=num_classes, activation="softmax", label_mode="categorical")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ConfigError(
            "A classifier needs at least two classes; a folder or label set with one class cannot be "
            f"learnt. Received: num_classes={num_classes}"
        )


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3) -> keras.optimizers.Optimizer:
    """Returns a fresh optimizer: adam, sgd (momentum 0.9), rmsprop or adagrad."""
    factories = {
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate),
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate),
    }
    if name not in factories:
        raise ConfigError(f"Unknown optimizer {name!r}; choose one of {', '.join(factories)}. Received: {name}")
    if learning_rate <= 0:
        raise ConfigError(f"The learning rate must be positive. Received: learning_rate={learning_rate}")
    return factories[name]()


def compile_model(
    model: keras.Model,
    head: Head,
    *,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
) -> keras.Model:
    """Compiles with the head's loss, accuracy, and a fresh optimizer; returns the model."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=head.loss(),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def _regularizer(l1: float, l2: float):
    return keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None


# --------------------------------------------------------------------------- preprocessing


@keras.saving.register_keras_serializable(package="kerastune_flow")
class ImagenetPreprocessing(layers.Layer):
    """`keras.applications` preprocessing as a saved layer, so models take raw 0..255 pixels.

    Args:
        mode: "caffe" (VGG16, ResNet50: RGB->BGR, minus the ImageNet mean), "tf" (scale to
            [-1, 1], MobileNetV2) or "none" (EfficientNet rescales inside itself).
    """

    MODES = ("caffe", "tf", "none")

    def __init__(self, mode: str = "caffe", **kwargs: Any):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}. Received: mode={mode}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# --------------------------------------------------------------------------- from scratch


def build_scratch_mlp(
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    hidden_units: Sequence[int] = (128, 64),
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
    """The from-scratch MLP: Flatten -> Dense 128 ReLU -> Dense 64 ReLU -> Dense 10 logits.

    Inputs are raw pixels, normalised to [-1, 1] (mean 0.5, std 0.5 after /255) by the first
    layer, as in the reference example's `Normalize((0.5,), (0.5,))`.

    Args:
        input_shape: (height, width, channels); 28x28x1 for MNIST.
        num_classes: logits out.
        hidden_units: widths of the hidden ReLU layers.
        kernel_initializer: e.g. "glorot_uniform" (Keras default) or "he_normal".
        dropout: rate after each hidden layer (0 = none, as in the reference).
        l1: L1 weight penalty on the dense kernels.
        l2: L2 weight penalty on the dense kernels.
        optimizer: "adam", "sgd", "rmsprop" or "adagrad".
        learning_rate: 1e-3 in the reference.
        compile: compile with sparse categorical cross-entropy from logits and accuracy.
        jit_compile: XLA; see `strategy.default_jit_compile`.
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "scratch_mlp".
    """
    head = logits_head(num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden_units, start=1):
        x = layers.Dense(
            units,
            activation="relu",
            kernel_initializer=kernel_initializer,
            kernel_regularizer=_regularizer(l1, l2),
            name=f"dense_{i}",
        )(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = layers.Dense(
        head.units, kernel_initializer=kernel_initializer, kernel_regularizer=_regularizer(l1, l2), name="logits"
    )(x)
    model = keras.Model(inputs, outputs, name="scratch_mlp")
    if compile:
        compile_model(
            model,
            head,
            optimizer=optimizer,
            learning_rate=learning_rate,
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
    return model


def build_cifar10_cnn(
    *,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
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
    """The full-training CNN: Conv32-Pool-Conv64-Pool-Conv64-Flatten-Dense64-Dense10 (logits).

    Inputs are raw pixels, scaled to [0, 1] by the first layer. Any input of at least 18x18
    works (three valid 3x3 convolutions and two 2x2 poolings).

    Args:
        input_shape: (height, width, channels); 32x32x3 for CIFAR-10.
        num_classes: logits out.
        kernel_initializer: for every convolution and dense kernel.
        dropout: rate before the Dense 64 layer (0 = none, as in the reference).
        l1: L1 weight penalty on every kernel.
        l2: L2 weight penalty on every kernel.
        optimizer: "adam" in the reference.
        learning_rate: 1e-3 (Adam's default in the reference).
        compile: compile with sparse categorical cross-entropy from logits and accuracy.
        jit_compile: XLA; see `strategy.default_jit_compile`.
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "cifar10_cnn".

    Raises:
        ConfigError: when the input is too small for the three convolutions.
    """
    if min(input_shape[:2]) < 18:
        raise ConfigError(
            "cifar10_cnn needs images of at least 18x18 pixels (three 3x3 convolutions, two poolings); "
            f"pass --image-size 32. Received: input_shape={tuple(input_shape)}"
        )
    head = logits_head(num_classes)
    reg = _regularizer(l1, l2)
    conv = dict(activation="relu", kernel_initializer=kernel_initializer, kernel_regularizer=reg)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, name="conv_1", **conv)(x)
    x = layers.MaxPooling2D(2, name="pool_1")(x)
    x = layers.Conv2D(64, 3, name="conv_2", **conv)(x)
    x = layers.MaxPooling2D(2, name="pool_2")(x)
    x = layers.Conv2D(64, 3, name="conv_3", **conv)(x)
    x = layers.Flatten(name="flatten")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(64, name="dense", **conv)(x)
    outputs = layers.Dense(head.units, kernel_initializer=kernel_initializer, kernel_regularizer=reg, name="logits")(x)
    model = keras.Model(inputs, outputs, name="cifar10_cnn")
    if compile:
        compile_model(
            model,
            head,
            optimizer=optimizer,
            learning_rate=learning_rate,
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
    return model


# --------------------------------------------------------------------------- VGG16 transfer


def _weights_missing_message(error: Exception) -> str:
    where = os.path.join(os.path.expanduser("~"), ".keras", "models", VGG16_NOTOP_FILE)
    return (
        f"The ImageNet weights for VGG16 could not be fetched (no network?); put {VGG16_NOTOP_FILE} "
        f"({VGG16_NOTOP_BYTES:,} bytes) at {where}, or pass --weights PATH to a local copy, or "
        f"--weights none to train without them. Received: {type(error).__name__}: {str(error)[:160]}"
    )


def vgg16_base(
    *, input_shape: Sequence[int] = (150, 150, 3), weights: str | None = "imagenet"
) -> keras.Model:
    """VGG16 without its top, from ImageNet, from a local weights file, or randomly initialised.

    Raises:
        ConfigError: for inputs smaller than 32x32 or not RGB.
        WeightsError: when the weights cannot be fetched or do not fit.
    """
    if len(input_shape) != 3 or input_shape[-1] != 3 or min(input_shape[:2]) < VGG16_MIN_SIZE:
        raise ConfigError(
            f"VGG16 needs RGB images of at least {VGG16_MIN_SIZE}x{VGG16_MIN_SIZE}; pass --image-size 32 "
            f"or larger. Received: input_shape={tuple(input_shape)}"
        )
    if weights in (None, "none", "None"):
        weights = None
    elif weights != "imagenet" and not os.path.isfile(weights):
        raise WeightsError(
            f"Weights file {weights} does not exist; pass --weights imagenet, none, or the path of a "
            f"VGG16 .h5 / .weights.h5 file. Received: weights={weights}"
        )
    try:
        return keras.applications.VGG16(
            include_top=False, weights=weights, input_shape=tuple(input_shape), name=VGG16_BASE_NAME
        )
    except Exception as error:  # URL errors, HDF5 errors and shape mismatches all land here
        if weights == "imagenet":
            raise WeightsError(_weights_missing_message(error)) from None
        raise WeightsError(
            f"Weights file {weights} does not fit VGG16 without its top (include_top=False); use the "
            f"'_notop' file of VGG16. Received: {type(error).__name__}: {str(error)[:160]}"
        ) from None


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

    The head is 1 sigmoid unit with binary cross-entropy for two classes, softmax with
    categorical cross-entropy otherwise. VGG16's own `preprocess_input` is the first layer, and
    the base runs in inference mode (`training=False`).

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
        jit_compile: XLA; see `strategy.default_jit_compile`.
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "vgg16_features" whose layer "vgg16" is the frozen base.
    """
    head = transfer_head(num_classes)
    base = vgg16_base(input_shape=input_shape, weights=weights)
    base.trainable = False
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = ImagenetPreprocessing("caffe", name="vgg16_preprocess")(inputs)
    x = base(x, training=False)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(
        dense_units,
        activation="relu",
        kernel_initializer=kernel_initializer,
        kernel_regularizer=_regularizer(l1, l2),
        name="dense",
    )(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(
        head.units, activation=head.activation, kernel_initializer=kernel_initializer, name="predictions"
    )(x)
    model = keras.Model(inputs, outputs, name="vgg16_features")
    if compile:
        compile_model(
            model,
            head,
            optimizer=optimizer,
            learning_rate=learning_rate,
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
    return model


def resolve_unfreeze_at(base: keras.Model, unfreeze_at: int | float | str) -> int:
    """Turns a layer index, a layer name, or a fraction of the base's depth into an index.

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
        return int(round(n * value))
    index = int(value)
    if not 0 <= index < n:
        raise ConfigError(
            f"unfreeze_at must be a layer index from 0 to {n - 1} of {base.name}. Received: unfreeze_at={index}"
        )
    return index


def unfreeze_from(base: keras.Model, unfreeze_at: int | float | str) -> int:
    """Makes base layers `[unfreeze_at:]` trainable and `[:unfreeze_at]` frozen.

    BatchNormalization layers stay frozen, as the Keras transfer-learning guide prescribes.
    Recompile afterwards: `trainable` only takes effect at compile time.

    Returns:
        The resolved index.
    """
    index = resolve_unfreeze_at(base, unfreeze_at)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= index and not isinstance(layer, layers.BatchNormalization)
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
        jit_compile: XLA; see `strategy.default_jit_compile`.
        steps_per_execution: training steps per call into the graph.
        **feature_extractor_kwargs: passed to `build_vgg16_feature_extractor`.

    Returns:
        The same model, partly unfrozen and recompiled.
    """
    if model is None:
        model = build_vgg16_feature_extractor(num_classes=num_classes, compile=False, **feature_extractor_kwargs)
    unfreeze_from(model.get_layer(VGG16_BASE_NAME), unfreeze_at)
    head = transfer_head(max(2, model.output_shape[-1]))
    return compile_model(
        model,
        head,
        optimizer=optimizer,
        learning_rate=learning_rate,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


BUILDERS = {
    "scratch_mlp": build_scratch_mlp,
    "cifar10_cnn": build_cifar10_cnn,
    "vgg16_features": build_vgg16_feature_extractor,
    "vgg16_finetune": build_vgg16_feature_extractor,  # stage one; train.py unfreezes for stage two
}


def head_for(recipe: str, num_classes: int) -> Head:
    """The head a recipe puts on `num_classes` classes."""
    return logits_head(num_classes) if recipe in ("scratch_mlp", "cifar10_cnn") else transfer_head(num_classes)


def count_params(model: keras.Model) -> dict[str, int]:
    """Trainable and total parameter counts."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    return {"trainable_params": trainable, "total_params": total}
