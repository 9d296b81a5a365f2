"""Keras `fit`'s own cost per epoch, apart from the package's pipeline (issue 19, short epochs).

The CIFAR-10 CNN (float32, 16 steps per execution) on 47 cached batches of 64 random images, no
shuffling and nothing of the package's input pipeline, the same steps three ways, alternating:
  new iterator each epoch   `fit(ds, epochs=11)`: Keras makes a data iterator every epoch
  one iterator              `fit(ds.repeat(), steps_per_epoch=47, epochs=11)`: one for the whole fit
  one long epoch / 10       `fit(ds.repeat(10), epochs=1)`, divided by 10: no epoch boundary at all
If the first equals the last, an epoch boundary costs Keras nothing, and a fixed cost per epoch seen
in `short_epochs.py` lies in the pipeline that starts each epoch.

    python benchmarks/keras_epoch_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kerastune_flow.runtime.process import prepare_process  # noqa: E402

prepare_process("auto")  # as a run does: the inter-op threads of this CPU's kind

import machine  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from epoch_clock import EpochClock  # noqa: E402

from kerastune_flow import models  # noqa: E402

STEPS, BATCH, EPOCHS = 47, 64, 11


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    parser.add_argument("--repeats", type=int, help="repetitions (default 7; 3 with --quick)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per fit (the first is left out)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    print(f"# Keras fit's per-epoch cost, {time.strftime('%Y-%m-%d')}; {machine.describe()}", flush=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (STEPS * BATCH, 32, 32, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x), "int32"))).batch(BATCH).cache()
    model = models.build_cifar10_cnn(input_shape=(32, 32, 3), steps_per_execution=16)
    model.fit(ds, epochs=2, verbose=0)  # traces, fills the cache

    def per_epoch(epochs_of, **fit):
        clock = EpochClock()
        model.fit(callbacks=[clock], verbose=0, **fit)
        return statistics.median(clock.seconds[1:]) if epochs_of == 1 else clock.seconds[0] / epochs_of

    paths = {
        "new iterator each epoch": lambda: per_epoch(1, x=ds, epochs=args.epochs),
        "one iterator": lambda: per_epoch(1, x=ds.repeat(), steps_per_epoch=STEPS, epochs=args.epochs),
        "one long epoch / 10": lambda: per_epoch(10, x=ds.repeat(10), epochs=1),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            times[name].append(run())
    print(f"# {STEPS} steps of batch {BATCH} an epoch, {args.repeats} repetitions alternating, median")
    print(f"{'path':<28}{'s per 47 steps':>16}")
    for name, seconds in times.items():
        print(f"{name:<28}{statistics.median(seconds):>16.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
