"""Config and recipes: recipe defaults, presets, overrides, validation from the fields' choices,
the recipe records, JSON round trip."""

import dataclasses
import json

import pytest

from kerastune_flow import config as config_lib
from kerastune_flow.config import PRESETS, Config, DataConfig, ModelConfig, TrainConfig, field_section
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import RECIPES, check_image_size, get_recipe, make_config
from kerastune_flow.training import fitting


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_defaults_are_applied(recipe):
    config = make_config(recipe)
    assert config.model.recipe == recipe
    for name, value in RECIPES[recipe].defaults.items():
        section = getattr(config, field_section(name))
        assert getattr(section, name) == value


def test_reference_values_of_the_articles():
    mlp = make_config("scratch_mlp")
    assert (mlp.data.image_size, mlp.data.batch_size, mlp.model.learning_rate, mlp.train.epochs) == (
        (28, 28),
        64,
        1e-3,
        10,
    )
    ft = make_config("vgg16_finetune")
    assert (ft.model.backbone, ft.model.finetune_learning_rate, ft.model.weights) == ("vgg16", 1e-5, "imagenet")
    assert ft.model.unfreeze_at is None  # the backbone's own boundary: block5_conv1 (15) for VGG16


def test_the_recipe_records_say_what_each_recipe_is():
    assert [(r.name, r.transfer, r.staged) for r in RECIPES.values()] == [
        ("scratch_mlp", False, False),
        ("cifar10_cnn", False, False),
        ("vgg16_features", True, False),
        ("vgg16_finetune", True, True),
    ]
    assert get_recipe("cifar10_cnn").head(10).activation is None  # logits, as the reference
    assert get_recipe("vgg16_features").head(2).units == 1  # one sigmoid unit for two classes
    with pytest.raises(ConfigError, match="scratch_mlp, cifar10_cnn"):
        get_recipe("resnet")


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "mobilenetv2", "efficientnetb0"])
def test_the_minimum_image_size_is_the_backbones_and_named_in_the_message(backbone):
    config = make_config("vgg16_finetune", backbone=backbone)
    check_image_size(config, (32, 32))
    with pytest.raises(ConfigError, match=f"vgg16_finetune on {backbone} needs images of at least 32x32"):
        check_image_size(config, (31, 40))


def test_the_cnn_minimum_is_its_own():
    config = make_config("cifar10_cnn", image_size=(17, 17))
    with pytest.raises(ConfigError, match="cifar10_cnn needs images of at least 18x18"):
        check_image_size(config)
    check_image_size(make_config("cifar10_cnn", image_size=(18, 18)))


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
    names = [f.name for cls in (DataConfig, ModelConfig, TrainConfig) for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))


def test_every_field_has_help_text():
    assert all(f.metadata["help"].strip() for f in config_lib.fields())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(batch_size=0), "batch_size"),
        (dict(learning_rate=-1.0), "learning_rate must be positive"),
        (dict(validation_fraction=0.6, test_fraction=0.5), "leave some training data"),
        (dict(dropout=1.0), "dropout"),
        (dict(augment=("flip", "blur")), "augment must be one of flip, rotation, zoom, crop. Received: augment='blur'"),
        (dict(strategy="cluster"), "strategy must be one of"),
        (dict(optimizer="lamb"), "optimizer must be one of"),
        (dict(image_size=(0, 4)), "image_size"),
        (dict(nonsense=1), "Unknown setting"),
        (dict(jit_compile="yes"), "jit_compile must be one of auto, true, false. Received: jit_compile='yes'"),
        (dict(jit_compile="True"), "jit_compile must be one of auto, true, false"),
        (dict(mixed_precision="fp8"), "mixed_precision must be one of off, auto, bfloat16, float16"),
        (dict(pooling="max"), "pooling must be one of auto, flatten, avg"),
        (dict(lr_schedule="step"), "lr_schedule must be one of constant, cosine"),
        (dict(cache="disk"), "cache must be one of auto, memory, off"),
    ],
)
def test_invalid_values_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config("cifar10_cnn", **overrides)


def test_every_choice_of_every_field_is_accepted():
    for f in config_lib.fields():
        for choice in f.metadata["choices"] or ():
            value = (choice,) if isinstance(f.default, tuple) else choice
            assert (
                getattr(getattr(make_config("cifar10_cnn", **{f.name: value}), field_section(f.name)), f.name) == value
            )


def test_unknown_recipe_and_preset_list_the_valid_ones():
    with pytest.raises(ConfigError, match="scratch_mlp, cifar10_cnn"):
        make_config("resnet")
    with pytest.raises(ConfigError, match="reference, smoke"):
        make_config("cifar10_cnn", "huge")


def test_replace_routes_each_field_to_its_section():
    config = make_config("cifar10_cnn").replace(epochs=3, dropout=0.5, batch_size=16)
    assert (config.train.epochs, config.model.dropout, config.data.batch_size) == (3, 0.5, 16)
    with pytest.raises(ConfigError, match="Unknown setting"):
        config.replace(nonsense=1)


def test_json_round_trip():
    config = make_config("vgg16_finetune", augment=("flip", "zoom"), unfreeze_at="block5_conv1")
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


def test_early_stoppings_patience_is_half_of_each_fits_epochs_unless_given():
    config = make_config("scratch_mlp")
    assert config.train.patience is None
    assert [fitting.patience(config, epochs) for epochs in (2, 6, 10, 40)] == [3, 3, 5, 20]
    assert fitting.patience(make_config("scratch_mlp", patience=2), 40) == 2


# A setting takes in Python what its flag takes as text (issue 26): one parser for both.
@pytest.mark.parametrize(
    "name, given, expected",
    [
        ("image_size", 32, (32, 32)),
        ("image_size", (32, 32), (32, 32)),
        ("image_size", [20, 30], (20, 30)),
        ("image_size", "32", (32, 32)),
        ("image_size", "150x150", (150, 150)),
        ("augment", "flip,crop", ("flip", "crop")),
        ("augment", ("flip",), ("flip",)),
        ("augment", ["zoom"], ("zoom",)),
        ("learning_rate", "auto", "auto"),
        ("learning_rate", "1e-3", 1e-3),
        ("finetune_learning_rate", "AUTO", "auto"),
        ("epochs", "3", 3),
        ("dropout", "0.25", 0.25),
        ("weights", "None", "none"),
    ],
)
def test_a_setting_takes_in_python_what_its_flag_takes_as_text(name, given, expected):
    config = make_config("cifar10_cnn", **{name: given})
    assert getattr(getattr(config, field_section(name)), name) == expected


def test_a_path_is_taken_as_its_text(tmp_path):
    assert make_config("cifar10_cnn", data=tmp_path).data.data == str(tmp_path)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size="abc"), r"image_size is not what --image-size takes.*Received: image_size='abc'"),
        (dict(image_size=(32, 32, 3)), r"Received: image_size=\(32, 32, 3\)"),
        (dict(epochs=2.5), r"epochs must be a whole number. Received: epochs=2.5"),
        (dict(epochs="2.0"), r"epochs must be a whole number. Received: epochs='2.0'"),
        (dict(dropout="x"), r"dropout must be a number. Received: dropout='x'"),
        (dict(learning_rate="fast"), r"not what --learning-rate takes.*Received: learning_rate='fast'"),
        (
            dict(finetune_learning_rate="slow"),
            r"not what --finetune-learning-rate takes.*Received: finetune_learning_rate=",
        ),
        (dict(early_stopping="no"), r"early_stopping must be True or False. Received: early_stopping='no'"),
        (dict(augment="flip,blur"), r"augment must be one of .*Received: augment='blur'"),
    ],
)
def test_a_value_its_flag_would_refuse_is_a_config_error_naming_the_setting(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_config("cifar10_cnn", **overrides)


def test_the_former_no_cache_word_is_read_as_off_with_one_deprecation_line(caplog):
    # `cache` and `feature_cache` say "off" for no cache; a config.json or script saying "none" still runs.
    with caplog.at_level("WARNING"):
        config = make_config("cifar10_cnn", cache="none")
    assert config.data.cache == "off" == config_lib.NO_CACHE
    assert caplog.messages == ["`--cache none` is now `--cache off`; the old name goes in the next release."]
    assert config_lib.CACHE_POLICIES[-1] == config_lib.FEATURE_CACHE[-1] == "off"
