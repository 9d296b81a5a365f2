"""The settings: frozen dataclasses, one field per setting, each with its flag's name, help and
choices (`setting`), in three sections (data, model, train) whose field names are unique."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from kerastune_flow.config.parsing import (
    NO_CACHE,
    parse_cache,
    parse_image_size,
    parse_names,
    parse_rate,
    parse_weights,
)
from kerastune_flow.errors import ConfigError

AUGMENTATIONS = ("flip", "rotation", "zoom", "crop")
OPTIMIZER_NAMES = ("adam", "sgd", "rmsprop", "adagrad")
INITIALIZER_NAMES = ("glorot_uniform", "he_normal", "he_uniform", "glorot_normal")
STRATEGY_NAMES = ("auto", "cpu", "gpu", "mirrored", "tpu", "multiworker")
BACKBONE_NAMES = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
HUB_PREFIX = "hub:"  # --backbone hub:NAME: a KerasHub preset by name (models/hub.py)
CACHE_POLICIES = ("auto", "memory", NO_CACHE)
POOLINGS = ("auto", "flatten", "avg")
LR_SCHEDULES = ("constant", "cosine")
FEATURE_CACHE = ("auto", "memory", "disk", NO_CACHE)
MIXED_PRECISION = ("off", "auto", "bfloat16", "float16")
JIT_COMPILE = ("auto", "true", "false")
TRACKERS = ("off", "mlflow")
# Where a run is recorded, not what it is: left out of a tracked run's parameters, and of the
# settings an unfinished run or search must share with the command that takes it up.
TRACKING_FIELDS = ("track", "tracking_uri")


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
    old_flag: str | None = None,
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
        old_flag: the flag's former name (a flag taking a value): still read, hidden from `--help`,
            with a deprecation line.
    """
    metadata = dict(
        help=help,
        choices=choices,
        parse=parse,
        flag=flag,
        store=store,
        bare=bare,
        shown=shown,
        metavar=metavar,
        old_flag=old_flag,
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
    cache: str = setting(
        "auto",
        "keep decoded images in memory (auto: if they fit in a quarter of the memory available)",
        choices=CACHE_POLICIES,
        parse=parse_cache,
    )
    skip_bad_images: bool = setting(
        False, "leave out image files that cannot be decoded, with a warning naming each", shown="refuse the folder"
    )
    folds: int | None = setting(
        None,
        "cross-validation: the training and validation splits merged and cut into K stratified folds, one held "
        "out for validation (--fold); tune scores each trial by the mean over its K runs",
        shown="tune: 5 under 10,000 training and validation images, else 1; train: 1 (one hold-out)",
        metavar="K",
    )
    fold: int = setting(0, "with --folds K, the fold held out for validation: 0 to K-1", metavar="k")


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
    backbone: str = setting(
        "vgg16",
        f"transfer recipes: the pre-trained base: {', '.join(BACKBONE_NAMES)}, a KerasHub preset "
        f"({HUB_PREFIX}NAME) or a local KerasHub preset folder",
        metavar="NAME|DIR",
    )
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
        parse=parse_rate,
        old_flag="--finetune-lr",
        metavar="RATE|auto",
    )
    progressive: str | None = setting(
        None,
        "stage 2 in steps EPOCH:UNFREEZE_AT:LR,... counted from its start, "
        "e.g. 0:block5_conv1:1e-5,3:block4_conv1:5e-6",
    )
    base_lr_multiplier: float | None = setting(
        None,
        "discriminative rates: the base trains at finetune-learning-rate x this (e.g. 0.1), the head at "
        "finetune-learning-rate",
    )
    feature_cache: str = setting(
        "auto",
        "compute the frozen base's features (stage 1) and the frozen layers' output (stage 2) once (with "
        "--augment, of --augment-views views of each image): auto keeps them in memory while they fit in a "
        "quarter of it, else in a memory-mapped file in the run directory; memory, disk: there; off: the full "
        "forward pass every epoch",
        choices=FEATURE_CACHE,
    )
    augment_views: int = setting(
        4,
        "with --augment on a transfer recipe: K augmented views of each training image pass through the frozen "
        "layers once, and each epoch trains on one of them per image; 0: the full forward pass every epoch",
        metavar="K",
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
    track: str = setting(
        "off",
        "experiment tracking: mlflow records the run (config as parameters, per-epoch metrics, results, curves, "
        "model) in an MLflow run; tune and compare add a parent run (needs pip install 'kerastune_flow[track]')",
        choices=TRACKERS,
    )
    tracking_uri: str | None = setting(
        None,
        "with --track mlflow, the MLflow tracking store: sqlite:///FILE.db, or an MLflow server's http://HOST:PORT",
        shown="MLFLOW_TRACKING_URI, else MLflow's default, sqlite:///mlflow.db in the current folder",
        metavar="URI",
    )


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


def field_help(name: str) -> str:
    """The help text of a setting, for commands that take it outside the config (`evaluate`)."""
    return next(f for f in fields() if f.name == name).metadata["help"]


def flag_name(field: dataclasses.Field) -> str:
    """The flag of a setting: its own, else `--name-with-dashes`, or `--no-name` for a boolean
    that is on by default."""
    if field.metadata["flag"]:
        return field.metadata["flag"]
    dashed = field.name.replace("_", "-")
    return f"--no-{dashed}" if field.default is True else f"--{dashed}"
