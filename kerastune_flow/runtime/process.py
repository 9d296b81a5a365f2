"""Process-wide settings that must be made before the strategy is built and TensorFlow starts.

    runtime.prepare_process("auto")   # then strategy.get_strategy("auto"), then build and fit

It installs the narrow fixes to Keras under tf.distribute (`compat.apply`), when the process
will compute on the CPU sets TensorFlow's inter-op threads as measured for the CPU's kind (one
thread without AVX-512), and turns TensorFlow's op
determinism on or off as the run asks. `train_and_evaluate` calls it
first; call it yourself before `get_strategy` when you build and fit a model with your own code.
"""

from __future__ import annotations

import functools
import logging

import tensorflow as tf

from kerastune_flow.runtime import compat, device, environment
from kerastune_flow.runtime.strategy import tpu_hinted

try:  # TensorFlow's own switch back: public is only enable_op_determinism (TensorFlow 2.21)
    from tensorflow.python.framework import config as _tf_framework_config
except ImportError:  # another TensorFlow layout: determinism, once on, stays on
    _tf_framework_config = None

log = logging.getLogger(__name__)

# Inter-op threads run independent graph ops side by side, each op itself using every core
# (intra-op). Which count trains faster on a CPU was measured per CPU kind, in separate processes
# (benchmarks/threads.py, benchmarks/RESULTS.md): on the AVX2-only CPU of 2026-11 one thread was
# never slower for the CIFAR-10 CNN (2,118 against 1,858 images/s in one quick run) and spent far
# less system time (threads waiting on each other); on the two AVX-512 CPUs since, TensorFlow's
# default was faster: 1.10x for the CNN and 1.07x through the augmented pipeline (Intel Xeon, 10
# alternating rounds each, 16 of 20 paired rounds in its favour), 1.11x on the AMD EPYC (one pair
# of processes), the MLP within 1 %. So one thread where the CPU lacks AVX-512 (or says nothing of
# its flags), TensorFlow's default where it has it. GPUs and TPUs keep TensorFlow's default.
CPU_INTER_OP_THREADS = 1
# The /proc/cpuinfo flag that marks the CPUs where TensorFlow's default inter-op threads measured faster.
DEFAULT_THREADS_FLAG = "avx512f"


def cpu_inter_op_threads(cpuinfo: str | None = None) -> int | None:
    """The inter-op threads CPU training asks for on this CPU: `CPU_INTER_OP_THREADS`, or None
    (TensorFlow's default) on a CPU listing `DEFAULT_THREADS_FLAG`.

    Args:
        cpuinfo: the text of /proc/cpuinfo; None reads it (`device.read_cpuinfo`).
    """
    return None if DEFAULT_THREADS_FLAG in device.cpu_flags(cpuinfo) else CPU_INTER_OP_THREADS


def prefer_cpu_threads() -> bool:
    """Sets TensorFlow's inter-op threads to `cpu_inter_op_threads()` for CPU training, unless the
    user chose a number (TF_NUM_INTEROP_THREADS or `tf.config.threading`) or TensorFlow has
    already started, when it can no longer change (then it logs how to get it, once per process).
    On a CPU where TensorFlow's default is the choice, nothing is set.

    Returns:
        True when the choice is in effect.
    """
    if environment.read(environment.TF_NUM_INTEROP_THREADS):
        return False
    wanted = cpu_inter_op_threads()  # /proc/cpuinfo is read only when the choice is the package's
    current = tf.config.threading.get_inter_op_parallelism_threads()
    if current == (wanted or 0):
        return True
    if current != 0 or wanted is None:
        return False
    try:
        tf.config.threading.set_inter_op_parallelism_threads(wanted)
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
    training, the inter-op threads measured for the CPU's kind (see `prefer_cpu_threads`). TensorFlow's op determinism
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
