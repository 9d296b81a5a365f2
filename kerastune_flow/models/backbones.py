"""The pre-trained backbones (`keras.applications` models without their top) and their preprocessing.

Each `Backbone` record holds what the rest of the package needs to know about one: its
constructor, its `preprocess_input` mode, its smallest input, where its blocks start (the
points where a fine-tune may unfreeze), its default fine-tune boundary and pooling, and the
ImageNet weights file Keras looks for. `preprocessing_layer` turns the mode into built-in Keras
layers, so a saved model opens in plain Keras without this package.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import h5py
import keras
from keras import layers, ops

from kerastune_flow.errors import ConfigError, WeightsError

VGG16_UNFREEZE_AT = 15  # block5_conv1: the first layer of VGG16's last convolutional block
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_BYTES = 58_889_256
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING_MODES = ("caffe", "tf", "none")
PREPROCESS_SUFFIX = "_preprocess"  # the layer's name is the base's name and this


def preprocessing_layer(mode: str, *, name: str) -> layers.Layer | None:
    """A backbone's `preprocess_input` as one built-in Keras layer, so models take raw 0..255 pixels.

    Built-in layers only: a saved model then opens with plain `keras.saving.load_model`, in a
    process that has not imported this package. The layer holds no trainable weights, and
    `unfreeze_from` leaves it frozen (see `is_preprocessing`).

    Args:
        mode: "caffe" (VGG16, ResNet50: RGB->BGR, minus the ImageNet mean), "tf" (scale to
            [-1, 1], MobileNetV2) or "none" (EfficientNet rescales inside itself).
        name: the layer's name; it should end in `PREPROCESS_SUFFIX`.

    Returns:
        For "caffe", a frozen `Dense(3)` on the channel axis whose kernel is the RGB->BGR
        permutation and whose bias is minus the BGR mean: Keras has no channel-flip layer, and
        with products by 1 and 0 it is exact in float32. For "tf", `Rescaling(1 / 127.5,
        offset=-1)`. For "none", None. Either casts its input to its compute dtype, as Keras
        layers do (uint8 pixels work; float16 under a mixed-precision policy).

    Raises:
        ValueError: for an unknown mode.
    """
    if mode == "caffe":
        flip = [[1.0 if i + j == 2 else 0.0 for j in range(3)] for i in range(3)]  # out j = in 2 - j
        return layers.Dense(
            3,
            kernel_initializer=keras.initializers.Constant(flip),
            bias_initializer=keras.initializers.Constant([-m for m in CAFFE_MEAN_BGR]),
            trainable=False,
            name=name,
        )
    if mode == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, name=name)
    if mode == "none":
        return None
    raise ValueError(f"mode must be one of {PREPROCESSING_MODES}. Received: mode={mode}")


def is_preprocessing(layer: layers.Layer) -> bool:
    """True for the preprocessing layer of a transfer model (`preprocessing_layer` or the older
    `ImagenetPreprocessing`), which must stay frozen whatever is unfrozen around it."""
    return layer.name.endswith(PREPROCESS_SUFFIX)


@keras.saving.register_keras_serializable(package="kerastune_flow")
class ImagenetPreprocessing(layers.Layer):
    """`keras.applications` preprocessing as a layer of this package: what models saved before
    `preprocessing_layer` hold. It stays registered so that those `.keras` files still load
    through `load_keras_model`; new models do not use it (plain Keras cannot load it).

    Args:
        mode: "caffe", "tf" or "none" (see `preprocessing_layer`).
    """

    MODES = PREPROCESSING_MODES

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


def pool(x: Any, pooling: str) -> Any:
    """Pools a base's output for the dense head, with built-in layers.

    Args:
        x: a feature map (batch, height, width, channels) or a ViT's (batch, tokens, dim).
        pooling: "avg" (the mean over positions or tokens), "token" (a ViT's class token, the first,
            as `keras_hub.models.ViTImageClassifier` pools) or "flatten" (everything).
    """
    if pooling == "avg" and len(x.shape) == 4:
        return layers.GlobalAveragePooling2D(name="pool")(x)
    if pooling == "avg" and len(x.shape) == 3:
        return layers.GlobalAveragePooling1D(name="pool")(x)
    if pooling == "token" and len(x.shape) == 3:
        x = layers.Cropping1D((0, x.shape[1] - 1), name="class_token_output")(x)
    return layers.Flatten(name="flatten")(x)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A `keras.applications` model usable as a frozen base.

    Attributes:
        name: the name used by `--backbone` and given to the nested base model.
        factory: the `keras.applications` constructor.
        preprocessing: the mode of the model's `preprocess_input` (see `preprocessing_layer`).
        min_size: the smallest height and width the model takes.
        block: a regular expression whose first group is the block a layer belongs to, by
            the layer's name ("block5" of "block5_conv1"); a block starts at its first layer.
        unfreeze_at: the layer where the last block starts (the default fine-tune boundary).
        pooling: "flatten" (the VGG16 references) or "avg" (global average pooling, as the
            Keras guides do for the deeper backbones, whose flattened maps are huge).
        weights_file: the ImageNet file Keras looks for in ~/.keras/models/.
        weights_bytes: its size, when known.
    """

    name: str
    factory: Any
    preprocessing: str
    min_size: int
    block: str
    unfreeze_at: str
    pooling: str
    weights_file: str
    weights_bytes: int | None = None

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for the stem and the layers after the last block."""
        found = re.match(self.block, layer_name)
        return found.group(1) if found else None

    def default_unfreeze_at(self, base: keras.Model) -> str:
        """The default fine-tune boundary: `unfreeze_at` (as `hub.HubFamily` finds its own in `base`)."""
        return self.unfreeze_at


BACKBONES = {
    "vgg16": Backbone(
        "vgg16",
        keras.applications.VGG16,
        "caffe",
        32,
        r"(block\d+)_",
        "block5_conv1",
        "flatten",
        VGG16_NOTOP_FILE,
        VGG16_NOTOP_BYTES,
    ),
    "resnet50": Backbone(
        "resnet50",
        keras.applications.ResNet50,
        "caffe",
        32,
        r"(conv\d+_block\d+)_",
        "conv5_block1_1_conv",
        "avg",
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        94_765_736,
    ),
    "mobilenetv2": Backbone(
        "mobilenetv2",
        keras.applications.MobileNetV2,
        "tf",
        32,
        r"(block_\d+|expanded_conv)_",
        "block_16_expand",
        "avg",
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
    "efficientnetb0": Backbone(
        "efficientnetb0",
        keras.applications.EfficientNetB0,
        "none",
        32,
        r"(block\d+[a-z])_",
        "block7a_expand_conv",
        "avg",
        "efficientnetb0_notop.h5",
    ),
}


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
    names: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            f.visit(names.append)
    except OSError:
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
    if len(input_shape) != 3 or input_shape[-1] != 3 or min(input_shape[:2]) < spec.min_size:
        raise ConfigError(
            f"{spec.name} needs RGB images of at least {spec.min_size}x{spec.min_size}; pass --image-size "
            f"{spec.min_size} or larger. Received: input_shape={tuple(input_shape)}"
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
