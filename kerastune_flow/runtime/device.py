"""Device and precision policy: what the device a strategy computes on asks of the pipelines and the model.

    settings = device_settings(device_kind(strategy), mixed_precision="auto")
    with dtype_policy(settings.dtype_policy):
        model = build_cifar10_cnn()

Everything this package detects about the machine is here: the kind of device (`device_kind`), the
CPU's flags (`cpu_flags`, the one reader of /proc/cpuinfo: its bfloat16 arithmetic,
`cpu_has_native_bf16`, and the CPU kind whose inter-op threads `process` chooses), and what they
decide (`device_settings`). `--mixed-precision` goes from the config through `device_settings`,
which resolves it to a Keras dtype policy, to `dtype_policy`, which puts that policy in effect for a
run. (The module is "device" rather than "precision": precision is one of the five settings a
device decides, beside batch shapes, steps per execution, XLA and tf.data's autotuning.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import keras
import tensorflow as tf

from kerastune_flow.config import JIT_COMPILE, MIXED_PRECISION
from kerastune_flow.errors import ConfigError

TPU_STEPS_PER_EXECUTION = 32  # amortises the host round trip of each TPU call
# On the CPU, 16 steps per call into the graph train the small reference networks faster than one
# (benchmarks/RESULTS.md). GPUs keep 1: not measured on one.
CPU_STEPS_PER_EXECUTION = 16

CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic in hardware, where oneDNN runs mixed_bfloat16
# faster than float32: AVX-512 BF16 and AMX on x86 (the "flags" line), the BF16 extension on Arm
# (the "Features" line, as on Graviton3 and Neoverse V1/V2).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# `--mixed-precision` (besides "auto") as Keras dtype policies.
EXPLICIT_POLICIES = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


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


# --------------------------------------------------------------------------- detection


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


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """ "tpu", "gpu" or "cpu": where the strategy computes."""
    return "tpu" if is_tpu(strategy) else "gpu" if uses_gpu(strategy) else "cpu"


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (as on macOS). The tests replace this
    function to fake a CPU (tests/fake_cpu/sitecustomize.py)."""
    try:
        with open(CPUINFO) as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (the first "flags" or "Features" line of /proc/cpuinfo), or none.

    Args:
        cpuinfo: the text of /proc/cpuinfo; None reads it (`read_cpuinfo`).
    """
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[-1].split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (see NATIVE_BF16_FLAGS).

    Args:
        cpuinfo: the text of /proc/cpuinfo; None reads it (`read_cpuinfo`).
    """
    return bool(cpu_flags(cpuinfo) & set(NATIVE_BF16_FLAGS))


# --------------------------------------------------------------------------- policy


def resolve_dtype_policy(kind: str, mixed_precision: str) -> str:
    """The Keras dtype policy of `--mixed-precision` on a kind of device.

    Args:
        kind: "tpu", "gpu" or "cpu".
        mixed_precision: "off"; "auto" (bfloat16 on TPU and on CPUs with native bfloat16, float16
            on GPU, float32 on other CPUs, where neither is faster); or "bfloat16" / "float16".

    Raises:
        ConfigError: for an unknown value.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}. Received: mixed_precision={mixed_precision}"
        )
    if mixed_precision != "auto":
        return EXPLICIT_POLICIES[mixed_precision]
    if kind == "cpu":  # /proc/cpuinfo is read only when asked to choose, and only for the CPU
        return "mixed_bfloat16" if cpu_has_native_bf16() else "float32"
    return {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}[kind]


def _resolve_jit(kind: str, jit_compile: str | bool, *, replicas: int, xla_on_cpu: bool) -> bool:
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
    return jit


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
        mixed_precision: "off", "auto", "bfloat16" or "float16" (see `resolve_dtype_policy`).
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
    default_steps = {"tpu": TPU_STEPS_PER_EXECUTION, "cpu": CPU_STEPS_PER_EXECUTION if replicas == 1 else 1}
    return DeviceSettings(
        kind=kind,
        drop_remainder=kind == "tpu",
        steps_per_execution=steps_per_execution or default_steps.get(kind, 1),
        dtype_policy=resolve_dtype_policy(kind, mixed_precision),
        jit_compile=_resolve_jit(kind, jit_compile, replicas=replicas, xla_on_cpu=xla_on_cpu),
        data_autotune=kind != "cpu",
    )


def data_autotune(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether input pipelines run tf.data's autotuning, for the strategy in scope by default.

    Off on the CPU: there the autotuning thread competes with training for the cores, and each
    time an epoch's iterator is discarded (Keras makes one per epoch) TensorFlow 2.21 waits for
    that thread, up to 9 s per epoch for the CIFAR-10 CNN on 2 cores (benchmarks/RESULTS.md).
    Without it, parallel maps use one call per core and prefetch buffers grow on demand.
    On (TensorFlow's default) for GPU and TPU, where it has not been measured.
    """
    return device_settings(device_kind(strategy or tf.distribute.get_strategy())).data_autotune


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to `policy` inside, and put back after: a run in a notebook
    leaves the session's policy as it found it.

    Args:
        policy: a Keras dtype policy name, as `DeviceSettings.dtype_policy` holds.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
