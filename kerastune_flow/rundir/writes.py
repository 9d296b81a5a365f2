"""Writing a run's files: atomically (written beside, then renamed), with errors that say what to do.

A kill at any moment leaves the previous complete version of a file, never a truncated one, with
the mode the umask gives; a full disk or a folder without permission is a RunDirError that names
the folder, its free space and what to do next.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kerastune_flow.errors import KerastuneFlowError, RunDirError


def umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


# --------------------------------------------------------------------------- write errors


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError or TensorFlow error that says the disk (or quota) is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in DISK_FULL_TEXTS)


def free_space(folder: str | os.PathLike) -> str:
    """The free space of the disk holding `folder`, for a message ("12.3 MB")."""
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown space"
    unit = "bytes"
    for unit in ("bytes", "KB", "MB", "GB"):  # noqa: B007 (the unit reached is the one used)
        if free < 1024 or unit == "GB":
            break
        free /= 1024
    return f"{free:,.0f} {unit}" if unit == "bytes" else f"{free:,.1f} {unit}"


def write_error(folder: str | os.PathLike, name: str, error: BaseException) -> RunDirError:
    """The RunDirError for a file `name` in `folder` that could not be written.

    Args:
        folder: the folder written to (its disk is named in the message).
        name: the file, or words such as "a checkpoint".
        error: the OSError or TensorFlow error raised.
    """
    folder = Path(folder)
    received = " ".join(str(error).split())[:160]
    if is_disk_full(error):
        return RunDirError(
            f"The disk holding {folder} is full ({free_space(folder)} free), so {name} could not be written and "
            f"the files written before are kept; free some space or choose a --run-dir on another disk, then run "
            f"the same command to resume. Received: {received}"
        )
    reason = getattr(error, "strerror", None) or received
    return RunDirError(
        f"Cannot write {name} in {folder} ({reason}), so the files written before are kept; make the run "
        f"directory writable or choose another --run-dir. Received: {received}"
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turns an OSError while writing `path` into a RunDirError that says what to do."""
    try:
        yield
    except KerastuneFlowError:
        raise
    except OSError as error:
        raise write_error(path.parent, path.name, error) from None


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without an error, the file
    is synced to disk and renamed over `path`, so readers see the old file or the new one.

    The temporary name keeps the suffixes of `path`.

    Raises:
        RunDirError: when the file cannot be written (a full disk, no permission); the old
            file is then untouched and the temporary one removed.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # The whole suffix: Keras wants ".keras" to save a model and ".weights.h5" to save weights.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would make every run file private
    try:
        with _writing(path):
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes text through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`atomic_write_text` of indented JSON (numpy values and paths converted, see `to_jsonable`)."""
    # ensure_ascii=False: class names and paths as typed ("crème brûlée"), in UTF-8
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save` through `atomic_file`: a kill during the save leaves the previous model.

    The file names Keras' own classes only, so plain `keras.saving.load_model` opens it, compile
    config included, without this package: an optimizer of the package (discriminative rates,
    which Keras has no class for) is written as the built-in one it extends, with the same
    settings and state and one rate for all (config.json keeps the multiplier).
    """
    with atomic_file(path) as tmp, _builtin_optimizer(model):
        model.save(tmp)


@contextlib.contextmanager
def _builtin_optimizer(model: keras.Model) -> Iterator[None]:
    """Within it, the model's compile config names the built-in optimizer that its optimizer
    extends, when that optimizer says which (`as_builtin`); else nothing changes."""
    # Keras keeps what `compile()` was given in `_compile_config` and saves it as given; there
    # is no public way to save another optimizer in its place.
    compiled = getattr(model, "_compile_config", None)
    optimizer = getattr(compiled, "config", {}).get("optimizer")
    if not hasattr(optimizer, "as_builtin"):
        yield
        return
    portable = copy.copy(compiled)
    portable.config = {**compiled.config, "optimizer": optimizer.as_builtin()}
    model._compile_config = portable
    try:
        yield
    finally:
        model._compile_config = compiled


def to_jsonable(value: Any) -> Any:
    """Converts numpy scalars and arrays, tuples and paths into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    # Through to_jsonable again, so that a numpy NaN becomes None like a Python one.
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file written by this package."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
