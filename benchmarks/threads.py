"""Issue 29, item 3: TensorFlow's inter-op and intra-op threads for CPU training, chosen by measurement.

Each (setting, round) is one child process, which sets the two thread counts before TensorFlow runs
anything (they cannot change afterwards) and then measures training throughput, as images per
second of one whole `fit` call of several epochs after a warm-up `fit`:
  cnn            the CIFAR-10 CNN as `train cifar10_cnn` builds it here (the dtype policy and steps
                 per execution of `device_settings("cpu", mixed_precision="auto")`), fed by the
                 package's pipeline (`data.prepare`, cached in memory) of random 32x32x3 images
  cnn augmented  the same CNN fed by the same pipeline with `--augment flip,crop`'s augmenter: the
                 pipeline's threads compete with the model's
  mlp            the MLP (784-128-64-10) as `train scratch_mlp` builds it on the CPU (float32, XLA,
                 16 steps per execution), from memory
The settings run in an order rotated every round and reversed every other round, so that a machine
that slows down (or another job starting) does not favour one setting; each row is the median over
the rounds, its ratio to the package's default on this CPU (inter-op 1 without AVX-512, else
TensorFlow's; intra-op TensorFlow's), and the
spread (min..max). "0" is TensorFlow's own choice. Each child reports the load average (`uptime`)
when it starts: the machine has 2 cores and other work on it shows up there.

    python benchmarks/threads.py                    # 7 settings x 3 rounds, about 15 minutes on 2 cores
    python benchmarks/threads.py --quick            # 3 settings x 2 rounds, small sizes, not written
    python benchmarks/threads.py --settings 1:0,0:0 --rounds 5 --only cnn

Results go to benchmarks/threads_results.json (not with --quick or --no-write).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.device import device_settings  # noqa: E402
from kerastune_flow.runtime.process import cpu_inter_op_threads  # noqa: E402

OUT = REPO / "benchmarks" / "threads_results.json"
BATCH = 64
# (inter-op, intra-op); 0 is TensorFlow's default. The package's default comes first.
DEFAULT = (cpu_inter_op_threads() or 0, 0)  # the package's choice on this CPU (0: TensorFlow's)
# Intra-op 2 is measured once (with inter-op 1): TensorFlow's default intra-op is one thread per core.
GRID = [DEFAULT, *(p for p in [(1, 0), (2, 0), (0, 0), (1, 1), (2, 1), (0, 1), (1, 2)] if p != DEFAULT)]
QUICK_GRID = [DEFAULT, *(p for p in [(1, 0), (0, 0), (2, 1)] if p != DEFAULT)]
# name: (builder, input shape, recipe's mixed_precision, XLA on the CPU, augmented, examples, epochs).
# Examples are whole executions of 16 batches of 64; epochs make each timed fit last >= 3 s here.
WORKLOADS = {
    "cnn": (models.build_cifar10_cnn, (32, 32, 3), "auto", False, False, 8192, 2),
    "cnn augmented": (models.build_cifar10_cnn, (32, 32, 3), "auto", False, True, 8192, 1),
    "mlp": (models.build_scratch_mlp, (28, 28, 1), "off", True, False, 61440, 3),
}
QUICK_SCALE = 8  # --quick: a eighth of the examples, one epoch


def _label(setting: tuple[int, int]) -> str:
    inter, intra = setting
    return f"inter-op {inter or 'TF'}, intra-op {intra or 'TF'}"


def measure(name: str, quick: bool) -> dict:
    """Trains one workload in this process: a warm-up fit, then one timed fit of several epochs."""
    build, shape, precision, xla_on_cpu, augmented, examples, epochs = WORKLOADS[name]
    if quick:
        examples, epochs = examples // QUICK_SCALE, 1
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (examples, *shape)).astype(np.float32)  # uint8 values, as decoded images
    y = rng.integers(0, 10, examples).astype(np.int32)
    settings = device_settings("cpu", mixed_precision=precision, xla_on_cpu=xla_on_cpu)
    keras.config.set_dtype_policy(settings.dtype_policy)
    model = build(
        input_shape=shape,
        num_classes=10,
        steps_per_execution=settings.steps_per_execution,
        jit_compile=settings.jit_compile,
    )
    keras.config.set_dtype_policy("float32")
    augmenter = data.make_augmenter(["flip", "crop"], shape) if augmented else None
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    pipe = data.prepare(ds, batch_size=BATCH, training=True, cache=True, augmenter=augmenter)
    model.fit(pipe.take(2 * settings.steps_per_execution), epochs=1, verbose=0)  # warm-up: tracing
    start = time.perf_counter()
    model.fit(pipe, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    return {
        "images_per_second": examples * epochs / seconds,
        "seconds": seconds,
        "examples": examples,
        "epochs": epochs,
        "dtype_policy": settings.dtype_policy,
        "steps_per_execution": settings.steps_per_execution,
        "jit_compile": settings.jit_compile,
    }


def child(setting: tuple[int, int], names: list[str], quick: bool) -> dict:
    """The child process's work: threads first, before TensorFlow runs anything, then each workload."""
    load = os.getloadavg()  # what `uptime` shows, before this process loads the CPU
    inter, intra = setting
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    keras.utils.set_random_seed(0)
    results = {name: measure(name, quick) for name in names}
    # Still what was asked once TensorFlow runs: nothing in between changed or pre-empted it.
    in_effect = (
        tf.config.threading.get_inter_op_parallelism_threads(),
        tf.config.threading.get_intra_op_parallelism_threads(),
    )
    if in_effect != setting:
        raise RuntimeError(f"threads {in_effect} in effect, not the setting. Received: setting={setting}")
    return {"setting": list(setting), "load_at_start": [round(v, 2) for v in load], "workloads": results}


def run_child(setting: tuple[int, int], names: list[str], quick: bool) -> dict:
    """One child process for one (setting, round); returns what it measured."""
    # The thread variables would override the setting (and the package leaves a user's value alone).
    env = {k: v for k, v in os.environ.items() if k not in ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS")}
    inter, intra = setting
    command = [sys.executable, str(Path(__file__).resolve()), "--child", f"{inter}:{intra}", "--only", ",".join(names)]
    proc = subprocess.run([*command, *(["--quick"] if quick else [])], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the child failed:\n{proc.stderr[-3000:]}\nReceived: setting={setting}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def rounds_order(settings: list, rounds: int) -> list[list]:
    """Each round's order: rotated by an equal share of the settings each round, reversed every
    other round, so that every setting runs early, late, before and after the others."""
    step = max(1, len(settings) // rounds)
    orders = []
    for r in range(rounds):
        k = (r * step) % len(settings)
        order = settings[k:] + settings[:k]
        orders.append(order[::-1] if r % 2 else order)
    return orders


def summarise(rows: list[dict], settings: list, names: list[str]) -> dict:
    """Per workload and setting: median images/s over the rounds, ratio to the default, spread."""
    summary = {}
    for name in names:
        per = {}
        for setting in settings:
            values = [r["workloads"][name]["images_per_second"] for r in rows if tuple(r["setting"]) == setting]
            per[_label(setting)] = {
                "setting": list(setting),
                "median_images_per_second": round(statistics.median(values), 1),
                "min": round(min(values), 1),
                "max": round(max(values), 1),
                "runs": [round(v, 1) for v in values],
            }
        base = per[_label(DEFAULT)]
        for row in per.values():
            row["vs_default"] = round(row["median_images_per_second"] / base["median_images_per_second"], 3)
            paired = paired_ratios(rows, name, tuple(row["setting"]))
            # Paired: each round's ratio to the default's run of the same round (minutes apart, so the
            # machine's drift cancels), their median, and in how many rounds the setting was faster.
            row["paired_median"] = round(statistics.median(paired), 3) if paired else None
            row["rounds_faster"] = sum(p > 1 for p in paired)
            row["rounds_paired"] = len(paired)
            # Clearly better: its slowest run beats the default's fastest (the spreads do not overlap).
            row["clearly_better"] = row["min"] > base["max"]
            row["clearly_worse"] = row["max"] < base["min"]
        summary[name] = per
    return summary


def paired_ratios(rows: list[dict], name: str, setting: tuple[int, int]) -> list[float]:
    """Per round, the setting's images/s over the default's in the same round."""
    speed = {(r["round"], tuple(r["setting"])): r["workloads"][name]["images_per_second"] for r in rows if "round" in r}
    rounds = sorted({r for r, _ in speed})
    return [speed[r, setting] / speed[r, DEFAULT] for r in rounds if (r, setting) in speed and (r, DEFAULT) in speed]


def print_table(summary: dict, rows: list[dict], rounds: int) -> None:
    loads = [r["load_at_start"][0] for r in rows]
    print(
        f"# threads, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; one child process per setting and "
        f"round, {rounds} rounds rotated and alternated, median of whole fit; 'TF': TensorFlow's default; "
        f"1-minute load at the children's start {min(loads):.2f}..{max(loads):.2f} "
        f"(median {statistics.median(loads):.2f})"
    )
    for name, per in summary.items():
        one = rows[0]["workloads"][name]
        print(
            f"# {name}: {one['examples']} examples x {one['epochs']} epochs, batch {BATCH}, {one['dtype_policy']}, "
            f"{one['steps_per_execution']} steps per execution, XLA {'on' if one['jit_compile'] else 'off'}"
        )
        print(f"{'setting':<28}{'images/s':>10}{'vs default':>12}{'min..max':>18}{'paired':>9}{'faster':>8}  verdict")
        for label, row in per.items():
            verdict = "clearly better" if row["clearly_better"] else "clearly worse" if row["clearly_worse"] else ""
            spread = f"{row['min']:.0f}..{row['max']:.0f}"
            paired = "-" if row["paired_median"] is None else f"{row['paired_median']:.2f}x"
            faster = f"{row['rounds_faster']}/{row['rounds_paired']}"
            print(
                f"{label:<28}{row['median_images_per_second']:>10.0f}{row['vs_default']:>11.2f}x{spread:>18}"
                f"{paired:>9}{faster:>8}  {verdict}"
            )
    print(
        "(paired: the median over rounds of the setting's speed over the default's in the same round; faster: "
        "the rounds in which it was faster)"
    )


def _settings(text: str) -> list[tuple[int, int]]:
    pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    if any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise SystemExit(f"settings are INTER:INTRA pairs of counts >= 0. Received: settings={text!r}")
    return [DEFAULT] + [p for p in pairs if p != DEFAULT]  # the default is always measured: the ratios need it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 settings x 2 rounds at an eighth of the size")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 2 with --quick)")
    parser.add_argument(
        "--settings", help="INTER:INTRA,... (0: TensorFlow's default); the package's default on this CPU is added"
    )
    parser.add_argument("--only", default=",".join(WORKLOADS), help=f"workloads, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {OUT.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # INTER:INTRA, in a child process
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if any(n not in WORKLOADS for n in names):
        parser.error(f"--only takes workloads of {', '.join(WORKLOADS)}. Received: only={args.only!r}")
    if args.child:
        inter, intra = (int(v) for v in args.child.split(":"))
        print("RESULT " + json.dumps(child((inter, intra), names, args.quick)), flush=True)
        return 0
    print(f"# {machine.describe()}", flush=True)  # thread counts that suit one CPU may not suit another
    settings = _settings(args.settings) if args.settings else (QUICK_GRID if args.quick else GRID)
    rounds = args.rounds or (2 if args.quick else 3)
    rows = []
    for r, order in enumerate(rounds_order(settings, rounds)):
        for setting in order:
            row = run_child(setting, names, args.quick)
            row["round"] = r
            rows.append(row)
            speeds = ", ".join(f"{n} {w['images_per_second']:.0f} img/s" for n, w in row["workloads"].items())
            load = row["load_at_start"][0]
            print(f"round {r + 1}, {_label(setting)}: load {load:.2f} at start; {speeds}", flush=True)
    summary = summarise(rows, settings, names)
    print_table(summary, rows, rounds)
    if not (args.quick or args.no_write):
        result = {
            "machine": machine.describe(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python benchmarks/threads.py", *(argv if argv is not None else sys.argv[1:])]),
            "default": list(DEFAULT),
            "rounds": rounds,
            "summary": summary,
            "rows": rows,
        }
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"# written to {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
