"""Input pipeline: images per second the folder pipeline delivers against what the model consumes.

Rows, for a folder of JPEG files (CIFAR-10-sized by default), one epoch each:
  pipeline, first epoch     `data.load_image_folder` + `data.prepare` (parallel decode and resize,
                            cache, shuffle, batch, augmentation, prefetch) read from disk
  pipeline, cached epoch    the same pipeline once its cache is filled (every later epoch)
  naive pipeline            the code users copy from tutorials: the same decode, resize and
                            augmentation with serial `map`s, no cache, no prefetch
  model consumption         the CIFAR-10 CNN's training steps on the same images, decoded and
                            batched in memory once (no augmentation)
  fit from the pipeline     `model.fit` fed by the pipeline (cached epochs): the fraction of step
                            time spent waiting for input is 1 - (memory-fed time / pipeline-fed time)

    python benchmarks/input_pipeline.py --quick                 # 4,000 generated JPEGs
    python benchmarks/input_pipeline.py --folder DIR            # any image folder, e.g. CIFAR-10

The target of the performance issue: the pipeline delivers at least 3x what the model consumes,
so that it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import machine  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.device import device_settings  # noqa: E402

BATCH = 64


def write_jpeg_folder(root: Path, count: int, size: int = 32, classes: int = 10) -> Path:
    """Writes `count` smooth random JPEG images (quality 75, like the CIFAR-10 folder here) in
    `classes` class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{index:05d}.jpg", quality=75)
    return root


def _naive(splits_source: str, image_size: tuple[int, int], augmenter) -> tf.data.Dataset:
    items = data.index_image_folder(splits_source).parts["train"]
    paths = tf.constant([p for p, _ in items])
    labels = tf.constant([label for _, label in items], tf.int32)

    def decode(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, image_size), label

    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(items), seed=0).map(decode).batch(BATCH)
    if augmenter is None:
        return ds
    # the same augmentation steps, seeded by the batch's position (the augmenter is stateless)
    return ds.enumerate().map(lambda i, batch: (augmenter(batch[0], tf.stack([i, tf.constant(0, tf.int64)])), batch[1]))


def _epoch_seconds(ds: tf.data.Dataset) -> tuple[float, int]:
    start = time.perf_counter()
    images = 0
    for x, _ in ds:
        images += int(x.shape[0])
    return time.perf_counter() - start, images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4,000 generated images, 3 repetitions")
    parser.add_argument("--folder", help="an image folder (class sub-folders); default: generated JPEGs")
    parser.add_argument("--examples", type=int, help="generated images (default 2,000 quick, 10,000 full)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--augment", default="flip,crop", help="augmentation layers in the pipeline")
    args = parser.parse_args(argv)
    print(f"# {machine.describe()}", flush=True)  # ratios depend on the CPU: say which one
    repeats = args.repeats or (3 if args.quick else 5)
    size = (args.image_size, args.image_size)
    keras.utils.set_random_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or str(
            write_jpeg_folder(Path(tmp) / "jpegs", args.examples or (4_000 if args.quick else 10_000))
        )
        # Everything in one split, so that one epoch reads every file once.
        splits = data.load_image_folder(folder, image_size=size, channels=3, validation_fraction=0.0, test_fraction=0.0)
        shape = splits.image_shape
        augmenter = data.make_augmenter([a for a in args.augment.split(",") if a], shape)

        def package_pipeline() -> tf.data.Dataset:
            return data.prepare(splits.train, batch_size=BATCH, training=True, cache=True, augmenter=augmenter)

        # First epochs: a fresh pipeline each time, so its cache is empty and every file is read
        # (building it counts: a cached training split is read into memory there, in one pass).
        first = []
        for _ in range(repeats):
            start = time.perf_counter()
            _epoch_seconds(package_pipeline())
            first.append(time.perf_counter() - start)
        pipe = package_pipeline()
        _epoch_seconds(pipe)  # fills the cache
        naive = _naive(folder, size, augmenter)
        _epoch_seconds(naive.take(4))  # warm-up
        cached, serial = [], []
        n = 0
        for _ in range(repeats):
            seconds, n = _epoch_seconds(pipe)
            cached.append(seconds)
            serial.append(_epoch_seconds(naive)[0])

        # What the model consumes: the same number of batches, already in memory, at the dtype
        # policy and steps per execution `train cifar10_cnn` chooses on this machine.
        settings = device_settings("cpu", mixed_precision="auto")
        keras.config.set_dtype_policy(settings.dtype_policy)
        model = models.build_cifar10_cnn(
            input_shape=shape, num_classes=splits.num_classes, steps_per_execution=settings.steps_per_execution
        )
        keras.config.set_dtype_policy("float32")
        # The same images, decoded once and batched in memory (zeros would run other kernels' paths).
        decoded = [(x.numpy(), y.numpy()) for x, y in data.prepare(splits.train, batch_size=BATCH, cache=False)]
        images = np.concatenate([x for x, _ in decoded])
        labels = np.concatenate([y for _, y in decoded])
        # tf.data's autotuning as the package sets it (off on the CPU, where it costs every epoch)
        in_memory = data.with_autotune(tf.data.Dataset.from_tensor_slices((images, labels)).batch(BATCH).cache())
        _epoch_seconds(in_memory)  # fills its cache
        model.fit(in_memory.take(8), epochs=1, verbose=0, shuffle=False)
        model.fit(pipe.take(8), epochs=1, verbose=0, shuffle=False)  # warm-up: trace both input signatures
        memory_fed, pipe_fed = [], []
        for repeat in range(repeats):
            # Each path goes first every other repetition: the second of a pair ran measurably
            # slower or faster by the machine's drift, which a fixed order adds to one side.
            for ds, times in [(in_memory, memory_fed), (pipe, pipe_fed)][:: 1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                model.fit(ds, epochs=1, verbose=0, shuffle=False)
                times.append(time.perf_counter() - start)

    med = {
        name: statistics.median(v)
        for name, v in {
            "pipeline, first epoch": first,
            "pipeline, cached epoch": cached,
            "naive pipeline": serial,
            "model consumption": memory_fed,
            "fit from the pipeline": pipe_fed,
        }.items()
    }
    consumption = n / med["model consumption"]
    print(
        f"# input pipeline, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"{n} JPEG images ({'generated' if not args.folder else args.folder}) at {size[0]}x{size[1]}, "
        f"augmentation {args.augment or 'none'}, batch {BATCH}, {repeats} repetitions, median; "
        f"model {settings.dtype_policy}, {settings.steps_per_execution} steps per execution"
    )
    print(f"{'path':<26}{'epoch s':>10}{'images/s':>12}{'vs model consumption':>24}")
    for name, seconds in med.items():
        print(f"{name:<26}{seconds:>10.3f}{n / seconds:>12.0f}{n / seconds / consumption:>23.2f}x")
    waiting = max(0.0, 1 - med["model consumption"] / med["fit from the pipeline"])
    print(
        f"package pipeline vs naive pipeline: {med['naive pipeline'] / med['pipeline, cached epoch']:.1f}x "
        f"(cached epochs), {med['naive pipeline'] / med['pipeline, first epoch']:.1f}x (first epoch)"
    )
    print(f"fraction of step time waiting for input: {waiting:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
