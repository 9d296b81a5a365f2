"""get_strategy: every branch, including the errors, on a CPU split into two logical devices.

No real MultiWorkerMirroredStrategy is created here (it starts gRPC servers); its branches are
checked with a stand-in class.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerastune_flow.config import STRATEGY_NAMES
from kerastune_flow.errors import ConfigError, StrategyError
from kerastune_flow.runtime import compat, environment, process
from kerastune_flow.runtime import strategy as strategy_lib
from kerastune_flow.runtime.device import device_kind, device_settings, is_tpu, uses_gpu
from kerastune_flow.runtime.process import prepare_process
from kerastune_flow.runtime.strategy import (
    _cluster_size,
    describe,
    get_strategy,
    global_batch_size,
    tf_config_cluster,
    tpu_hinted,
)

NUM_LOGICAL_CPUS = 2  # conftest.py splits the CPU in two
PER_REPLICA_BATCH = 8
NUM_SAMPLES = 32
TPU_PROBE_SECONDS = 30  # a probe that takes longer than this is a hang on a CI box

TWO_WORKERS = {
    "cluster": {"worker": ["localhost:12345", "localhost:12346"]},
    "task": {"type": "worker", "index": 0},
}
ONE_WORKER = {"cluster": {"worker": ["localhost:12345"]}, "task": {"type": "worker", "index": 0}}


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """No TF_CONFIG and no TPU hint, whatever the machine running the tests has set."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name in environment.TPU_HINTS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _isolated_strategy_cache(monkeypatch):
    """Fakes cached by one test must not leak; real strategies are kept for the whole session,
    as get_strategy keeps them (a second MirroredStrategy on the same devices would clash)."""
    shared = strategy_lib._STRATEGIES
    local = dict(shared)
    monkeypatch.setattr(strategy_lib, "_STRATEGIES", local)
    yield
    shared.update({k: v for k, v in local.items() if isinstance(v, tf.distribute.Strategy)})


def test_strategies_are_created_once_per_process():
    assert get_strategy("mirrored") is get_strategy("mirrored")
    assert get_strategy("auto") is get_strategy("auto")


class _FakeMultiWorker:
    """Stands in for MultiWorkerMirroredStrategy, which would start servers."""

    num_replicas_in_sync = 2


def _fake_gpu_strategy():
    return SimpleNamespace(
        extended=SimpleNamespace(worker_devices=("/job:localhost/replica:0/task:0/device:GPU:0",)),
        num_replicas_in_sync=1,
    )


# --------------------------------------------------------------------------- names


def test_the_machine_is_what_the_tests_assume():
    assert not tf.config.list_physical_devices("GPU")
    assert len(tf.config.list_logical_devices("CPU")) == NUM_LOGICAL_CPUS
    assert not tpu_hinted()


def test_auto_on_cpu_is_the_default_strategy():
    strategy = get_strategy("auto")

    assert strategy is tf.distribute.get_strategy()
    assert not tf.distribute.has_strategy()  # the default one, not a scoped strategy
    assert strategy.num_replicas_in_sync == 1


def test_auto_is_the_default_name():
    assert get_strategy() is tf.distribute.get_strategy()


def test_cpu_is_one_device_strategy():
    strategy = get_strategy("cpu")

    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended.worker_devices == ("/job:localhost/replica:0/task:0/device:CPU:0",)


def test_mirrored_uses_both_logical_cpus():
    strategy = get_strategy("mirrored")

    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == NUM_LOGICAL_CPUS
    assert sorted(d.rsplit(":", 1)[-1] for d in strategy.extended.worker_devices) == ["0", "1"]


@pytest.mark.parametrize("name, expected", [("auto", 64), ("cpu", 64), ("mirrored", 128)])
def test_global_batch_size(name, expected):
    assert global_batch_size(64, get_strategy(name)) == expected


def test_gpu_without_a_gpu_raises_naming_the_gpu_extra():
    with pytest.raises(StrategyError, match=r"kerastune_flow\[gpu\]") as excinfo:
        get_strategy("gpu")
    assert "Received: strategy=gpu" in str(excinfo.value)


def test_tpu_without_a_tpu_raises_quickly():
    start = time.monotonic()
    with pytest.raises(StrategyError, match="No TPU could be reached"):
        get_strategy("tpu")
    assert time.monotonic() - start < TPU_PROBE_SECONDS


def test_tpu_with_a_bogus_tpu_name_raises_strategy_error(monkeypatch):
    monkeypatch.setenv("TPU_NAME", "no-such-tpu")

    with pytest.raises(StrategyError, match="No TPU could be reached"):
        get_strategy("tpu")


@pytest.mark.parametrize("name", ["", "GPU", "mirror", "multi_worker", "tpu_v4"])
def test_unknown_name_raises_config_error_listing_valid_names(name):
    with pytest.raises(ConfigError, match="Unknown strategy") as excinfo:
        get_strategy(name)
    message = str(excinfo.value)
    assert all(valid in message for valid in STRATEGY_NAMES)
    assert message.endswith(f"Received: strategy={name}")


def test_unknown_name_is_rejected_before_tf_config_is_read(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")

    with pytest.raises(ConfigError, match="Unknown strategy"):
        get_strategy("bogus")


def test_errors_are_the_documented_builtin_kinds():
    # Callers that know nothing of kerastune_flow can still catch them.
    with pytest.raises(ValueError):
        get_strategy("bogus")
    with pytest.raises(RuntimeError):
        get_strategy("gpu")


# --------------------------------------------------------------------------- TF_CONFIG


def test_multiworker_without_tf_config_raises():
    with pytest.raises(StrategyError, match="needs TF_CONFIG"):
        get_strategy("multiworker")


def test_multiworker_with_tf_config_without_cluster_raises(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"task": {"type": "worker", "index": 0}}))

    with pytest.raises(StrategyError, match="needs TF_CONFIG"):
        get_strategy("multiworker")


@pytest.mark.parametrize("name", ["auto", "multiworker"])
@pytest.mark.parametrize("raw", ["{not json", "cluster: [a, b]", '{"cluster": '])
def test_tf_config_that_is_not_json_raises_config_error(monkeypatch, name, raw):
    monkeypatch.setenv("TF_CONFIG", raw)

    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON") as excinfo:
        get_strategy(name)
    assert "Received: TF_CONFIG=" in str(excinfo.value)


def test_multiworker_with_a_cluster_builds_multi_worker_strategy(monkeypatch):
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", _FakeMultiWorker)
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))

    assert isinstance(get_strategy("multiworker"), _FakeMultiWorker)


def test_auto_with_a_cluster_of_several_workers_is_multi_worker(monkeypatch):
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", _FakeMultiWorker)
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO_WORKERS))

    assert isinstance(get_strategy("auto"), _FakeMultiWorker)


def test_auto_with_a_cluster_of_one_worker_is_the_default_strategy(monkeypatch):
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", _FakeMultiWorker)
    monkeypatch.setenv("TF_CONFIG", json.dumps(ONE_WORKER))

    assert get_strategy("auto") is tf.distribute.get_strategy()


def test_tf_config_cluster_unset_is_none():
    assert tf_config_cluster() is None


@pytest.mark.parametrize("raw", ["", "{}", '{"cluster": {}}', "[1, 2]", '"a string"'])
def test_tf_config_cluster_without_a_cluster_is_none(monkeypatch, raw):
    monkeypatch.setenv("TF_CONFIG", raw)

    assert tf_config_cluster() is None


def test_tf_config_cluster_returns_the_cluster(monkeypatch):
    cluster = {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"], "ps": ["host3:2222"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}}))

    assert tf_config_cluster() == cluster


@pytest.mark.parametrize(
    "cluster, expected",
    [
        (None, 0),
        ({}, 0),
        ({"worker": ["a:1"]}, 1),
        ({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, 3),
        ({"chief": ["a:1"], "worker": ["b:1"], "ps": ["c:1", "d:1"], "evaluator": ["e:1"]}, 2),
        ({"ps": ["c:1"]}, 0),
    ],
)
def test_cluster_size_counts_chief_and_workers(cluster, expected):
    assert _cluster_size(cluster) == expected


# --------------------------------------------------------------------------- TPU hints


@pytest.mark.parametrize("hint", environment.TPU_HINTS)
def test_each_tpu_hint_is_recognised(monkeypatch, hint):
    monkeypatch.setenv(hint, "something")

    assert tpu_hinted()


def test_an_empty_tpu_hint_is_no_hint(monkeypatch):
    monkeypatch.setenv("TPU_NAME", "")

    assert not tpu_hinted()


def test_auto_with_a_bogus_tpu_hint_warns_and_falls_back(monkeypatch, caplog):
    monkeypatch.setenv("TPU_NAME", "no-such-tpu")
    start = time.monotonic()

    with caplog.at_level(logging.WARNING, logger=strategy_lib.__name__):
        strategy = get_strategy("auto")

    assert time.monotonic() - start < TPU_PROBE_SECONDS
    assert strategy is tf.distribute.get_strategy()
    warnings = [r for r in caplog.records if r.name == strategy_lib.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TPU hinted by the environment but not reachable" in warnings[0].getMessage()


def test_auto_with_a_reachable_tpu_returns_it(monkeypatch):
    sentinel = object()
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    monkeypatch.setattr(strategy_lib, "_connect_tpu", lambda address: sentinel)

    assert get_strategy("auto") is sentinel


def test_tpu_address_is_passed_to_the_resolver(monkeypatch):
    seen = []
    monkeypatch.setattr(strategy_lib, "_connect_tpu", lambda address: seen.append(address) or "tpu")

    assert get_strategy("tpu", tpu_address="grpc://10.0.0.2:8470") == "tpu"
    assert seen == ["grpc://10.0.0.2:8470"]


def test_auto_with_two_gpus_is_mirrored(monkeypatch):
    real_list = tf.config.list_physical_devices
    fake_gpus = [SimpleNamespace(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(2)]
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: fake_gpus if kind == "GPU" else real_list(kind)
    )
    monkeypatch.setattr(strategy_lib, "_mirrored_devices", lambda: ["/gpu:0", "/gpu:1"])
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda devices=None: f"mirrored over {len(devices)} GPUs")

    assert get_strategy("auto") == "mirrored over 2 GPUs"


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["auto", "cpu", "mirrored"])
def test_strategies_on_this_cpu_neither_tpu_nor_gpu(name):
    strategy = get_strategy(name)

    assert not is_tpu(strategy)
    assert not uses_gpu(strategy)
    assert device_kind(strategy) == "cpu"
    assert device_settings(device_kind(strategy)).jit_compile is False
    assert device_settings(device_kind(strategy), jit_compile="auto").jit_compile is False


@pytest.mark.parametrize("requested, expected", [(True, True), (False, False), ("true", True), ("false", False)])
def test_explicit_jit_compile_wins(requested, expected):
    for strategy in (get_strategy("auto"), _fake_gpu_strategy()):
        assert device_settings(device_kind(strategy), jit_compile=requested).jit_compile is expected


def test_uses_gpu_and_jit_for_a_gpu_strategy():
    fake = _fake_gpu_strategy()

    assert uses_gpu(fake)
    assert device_kind(fake) == "gpu"
    assert device_settings(device_kind(fake)).jit_compile is True


def test_default_strategy_uses_gpu_when_tensorflow_sees_one(monkeypatch):
    real_list = tf.config.list_physical_devices
    fake_gpu = [SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")]
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: fake_gpu if kind == "GPU" else real_list(kind)
    )

    assert uses_gpu(tf.distribute.get_strategy())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("auto", "default strategy with 1 replica(s)"),
        ("cpu", "OneDeviceStrategy with 1 replica(s)"),
        ("mirrored", "MirroredStrategy with 2 replica(s)"),
    ],
)
def test_describe_names_class_and_replicas(name, expected):
    assert describe(get_strategy(name)) == expected


# --------------------------------------------------------------------------- training


def test_tiny_model_fits_under_mirrored_with_two_replicas():
    strategy = get_strategy("mirrored")
    batch = global_batch_size(PER_REPLICA_BATCH, strategy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_SAMPLES, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")).astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(tf.data.AUTOTUNE)

    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(dataset, epochs=1, verbose=0)

    kernel = model.layers[0].kernel.value
    assert isinstance(kernel, tf.distribute.DistributedValues)
    assert len(strategy.experimental_local_results(kernel)) == NUM_LOGICAL_CPUS
    assert int(model.optimizer.iterations.numpy()) == NUM_SAMPLES // batch  # 2 steps of 16
    assert np.isfinite(history.history["loss"][0])
    # Both replicas hold the same updated weights.
    first, second = (v.numpy() for v in strategy.experimental_local_results(kernel))
    np.testing.assert_array_equal(first, second)


_THREADS_SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import tensorflow as tf
from kerastune_flow.runtime import process
from kerastune_flow.runtime.process import prepare_process
from kerastune_flow.runtime.strategy import get_strategy
from kerastune_flow.runtime import device
if len(sys.argv) > 3:  # a CPU whose /proc/cpuinfo is this file
    device.CPUINFO = sys.argv[3]
if sys.argv[1] == "started":
    tf.constant(1.0)  # TensorFlow's runtime starts here, before the strategy
prepare_process(sys.argv[2])
get_strategy(sys.argv[2])
prepare_process(sys.argv[2])  # again, as a search's next trial does
print("inter-op", tf.config.threading.get_inter_op_parallelism_threads())
"""


AVX2_CPU = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
AVX512_CPU = "processor : 0\nflags : fpu sse2 avx avx2 fma avx512f avx512_vnni\n"


@pytest.mark.parametrize(
    "when, name, env, cpu, expected",
    [
        ("fresh", "auto", None, AVX2_CPU, 1),  # CPU training: one inter-op thread ("cpu" too, see computes_on_cpu)
        # TensorFlow's default measured faster on AVX-512 CPUs; a CPU that lists no flags: one thread, as
        # before the measurement (the choice's branches run in-process below, the real process with -m slow)
        pytest.param("fresh", "auto", None, AVX512_CPU, 0, marks=pytest.mark.slow),
        pytest.param("fresh", "auto", None, "", 1, marks=pytest.mark.slow),
        pytest.param("fresh", "auto", "3", AVX2_CPU, 0, marks=pytest.mark.slow),  # the user's TF_NUM_INTEROP_THREADS
        ("started", "auto", None, AVX2_CPU, 0),  # too late: logged, not raised
        pytest.param("started", "auto", None, AVX512_CPU, 0, marks=pytest.mark.slow),  # nothing to set: no advice
    ],
)
def test_cpu_training_sets_the_inter_op_threads_of_its_cpu_kind_when_it_still_can(
    tmp_path, when, name, env, cpu, expected
):
    environ = {k: v for k, v in os.environ.items() if k != "TF_NUM_INTEROP_THREADS"}
    if env:
        environ["TF_NUM_INTEROP_THREADS"] = env
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(cpu)
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, when, name, str(cpuinfo)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"inter-op {expected}" in proc.stdout
    # Logged once per process, not once per trial of a search; only where one thread is the choice.
    advised = when == "started" and cpu == AVX2_CPU
    assert proc.stderr.count("TF_NUM_INTEROP_THREADS=1 set before Python starts") == advised


class _FakeThreading:
    """tf.config.threading's inter-op pair as a process has it: settable until TensorFlow starts."""

    def __init__(self, current: int, started: bool):
        self.current, self.started, self.set_to = current, started, []

    def get_inter_op_parallelism_threads(self):
        return self.current

    def set_inter_op_parallelism_threads(self, n):
        if self.started:
            raise RuntimeError("Inter op parallelism cannot be modified after initialization.")
        self.set_to.append(n)
        self.current = n


@pytest.mark.parametrize(
    "cpu, env, current, started, in_effect, set_to, advised",
    [
        (AVX2_CPU, None, 0, False, True, [1], False),  # a fresh process: one thread
        (AVX512_CPU, None, 0, False, True, [], False),  # TensorFlow's default is the choice: nothing set
        ("", None, 0, False, True, [1], False),  # no flags (macOS): one thread
        (AVX2_CPU, "3", 0, False, False, [], False),  # the user's TF_NUM_INTEROP_THREADS wins
        (AVX2_CPU, None, 4, False, False, [], False),  # the user's tf.config.threading wins
        (AVX2_CPU, None, 1, True, True, [], False),  # already one: nothing to do, nothing to advise
        (AVX2_CPU, None, 0, True, False, [], True),  # TensorFlow started: logged how, not raised
        (AVX512_CPU, None, 0, True, True, [], False),  # started, and the default is the choice: no advice
    ],
)
def test_prefer_cpu_threads_follows_the_cpu_the_user_and_tensorflows_start(
    tmp_path, monkeypatch, caplog, cpu, env, current, started, in_effect, set_to, advised
):
    fake = _FakeThreading(current, started)
    monkeypatch.setattr(process.device, "read_cpuinfo", lambda: cpu)
    monkeypatch.setattr(process.tf.config, "threading", fake)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    if env:
        monkeypatch.setenv("TF_NUM_INTEROP_THREADS", env)
    process._log_threads_too_late.cache_clear()
    with caplog.at_level(logging.INFO, logger=process.log.name):
        assert process.prefer_cpu_threads() is in_effect
        process.prefer_cpu_threads()  # a search's next trial: the advice is not repeated
    assert fake.set_to == set_to
    assert caplog.text.count("TF_NUM_INTEROP_THREADS=1 set before Python starts") == advised


def test_the_inter_op_choice_reads_the_cpu_flags():
    assert process.cpu_inter_op_threads(AVX2_CPU) == 1
    assert process.cpu_inter_op_threads(AVX512_CPU) is None
    assert process.cpu_inter_op_threads("") == 1  # macOS: no /proc/cpuinfo
    assert process.cpu_inter_op_threads("Features : fp asimd\n") == 1  # an ARM CPU's line


def test_which_strategy_names_compute_on_the_cpu_here():
    assert process.computes_on_cpu("auto") and process.computes_on_cpu("cpu")
    assert not process.computes_on_cpu("mirrored")  # several devices keep TensorFlow's default threads
    assert not process.computes_on_cpu("tpu") and not process.computes_on_cpu("gpu")


def test_get_strategy_alone_sets_no_threads(monkeypatch):
    fake = _FakeThreading(0, started=False)
    monkeypatch.setattr(process.tf.config, "threading", fake)
    monkeypatch.setattr(strategy_lib.tf.config, "threading", fake)
    get_strategy("cpu")
    assert fake.set_to == []  # only prepare_process sets them (the real process: the slow test below)


@pytest.mark.slow  # 9 s: a fresh process
def test_get_strategy_alone_changes_no_process_setting():
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT.replace("prepare_process(sys.argv[2])\n", ""), "fresh", "cpu"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TF_NUM_INTEROP_THREADS"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inter-op 0" in proc.stdout  # TensorFlow's default: only prepare_process sets it


def test_prepare_process_installs_the_keras_fixes():
    from keras.src.backend.tensorflow import trainer

    prepare_process("mirrored")

    assert trainer.TensorFlowTrainer._maybe_symbolic_build is compat._maybe_symbolic_build
    assert trainer.reduce_per_replica.__wrapped__ is not None


@pytest.fixture
def determinism_as_found():
    """Op determinism as the session had it, whatever a test leaves."""
    before = process._op_determinism_enabled()
    yield
    (tf.config.experimental.enable_op_determinism if before else process._tf_framework_config.disable_op_determinism)()
    process._determinism_ours = False


def test_op_determinism_is_on_for_the_run_that_asks_and_off_again_for_the_next(determinism_as_found):
    process._tf_framework_config.disable_op_determinism()
    prepare_process("cpu")
    assert not process._op_determinism_enabled()
    prepare_process("cpu", deterministic=True)
    assert process._op_determinism_enabled()
    prepare_process("cpu", deterministic=True)  # a second deterministic run keeps it
    assert process._op_determinism_enabled()
    prepare_process("cpu")  # a later run without --deterministic in the same process
    assert not process._op_determinism_enabled()


def test_op_determinism_the_user_turned_on_stays_on(determinism_as_found):
    tf.config.experimental.enable_op_determinism()  # the user's, before any run
    process._determinism_ours = False
    prepare_process("cpu", deterministic=True)
    prepare_process("cpu")
    assert process._op_determinism_enabled()


_DETERMINISM_SCRIPT = """
import tensorflow as tf
from kerastune_flow.runtime.process import prepare_process

def unseeded_random():
    try:
        tf.random.uniform([1])
    except RuntimeError as error:  # TensorFlow refuses random ops without a seed under determinism
        return "refused" if "determinism" in str(error) else repr(error)
    return "ran"

runs = [unseeded_random()]
prepare_process("cpu", deterministic=True)
runs.append(unseeded_random())
prepare_process("cpu")
runs.append(unseeded_random())
print(*runs)
"""


@pytest.mark.slow  # 9 s, a fresh process; the default suite checks the switch both ways in this process
def test_op_determinism_reaches_tensorflow_both_ways():
    # In a fresh process: no test's global seed, and TensorFlow's real switch, not a stand-in.
    proc = subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ran", "refused", "ran"]
