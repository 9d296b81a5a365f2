"""Frozen configuration for data, model and training, with per-recipe defaults and presets.

Every CLI flag of `train` maps one to one onto a field here; the field names are unique across
the three sections so that `make_config(recipe, **overrides)` can route each override.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kerastune_flow.errors import ConfigError

RECIPES = {
    "scratch_mlp": "MLP from scratch (Flatten-Dense128-Dense64-Dense10, ReLU, Adam 1e-3), MNIST.",
    "cifar10_cnn": "Small CNN trained fully (Conv32-Pool-Conv64-Pool-Conv64-Dense64), CIFAR-10.",
    "vgg16_features": "VGG16 as a frozen feature extractor with a new Dense256 head.",
    "vgg16_finetune": "Staged fine-tune: head on the frozen VGG16, then block5 unfrozen at a low rate.",
}

AUGMENTATIONS = ("flip", "rotation", "zoom", "crop")
OPTIMIZER_NAMES = ("adam", "sgd", "rmsprop", "adagrad")
INITIALIZER_NAMES = ("glorot_uniform", "he_normal", "he_uniform", "glorot_normal")
STRATEGY_NAMES = ("auto", "cpu", "gpu", "mirrored", "tpu", "multiworker")
BACKBONE_NAMES = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
CACHE_POLICIES = ("auto", "memory", "none")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is fed.

    Attributes are documented by the CLI flag of the same name (`run train --help`).
    """

    data: str = "data/digits"
    image_size: tuple[int, int] | None = None  # None: the recipe's own size
    batch_size: int = 64  # per replica; the pipeline batches at the global size
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    augment: tuple[str, ...] = ()
    data_dir: str | None = None  # tfds data directory
    manual_dir: str | None = None  # local archives for tfds, no download
    max_examples: int | None = None  # cap on each split, for smoke runs
    train_fraction: float = 1.0  # share of the training split to use (data-size sweeps)
    cache: str = "auto"
    skip_bad_images: bool = False  # leave out files that cannot be decoded (warning), instead of refusing


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which recipe and with which knobs."""

    recipe: str = "cifar10_cnn"
    weights: str | None = "imagenet"  # VGG16 recipes only: "imagenet", None, or a file path
    initializer: str = "glorot_uniform"
    dropout: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # constant, or cosine: decay to 0 over each fit's epochs
    dense_units: int = 256  # width of the transfer head's hidden layer
    backbone: str = "vgg16"  # transfer recipes: vgg16, resnet50, mobilenetv2, efficientnetb0
    base: str | None = None  # the user's own pre-trained .keras model (or run dir) as the base
    base_output: str | None = None  # the layer of `base` to cut at
    pooling: str = "auto"  # flatten | avg | auto (the backbone's)
    unfreeze_at: int | str | None = None  # index, layer name or fraction; None: the backbone's last block
    finetune_learning_rate: float = 1e-5
    progressive: str | None = None  # "EPOCH:UNFREEZE_AT:LR,..." steps of stage two
    base_lr_multiplier: float | None = None  # discriminative rates: base lr = finetune lr x this
    feature_cache: str = "auto"  # auto: cache the frozen base's features when nothing is random; off
    unsafe_deserialization: bool = False  # load a `base` holding Lambda layers (their code runs on loading)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long, where, and what the run directory records."""

    epochs: int = 10
    head_epochs: int = 5  # stage 1 of vgg16_finetune
    strategy: str = "auto"
    seed: int = 0
    early_stopping: bool = True
    patience: int = 3
    monitor: str = "val_loss"
    steps_per_execution: int | None = None  # None: the device's default (32 on TPU, 16 on CPU, 1 on GPU)
    mixed_precision: str = "off"  # off | auto (bfloat16 on TPU, float16 on GPU) | bfloat16 | float16
    jit_compile: str = "auto"  # "auto" chooses per device, see strategy.default_jit_compile
    tensorboard: bool = True
    csv_log: bool = True
    jsonl_log: bool = True
    checkpoint: bool = True
    backup: bool = True
    terminate_on_nan: bool = True
    verbose: str | int = "auto"  # Keras fit verbosity: "auto", 0, 1 or 2


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: data, model and training settings."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Builds a Config from `to_dict()` output (lists become tuples again)."""
        sections = {}
        for name, section_cls in _SECTIONS.items():
            raw = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            raw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
            sections[name] = section_cls(**raw)
        return cls(**sections)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
# Fields whose type does not admit None: None is not a value for them.
_REQUIRED = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if "None" not in str(f.type)) for cls in _SECTIONS.values()
}

# Defaults taken from the reference examples of each recipe.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "scratch_mlp": dict(image_size=(28, 28), batch_size=64, learning_rate=1e-3, epochs=10),
    "cifar10_cnn": dict(image_size=(32, 32), batch_size=64, learning_rate=1e-3, epochs=10),
    "vgg16_features": dict(image_size=(150, 150), batch_size=32, learning_rate=1e-3, epochs=10),
    "vgg16_finetune": dict(
        image_size=(150, 150),
        batch_size=32,
        learning_rate=1e-3,
        head_epochs=5,
        epochs=10,
        finetune_learning_rate=1e-5,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    # A few seconds on a laptop CPU: tiny images, few examples, no downloads.
    "smoke": dict(
        image_size=(32, 32),
        batch_size=8,
        max_examples=64,
        epochs=2,
        head_epochs=1,
        weights=None,
        tensorboard=False,
    ),
}


def field_section(name: str) -> str:
    """Returns the section ("data", "model" or "train") that owns a field name.

    Raises:
        ConfigError: when no section has that field.
    """
    for section, section_cls in _SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(section_cls)}:
            return section
    raise ConfigError(f"Unknown setting {name!r}. Received: {name}=...")


def make_config(recipe: str, preset: str = "reference", **overrides: Any) -> Config:
    """Builds the Config of a recipe: recipe defaults, then a preset, then overrides.

    Args:
        recipe: one of `RECIPES`.
        preset: one of `PRESETS`; "smoke" is a tiny offline run for tests and first tries.
        **overrides: any field of DataConfig, ModelConfig or TrainConfig, taken as given
            (`weights=None` means random weights; leave a field out to keep its default).

    Returns:
        A validated, frozen Config.

    Raises:
        ConfigError: for an unknown recipe, preset, field or an invalid value.
    """
    if recipe not in RECIPES:
        raise ConfigError(
            f"Unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}. Received: recipe={recipe}"
        )
    if preset not in PRESETS:
        raise ConfigError(
            f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}. Received: preset={preset}"
        )
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    layered = {"recipe": recipe, **RECIPE_DEFAULTS[recipe], **PRESETS[preset]}
    layered.update(overrides)
    for name, value in layered.items():
        values[field_section(name)][name] = value
    config = Config(**{name: _SECTIONS[name](**vals) for name, vals in values.items()})
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks values that no type can express.

    Raises:
        ConfigError: naming the first invalid setting and the accepted range.
    """
    d, m, t = config.data, config.model, config.train
    required = [(name, getattr(section, name)) for section in (d, m, t) for name in _REQUIRED[type(section)]]
    for name, value in required:
        if value is None:
            raise ConfigError(f"{name} needs a value; leave it out to keep the default. Received: {name}=None")
    checks = [
        (d.batch_size >= 1, "batch_size must be at least 1", d.batch_size),
        (0 <= d.validation_fraction < 1, "validation_fraction must be in [0, 1)", d.validation_fraction),
        (0 <= d.test_fraction < 1, "test_fraction must be in [0, 1)", d.test_fraction),
        (
            d.validation_fraction + d.test_fraction < 1,
            "validation_fraction + test_fraction must leave some training data",
            d.validation_fraction + d.test_fraction,
        ),
        (d.max_examples is None or d.max_examples >= 1, "max_examples must be at least 1", d.max_examples),
        (0 < d.train_fraction <= 1, "train_fraction must be in (0, 1]", d.train_fraction),
        (d.cache in CACHE_POLICIES, f"cache must be one of {', '.join(CACHE_POLICIES)}", d.cache),
        (m.learning_rate > 0, "learning_rate must be positive", m.learning_rate),
        (m.finetune_learning_rate > 0, "finetune_learning_rate must be positive", m.finetune_learning_rate),
        (0 <= m.dropout < 1, "dropout must be in [0, 1)", m.dropout),
        (m.l1 >= 0 and m.l2 >= 0, "l1 and l2 must not be negative", (m.l1, m.l2)),
        (m.optimizer in OPTIMIZER_NAMES, f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}", m.optimizer),
        (
            m.initializer in INITIALIZER_NAMES,
            f"initializer must be one of {', '.join(INITIALIZER_NAMES)}",
            m.initializer,
        ),
        (m.dense_units >= 1, "dense_units must be at least 1", m.dense_units),
        (m.backbone in BACKBONE_NAMES, f"backbone must be one of {', '.join(BACKBONE_NAMES)}", m.backbone),
        (m.pooling in ("auto", "flatten", "avg"), "pooling must be auto, flatten or avg", m.pooling),
        (m.feature_cache in ("auto", "off"), "feature_cache must be auto or off", m.feature_cache),
        (m.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant or cosine", m.lr_schedule),
        (
            m.base_lr_multiplier is None or m.base_lr_multiplier > 0,
            "base_lr_multiplier must be positive",
            m.base_lr_multiplier,
        ),
        (m.base_output is None or m.base, "base_output needs base (the model to cut)", m.base_output),
        (t.epochs >= 1, "epochs must be at least 1", t.epochs),
        (t.head_epochs >= 1, "head_epochs must be at least 1", t.head_epochs),
        (t.patience >= 0, "patience must not be negative", t.patience),
        (
            t.steps_per_execution is None or t.steps_per_execution >= 1,
            "steps_per_execution must be at least 1",
            t.steps_per_execution,
        ),
        (
            t.mixed_precision in ("off", "auto", "bfloat16", "float16"),
            "mixed_precision must be off, auto, bfloat16 or float16",
            t.mixed_precision,
        ),
        (t.strategy in STRATEGY_NAMES, f"strategy must be one of {', '.join(STRATEGY_NAMES)}", t.strategy),
    ]
    for ok, message, received in checks:
        if not ok:
            raise ConfigError(f"{message}. Received: {received!r}")
    for name in d.augment:
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"Unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}. Received: augment={name}"
            )
    if d.image_size is not None and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise ConfigError(f"image_size must be two positive integers. Received: {d.image_size!r}")
