"""The command line's flags, generated from the config's fields: a setting's flag name, help,
choices and parser are written once, in `config.setting`, and read here. `coerce_settings` gives
Python's `make_config` the same parsers, so a setting takes in Python what its flag takes as text."""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kerastune_flow import config as config_lib
from kerastune_flow.config import SECTIONS
from kerastune_flow.errors import ConfigError

SECTION_TITLES = {"data": "data", "model": "model", "train": "training"}


def text_type(parse) -> Any:
    """An argparse type from a config parser: its ValueError becomes argparse's message."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def text_parser(field: dataclasses.Field) -> Callable[[str], Any]:
    """What a setting does with text (its flag's and make_config's): its own `parse`, else int or
    float by its annotation, else the text as it is."""
    if field.metadata["parse"] is not None:
        return field.metadata["parse"]
    first = str(field.type).split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def _value_type(field: dataclasses.Field) -> Any:
    """The argparse type of a field's flag."""
    parse = text_parser(field)
    return parse if parse in (int, float, str) else text_type(parse)


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
            reason = f"must be {wanted}" if parse in (int, float) else f"is not what {_flag_name(field)} takes: {error}"
            raise ConfigError(f"{name} {reason}. Received: {name}={given!r}") from None
    if value is None or field.metadata["parse"] is not None or wanted is None:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind == "int" else numbers.Real):
        raise ConfigError(f"{name} must be {wanted}. Received: {name}={given!r}")
    return int(value) if kind == "int" else float(value)


def coerce_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`coerce_setting` for each value by setting name; names that are no setting pass through
    (`config.from_values` refuses them)."""
    by_name = {f.name: f for f in config_lib.fields()}
    return {name: coerce_setting(by_name[name], v) if name in by_name else v for name, v in values.items()}


def _shown(default: Any) -> str:
    """A default as `--help` shows it."""
    if default is None or default == ():
        return "none"
    return ", ".join(str(item) for item in default) if isinstance(default, tuple) else str(default)


def _flag_name(field: dataclasses.Field) -> str:
    """The flag of a setting: its own, else `--name-with-dashes`, or `--no-name` for a boolean
    that is on by default."""
    if field.metadata["flag"]:
        return field.metadata["flag"]
    dashed = field.name.replace("_", "-")
    return f"--no-{dashed}" if field.default is True else f"--{dashed}"


def add_config_flags(parser: argparse.ArgumentParser, *, skip: Iterable[str] = ()) -> None:
    """Adds a flag for every config setting that has one (but those in `skip`), grouped by section.

    Every flag defaults to None, meaning "not given": the recipe's defaults apply.
    """
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(SECTION_TITLES[section])
        for f in dataclasses.fields(section_cls):
            meta = f.metadata
            if meta["flag"] is None or f.name in skip:
                continue
            shown = meta["shown"] or _shown(f.default)
            kwargs: dict[str, Any] = dict(dest=f.name, default=None)
            if meta["store"] is not None:
                kwargs.update(action="store_const", const=meta["store"])
                help_text = f"{meta['help']} (default: {shown})"
            elif isinstance(f.default, bool):
                kwargs["action"] = "store_false" if f.default else "store_true"
                help_text = f"no {meta['help']} (on by default)" if f.default else meta["help"]
            else:
                kwargs.update(type=_value_type(f), metavar=meta["metavar"])
                help_text = meta["help"]
                if meta["choices"] and isinstance(f.default, tuple):  # a list: the config checks its items
                    help_text += f": {', '.join(meta['choices'])}"
                elif meta["choices"]:  # argparse checks the value and shows the choices
                    kwargs["choices"] = meta["choices"]
                help_text += f" (default: {shown})"
                if meta["bare"] is not None:
                    kwargs.update(nargs="?", const=meta["bare"])
            group.add_argument(_flag_name(f), help=help_text, **kwargs)


def config_overrides(args: argparse.Namespace, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The config fields given on the command line (flags left out are None: not given)."""
    out = {}
    for f in config_lib.fields():
        if f.name in skip or f.metadata["flag"] is None:
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Appends "(default: X)" to the help of every flag of `parser` and of its sub-commands that
    takes a value and has a default its help does not already tell (config flags tell theirs)."""
    for action in parser._actions:  # argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
        elif action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            if action.help and action.help != argparse.SUPPRESS and "default" not in action.help:
                action.help += f" (default: {_shown(action.default)})"
