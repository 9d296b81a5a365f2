"""Frozen configuration for data, model and training, and the presets.

Each field is a setting, defined once here with its help text and choices: `validate` checks the
choices, and `run.py` generates the command line's flags from the same definitions (flag names
are the field names with dashes; a boolean that defaults to True gets a `--no-` flag). Field
names are unique across the three sections, so `make_config(recipe, **overrides)` (in
`recipes.py`, which adds each recipe's defaults) can route each override.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kerastune_flow.errors import ConfigError

AUGMENTATIONS = ("flip", "rotation", "zoom", "crop")
OPTIMIZER_NAMES = ("adam", "sgd", "rmsprop", "adagrad")
INITIALIZER_NAMES = ("glorot_uniform", "he_normal", "he_uniform", "glorot_normal")
STRATEGY_NAMES = ("auto", "cpu", "gpu", "mirrored", "tpu", "multiworker")
BACKBONE_NAMES = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
CACHE_POLICIES = ("auto", "memory", "none")
POOLINGS = ("auto", "flatten", "avg")
LR_SCHEDULES = ("constant", "cosine")
FEATURE_CACHE = ("auto", "memory", "disk", "off")
MIXED_PRECISION = ("off", "auto", "bfloat16", "float16")
JIT_COMPILE = ("auto", "true", "false")
AUTO = "auto"  # a learning rate found by the range test (`lr_range`) right before its fit


# --------------------------------------------------------------------------- parsing flag text


def parse_image_size(text: str) -> tuple[int, int]:
    """ "32" or "150x150" (also "150,150") -> (height, width).

    Raises:
        ValueError: for anything else.
    """
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise ValueError(f"expected N or HxW, such as 32 or 150x150, not {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"expected N or HxW with positive sizes, not {text!r}")
    return (parts[0], parts[1])


def parse_names(text: str) -> tuple[str, ...]:
    """ "flip, crop" -> ("flip", "crop")."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_fractions(text: str) -> tuple[float, ...]:
    """ "0.1,0.3,1" -> (0.1, 0.3, 1.0).

    Raises:
        ValueError: when a part is not a number.
    """
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"expected fractions such as 0.1,0.3,1.0, not {text!r}") from None


def parse_weights(text: str) -> str:
    """ "imagenet", "none" (any case), or a path kept as typed."""
    return text.lower() if text.lower() in ("none", "imagenet") else text


def parse_rate(text: str) -> float | str:
    """ "1e-3" -> 0.001; "auto" (any case) -> "auto": found by a range test before the fit.

    Raises:
        ValueError: for anything else.
    """
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a rate such as 1e-3, or auto, not {text!r}") from None


def is_rate(value: Any) -> bool:
    """True for a positive number or "auto" (what a learning-rate setting accepts)."""
    if value == AUTO:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# --------------------------------------------------------------------------- settings


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = "",
    store: Any = None,
    bare: Any = None,
    shown: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with what the command line needs to know about it.

    Args:
        default: the field's default.
        help: one phrase for `--help`; the default is appended.
        choices: the accepted values (for a tuple field, of each item).
        parse: turns the flag's text into the value (int/float/str come from the type).
        flag: the flag's name; "" derives it from the field name; None: no flag.
        store: the flag takes no value and stores this (store_const).
        bare: the value of the flag given without a value (`--mixed-precision` alone).
        shown: the default as `--help` shows it, when the recipe decides it.
        metavar: what `--help` shows for the flag's value.
    """
    metadata = dict(
        help=help, choices=choices, parse=parse, flag=flag, store=store, bare=bare, shown=shown, metavar=metavar
    )
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is fed."""

    data: str = setting(
        "digits",
        "a tfds image-classification set (mnist, cifar10, tf_flowers, ...), a .csv/.tsv file of image paths "
        "and labels, or an image folder: class folders directly, or train/ (and valid/ or val/, test/) with a "
        "folder per class; digits is the sample shipped in the package (a path of that name wins)",
        shown="digits, the handwritten digits shipped in the package",
    )
    csv_columns: tuple[str, ...] = setting(
        (),
        "a --data CSV/TSV file's columns of image path, label and (optional) split (train, valid or test)",
        parse=parse_names,
        shown="found by name: path/file/filename/image..., label/class/category..., split/set/subset/is_valid",
        metavar="PATH,LABEL[,SPLIT]",
    )
    image_size: tuple[int, int] | None = setting(
        None, "N or HxW to resize to", parse=parse_image_size, shown="the recipe's: 28, 32 or 150", metavar="N|HxW"
    )
    batch_size: int = setting(64, "per replica; the global batch is this x replicas", shown="the recipe's: 64 or 32")
    validation_fraction: float = setting(
        0.1,
        "share of train held out for validation when the data has no validation split of its own (a valid/ "
        "folder is used by every recipe); early stopping and the best model watch it",
        shown="the recipe's: 0 from scratch, as their references; 0.1 for transfer",
    )
    test_fraction: float = setting(0.1, "share held out for test when the data has no test split")
    augment: tuple[str, ...] = setting(
        (), "comma list of random augmentations", choices=AUGMENTATIONS, parse=parse_names, metavar="NAME,..."
    )
    data_dir: str | None = setting(
        None,
        "tfds's data directory, where tfds data sets are prepared and read",
        shown="tfds's own: ~/tensorflow_datasets",
    )
    manual_dir: str | None = setting(None, "folder with the original tfds archives: prepare without a download")
    max_examples: int | None = setting(None, "use at most N examples of each split (quick tries)", shown="all")
    train_fraction: float = setting(1.0, "share of the training split to use (data-size sweeps)")
    cache: str = setting("auto", "keep decoded images in memory (auto: if they fit)", choices=CACHE_POLICIES)
    skip_bad_images: bool = setting(
        False, "leave out image files that cannot be decoded, with a warning naming each", shown="refuse the folder"
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which recipe and with which knobs."""

    recipe: str = setting("cifar10_cnn", "the recipe (see `list`)", flag=None)
    weights: str | None = setting(
        "imagenet",
        "transfer recipes: imagenet, none, or a local weights file",
        parse=parse_weights,
        metavar="imagenet|none|PATH",
    )
    initializer: str = setting("glorot_uniform", "kernel initializer", choices=INITIALIZER_NAMES)
    dropout: float = setting(0.0, "dropout rate in the dense part")
    l1: float = setting(0.0, "L1 weight penalty")
    l2: float = setting(0.0, "L2 weight penalty")
    optimizer: str = setting("adam", "optimizer (sgd has momentum 0.9)", choices=OPTIMIZER_NAMES)
    learning_rate: float | str = setting(
        1e-3,
        "learning rate (the head's, for a fine-tune); auto: a range test finds it first (see find-lr)",
        parse=parse_rate,
        metavar="RATE|auto",
    )
    lr_schedule: str = setting("constant", "cosine: decay to 0 over each fit's epochs", choices=LR_SCHEDULES)
    dense_units: int = setting(256, "width of the transfer head's hidden layer")
    backbone: str = setting("vgg16", "transfer recipes: the pre-trained base", choices=BACKBONE_NAMES)
    base: str | None = setting(
        None, "your own pre-trained model as the base: a .keras file or a run directory (e.g. of cifar10_cnn)"
    )
    base_output: str | None = setting(None, "the layer of --base to cut at", shown="the one before its head")
    pooling: str = setting("auto", "after the base (auto: the backbone's)", choices=POOLINGS)
    unfreeze_at: int | float | str | None = setting(
        None,
        "stage 2 unfreezes the base from here: a layer index, a layer name, or a fraction of the base "
        "(snapped to the start of a block)",
        parse=str,
        shown="the last block, block5_conv1 = 15 for VGG16",
        metavar="INDEX|NAME|FRACTION",
    )
    finetune_learning_rate: float | str = setting(
        1e-5,
        "stage 2 learning rate; auto: a range test on the unfrozen model finds it after stage 1",
        flag="--finetune-lr",
        parse=parse_rate,
        metavar="RATE|auto",
    )
    progressive: str | None = setting(
        None,
        "stage 2 in steps EPOCH:UNFREEZE_AT:LR,... counted from its start, "
        "e.g. 0:block5_conv1:1e-5,3:block4_conv1:5e-6",
    )
    base_lr_multiplier: float | None = setting(
        None, "discriminative rates: the base trains at finetune-lr x this (e.g. 0.1), the head at finetune-lr"
    )
    feature_cache: str = setting(
        "auto",
        "when nothing random touches the images, compute the frozen base's features (stage 1) and the "
        "frozen layers' output (stage 2) once: auto keeps them in memory while they fit in a quarter of it, "
        "else in a memory-mapped file in the run directory; memory, disk: there; off: the full forward "
        "pass every epoch",
        choices=FEATURE_CACHE,
    )
    unsafe_deserialization: bool = setting(
        False, "load a .keras model holding Lambda layers: their Python code runs, so only for files you trust"
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long, where, and what the run directory records."""

    epochs: int = setting(10, "epochs (stage 2 epochs for a fine-tune)")
    head_epochs: int = setting(5, "stage 1 epochs of a fine-tune: the head on the frozen base")
    strategy: str = setting("auto", "tf.distribute strategy", choices=STRATEGY_NAMES)
    seed: int | None = setting(
        None,
        "seed for weights, splits, data order, augmentation and dropout",
        shown="a new one, recorded in config.json and results.json",
    )
    deterministic: bool = setting(
        False,
        "TensorFlow's op determinism (tf.config.experimental.enable_op_determinism): the same result on a GPU "
        "too, at some speed; the CPU is deterministic without it",
    )
    early_stopping: bool = setting(True, "early stopping when the monitored metric stops improving")
    patience: int | None = setting(
        None, "early stopping patience in epochs", shown="half of each fit's epochs, at least 3"
    )
    monitor: str = setting("val_loss", "metric for early stopping and the best model")
    steps_per_execution: int | None = setting(
        None, "training steps per graph call", shown="32 on TPU, 16 on one CPU device, 1 on GPU"
    )
    mixed_precision: str = setting(
        "auto",
        "mixed precision (output layers stay float32); auto: bfloat16 on TPU and on CPUs with native "
        "bfloat16 (avx512_bf16, amx_bf16, Arm bf16), float16 on GPU, float32 on other CPUs",
        choices=MIXED_PRECISION,
        bare="auto",
        shown="auto; off for scratch_mlp, which bfloat16 slows down",
    )
    jit_compile: str = setting(
        "auto",
        "XLA: auto (on for TPU and one GPU; on the CPU for scratch_mlp only, measured faster there; off "
        "for several replicas, which XLA cannot compile), true or false",
        choices=JIT_COMPILE,
    )
    tensorboard: bool = setting(True, "TensorBoard event files under tensorboard/")
    csv_log: bool = setting(True, "history.csv")
    jsonl_log: bool = setting(True, "history.jsonl")
    checkpoint: bool = setting(True, "model.keras, the best model so far")
    backup: bool = setting(True, "the resume state under backup/")
    terminate_on_nan: bool = setting(True, "stop at a NaN or infinite loss (the NaN guard)")
    verbose: str | int = setting("auto", "Keras fit verbosity: auto, 0, 1 or 2", flag=None)


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
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Builds a Config from `to_dict()` output (lists become tuples again)."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            raw = dict(values.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            raw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
            sections[name] = section_cls(**raw)
        return cls(**sections)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed, by field name whatever their section."""
        routed: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, value in changes.items():
            routed[field_section(name)][name] = value
        return dataclasses.replace(
            self, **{s: dataclasses.replace(getattr(self, s), **v) for s, v in routed.items() if v}
        )


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

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
        seed=0,
        validation_fraction=0.1,  # validation curves and early stopping on them, whatever the recipe
        # A smoke run's few steps never pay back XLA's compile time (tests/test_tune.py and
        # test_cli.py: 177 s with XLA on for the MLP, 124 s without, issue 19)
        jit_compile="false",
    ),
}


def fields() -> Iterator[dataclasses.Field]:
    """Every setting of every section, in order."""
    for section_cls in SECTIONS.values():
        yield from dataclasses.fields(section_cls)


def field_section(name: str) -> str:
    """Returns the section ("data", "model" or "train") that owns a field name.

    Raises:
        ConfigError: when no section has that field.
    """
    for section, section_cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(section_cls)}:
            return section
    raise ConfigError(f"Unknown setting {name!r}. Received: {name}=...")


def new_seed() -> int:
    """A seed for a run that was given none (recorded, so the run can be replayed)."""
    return secrets.randbelow(2**31)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a run's config.json, or in any JSON of the same shape
    ({"data": {...}, "model": {...}, "train": {...}}), as field values by name.

    Raises:
        ConfigError: when the file is missing, is not JSON, or names a setting that does not exist.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"Config file {path} does not exist; pass a run's config.json. Received: config={path}"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Config file {path} is not readable JSON ({' '.join(str(error).split())[:80]}); pass a run's "
            f"config.json. Received: config={path}"
        ) from None
    sections = raw.get("config", raw) if isinstance(raw, dict) else None
    if not isinstance(sections, dict) or not set(sections) <= set(SECTIONS) or not sections:
        raise ConfigError(
            f"Config file {path} holds no settings: it needs data, model and train sections, as a run's config.json "
            f"does. Received: keys={sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
        )
    values: dict[str, Any] = {}
    for name, section in sections.items():
        for key, value in dict(section).items():
            if field_section(key) != name:
                raise ConfigError(
                    f"Config file {path} puts {key!r} under {name!r}; it belongs in {field_section(key)!r}."
                )
            values[key] = tuple(value) if isinstance(value, list) else value
    return values


def field_help(name: str) -> str:
    """The help text of a setting, for commands that take it outside the config (`evaluate`)."""
    return next(f for f in fields() if f.name == name).metadata["help"]


def from_values(values: dict[str, Any]) -> Config:
    """A validated Config from field values by name; fields left out keep their defaults.

    Raises:
        ConfigError: for an unknown field or an invalid value.
    """
    return validate(Config().replace(**values))


def validate(config: Config) -> Config:
    """Checks each value against its field's choices and the ranges no type can express.

    Returns:
        The config, unchanged.

    Raises:
        ConfigError: naming the first invalid setting and the accepted range.
    """
    for section in (config.data, config.model, config.train):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if value is None and "None" not in str(f.type):
                raise ConfigError(f"{f.name} needs a value; leave it out to keep the default. Received: {f.name}=None")
            choices = f.metadata["choices"]
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if choices and value is not None and item not in choices:
                    raise ConfigError(f"{f.name} must be one of {', '.join(choices)}. Received: {f.name}={item!r}")
    d, m, t = config.data, config.model, config.train
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
        (is_rate(m.learning_rate), "learning_rate must be positive, or auto", m.learning_rate),
        (
            is_rate(m.finetune_learning_rate),
            "finetune_learning_rate must be positive, or auto",
            m.finetune_learning_rate,
        ),
        (
            not (m.finetune_learning_rate == AUTO and m.progressive),
            "finetune_learning_rate auto finds one rate for stage 2; --progressive gives each step its own",
            m.progressive,
        ),
        (0 <= m.dropout < 1, "dropout must be in [0, 1)", m.dropout),
        (m.l1 >= 0 and m.l2 >= 0, "l1 and l2 must not be negative", (m.l1, m.l2)),
        (m.dense_units >= 1, "dense_units must be at least 1", m.dense_units),
        (
            m.base_lr_multiplier is None or m.base_lr_multiplier > 0,
            "base_lr_multiplier must be positive",
            m.base_lr_multiplier,
        ),
        (m.base_output is None or m.base, "base_output needs base (the model to cut)", m.base_output),
        (t.epochs >= 1, "epochs must be at least 1", t.epochs),
        (t.head_epochs >= 1, "head_epochs must be at least 1", t.head_epochs),
        (t.patience is None or t.patience >= 0, "patience must not be negative", t.patience),
        (
            t.steps_per_execution is None or t.steps_per_execution >= 1,
            "steps_per_execution must be at least 1",
            t.steps_per_execution,
        ),
    ]
    for ok, message, received in checks:
        if not ok:
            raise ConfigError(f"{message}. Received: {received!r}")
    size = d.image_size
    if size is not None and (not isinstance(size, tuple) or len(size) != 2 or min(size) < 1):
        raise ConfigError(f"image_size must be two positive integers. Received: image_size={size!r}")
    return config
