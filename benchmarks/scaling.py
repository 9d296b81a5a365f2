"""Scaling of the CIFAR-10 CNN: throughput against the batch size, where a step's time goes, and
MirroredStrategy over two logical CPU devices against one device.

Part 1, batch 32/64/128/256 on the default strategy (the package's pipeline and builder):
  images/s and ms per training step, and its breakdown: the input pipeline alone (cached data,
  shuffle, batch, prefetch), the forward pass alone, and backward + optimizer update (the rest).
  The ratio is against batch 64, the reference setting.
Part 2, the distribution code path: the CPU is split into two logical devices
  (`tf.config.set_logical_device_configuration`), and the package trains the same network at the
  same global batch (per-replica batch x 2) on `get_strategy("mirrored")`, on MirroredStrategy
  over one device (the distribution code path alone: distributed input, replica context,
  all-reduce) and on the default strategy, alternating. The two logical devices share the same
  two cores, so no speed-up is possible here; the rows show what the machinery costs.

    python benchmarks/scaling.py --quick
    python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

# Before anything initialises the runtime: two logical CPU devices for MirroredStrategy.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.strategy import get_strategy, global_batch_size  # noqa: E402

SHAPE = (32, 32, 3)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dataset(x, y, batch: int) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return data.prepare(ds, batch_size=batch, training=True, cache=True)


def batch_sizes(x, y, sizes, repeats: int) -> list[tuple]:
    """Rows (batch, epoch s, steps, input s, forward s) for each batch size, default strategy."""
    setups = {}
    for batch in sizes:
        model = models.build_cifar10_cnn(input_shape=SHAPE)
        ds = _dataset(x, y, batch)
        batches = [b for b, _ in ds]
        forward = tf.function(lambda images, m=model: m(images, training=True))
        model.fit(ds, epochs=1, verbose=0, shuffle=False)  # warm-up: trace, fill the cache
        for images in batches[:2]:
            forward(images)
        setups[batch] = (model, ds, batches, forward)
    epoch, inputs, forwards = ({b: [] for b in sizes} for _ in range(3))
    for _ in range(repeats):
        for batch, (model, ds, batches, forward) in setups.items():
            epoch[batch].append(_timed(lambda m=model, d=ds: m.fit(d, epochs=1, verbose=0, shuffle=False)))
            inputs[batch].append(_timed(lambda d=ds: [None for _ in d]))
            forwards[batch].append(_timed(lambda f=forward, b=batches: [f(images) for images in b][-1].numpy()))
    return [
        (
            b,
            statistics.median(epoch[b]),
            len(setups[b][2]),
            statistics.median(inputs[b]),
            statistics.median(forwards[b]),
        )
        for b in sizes
    ]


def mirrored_vs_one(x, y, per_replica: int, repeats: int) -> dict[str, float]:
    """Median epoch seconds on MirroredStrategy (2 logical CPUs, and 1 device) and the default
    strategy, at the same global batch."""
    runs = {}
    mirrored = get_strategy("mirrored")
    global_batch = global_batch_size(per_replica, mirrored)
    one_device = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    candidates = (
        ("mirrored, 2 logical CPUs", mirrored),
        ("mirrored, 1 device", one_device),
        ("default strategy", tf.distribute.get_strategy()),
    )
    for name, strategy in candidates:
        with strategy.scope():
            model = models.build_cifar10_cnn(input_shape=SHAPE)
        ds = _dataset(x, y, global_batch)
        model.fit(ds, epochs=1, verbose=0, shuffle=False)  # warm-up
        runs[name] = (model, ds)
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, ds) in runs.items():
            times[name].append(_timed(lambda m=model, d=ds: m.fit(d, epochs=1, verbose=0, shuffle=False)))
    return {name: statistics.median(t) for name, t in times.items()}, global_batch, mirrored.num_replicas_in_sync


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4,096 examples, 3 repetitions")
    parser.add_argument("--examples", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batch-sizes", default="32,64,128,256")
    parser.add_argument("--per-replica", type=int, default=64, help="per-replica batch of part 2")
    args = parser.parse_args(argv)
    print(f"# {machine.describe()}", flush=True)  # ratios depend on the CPU: say which one
    n = args.examples or (4_096 if args.quick else 20_000)
    repeats = args.repeats or (3 if args.quick else 5)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8).astype("float32")
    y = rng.integers(0, 10, n).astype(np.int32)
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    rows = batch_sizes(x, y, sizes, repeats)
    print(
        f"# CNN scaling, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"{n} examples 32x32x3, {repeats} repetitions, median"
    )
    print(
        f"{'batch':>6}{'images/s':>11}{'ms/step':>10}{'input ms':>10}{'forward ms':>12}{'bwd+update ms':>15}"
        f"{'vs batch 64':>13}"
    )
    reference = next((n / r[1] for r in rows if r[0] == 64), n / rows[0][1])
    for batch, seconds, steps, input_s, forward_s in rows:
        step_ms = 1000 * seconds / steps
        input_ms, forward_ms = 1000 * input_s / steps, 1000 * forward_s / steps
        rest = max(0.0, step_ms - forward_ms)
        print(
            f"{batch:>6}{n / seconds:>11.0f}{step_ms:>10.2f}{input_ms:>10.2f}{forward_ms:>12.2f}{rest:>15.2f}"
            f"{n / seconds / reference:>12.2f}x"
        )
    print("(input ms: the pipeline alone, overlapped with compute by prefetch during training)")

    medians, global_batch, replicas = mirrored_vs_one(x, y, args.per_replica, repeats)
    print(f"\n# distribution code path: global batch {global_batch} ({args.per_replica} per replica x {replicas})")
    print(f"{'path':<28}{'epoch s':>10}{'images/s':>12}{'vs default':>12}")
    base = medians["default strategy"]
    for name, seconds in medians.items():
        print(f"{name:<28}{seconds:>10.3f}{n / seconds:>12.0f}{base / seconds:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
