"""Named presets: settings that go together, applied under a recipe's defaults by `make_config`."""

from __future__ import annotations

from typing import Any

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
        folds=1,  # one hold-out: a search's trial is one run, not K (tune's default cross-validates small data)
    ),
}
