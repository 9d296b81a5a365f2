"""One function chooses the tf.distribute strategy; everything is built inside its scope.

    strategy = get_strategy("auto")
    with strategy.scope():
        model = build_cifar10_cnn()
    ds = ds.batch(global_batch_size(64, strategy))

`auto` picks a TPU when one is reachable, MirroredStrategy over two or more GPUs,
MultiWorkerMirroredStrategy when TF_CONFIG names a cluster of several workers, and the default
strategy otherwise (one GPU or the CPU). A name that cannot be honoured raises StrategyError:
there is no silent fallback. `device_settings` says what each kind of device asks of the
pipelines and the model. (Process-wide settings that must precede the strategy, such as the CPU
thread count, are `runtime.prepare_process`.)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import tensorflow as tf

from kerastune_flow.config import JIT_COMPILE, MIXED_PRECISION, STRATEGY_NAMES
from kerastune_flow.errors import ConfigError, StrategyError

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


# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic in hardware, where oneDNN runs mixed_bfloat16
# faster than float32: AVX-512 BF16 and AMX on x86 (the "flags" line), the BF16 extension on Arm
# (the "Features" line, as on Graviton3 and Neoverse V1/V2).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPU_BF16_ENV = "KERASTUNE_FLOW_CPU_BF16"
# Environment variables that say a TPU may be attached (Colab, Cloud TPU VM, GKE).
_TPU_HINTS = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")


def tf_config_cluster() -> dict | None:
    """Returns the `cluster` of TF_CONFIG, or None when TF_CONFIG is unset or names no cluster.

    Raises:
        ConfigError: when TF_CONFIG is set but is not valid JSON.
    """
    raw = os.environ.get("TF_CONFIG")
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
    return any(os.environ.get(name) for name in _TPU_HINTS) or os.path.exists("/dev/accel0")


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


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    """True for TPUStrategy (which needs static shapes)."""
    return isinstance(strategy, tf.distribute.TPUStrategy)


def uses_gpu(strategy: tf.distribute.Strategy) -> bool:
    """True when the strategy's compute devices include a GPU."""
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy places ops where TensorFlow prefers: GPU first
        return bool(tf.config.list_physical_devices("GPU"))
    return any("GPU" in d.upper() for d in devices)


def describe(strategy: tf.distribute.Strategy) -> str:
    """One line for logs: the strategy's public name and its replicas."""
    if is_multi_worker(strategy):
        name = "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
    elif strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy():
        name = "default strategy"
    else:
        name = type(strategy).__name__
    return f"{name} with {strategy.num_replicas_in_sync} replica(s)"


TPU_STEPS_PER_EXECUTION = 32  # amortises the host round trip of each TPU call
# On the CPU, 16 steps per call into the graph train the small reference networks faster than one
# (benchmarks/RESULTS.md). GPUs keep 1: not measured on one.
CPU_STEPS_PER_EXECUTION = 16


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    """What a kind of device asks of the pipeline and the model.

    Attributes:
        kind: "tpu", "gpu" or "cpu".
        drop_remainder: static batch shapes (TPUs compile one program per shape).
        steps_per_execution: training steps per call into the compiled graph.
        dtype_policy: Keras dtype policy; the builders keep each output layer in float32.
        jit_compile: XLA.
        data_autotune: tf.data's autotuning (see `data_autotune`): off on the CPU.
    """

    kind: str
    drop_remainder: bool
    steps_per_execution: int
    dtype_policy: str
    jit_compile: bool
    data_autotune: bool


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """ "tpu", "gpu" or "cpu": where the strategy computes."""
    return "tpu" if is_tpu(strategy) else "gpu" if uses_gpu(strategy) else "cpu"


def data_autotune(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether input pipelines run tf.data's autotuning, for the strategy in scope by default.

    Off on the CPU: there the autotuning thread competes with training for the cores, and each
    time an epoch's iterator is discarded (Keras makes one per epoch) TensorFlow 2.21 waits for
    that thread, up to 9 s per epoch for the CIFAR-10 CNN on 2 cores (benchmarks/RESULTS.md).
    Without it, parallel maps use one call per core and prefetch buffers grow on demand.
    On (TensorFlow's default) for GPU and TPU, where it has not been measured.
    """
    return device_settings(device_kind(strategy or tf.distribute.get_strategy())).data_autotune


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (see NATIVE_BF16_FLAGS).

    Args:
        cpuinfo: the text of /proc/cpuinfo; None reads it (False where there is none, as on macOS),
            unless the environment variable KERASTUNE_FLOW_CPU_BF16 says "0" or "1" (the tests set
            it to 0, so that they run alike on every CPU).
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if cpuinfo is None and forced in ("0", "1"):
        return forced == "1"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(set(line.split(":", 1)[-1].split()) & set(NATIVE_BF16_FLAGS))
    return False


def device_settings(
    kind: str,
    *,
    steps_per_execution: int | None = None,
    mixed_precision: str = "off",
    jit_compile: str | bool = "auto",
    replicas: int = 1,
    xla_on_cpu: bool = False,
) -> DeviceSettings:
    """The settings for a kind of device; explicit values win over the device's defaults.

    Args:
        kind: "tpu", "gpu" or "cpu".
        steps_per_execution: None for the device's default (32 on TPU, 16 on one CPU device, else 1).
        mixed_precision: "off"; "auto" (bfloat16 on TPU and on CPUs with native bfloat16,
            float16 on GPU, float32 on other CPUs, where neither is faster); or "bfloat16" /
            "float16" explicitly.
        jit_compile: "auto" (on for TPU and for one GPU; on the CPU only with `xla_on_cpu`; off
            for several GPU or CPU replicas, where XLA cannot compile a step whose variables are
            mirrored on other devices, keras-team/keras#18145), or True / False.
        replicas: replicas in sync. Several CPU replicas (MirroredStrategy over logical CPU
            devices, or several workers) cannot run more than one step per execution: Keras 3.15 /
            TensorFlow 2.21 fail with "You must feed a value for placeholder tensor".
        xla_on_cpu: the model runs faster under XLA on the CPU (the dense MLP: 1.7x at 16 steps per
            execution, benchmarks/RESULTS.md; convolutions run slower), so "auto" turns it on there.

    Raises:
        ConfigError: for an unknown mixed_precision or jit_compile value, or
            steps_per_execution > 1 with several CPU replicas.
    """
    if kind == "cpu" and replicas > 1 and (steps_per_execution or 1) > 1:
        raise ConfigError(
            f"steps_per_execution must be 1 with {replicas} CPU replicas (MirroredStrategy or several workers "
            "fail with more under this Keras and TensorFlow); drop --steps-per-execution. "
            f"Received: steps_per_execution={steps_per_execution}"
        )
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}. Received: mixed_precision={mixed_precision}"
        )
    if mixed_precision == "auto":  # /proc/cpuinfo is read only when asked to choose
        cpu_auto = "mixed_bfloat16" if kind == "cpu" and cpu_has_native_bf16() else "float32"
        policy = {"tpu": "mixed_bfloat16", "gpu": "mixed_float16", "cpu": cpu_auto}[kind]
    else:
        policy = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[mixed_precision]
    mirrored = replicas > 1 and kind != "tpu"  # TPUStrategy compiles its replicas with XLA itself
    if isinstance(jit_compile, bool):
        jit = jit_compile
    elif jit_compile in JIT_COMPILE:
        auto = kind == "tpu" or (not mirrored and (kind == "gpu" or xla_on_cpu))
        jit = auto if jit_compile == "auto" else jit_compile == "true"
    else:
        raise ConfigError(f"jit_compile must be one of {', '.join(JIT_COMPILE)}. Received: jit_compile={jit_compile!r}")
    if jit and mirrored:
        raise ConfigError(
            f"XLA cannot compile a training step whose variables are mirrored over {replicas} replicas "
            "(keras-team/keras#18145: 'Trying to access resource ... located in device'); drop "
            "--jit-compile true, or train on one device. Received: jit_compile=true"
        )
    return DeviceSettings(
        kind=kind,
        drop_remainder=kind == "tpu",
        steps_per_execution=steps_per_execution
        or {"tpu": TPU_STEPS_PER_EXECUTION, "cpu": CPU_STEPS_PER_EXECUTION if replicas == 1 else 1}.get(kind, 1),
        dtype_policy=policy,
        jit_compile=jit,
        data_autotune=kind != "cpu",
    )
