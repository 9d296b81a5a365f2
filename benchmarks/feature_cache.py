"""Stage one of transfer learning: epoch time with cached base features vs the full forward pass.

Both paths train the same VGG16 feature extractor's head on the same data, in the same process,
alternating, several repetitions; the median epoch times and their ratio are printed. The
one-time cost of computing the features is printed too, with the epoch count after which the
cache has paid for itself.

    python benchmarks/feature_cache.py            # 64x64 images, every shipped digit
    python benchmarks/feature_cache.py --quick    # 32x32, 512 images: under a minute

Weights are random (no ImageNet file here); speed does not depend on the weights' values.
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
import machine  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.process import prepare_process  # noqa: E402
from kerastune_flow.runtime.strategy import get_strategy, global_batch_size  # noqa: E402
from kerastune_flow.training import finetune  # noqa: E402


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 images, 512 examples, 3 repetitions")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--examples", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"# {machine.describe()}", flush=True)  # ratios depend on the CPU: say which one
    size = args.image_size or (32 if args.quick else 64)
    examples = args.examples or (512 if args.quick else None)
    repeats = args.repeats or (3 if args.quick else 5)

    keras.utils.set_random_seed(0)
    prepare_process("auto")
    strategy = get_strategy("auto")
    splits = data.load_data("digits", image_size=(size, size), channels=3, max_examples=examples)
    head_spec = models.transfer_head(splits.num_classes)
    batch = global_batch_size(args.batch_size, strategy)
    pipes = {}
    for name in ("train", "validation"):
        ds = getattr(splits, name)
        common = dict(batch_size=batch, label_mode=head_spec.label_mode, num_classes=splits.num_classes)
        pipes[name] = data.prepare(ds, training=name == "train", **common)
        pipes[f"{name}_ordered"] = data.prepare(ds, cache=True, **common)
    with strategy.scope():
        model = models.build_vgg16_feature_extractor(
            input_shape=(size, size, 3), num_classes=splits.num_classes, weights=None
        )
    features, head = finetune.split_at_base(model)
    cached: dict = {}
    extract_seconds = _time(
        lambda: cached.update(finetune.cached_feature_pipelines(features, pipes, batch_size=batch, seed=0))
    )
    with strategy.scope():
        models.compile_model(head, head_spec)

    # Warm-up: trace both training functions and fill the image cache.
    model.fit(pipes["train"], validation_data=pipes["validation"], epochs=1, verbose=0, shuffle=False)
    head.fit(cached["train"], validation_data=cached["validation"], epochs=1, verbose=0, shuffle=False)
    full, fast = [], []
    for _ in range(repeats):
        full.append(
            _time(
                lambda: model.fit(
                    pipes["train"], validation_data=pipes["validation"], epochs=1, verbose=0, shuffle=False
                )
            )
        )
        fast.append(
            _time(
                lambda: head.fit(
                    cached["train"], validation_data=cached["validation"], epochs=1, verbose=0, shuffle=False
                )
            )
        )
    full_s, fast_s = statistics.median(full), statistics.median(fast)
    ratio = full_s / fast_s
    break_even = extract_seconds / max(full_s - fast_s, 1e-9)
    print(f"# feature cache benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores")
    print(
        f"# VGG16 (random weights) at {size}x{size}, {splits.sizes['train']} train / "
        f"{splits.sizes['validation']} validation images, batch {batch}, {repeats} repetitions, median"
    )
    print(f"{'path':<28}{'epoch s':>10}")
    print(f"{'full forward pass':<28}{full_s:>10.3f}")
    print(f"{'cached features':<28}{fast_s:>10.3f}")
    print(f"{'one-time feature pass':<28}{extract_seconds:>10.3f}")
    print(f"ratio full / cached: {ratio:.1f}x per epoch; the cache pays for itself after {break_even:.2f} epoch(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
