"""Stage two of a fine-tune: epoch time with the frozen prefix cached vs the full forward pass.

VGG16 unfrozen from block5_conv1 (layer 15), as the vgg16_finetune recipe's stage 2: blocks 1-4
stay frozen and compute the same output every epoch when nothing random touches the images. Both
paths train the same model (the full one on the images; the unfrozen block and the head on the
cached block4_pool output, `finetune.split_at_prefix`), one epoch with validation per fit, in one
process, alternating, median of the repetitions. The one-time cost of the prefix pass over train
and validation is measured too, with the epochs after which the cache has paid for itself.

    python benchmarks/prefix_cache.py             # 150x150, 256 train / 64 validation images
    python benchmarks/prefix_cache.py --quick     # 64x64, 128 / 32: about a minute

Weights are random (weights=None: no ImageNet file here); speed does not depend on their values.
Results go to benchmarks/prefix_cache_results.json.
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
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from machine import describe  # noqa: E402

from kerastune_flow import data, models  # noqa: E402
from kerastune_flow.runtime.process import prepare_process  # noqa: E402
from kerastune_flow.training import finetune  # noqa: E402

RESULTS = REPO / "benchmarks" / "prefix_cache_results.json"


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _splits(size: int, train: int, validation: int, classes: int = 2):
    rng = np.random.default_rng(0)

    def split(n):
        coarse = rng.uniform(0, 255, (n, size // 10 + 1, size // 10 + 1, 3)).astype("float32")
        images = tf.image.resize(coarse, (size, size)).numpy()
        return tf.data.Dataset.from_tensor_slices((images, (np.arange(n) % classes).astype("int32")))

    return split(train), split(validation)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64, 128 train / 32 validation, 3 repetitions")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--train", type=int)
    parser.add_argument("--validation", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--unfreeze-at", type=int, default=models.VGG16_UNFREEZE_AT)
    parser.add_argument(
        "--no-write", action="store_true", help="print only, leave the JSON file alone (as --quick does)"
    )
    args = parser.parse_args(argv)
    size = args.image_size or (64 if args.quick else 150)
    n_train = args.train or (128 if args.quick else 256)
    n_val = args.validation or (32 if args.quick else 64)

    prepare_process("auto")
    keras.utils.set_random_seed(0)
    train_ds, val_ds = _splits(size, n_train, n_val)
    head = models.transfer_head(2)
    common = dict(batch_size=args.batch_size, label_mode=head.label_mode, num_classes=2)
    clock = data.EpochClock()
    pipes = {
        "train": data.prepare(train_ds, training=True, clock=clock, epochs=64, seed=0, **common),
        "validation": data.prepare(val_ds, **common),
        "train_ordered": data.prepare(train_ds, cache=False, **common),
        "validation_ordered": data.prepare(val_ds, cache=False, **common),
    }
    model = models.build_vgg16_feature_extractor(input_shape=(size, size, 3), weights=None, compile=False)
    base = models.find_base(model)
    index = models.unfreeze_from(base, args.unfreeze_at)
    models.compile_model(model, head, learning_rate=1e-5, steps_per_execution=16)
    prefix, rest = finetune.split_at_prefix(model, index)
    models.compile_model(rest, head, learning_rate=1e-5, steps_per_execution=16)

    one_time, cached = [], {}
    for _ in range(args.repeats):  # the one-time pass, as each step of a run makes it
        one_time.append(
            _time(
                lambda: cached.update(
                    finetune.cached_feature_pipelines(
                        prefix, pipes, batch_size=args.batch_size, seed=0, clock=clock, epochs=64
                    )
                )
            )
        )
    cache_mib = (n_train + n_val) * 4 * int(np.prod(prefix.output_shape[1:]))

    def full_epoch(epoch):
        return lambda: model.fit(
            pipes["train"], validation_data=pipes["validation"], epochs=epoch + 1, initial_epoch=epoch, verbose=0
        )

    def cached_epoch(epoch):
        return lambda: rest.fit(
            cached["train"], validation_data=cached["validation"], epochs=epoch + 1, initial_epoch=epoch, verbose=0
        )

    full_epoch(0)()  # warm-up: trace both training functions, fill the image cache
    cached_epoch(0)()
    full, fast = [], []
    for r in range(args.repeats):
        clock.set(r + 1)
        full.append(_time(full_epoch(r + 1)))
        fast.append(_time(cached_epoch(r + 1)))
    full_s, fast_s, once_s = statistics.median(full), statistics.median(fast), statistics.median(one_time)
    result = {
        "command": "python benchmarks/prefix_cache.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "image_size": size,
        "train": n_train,
        "validation": n_val,
        "batch_size": args.batch_size,
        "unfreeze_at": f"{index} ({base.layers[index].name})",
        "cache_mib": round(cache_mib / 2**20, 1),
        "repeats": args.repeats,
        "full_epoch_s": round(full_s, 3),
        "cached_epoch_s": round(fast_s, 3),
        "one_time_prefix_pass_s": round(once_s, 3),
        "ratio": round(full_s / fast_s, 2),
        "break_even_epochs": round(once_s / max(full_s - fast_s, 1e-9), 2),
        "samples": {"full": full, "cached": fast, "one_time": one_time},
    }
    print(f"# stage-2 prefix cache, {result['date']}; {result['machine']}")
    print(
        f"# VGG16 (random weights) at {size}x{size} unfrozen from {result['unfreeze_at']}, {n_train} train / "
        f"{n_val} validation images, batch {args.batch_size}, one epoch with validation per fit, "
        f"{args.repeats} repetitions alternating, median; cache {result['cache_mib']} MiB"
    )
    print(f"{'path':<32}{'epoch s':>10}")
    print(f"{'full forward pass':<32}{full_s:>10.3f}")
    print(f"{'cached frozen prefix':<32}{fast_s:>10.3f}")
    print(f"{'one-time prefix pass':<32}{once_s:>10.3f}")
    print(
        f"ratio full / cached: {result['ratio']:.2f}x per epoch; "
        f"the cache pays for itself after {result['break_even_epochs']} epoch(s)"
    )
    if not (args.no_write or args.quick):  # a quick run leaves the full-size results alone
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
