"""Whose folder it is: a command writes only into a new or empty folder or one the package wrote
(`claim_dir`), and a run's folder is created, resumed or cleared here (`prepare_run_dir`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from kerastune_flow.errors import RunDirError
from kerastune_flow.rundir.files import (
    BACKUP_DIR,
    CONFIG_JSON,
    EXPORT_JSON,
    EXPORT_PREFIX,
    LOCK_FILE,
    LR_FIND,
    RESULTS_JSON,
    RUN_FILES,
    TRACKING_JSON,
)

log = logging.getLogger(__name__)


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
    if all(p.is_dir() and folder_kind(p) == "run" for p in entries if p.name != TRACKING_JSON):
        return "compare"  # a comparison stopped before its report: its approaches' runs (and its MLflow run)
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


def prepare_run_dir(run_dir: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """Creates the run directory; returns True when an interrupted run is resumed.

    A finished run that `overwrite` replaces is left in place here: `clear_finished_run`
    removes it once the new run's data and model are known to be good, so a bad input never
    costs the previous results.

    Raises:
        RunDirError: when it is not the package's run (see `claim_dir`), holds a finished run and
            `overwrite` is False, or is not writable.
    """
    run_dir = Path(run_dir)
    claim_dir(run_dir, kinds=RUN_KINDS, overwrite=overwrite)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot write to the run directory {run_dir} ({error.strerror}); choose a writable --run-dir. "
            f"Received: run_dir={run_dir}"
        ) from None
    return (run_dir / BACKUP_DIR).exists() and not (run_dir / RESULTS_JSON).exists()


def clear_finished_run(run_dir: str | os.PathLike) -> None:
    """Removes the files of a finished run (the caller asked to overwrite it); no-op otherwise.

    Its exports go too (the `export-*` folders holding an export.json): they would describe a
    model that is no longer there. Anything else in the folder stays.

    Raises:
        RunDirError: when a file cannot be removed.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_JSON).exists():
        return
    exports = [p for p in run_dir.glob(EXPORT_PREFIX + "*") if p.is_dir() and (p / EXPORT_JSON).is_file()]
    targets = [p for p in [run_dir / name for name in RUN_FILES] + sorted(exports) if p.exists()]
    log.info("Replacing the finished run in %s: removing %s", run_dir, ", ".join(p.name for p in targets))
    try:
        for target in targets:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    except OSError as error:
        raise RunDirError(
            f"Cannot replace the finished run in {run_dir} ({error.strerror}); make it writable or choose another "
            f"--run-dir. Received: {error.filename}"
        ) from None
