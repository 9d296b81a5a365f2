"""The benchmarks' one epoch clock: a Keras callback that times each epoch of a `fit` call."""

from __future__ import annotations

import time

import keras


class EpochClock(keras.callbacks.Callback):
    """Seconds of each epoch, from its start to its end, inside one `fit` call (it adds nothing
    to the steps)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
