"""The folder of a command started without --run-dir: the unfinished one it takes up, or a new one.

A default folder is named by the clock (runs/RECIPE-DATE-TIME), so without this the same
command, run again after Ctrl-C, would start over in a new folder. Instead the newest unfinished
folder of the same command and the same settings under runs/ that no live process holds is taken
up, and the log says so; --run-dir starts a new one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kerastune_flow.rundir import lock
from kerastune_flow.rundir.claim import is_finished
from kerastune_flow.rundir.files import BACKUP_DIR, CONFIG_JSON
from kerastune_flow.rundir.writes import read_json, to_jsonable

log = logging.getLogger(__name__)

RUNS_ROOT = "runs"
# Settings a run resolves when they are not given: the seed (a new one, recorded), the steps
# per execution (the device's), and the monitor (without "val_" when there is no validation split).
RESOLVED_AT_RUN = ("seed", "steps_per_execution")
SEARCH_BUDGET = ("trials_asked", "max_minutes")  # a resumed search may have another budget
# Where a run is recorded, not what it is (config.settings.TRACKING_FIELDS): `--track mlflow` may be
# added to the command that takes an unfinished run or search up.
TRACKING = ("track", "tracking_uri")


def default_run_dir(prefix: str, *, matches: Callable[[Path], bool], root: str | os.PathLike = RUNS_ROOT) -> Path:
    """ROOT/PREFIX... to write: the newest unfinished one for which `matches` holds, else a new
    ROOT/PREFIXDATE-TIME.

    Args:
        prefix: the start of the command's default folder names, e.g. "cifar10_cnn-".
        matches: whether a folder was started by the same command with the same settings.
        root: the folder of the default folders.
    """
    root = Path(root)
    found = sorted((p for p in root.glob(f"{prefix}*") if p.is_dir()), key=_mtime, reverse=True)
    for folder in found:
        if is_finished(folder) or not matches(folder):
            continue
        holder = lock.read_lock(folder)
        if holder and not lock.is_stale(holder):
            log.info("The unfinished run %s is in use by PID %s: starting a new one", folder, holder.get("pid"))
            continue
        log.info("Resuming the unfinished run %s: same recipe and settings; pass --run-dir to start a new one", folder)
        return folder
    return new_run_dir(prefix, root=root)


def new_run_dir(prefix: str, *, root: str | os.PathLike = RUNS_ROOT) -> Path:
    """ROOT/PREFIXDATE-TIME: a command's new default folder, named by the clock."""
    return Path(root) / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def same_run(folder: Path, config: dict[str, Any]) -> bool:
    """`folder` holds an interrupted run (a backup, no results) of `config` (`Config.to_dict()`):
    equal in every setting, except those the run resolved where `config` leaves them unset."""
    if not (folder / BACKUP_DIR).is_dir():
        return False
    try:
        recorded = read_json(folder / CONFIG_JSON)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    asked = to_jsonable(config)
    for section, values in asked.items():
        for name, value in values.items():
            if name in TRACKING:
                continue
            got = recorded.get(section, {}).get(name, value)
            if got == value or (value is None and name in RESOLVED_AT_RUN):
                continue
            if name == "monitor" and got == str(value).removeprefix("val_"):
                continue
            return False
    return True


def same_search(folder: Path, asked: dict[str, Any]) -> bool:
    """`folder` holds an unfinished search started with the settings `asked` (search.json's)."""
    try:
        previous = read_json(folder / "search.json")
    except (OSError, ValueError):
        return False
    asked = to_jsonable(asked)
    keys = (set(previous) | set(asked)) - set(SEARCH_BUDGET) - set(TRACKING)
    if asked.get("seed") is None:
        keys.discard("seed")
    return all(previous.get(key) == asked.get(key) for key in keys)
