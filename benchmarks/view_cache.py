"""Issue 29, item 2: the augmented-view cache against the full forward pass, on the README's task.

The task is the README's cat vs dog (benchmarks/accuracy.py makes it): 2,000 training images from
the CIFAR-10 JPEG folder (10 % held out for validation), the 2,000 test images, and the base
pre-trained here on the other eight CIFAR-10 classes (`runs/cifar8_cnn` under the work folder, cut
at its layer "dense"; accuracy.py's row trains it when it is absent). Each row is one
`python -m kerastune_flow.run train vgg16_features ...` as the README's feature-extraction row
(`--epochs 40 --patience 5`), for seeds 0, 1 and 2:

  none       no augmentation: the base's features cached once (the package's default path)
  full       --augment crop,flip --augment-views 0: the whole base on every image every epoch
  views_K    --augment crop,flip --augment-views K: K augmented views through the base once

Time to train the head is results.json's train_seconds (the feature or view pass included); the
one-time pass is read from the run's log. The issue's target: the view cache at least 5x less
time than the full pass, at equal test accuracy (within 0.5 points of its mean over the seeds).

    python benchmarks/view_cache.py                   # 6 settings x 3 seeds: about 15 minutes on 2 cores
    python benchmarks/view_cache.py --quick           # full and views_4, seed 0, 10 epochs: a few minutes
    python benchmarks/view_cache.py --views 2,4 --seeds 0,1

Results go to benchmarks/view_cache_results.json (not with --quick). Needs ../shared/datasets;
not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import accuracy  # the CIFAR-10 folders (cat vs dog, the other eight classes) and the CLI runner
import machine

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "view_cache_results.json"
AUGMENT = "crop,flip"
VIEWS = (2, 4, 8)
SEEDS = (0, 1, 2)
EPOCHS, PATIENCE = 40, 5  # the README's cat-vs-dog feature-extraction row
TARGET_SPEEDUP, TARGET_POINTS = 5.0, 0.5
PASS_LINE = re.compile(r"features took ([0-9.]+) s to compute")


def settings(views: tuple[int, ...]) -> dict[str, list[str]]:
    """Each row's flags beyond the common ones."""
    rows = {"none": [], "full": ["--augment", AUGMENT, "--augment-views", "0"]}
    for k in views:
        rows[f"views_{k}"] = ["--augment", AUGMENT, "--augment-views", str(k)]
    return rows


def base_folder(work: Path) -> tuple[Path, Path]:
    """The cat-vs-dog folder and the pre-trained base (accuracy.py's row trains it when absent)."""
    _, _, pair = accuracy._prepare_folders(work)
    base = work / "runs" / "cifar8_cnn"
    if not (base / "model.keras").exists():
        accuracy.main(["--work", str(work), "--only", "transfer_pretrain_8_classes", "--out", str(work / "rows.json")])
    return pair, base


def run_row(name: str, flags: list[str], seed: int, *, common: list[str], work: Path, folder: str) -> dict:
    """One training run through the CLI (`common` flags, then the row's); its time, accuracy, and
    the machine's load around it."""
    run_dir = work / "runs" / folder / f"{name}_s{seed}"
    load_before = os.getloadavg()[0]
    log_path = run_dir.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result, seconds, shown = accuracy._cli([*common, *flags, "--seed", str(seed), "--run-dir", str(run_dir)], log_path)
    found = PASS_LINE.search(log_path.read_text())
    epoch_seconds = accuracy.history_epoch_seconds(run_dir)
    row = {
        "command": shown.replace(str(work), "$WORK"),
        "test_accuracy": result["test"]["accuracy"],
        "train_seconds": result["train_seconds"],
        "one_time_pass_seconds": float(found.group(1)) if found else None,
        "epochs_run": result["epochs_run"],
        "steady_epoch_seconds": round(accuracy.steady_epoch_seconds(epoch_seconds), 4),
        "wall_seconds": round(seconds, 1),
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"{name} seed {seed}: test {100 * row['test_accuracy']:.2f} %, {row['train_seconds']:.1f} s training "
        f"({row['epochs_run']} epochs, {row['steady_epoch_seconds']:.3f} s each), load {row['load_1min_before_after']}",
        flush=True,
    )
    return row


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per setting: mean test accuracy (min, max), mean training seconds, and against the full
    pass the speed-up and the accuracy gap in points, with whether the issue's target is met."""
    out = {}
    for name, rows in runs.items():
        accuracies = [r["test_accuracy"] for r in rows]
        out[name] = {
            "test_accuracy_mean": statistics.mean(accuracies),
            "test_accuracy_min": min(accuracies),
            "test_accuracy_max": max(accuracies),
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rows),
            "steady_epoch_seconds_median": statistics.median(r["steady_epoch_seconds"] for r in rows),
            "epochs_run_mean": statistics.mean(r["epochs_run"] for r in rows),
            "seeds": len(rows),
        }
    full = out.get("full")
    for name, row in out.items():
        if full is None or not name.startswith("views_"):
            continue
        row["speedup_vs_full"] = full["train_seconds_mean"] / row["train_seconds_mean"]
        row["points_vs_full"] = 100 * (row["test_accuracy_mean"] - full["test_accuracy_mean"])
        row["target_met"] = row["speedup_vs_full"] >= TARGET_SPEEDUP and row["points_vs_full"] >= -TARGET_POINTS
    return out


def print_table(summary: dict[str, dict]) -> None:
    print("\n| setting | test accuracy: mean (min-max) | training s | epoch s | epochs | vs full pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in summary.items():
        versus = (
            f"{r['speedup_vs_full']:.1f}x less time, {r['points_vs_full']:+.2f} points"
            if "speedup_vs_full" in r
            else "-"
        )
        print(
            f"| {name} | {100 * r['test_accuracy_mean']:.2f} % ({100 * r['test_accuracy_min']:.2f}-"
            f"{100 * r['test_accuracy_max']:.2f}) | {r['train_seconds_mean']:.1f} | "
            f"{r['steady_epoch_seconds_median']:.3f} | {r['epochs_run_mean']:.1f} | {versus} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/kerastune_flow_accuracy", help="scratch folder (accuracy.py's)")
    parser.add_argument("--quick", action="store_true", help="full and views_4, seed 0, 10 epochs; writes nothing")
    parser.add_argument("--views", help="comma list of K (default 2,4,8)")
    parser.add_argument("--seeds", help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, help=f"most epochs (default {EPOCHS}, --quick 10)")
    parser.add_argument("--only", help="comma list of settings: none, full, views_K")
    parser.add_argument(
        "--no-early-stopping", action="store_true", help="every run all its epochs (time against epochs alone)"
    )
    parser.add_argument("--out", default=str(OUT), help="the results file")
    parser.add_argument(
        "--backbone", help="time only: this keras.applications base with random weights instead of the pre-trained CNN"
    )
    parser.add_argument("--image-size", type=int, help="with --backbone: the images' size")
    args = parser.parse_args(argv)
    if not accuracy.SHARED.is_dir():
        print(f"{accuracy.SHARED} is absent: these runs need the CIFAR-10 JPEG archive.", file=sys.stderr)
        return 2
    views = tuple(int(k) for k in args.views.split(",")) if args.views else ((4,) if args.quick else VIEWS)
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((0,) if args.quick else SEEDS)
    epochs = args.epochs or (10 if args.quick else EPOCHS)
    rows = settings(views)
    if args.quick:
        rows.pop("none")
    if args.only:
        rows = {name: rows[name] for name in args.only.split(",")}
    work = Path(args.work)
    pair, base = base_folder(work)
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    common = ["vgg16_features", "--data", str(pair), "--epochs", str(epochs), "--patience", str(PATIENCE)]
    common += ["--no-tensorboard", "--quiet"] + (["--no-early-stopping"] if args.no_early_stopping else [])
    if args.backbone:  # no ImageNet weights here: the time is the base's, the accuracy means nothing
        common += ["--backbone", args.backbone, "--weights", "none"]
        common += ["--image-size", str(args.image_size)] if args.image_size else []
    else:
        common += ["--base", str(base), "--base-output", "dense"]
    folder = "view_cache" + (f"_{args.backbone}" if args.backbone else "") + ("_all" if args.no_early_stopping else "")
    started = time.strftime("%Y-%m-%d %H:%M")
    for seed in seeds:  # settings alternate within each seed, so the machine's load falls on all alike
        for name, flags in rows.items():
            runs[name].append(run_row(name, flags, seed, common=common, work=work, folder=folder))
    summary = summarize(runs)
    print(f"\n# {machine.describe()}; started {started}, ended {time.strftime('%H:%M')}")
    print_table(summary)
    if not args.quick:
        result = {
            "command": "python benchmarks/view_cache.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine.describe(),
            "epochs": epochs,
            "patience": PATIENCE,
            "early_stopping": not args.no_early_stopping,
            "base": f"{args.backbone}, random weights" if args.backbone else "cifar8_cnn cut at dense",
            "image_size": args.image_size or 32,
            "augment": AUGMENT,
            "summary": summary,
            "runs": runs,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
