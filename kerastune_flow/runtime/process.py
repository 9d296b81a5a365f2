"""Process-wide settings that must be made before the strategy is built and TensorFlow starts.

    runtime.prepare_process("auto")   # then strategy.get_strategy("auto"), then build and fit

It installs the narrow fixes to Keras under tf.distribute (`compat.apply`), when the process
will compute on the CPU sets TensorFlow to one inter-op thread, and turns TensorFlow's op
determinism on or off as the run asks. `train_and_evaluate` calls it
first; call it yourself before `get_strategy` when you build and fit a model with your own code.
"""

from __future__ import annotations

import functools
import logging

import tensorflow as tf

from kerastune_flow.runtime import compat, environment
from kerastune_flow.runtime.strategy import tpu_hinted

try:  # TensorFlow's own switch back: public is only enable_op_determinism (TensorFlow 2.21)
    from tensorflow.python.framework import config as _tf_framework_config
except ImportError:  # another TensorFlow layout: determinism, once on, stays on
    _tf_framework_config = None

log = logging.getLogger(__name__)

# Inter-op threads run independent graph ops side by side, each op itself using every core
# (intra-op). On a CPU that oversubscribes the cores: with one inter-op thread the CIFAR-10 CNN
# trains faster on 2 cores and its system time (threads waiting on each other) falls more than
# tenfold (benchmarks/RESULTS.md); one per socket is also Intel's advice for oneDNN. GPUs and
# TPUs keep TensorFlow's default.
CPU_INTER_OP_THREADS = 1


def prefer_cpu_threads() -> bool:
    """Sets TensorFlow's inter-op threads to `CPU_INTER_OP_THREADS` for CPU training, unless the
    user chose a number (TF_NUM_INTEROP_THREADS or `tf.config.threading`) or TensorFlow has
    already started, when it can no longer change (then it logs how to get it, once per process).

    Returns:
        True when the setting is in effect.
    """
    if environment.read(environment.TF_NUM_INTEROP_THREADS):
        return False
    current = tf.config.threading.get_inter_op_parallelism_threads()
    if current == CPU_INTER_OP_THREADS:
        return True
    if current != 0:
        return False
    try:
        tf.config.threading.set_inter_op_parallelism_threads(CPU_INTER_OP_THREADS)
    except RuntimeError:
        _log_threads_too_late()
        return False
    return True


@functools.cache
def _log_threads_too_late() -> None:
    # Once per process: a search or a comparison prepares the process once per run, and the advice
    # is the same every time.
    log.info(
        "TensorFlow started before the strategy was chosen, so it keeps its default inter-op threads; "
        "CPU training is faster with TF_NUM_INTEROP_THREADS=%d set before Python starts",
        CPU_INTER_OP_THREADS,
    )


def computes_on_cpu(strategy_name: str) -> bool:
    """True when `get_strategy(strategy_name)` will train on the CPU: "cpu", or "auto" on a machine
    without a GPU or a TPU. "mirrored" over logical CPU devices keeps TensorFlow's threads (its
    replicas run side by side)."""
    if strategy_name == "cpu":
        return True
    return strategy_name == "auto" and not tpu_hinted() and not tf.config.list_physical_devices("GPU")


def prepare_process(strategy_name: str = "auto", *, deterministic: bool = False) -> None:
    """Applies the process-wide settings for a strategy name, before the strategy exists.

    Installs the Keras fixes of `compat` (each a no-op once Keras is fixed) and, for CPU
    training, one inter-op thread (see `prefer_cpu_threads`). TensorFlow's op determinism
    follows `deterministic` (see `set_op_determinism`). Safe to call more than once: each run of
    a search or a comparison calls it with its own settings.
    """
    compat.apply()
    if computes_on_cpu(strategy_name):
        prefer_cpu_threads()
    set_op_determinism(deterministic)


# True while op determinism is on because this package turned it on (not the user, before a run).
_determinism_ours = False


def set_op_determinism(on: bool) -> bool:
    """Turns TensorFlow's op determinism on for a run that asks for it, and off again for a later
    run that does not, when this package turned it on: GPU kernels otherwise may sum in a different
    order each run, and determinism slows some ops, so one deterministic run must not slow the next
    runs of a search or a notebook. Determinism the user turned on is left on.

    Args:
        on: whether the coming run asks for determinism (`--deterministic`).

    Returns:
        Whether op determinism is on now.
    """
    global _determinism_ours
    enabled = _op_determinism_enabled()
    if on and not enabled:
        tf.config.experimental.enable_op_determinism()
        _determinism_ours = True
    elif not on and enabled and _determinism_ours:
        disable = getattr(_tf_framework_config, "disable_op_determinism", None)
        if disable is None:
            _log_determinism_stays_on()
            return True
        disable()
        _determinism_ours = False
    return _op_determinism_enabled()


def _op_determinism_enabled() -> bool:
    is_enabled = getattr(_tf_framework_config, "is_op_determinism_enabled", None)
    return _determinism_ours if is_enabled is None else bool(is_enabled())


@functools.cache
def _log_determinism_stays_on() -> None:
    log.warning(
        "This TensorFlow cannot turn op determinism off again: runs after a --deterministic one in this "
        "process stay deterministic (and may be slower)"
    )
