"""The fixed cost of an epoch: the CIFAR-10 CNN per image at 3,000 and at 20,000 examples an epoch.

Both sizes train through the package's training pipeline as a run builds it (`data.prepare` with
the epoch clock, cached, shuffled, batch 64, 16 steps per execution) and fit as a run fits
(`steps_per_epoch=fitting.epoch_steps(...)`: one iterator an epoch), in one process, alternating:
  gathered   the cached split held in memory and gathered by shuffled index (the default)
  buffered   the buffer shuffle of the decoded images every epoch (`indexed=False`: what the
             package does for a split it does not cache)
  gathered-2 the default pipeline fitted without `steps_per_epoch`, as plain `model.fit` does it:
             Keras then makes two iterators an epoch and throws one away
All three give the same batches, and one model trains on all of them. Each repetition is one
`fit` of `--epochs` epochs per path and size; the epoch times inside it (from `on_epoch_begin`
to `on_epoch_end`, first epoch left out: it traces) are divided by the examples. The aim: 3,000
examples an epoch cost no more per image than 20,000.

    python benchmarks/short_epochs.py             # 3,000 and 20,000 examples, 5 repetitions
    python benchmarks/short_epochs.py --quick     # 1,000 and 6,000, 3 repetitions

Data are random 32x32 pixels (the speed does not depend on their values). Results go to
benchmarks/short_epochs_results.json.
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from epoch_clock import EpochClock  # noqa: E402  (seconds of each epoch inside one fit)
from machine import describe  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.process import prepare_process  # noqa: E402
from kerastune_flow.training import callbacks as cb  # noqa: E402
from kerastune_flow.training import fitting  # noqa: E402

RESULTS = REPO / "benchmarks" / "short_epochs_results.json"
BATCH = 64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 and 6,000 examples, 3 repetitions")
    parser.add_argument("--sizes", help="comma list of examples per epoch (default 3000,20000)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first is left out)")
    parser.add_argument(
        "--no-write", action="store_true", help="print only, leave the JSON file alone (as --quick does)"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1000,6000" if args.quick else "3000,20000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)

    prepare_process("auto")
    keras.utils.set_random_seed(0)
    pipelines, fits = {}, {}
    # One model trains on every path and size: two instances of the same network differed by up to
    # 7 % in speed here, which would pass for a difference between the paths.
    model = models.build_cifar10_cnn(input_shape=(32, 32, 3), num_classes=10, steps_per_execution=16)
    for n in sizes:
        # Drawn inside the pipeline, as a folder's files are decoded there.
        ds = tf.data.Dataset.range(n).map(
            lambda i: (
                tf.random.stateless_uniform((32, 32, 3), seed=tf.stack([i, 0]), maxval=255.0),
                tf.cast(i % 10, tf.int32),
            )
        )
        for path, indexed in (("gathered", True), ("buffered", False), ("gathered-2", True)):
            clock = data.EpochClock()
            start = time.perf_counter()
            pipe = data.prepare(ds, batch_size=BATCH, training=True, clock=clock, epochs=64, seed=0, indexed=indexed)
            built = time.perf_counter() - start
            steps = None if path == "gathered-2" else fitting.epoch_steps(pipe)
            pipelines[(path, n)] = (pipe, clock, built, steps)
            model.fit(pipe, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[cb.EpochSeeds(clock)])  # warm-up
            fits[(path, n)] = []
    paths = ("gathered", "buffered", "gathered-2")
    paired: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(repeats):
        medians = {}
        for n in sizes:
            for path in paths:
                pipe, clock, _, steps = pipelines[(path, n)]
                timer = EpochClock()
                model.fit(
                    pipe, epochs=args.epochs, steps_per_epoch=steps, verbose=0, callbacks=[cb.EpochSeeds(clock), timer]
                )
                fits[(path, n)].extend(timer.seconds[1:])
                medians[(path, n)] = statistics.median(timer.seconds[1:]) / n
        for path in paired:  # the two sizes a few seconds apart: less of the machine's drift
            paired[path].append(medians[(path, sizes[0])] / medians[(path, sizes[-1])])
    # The pipeline alone (no model): what an epoch of it costs, from making its iterator to the last
    # batch, and to the first batch (what the model waits for while nothing overlaps).
    alone: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in pipelines}
    for _ in range(max(10, 2 * repeats)):
        for key, (pipe, clock, *_) in pipelines.items():
            clock.set(len(alone[key]) % 8)
            start = time.perf_counter()
            iterator = iter(pipe)
            next(iterator)
            first = time.perf_counter() - start
            for _ in iterator:
                pass
            alone[key].append((first, time.perf_counter() - start))
    rows = []
    for path in paths:
        for n in sizes:
            epoch = statistics.median(fits[(path, n)])
            rows.append(
                {
                    "path": path,
                    "examples": n,
                    "epoch_s": round(epoch, 4),
                    "ms_per_image": round(1000 * epoch / n, 4),
                    "pipeline_build_s": round(pipelines[(path, n)][2], 3),
                    "pipeline_alone_epoch_s": round(statistics.median(t for _, t in alone[(path, n)]), 4),
                    "pipeline_alone_first_batch_s": round(statistics.median(f for f, _ in alone[(path, n)]), 4),
                    "samples": fits[(path, n)],
                }
            )
    per_image = {(r["path"], r["examples"]): r["ms_per_image"] for r in rows}
    small, large = sizes[0], sizes[-1]
    ratios = {path: per_image[(path, small)] / per_image[(path, large)] for path in paths}
    result = {
        "command": "python benchmarks/short_epochs.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "batch": BATCH,
        "steps_per_execution": 16,
        "repeats": repeats,
        "epochs_per_fit": args.epochs,
        "rows": rows,
        f"per_image_{small}_over_{large}": {k: round(v, 3) for k, v in ratios.items()},
        f"per_image_{small}_over_{large}_paired_median": {k: round(statistics.median(v), 3) for k, v in paired.items()},
    }
    print(f"# short epochs, {result['date']}; {result['machine']}")
    print(
        f"# CIFAR-10 CNN, random 32x32 images, batch {BATCH}, 16 steps per execution, {repeats} repetitions x "
        f"{args.epochs - 1} timed epochs per fit, alternating, median epoch"
    )
    print(
        f"{'path':<12}{'examples':>10}{'epoch s':>10}{'ms/image':>10}{'build s':>10}{'alone s':>10}{'1st batch s':>12}"
    )
    for r in rows:
        print(
            f"{r['path']:<12}{r['examples']:>10}{r['epoch_s']:>10.3f}{r['ms_per_image']:>10.4f}"
            f"{r['pipeline_build_s']:>10.3f}{r['pipeline_alone_epoch_s']:>10.4f}{r['pipeline_alone_first_batch_s']:>12.4f}"
        )
    print(
        "(alone: one epoch of the pipeline without the model, from making its iterator; 1st batch: to its first batch)"
    )
    for path, ratio in ratios.items():
        print(
            f"{path}: per image at {small} / at {large} = {ratio:.3f} (medians), "
            f"{statistics.median(paired[path]):.3f} (median of the paired repetitions)"
        )
    if not (args.no_write or args.quick):  # a quick run leaves the full-size results alone
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
