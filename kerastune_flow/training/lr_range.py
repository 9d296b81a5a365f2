"""The learning-rate range test (Smith 2015; fastai's `lr_find`, Lightning's `lr_find`) for Keras.

    test = range_test(model, train_ds)        # a compiled model, a batched training pipeline
    rate = test.suggestion()                  # the default rule; test.suggestion("steepest")

The rate grows exponentially from `min_lr` to `max_lr`, one step at a time, on a fresh copy of the
model's optimizer (its class and settings, a discriminative base multiplier included), and the
test stops once the smoothed loss exceeds `diverge_factor` times its minimum or a loss is not
finite. The smoothed loss lags the curve by tens of steps (a loss that shoots up and settles at
chance level can stay under that bound), so the test also stops once the median of the last
`DIVERGE_WINDOW` raw losses exceeds `diverge_factor` times its own lowest value. The model's
variables (weights, BatchNorm statistics, dropout seeds, metrics) are put back bit for bit
afterwards and its own optimizer is never touched, so the fit that follows starts exactly where
it would have without the test.

Each step is the model's own loss (`model.compute_loss`, regularization included) under
`strategy.run` of the strategy that built the model, on the pipeline distributed as `fit` would
distribute it; the reported loss is the mean over the global batch, so one replica and two see
the same curve (up to the order of float sums). The model's `steps_per_execution` plays no part:
the test runs its own step.

`lr_suggest.suggest` reads a rate off the curve (the rules, and how the default was chosen, are there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kerastune_flow.errors import ConfigError, TrainingDivergedError
from kerastune_flow.training.lr_suggest import BETA, DEFAULT_RULE, RULES, centered_smooth, suggest

# The rules' helper, also reached from here by callers of its former home.
from kerastune_flow.training.lr_suggest import ema_smooth as ema_smooth

log = logging.getLogger(__name__)

MIN_LR = 1e-7  # fastai's start_lr and end_lr
MAX_LR = 10.0
MAX_STEPS = 300  # fastai and Lightning take 100; 300 read the curve more steadily (measured)
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this times its minimum (both)
DIVERGE_WINDOW = 10  # ... or the median of this many raw losses does (one noisy batch is not a rise)


@dataclasses.dataclass(frozen=True)
class RangeTest:
    """The curve of one range test.

    Attributes:
        lrs: the rate of each step run.
        losses: each step's training loss (the mean over the global batch), before the update.
        smoothed: `losses` smoothed exponentially and debiased (what the divergence check and
            fastai's and Lightning's rules read).
        planned_steps: the steps the test would have run without diverging.
        diverged: the test stopped because the loss diverged (else it ran every step).
        seconds: wall time of the test.
        why: how the loss diverged, in words, e.g. "its median over 10 steps rose from 0.16 to
            0.72" ("" when it did not).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    planned_steps: int
    diverged: bool
    seconds: float
    why: str = ""

    def suggestion(self, rule: str = DEFAULT_RULE) -> float:
        """The rate `rule` reads off the curve (see `suggest`)."""
        return suggest(self.lrs, self.losses, rule, planned_steps=self.planned_steps)

    @property
    def centered(self) -> list[float]:
        """`losses` smoothed without lag (what the "descent" rule reads), up to the first loss
        that is not finite."""
        return [float(v) for v in centered_smooth(self.lrs, self.losses)]

    def record(self, rule: str = DEFAULT_RULE) -> dict[str, Any]:
        """A JSON-ready summary: the suggestion, its rule, every rule's suggestion, the curve."""
        suggestions = {}
        for name in RULES:
            try:
                suggestions[name] = self.suggestion(name)
            except TrainingDivergedError:
                suggestions[name] = None
        return {
            "suggestion": self.suggestion(rule),
            "rule": rule,
            "suggestions": suggestions,
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
            "centered": self.centered,
            "steps": len(self.lrs),
            "planned_steps": self.planned_steps,
            "diverged": self.diverged,
            "diverged_how": self.why,
            "seconds": round(self.seconds, 3),
        }


def range_test(
    model: keras.Model,
    dataset: tf.data.Dataset,
    *,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    max_steps: int = MAX_STEPS,
    beta: float = BETA,
    diverge_factor: float = DIVERGE_FACTOR,
) -> RangeTest:
    """Runs the range test on a compiled model and puts the model back as it was.

    Args:
        model: a compiled model, built by its strategy (inside `strategy.scope()`).
        dataset: batched (x, y) training data at the global batch size; it is repeated as
            needed. A pipeline that reshuffles on every iteration is one iteration further on
            afterwards (the package's pipelines order each epoch from the seed and the epoch).
        min_lr: the first step's rate.
        max_lr: the rate the last planned step reaches.
        max_steps: the most steps (the rate grows by (max_lr / min_lr) ** (1 / (max_steps - 1))
            per step).
        beta: the smoothing of the loss curve (0: none).
        diverge_factor: stop when the smoothed loss exceeds this times its minimum, or the
            median of the last `DIVERGE_WINDOW` losses this times its lowest.

    Returns:
        The curve, as a RangeTest.

    Raises:
        ConfigError: for rates or steps out of range, or a model that is not compiled.
    """
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"The range test needs 0 < min_lr < max_lr. Received: min_lr={min_lr}, max_lr={max_lr}")
    if max_steps < 2:
        raise ConfigError(f"The range test needs at least 2 steps. Received: max_steps={max_steps}")
    if not 0 <= beta < 1:
        raise ConfigError(f"beta must be in [0, 1). Received: beta={beta}")
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
        raise ConfigError(f"The range test needs a compiled model; call model.compile() first. Received: {model.name}")
    start = time.perf_counter()
    strategy = model.distribute_strategy
    lrs = min_lr * (max_lr / min_lr) ** (np.arange(max_steps) / (max_steps - 1))
    saved = _snapshot(model)
    check = DivergenceCheck(beta=beta, factor=diverge_factor)
    try:
        with strategy.scope():
            optimizer = fresh_optimizer(model.optimizer, float(lrs[0]))
            optimizer.build(model.trainable_variables)
        step = _step_function(model, optimizer, strategy)
        batches = iter(strategy.experimental_distribute_dataset(dataset.repeat()))
        for lr in lrs:
            optimizer.learning_rate = float(lr)
            if check.add(float(step(next(batches)))):
                break
    finally:
        _restore(model, saved)
    losses = check.losses
    test = RangeTest(
        lrs=[float(lr) for lr in lrs[: len(losses)]],
        losses=losses,
        smoothed=check.smoothed,
        planned_steps=max_steps,
        diverged=bool(check.why),
        seconds=time.perf_counter() - start,
        why=check.why,
    )
    _log_outcome(test, diverge_factor)
    return test


def _log_outcome(test: RangeTest, diverge_factor: float) -> None:
    if test.diverged:
        outcome = f"stopped where the loss diverged: {test.why}"
    else:
        finite = [v for v in test.losses if math.isfinite(v)]
        outcome = (
            f"the loss never diverged (its lowest {min(finite):.3g}, its last {finite[-1]:.3g}; the test stops at "
            f"{diverge_factor:g}x the lowest)"
        )
    log.info(
        "Range test: %d step(s), rate %.2g to %.2g, %s, in %.1f s",
        len(test.losses),
        test.lrs[0],
        test.lrs[-1],
        outcome,
        test.seconds,
    )


class DivergenceCheck:
    """Reads a range test's losses as they come and says when the loss has diverged: a loss that
    is not finite, the smoothed loss (fastai's and Lightning's rule) above `factor` times its
    minimum, or the median of the last `window` losses above `factor` times the lowest such
    median (the smoothed loss lags the curve by tens of steps: a loss that shoots from 0.1 to 5
    and settles at chance level, 2.3, never takes it past 4 times its minimum).

        check = DivergenceCheck()
        for loss in losses:
            if check.add(loss):
                break             # check.why says how it diverged

    Attributes:
        losses: every loss added.
        smoothed: the losses smoothed exponentially and debiased (nan from a loss not finite).
        why: how the loss diverged, in words; "" while it has not.
    """

    def __init__(self, *, beta: float = BETA, factor: float = DIVERGE_FACTOR, window: int = DIVERGE_WINDOW):
        self.beta, self.factor, self.window = beta, factor, window
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.why = ""
        self._average, self._lowest, self._lowest_median = 0.0, math.inf, math.inf

    def add(self, loss: float) -> bool:
        """Adds one step's loss; returns True once the loss has diverged (then stop adding)."""
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(math.nan)
            self.why = f"it reached {loss}"
            return True
        self._average = self.beta * self._average + (1 - self.beta) * loss
        self.smoothed.append(self._average / (1 - self.beta ** len(self.losses)))
        self._lowest = min(self._lowest, self.smoothed[-1])
        if self.smoothed[-1] > self.factor * self._lowest:
            self.why = f"its smoothed value rose from {self._lowest:.3g} to {self.smoothed[-1]:.3g}"
            return True
        if len(self.losses) >= self.window:
            median = float(np.median(self.losses[-self.window :]))
            self._lowest_median = min(self._lowest_median, median)
            if median > self.factor * self._lowest_median:
                self.why = f"its median over {self.window} steps rose from {self._lowest_median:.3g} to {median:.3g}"
                return True
        return False


def fresh_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> keras.optimizers.Optimizer:
    """A new optimizer of the same class and settings at a constant `learning_rate`, with no state
    (a loss-scale wrapper is kept around a fresh inner optimizer). Call inside the strategy's scope."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        inner = fresh_optimizer(optimizer.inner_optimizer, learning_rate)
        config = optimizer.get_config()
        return keras.optimizers.LossScaleOptimizer(
            inner, initial_scale=config["initial_scale"], dynamic_growth_steps=config["dynamic_growth_steps"]
        )
    config = {**optimizer.get_config(), "learning_rate": learning_rate, "name": "lr_range_test"}
    return type(optimizer).from_config(config)


def _step_function(model: keras.Model, optimizer: keras.optimizers.Optimizer, strategy: tf.distribute.Strategy):
    """One training step of the model's own loss with `optimizer`; returns the global batch's mean loss."""

    def replica_step(batch):
        x, y = batch[0], batch[1]
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            # Scaled by 1 / replicas under tf.distribute, so the replicas' gradients sum to the mean.
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables, strict=True))
        return loss

    if getattr(model, "jit_compile", False):
        replica_step = tf.function(replica_step, jit_compile=True, reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def step(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return step


def _state_variables(model: keras.Model) -> list[Any]:
    """Every variable a training step can change: weights, statistics, seeds, metrics."""
    return [*model.variables, *model.metrics_variables]


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in _state_variables(model)]


def _restore(model: keras.Model, saved: list[np.ndarray]) -> None:
    for variable, value in zip(_state_variables(model), saved, strict=True):
        variable.assign(value)
