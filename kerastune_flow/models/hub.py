"""KerasHub backbones as frozen bases: a preset by name (`hub:NAME`) or a local preset folder.

`hub_base` loads a preset's backbone (`keras_hub.models.Backbone.from_preset`) and image converter
(`keras_hub.layers.ImageConverter.from_preset`), and rebuilds the backbone as a plain functional
model of its layers named after its family (`HubFamily`): the package's fine-tune then works on it as
on a `keras.applications` base (its blocks are layers, a boundary is an index, the frozen prefix can
be cut off). The converter's scale and offset become a built-in `Rescaling` before the base; the
run's `--image-size` decides the size. Convolutional families rebuild from built-in Keras layers
only, so their `model.keras` opens in plain Keras; a ViT's `model.keras` needs KerasHub installed
(its position table is KerasHub's `PositionEmbedding`). KerasHub, the `[hub]` extra, is optional:
it is imported only here, inside functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from kerastune_flow.config.settings import HUB_PREFIX
from kerastune_flow.errors import ConfigError, MissingPackageError, WeightsError
from kerastune_flow.models.backbones import (
    BACKBONES,
    PREPROCESS_SUFFIX,
    Backbone,
    backbone_base,
    get_backbone,
    preprocessing_layer,
)
from kerastune_flow.models.saving import HUB_EXTRA

log = logging.getLogger(__name__)

PRESET_CONFIG = "config.json"  # what `Backbone.save_to_preset` writes: the backbone's class and config
CONVERTER_CONFIG = "image_converter.json"  # what `ImageConverter.save_to_preset` writes
HUB_MIN_SIZE = 32
KERAS_HUB_MIN = (0, 22)  # the oldest whose ViT layers `_vit` rebuilds exactly (0.19 and 0.21 differ)


@dataclasses.dataclass(frozen=True)
class HubFamily:
    """A KerasHub backbone family usable as a frozen base.

    Attributes:
        name: the rebuilt base model's name ("hub_resnet"), by which the fine-tune finds the record.
        title: how `list` names the family.
        classes: the KerasHub backbone classes of the family.
        block: a regular expression whose first group is the block a layer of the rebuilt base
            belongs to; a block starts at its first layer (where a fine-tune may unfreeze).
        stage: a regular expression whose first group is the stage a layer belongs to; the last
            stage's first layer is the default fine-tune boundary.
        pooling: "avg" (global average pooling of a feature map) or "token" (the class token of a
            ViT's (tokens, dim) output, as `keras_hub.models.ViTImageClassifier` pools).
        min_size: the smallest height and width the family takes.
        fixed_size: the family takes only its preset's image size (a ViT's position table has one
            row per patch of that size).
        rebuild: the backbone -> the plain functional base named `name`.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    block: str
    stage: str
    pooling: str
    min_size: int
    fixed_size: bool
    rebuild: Callable[[keras.Model, str], keras.Model]

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to, or None for the stem and the layers after the last block."""
        found = re.match(self.block, layer_name)
        return found.group(1) if found else None

    def default_unfreeze_at(self, base: keras.Model) -> str:
        """The first layer of the base's last stage (its last block for a ViT)."""
        stages = [(re.match(self.stage, layer.name), layer.name) for layer in base.layers]
        named = [(found.group(1), name) for found, name in stages if found]
        last = named[-1][0]
        return next(name for stage, name in named if stage == last)


def _functional(backbone: keras.Model, name: str) -> keras.Model:
    """A convolutional backbone's own graph as a plain functional model: its layers are built-in."""
    return keras.Model(backbone.input, backbone.output, name=name)


def _copy(layer: layers.Layer, name: str) -> layers.Layer:
    """A new built-in layer with `layer`'s config under a unique name (its weights set once built)."""
    return type(layer).from_config({**layer.get_config(), "name": name})


def _vit(backbone: keras.Model, name: str) -> keras.Model:
    """A ViT backbone rebuilt from built-in layers and KerasHub's `PositionEmbedding` (whose config
    round-trips), each transformer block spelled out.

    KerasHub's ViT layers cannot be rebuilt from their saved configs (their `get_config` names
    arguments their constructors refuse), and a block hidden inside one encoder layer could be
    neither unfrozen alone nor cut at. So: the patch convolution, the patches as a sequence, a
    zero token in front for the class token, plus a position table whose first row holds the class
    token (the same sum, exactly), then per block LayerNorm -> attention -> residual -> LayerNorm
    -> MLP -> residual, as `ViTEncoderBlock.call` computes, and the final LayerNorm.
    """
    hub = _import_hub()
    embed, encoder = backbone.get_layer("vit_patching_and_embedding"), backbone.get_layer("vit_encoder")
    copies: list[tuple[layers.Layer, layers.Layer]] = []  # (new, KerasHub's), weights copied once built

    def copy(layer: layers.Layer, name: str) -> layers.Layer:
        new = _copy(layer, name)
        copies.append((new, layer))
        return new

    images = keras.Input(shape=tuple(backbone.input_shape[1:]), name="images")
    x = copy(embed.patch_embedding, "patch_embedding")(images)
    x = layers.Reshape((embed.num_patches, embed.hidden_dim), name="patches")(x)
    table = keras.ops.convert_to_numpy(embed.position_embedding.embeddings).copy()
    if getattr(embed, "use_class_token", True):  # KerasHub before 0.22: always a class token
        x = layers.ZeroPadding1D((1, 0), name="class_token")(x)
        table[0] += keras.ops.convert_to_numpy(embed.class_token)[0, 0]
    positions = hub.layers.PositionEmbedding(embed.num_positions, name="position_embedding")
    x = layers.Add(name="embeddings")([x, positions(x)])
    x = copy(encoder.dropout, "embeddings_dropout")(x)
    for i, block in enumerate(encoder.encoder_layers, start=1):
        name_of = f"transformer_block_{i}_{{}}".format
        y = copy(block.layer_norm_1, name_of("ln_1"))(x)
        y = copy(block.mha, name_of("mha"))(y, y)
        y = copy(block.dropout, name_of("dropout"))(y)
        x = layers.Add(name=name_of("attention_residual"))([y, x])
        y = copy(block.mlp.dense_1, name_of("mlp_1"))(copy(block.layer_norm_2, name_of("ln_2"))(x))
        y = copy(block.mlp.dropout, name_of("mlp_dropout_1"))(y)
        y = copy(block.mlp.dropout, name_of("mlp_dropout_2"))(copy(block.mlp.dense_2, name_of("mlp_2"))(y))
        x = layers.Add(name=name_of("mlp_residual"))([x, y])
    base = keras.Model(images, copy(encoder.layer_norm, "ln")(x), name=name)
    for new, old in copies:
        new.set_weights(old.get_weights())
    positions.set_weights([table])
    return base


HUB_FAMILIES = {
    family.name: family
    for family in (
        HubFamily(
            "hub_resnet",
            "ResNet v1/v2",
            ("ResNetBackbone",),
            r"(stack\d+_block\d+)_",
            r"(stack\d+)_",
            "avg",
            HUB_MIN_SIZE,
            False,
            _functional,
        ),
        HubFamily(
            "hub_densenet",
            "DenseNet",
            ("DenseNetBackbone",),
            r"(stack\d+_block\d+)_",
            r"(stack\d+)_",
            "avg",
            HUB_MIN_SIZE,
            False,
            _functional,
        ),
        HubFamily(
            "hub_vit",
            "ViT",
            ("ViTBackbone",),
            r"(transformer_block_\d+)_",
            r"(transformer_block_\d+)_",
            "token",
            HUB_MIN_SIZE,
            True,
            _vit,
        ),
    )
}


def is_hub(backbone: str) -> bool:
    """True for a KerasHub preset (`hub:NAME` or a folder), False for a `keras.applications` name."""
    return backbone not in BACKBONES


def describe_families() -> str:
    """One line per supported family, for `list`."""
    lines = []
    for family in HUB_FAMILIES.values():
        blocks = family.block.strip("()_").replace(r"\d+", "N")
        size = " (its preset's image size only)" if family.fixed_size else ""
        classes = ", ".join(family.classes)
        lines.append(f"  {family.title:<14}{classes}: blocks {blocks}, pooling {family.pooling}{size}")
    return "\n".join(lines)


def family_of_class(class_name: str, *, backbone: str) -> HubFamily:
    """The family of a KerasHub backbone class.

    Raises:
        ConfigError: for a class of no supported family, listing them.
    """
    for family in HUB_FAMILIES.values():
        if class_name in family.classes:
            return family
    supported = ", ".join(c for family in HUB_FAMILIES.values() for c in family.classes)
    raise ConfigError(
        f"The KerasHub preset {backbone} is a {class_name}, which this package cannot fine-tune yet; use a "
        f"preset of {supported}. Received: backbone={backbone}"
    )


def preset_size(backbone: str) -> tuple[HubFamily, int | None] | None:
    """(family, the only image size it takes or None) of a local preset, read from its config.json
    without KerasHub; None for `hub:NAME` (known once downloaded).

    Raises:
        ConfigError: when the folder or its config.json is missing or unreadable; see `family_of_class`.
    """
    if backbone.startswith(HUB_PREFIX):
        return None
    try:
        config = json.loads((Path(backbone).expanduser() / PRESET_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"No KerasHub preset at {backbone} (a folder with the {PRESET_CONFIG} that `save_to_preset` writes); "
            f"pass a preset folder, {HUB_PREFIX}NAME or one of {', '.join(BACKBONES)}. "
            f"Received: {type(error).__name__}: {str(error)[:120]}"
        ) from None
    family = family_of_class(config.get("class_name", "?"), backbone=backbone)
    shape = config.get("config", {}).get("image_shape") or [None]
    return family, (int(shape[0]) if family.fixed_size and shape[0] else None)


def min_size(backbone: str) -> int:
    """The smallest height and width a preset takes (a fixed-size family's only size)."""
    found = preset_size(backbone)
    if found is None:
        return HUB_MIN_SIZE
    family, fixed = found
    return fixed or family.min_size


def check_size(backbone: str, size: Sequence[int], loaded: keras.Model | None = None) -> None:
    """Refuses an image size a fixed-size preset (a ViT) does not take: a local preset's before data
    is read, a `hub:NAME` preset's once it is `loaded`.

    Raises:
        ConfigError: naming the preset's size and the flag.
    """
    if loaded is not None:
        family, fixed = family_of_class(type(loaded).__name__, backbone=backbone), int(loaded.input_shape[1])
    else:
        family, fixed = preset_size(backbone) or (None, None)
    if family is not None and family.fixed_size and tuple(size[:2]) != (fixed, fixed):
        raise ConfigError(
            f"The {family.title} preset {backbone} takes {fixed}x{fixed} images only (its position table has one "
            f"row per patch); pass --image-size {fixed}. Received: image_size={tuple(size[:2])}"
        )


def check_preset(backbone: str, size: Sequence[int]) -> None:
    """Checks before any data is read: KerasHub installed (else MissingPackageError), a local preset
    of a supported family and an image size it takes (else ConfigError, see `check_size`)."""
    _import_hub()
    check_size(backbone, size)


def _import_hub() -> Any:
    try:
        hub = importlib.import_module("keras_hub")
    except ImportError as error:
        hub, received = None, f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
    if hub is not None and tuple(int(n) for n in re.findall(r"\d+", hub.__version__)[:2]) >= KERAS_HUB_MIN:
        return hub
    raise MissingPackageError(
        f"A KerasHub backbone needs keras-hub {'.'.join(map(str, KERAS_HUB_MIN))} or later (older ViTs differ from "
        f"what this package rebuilds); run {HUB_EXTRA}. Received: {received if hub is None else hub.__version__}"
    )


def _source(backbone: str) -> str:
    """What `from_preset` takes: the preset's name, or the folder's path."""
    return backbone.removeprefix(HUB_PREFIX) if backbone.startswith(HUB_PREFIX) else str(Path(backbone).expanduser())


def _load(hub: Any, backbone: str, *, load_weights: bool, overrides: dict[str, Any]) -> keras.Model:
    source = _source(backbone)
    try:
        return hub.models.Backbone.from_preset(source, load_weights=load_weights, **overrides)
    except Exception as error:  # download, file and shape errors all land here
        text = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
        if backbone.startswith(HUB_PREFIX):
            raise WeightsError(
                f"KerasHub could not fetch or load the preset {source} (no network?); where there is one, save its "
                f"backbone and image converter to a folder with `save_to_preset(DIR)` and pass --backbone DIR. "
                f"Received: {text}"
            ) from None
        raise WeightsError(f"Cannot load the KerasHub preset {backbone}. Received: {text}") from None


def converter_layer(hub: Any, backbone: str, name: str) -> layers.Layer:
    """The preset's image converter as a built-in `Rescaling` (its scale and offset, per channel
    or one number), so the model takes raw 0..255 pixels.

    Raises:
        ConfigError: when the preset has no image converter.
    """
    source = _source(backbone)
    try:
        converter = hub.layers.ImageConverter.from_preset(source)
    except Exception as error:  # a folder without image_converter.json, a preset of another task
        raise ConfigError(
            f"The KerasHub preset {backbone} has no image converter ({CONVERTER_CONFIG}), which says how to scale "
            f"its pixels; save one there with `converter.save_to_preset(DIR)`. "
            f"Received: {type(error).__name__}: {str(error)[:120]}"
        ) from None
    scale = 1.0 if converter.scale is None else np.asarray(converter.scale, "float32").tolist()
    offset = 0.0 if converter.offset is None else np.asarray(converter.offset, "float32").tolist()
    return layers.Rescaling(scale, offset=offset, name=name)


def hub_base(
    backbone: str, *, input_shape: Sequence[int], weights: str | None = "imagenet"
) -> tuple[keras.Model, layers.Layer, HubFamily]:
    """A KerasHub preset's backbone rebuilt as a base, with its image converter as a layer.

    Args:
        backbone: `hub:NAME` or a local preset folder.
        input_shape: (height, width, 3); a fixed-size family takes its preset's size only.
        weights: "imagenet" (any word but "none": the preset's own weights) or None / "none": the
            preset's architecture with random weights. A weights file is refused: a preset carries
            its weights.

    Returns:
        (the base named after its family, the `Rescaling` to put before it, the family).

    Raises:
        MissingPackageError: when keras-hub is not installed.
        ConfigError: for a preset of no supported family, a size it does not take, a missing
            image converter, or a weights file.
        WeightsError: when the preset cannot be fetched or loaded.
    """
    load_weights = weights not in (None, "none", "None")
    if load_weights and weights != "imagenet":
        raise ConfigError(
            f"A KerasHub preset carries its own weights; pass --weights imagenet (the preset's) or none (random). "
            f"Received: weights={weights}"
        )
    check_size(backbone, input_shape)
    found = preset_size(backbone)
    hub = _import_hub()
    # A convolutional family takes the run's size, a fixed-size family its own; both the run's dtype policy.
    overrides: dict[str, Any] = {"dtype": keras.config.dtype_policy().name}
    if not (found and found[0].fixed_size):
        overrides["image_shape"] = tuple(int(d) for d in input_shape)
    loaded = _load(hub, backbone, load_weights=load_weights, overrides=overrides)
    family = family_of_class(type(loaded).__name__, backbone=backbone)
    check_size(backbone, input_shape, loaded)
    preprocess = converter_layer(hub, backbone, f"{family.name}{PREPROCESS_SUFFIX}")
    base = family.rebuild(loaded, family.name)
    log.info("KerasHub %s from %s: %d layers, %s", type(loaded).__name__, backbone, len(base.layers), family.pooling)
    return base, preprocess, family


def base_record(base: keras.Model) -> Backbone | HubFamily | None:
    """The record of a base (a `keras.applications` backbone or a KerasHub family), by the base's
    name; None for a user's own base."""
    return BACKBONES.get(base.name) or HUB_FAMILIES.get(base.name)


def pretrained_base(
    backbone: str, *, input_shape: Sequence[int], weights: str | None = "imagenet"
) -> tuple[keras.Model, layers.Layer | None, str]:
    """A pre-trained base by `--backbone`: a `keras.applications` name or a KerasHub preset.

    Returns:
        (the base, its preprocessing layer or None, its pooling).

    Raises:
        ConfigError, WeightsError, MissingPackageError: see `backbones.backbone_base` and `hub_base`.
    """
    if is_hub(backbone):
        base, preprocess, family = hub_base(backbone, input_shape=input_shape, weights=weights)
        names = {layer.name for layer in base.layers}
        # a ViT without a class token is pooled as KerasHub's classifier does then: the mean of its tokens
        return base, preprocess, "avg" if family.pooling == "token" and "class_token" not in names else family.pooling
    spec = get_backbone(backbone)
    base = backbone_base(backbone, input_shape=input_shape, weights=weights)
    return base, preprocessing_layer(spec.preprocessing, name=f"{base.name}{PREPROCESS_SUFFIX}"), spec.pooling
