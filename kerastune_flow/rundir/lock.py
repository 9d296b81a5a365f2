"""One process per output folder: `run_lock(folder)` holds FOLDER/.lock while a command writes it.

The lock is a file created with O_EXCL (so two processes can never both create it) holding JSON:
the host, PID, start time and command line of its holder. A second process is refused with a
sentence naming the holder. A lock whose holder is gone (same host, PID no longer running) was
left by a killed process: it is logged and taken over. On another host the PID cannot be
checked, so the message says how to remove the lock by hand.

Locks are re-entrant within one process: a command that runs other runs inside its folder
(`compare`'s approaches, `tune`'s trials) holds the outer lock, and the inner runs take none.
The workers of one cluster (a multi-worker run, a distributed search) do not take the lock:
their chief does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kerastune_flow.errors import RunDirError
from kerastune_flow.rundir.files import LOCK_FILE
from kerastune_flow.rundir.writes import umask

log = logging.getLogger(__name__)

# Folders this process holds (resolved paths, with a count): a run inside one of them is part of
# the same command. Process state by nature, as the lock files are the file system's.
_HELD: dict[Path, int] = {}


def holder_record() -> dict[str, Any]:
    """The JSON a lock holds: who took it, where and when."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["kerastune-flow", *sys.argv[1:]]),
    }


def read_lock(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in FOLDER/.lock, or None when there is none (or it cannot be read)."""
    try:
        record = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def pid_alive(pid: int) -> bool:
    """True when a process `pid` runs on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def is_stale(holder: dict[str, Any]) -> bool:
    """The lock's holder was on this host and no longer runs (it was killed)."""
    return holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1)))


def _refusal(folder: Path, holder: dict[str, Any]) -> RunDirError:
    who = f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
    if holder.get("host") != socket.gethostname():
        return RunDirError(
            f"{folder} is in use by {who} ({holder.get('command')}), another host, where this one cannot tell "
            f"whether it still runs; if it does not, remove {folder / LOCK_FILE} and run the command again. "
            f"Received: lock={folder / LOCK_FILE}"
        )
    return RunDirError(
        f"{folder} is in use by {who} ({holder.get('command')}); wait for it to end, stop it, or choose another "
        f"--run-dir. Received: lock={folder / LOCK_FILE}"
    )


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Creates the lock file holding `record`; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask())
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return True


def acquire(folder: str | os.PathLike) -> None:
    """Takes FOLDER/.lock (creating the folder), taking over one left by a dead process.

    Raises:
        RunDirError: when another live process holds it, or the folder cannot be written.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if _create(path, holder_record()):
                return
            holder = read_lock(folder)
            if holder is None:  # being written this instant, or damaged: look once more
                time.sleep(0.2)
                holder = read_lock(folder) or {"host": socket.gethostname(), "pid": -1, "started": "unknown"}
            if not is_stale(holder):
                raise _refusal(folder, holder)
            log.warning(
                "Taking over %s: its holder, PID %s started %s, no longer runs (killed?)",
                path,
                holder.get("pid"),
                holder.get("started"),
            )
            path.unlink(missing_ok=True)
    except RunDirError:  # an OSError too
        raise
    except OSError as error:
        raise RunDirError(
            f"Cannot write to the run directory {folder} ({error.strerror}); choose a writable --run-dir. "
            f"Received: run_dir={folder}"
        ) from None
    raise _refusal(folder, read_lock(folder) or {})


def release(folder: str | os.PathLike) -> None:
    """Removes FOLDER/.lock if this process holds it."""
    holder = read_lock(folder)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        (Path(folder) / LOCK_FILE).unlink(missing_ok=True)


def holds(folder: str | os.PathLike) -> bool:
    """True when this process holds `folder` or a folder above it."""
    resolved = Path(folder).resolve()
    return any(held == resolved or held in resolved.parents for held in _HELD)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, *, take: bool = True) -> Iterator[None]:
    """Holds `folder` for this process inside the block: released at its end, on errors and Ctrl-C too.

    Args:
        folder: the output folder (created if missing).
        take: False for a worker of a cluster whose chief holds the folder: nothing is written,
            but runs inside it count as this command's own.

    Raises:
        RunDirError: another live process holds it (see `acquire`).
    """
    resolved = Path(folder).resolve()
    nested = holds(resolved)
    created = take and not nested and not resolved.exists()
    if take and not nested:
        acquire(folder)
    _HELD[resolved] = _HELD.get(resolved, 0) + 1
    try:
        yield
    finally:
        _HELD[resolved] -= 1
        if not _HELD[resolved]:
            del _HELD[resolved]
        if take and not nested:
            release(folder)
        if created:  # a command refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                resolved.rmdir()  # only if empty
