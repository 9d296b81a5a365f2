"""Runs every benchmark and prints its table: each row a ratio against a baseline measured in
the same process.

    python benchmarks/run_all.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/run_all.py             # the full sizes (RESULTS.md holds a run)
    python benchmarks/run_all.py --only cnn  # the workloads whose title names the CNN

Workloads (each its own script, runnable alone with more options; see its --help):
  train_step.py      scratch MLP and CIFAR-10 CNN: package vs plain fit vs the PyTorch loop; the CNN
                     again with TensorFlow's default inter-op threads (a per-process setting; the
                     package's own choice on a CPU with AVX-512)
  input_pipeline.py  folder pipeline throughput vs model consumption, time waiting for input
  feature_cache.py   frozen-base stage: cached features vs the full forward pass
  prefix_cache.py    stage 2 of a fine-tune: the frozen prefix cached vs the full forward pass
  fold_cache.py      cross-validation: K folds computing the frozen base's features once vs each its own
  short_epochs.py    the CNN per image at 3,000 and 20,000 examples an epoch (the fixed cost of an epoch)
  keras_epoch_cost.py  the same steps as short epochs, one iterator, or one long epoch: Keras' share
  scaling.py         CNN throughput at batch 32..256, step breakdown, MirroredStrategy cost
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import machine

HERE = Path(__file__).resolve().parent
WORKLOADS = [
    ("scratch MLP, MNIST-shaped", ["train_step.py", "--model", "mlp", "--spe", "1,16", "--jit", "--bf16"]),
    ("CIFAR-10 CNN", ["train_step.py", "--model", "cnn", "--spe", "1,16", "--jit", "--bf16"]),
    (
        "CIFAR-10 CNN, TensorFlow's default threads",
        ["train_step.py", "--model", "cnn", "--spe", "1,16", "--inter-op", "0"],
    ),
    ("input pipeline, JPEG folder", ["input_pipeline.py"]),
    ("frozen-base stage, cached features", ["feature_cache.py"]),
    ("fine-tune stage 2, cached frozen prefix", ["prefix_cache.py"]),
    ("cross-validation folds, the frozen base's features once", ["fold_cache.py"]),
    ("CNN short epochs, fixed cost per epoch", ["short_epochs.py"]),
    ("CNN epochs without the package's pipeline: Keras' own cost per epoch", ["keras_epoch_cost.py"]),
    ("CNN scaling and the distribution code path", ["scaling.py"]),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated words; run only the workloads whose title contains one of them "
        "(for example --only cnn,pipeline)",
    )
    args = parser.parse_args(argv)
    words = [word.strip().lower() for word in args.only.split(",") if word.strip()]
    chosen = [(title, command) for title, command in WORKLOADS if not words or any(w in title.lower() for w in words)]
    if not chosen:
        parser.error(f"--only {args.only!r} matches no workload; the titles are: " + "; ".join(t for t, _ in WORKLOADS))
    print(f"# {machine.describe()}", flush=True)  # ratios depend on the CPU: say which one
    failures = 0
    for title, command in chosen:
        print(f"\n## {title}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / command[0]), *command[1:], *(["--quick"] if args.quick else [])],
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if lines:
            print("\n".join(lines))
        if proc.returncode != 0 or not lines:  # a failure shows its traceback, not just the header
            print(f"FAILED (exit code {proc.returncode}):\n{proc.stderr[-2000:]}")
        print(f"({time.perf_counter() - start:.0f} s)")
        failures += proc.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
