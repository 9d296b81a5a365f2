"""Issue 18's measurement of `run export`: per recipe (and backbone) and format, the artifact's
size, its top-1 agreement with the Keras model and their largest output difference on the test
split, its accuracy, and its latency per image at batch 1 and 32 against the Keras model's.

Each case is trained here, offline, on the digits that ship in the package (10 classes, 1,780 grey PNGs
at 32x32, grey for the from-scratch recipes and RGB for the backbones; the run's own 10 % test
split, 179 images, checks every export):

  scratch_mlp, cifar10_cnn         5 epochs
  vgg16_features on vgg16          2 epochs   (no ImageNet weights exist on this machine: the bases
  vgg16_finetune on each backbone  1 + 1 epochs are random, so their accuracy says nothing; the
                                               agreement, sizes and speeds are what is measured)

Formats: saved_model, litert and onnx in float32, then litert and onnx in int8 (calibrated on 500
training images). Latency is the median wall time of one call of `model.predict_on_batch` (Keras)
or of the artifact's runtime (`tf.saved_model.load(...).serve`, the LiteRT interpreter with its
default XNNPACK delegate, onnxruntime on the CPU provider), divided by the batch, after warm-up.

    python benchmarks/export.py                       # every case: about 15 minutes on 2 CPU cores
    python benchmarks/export.py --only cifar10_cnn,vgg16_finetune-mobilenetv2

Results go to benchmarks/export_results.json (a run with --only keeps the other cases). Run it on a
quiet machine: latency is measured while nothing else runs. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402

from kerastune_flow import make_config, train_and_evaluate  # noqa: E402
from kerastune_flow.deploy import artifacts, export

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "kerastune_flow" / "sample_data" / "digits"  # `--data digits`
IMAGE_SIZE = (32, 32)
FIXED = dict(weights="none", tensorboard=False, verbose=0, image_size=IMAGE_SIZE, seed=0)
# case -> (recipe, config changes)
CASES = {
    "scratch_mlp": ("scratch_mlp", dict(epochs=5)),
    "cifar10_cnn": ("cifar10_cnn", dict(epochs=5)),
    "vgg16_features-vgg16": ("vgg16_features", dict(backbone="vgg16", epochs=2)),
    **{
        f"vgg16_finetune-{b}": ("vgg16_finetune", dict(backbone=b, head_epochs=1, epochs=2))
        for b in ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0")
    },
}
EXPORTS = [("saved_model", None), ("litert", None), ("onnx", None), ("litert", "int8"), ("onnx", "int8")]
RUNTIME_PACKAGES = ("onnxruntime", "onnx", "tf2onnx", "ai-edge-litert")
BATCHES = (1, 32)
MIN_SECONDS = 1.0  # time each latency for at least this long (and at least 5 calls)


def latency_ms(call, batch: np.ndarray) -> float:
    """Median milliseconds per image of `call(batch)`, after three warm-up calls."""
    for _ in range(3):
        call(batch)
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < MIN_SECONDS:
        t = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)) / len(batch)


def run_case(name: str, work: Path) -> dict:
    recipe, changes = CASES[name]
    config = make_config(recipe, data=str(DATA), **FIXED, **changes)
    run_dir = work / name
    start = time.perf_counter()
    result = train_and_evaluate(config, run_dir, overwrite=True)
    out = {"recipe": recipe, **changes, "train_seconds": round(time.perf_counter() - start, 1)}
    out["test_accuracy"] = result.results["test"]["accuracy"]
    model = keras.saving.load_model(run_dir / "model.keras", compile=False)
    out["params"] = model.count_params()
    rng = np.random.default_rng(0)
    shape = tuple(model.input_shape[1:])  # grey for the from-scratch recipes, RGB for the backbones
    batches = {b: rng.uniform(0, 255, (b, *shape)).astype(np.float32) for b in BATCHES}
    out["keras"] = {f"ms_per_image_batch{b}": latency_ms(model.predict_on_batch, x) for b, x in batches.items()}
    out["exports"] = {}
    for format, quantize in EXPORTS:
        label = format + (f"-{quantize}" if quantize else "")
        try:
            record = export.export_model(run_dir, format=format, quantize=quantize, overwrite=True)
        except Exception as error:  # a failure is a result too
            out["exports"][label] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
            print(f"  {label}: FAILED {out['exports'][label]['error']}", flush=True)
            continue
        artifact, _ = artifacts.load_artifact(record["out"])
        parity = record["parity"]
        row = {
            "size_bytes": record["size_bytes"],
            "top1_agreement": parity["top1_agreement"],
            "max_abs_diff": parity["max_abs_diff"],
            "artifact_accuracy": parity["artifact_accuracy"],
            "accuracy_drop_points": parity["accuracy_drop_points"],
            "size_ratio": parity.get("size_ratio"),
            "converter": record["converter"],
            "runtime": record["runtime"],
            "export_seconds": record["export_seconds"],
        }
        for b, x in batches.items():
            row[f"ms_per_image_batch{b}"] = latency_ms(lambda images, a=artifact, b=b: a(images, batch_size=b), x)
        out["exports"][label] = row
        print(
            f"  {label}: {row['size_bytes']:,} B, top-1 {100 * row['top1_agreement']:.1f} %, "
            f"diff {row['max_abs_diff']:.1e}, {row['ms_per_image_batch1']:.2f} / {row['ms_per_image_batch32']:.3f} ms",
            flush=True,
        )
    return out


def table(results: dict) -> str:
    """The README's table: one row per case and format."""
    lines = [
        "| model | format | size | top-1 agreement | largest difference | accuracy (drop) | ms/image b1 | b32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, case in results["cases"].items():
        k = case["keras"]
        lines.append(
            f"| {name} | keras | {4 * case['params'] / 1e6:.2f} MB (float32 weights) | | | "
            f"{100 * case['test_accuracy']:.1f} % | {k['ms_per_image_batch1']:.2f} | {k['ms_per_image_batch32']:.3f} |"
        )
        for label, row in case["exports"].items():
            if "error" in row:
                lines.append(f"| {name} | {label} | failed: {row['error'][:80]} | | | | | |")
                continue
            lines.append(
                f"| {name} | {label} | {row['size_bytes'] / 1e6:.2f} MB | {100 * row['top1_agreement']:.1f} % | "
                f"{row['max_abs_diff']:.1e} | {100 * row['artifact_accuracy']:.1f} % "
                f"({row['accuracy_drop_points']:+.1f}) | {row['ms_per_image_batch1']:.2f} | "
                f"{row['ms_per_image_batch32']:.3f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma list of cases, of {', '.join(CASES)}")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-export"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "export_results.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = args.only.split(",") if args.only else list(CASES)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() and args.only else {"cases": {}}
    runtimes = {name: version(name) for name in RUNTIME_PACKAGES}
    results.update(hardware=machine.describe(), runtimes=runtimes, date=time.strftime("%Y-%m-%d"))
    results["data"] = f"{DATA.relative_to(REPO)} at 32x32, the run's own test split"
    print(f"# {machine.describe()}\n# {', '.join(f'{k} {v}' for k, v in runtimes.items())}", flush=True)
    start = time.perf_counter()
    for name in names:
        print(f"{name}:", flush=True)
        results["cases"][name] = run_case(name, Path(args.work))
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n# {machine.describe()}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
