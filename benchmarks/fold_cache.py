"""Cross-validation's frozen stage: K folds computing the frozen base's features once, against each
fold computing its own (issue 30).

The K fold runs of `vgg16_features` (VGG16, random weights: speed does not depend on their values)
on the shipped digits, one process: first as a search runs them (the merged images' features
computed by fold 0 and kept, `training.caches.shared`), then each fold alone (the kept caches
dropped before each, as K separate processes would be). Prints the seconds spent computing
features and the whole fold runs, their ratios, and whether each fold trained the same weights
both ways.

    python benchmarks/fold_cache.py                  # 5 folds, 64x64: about 4 minutes on 2 cores
    python benchmarks/fold_cache.py --quick          # 3 folds at 32x32: under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import machine  # noqa: E402

from kerastune_flow.data.samples import sample_folder  # noqa: E402
from kerastune_flow.recipes import make_config  # noqa: E402
from kerastune_flow.training import caches, train  # noqa: E402

OUT = REPO / "benchmarks" / "fold_cache_results.json"


def folds(config, root: Path, k: int, *, alone: bool) -> list[dict]:
    """The K fold runs of `config`; `alone`: nothing kept from the fold before."""
    spent: list[float] = []
    original = caches.compute

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    caches.compute = timed
    rows = []
    try:
        for fold in range(k):
            if alone:
                caches.forget()
            before, start = len(spent), time.perf_counter()
            result = train.train_and_evaluate(config.replace(fold=fold), root / f"fold-{fold}")
            rows.append(
                {
                    "fold": fold,
                    "seconds": round(time.perf_counter() - start, 2),
                    "feature_seconds": round(sum(spent[before:]), 2),
                    "weights_sha256": result.results["weights_sha256"],
                }
            )
            print(f"{'alone' if alone else 'shared'} fold {fold}: {rows[-1]}", flush=True)
    finally:
        caches.compute = original
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 folds at 32x32, one epoch: under a minute")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.folds, args.image_size, args.epochs = 3, 32, 1
    logging.basicConfig(level=logging.WARNING)
    print(f"# {machine.describe()}", flush=True)
    config = make_config(
        "vgg16_features",
        data=str(sample_folder("digits")),
        weights="none",
        image_size=(args.image_size, args.image_size),
        folds=args.folds,
        seed=0,  # every fold's run cuts the same folds and draws the same weights
        epochs=args.epochs,
        tensorboard=False,
        verbose=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        shared = folds(config, Path(tmp) / "shared", args.folds, alone=False)
        alone = folds(config, Path(tmp) / "alone", args.folds, alone=True)
    total = {
        name: {key: round(sum(r[key] for r in rows), 2) for key in ("seconds", "feature_seconds")}
        for name, rows in (("shared", shared), ("alone", alone))
    }
    result = {
        "command": "python benchmarks/fold_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": machine.describe(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": vars(args) | {"recipe": "vgg16_features", "data": "digits (shipped)", "weights": "random"},
        "shared": shared,
        "alone": alone,
        "total": total,
        "feature_seconds_ratio": round(total["alone"]["feature_seconds"] / total["shared"]["feature_seconds"], 2),
        "fold_seconds_ratio": round(total["alone"]["seconds"] / total["shared"]["seconds"], 2),
        "same_weights_every_fold": all(
            a["weights_sha256"] == s["weights_sha256"] for a, s in zip(alone, shared, strict=True)
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total", "feature_seconds_ratio", "fold_seconds_ratio")}, indent=2))
    print(f"same weights every fold: {result['same_weights_every_fold']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
