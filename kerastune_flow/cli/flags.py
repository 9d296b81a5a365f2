"""The config flags of `train`, `find-lr`, `compare` and `tune`, generated from the config's
fields: a setting's flag name, help, choices and parser are written once, in `config.setting`,
and read here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any

from kerastune_flow import config as config_lib
from kerastune_flow.config import SECTIONS, flag_name, text_parser

log = logging.getLogger(__name__)

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
    """The argparse type of a field's flag."""
    parse = text_parser(field)
    return parse if parse in (int, float, str) else text_type(parse)


def _shown(default: Any) -> str:
    """A default as `--help` shows it."""
    if default is None or default == ():
        return "none"
    return ", ".join(str(item) for item in default) if isinstance(default, tuple) else str(default)


class OldFlag(argparse.Action):
    """A flag's former name: stores as the flag does, hidden from `--help`, with a deprecation line."""

    def __init__(self, *args: Any, new_flag: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        log.warning("`%s` is now `%s`; the old name goes in the next release.", option_string, self.new_flag)
        setattr(namespace, self.dest, values)


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
            group.add_argument(flag_name(f), help=help_text, **kwargs)
            if meta["old_flag"]:  # the flag's former name: still read, not shown
                hidden = dict(kwargs, action=OldFlag, new_flag=flag_name(f), help=argparse.SUPPRESS)
                group.add_argument(meta["old_flag"], **hidden)


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
