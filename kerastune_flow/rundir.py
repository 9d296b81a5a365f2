"""The run directory: its file names, creating and clearing it, atomic writes, the history files.

A run directory holds:

    config.json     the Config, class names, image shape, head, strategy, versions
    history.csv     one row per epoch (history.jsonl: the same as JSON lines)
    model.keras     the best model (by the monitored metric)
    results.json    test metrics, wall time, parameter counts, best epoch
    curves.png      loss and accuracy per epoch, the fine-tune boundary marked
    lr_find.json    with `--learning-rate auto`: the range test's curve and the rate it chose
                    (lr_find.png its plot; lr_find_finetune.* for `--finetune-lr auto`)
    tensorboard/    TensorBoard event files
    backup/         the resume state (see `resume.py`); removed when the run finishes
    .lock           while a command writes the folder: which process (see `runlock.py`)

Every file is replaced atomically (written beside, then renamed), so a kill at any moment leaves
the previous complete version, never a truncated one, with the mode the umask gives. The package
writes only into a new or empty folder or one it wrote (`claim_dir`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import io
import json
import logging
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

log = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"
CURVES_PNG = "curves.png"
BEST_MODEL = "model.keras"
HISTORY_CSV = "history.csv"
HISTORY_JSONL = "history.jsonl"
BACKUP_DIR = "backup"
TENSORBOARD_DIR = "tensorboard"
LR_FIND = "lr_find"  # lr_find.json and lr_find.png: a range test's record and plot (see `lr_find_paths`)
LEARNING_RATES_JSON = "learning_rates.json"  # under backup/: the rates "auto" found, for a resumed run
# `export` writes RUN_DIR/export-FORMAT[-QUANTIZE] by default, each folder with this record in it.
EXPORT_PREFIX = "export-"
EXPORT_JSON = "export.json"
LOCK_FILE = ".lock"  # while a command writes the folder: who (see `runlock.py`)
RUN_FILES = (
    CONFIG_JSON,
    RESULTS_JSON,
    CURVES_PNG,
    BEST_MODEL,
    HISTORY_CSV,
    HISTORY_JSONL,
    BACKUP_DIR,
    TENSORBOARD_DIR,
    *(f"{LR_FIND}{part}.{ext}" for part in ("", "_finetune") for ext in ("json", "png")),
)


def lr_find_paths(run_dir: str | os.PathLike, stage: str | None = None) -> tuple[Path, Path]:
    """The JSON record and the plot of a range test in `run_dir`: lr_find.json / .png, or for a
    stage other than the first fit's ("finetune"), lr_find_finetune.json / .png."""
    stem = LR_FIND if stage in (None, "head") else f"{LR_FIND}_{stage}"
    return Path(run_dir) / f"{stem}.json", Path(run_dir) / f"{stem}.png"


# --------------------------------------------------------------------------- the directory


def prepare_run_dir(workdir: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Creates the run directory; returns True when an interrupted run is resumed.

    A finished run that `overwrite` replaces is left in place here: `clear_finished_run`
    removes it once the new run's data and model are known to be good, so a bad input never
    costs the previous results.

    Raises:
        RunDirError: when it is not the package's run (see `claim_dir`), holds a finished run and
            `overwrite` is False, or is not writable.
    """
    workdir = Path(workdir)
    claim_dir(workdir, kinds=RUN_KINDS, overwrite=overwrite)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot write to the run directory {workdir} ({error.strerror}); choose a writable --run-dir. "
            f"Received: run_dir={workdir}"
        ) from None
    return (workdir / BACKUP_DIR).exists() and not (workdir / RESULTS_JSON).exists()


def interrupted_run_seed(workdir: str | os.PathLike) -> int | None:
    """The seed an interrupted run in `workdir` recorded (it has a backup and no results), or None."""
    workdir = Path(workdir)
    if (workdir / RESULTS_JSON).exists() or not (workdir / BACKUP_DIR).exists():
        return None
    try:
        return read_json(workdir / CONFIG_JSON)["config"]["train"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_finished_run(workdir: str | os.PathLike) -> None:
    """Removes the files of a finished run (the caller asked to overwrite it); no-op otherwise.

    Its exports go too (the `export-*` folders holding an export.json): they would describe a
    model that is no longer there. Anything else in the folder stays.

    Raises:
        RunDirError: when a file cannot be removed.
    """
    workdir = Path(workdir)
    if not (workdir / RESULTS_JSON).exists():
        return
    exports = [p for p in workdir.glob(EXPORT_PREFIX + "*") if p.is_dir() and (p / EXPORT_JSON).is_file()]
    targets = [p for p in [workdir / name for name in RUN_FILES] + sorted(exports) if p.exists()]
    log.info("Replacing the finished run in %s: removing %s", workdir, ", ".join(p.name for p in targets))
    try:
        for target in targets:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot replace the finished run in {workdir} ({error.strerror}); make it writable or choose another "
            f"--run-dir. Received: {error.filename}"
        ) from None


def worker_run_dir(chief_dir: str | os.PathLike) -> Path:
    """A non-chief worker's private run directory: the same files are written, then thrown
    away. It starts from the chief's backup, if any, so a restarted cluster resumes in step."""
    chief_dir = Path(chief_dir)
    private = Path(tempfile.mkdtemp(prefix="kerastune_flow_worker_"))
    if (chief_dir / BACKUP_DIR).is_dir():
        shutil.copytree(chief_dir / BACKUP_DIR, private / BACKUP_DIR)
    return private


# --------------------------------------------------------------------------- whose folder it is

# What each kind of folder the package writes holds, in the order they are told apart: a search
# and a comparison hold runs, so they are recognised first.
KIND_MARKERS = {
    "export": (EXPORT_JSON,),
    "search": ("search.json", "tune.json"),
    "compare": ("report.md",),
    "run": (CONFIG_JSON, RESULTS_JSON, BACKUP_DIR),
    "lr_find": (f"{LR_FIND}.json", f"{LR_FIND}_finetune.json"),
}
KIND_WORDS = {
    "export": "an export",
    "search": "a search",
    "compare": "a comparison",
    "run": "a run",
    "lr_find": "a learning-rate range test",
}
RUN_KINDS = ("run", "lr_find")  # a run may go where a range test went: `train --learning-rate auto` writes one
# Left out when asking whether a folder is empty: a run's lock and what file browsers leave.
IGNORED_NAMES = (LOCK_FILE, ".DS_Store", "Thumbs.db", "desktop.ini")


def folder_kind(folder: str | os.PathLike) -> str | None:
    """What `folder` holds: None when missing or empty, a key of `KIND_MARKERS` when the package
    wrote it, or "foreign" (files of someone else's, or a file instead of a folder)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        return "foreign"
    entries = [p for p in folder.iterdir() if p.name not in IGNORED_NAMES]
    if not entries:
        return None
    for kind, markers in KIND_MARKERS.items():
        if any((folder / name).exists() for name in markers):
            return kind
    if all(p.is_dir() and folder_kind(p) == "run" for p in entries):
        return "compare"  # a comparison stopped before its report: its approaches' runs only
    return "foreign"


def is_finished(folder: str | os.PathLike) -> bool:
    """A run, search or comparison that ran to its end (or an export, always whole)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (RESULTS_JSON, EXPORT_JSON, "report.html"))


def claim_dir(
    folder: str | os.PathLike,
    *,
    kinds: tuple[str, ...] = ("run",),
    overwrite: bool = False,
    flag: str = "--run-dir",
) -> str | None:
    """Checks that a command may write `folder`, before anything is written; every command that
    takes an output folder calls it. The package writes only into a new or empty folder or one it
    wrote itself of a kind the command makes; a finished run or export is replaced only with
    `overwrite`; the current folder (or one holding it) is never replaced.

    Args:
        folder: the output folder.
        kinds: the kinds (see `KIND_MARKERS`) the command may take up; the first names it.
        overwrite: the user asked to replace a finished run or export.
        flag: the command's flag for the folder, for the message.

    Returns:
        `folder_kind(folder)`: None for a new or empty folder.

    Raises:
        RunDirError: for anyone else's folder, another kind of the package's, or a finished one
            without `overwrite`; nothing is written then.
    """
    folder = Path(folder)
    kind = folder_kind(folder)
    words = "export folder" if kinds[0] == "export" else "run directory"
    if folder.exists() and not folder.is_dir():
        raise RunDirError(
            f"Cannot write to the {words} {folder} (File exists: it is a file, not a folder); choose another "
            f"{flag}. Received: {flag}={folder}"
        )
    cwd = Path.cwd().resolve()
    if kinds[0] == "export" and folder.exists() and (folder.resolve() == cwd or folder.resolve() in cwd.parents):
        raise RunDirError(
            f"{folder} is the current folder or holds it, so it is never replaced; choose another {flag}. "
            f"Received: {flag}={folder}"
        )
    if kind == "foreign":
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.name not in IGNORED_NAMES)[:3])
        raise RunDirError(
            f"{folder} holds files that kerastune_flow did not write ({found}), so it is left untouched"
            f"{' (--overwrite replaces only what kerastune_flow wrote)' if overwrite else ''}; choose a new or empty "
            f"{flag}. Received: {flag}={folder}"
        )
    if kind is not None and kind not in kinds:
        raise RunDirError(
            f"{folder} holds {KIND_WORDS[kind]}, not {KIND_WORDS[kinds[0]]}, so it is left untouched; choose a new "
            f"or empty {flag}. Received: {flag}={folder}"
        )
    if kind == kinds[0] and kind in ("run", "export") and is_finished(folder) and not overwrite:
        what = "a finished run" if kind == "run" else "an export"
        raise RunDirError(
            f"{folder} already holds {what}; pass --overwrite to replace it or choose another {flag}. "
            f"Received: {flag}={folder}"
        )
    return kind


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


# --------------------------------------------------------------------------- history files


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs logged so far, one dict each: from history.jsonl, or from history.csv when
    JSON-lines logging is off; [] when neither exists yet."""
    run_dir = Path(run_dir)
    jsonl = run_dir / HISTORY_JSONL
    if jsonl.exists():
        with open(jsonl, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    path = run_dir / HISTORY_CSV
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: _parse_cell(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _parse_cell(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def write_history(
    run_dir: str | os.PathLike, records: list[dict[str, Any]], *, csv_log: bool = True, jsonl_log: bool = True
) -> None:
    """Replaces history.csv and/or history.jsonl with `records`, atomically."""
    run_dir = Path(run_dir)
    if jsonl_log:
        atomic_write_text(run_dir / HISTORY_JSONL, "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
    if csv_log:
        atomic_write_text(run_dir / HISTORY_CSV, records_to_csv(records))


def records_to_csv(records: list[dict[str, Any]]) -> str:
    """CSV text with the union of keys as header, in first-seen order."""
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()
