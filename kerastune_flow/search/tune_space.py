"""What `tune` searches: the knobs the articles name, each recipe's default space, and the
KerasTuner HyperModel that declares them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import keras_tuner as kt

from kerastune_flow import models
from kerastune_flow.config import AUGMENTATIONS, Config
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import Recipe, get_recipe
from kerastune_flow.training.train import load_base

log = logging.getLogger(__name__)

UNFREEZE_CHOICES = 3  # the last block starts of the base: how deep stage 2 may reach


@dataclasses.dataclass(frozen=True)
class Knob:
    """One thing `tune` can search.

    Attributes:
        name: as `--space` takes it and the trials table shows it.
        field: the config field it sets.
        applies: whether a recipe has it (`finetune_learning_rate` needs a second stage).
        declare: declares the hyperparameter on KerasTuner's `HyperParameters` (given the
            search's fixed config and the recipe); returns its value.
        to_config: the config value of a hyperparameter value.
        scale: "log" or "linear" for a number range, "choice" for a set of values.
    """

    name: str
    field: str
    applies: Callable[[Recipe], bool]
    declare: Callable[[kt.HyperParameters, Config, Sequence[str]], Any]
    to_config: Callable[[Any], Any] = lambda value: value
    scale: str = "choice"  # how plots lay its values out: "log", "linear" or "choice" (categories)


def _always(recipe: Recipe) -> bool:
    return True


def _augment_config(value: str) -> tuple[str, ...]:
    return () if value == "none" else tuple(value.split(","))


def _choice(hp: kt.HyperParameters, name: str, values: list[Any], current: Any) -> Any:
    """A Choice whose default is the config's value when it is one of them: the first trial of a
    Bayesian or random search is the recipe's defaults (see `tuner.AtomicOracleFiles.populate_space`)."""
    return hp.Choice(name, values, default=current if current in values else values[0])


def _log_rate(name: str, low: float, high: float, current: Callable[[Config], float]):
    """Declares a rate searched on a log scale in [low, high], its default the config's, clipped in."""
    return lambda hp, c, _: hp.Float(name, low, high, sampling="log", default=min(high, max(low, current(c))))


KNOBS: dict[str, Knob] = {
    knob.name: knob
    for knob in (
        # Rates on a log scale; the fine-tune's range lies wholly below the head's.
        Knob(
            "learning_rate",
            "learning_rate",
            _always,
            _log_rate("learning_rate", 1e-4, 1e-2, lambda c: c.model.learning_rate),
            scale="log",
        ),
        Knob(
            "finetune_learning_rate",
            "finetune_learning_rate",
            lambda r: r.staged,
            _log_rate("finetune_learning_rate", 1e-6, 1e-4, lambda c: c.model.finetune_learning_rate),
            scale="log",
        ),
        Knob(
            "unfreeze_at",
            "unfreeze_at",
            lambda r: r.staged,
            lambda hp, c, blocks: hp.Choice("unfreeze_at", list(blocks), default=blocks[-1]),
        ),
        Knob(
            "dropout",
            "dropout",
            _always,
            lambda hp, c, _: hp.Float("dropout", 0.0, 0.5, step=0.1, default=min(0.5, round(c.model.dropout, 1))),
            scale="linear",
        ),
        Knob("l2", "l2", _always, lambda hp, c, _: _choice(hp, "l2", [0.0, 1e-5, 1e-4, 1e-3], c.model.l2)),
        Knob(
            "optimizer",
            "optimizer",
            _always,
            lambda hp, c, _: _choice(hp, "optimizer", ["adam", "sgd", "rmsprop"], c.model.optimizer),
        ),
        Knob(
            "initializer",
            "initializer",
            _always,
            lambda hp, c, _: _choice(hp, "initializer", ["glorot_uniform", "he_normal"], c.model.initializer),
        ),
        Knob(
            "augment",
            "augment",
            _always,
            lambda hp, c, _: _choice(hp, "augment", ["none", "flip", "flip,crop"], ",".join(c.data.augment) or "none"),
            _augment_config,
        ),
        Knob(
            "dense_units",
            "dense_units",
            lambda r: r.transfer,
            lambda hp, c, _: _choice(hp, "dense_units", [128, 256, 512], c.model.dense_units),
        ),
    )
}
assert {"flip", "crop"} <= set(AUGMENTATIONS)  # the augment knob's choices
# Knob names of earlier releases, accepted in `--space` and `space=` until the next release.
OLD_KNOB_NAMES = {"finetune_lr": "finetune_learning_rate"}


def current_knob_names(space: Sequence[str] | None, *, warn: bool = True) -> list[str] | None:
    """`space` with old knob names replaced by their new ones (logging a deprecation line each,
    unless `warn` is False); None stays None (the recipe's space)."""
    if space is None:
        return None
    for old in (name for name in space if name in OLD_KNOB_NAMES and warn):
        new = OLD_KNOB_NAMES[old]
        log.warning("`--space %s` is now `--space %s`; the old name goes in the next release.", old, new)
    return [OLD_KNOB_NAMES.get(name, name) for name in space]


def resolve_space(recipe: Recipe, space: Sequence[str] | None, fixed: Sequence[str] = ()) -> list[Knob]:
    """The knobs to search: `space` (default: the recipe's), less those fixed by a flag.

    Raises:
        ConfigError: for a name that is not a knob of this recipe, or nothing left to search.
    """
    names = list(space) if space else list(recipe.space)
    available = [name for name, knob in KNOBS.items() if knob.applies(recipe)]
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ConfigError(
            f"{recipe.name} has no tuning knob {unknown[0]!r}; --space takes a comma list of "
            f"{', '.join(available)}. Received: space={','.join(names)}"
        )
    field_of = {name: KNOBS[name].field for name in names}
    knobs = [KNOBS[name] for name in names if field_of[name] not in fixed]
    if names and not knobs:
        raise ConfigError(
            f"Every knob of --space is fixed by a flag given with it, so there is nothing to search; leave one "
            f"flag out. Received: space={','.join(names)}"
        )
    skipped = [name for name in names if field_of[name] in fixed]
    if skipped:
        log.info("Not searched, fixed by a flag: %s", ", ".join(skipped))
    return knobs


def unfreeze_choices(config: Config) -> list[str]:
    """Where stage 2 may start: the names of the base's block starts (the backbone's blocks, or
    for a user's own base its layers with weights) at and below the recipe's default, the
    default last; `UNFREEZE_CHOICES` of them, so stage 2 reaches at most that much deeper."""
    base = load_base(config)
    if base is None:
        recipe = get_recipe(config.model.recipe)
        size = recipe.min_size(config.model.backbone)
        base = models.pretrained_base(config.model.backbone, input_shape=(size, size, 3), weights=None)[0]
    default = models.resolve_unfreeze_at(base, config.model.unfreeze_at or models.default_unfreeze_at(base))
    starts = [i for i in models.block_starts(base) if i < default] + [default]
    return [base.layers[i].name for i in starts[-UNFREEZE_CHOICES:]]


class SearchSpace(kt.HyperModel):
    """Declares the search space on KerasTuner's HyperParameters; the model is the trial's own."""

    def __init__(self, knobs: Sequence[Knob], config: Config, blocks: Sequence[str]):
        super().__init__(name="kerastune_flow")
        self.knobs, self.config, self.blocks = list(knobs), config, list(blocks)

    def build(self, hp):
        for knob in self.knobs:
            knob.declare(hp, self.config, self.blocks)
