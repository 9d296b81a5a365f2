"""Each log line once: TensorFlow's native lines while it is imported (`once_each`, which the
package's `__init__` uses) and the command line's handlers (`log_to_stderr`, which `run.main` calls).

Why TensorFlow's native lines came twice: TensorFlow 2.21's wheel links a second copy of absl's logging and of its
oneDNN notice (core/util/port.cc) into tensorflow/python/profiler/internal/_pywrap_profiler_plugin.so,
which `import tensorflow` loads after the core library; each copy writes absl's "WARNING: All log
messages before absl::InitializeLog() is called are written to STDERR" and "oneDNN custom operations
are on ..." straight to file descriptor 2 (the same happens with a bare `import tensorflow`). absl
does not read TF_CPP_MIN_LOG_LEVEL, so no environment variable hides them, and Python's logging never
sees them. `once_each` holds file descriptor 2 while TensorFlow loads and then writes what its native
code wrote, each line once, leaving out absl's INFO lines (and their banner) unless
TF_CPP_MIN_LOG_LEVEL is 0: what that variable asks of TensorFlow's later lines. It reads the
variable and sets nothing. Python's own writes to sys.stderr meanwhile go straight through.

If the process dies inside the import (a CPU without the instructions the wheel needs aborts it),
the lines held are lost with it: KERASTUNE_FLOW_DEBUG=1 (the CLI's switch for tracebacks) turns the
holding off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from kerastune_flow.runtime import environment

DEBUG_ENV = environment.KERASTUNE_FLOW_DEBUG  # show everything (run.py also shows tracebacks under it)
# absl's prefix: severity, MMDD, time (before absl is set up, "00:00:" and the epoch's seconds), thread,
# file:line]
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0, 1, 2, 3
# Errors that only say there is no GPU, shown as INFO: the full `tensorflow` wheel (what KerasHub's
# tensorflow-text requirement installs beside tensorflow-cpu) writes one at every start on a machine
# without CUDA, and the run's "Strategy:" line already says where it trains.
_NO_GPU = ("failed call to cuInit",)


def min_level() -> int:
    """The lowest absl severity shown: TF_CPP_MIN_LOG_LEVEL if set, else 1 (warnings and up)."""
    try:
        return int(environment.read(environment.TF_CPP_MIN_LOG_LEVEL, "1"))
    except ValueError:
        return 1


def each_once(text: str, *, level: int = 1) -> str:
    """The lines of `text` each once (absl lines compared without their time and thread), absl
    records below `level` left out with their continuation lines, and absl's banner shown only
    with INFO lines (it says nothing else)."""
    kept, seen, shown = [], set(), True
    for line in text.splitlines(keepends=True):
        record = _ABSL_LINE.match(line)
        if record:
            severity = 0 if any(text in line for text in _NO_GPU) else _SEVERITIES.index(record.group(1))
            shown, key = severity >= level, line[record.end() :]
        elif line.rstrip("\r\n") == _ABSL_BANNER:
            shown, key = level <= 0, line
        else:  # a continuation of the record above, or a line of its own
            key = line
        if shown and key not in seen:
            seen.add(key)
            kept.append(line)
    return "".join(kept)


def debugging() -> bool:
    """True under KERASTUNE_FLOW_DEBUG (anything but unset, "" or "0")."""
    return environment.is_on(DEBUG_ENV)


def _holder() -> int:
    """A file descriptor to hold the lines: in memory where the system has memfd, else a temporary file."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("kerastune_flow-native-logs")
    handle = tempfile.TemporaryFile()
    fd = os.dup(handle.fileno())
    handle.close()
    return fd


@contextlib.contextmanager
def once_each() -> Iterator[None]:
    """Holds what native code writes to file descriptor 2 inside the block and writes it out after,
    through `each_once`. Does nothing when TensorFlow is already imported, under
    KERASTUNE_FLOW_DEBUG=1, or when file descriptor 2 cannot be held."""
    if "tensorflow" in sys.modules or debugging():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        held = _holder()
    except OSError:
        os.close(saved)
        yield
        return
    python_stderr = sys.stderr
    through = None
    if _uses_fd_2(python_stderr):  # Python's writes (warnings, tracebacks) go out as they come
        through = io.TextIOWrapper(
            io.FileIO(saved, "w", closefd=False),
            encoding=python_stderr.encoding,
            errors=python_stderr.errors,
            line_buffering=True,
        )
        sys.stderr = through
    os.dup2(held, 2)
    try:
        yield
    finally:
        if through is not None:
            sys.stderr = python_stderr
            _repoint_handlers(through, python_stderr)
            through.close()  # flushes; the descriptor stays open (closefd=False)
        os.dup2(saved, 2)
        os.close(saved)
        os.lseek(held, 0, os.SEEK_SET)
        with open(held, "rb", closefd=True) as source:
            text = source.read().decode("utf-8", errors="replace")
        out = each_once(text, level=min_level())
        if out:
            os.write(2, out.encode("utf-8", errors="replace"))


def _repoint_handlers(old: object, new: object) -> None:
    """Points the logging handlers made inside `once_each` (TensorFlow's own, made while it imports)
    at `new`: they took `sys.stderr` as it was then, the stream about to be closed, and every later
    line of theirs (the retracing warning) was a "Logging error ... I/O operation on closed file"."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # placeholders have none
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)


def _uses_fd_2(stream: object) -> bool:
    """True when `stream` writes to file descriptor 2 (not pytest's or a notebook's replacement)."""
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def log_to_stderr(*, prefix: str = "[kerastune_flow] ") -> None:
    """The command line's logging: the package's lines on stderr, and TensorFlow's once.

    TensorFlow gives its logger ("tensorflow") a handler of its own when it is imported before the
    root logger has one, as in the command line; the root handler added next printed each of its
    lines a second time (the retracing warning, "Assets written to"). It keeps its own handler,
    stops propagating, and shows warnings and up unless its level was chosen (its INFO lines name
    temporary folders). The handler is not added when logging was set up before (pytest, a notebook).
    """
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(message)s", stream=sys.stderr)
    tf_logger = logging.getLogger("tensorflow")
    if tf_logger.handlers:
        tf_logger.propagate = False
        if tf_logger.level == logging.NOTSET:
            tf_logger.setLevel(logging.WARNING)
