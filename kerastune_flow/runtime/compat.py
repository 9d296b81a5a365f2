"""One narrow, documented fix to Keras' TensorFlow trainer under tf.distribute.

Problem (Keras 3.x up to at least 3.15, keras-team/keras#20585): before the first step of
`fit` / `evaluate`, `TensorFlowTrainer._maybe_symbolic_build` takes the first batch and calls
`strategy.reduce("MEAN", batch, axis=None)` on the whole (x, y) structure, only to learn its
shapes. That reduction
  * fails under MirroredStrategy when the first batch does not split evenly across replicas
    (a validation set smaller than one global batch: "Inputs to operation AddN ... must have
    the same size and shape"), and
  * fails under MultiWorkerMirroredStrategy ("Attempt to convert a value (PerReplica...)").
The symbolic build needs only one local example of the structure's shapes and dtypes, so the
fix takes replica 0's local part instead of reducing. Everything else is the original code.

A second problem appears only under MultiWorkerMirroredStrategy (tensorflow/tensorflow#72388):
the per-step log reduction, `reduce_per_replica(..., reduction="mean")`, calls
`strategy.reduce("MEAN", v, axis=0)` on every metric, and metrics are scalars: "Invalid
reduction dimension 0 for input with 0 dimensions". A scalar needs the mean across replicas
only (`axis=None`); tensors with a batch axis keep the original call.

`apply()` installs each fix only when the installed Keras still has the offending call, so
each stands down by itself once Keras is fixed upstream.
"""

from __future__ import annotations

import functools
import inspect
import logging

import tensorflow as tf
from keras import tree

try:  # Keras' private trainer module: where the two problems live
    from keras.src.backend.tensorflow import trainer as _trainer
except ImportError:  # another Keras layout: nothing to fix here
    _trainer = None

log = logging.getLogger(__name__)

_applied = False


def _needs_symbolic_build_fix(trainer_cls) -> bool:
    try:
        source = inspect.getsource(trainer_cls._maybe_symbolic_build)
    except (OSError, TypeError, AttributeError):
        return False
    return "distribute_strategy.reduce(" in source


def _local(strategy, value):
    """Replica 0's part of a distributed value; any other value as it is."""
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """`TensorFlowTrainer._maybe_symbolic_build` without the cross-replica reduction."""
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(functools.partial(_local, self.distribute_strategy), batch)
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _needs_scalar_reduce_fix(module) -> bool:
    try:
        source = inspect.getsource(module.reduce_per_replica)
    except (OSError, TypeError, AttributeError):
        return False
    return 'strategy.reduce("MEAN", v, axis=0)' in source


def _scalar_safe_reduce_per_replica(original, module):
    """Wraps `reduce_per_replica`: under multi-worker collectives, scalars are averaged across
    replicas with axis=None; everything else goes to the original."""

    def reduce_per_replica(values, strategy, reduction):
        multi_worker = module._collective_all_reduce_multi_worker(strategy)
        if not (multi_worker and reduction in ("auto", "mean")):
            return original(values, strategy, reduction)

        def _reduce(v):
            local = strategy.experimental_local_results(v)[0] if module._is_per_replica_instance(v) else v
            axis = None if local.shape.rank == 0 else 0
            return strategy.reduce("MEAN", v, axis=axis)

        return tree.map_structure(_reduce, values)

    reduce_per_replica.__wrapped__ = original
    return reduce_per_replica


def apply() -> bool:
    """Installs the fixes this Keras needs, once; returns True when any is active."""
    global _applied
    if _applied:
        return True
    module = _trainer
    if module is None:
        return False
    if _needs_symbolic_build_fix(module.TensorFlowTrainer):
        module.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
        _applied = True
        log.debug("Applied the compat fix for keras-team/keras#20585 (symbolic build under tf.distribute)")
    if _needs_scalar_reduce_fix(module):
        module.reduce_per_replica = _scalar_safe_reduce_per_replica(module.reduce_per_replica, module)
        _applied = True
        log.debug("Applied the compat fix for tensorflow/tensorflow#72388 (scalar metrics, multi-worker)")
    return _applied
