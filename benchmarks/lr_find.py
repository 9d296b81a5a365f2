"""The range test's suggestion against a grid of learning rates, on the real data sets, offline.

For each task and seed it runs `find-lr` (the range test, every rule's suggestion), then trains at
each suggestion and at each rate of a 7-point log grid from 1e-5 to 1e-1 for the same epochs, and
reads the test accuracy:

  mlp_mnist      scratch MLP on MNIST (all 60,000 training images), 3 epochs
  cnn_cifar3000  CIFAR-10 CNN on 3,000 training images of the CIFAR-10 JPEG folder (300 per class),
                 tested on all 10,000 test images, 10 epochs
  catdog_head    the head stage of cat vs dog (2,000 training images, 10 % held out for validation,
                 2,000 test images) on a base pre-trained here on the other eight CIFAR-10 classes
                 (no ImageNet weights exist on this machine; as benchmarks/accuracy.py), 10 epochs

Every run keeps the recipe's defaults but for the learning rate, with early stopping off (so
every run trains the same epochs) and the seed given. The equivalent commands:

    python -m kerastune_flow.run find-lr scratch_mlp --data mnist --seed 0
    python -m kerastune_flow.run train scratch_mlp --data mnist --seed 0 --epochs 3 --no-early-stopping \\
        --learning-rate RATE

    python benchmarks/lr_find.py                      # 3 seeds, the package's test length: ~20 minutes
    python benchmarks/lr_find.py --steps 100,300 --seeds 0,1,2,3,4,5   # lr_find_results.json: ~40 minutes
    python benchmarks/lr_find.py --only mlp_mnist --seeds 0

(on 2 CPU cores). The "descent" rule was designed on the curves of seeds 0-2; seeds 3-5 are its
held-out check.

Results (resumable: finished runs are kept) go to benchmarks/lr_find_results.json. Needs
../shared/datasets (the MNIST archives and the CIFAR-10 JPEG archive); not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import accuracy  # noqa: E402  (the CIFAR-10 folders: cat vs dog and the other eight classes)
import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402

from kerastune_flow import make_config, train_and_evaluate  # noqa: E402
from kerastune_flow.training import lr_range
from kerastune_flow.training.lr_find import find_lr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
GRID = [float(f"{rate:.2g}") for rate in np.logspace(-5, -1, 7)]  # 1e-05, 4.6e-05, ..., 0.1
SEEDS = (0, 1, 2)
CIFAR_SUBSET_PER_CLASS = 300
FIXED = dict(early_stopping=False, tensorboard=False, backup=False, checkpoint=False, verbose=0)


def _cifar_subset(cifar: Path, work: Path) -> Path:
    """3,000 training images of CIFAR-10 (the first 300 of each class) and the whole test split, as links."""
    root = work / "cifar3000"
    for cls in sorted(p.name for p in (cifar / "train").iterdir()):
        target = root / "train" / cls
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((cifar / "train" / cls).iterdir())[:CIFAR_SUBSET_PER_CLASS]:
            if not (target / f.name).exists():
                (target / f.name).symlink_to(f)
    if not (root / "test").exists():
        (root / "test").symlink_to(cifar / "test", target_is_directory=True)
    return root


def _tasks(work: Path) -> dict[str, dict]:
    cifar, eight, pair = accuracy._prepare_folders(work)
    base = work / "runs" / "cifar8_cnn"
    return {
        "mlp_mnist": dict(
            recipe="scratch_mlp", data="mnist", manual_dir=str(SHARED / "mnist"), data_dir=str(work / "tfds"), epochs=3
        ),
        "cnn_cifar3000": dict(recipe="cifar10_cnn", data=str(_cifar_subset(cifar, work)), epochs=10),
        "catdog_head": dict(
            recipe="vgg16_features", data=str(pair), base=str(base), base_output="dense", epochs=10, _pretrain=eight
        ),
    }


def _pretrain_base(eight: Path, run_dir: Path) -> None:
    """The cat-vs-dog base: the CIFAR-10 CNN on the other eight classes, 15 epochs (as accuracy.py)."""
    if (run_dir / "results.json").exists():
        return
    print("pre-training the cat-vs-dog base on the eight other CIFAR-10 classes (a few minutes)", flush=True)
    config = make_config("cifar10_cnn", data=str(eight), epochs=15, seed=0, tensorboard=False, verbose=0)
    train_and_evaluate(config, run_dir, overwrite=True)
    keras.backend.clear_session()


def _train(task: dict, seed: int, rate: float, run_dir: Path) -> float:
    settings = {k: v for k, v in task.items() if not k.startswith("_")}
    config = make_config(settings.pop("recipe"), **settings, **FIXED, seed=seed, learning_rate=rate)
    result = train_and_evaluate(config, run_dir, overwrite=True)
    keras.backend.clear_session()
    return result.results["test"]["accuracy"]


def _run_task(name: str, task: dict, seeds, steps_list, work: Path, results: dict, save) -> None:
    entry = results.setdefault(name, {"seeds": {}})
    entry.update(
        epochs=task["epochs"],
        grid=GRID,
        settings={k: v for k, v in task.items() if not k.startswith("_") and k not in ("data_dir", "manual_dir")},
    )
    if "_pretrain" in task:
        _pretrain_base(task["_pretrain"], Path(task["base"]))
    for seed in seeds:
        row = entry["seeds"].setdefault(str(seed), {"accuracy": {}})
        runs = work / "runs" / name / f"s{seed}"
        tests = row.setdefault("range_tests", {})
        for steps in steps_list:
            if str(steps) in tests:
                continue
            settings = {k: v for k, v in task.items() if not k.startswith("_")}
            config = make_config(settings.pop("recipe"), **settings, **FIXED, seed=seed)
            record = find_lr(config, runs / f"find_lr_{steps}", max_steps=steps)
            keras.backend.clear_session()
            tests[str(steps)] = {k: record[k] for k in ("suggestions", "steps", "diverged", "seconds")}
            save()
        suggested = {r for steps in steps_list for r in tests[str(steps)]["suggestions"].values() if r is not None}
        for steps in steps_list:
            print(f"{name} seed {seed}, {steps} steps: suggestions {tests[str(steps)]['suggestions']}", flush=True)
        rates = sorted({*GRID, *suggested})
        for rate in rates:
            key = repr(rate)
            if key in row["accuracy"]:
                continue
            start = time.perf_counter()
            row["accuracy"][key] = _train(task, seed, rate, runs / f"lr_{rate:.3g}")
            print(f"  rate {rate:.3g}: test accuracy {row['accuracy'][key]:.4f} ({time.perf_counter() - start:.0f} s)")
            save()


def summarize(entry: dict, steps_list) -> dict:
    """Mean test accuracy over seeds of each grid rate and, for each range-test length, of each
    rule's suggestions, with the rule's gap to the grid's best rate (in points)."""
    seeds = list(entry["seeds"].values())
    grid_mean = {repr(r): float(np.mean([s["accuracy"][repr(r)] for s in seeds])) for r in entry["grid"]}
    best_rate = max(grid_mean, key=grid_mean.get)
    by_steps = {}
    for steps in steps_list:
        rules = by_steps[str(steps)] = {}
        for rule in lr_range.RULES:
            rates = [s["range_tests"][str(steps)]["suggestions"][rule] for s in seeds]
            accuracies = [s["accuracy"][repr(rate)] for s, rate in zip(seeds, rates, strict=True)]
            mean = float(np.mean(accuracies))
            rules[rule] = {
                "rates": rates,
                "accuracies": accuracies,
                "mean_accuracy": mean,
                "gap_points": round(100 * (mean - grid_mean[best_rate]), 2),
            }
    return {"grid_mean_accuracy": grid_mean, "grid_best_rate": float(best_rate), "rules_by_steps": by_steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/kerastune_flow_lr_find", help="scratch folder for data and runs")
    parser.add_argument("--only", help="comma list of tasks: mlp_mnist, cnn_cifar3000, catdog_head")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma list of seeds (default 0,1,2)")
    parser.add_argument(
        "--steps", default=str(lr_range.MAX_STEPS), help="comma list of range-test lengths (default the package's)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "lr_find_results.json"))
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: these runs need the real MNIST and CIFAR-10 files.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    print(f"# {machine.describe()}", flush=True)
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    tasks = _tasks(work)
    wanted = args.only.split(",") if args.only else list(tasks)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results["hardware"] = machine.describe()
    results["date"] = time.strftime("%Y-%m-%d")
    results["default_rule"] = lr_range.DEFAULT_RULE

    def save() -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")

    start = time.perf_counter()
    for name in wanted:
        _run_task(name, tasks[name], seeds, steps_list, work, results, save)
        results[name]["summary"] = summarize(results[name], steps_list)
        save()
    print(f"\n# {machine.describe()}; {time.perf_counter() - start:.0f} s")
    print(f"\nmean test accuracy over seeds {seeds}; the grid: {', '.join(f'{r:g}' for r in GRID)}\n")
    header = " | ".join(f"{rule}: rates, accuracy, gap" for rule in lr_range.RULES)
    print(f"| task | epochs | grid best (rate) | steps | {header} |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in lr_range.RULES) + " |")
    for name in wanted:
        s = results[name]["summary"]
        best = s["grid_mean_accuracy"][repr(s["grid_best_rate"])]
        grid = f"{100 * best:.2f} % ({s['grid_best_rate']:g})"
        for steps, rules in s["rules_by_steps"].items():
            cells = [
                f"{'/'.join(f'{r:.2g}' for r in v['rates'])}, {100 * v['mean_accuracy']:.2f} %, {v['gap_points']:+.2f}"
                for v in rules.values()
            ]
            print(f"| {name} | {results[name]['epochs']} | {grid} | {steps} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
