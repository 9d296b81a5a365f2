"""Settings given as values: from Python or text (`coerce_settings`), from a config file
(`load_config_file`), and checked as a whole (`validate`)."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kerastune_flow.config.parsing import AUTO, is_rate
from kerastune_flow.config.settings import (
    BACKBONE_NAMES,
    HUB_PREFIX,
    SECTIONS,
    Config,
    field_section,
    fields,
    flag_name,
)
from kerastune_flow.errors import ConfigError


def text_parser(field: dataclasses.Field) -> Callable[[str], Any]:
    """What a setting does with text (its flag's and make_config's): its own `parse`, else int or
    float by its annotation, else the text as it is."""
    if field.metadata["parse"] is not None:
        return field.metadata["parse"]
    first = str(field.type).split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def coerce_setting(field: dataclasses.Field, value: Any) -> Any:
    """A setting's value given in Python, taken as its flag takes the same text.

    Text (and a path) goes through the flag's parser: `image_size="150x150"`, `learning_rate="1e-3"`,
    `augment="flip,crop"`. A list or tuple for a list setting is read as its comma-joined text, and a
    number as its text (`image_size=32` or `(32, 32)`, `augment=["flip"]`). Other values keep their
    type when it is the setting's (an int for an int setting, any number for a float one); None is
    left to `config.validate`, which knows where it means something.

    Raises:
        ConfigError: naming the setting, when the flag would refuse the value.
    """
    name, parse, given = field.name, text_parser(field), value
    kind = str(field.type).split("|")[0].strip()
    wanted = {"int": "a whole number", "float": "a number"}.get(kind)
    if isinstance(field.default, bool):  # a switch: its flag takes no text
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be True or False. Received: {name}={given!r}")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind.startswith("tuple") and isinstance(value, (list, tuple, numbers.Number)) and not isinstance(value, bool):
        value = ",".join(str(item) for item in value) if isinstance(value, (list, tuple)) else str(value)
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError as error:
            reason = f"must be {wanted}" if parse in (int, float) else f"is not what {flag_name(field)} takes: {error}"
            raise ConfigError(f"{name} {reason}. Received: {name}={given!r}") from None
    if value is None or field.metadata["parse"] is not None or wanted is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind == "int" else numbers.Real):
        raise ConfigError(f"{name} must be {wanted}. Received: {name}={given!r}")
    return int(value) if kind == "int" else float(value)


def coerce_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`coerce_setting` for each value by setting name; names that are no setting pass through
    (`config.from_values` refuses them)."""
    by_name = {f.name: f for f in fields()}
    return {name: coerce_setting(by_name[name], v) if name in by_name else v for name, v in values.items()}


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
        (d.folds is None or d.folds >= 1, "folds must be at least 1 (1: one hold-out)", d.folds),
        (0 <= d.fold < (d.folds or 1), f"fold must be 0 to {(d.folds or 1) - 1} with folds {d.folds or 1}", d.fold),
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
    check_backbone(m.backbone)
    if m.augment_views < 0:
        raise ConfigError(
            f"augment_views must be 0 (the full forward pass) or more. Received: augment_views={m.augment_views!r}"
        )
    size = d.image_size
    if size is not None and (not isinstance(size, tuple) or len(size) != 2 or min(size) < 1):
        raise ConfigError(f"image_size must be two positive integers. Received: image_size={size!r}")
    return config


def check_backbone(backbone: str) -> None:
    """Checks the form of `backbone`: a `keras.applications` name, a KerasHub preset name after
    `HUB_PREFIX`, or a path (a local KerasHub preset folder, read when the model is built, so
    that a run's config stays valid where the folder is not).

    Raises:
        ConfigError: for a bare word that is none of them, naming what is accepted.
    """
    if backbone in BACKBONE_NAMES or (backbone.startswith(HUB_PREFIX) and len(backbone) > len(HUB_PREFIX)):
        return
    if backbone.startswith((".", "~")) or os.sep in backbone or "/" in backbone or os.path.isdir(backbone):
        return
    raise ConfigError(
        f"backbone must be one of {', '.join(BACKBONE_NAMES)}, a KerasHub preset as {HUB_PREFIX}NAME, or the path "
        f"of a KerasHub preset folder. Received: backbone={backbone!r}"
    )
