"""The reference articles' own code, as their 20 lines do it, for the accuracy the defaults must reach.

    python benchmarks/reference_code.py mlp --seed 0     # MNIST from the tfds manual dir
    python benchmarks/reference_code.py cnn --seed 0 --data /tmp/cifar10_jpeg

Plain Keras on numpy arrays, nothing of kerastune_flow: the MLP (Flatten-Dense128-Dense64-Dense10,
inputs normalised with mean 0.5 and std 0.5, Adam 1e-3, batch 64, 10 epochs, all 60,000 training
images) and the CIFAR-10 CNN (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, inputs /255, Adam
1e-3, batch 64, 10 epochs, all 50,000 training images, here from the JPEG folder). Prints the test
accuracy of the last epoch's model, as the articles report it, and the time of each epoch (measured
by a callback that adds nothing to the steps), as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from epoch_clock import EpochClock  # noqa: E402
from PIL import Image  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def mnist(data_dir: str) -> tuple:
    builder = tfds.builder("mnist", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(SHARED / "mnist")))
    train, test = (
        tfds.as_numpy(builder.as_dataset(split=s, as_supervised=True, batch_size=-1)) for s in ("train", "test")
    )
    return train, test


def image_folder(root: Path) -> tuple:
    def split(name):
        classes = sorted(p.name for p in (root / name).iterdir())
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / name / c).iterdir())]
        x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
        return x, np.array([label for _, label in files])

    return split("train"), split("test")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("mlp", "cnn"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="cnn: the CIFAR-10 JPEG folder (train/ and test/)")
    parser.add_argument("--data-dir", default="/tmp/kerastune_flow_accuracy/tfds", help="mlp: tfds data directory")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    if args.model == "mlp":
        (x, y), (xt, yt) = mnist(args.data_dir)
        x, xt = ((a.astype("float32") / 255.0 - 0.5) / 0.5 for a in (x, xt))
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
    else:
        (x, y), (xt, yt) = image_folder(Path(args.data))
        x, xt = (a.astype("float32") / 255.0 for a in (x, xt))
        model = keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
    model.compile(
        keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    clock = EpochClock()
    start = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=10, verbose=0, callbacks=[clock])
    train_seconds = time.perf_counter() - start
    accuracy = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    result = {"model": args.model, "seed": args.seed, "test_accuracy": float(accuracy)}
    result.update(train_seconds=round(train_seconds, 3), train_examples=len(x))
    result["epoch_seconds"] = [round(t, 4) for t in clock.seconds]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
