"""Accuracy on the real data sets of the reference examples, offline, through the real CLI.

Each row runs `python -m kerastune_flow.run train ...` as a subprocess (the exact command is
printed, so a reader can reproduce it) and reads its results.json:

  mlp_reference   scratch MLP on MNIST, the reference settings (10 epochs, batch 64, Adam 1e-3,
                  all 60,000 training images, no early stopping)
  mlp_improved    the same network with dropout 0.2 and a cosine learning-rate decay, 20 epochs
  cnn_reference   CIFAR-10 CNN, the reference settings (10 epochs, all 50,000 training images),
                  on the CIFAR-10 JPEG folder (re-encoded at JPEG quality 75)
  cnn_improved    the same network with random crop and flip, dropout 0.3, cosine decay, 20 epochs
  transfer_*      cat vs dog with 2,000 training images: a CNN from scratch, feature extraction on
                  a base pre-trained here on the other eight CIFAR-10 classes, and the staged
                  fine-tune of that base (no ImageNet weights exist on this machine)
  *_defaults_sN   the recipes as a newcomer types them, defaults only (`train scratch_mlp --data
                  mnist --epochs 10`, `train cifar10_cnn --data CIFAR10_FOLDER --epochs 10`), seeds
                  0, 1 and 2: their mean must reach the reference code's own figure (REFERENCE_CODE)

    python benchmarks/accuracy.py --only defaults     # the six defaults rows: about 15 minutes
    python benchmarks/accuracy.py --only mlp_reference,mlp_improved
    python benchmarks/accuracy.py                     # everything: about an hour and a half on 2 CPU cores

Needs ../shared/datasets (MNIST archives and the CIFAR-10 JPEG archive); not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CIFAR_TAR = SHARED / "cifar10_jpeg" / "cifar10-jpeg.tar.gz"
TRANSFER_CLASSES = ("cat", "dog")
TRANSFER_TRAIN_PER_CLASS = 1000
DEFAULT_SEEDS = (0, 1, 2)
# The reference articles' own code (benchmarks/reference_code.py), run on 2026-11-22 with seed 0 on the
# AVX2 CPU of that day: the figures the issue states. The same code runs again here for every seed.
REFERENCE_CODE = {"mlp": 0.972, "cnn": 0.682}


def _cli(args: list[str], log_path: Path) -> tuple[dict, float, str]:
    command = [sys.executable, "-m", "kerastune_flow.run", "train", *args, "--overwrite"]
    shown = "python -m kerastune_flow.run train " + " ".join(shlex.quote(a) for a in args)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shown}; see {log_path}")
    return json.loads(proc.stdout), seconds, shown


def _prepare_folders(work: Path) -> tuple[Path, Path, Path]:
    """Unpacks CIFAR-10 and makes two views of it with symbolic links: the eight classes other
    than cat and dog, and cat vs dog with 1,000 training images per class."""
    cifar = work / "cifar10_jpeg"
    if not cifar.is_dir():
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(work, filter="data")
    eight, pair = work / "cifar8", work / "catdog2000"
    for split in ("train", "test"):
        for cls in sorted(p.name for p in (cifar / split).iterdir()):
            source = cifar / split / cls
            if cls not in TRANSFER_CLASSES:
                link = eight / split / cls
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(source, target_is_directory=True)
                continue
            target = pair / split / cls
            target.mkdir(parents=True, exist_ok=True)
            files = sorted(source.iterdir())
            if split == "train":
                files = files[:TRANSFER_TRAIN_PER_CLASS]
            for f in files:
                if not (target / f.name).exists():
                    (target / f.name).symlink_to(f)
    return cifar, eight, pair


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/kerastune_flow_accuracy", help="scratch folder for data and runs")
    parser.add_argument("--only", help="comma list of rows to run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "accuracy_results.json"))
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: these runs need the real MNIST and CIFAR-10 files.", file=sys.stderr)
        return 2
    work = Path(args.work)
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cifar, eight, pair = _prepare_folders(work)
    mnist = ["--data", "mnist", "--manual-dir", str(SHARED / "mnist"), "--data-dir", str(work / "tfds")]
    fixed = ["--validation-fraction", "0", "--no-early-stopping", "--no-tensorboard", "--quiet", "--seed", "0"]
    base = str(runs / "cifar8_cnn")
    transfer_common = ["--data", str(pair), "--no-tensorboard", "--quiet", "--seed", "0", "--patience", "5"]
    rows = {
        "mlp_reference": ["scratch_mlp", *mnist, "--epochs", "10", *fixed],
        "mlp_improved": [
            "scratch_mlp",
            *mnist,
            "--epochs",
            "20",
            "--dropout",
            "0.2",
            "--lr-schedule",
            "cosine",
            *fixed,
        ],
        "cnn_reference": ["cifar10_cnn", "--data", str(cifar), "--epochs", "10", *fixed],
        "cnn_improved": [
            "cifar10_cnn",
            "--data",
            str(cifar),
            "--epochs",
            "20",
            "--augment",
            "crop,flip",
            "--dropout",
            "0.3",
            "--lr-schedule",
            "cosine",
            *fixed,
        ],
        "transfer_pretrain_8_classes": [
            "cifar10_cnn",
            "--data",
            str(eight),
            "--epochs",
            "15",
            "--no-tensorboard",
            "--quiet",
            "--seed",
            "0",
        ],
        "transfer_scratch": ["cifar10_cnn", *transfer_common, "--epochs", "40"],
        "transfer_features": [
            "vgg16_features",
            *transfer_common,
            "--base",
            base,
            "--base-output",
            "dense",
            "--epochs",
            "40",
        ],
        "transfer_finetune": [
            "vgg16_finetune",
            *transfer_common,
            "--base",
            base,
            "--base-output",
            "dense",
            "--head-epochs",
            "40",
            "--epochs",
            "20",
            "--finetune-learning-rate",
            "1e-4",
        ],
    }
    for seed in DEFAULT_SEEDS:  # typed as a newcomer would: the recipe, its data, 10 epochs, nothing else
        rows[f"mlp_defaults_s{seed}"] = ["scratch_mlp", *mnist, "--epochs", "10", "--seed", str(seed), "--quiet"]
        rows[f"cnn_defaults_s{seed}"] = ["cifar10_cnn", "--data", str(cifar), "--epochs", "10", "--seed", str(seed)]
        rows[f"cnn_defaults_s{seed}"].append("--quiet")
    wanted = args.only.split(",") if args.only else [*rows, *reference_rows(cifar, work)]
    if wanted == ["defaults"]:
        # each defaults run beside the reference code's run of the same recipe and seed, so the
        # speed ratio compares runs minutes apart, not the first half of the hour with the second
        pairs = zip([name for name in rows if "_defaults_" in name], reference_rows(cifar, work), strict=True)
        wanted = [name for pair in pairs for name in pair]
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    references = reference_rows(cifar, work)
    for name in wanted:
        if name in references:
            results[name] = _reference_code(references[name], runs / f"{name}.log")
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            continue
        run_dir = base if name == "transfer_pretrain_8_classes" else str(runs / name)
        result, seconds, shown = _cli([*rows[name], "--run-dir", run_dir], runs / f"{name}.log")
        results[name] = {
            "command": shown.replace(str(work), "$WORK"),
            "test_accuracy": result["test"]["accuracy"],
            "test_loss": result["test"]["loss"],
            "epochs_run": result["epochs_run"],
            "train_seconds": result["train_seconds"],
            "train_examples": result["examples_seen"] // max(result["epochs_run"], 1),
            "steady_epoch_seconds": round(steady_epoch_seconds(history_epoch_seconds(Path(run_dir))), 4),
            "dtype_policy": result.get("dtype_policy"),
            "wall_seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%d"),
            "hardware": machine.describe(),
        }
        print(
            f"{name}: test accuracy {result['test']['accuracy']:.4f}, {result['epochs_run']} epochs, "
            f"{result['train_seconds']:.0f} s training",
            flush=True,
        )
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n# {machine.describe()}")
    print("\n| run | test accuracy | epochs | training s |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {name} | {100 * r['test_accuracy']:.1f} % | {r['epochs_run']} | {seconds} |")
    summary = defaults_summary(results)
    if summary:
        print("\n| recipe | defaults only: mean (min-max) | the reference code here: mean (min-max) | stated |")
        print("| --- | --- | --- | --- |")
        for key, row in summary.items():
            ref = row.get("reference")
            shown = f"{100 * ref['mean']:.2f} % ({100 * ref['min']:.2f}-{100 * ref['max']:.2f})" if ref else "-"
            print(
                f"| {key} | {100 * row['mean']:.2f} % ({100 * row['min']:.2f}-{100 * row['max']:.2f}) | {shown} | "
                f"{100 * REFERENCE_CODE[key]:.1f} % |"
            )
        for key, row in summary.items():
            if "speedup" in row:
                rate = row["images_per_second"]
                print(
                    f"{key}: defaults {rate['defaults']:.0f} training images/s in a steady epoch (checkpoint and "
                    f"backup writes included), the reference code {rate['reference']:.0f}: {row['speedup']:.2f}x"
                )
    return 0


def reference_rows(cifar: Path, work: Path) -> dict[str, list[str]]:
    """The reference code's runs, one per seed: `benchmarks/reference_code.py` arguments."""
    rows = {}
    for seed in DEFAULT_SEEDS:
        rows[f"mlp_reference_code_s{seed}"] = ["mlp", "--seed", str(seed), "--data-dir", str(work / "tfds")]
        rows[f"cnn_reference_code_s{seed}"] = ["cnn", "--seed", str(seed), "--data", str(cifar)]
    return rows


def _reference_code(args: list[str], log_path: Path) -> dict:
    command = [sys.executable, str(REPO / "benchmarks" / "reference_code.py"), *args]
    print(f"\n$ python benchmarks/reference_code.py {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True, check=True)
    result = json.loads(proc.stdout)
    print(f"reference code: test accuracy {result['test_accuracy']:.4f}", flush=True)
    return {
        "command": "python benchmarks/reference_code.py " + " ".join(args),
        "test_accuracy": result["test_accuracy"],
        "epochs_run": 10,
        "train_seconds": result["train_seconds"],
        "train_examples": result["train_examples"],
        "steady_epoch_seconds": round(steady_epoch_seconds(result["epoch_seconds"]), 4),
        "dtype_policy": "float32",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "date": time.strftime("%Y-%m-%d"),
        "hardware": machine.describe(),
    }


def history_epoch_seconds(run_dir: Path) -> list[float]:
    """The seconds of each epoch a run logged in its history.jsonl."""
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch_seconds"] for line in lines if line.strip()]


def steady_epoch_seconds(epoch_seconds: list[float]) -> float:
    """The median epoch after the first (which traces the graphs and fills the caches)."""
    return statistics.median(epoch_seconds[1:] or epoch_seconds)


def _mean_row(accuracies: list[float]) -> dict:
    return {
        "mean": sum(accuracies) / len(accuracies),
        "min": min(accuracies),
        "max": max(accuracies),
        "runs": accuracies,
    }


def defaults_summary(results: dict) -> dict[str, dict]:
    """Per recipe ("mlp", "cnn"): mean, min and max test accuracy of the defaults rows, and the
    same of the reference code's rows ("reference") when they ran."""
    out = {}
    for key in REFERENCE_CODE:
        accuracies = [r["test_accuracy"] for name, r in results.items() if name.startswith(f"{key}_defaults_s")]
        if accuracies:
            out[key] = _mean_row(accuracies)
            reference = [r["test_accuracy"] for n, r in results.items() if n.startswith(f"{key}_reference_code_s")]
            if reference:
                out[key]["reference"] = _mean_row(reference)
            mine = _images_per_second(results, f"{key}_defaults_s")
            theirs = _images_per_second(results, f"{key}_reference_code_s")
            if mine and theirs:
                out[key]["images_per_second"] = {"defaults": mine, "reference": theirs}
                out[key]["speedup"] = round(mine / theirs, 3)
    return out


def _images_per_second(results: dict, prefix: str) -> float | None:
    """Training images per second of a steady epoch, the mean over the seeds' runs; the package's
    epoch includes its checkpoint and backup writes (and a validation pass when the run holds one
    out), the reference code's has none of them, so this favours the reference."""
    rates = [
        r["train_examples"] / r["steady_epoch_seconds"]
        for name, r in results.items()
        if name.startswith(prefix) and r.get("steady_epoch_seconds")
    ]
    return round(statistics.mean(rates), 1) if rates else None


if __name__ == "__main__":
    sys.exit(main())
