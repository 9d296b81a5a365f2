"""Config: recipe defaults, presets, overrides, validation, JSON round trip."""

import json

import pytest

from kerastune_flow.config import PRESETS, RECIPE_DEFAULTS, RECIPES, Config, field_section, make_config
from kerastune_flow.errors import ConfigError


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_defaults_are_applied(recipe):
    config = make_config(recipe)
    assert config.model.recipe == recipe
    for name, value in RECIPE_DEFAULTS[recipe].items():
        section = getattr(config, field_section(name))
        assert getattr(section, name) == value


def test_reference_values_of_the_articles():
    mlp = make_config("scratch_mlp")
    assert (mlp.data.image_size, mlp.data.batch_size, mlp.model.learning_rate, mlp.train.epochs) == ((28, 28), 64, 1e-3, 10)
    ft = make_config("vgg16_finetune")
    assert (ft.model.backbone, ft.model.finetune_learning_rate, ft.model.weights) == ("vgg16", 1e-5, "imagenet")
    assert ft.model.unfreeze_at is None  # the backbone's own boundary: block5_conv1 (15) for VGG16


def test_smoke_preset_is_tiny_and_offline():
    config = make_config("vgg16_features", "smoke")
    assert config.model.weights is None
    assert config.data.max_examples == PRESETS["smoke"]["max_examples"]
    assert config.train.epochs <= 2 and not config.train.tensorboard


def test_overrides_win_and_none_is_a_value_only_where_it_means_something():
    config = make_config("cifar10_cnn", "smoke", epochs=7, dropout=0.25)
    assert config.train.epochs == 7
    assert config.data.batch_size == PRESETS["smoke"]["batch_size"]
    assert config.model.dropout == 0.25
    assert make_config("vgg16_features", weights=None).model.weights is None  # random weights, not ImageNet
    with pytest.raises(ConfigError, match="batch_size needs a value"):
        make_config("cifar10_cnn", batch_size=None)


def test_field_names_are_unique_across_sections():
    import dataclasses

    from kerastune_flow.config import DataConfig, ModelConfig, TrainConfig

    names = [f.name for cls in (DataConfig, ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(batch_size=0), "batch_size"),
        (dict(learning_rate=-1.0), "learning_rate must be positive"),
        (dict(validation_fraction=0.6, test_fraction=0.5), "leave some training data"),
        (dict(dropout=1.0), "dropout"),
        (dict(augment=("blur",)), "Unknown augmentation"),
        (dict(strategy="cluster"), "strategy must be one of"),
        (dict(optimizer="lamb"), "optimizer must be one of"),
        (dict(image_size=(0, 4)), "image_size"),
        (dict(nonsense=1), "Unknown setting"),
    ],
)
def test_invalid_values_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config("cifar10_cnn", **overrides)


def test_unknown_recipe_and_preset_list_the_valid_ones():
    with pytest.raises(ConfigError, match="scratch_mlp, cifar10_cnn"):
        make_config("resnet")
    with pytest.raises(ConfigError, match="reference, smoke"):
        make_config("cifar10_cnn", "huge")


def test_json_round_trip():
    config = make_config("vgg16_finetune", augment=("flip", "zoom"), unfreeze_at="block5_conv1")
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
