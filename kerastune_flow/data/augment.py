"""Random augmentation that is a function of a seed: the same seed, the same images.

Keras's random preprocessing layers draw from a `SeedGenerator`, a variable each call advances;
in a parallel `tf.data` map the calls race for it, so two runs with the same seed augment
differently, and a resumed run cannot repeat an epoch. These transforms draw every random
number from `tf.random.stateless_*` with a seed the pipeline derives from (run seed, epoch,
batch), so a batch is augmented the same way every time it is made. Each transform works on a
whole batch (one random draw per image) and follows the Keras layer of the same name:
`RandomCrop` after zero padding, `RandomFlip("horizontal")`, `RandomRotation(0.1)` and
`RandomZoom(0.1)` (bilinear, reflected at the borders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import tensorflow as tf
from keras import ops

from kerastune_flow.config import AUGMENTATIONS

ROTATION = 0.1  # a fraction of a full turn, both ways: up to 36 degrees, as RandomRotation(0.1)
ZOOM = 0.1  # up to 10 % in or out, as RandomZoom(0.1)

Augmenter = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def make_augmenter(names: Sequence[str], image_shape: Sequence[int]) -> Augmenter | None:
    """The augmentation of a run: `augment(images, seed)`, or None for no augmentation.

    Args:
        names: any of "crop" (pad by 1/8, then crop back at a random place), "flip", "rotation",
            "zoom"; applied in that order.
        image_shape: (height, width, channels) of the images.

    Returns:
        A function of a batch (B, H, W, C) of pixels (float, or uint8 from a uint8 cache) and a
        seed (a shape-(2,) integer tensor) that returns the augmented batch as float32; the same
        seed gives the same batch. Crops and flips only move pixels, so they run on the batch as
        it comes (a uint8 batch is a quarter of the bytes to move); rotation and zoom interpolate,
        on float32.

    Raises:
        ValueError: for an unknown name.
    """
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}. Received: augment={unknown[0]!r}")
    if not names:
        return None
    height, width = int(image_shape[0]), int(image_shape[1])
    steps = [name for name in ("crop", "flip", "rotation", "zoom") if name in names]

    def augment(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(steps))
        step_seeds = dict(zip(steps, tf.unstack(seeds), strict=True))
        for name, step_seed in step_seeds.items():
            if name == "crop":
                # A flip after the crop is the crop's columns read backwards: one copy of the
                # batch fewer, half the time (the same images as the two steps, tested)
                flip = step_seeds.get("flip")
                images = random_crop(images, max(1, height // 8), max(1, width // 8), step_seed, flip_seed=flip)
            elif name == "flip":
                if "crop" not in step_seeds:  # else done with the crop
                    images = random_flip(images, step_seed)
            elif name == "rotation":
                images = random_rotation(tf.cast(images, tf.float32), ROTATION, step_seed)
            else:
                images = random_zoom(tf.cast(images, tf.float32), ZOOM, step_seed)
        return tf.cast(images, tf.float32)

    return augment


def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Flips each image left to right with probability 1/2."""
    flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def random_crop(
    images: tf.Tensor, pad_h: int, pad_w: int, seed: tf.Tensor, *, flip_seed: tf.Tensor | None = None
) -> tf.Tensor:
    """Pads each image with zeros by (pad_h, pad_w) on every side, then crops it back to its size
    at a random offset; with `flip_seed`, then flips it as `random_flip(..., flip_seed)` does."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    top = tf.random.stateless_uniform([batch], seed_y, minval=0, maxval=2 * pad_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([batch], seed_x, minval=0, maxval=2 * pad_w + 1, dtype=tf.int32)
    rows = top[:, None] + tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    if flip_seed is not None:
        flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
        cols = tf.where(flip[:, None], width - 1 - cols, cols)
    cols = left[:, None] + cols
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


def random_rotation(images: tf.Tensor, factor: float, seed: tf.Tensor) -> tf.Tensor:
    """Rotates each image about its centre by an angle up to `factor` of a full turn either way."""
    batch = tf.shape(images)[0]
    angle = tf.random.stateless_uniform([batch], seed, minval=-factor, maxval=factor) * 2 * math.pi
    h, w = _float_size(images)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
    y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    zeros = tf.zeros_like(angle)
    transform = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)
    return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")


def random_zoom(images: tf.Tensor, factor: float, seed: tf.Tensor) -> tf.Tensor:
    """Zooms each image in or out about its centre by up to `factor` (the same both ways)."""
    batch = tf.shape(images)[0]
    zoom = 1.0 + tf.random.stateless_uniform([batch], seed, minval=-factor, maxval=factor)
    h, w = _float_size(images)
    zeros = tf.zeros_like(zoom)
    x_offset, y_offset = (w - 1) / 2 * (1 - zoom), (h - 1) / 2 * (1 - zoom)
    transform = tf.stack([zoom, zeros, x_offset, zeros, zoom, y_offset, zeros, zeros], axis=1)
    return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")


def _float_size(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.cast(tf.shape(images), tf.float32)
    return shape[1], shape[2]
