"""One function chooses the tf.distribute strategy; everything is built inside its scope.

    strategy = get_strategy("auto")
    with strategy.scope():
        model = build_cifar10_cnn()
    ds = ds.batch(global_batch_size(64, strategy))

`auto` picks a TPU when one is reachable, MirroredStrategy over two or more GPUs,
MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of several workers, and the default
strategy otherwise (one GPU or the CPU). A name that cannot be honoured raises StrategyError:
there is no silent fallback. What each kind of device asks of the pipelines and the model is
`runtime.device`; process-wide settings that must precede the strategy, such as the CPU thread
count, are `runtime.process.prepare_process`.
"""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from kerastune_flow.config import STRATEGY_NAMES
from kerastune_flow.errors import ConfigError, StrategyError
from kerastune_flow.runtime import environment

log = logging.getLogger(__name__)

# One instance per kind and device set for the life of the process: a second MirroredStrategy
# over the same devices reuses collective instance keys and aborts with "Shape mismatch in the
# collective instance" (tensorflow/tensorflow#62790), a second MultiWorkerMirroredStrategy cannot
# reconfigure collectives, and a TPU system should be initialised once. Re-running a notebook
# cell or training several models in one process must keep working.
_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def _cached(key: tuple, factory) -> tf.distribute.Strategy:
    if key not in _STRATEGIES:
        _STRATEGIES[key] = factory()
    return _STRATEGIES[key]


def tf_config_cluster() -> dict | None:
    """Returns the `cluster` of TF_CONFIG, or None when TF_CONFIG is unset or names no cluster.

    Raises:
        ConfigError: when TF_CONFIG is set but is not valid JSON.
    """
    raw = environment.read(environment.TF_CONFIG)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"TF_CONFIG is not valid JSON ({error.msg} at character {error.pos}); fix or unset it. "
            f"Received: TF_CONFIG={raw[:80]!r}"
        ) from None
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    return cluster or None


def _cluster_size(cluster: dict | None) -> int:
    if not cluster:
        return 0
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))


def tpu_hinted() -> bool:
    """True when the environment suggests a TPU (so probing it cannot hang on a normal host)."""
    return any(environment.read(name) for name in environment.TPU_HINTS) or os.path.exists("/dev/accel0")


def _connect_tpu(tpu_address: str | None = None) -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    # A TPU hint without a TPU fails in many ways: OSError (urllib.error.URLError) when the GCE metadata
    # server cannot be reached, ImportError without googleapiclient, ValueError/RuntimeError/OpError.
    except (ValueError, RuntimeError, OSError, ImportError, tf.errors.OpError) as error:
        raise StrategyError(
            "No TPU could be reached; in Colab choose Runtime > Change runtime type > TPU, or use "
            f"--strategy auto to run on GPU/CPU. Received: {type(error).__name__}: {error}"
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _mirrored_devices() -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus]
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def get_strategy(name: str = "auto", *, tpu_address: str | None = None) -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy for a name.

    Args:
        name: "auto", "cpu", "gpu", "mirrored", "tpu" or "multiworker".
            auto: TPU if reachable, else MultiWorkerMirroredStrategy if TF_CONFIG names several
            workers, else MirroredStrategy over >= 2 GPUs, else the default strategy.
            cpu: one CPU device. gpu: the first GPU. mirrored: all GPUs, or all logical CPU
            devices when there is no GPU. tpu: a TPU, or an error. multiworker: from TF_CONFIG.
        tpu_address: gRPC address or name of the TPU; None lets the resolver find it.

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ConfigError: for an unknown name or a malformed TF_CONFIG.
        StrategyError: when the named hardware is not there.
    """
    if name not in STRATEGY_NAMES:
        raise ConfigError(
            f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}. Received: strategy={name}"
        )
    cluster = tf_config_cluster()
    if name == "auto":
        if tpu_hinted():
            try:
                return _cached(("tpu", tpu_address), lambda: _connect_tpu(tpu_address))
            except StrategyError as error:
                log.warning("TPU hinted by the environment but not reachable, continuing without: %s", error)
        if _cluster_size(cluster) > 1:
            return get_strategy("multiworker")
        if len(tf.config.list_physical_devices("GPU")) >= 2:
            return get_strategy("mirrored")
        return tf.distribute.get_strategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "gpu":
        if not tf.config.list_physical_devices("GPU"):
            raise StrategyError(
                "--strategy gpu needs a GPU but TensorFlow sees none; install kerastune_flow[gpu] on a "
                "machine with CUDA, or use --strategy auto. Received: strategy=gpu"
            )
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    if name == "mirrored":
        devices = _mirrored_devices()
        return _cached(("mirrored", tuple(devices)), lambda: tf.distribute.MirroredStrategy(devices=devices))
    if name == "tpu":
        return _cached(("tpu", tpu_address), lambda: _connect_tpu(tpu_address))
    # multiworker
    if _cluster_size(cluster) < 1:
        raise StrategyError(
            "--strategy multiworker needs TF_CONFIG with a cluster and this task's type and index; "
            "see README.md, section Multi-worker. Received: TF_CONFIG unset or without a cluster"
        )
    return _cached(("multiworker",), tf.distribute.MultiWorkerMirroredStrategy)


def global_batch_size(per_replica: int, strategy: tf.distribute.Strategy) -> int:
    """The batch the pipeline must produce: per-replica batch times replicas in sync."""
    return per_replica * strategy.num_replicas_in_sync


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """True for MultiWorkerMirroredStrategy."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one task that writes logs, plots and the best model: the chief of a
    multi-worker cluster (worker 0 when there is no chief), and always on a single machine."""
    return bool(strategy.extended.should_checkpoint) if is_multi_worker(strategy) else True


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Waits until every worker reaches this point (a tiny all-reduce), so that workers leave
    together; one that exits early makes the others log coordination errors."""
    if is_multi_worker(strategy):
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


def broadcast_from_first_replica(strategy: tf.distribute.Strategy, value: int) -> int:
    """The integer replica 0 holds, on every worker (a seed one machine picked, for all of them).

    Replica 0 is on worker 0, the chief of a cluster of workers. Without several workers it is
    `value` itself.
    """
    if not is_multi_worker(strategy):
        return value

    def contribute():
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return tf.where(first, tf.constant(value, tf.int64), tf.constant(0, tf.int64))

    return int(strategy.reduce("SUM", strategy.run(contribute), axis=None))


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line for logs: the strategy's public name and its replicas."""
    if is_multi_worker(strategy):
        name = "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
    elif strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        name = "default strategy"
    else:
        name = type(strategy).__name__
    return f"{name} with {strategy.num_replicas_in_sync} replica(s)"
