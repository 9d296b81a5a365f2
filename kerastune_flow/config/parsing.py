"""Setting values from text: what a flag (and `make_config`, given text) turns into a value.

Each parser raises ValueError with the form it expects; the command line shows it as argparse's
message, `config.coerce_setting` as a ConfigError naming the setting.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"  # a learning rate found by the range test (`lr_range`) right before its fit
NO_CACHE = "off"  # one word for "no cache" in `cache` and `feature_cache`
OLD_NO_CACHE = "none"  # `cache`'s former word for it, still read (a deprecation line says so)


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


def parse_cache(text: str) -> str:
    """ "auto", "memory" or "off"; the former "none" is read as "off", with a deprecation line."""
    if text.strip().lower() == OLD_NO_CACHE:
        log.warning("`--cache %s` is now `--cache %s`; the old name goes in the next release.", OLD_NO_CACHE, NO_CACHE)
        return NO_CACHE
    return text
