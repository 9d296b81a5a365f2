"""The command line's flags, generated from the config's fields: a setting's flag name, help,
choices and parser are written once, in `config.setting`, and read here."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from kerastune_flow import config as config_lib
from kerastune_flow.config import SECTIONS

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


def _value_type(field: dataclasses.Field) -> Any:
    """The parser of a field's flag: its own `parse`, else int or float by its annotation."""
    if field.metadata["parse"] is not None:
        return text_type(field.metadata["parse"])
    first = str(field.type).split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def _shown(default: Any) -> str:
    """A default as `--help` shows it."""
    if default is None or default == ():
        return "none"
    return ", ".join(default) if isinstance(default, tuple) else str(default)


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
