"""Writes kerastune_flow/sample_data/digits/ (the sample `--data digits` names): scikit-learn's bundled
handwritten digits as one PNG folder per class.

The 1,797 images are 8x8, 17 grey levels (0..16), from the UCI "Optical Recognition of
Handwritten Digits" data set that scikit-learn ships (no download). Each is scaled to 0..255
and saved as an 8-bit grayscale PNG; the loaders resize them to the recipe's input size.

    python kerastune_flow/sample_data/make_digits.py   # needs scikit-learn (pip install -e '.[dev]')
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent / "digits"


def main() -> None:
    digits = load_digits()
    counts = [0] * 10
    for image, label in zip(digits.images, digits.target, strict=True):
        folder = OUT / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{counts[label]:04d}.png", optimize=True)
        counts[label] += 1
    print(f"wrote {sum(counts)} images to {OUT}: {counts}")


if __name__ == "__main__":
    main()
