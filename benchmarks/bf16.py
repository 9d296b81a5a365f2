"""Issue 19, part 1: float32 against mixed_bfloat16 on this CPU, to decide `--mixed-precision auto`.

Each row is one `python -m kerastune_flow.run train ...` command, float32 and bfloat16 alternating
seed by seed (which goes first swaps with the seed, so a machine that slows down during the run
does not favour one side): the CIFAR-10 CNN on the CIFAR-10 JPEG folder and the MNIST MLP, 10
epochs, seeds 0, 1 and 2, and in this process the VGG16 feature pass (inference, weights=None,
the cost that matters for the stage-1 feature cache) at 64x64, median of repeats, alternating.

    python benchmarks/bf16.py                      # about 25 minutes on 2 CPU cores
    python benchmarks/bf16.py --only vgg16 --repeats 3

Results go to benchmarks/bf16_results.json. Needs ../shared/datasets (CIFAR-10 JPEG, MNIST).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import accuracy  # noqa: E402  (_cli, _prepare_folders: the CIFAR-10 folder)
import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "bf16_results.json"
SEEDS = (0, 1, 2)
PRECISIONS = ("off", "bfloat16")
EPOCHS = 10


def train_rows(name: str, args: list[str], work: Path, seeds=SEEDS) -> dict:
    """Runs `train` for each seed and precision; returns the rows and both sides' means."""
    rows = []
    for seed in seeds:
        order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            run_dir = work / "runs" / f"bf16_{name}_{precision}_s{seed}"
            flags = [*args, "--epochs", str(EPOCHS), "--seed", str(seed), "--mixed-precision", precision]
            flags += ["--no-tensorboard", "--quiet", "--run-dir", str(run_dir)]
            results, wall, shown = accuracy._cli(flags, work / f"bf16_{name}.log")
            row = {
                "command": shown,
                "precision": precision,
                "seed": seed,
                "test_accuracy": results["test"]["accuracy"],
                "train_seconds": results["train_seconds"],
                "steady_epoch_seconds": accuracy.steady_epoch_seconds(accuracy.history_epoch_seconds(run_dir)),
                "epochs_run": results["epochs_run"],
                "wall_seconds": round(wall, 1),
            }
            print(
                f"[{name}] seed {seed} {precision}: test {100 * row['test_accuracy']:.2f} %, "
                f"{row['train_seconds']:.1f} s training, {row['steady_epoch_seconds']:.2f} s a steady epoch",
                flush=True,
            )
            rows.append(row)
    summary = {}
    for precision in PRECISIONS:
        mine = [r for r in rows if r["precision"] == precision]
        summary[precision] = {
            "mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in mine),
            "mean_train_seconds": statistics.mean(r["train_seconds"] for r in mine),
            "mean_steady_epoch_seconds": statistics.mean(r["steady_epoch_seconds"] for r in mine),
        }
    off, bf = summary["off"], summary["bfloat16"]
    summary["accuracy_difference_points"] = round(100 * (bf["mean_test_accuracy"] - off["mean_test_accuracy"]), 2)
    summary["speedup_train"] = round(off["mean_train_seconds"] / bf["mean_train_seconds"], 3)
    summary["speedup_steady_epoch"] = round(off["mean_steady_epoch_seconds"] / bf["mean_steady_epoch_seconds"], 3)
    print(f"[{name}] {json.dumps({k: summary[k] for k in list(summary)[2:]})}", flush=True)
    return {"rows": rows, "summary": summary}


def vgg16_feature_pass(repeats: int, size: int = 64, images: int = 512, batch: int = 64) -> dict:
    """VGG16's convolutional base (weights=None) over `images` random pictures, per policy."""
    import keras
    import numpy as np
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, (images, size, size, 3)).astype("float32")
    models, outputs = {}, {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
        fn = tf.function(lambda b, m=base: m(b, training=False))
        batches = [fn(x[i : i + batch]).numpy().astype("float32") for i in range(0, images, batch)]
        outputs[policy] = np.concatenate(batches)
        models[policy] = fn
    keras.config.set_dtype_policy("float32")
    times = {policy: [] for policy in models}
    for r in range(repeats):
        for policy in models if r % 2 == 0 else list(models)[::-1]:
            start = time.perf_counter()
            for i in range(0, images, batch):
                models[policy](x[i : i + batch]).numpy()
            times[policy].append(time.perf_counter() - start)
    rate = {policy: images / statistics.median(t) for policy, t in times.items()}
    scale = float(np.abs(outputs["float32"]).max()) or 1.0
    result = {
        "images": images,
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "speedup": round(rate["mixed_bfloat16"] / rate["float32"], 3),
        "largest_relative_difference": float(np.abs(outputs["float32"] - outputs["mixed_bfloat16"]).max() / scale),
    }
    print(f"[vgg16 feature pass] {json.dumps(result)}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/kerastune_flow_accuracy", help="scratch folder for data and runs")
    parser.add_argument("--only", choices=("cnn", "mlp", "vgg16"), help="one workload (the others' results are kept)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the VGG16 feature pass")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    print(f"# {machine.describe()}", flush=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(
        issue=19,
        date=time.strftime("%Y-%m-%d"),
        hardware=machine.describe(),
        cpu={"model": machine.cpu_model(), "flags": machine.cpu_flags(), "cores": os.cpu_count()},
        versions=machine.versions(),
    )
    if args.only in (None, "vgg16"):
        results["vgg16_feature_pass"] = vgg16_feature_pass(args.repeats)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "cnn", "mlp") and not accuracy.SHARED.is_dir():
        print(f"{accuracy.SHARED} is absent: the train rows need CIFAR-10 JPEG and MNIST.", file=sys.stderr)
        return 2
    if args.only in (None, "cnn"):
        cifar, _, _ = accuracy._prepare_folders(work)
        results["cifar10_cnn"] = train_rows("cnn", ["cifar10_cnn", "--data", str(cifar)], work)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "mlp"):
        mnist = ["scratch_mlp", "--data", "mnist", "--manual-dir", str(accuracy.SHARED / "mnist")]
        results["scratch_mlp"] = train_rows("mlp", mnist, work)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
