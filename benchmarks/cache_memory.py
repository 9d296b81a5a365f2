"""What the image cache costs as the data grows: peak memory and seconds per epoch of `train`.

Each row is one `kerastune-flow train cifar10_cnn` in its own process on a folder of generated
JPEG files (128x128 sources, 10 classes, resized by the run), 2 epochs: the peak resident memory
of the process (its whole life: TensorFlow, the model, every cache), the first epoch (reads and
decodes every file, fills the cache) and the second (what every later epoch costs), per image.
"memory" is the package's default on this machine (the split fits the budget: cached, as uint8);
"off" streams from the files every epoch (what a split above the budget gets). The baseline row,
0 images, is a run of 200 images: the process without data.

    python benchmarks/cache_memory.py --quick      # 4,000 images at 64x64, memory and off
    python benchmarks/cache_memory.py              # 4,000 / 16,000 at 64x64, 40,000 at 96x96

Results go to benchmarks/cache_memory_results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import machine  # noqa: E402
from input_pipeline import write_jpeg_folder  # noqa: E402

OUT = REPO / "benchmarks" / "cache_memory_results.json"
# `python -m kerastune_flow.run ...` that writes its peak resident memory (VmHWM, KB) to a file at exit
LAUNCH = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(out, "w").write(line.split()[1])
atexit.register(peak)
sys.argv[0] = "kerastune-flow"
runpy.run_module("kerastune_flow.run", run_name="__main__")
"""
FULL = [(4_000, 64), (16_000, 64), (40_000, 96)]
QUICK = [(4_000, 64)]


def run(folder: Path, size: int, cache: str, run_dir: Path) -> dict:
    """One `train` in a child process: its peak memory and its epochs' seconds from history.csv."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    peak_file = run_dir.with_suffix(".peak")
    command = [sys.executable, "-c", LAUNCH, str(peak_file), "train", "cifar10_cnn", "--data", str(folder)]
    command += ["--image-size", str(size), "--epochs", "2", "--cache", cache, "--seed", "0", "--run-dir", str(run_dir)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak_kb = int(peak_file.read_text())
    with open(run_dir / "history.csv") as f:
        seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(f)]
    config = json.loads((run_dir / "config.json").read_text())
    return {"train_images": config["sizes"]["train"], "peak_rss_mb": peak_kb / 1024, "epochs": seconds, "wall": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4,000 images at 64x64 only")
    parser.add_argument("--folders", default=tempfile.gettempdir(), help="where the generated folders go (kept)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the results file alone")
    args = parser.parse_args(argv)
    header = machine.describe()
    print(f"# {header}", flush=True)
    rows = QUICK if args.quick else FULL
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        small = write_jpeg_folder(Path(tmp) / "baseline", 200, size=128)
        base = run(small, 64, "memory", Path(tmp) / "run_baseline")
        print(f"baseline (200 images): peak {base['peak_rss_mb']:.0f} MB", flush=True)
        for count, size in rows:
            folder = Path(args.folders) / f"kerastune_cache_memory_{count}"
            if not folder.exists():
                write_jpeg_folder(folder, count, size=128)
            for cache in ("off", "memory"):
                row = run(folder, size, cache, Path(tmp) / f"run_{count}_{size}_{cache}")
                row.update(images=count, size=size, cache=cache)
                row["mb_per_image"] = (row["peak_rss_mb"] - base["peak_rss_mb"]) / row["train_images"]
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n# image cache, {time.strftime('%Y-%m-%d')}; {header}; train cifar10_cnn, 2 epochs")
    print(f"# baseline process (200 images): peak {base['peak_rss_mb']:.0f} MB")
    columns = ("images", 8), ("size", 7), ("cache", 8), ("peak MB", 9), ("KB/img", 8), ("epoch 1 s", 11)
    print("".join(f"{name:>{width}}" for name, width in (*columns, ("epoch 2 s", 11), ("ms/img", 8))))
    for r in results:
        per = r["epochs"][-1] / r["train_images"] * 1000
        print(
            f"{r['images']:>8}{r['size']:>7}{r['cache']:>8}{r['peak_rss_mb']:>9.0f}{r['mb_per_image'] * 1024:>8.1f}"
            f"{r['epochs'][0]:>11.1f}{r['epochs'][-1]:>11.1f}{per:>8.2f}"
        )
    if not args.no_write:
        OUT.write_text(json.dumps({"machine": header, "baseline": base, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
