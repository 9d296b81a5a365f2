"""After a search: the best settings and the recipe's defaults, each trained on the whole training
split with `final_seeds` seeds and evaluated once on the test split, and the difference between
them with its spread, said plainly when it is within noise.

The first seed is the search's own: its runs are the ones the search already has (the best trial
and the defaults' trial with one hold-out, or `DIR/best` and `DIR/defaults` with folds); each
further seed trains in `DIR/seeds/best-SEED` and `DIR/seeds/defaults-SEED`. The two runs of a seed
share it, so the difference is taken seed by seed (a paired comparison).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from kerastune_flow import rundir
from kerastune_flow.config import Config
from kerastune_flow.deploy import inference
from kerastune_flow.search.tune_report import difference
from kerastune_flow.training.train import train_and_evaluate

log = logging.getLogger(__name__)

FINAL_SEEDS = 3
SEEDS_DIR = "seeds"


def train_once(config: Config, run_dir: Path, what: str, callbacks: Sequence[keras.callbacks.Callback]) -> None:
    """A run for the test split's comparison, unless it has finished before (a resumed search's)."""
    if not (run_dir / rundir.RESULTS_JSON).exists():
        log.info("%s, for comparison on the test split, in %s", what, run_dir)
        train_and_evaluate(config, run_dir, callbacks=callbacks)
        keras.backend.clear_session()


def seed_runs(
    run_dir: Path,
    best: tuple[Config, Path],
    defaults: tuple[Config, Path],
    *,
    seeds: int,
    callbacks: Sequence[keras.callbacks.Callback],
) -> list[tuple[int, Path, Path]]:
    """(seed, best run, defaults run) for each of `seeds` seeds: the first the search's own runs
    (`best` and `defaults`: their config and folder), the others trained here. When the best is
    the defaults (the same folder), each seed trains once and serves both."""
    (best_config, best_dir), (defaults_config, defaults_dir) = best, defaults
    first = defaults_config.train.seed
    runs = [(first, best_dir, defaults_dir)]
    for seed in range(first + 1, first + seeds):
        defaults_seed = run_dir / SEEDS_DIR / f"defaults-{seed}"
        train_once(defaults_config.replace(seed=seed), defaults_seed, f"The recipe's defaults, seed {seed}", callbacks)
        best_seed = defaults_seed
        if best_dir != defaults_dir:
            best_seed = run_dir / SEEDS_DIR / f"best-{seed}"
            train_once(best_config.replace(seed=seed), best_seed, f"The best trial's settings, seed {seed}", callbacks)
        runs.append((seed, best_seed, defaults_seed))
    return runs


def evaluate_seeds(runs: list[tuple[int, Path, Path]], *, max_examples: int | None) -> dict[str, Any]:
    """Each seed's best and defaults on the test split (once each), and their difference."""
    best = [inference.evaluate_saved(b, max_examples=max_examples) for _, b, _ in runs]
    defaults = [inference.evaluate_saved(d, max_examples=max_examples) for _, _, d in runs]
    comparison = {
        "seeds": [seed for seed, _, _ in runs],
        "run_dirs": {"best": [str(b) for _, b, _ in runs], "defaults": [str(d) for _, _, d in runs]},
        "best": best,
        "defaults": defaults,
    }
    if all("accuracy" in r for r in best + defaults):
        comparison["accuracy"] = difference([r["accuracy"] for r in best], [r["accuracy"] for r in defaults])
    return comparison
