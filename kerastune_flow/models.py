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
from pathlib import Path
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
CNN_MIN_SIZE = 18  # cifar10_cnn: three valid 3x3 convolutions and two 2x2 poolings
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


_OPTIMIZER_CLASSES = {
    "adam": (keras.optimizers.Adam, {}),
    "sgd": (keras.optimizers.SGD, {"momentum": 0.9}),
    "rmsprop": (keras.optimizers.RMSprop, {}),
    "adagrad": (keras.optimizers.Adagrad, {}),
}


def _discriminative(cls: type) -> type:
    """`cls` with a lower learning rate for some variables (the base) than for the rest (the head)."""

    class Discriminative(cls):
        def __init__(self, *args: Any, base_paths: Sequence[str] = (), base_multiplier: float = 0.1, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.base_paths = tuple(base_paths)
            self.base_multiplier = float(base_multiplier)
            self._base_keys: set = set()

        def build(self, variables):
            paths = set(self.base_paths)
            self._base_keys = {self._var_key(v) for v in variables if v.path in paths}
            super().build(variables)

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) in self._base_keys:
                learning_rate = learning_rate * self.base_multiplier
            return super().update_step(gradient, variable, learning_rate)

        def get_config(self):
            return {**super().get_config(), "base_paths": list(self.base_paths), "base_multiplier": self.base_multiplier}

    Discriminative.__name__ = Discriminative.__qualname__ = f"Discriminative{cls.__name__}"
    return keras.saving.register_keras_serializable(package="kerastune_flow")(Discriminative)


_DISCRIMINATIVE = {name: _discriminative(cls) for name, (cls, _) in _OPTIMIZER_CLASSES.items()}


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    *,
    base_variables: Sequence[Any] | None = None,
    base_multiplier: float | None = None,
) -> keras.optimizers.Optimizer:
    """Returns a fresh optimizer: adam, sgd (momentum 0.9), rmsprop or adagrad.

    Args:
        name: optimizer name.
        learning_rate: the rate (of the head, with discriminative rates).
        base_variables: variables that train at `learning_rate * base_multiplier`
            (discriminative learning rates: a lower rate for the pre-trained base).
        base_multiplier: the factor for `base_variables`; None for one rate for all.

    Raises:
        ConfigError: for an unknown name or a rate that is not positive.
    """
    if name not in _OPTIMIZER_CLASSES:
        raise ConfigError(
            f"Unknown optimizer {name!r}; choose one of {', '.join(_OPTIMIZER_CLASSES)}. Received: {name}"
        )
    if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
        raise ConfigError(f"The learning rate must be positive. Received: learning_rate={learning_rate}")
    cls, extra = _OPTIMIZER_CLASSES[name]
    if base_multiplier is None:
        return cls(learning_rate, **extra)
    if base_multiplier <= 0:
        raise ConfigError(f"The base learning-rate multiplier must be positive. Received: {base_multiplier}")
    paths = [v.path for v in (base_variables or ())]
    return _DISCRIMINATIVE[name](learning_rate, base_paths=paths, base_multiplier=base_multiplier, **extra)


def compile_model(
    model: keras.Model,
    head: Head,
    *,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
    base_multiplier: float | None = None,
) -> keras.Model:
    """Compiles with the head's loss, accuracy, and a fresh optimizer; returns the model.

    With `base_multiplier`, the variables of the nested base (see `find_base`) train at
    `learning_rate * base_multiplier` and the head at `learning_rate`.
    """
    base_variables = find_base(model).trainable_variables if base_multiplier is not None else None
    model.compile(
        optimizer=make_optimizer(
            optimizer, learning_rate, base_variables=base_variables, base_multiplier=base_multiplier
        ),
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
        head.units,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=_regularizer(l1, l2),
        dtype="float32",  # the loss in float32 under a mixed-precision policy
        name="logits",
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
    if min(input_shape[:2]) < CNN_MIN_SIZE:
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
    outputs = layers.Dense(
        head.units, kernel_initializer=kernel_initializer, kernel_regularizer=reg, dtype="float32", name="logits"
    )(x)
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


# --------------------------------------------------------------------------- transfer learning


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A `keras.applications` model usable as a frozen base.

    Attributes:
        name: the name used by `--backbone` and given to the nested base model.
        factory: the `keras.applications` constructor.
        preprocessing: `ImagenetPreprocessing` mode matching the model's `preprocess_input`.
        unfreeze_at: the layer where the last block starts (the default fine-tune boundary).
        pooling: "flatten" (the VGG16 references) or "avg" (global average pooling, as the
            Keras guides do for the deeper backbones, whose flattened maps are huge).
        weights_file: the ImageNet file Keras looks for in ~/.keras/models/.
        weights_bytes: its size, when known.
    """

    name: str
    factory: Any
    preprocessing: str
    unfreeze_at: str
    pooling: str
    weights_file: str
    weights_bytes: int | None = None


BACKBONES = {
    "vgg16": Backbone(
        "vgg16", keras.applications.VGG16, "caffe", "block5_conv1", "flatten", VGG16_NOTOP_FILE, VGG16_NOTOP_BYTES
    ),
    "resnet50": Backbone(
        "resnet50",
        keras.applications.ResNet50,
        "caffe",
        "conv5_block1_1_conv",
        "avg",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        94_765_736,
    ),
    "mobilenetv2": Backbone(
        "mobilenetv2",
        keras.applications.MobileNetV2,
        "tf",
        "block_16_expand",
        "avg",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
    "efficientnetb0": Backbone(
        "efficientnetb0", keras.applications.EfficientNetB0, "none", "block7a_expand_conv", "avg", "efficientnetb0_notop.h5"
    ),
}
CUSTOM_BASE_NAME = "base"


def _weights_missing_message(backbone: Backbone, error: Exception) -> str:
    where = os.path.join(os.path.expanduser("~"), ".keras", "models", backbone.weights_file)
    size = f" ({backbone.weights_bytes:,} bytes)" if backbone.weights_bytes else ""
    return (
        f"The ImageNet weights for {backbone.name} could not be fetched (no network?); put "
        f"{backbone.weights_file}{size} at {where}, or pass --weights PATH to a local copy, or "
        f"--weights none to train without them. Received: {type(error).__name__}: {str(error)[:160]}"
    )


def _has_classifier_top(path: str) -> bool:
    """True when an HDF5 weights file holds the dense top of a keras.applications classifier:
    legacy .h5 files name its layers fc1/fc2/predictions, Keras 3 .weights.h5 files name layers
    by class (dense, dense_1, ...), and no convolutional base without its top has a Dense layer."""
    try:
        import h5py

        names: list[str] = []
        with h5py.File(path, "r") as f:
            f.visit(names.append)
    except (OSError, ImportError):
        return False
    parts = {part for name in names for part in name.split("/")}
    return bool(parts & {"fc1", "fc2", "predictions"}) or any(
        part == "dense" or part.startswith("dense_") for part in parts
    )


def get_backbone(name: str) -> Backbone:
    """Looks a backbone up by name.

    Raises:
        ConfigError: listing the valid names.
    """
    if name not in BACKBONES:
        raise ConfigError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}. Received: backbone={name}")
    return BACKBONES[name]


def backbone_base(
    backbone: str = "vgg16", *, input_shape: Sequence[int] = (150, 150, 3), weights: str | None = "imagenet"
) -> keras.Model:
    """A `keras.applications` model without its top, from ImageNet, a local file, or random.

    Raises:
        ConfigError: for an unknown backbone, inputs smaller than 32x32, or not RGB.
        WeightsError: when the weights cannot be fetched or do not fit.
    """
    spec = get_backbone(backbone)
    if len(input_shape) != 3 or input_shape[-1] != 3 or min(input_shape[:2]) < VGG16_MIN_SIZE:
        raise ConfigError(
            f"{spec.name} needs RGB images of at least {VGG16_MIN_SIZE}x{VGG16_MIN_SIZE}; pass --image-size 32 "
            f"or larger. Received: input_shape={tuple(input_shape)}"
        )
    if weights in (None, "none", "None"):
        weights = None
    elif weights != "imagenet" and not os.path.isfile(weights):
        raise WeightsError(
            f"Weights file {weights} does not exist; pass --weights imagenet, none, or the path of a "
            f"{spec.name} .h5 / .weights.h5 file. Received: weights={weights}"
        )
    elif weights != "imagenet" and _has_classifier_top(weights):
        # Keras 3 would quietly load the convolutional part of such a .weights.h5 file and the
        # legacy loader fails with a layer-count message: say what is wrong instead.
        raise WeightsError(
            f"Weights file {weights} holds the classifier top (include_top=True); pass the 'notop' weights "
            f"of {spec.name} ({spec.weights_file}). Received: weights={weights}"
        )
    try:
        return spec.factory(include_top=False, weights=weights, input_shape=tuple(input_shape), name=spec.name)
    except Exception as error:  # URL errors, HDF5 errors and shape mismatches all land here
        if weights == "imagenet":
            raise WeightsError(_weights_missing_message(spec, error)) from None
        what = (
            "holds the classifier top (include_top=True)"
            if _has_classifier_top(weights)
            else f"is not a {spec.name} weights file"
        )
        raise WeightsError(
            f"Weights file {weights} {what}; pass the 'notop' weights of {spec.name} ({spec.weights_file}). "
            f"Received: {type(error).__name__}: {str(error)[:160]}"
        ) from None


def vgg16_base(*, input_shape: Sequence[int] = (150, 150, 3), weights: str | None = "imagenet") -> keras.Model:
    """VGG16 without its top; see `backbone_base`."""
    return backbone_base("vgg16", input_shape=input_shape, weights=weights)


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
    from kerastune_flow.errors import RunDirError

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
    from kerastune_flow.errors import RunDirError

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
    raise ValueError(f"{model.name} has no nested base model. Received: layers={[l.name for l in model.layers]}")


def default_unfreeze_at(base: keras.Model) -> int | str:
    """The fine-tune boundary of a base: its backbone's last block, or for a user's own base the
    second-to-last layer that has weights (the top block and what follows it)."""
    if base.name in BACKBONES:
        return BACKBONES[base.name].unfreeze_at
    weighted = [i for i, layer in enumerate(base.layers) if layer.weights]
    return weighted[-2] if len(weighted) >= 2 else (weighted[-1] if weighted else 0)


def build_transfer_model(
    *,
    backbone: str = "vgg16",
    base: keras.Model | None = None,
    input_shape: Sequence[int] = (150, 150, 3),
    num_classes: int = 2,
    weights: str | None = "imagenet",
    pooling: str = "auto",
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
    name: str | None = None,
) -> keras.Model:
    """A frozen pre-trained base, then pooling -> Dense ReLU -> a new head.

    The head is 1 sigmoid unit with binary cross-entropy for two classes, softmax with
    categorical cross-entropy otherwise. The backbone's own preprocessing is the first layer, so
    the model takes raw 0..255 pixels, and the base always runs in inference mode
    (`base(x, training=False)`), which keeps BatchNormalization statistics fixed even after
    unfreezing, as the Keras transfer-learning guide prescribes.

    Args:
        backbone: a name of `BACKBONES` (ignored when `base` is given).
        base: a ready base model instead, e.g. `cut_base(...)` of the user's own model; its
            input shape wins over `input_shape` and no preprocessing is added.
        input_shape: (height, width, 3), at least 32x32.
        num_classes: classes of the new head.
        weights: "imagenet", None (random, for tests), or a path to a local weights file.
        pooling: "flatten", "avg", or "auto" (the backbone's; flatten for a user's base).
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
        name: the model's name; default "<backbone>_features".

    Returns:
        A keras.Model whose nested model (see `find_base`) is the frozen base.
    """
    head = transfer_head(num_classes)
    if base is None:
        spec = get_backbone(backbone)
        base = backbone_base(backbone, input_shape=input_shape, weights=weights)
        preprocessing, auto_pooling = spec.preprocessing, spec.pooling
    else:
        input_shape = tuple(int(d) for d in base.input_shape[1:])
        preprocessing, auto_pooling = "none", "flatten"
    pooling = auto_pooling if pooling == "auto" else pooling
    if pooling not in ("flatten", "avg"):
        raise ConfigError(f"pooling must be flatten, avg or auto. Received: pooling={pooling}")
    base.trainable = False
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = inputs
    if preprocessing != "none":
        x = ImagenetPreprocessing(preprocessing, name=f"{base.name}_preprocess")(x)
    x = base(x, training=False)
    if len(x.shape) == 4 and pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    else:
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
        head.units,
        activation=head.activation,
        kernel_initializer=kernel_initializer,
        dtype="float32",  # probabilities and the loss in float32 under a mixed-precision policy
        name="predictions",
    )(x)
    model = keras.Model(inputs, outputs, name=name or f"{base.name}_features")
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
        jit_compile: XLA; see `strategy.default_jit_compile`.
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "vgg16_features" whose layer "vgg16" is the frozen base.
    """
    return build_transfer_model(
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
        optimizer=optimizer,
        learning_rate=learning_rate,
        compile=compile,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )


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
    unfreeze_from(find_base(model), unfreeze_at)
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


def check_image_size(recipe: str, image_size: Sequence[int], *, backbone: str = "vgg16") -> None:
    """Refuses an image size below what a recipe's model can take, before any data is read.

    Raises:
        ConfigError: naming the minimum and the flag that sets the size.
    """
    smallest = {"cifar10_cnn": CNN_MIN_SIZE, "vgg16_features": VGG16_MIN_SIZE, "vgg16_finetune": VGG16_MIN_SIZE}
    minimum = smallest.get(recipe, 1)
    if min(image_size) < minimum:
        model = f"{recipe} on {backbone}" if recipe.startswith("vgg16_") else recipe
        raise ConfigError(
            f"{model} needs images of at least {minimum}x{minimum} pixels; pass --image-size {max(minimum, 32)} or "
            f"larger (smaller images are upscaled). Received: image_size={tuple(image_size)}"
        )


def head_for(recipe: str, num_classes: int) -> Head:
    """The head a recipe puts on `num_classes` classes."""
    return logits_head(num_classes) if recipe in ("scratch_mlp", "cifar10_cnn") else transfer_head(num_classes)


def count_params(model: keras.Model) -> dict[str, int]:
    """Trainable and total parameter counts."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    return {"trainable_params": trainable, "total_params": total}
