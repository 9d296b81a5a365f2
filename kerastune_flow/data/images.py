"""Image files: decoding as the pipeline does, a fast parallel scan that names the files that
cannot be decoded, and reading files for prediction."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf
from PIL import Image

from kerastune_flow.data.pipeline import with_autotune
from kerastune_flow.data.sources import whole_pixels
from kerastune_flow.errors import DataError
from kerastune_flow.runtime import progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
TIFF_EXTENSIONS = (".tif", ".tiff")  # TensorFlow has no TIFF decoder: refused with the command that converts them
# What archivers and operating systems leave beside images (besides any name starting with "."):
# macOS's AppleDouble `._*` files and `__MACOSX/` (zip), Windows' thumbnail caches and folder settings.
LITTER_NAMES = ("__macosx", "thumbs.db", "desktop.ini")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SKIP_BAD_IMAGES_FLAG = "--skip-bad-images"
BAD_FILES_NAMED = 3  # bad files named in an error message; the rest are counted
SCAN_BATCH = 1024  # scan results per Python round trip (one per file costs 0.7 ms)


def litter_kind(name: str) -> str | None:
    """The kind of litter a file or folder name is (`._*`, `.*`, `__MACOSX`, `Thumbs.db`,
    `desktop.ini`), or None for a name that may hold images."""
    if name.startswith("._"):
        return "._*"
    if name.startswith("."):
        return ".*"
    return name if name.lower() in LITTER_NAMES else None


@dataclasses.dataclass
class FileWalk:
    """The files under a folder, by what is done with them.

    Attributes:
        images: image files (IMAGE_EXTENSIONS), sorted.
        tiff: TIFF files, sorted (refused by `refuse_tiff`).
        other: count of the other files by extension.
        litter: count of the litter names (files, and folders not entered) by kind.
    """

    images: list[str]
    tiff: list[str]
    other: collections.Counter
    litter: collections.Counter


def walk_files(folder: str | os.PathLike) -> FileWalk:
    """Every file under `folder`, recursively, without entering litter folders (`__MACOSX/`, `.*`)."""
    walk = FileWalk(images=[], tiff=[], other=collections.Counter(), litter=collections.Counter())
    for parent, dirs, files in os.walk(folder):
        kept = []
        for name in dirs:
            kind = litter_kind(name)
            if kind:
                walk.litter[f"{kind}/"] += 1
            else:
                kept.append(name)
        dirs[:] = kept  # os.walk enters only these
        for name in files:
            kind = litter_kind(name)
            suffix = os.path.splitext(name)[1].lower()
            if kind:
                walk.litter[kind] += 1
            elif suffix in IMAGE_EXTENSIONS:
                walk.images.append(os.path.join(parent, name))
            elif suffix in TIFF_EXTENSIONS:
                walk.tiff.append(os.path.join(parent, name))
            else:
                walk.other[suffix or "(no extension)"] += 1
    walk.images.sort()
    walk.tiff.sort()
    return walk


def log_litter(litter: collections.Counter, where: str | os.PathLike) -> None:
    """One log line counting the litter left out under `where` (nothing when there is none)."""
    if litter:
        log.info(
            "Ignored %d litter file(s) and folder(s) under %s, never read as images or classes: %s",
            sum(litter.values()),
            where,
            ", ".join(f"{kind} x{n}" for kind, n in sorted(litter.items())),
        )


def refuse_tiff(tiff: Sequence[str], where: str | os.PathLike) -> None:
    """Raises a DataError naming the TIFF files, if any, and the command that converts them.

    Raises:
        DataError: when `tiff` is not empty.
    """
    if tiff:
        first = Path(tiff[0])
        try:  # as deep as the first file lies: */*.tif for class folders, */*/*.tif under split folders
            depth = len(first.relative_to(where).parts) - 1
        except ValueError:
            depth = 0
        command = f"mogrify -format png {'*/' * depth}*{first.suffix}"
        raise DataError(
            f"{len(tiff)} TIFF file(s) under {where} (such as {first}) cannot be read, since TensorFlow has "
            f"no TIFF decoder; convert them to PNG, e.g. with ImageMagick in {where}: `{command}` (then delete "
            f"the {first.suffix} files). Received: tiff_files={len(tiff)}"
        )


def image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under `folder`, recursively, sorted; litter is left out and logged.

    Raises:
        DataError: when there are TIFF files (see `refuse_tiff`).
    """
    walk = walk_files(folder)
    refuse_tiff(walk.tiff, folder)
    log_litter(walk.litter, folder)
    return walk.images


def detect_channels(paths: Sequence[str], sample: int = 32) -> int:
    """Returns 1 when every sampled image is grayscale, else 3."""
    step = max(1, len(paths) // sample)
    for path in list(paths)[::step][:sample]:
        try:
            with Image.open(path) as image:
                if image.mode not in _GRAY_MODES:
                    return 3
        except OSError:
            continue  # unreadable files are reported by the decoder with their name
    return 1


def decode_image(raw: tf.Tensor, channels: int, *, webp: bool = True) -> tf.Tensor:
    """`tf.io.decode_image` to `channels` (1 or 3).

    TF decodes GIF and BMP only to 3 or 4 channels, and WebP only to its own 3 or 4, so a
    grayscale request decodes those to RGB first, and a WebP is decoded as it is and cut to RGB.

    Args:
        raw: the file's bytes.
        channels: 1 or 3.
        webp: tell WebP files apart (one more branch per image: the training pipeline takes it
            only when its files include WebP, the scan and prediction always).
    """

    def is_webp():
        return tf.logical_and(tf.strings.substr(raw, 0, 4) == "RIFF", tf.strings.substr(raw, 8, 4) == "WEBP")

    def rgb():
        def own_rgb():
            own = tf.io.decode_image(raw, channels=0, expand_animations=False)  # 3 or 4 channels
            return tf.ensure_shape(own[..., :3], [None, None, 3])

        def plain():
            return tf.io.decode_image(raw, channels=3, expand_animations=False)

        return tf.cond(is_webp(), own_rgb, plain) if webp else plain()

    if channels != 1:
        return rgb()
    gif_or_bmp = tf.logical_or(tf.strings.substr(raw, 0, 3) == "GIF", tf.strings.substr(raw, 0, 2) == "BM")
    return tf.cond(
        tf.logical_or(gif_or_bmp, is_webp()) if webp else gif_or_bmp,
        lambda: tf.image.rgb_to_grayscale(rgb()),
        lambda: tf.io.decode_image(raw, channels=1, expand_animations=False),
    )


def _probe_image(raw: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes `raw` as the pipeline would, and returns its (height, width).

    A JPEG is decoded at 1/8 scale: libjpeg still reads every coefficient, so a truncated or
    corrupt file fails the same way, at half the cost; its size comes from the header.
    """

    def jpeg():
        small = tf.io.decode_jpeg(raw, channels=channels, ratio=8)
        # The header's size, plus zeros that make the decode (the actual check) run.
        return tf.io.extract_jpeg_shape(raw)[:2] + 0 * tf.shape(small)[:2]

    def other():
        return tf.shape(decode_image(raw, channels))[:2]

    size = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    tf.debugging.assert_positive(tf.reduce_min(size), message="the image has no pixels")
    return size


def _bad_image_reason(path: str, channels: int) -> str:
    """Why one file fails to decode, in a few words (eager, for the few that do)."""
    try:
        raw = tf.io.read_file(path)
        if int(tf.strings.length(raw)) == 0:
            return "empty file"
        _probe_image(raw, channels)
    except tf.errors.OpError as error:
        message = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "", error.message.strip().splitlines()[0])
    else:
        return "decoded on a second try (a flaky file system?)"
    if "Unknown image file format" in message:
        return "not an image"
    if "jpeg::" in message:
        return "corrupt or truncated JPEG"
    if "Invalid PNG" in message:
        return "corrupt or truncated PNG"
    try:
        with Image.open(path) as image:
            image.load()
            kind = f"{image.format} image (mode {image.mode})"
    except Exception:  # Pillow cannot read it either: TensorFlow's words are the best we have
        return message[:120]
    return f"a {kind} that TensorFlow cannot decode, re-save it as PNG"


@dataclasses.dataclass
class ImageScan:
    """What a scan of image files found.

    Attributes:
        bad: (path, reason) of every file that cannot be decoded, sorted by path.
        sizes: (height, width) of every readable file, by path.
    """

    bad: list[tuple[str, str]]
    sizes: dict[str, tuple[int, int]]

    def smaller_than(self, size: Sequence[int]) -> list[str]:
        """Readable files smaller than `size` (height, width) in either dimension."""
        return [p for p, (h, w) in self.sizes.items() if h < size[0] or w < size[1]]


def scan_images(paths: Sequence[str], *, channels: int = 3) -> ImageScan:
    """Decodes every file once, in parallel, to find those that would fail the pipeline.

    The decoder is the pipeline's own (`tf.io.decode_image`), so a file that passes the scan
    decodes in training; JPEGs are decoded at 1/8 scale, which still reads all of their data.
    About 0.1 ms per small image and 0.3 ms per 400x300 JPEG on 2 CPU cores. A scan that takes
    longer than a couple of seconds shows its progress (`progress.Progress`).

    Args:
        paths: image files.
        channels: the channel count the pipeline will decode to (1 or 3).

    Returns:
        ImageScan.
    """
    paths = [str(p) for p in paths]
    if not paths:
        return ImageScan(bad=[], sizes={})

    def probe(path):
        return path, _probe_image(tf.io.read_file(path), channels)

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = with_autotune(ds.ignore_errors(log_warning=False).batch(SCAN_BATCH))
    sizes: dict[str, tuple[int, int]] = {}
    with progress.Progress("Image scan", total=len(paths), unit="image") as shown:
        for names, shapes in ds.as_numpy_iterator():
            sizes.update((n.decode(), (int(h), int(w))) for n, (h, w) in zip(names, shapes, strict=True))
            shown.advance(len(names))
        shown.update(len(paths))  # the files that fail were read too; they are left out of the batches
    bad = sorted(p for p in set(paths) if p not in sizes)
    return ImageScan(bad=[(p, _bad_image_reason(p, channels)) for p in bad], sizes=sizes)


def check_images(
    paths: Sequence[str], *, channels: int = 3, skip_bad_images: bool = False, where: str | os.PathLike = ""
) -> ImageScan:
    """`scan_images`, then refuse the bad files or, with `skip_bad_images`, warn about each.

    Raises:
        DataError: naming the first bad files, how many there are, and the flag that skips
            them (unless `skip_bad_images`).
    """
    scan = scan_images(paths, channels=channels)
    if not scan.bad:
        return scan
    where = f" under {where}" if str(where) else ""
    if not skip_bad_images:
        named = ", ".join(f"{p} ({reason})" for p, reason in scan.bad[:BAD_FILES_NAMED])
        more = f" and {len(scan.bad) - BAD_FILES_NAMED} more" if len(scan.bad) > BAD_FILES_NAMED else ""
        raise DataError(
            f"{len(scan.bad)} of {len(paths)} image files{where} cannot be decoded: {named}{more}; "
            f"delete or re-save them, or pass {SKIP_BAD_IMAGES_FLAG} to leave them out. "
            f"Received: bad_files={len(scan.bad)}"
        )
    log.warning("Leaving out %d of %d image files%s that cannot be decoded:", len(scan.bad), len(paths), where)
    for path, reason in scan.bad:
        log.warning("  skipped %s (%s)", path, reason)
    return scan


def load_images(paths: Sequence[str], *, image_size: tuple[int, int], channels: int) -> tf.Tensor:
    """Reads image files into one float32 batch (N, H, W, C) in 0..255, for prediction.

    Raises:
        DataError: naming the first file that is missing or cannot be decoded.
    """
    images = []
    for path in paths:
        try:
            image = decode_image(tf.io.read_file(path), channels)
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
            raise DataError(
                f"Cannot read image {path}: it is missing or not a JPEG/PNG/GIF/BMP/WebP file. "
                f"Received: {type(error).__name__}"
            ) from None
        images.append(whole_pixels(tf.image.resize(image, image_size)))  # as the training images
    return tf.stack(images)


def expand_image_arguments(items: Sequence[str]) -> list[str]:
    """Turns files and folders (searched recursively for images, litter left out) into a sorted file list.

    Raises:
        DataError: for a path that does not exist, a TIFF file, or no image at all.
    """
    paths: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths.extend(image_files(p))
        elif p.is_file() and p.suffix.lower() in TIFF_EXTENSIONS:
            refuse_tiff([str(p)], p.parent)
        elif p.exists():
            paths.append(str(p))
        else:
            raise DataError(f"Image or folder {p} does not exist. Received: {item}")
    if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(items)}.")
    return paths
