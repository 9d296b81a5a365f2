"""Training throughput of the reference networks: the package's path against the baselines users
would otherwise copy, in one process, alternating, median of several repetitions.

Rows, for the scratch MLP on MNIST-shaped data (28x28x1, 10 classes) or the CIFAR-10 CNN
(32x32x3), batch 64, one epoch each:
  package spe=N     `data.prepare` pipeline (cache, shuffle, batch, prefetch) + the package's
                    builder compiled with steps_per_execution=N, `model.fit` (16 is the CPU default)
  package XLA       the same with jit_compile=True (--jit), at 1 and the default steps per
                    execution, to choose XLA per device by measurement
  package autotune  the default spe with tf.data's autotuning on (TensorFlow's default; the package
                    turns it off on the CPU), to show what that choice is worth
  keras fit numpy   the same network, plain `model.fit(x, y, batch_size=64)` on numpy arrays
  pytorch loop      the reference article's plain PyTorch loop (DataLoader, Adam, CrossEntropy),
                    when torch is installed (an optional benchmark dependency)
  package bf16      the default spe under the mixed_bfloat16 policy (--bf16), beside
  pytorch bf16      the PyTorch loop under `torch.autocast("cpu", dtype=torch.bfloat16)`, so that
                    the peer gets the same chance on a CPU with native bfloat16

    python benchmarks/train_step.py --model mlp --quick
    python benchmarks/train_step.py --model cnn

Each repetition trains every path for `--epochs-per-fit` epochs (one `fit` call, as a user's run
would), alternating the paths; "epoch s" is the whole `fit` call divided by its epochs (median of
the repetitions), so that everything a user waits for counts, and "fit overhead s" is the part of
the call outside the epochs (setting up; at the end, tearing down the data iterator). With
tf.data's autotuning on, discarding an epoch's iterator waits for the autotuning thread: seconds
per epoch for the CNN here, inside the next epoch or at the end of `fit`.

The process starts as a run does, with `prepare_process("auto")`, which on the CPU sets TensorFlow's
inter-op threads for the CPU's kind (one thread without AVX-512, TensorFlow's default with it);
`--inter-op N` sets N instead, 0 TensorFlow's default (the setting is per process, so compare two
commands). Data are random pixels: throughput does not depend on their values.
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

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from epoch_clock import EpochClock  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.device import device_kind, device_settings  # noqa: E402
from kerastune_flow.runtime.process import prepare_process  # noqa: E402
from kerastune_flow.runtime.strategy import get_strategy  # noqa: E402

SHAPES = {"mlp": (28, 28, 1), "cnn": (32, 32, 3)}
BUILDERS = {"mlp": models.build_scratch_mlp, "cnn": models.build_cifar10_cnn}
BATCH = 64


def _torch_loop(kind: str, x: np.ndarray, y: np.ndarray, *, bf16: bool = False):
    """The reference article's plain PyTorch training loop for the same network, or None.

    With `bf16`, the forward pass and the loss run under CPU autocast to bfloat16 (PyTorch's own
    mixed precision: weights and optimizer stay float32).
    """
    try:
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        tensors = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    else:
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        tensors = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    loader = DataLoader(TensorDataset(tensors, torch.from_numpy(y).long()), batch_size=BATCH, shuffle=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def epoch():
        net.train()
        for images, labels in loader:
            images = (images / 255.0 - 0.5) / 0.5 if kind == "mlp" else images / 255.0
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net(images), labels)
            loss.backward()
            optimizer.step()

    return epoch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SHAPES), default="mlp")
    parser.add_argument("--quick", action="store_true", help="fewer examples and repetitions")
    parser.add_argument("--examples", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--spe", default="1,16", help="comma list of steps_per_execution for the package path")
    parser.add_argument("--epochs-per-fit", type=int, help="epochs per fit call (default 3; 2 with --quick)")
    parser.add_argument("--jit", action="store_true", help="add a row with jit_compile=True (XLA)")
    parser.add_argument("--bf16", action="store_true", help="add mixed_bfloat16 rows: the package's and PyTorch's")
    parser.add_argument(
        "--inter-op",
        type=int,
        help="TensorFlow inter-op threads; 0: TensorFlow's default (default: the package's choice)",
    )
    parser.add_argument("--intra-op", type=int, help="TensorFlow intra-op threads (default: TensorFlow's)")
    args = parser.parse_args(argv)
    if args.inter_op is not None:  # before TensorFlow starts; a value of the user's own is left alone by the package
        os.environ["TF_NUM_INTEROP_THREADS"] = str(args.inter_op)
    if args.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    prepare_process("auto")  # as a run does, first: on the CPU it chooses TensorFlow's threads
    strategy = get_strategy("auto")
    shape = SHAPES[args.model]
    n = args.examples or (
        (12_000 if args.model == "mlp" else 3_000) if args.quick else (60_000 if args.model == "mlp" else 20_000)
    )
    repeats = args.repeats or 3
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int32)
    keras.utils.set_random_seed(0)

    epochs = args.epochs_per_fit or (2 if args.quick else 3)
    paths = {}
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y))
    pipeline = data.prepare(ds, batch_size=BATCH, training=True, cache=True)

    def keras_path(model, *fit_args, **fit_kwargs):
        def run():
            timer = EpochClock()
            model.fit(*fit_args, epochs=epochs, verbose=0, callbacks=[timer], **fit_kwargs)
            return timer.seconds

        return run

    for spe in (int(s) for s in args.spe.split(",")):
        model = BUILDERS[args.model](input_shape=shape, steps_per_execution=spe)
        paths[f"package spe={spe}"] = keras_path(model, pipeline, shuffle=False)
    default_spe = device_settings(device_kind(strategy)).steps_per_execution
    model = BUILDERS[args.model](input_shape=shape, steps_per_execution=default_spe)
    tuned = data.prepare(ds, batch_size=BATCH, training=True, cache=True, autotune=True)
    paths[f"package autotune spe={default_spe}"] = keras_path(model, tuned, shuffle=False)
    if args.jit:
        for spe in sorted({1, default_spe}):
            xla = BUILDERS[args.model](input_shape=shape, jit_compile=True, steps_per_execution=spe)
            paths[f"package XLA spe={spe}"] = keras_path(xla, pipeline, shuffle=False)
    if args.bf16:
        keras.config.set_dtype_policy("mixed_bfloat16")  # as `--mixed-precision bfloat16` does for a run
        bf16 = BUILDERS[args.model](input_shape=shape, steps_per_execution=default_spe)
        keras.config.set_dtype_policy("float32")
        paths[f"package bf16 spe={default_spe}"] = keras_path(bf16, pipeline, shuffle=False)
    plain = BUILDERS[args.model](input_shape=shape)
    xf = x.astype("float32")
    paths["keras fit numpy"] = keras_path(plain, xf, y, batch_size=BATCH)

    def torch_path(epoch_fn):
        def run():
            seconds = []
            for _ in range(epochs):
                start = time.perf_counter()
                epoch_fn()
                seconds.append(time.perf_counter() - start)
            return seconds

        return run

    torch_epoch = _torch_loop(args.model, x, y)
    if torch_epoch is not None:
        paths["pytorch loop"] = torch_path(torch_epoch)
        if args.bf16:
            paths["pytorch bf16 autocast"] = torch_path(_torch_loop(args.model, x, y, bf16=True))

    for fn in paths.values():  # warm-up: tracing, cache fill
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    overhead: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            epoch_seconds = fn()
            total = time.perf_counter() - start
            overhead[name].append(total - sum(epoch_seconds))
            times[name].append(total / len(epoch_seconds))
    medians = {name: statistics.median(t) for name, t in times.items()}
    inter_op = tf.config.threading.get_inter_op_parallelism_threads() or int(
        os.environ.get("TF_NUM_INTEROP_THREADS") or 0
    )
    inter_op = inter_op or "TensorFlow's default"
    baseline = "pytorch loop" if "pytorch loop" in medians else "keras fit numpy"
    print(
        f"# {args.model} training throughput, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores; {n} examples {'x'.join(map(str, shape))}, batch {BATCH}, "
        f"{repeats} repetitions x {epochs} epochs, median of whole fit / epochs; TF threads inter-op {inter_op}, "
        f"intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'auto'}"
    )
    print(f"# {machine.describe()}")
    if torch_epoch is None:
        print("# pytorch loop: skipped, torch is not installed (pip install torch)")
    print(f"{'path':<26}{'epoch s':>10}{'images/s':>12}{'vs ' + baseline:>22}{'fit overhead s':>16}")
    for name, seconds in medians.items():
        print(
            f"{name:<26}{seconds:>10.3f}{n / seconds:>12.0f}{medians[baseline] / seconds:>21.2f}x"
            f"{statistics.median(overhead[name]):>16.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
