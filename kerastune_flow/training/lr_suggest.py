"""Reading a learning rate off a range test's loss curve (see `lr_range`).

`suggest(lrs, losses, rule)` reads a rate off the curve:
    descent    the default: where the loss falls fastest before its minimum, on the curve smoothed
               without lag (a Gaussian over a quarter of a decade of rates)
    valley     fastai's default: the longest descending stretch of the exponentially smoothed
               curve, about halfway down it
    steepest   Lightning's: where the exponentially smoothed loss falls fastest (its gradient's
               minimum)
    minimum    fastai's `minimum`: a tenth of the rate at the lowest exponentially smoothed loss
The default rule and the test's length were chosen by benchmarks/lr_find.py (results in
benchmarks/lr_find_results.json): for the MNIST MLP, the CIFAR-10 CNN on 3,000 images and the
cat-vs-dog head, the test accuracy at each rule's suggestion against the best of a 7-point grid of
rates, 6 seeds. Behind the grid's best by, in points (MLP / CNN / head): descent 0.02 / 1.00 /
0.27 at 300 steps; fastai's valley 0.55 / 1.07 / 1.62 (0.92 / 1.20 / 1.11 at its 100 steps);
minimum 0.65 / -0.15 / 1.48; Lightning's steepest 29 / 2.4 / 9.6, its pick falling past the
minimum into the noise of the diverging end. The exponential average lags the curve by tens of
steps, so its valley starts early; 300 steps read every rule's curve more steadily than 100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kerastune_flow.errors import ConfigError, TrainingDivergedError

RULES = ("descent", "valley", "steepest", "minimum")
DEFAULT_RULE = "descent"  # measured: benchmarks/lr_find.py
BETA = 0.98  # the loss's exponential smoothing, debiased (fastai and Lightning)
DESCENT_SIGMA_DECADES = 0.25  # the "descent" rule's Gaussian smoothing, in decades of the rate
VALLEY_SKIP_END = 5  # fastai drops the last 5 points; both skip the first tenth of the steps
STEEPEST_SKIP_END = 1  # Lightning's skip_end


def ema_smooth(losses: Sequence[float], beta: float = BETA) -> np.ndarray:
    """The exponential moving average of `losses`, debiased, as fastai and Lightning smooth."""
    out, average = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out[i] = average / (1 - beta ** (i + 1)) if beta else loss
    return out


def centered_smooth(
    lrs: Sequence[float], losses: Sequence[float], sigma_decades: float = DESCENT_SIGMA_DECADES
) -> np.ndarray:
    """`losses` smoothed with a Gaussian over `sigma_decades` of the (log) rate, which unlike an
    exponential average does not lag behind the curve; cut at the first loss that is not finite."""
    losses = np.asarray(losses, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    losses = losses[: int(bad[0])] if bad.size else losses
    if len(losses) < 2:
        return losses
    decades_per_step = math.log10(lrs[1] / lrs[0])
    sigma = max(1.0, sigma_decades / decades_per_step)
    steps = np.arange(len(losses))
    weights = np.exp(-0.5 * ((steps[:, None] - steps[None, :]) / sigma) ** 2)
    return weights @ losses / weights.sum(axis=1)


def suggest(
    lrs: Sequence[float],
    losses: Sequence[float],
    rule: str = DEFAULT_RULE,
    *,
    planned_steps: int | None = None,
    beta: float = BETA,
) -> float:
    """Reads a learning rate off a range test's loss curve.

    Every rule skips the first tenth of the planned steps (where the loss still moves for
    reasons other than the rate) and ignores the curve from its first value that is not finite.

    Args:
        lrs: the rate of each step, increasing exponentially.
        losses: each step's loss (`RangeTest.losses`), as measured: each rule smooths it its way.
        rule: "descent": the steepest point of the curve smoothed without lag (a Gaussian over
            `DESCENT_SIGMA_DECADES` of the rate), between the start and the curve's minimum.
            "valley" (fastai's): on the exponentially smoothed curve, the longest descending
            stretch, skipping also the last 5 points, then 1/2 of the way down it. "steepest"
            (Lightning's): the minimum of the smoothed curve's gradient, skipping the last point.
            "minimum" (fastai's): the rate at the smoothed curve's lowest loss, divided by 10.
        planned_steps: the steps the test planned (what the first tenth is counted from);
            None: `len(lrs)`.
        beta: the exponential smoothing of fastai's and Lightning's rules (0: none).

    Returns:
        The suggested rate, one of `lrs` (a tenth of one for "minimum").

    Raises:
        ConfigError: for an unknown rule or curves of different lengths.
        TrainingDivergedError: when the curve is too short to read (the loss diverged at once).
    """
    if rule not in RULES:
        raise ConfigError(f"Unknown suggestion rule {rule!r}; choose one of {', '.join(RULES)}. Received: rule={rule}")
    lrs_arr, loss_arr = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if lrs_arr.shape != loss_arr.shape:
        raise ConfigError(f"lrs and losses must have one value per step. Received: {len(lrs)} and {len(losses)}")
    bad = np.flatnonzero(~np.isfinite(loss_arr))
    end = int(bad[0]) if bad.size else len(loss_arr)
    curve = centered_smooth(lrs_arr, loss_arr) if rule == "descent" else ema_smooth(loss_arr[:end], beta)
    skip_begin = (planned_steps or len(lrs_arr)) // 10
    skip_end = VALLEY_SKIP_END if rule == "valley" else STEEPEST_SKIP_END if rule == "steepest" else 0
    first, last = skip_begin, end - skip_end
    if last - first < 2:  # a curve cut short: read what there is
        first, last = 0, end
    if last - first < 2:
        raise TrainingDivergedError(
            f"The loss diverged within {end} step(s) of the range test, so no rate can be read off it; lower "
            f"min_lr or check the data. Received: steps={len(loss_arr)}"
        )
    lrs_arr, curve = lrs_arr[first:last], curve[first:last]
    if rule == "descent":
        down = curve[: int(np.argmin(curve)) + 1]
        return float(lrs_arr[int(np.argmin(np.gradient(down)))] if len(down) > 1 else lrs_arr[0])
    if rule == "minimum":
        return float(lrs_arr[int(np.argmin(curve))] / 10)
    if rule == "steepest":
        return float(lrs_arr[int(np.argmin(np.gradient(curve)))])
    return float(lrs_arr[_valley_index(curve)])


def _valley_index(losses: np.ndarray) -> int:
    """fastai's `valley`: the end of the longest decreasing subsequence and its length give the
    valley; the point 1/3 + 1/6 of the way into it is the suggestion."""
    n = len(losses)
    lengths = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
            if lengths[end] < lengths[i]:
                end = i
                start = end - lengths[end]
    sections = (end - start) / 3
    return max(0, start + int(sections) + int(sections / 2))
