"""The recipes: one frozen record each, and `make_config`, which starts a Config from one.

A recipe is one of the reference examples: which builder makes its model, which head it puts
on the classes, the smallest image it takes, its reference settings, and whether it learns on a
pre-trained base (`transfer`) and in two stages (`staged`). Training, comparing and the command
line branch on these fields, never on a recipe's name.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras

from kerastune_flow import config as config_lib
from kerastune_flow.config import PRESETS, Config, coerce_settings
from kerastune_flow.errors import ConfigError
from kerastune_flow.models import (
    CNN_MIN_SIZE,
    HeadSpec,
    build_cifar10_cnn,
    build_scratch_mlp,
    build_transfer_model,
    get_backbone,
    hub,
    is_hub,
    logits_head,
    transfer_head,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One reference example.

    Attributes:
        name: what `train RECIPE` takes.
        description: one line for `list` and `--help`.
        build: the keyword-only builder of its model (stage one's model for a staged recipe).
        head_spec: the spec of the head it puts on a number of classes (`head` is its former name).
        min_image_size: the smallest height and width its model takes; None: the backbone's.
        defaults: its reference settings, as config fields.
        transfer: a frozen pre-trained base (a backbone or the user's `base`) under a new head.
        staged: a second stage unfreezes the top of the base at a lower rate.
        space: the knobs `tune` searches by default (see `search.tune_space.KNOBS`), the ones its article
            says decide the result.
        xla_on_cpu: `--jit-compile auto` turns XLA on for it on the CPU as well (one device), where
            it is measured faster (benchmarks/RESULTS.md); convolutions are slower there under XLA.
    """

    name: str
    description: str
    build: Callable[..., keras.Model]
    head_spec: Callable[[int], HeadSpec]
    min_image_size: int | None
    defaults: Mapping[str, Any]
    transfer: bool = False
    staged: bool = False
    space: tuple[str, ...] = ("learning_rate", "dropout", "l2", "optimizer")
    xla_on_cpu: bool = False

    @property
    def head(self) -> Callable[[int], HeadSpec]:
        """`head_spec`'s former name."""
        return self.head_spec

    def min_size(self, backbone: str) -> int:
        """The smallest height and width for this recipe on `backbone`."""
        if self.min_image_size is not None:
            return self.min_image_size
        return hub.min_size(backbone) if is_hub(backbone) else get_backbone(backbone).min_size

    def model_name(self, backbone: str) -> str:
        """How messages name the model: "vgg16_finetune on resnet50" for a transfer recipe."""
        return f"{self.name} on {backbone}" if self.transfer else self.name


def _defaults(**values: Any) -> Mapping[str, Any]:
    return types.MappingProxyType(values)


# The from-scratch references train on every training image for the epochs asked and keep the last
# model, so their recipes hold out no validation (measured over seeds, issue 16: a 10 % hold-out cost
# the CIFAR-10 CNN about a point and gave the MNIST MLP nothing); early stopping then watches the
# training loss. --validation-fraction 0.1 brings back validation curves and best-epoch selection.
# The transfer references hold validation out, and so do their recipes.

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "scratch_mlp",
            "MLP from scratch (Flatten-Dense128-Dense64-Dense10, ReLU, Adam 1e-3), MNIST.",
            build_scratch_mlp,
            logits_head,
            1,
            # float32 even on CPUs with native bfloat16: its small matrices run slower in bfloat16
            # (benchmarks/bf16.py, issue 19)
            _defaults(
                image_size=(28, 28),
                batch_size=64,
                learning_rate=1e-3,
                epochs=10,
                validation_fraction=0.0,
                mixed_precision="off",
            ),
            space=("learning_rate", "dropout", "l2", "optimizer", "initializer"),
            # 16 steps per execution under XLA: 1.7x without it on this project's CPU (issue 19)
            xla_on_cpu=True,
        ),
        Recipe(
            "cifar10_cnn",
            "Small CNN trained fully (Conv32-Pool-Conv64-Pool-Conv64-Dense64), CIFAR-10.",
            build_cifar10_cnn,
            logits_head,
            CNN_MIN_SIZE,
            _defaults(image_size=(32, 32), batch_size=64, learning_rate=1e-3, epochs=10, validation_fraction=0.0),
            space=("learning_rate", "dropout", "l2", "optimizer", "augment"),
        ),
        Recipe(
            "vgg16_features",
            "A frozen pre-trained base (VGG16, or --backbone, or your own --base) with a new Dense256 head.",
            build_transfer_model,
            transfer_head,
            None,
            _defaults(image_size=(150, 150), batch_size=32, learning_rate=1e-3, epochs=10),
            transfer=True,
            space=("learning_rate", "dropout", "l2", "dense_units"),
        ),
        Recipe(
            "vgg16_finetune",
            "Staged fine-tune: the head on the frozen base, then its last block unfrozen at a low rate.",
            build_transfer_model,
            transfer_head,
            None,
            _defaults(
                image_size=(150, 150),
                batch_size=32,
                learning_rate=1e-3,
                head_epochs=5,
                epochs=10,
                finetune_learning_rate=1e-5,
            ),
            transfer=True,
            staged=True,
            # No augmentation in the space (issue 30 may add it): with it every trial pays the
            # augmented-view pass (K views through the base) where one feature pass serves it now.
            space=("learning_rate", "finetune_learning_rate", "unfreeze_at", "dropout", "l2"),
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """Looks a recipe up by name.

    Raises:
        ConfigError: listing the recipes.
    """
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}. Received: recipe={name}")
    return RECIPES[name]


def fitted(config: Config, stage: str) -> str:
    """What a range test of `stage` fits, in words (its plot's title): "the cifar10_cnn model" for
    a from-scratch recipe, "the head on the frozen base" or "the fine-tune stage" for a transfer one."""
    recipe = get_recipe(config.model.recipe)
    base = Path(config.model.base).name if config.model.base else config.model.backbone
    if stage == "finetune":
        return f"the fine-tune stage ({base} base)"
    if recipe.transfer:
        return f"the head on the frozen {base} base"
    return f"the {recipe.name} model"


def make_config(recipe: str, preset: str = "reference", **overrides: Any) -> Config:
    """Builds the Config of a recipe: recipe defaults, then a preset, then overrides.

    Args:
        recipe: one of `RECIPES`.
        preset: one of `config.PRESETS`; "smoke" is a tiny offline run for tests and first tries.
        **overrides: any field of DataConfig, ModelConfig or TrainConfig, as a value or as the text
            its flag takes (`image_size=32`, `(32, 32)`, `"32"` or `"150x150"`; `augment="flip,crop"`;
            `learning_rate="auto"`): `config.coerce_settings` reads both. `weights=None` means random
            weights; leave a field out to keep its default.

    Returns:
        A validated, frozen Config.

    Raises:
        ConfigError: for an unknown recipe, preset, field or an invalid value.
    """
    spec = get_recipe(recipe)
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}. Received: preset={preset}")
    values = {"recipe": spec.name, **spec.defaults, **PRESETS[preset], **coerce_settings(overrides)}
    return config_lib.from_values(values)


def check_image_size(config: Config, image_size: Sequence[int] | None = None) -> None:
    """Refuses an image size below what the recipe's model takes, before any data is read.

    Args:
        config: the run's config (its recipe and backbone; a user's `base` decides its own size).
        image_size: the size to check; None: the config's.

    Raises:
        ConfigError: naming the minimum and the flag that sets the size; for a KerasHub preset,
            see `models.hub.check_preset` (MissingPackageError without KerasHub).
    """
    size = image_size if image_size is not None else config.data.image_size
    if size is None or config.model.base:
        return
    spec = get_recipe(config.model.recipe)
    minimum = spec.min_size(config.model.backbone)
    if spec.transfer and is_hub(config.model.backbone):
        hub.check_preset(config.model.backbone, size)
    if min(size) < minimum:
        raise ConfigError(
            f"{spec.model_name(config.model.backbone)} needs images of at least {minimum}x{minimum} pixels; pass "
            f"--image-size {max(minimum, 32)} or larger (smaller images are upscaled). "
            f"Received: image_size={tuple(size)}"
        )
