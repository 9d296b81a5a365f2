"""Progress of the long steps that Keras' own bars do not cover: the image scan, the feature and
prefix passes, export's conversion and parity check, `evaluate` and `predict`.

In a terminal (or a notebook) a step draws a `keras.utils.Progbar`; otherwise (a log file, a pipe,
CI) it writes one log line every `INTERVAL` seconds with the share done and the time left. A step
that ends within `DELAY` seconds shows nothing. Everything goes through one logger, `LOGGER`: when
it is set above INFO (`silenced`, which the CLI's `--quiet` uses) nothing is shown, bar included.
The logger's level is the switch, rather than a `verbose` argument, because the scan runs deep in
the data loading that every command shares: a library user silences progress the way any logger is
silenced, and the CLI sets the level for one command and puts it back.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import keras
import tensorflow as tf

LOGGER = "kerastune_flow.runtime.progress"
DELAY = 2.0  # seconds before a step shows anything: shorter steps stay silent
INTERVAL = 5.0  # seconds between two log lines when the output is not a terminal

log = logging.getLogger(LOGGER)
T = TypeVar("T")


def is_terminal() -> bool:
    """Whether a bar can redraw its line: `sys.stdout` is a terminal, or a notebook kernel runs us."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        tty = False
    return tty or "ipykernel" in sys.modules


def plural(unit: str) -> str:
    """'image' -> 'images', 'batch' -> 'batches'."""
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def duration(seconds: float) -> str:
    """'12 s', '4 min 03 s', '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def count(ds: tf.data.Dataset) -> int | None:
    """How many elements `ds` has, or None when tf.data cannot tell without reading it."""
    n = int(ds.cardinality())
    return n if n >= 0 else None


class Progress:
    """How far one long step is: a Keras progress bar in a terminal, else a log line every
    `interval` seconds; nothing for a step that ends within `delay` seconds, nor while `LOGGER` is
    above INFO.

    Used as a context manager, told as work gets done:

        with Progress("Feature pass", total=250, unit="batch") as progress:
            for batch in ds:
                ...
                progress.advance()

    A log line reads "Feature pass: 40 / 250 batches (16 %), 12 s, about 63 s left", and a step
    that showed anything ends with "Feature pass: 250 batches in 75 s".

    Args:
        title: the step, as a line starts: "Feature pass".
        total: how many units the step has; None when unknown (then no share nor time left).
        unit: what is counted, singular: "image", "batch".
        delay: seconds before anything shows (default `DELAY`).
        interval: seconds between log lines (default `INTERVAL`); a bar redraws at Keras' pace.
        terminal: draw a bar (True) or write log lines (False); default `is_terminal()`.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        title: str,
        *,
        total: int | None = None,
        unit: str = "image",
        delay: float | None = None,
        interval: float | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.title = title
        self.total = total
        self.unit = unit
        self.interval = INTERVAL if interval is None else interval
        self.enabled = log.isEnabledFor(logging.INFO)
        self.done = 0
        self.shown = False
        self._clock = clock
        self._start = clock()
        self._next = self._start + (DELAY if delay is None else delay)
        terminal = is_terminal() if terminal is None else terminal
        # Made now, drawn only after the delay: its rate and time left count from the start.
        self.bar = keras.utils.Progbar(total, unit_name=unit) if terminal and self.enabled else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(finished=exc_type is None)

    def advance(self, n: int = 1) -> None:
        """`n` more units are done."""
        self.update(self.done + n)

    def update(self, done: int) -> None:
        """`done` units are done: shows it when the delay (and, for log lines, the interval) has passed."""
        self.done = done
        if not self.enabled:
            return
        now = self._clock()
        if now < self._next:
            return
        if self.bar is not None:
            if not self.shown:
                log.info("%s:", self.title)
            self.bar.update(done)
        elif not (self.total and done >= self.total):  # all done: the closing line says so, with the time
            log.info("%s", self.line(now))
            self._next = now + self.interval
        self.shown = True

    def line(self, now: float) -> str:
        """The log line at time `now`."""
        elapsed = now - self._start
        if not self.total:
            return f"{self.title}: {self.done:,} {plural(self.unit)}, {duration(elapsed)}"
        share = f"{self.done:,} / {self.total:,} {plural(self.unit)} ({100 * self.done / self.total:.0f} %)"
        left = ""
        if 0 < self.done < self.total:
            left = f", about {duration(elapsed * (self.total - self.done) / self.done)} left"
        return f"{self.title}: {share}, {duration(elapsed)}{left}"

    def close(self, *, finished: bool = True) -> None:
        """Ends what was shown: the bar's last state and line break, or a log line with the time taken
        (none when the step failed: its error follows)."""
        if not self.shown:
            return
        if self.bar is not None:
            if not (self.total and self.done >= self.total):  # else the bar ended its line already
                self.bar.update(self.done, finalize=True)
        elif finished:
            elapsed = self._clock() - self._start
            log.info("%s: %s %s in %s", self.title, f"{self.done:,}", plural(self.unit), duration(elapsed))


def keras_callback(progress: Progress, *, batch_size: int) -> keras.callbacks.Callback:
    """A callback that tells `progress` (counting images) how far `Model.evaluate` or `predict` is."""

    def seen(batch: int, logs: dict | None = None) -> None:
        done = (batch + 1) * batch_size
        progress.update(min(done, progress.total) if progress.total else done)

    return keras.callbacks.LambdaCallback(on_test_batch_end=seen, on_predict_batch_end=seen)


def chunks(title: str, items: Sequence[T], size: int, *, unit: str = "image") -> Iterator[Sequence[T]]:
    """`items` in chunks of `size`, with the progress of a loop over them: a chunk counts as done
    when the loop asks for the next one."""
    with Progress(title, total=len(items), unit=unit) as shown:
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            yield chunk
            shown.advance(len(chunk))


@contextlib.contextmanager
def timed(title: str, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """A start line and an end line with the seconds taken, around one call that reports nothing
    (a converter): "Converting to litert ..." then "Converting to litert: done in 14 s"."""
    log.info("%s ...", title)
    start = clock()
    yield
    log.info("%s: done in %s", title, duration(clock() - start))


@contextlib.contextmanager
def silenced(quiet: bool = True) -> Iterator[None]:
    """No progress while inside (with `quiet`): `LOGGER` is raised to WARNING, then put back."""
    if not quiet:
        yield
        return
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
