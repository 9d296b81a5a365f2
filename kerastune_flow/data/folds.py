"""Cross-validation folds: the training and validation splits merged and cut into K stratified folds,
one of which is held out for validation (`--folds K --fold k`); the test split is never touched.

    splits = fold_splits(load_data("my_images/"), folds=5, fold=2, seed=0)

Every class is spread over the folds as evenly as its count allows (a fold's share of each class
differs by at most one image), each image is in exactly one fold, and the folds depend only on the
labels and the seed: every trial of a search, and a resumed run, cut the same folds.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from kerastune_flow.data.sources import DataSplits
from kerastune_flow.errors import ConfigError

log = logging.getLogger(__name__)

# Below this many training and validation images together, `tune` cross-validates each trial over
# DEFAULT_FOLDS folds. A 10 % hold-out of 10,000 images holds 1,000, whose accuracy is uncertain by
# 1.4 points (one standard error at 70 %); the README's cat-vs-dog search held out 200 (3.2 points)
# and its 30 trials' scores all lay within that noise (benchmarks/tune.py, issue 30). With K folds
# every image is validated once, so the noise of the mean is that of the whole set.
FOLDS_BELOW = 10_000
DEFAULT_FOLDS = 5


def default_folds(sizes: dict[str, int]) -> int:
    """`tune`'s folds when none are given: `DEFAULT_FOLDS` for a training and validation split of
    fewer than `FOLDS_BELOW` images, else 1 (one hold-out)."""
    return DEFAULT_FOLDS if sizes["train"] + sizes["validation"] < FOLDS_BELOW else 1


def fold_of_each(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each example: per class, a seeded permutation dealt round the folds,
    each class starting where the last one stopped, so the folds' sizes differ by at most one.

    Raises:
        ConfigError: a class with fewer examples than folds (a fold would never validate it).
    """
    counts = np.bincount(labels) if labels.size else np.zeros(0, int)
    small = [(c, int(n)) for c, n in enumerate(counts) if 0 < n < folds]
    if small:
        label, count = small[0]
        raise ConfigError(
            f"Cannot cross-validate over {folds} folds: class {label} has {count} training and validation "
            f"image(s); pass --folds {count} or fewer (1: one hold-out). Received: folds={folds}"
        )
    rng = np.random.default_rng(seed)
    assigned = np.empty(labels.size, dtype=np.int64)
    start = 0
    for label in range(counts.size):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(members.size)]
        assigned[members] = (start + np.arange(members.size)) % folds
        start = (start + members.size) % folds
    return assigned


def fold_splits(splits: DataSplits, *, folds: int, fold: int, seed: int) -> DataSplits:
    """`splits` with its training and validation splits merged and cut into `folds` stratified folds:
    validation is fold `fold`, training the others. The labels are read once (the images decoded
    once more: folds are meant for small data).

    Raises:
        ConfigError: `fold` outside 0..folds-1, or a class with fewer images than folds.
    """
    if not 0 <= fold < folds:
        raise ConfigError(f"--fold must be 0 to {folds - 1} with --folds {folds}. Received: fold={fold}")
    merged = splits.train.concatenate(splits.validation)
    labels = np.fromiter(merged.map(lambda x, y: y).as_numpy_iterator(), dtype=np.int64)
    held_out = fold_of_each(labels, folds, seed) == fold
    mask = tf.constant(held_out)

    def part(keep_held_out: bool) -> tf.data.Dataset:
        picked = merged.enumerate().filter(lambda i, example: tf.equal(tf.gather(mask, i), keep_held_out))
        return picked.map(lambda i, example: example)

    where = f"stratified fold {fold} of {folds} (seed {seed}) of {_words(splits)}"
    splits.train, splits.validation = part(False), part(True)
    splits.merged, splits.held_out = merged, held_out  # a frozen part's output is cached once for all folds
    splits.sizes = {**splits.sizes, "train": int((~held_out).sum()), "validation": int(held_out.sum())}
    splits.split_sources = {
        **splits.split_sources,
        "train": f"all but the {where}",
        "validation": f"the {where}",
    }
    return splits


def _words(splits: DataSplits) -> str:
    """Where the merged examples came from, in words."""
    sources = splits.split_sources
    if "train" in sources and "validation" in sources:
        return f"train ({sources['train']}) and validation ({sources['validation']})"
    return f"the training and validation splits of {splits.source}"
