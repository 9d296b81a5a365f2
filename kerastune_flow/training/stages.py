"""The plan of a staged fine-tune's second stage: its steps, their names and boundaries.

Stage two is one step (the base unfrozen from `unfreeze_at`, at `finetune_learning_rate`) or,
with `progressive`, several, each unfreezing more at its own rate. The plan is read from the
config and resolved on the built base before stage one trains, so a bad boundary fails at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from kerastune_flow import models
from kerastune_flow.config import Config
from kerastune_flow.errors import ConfigError

FIRST_STAGE = "head"  # the frozen stage's name: in history records, backup/ and the stage ledger


@dataclasses.dataclass(frozen=True)
class FinetuneStep:
    """One step of stage two: from `offset` epochs after its start, the base is unfrozen from
    `unfreeze_at` and trains at `learning_rate`."""

    offset: int
    unfreeze_at: int | float | str
    learning_rate: float | str


def parse_progressive(spec: str | None) -> list[FinetuneStep]:
    """Parses progressive unfreezing steps "EPOCH:UNFREEZE_AT:LR,...", epochs counted from the
    start of stage two; the first step must start at 0.

    Raises:
        ConfigError: naming the malformed step.
    """
    if not spec:
        return []
    steps = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            epoch, at, lr = int(fields[0]), fields[1], float(fields[2])
            if epoch < 0 or lr <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(
                "--progressive takes EPOCH:UNFREEZE_AT:LR steps separated by commas, such as "
                f"0:block5_conv1:1e-5,3:block4_conv1:5e-6. Received: {part.strip()!r}"
            ) from None
        steps.append(FinetuneStep(epoch, at, lr))
    epochs = [step.offset for step in steps]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise ConfigError(f"--progressive steps must start at epoch 0 and increase. Received: epochs={epochs}")
    return steps


def finetune_steps(config: Config, base: keras.Model) -> list[FinetuneStep]:
    """The steps of stage two: `progressive`'s, or one step from `unfreeze_at` (default: the
    base's last block) at `finetune_learning_rate`."""
    m = config.model
    unfreeze_at = m.unfreeze_at if m.unfreeze_at is not None else models.default_unfreeze_at(base)
    return parse_progressive(m.progressive) or [FinetuneStep(0, unfreeze_at, m.finetune_learning_rate)]


def stage_name(i: int) -> str:
    """The name of stage two's step `i` (from 0): "finetune", then "finetune_2", ..."""
    return "finetune" if i == 0 else f"finetune_{i + 1}"


def resolve_steps(config: Config, base: keras.Model) -> list[dict[str, Any]]:
    """Resolves every fine-tune boundary on the built base before stage one trains, so that an
    `unfreeze_at` out of range or a layer name that does not exist fails at once.

    Returns:
        Per step: the stage name, what was asked ("at"), the layer index and name it resolved
        to (a fraction snapped to a block start), and the learning rate: for config.json.

    Raises:
        ConfigError: from `models.resolve_unfreeze_at`.
    """
    out = []
    for i, step in enumerate(finetune_steps(config, base)):
        index = models.resolve_unfreeze_at(base, step.unfreeze_at)
        layer = base.layers[index].name if index < len(base.layers) else None
        out.append(
            {"stage": stage_name(i), "at": step.unfreeze_at, "index": index, "layer": layer, "lr": step.learning_rate}
        )
    return out
