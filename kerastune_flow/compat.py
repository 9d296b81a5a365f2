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

`apply()` installs the fix only when the installed Keras still has the reduce call in that
method, so it stands down by itself once Keras is fixed upstream.
"""

from __future__ import annotations

import inspect
import logging

import tensorflow as tf

log = logging.getLogger(__name__)

_applied = False


def _needs_symbolic_build_fix(trainer_cls) -> bool:
    try:
        source = inspect.getsource(trainer_cls._maybe_symbolic_build)
    except (OSError, TypeError, AttributeError):
        return False
    return "distribute_strategy.reduce(" in source


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """`TensorFlowTrainer._maybe_symbolic_build` without the cross-replica reduction."""
    from keras import tree

    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            strategy = self.distribute_strategy

            def local(value):
                if isinstance(value, tf.distribute.DistributedValues):
                    return strategy.experimental_local_results(value)[0]
                return value

            data_batch = tree.map_structure(local, batch)
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def apply() -> bool:
    """Installs the fix once if this Keras needs it; returns True when it is active."""
    global _applied
    if _applied:
        return True
    try:
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    except ImportError:  # another Keras layout: nothing to fix here
        return False
    if not _needs_symbolic_build_fix(TensorFlowTrainer):
        log.debug("Keras' symbolic build no longer reduces batches: compat fix not needed")
        return False
    TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    _applied = True
    log.debug("Applied the compat fix for keras-team/keras#20585 (symbolic build under tf.distribute)")
    return True
