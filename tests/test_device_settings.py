"""TPU and GPU settings, tested for the choices they make on the CPU (no accelerator here)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerastune_flow import data, models, rundir
from kerastune_flow.errors import ConfigError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.runtime import device
from kerastune_flow.runtime.device import (
    CPU_STEPS_PER_EXECUTION,
    TPU_STEPS_PER_EXECUTION,
    data_autotune,
    device_settings,
    dtype_policy,
)
from kerastune_flow.training import finetune, train
from kerastune_flow.training.fitting import FitContext


@pytest.mark.parametrize(
    "kind, drop, steps, policy, jit, autotune",
    [
        ("tpu", True, TPU_STEPS_PER_EXECUTION, "float32", True, True),
        ("gpu", False, 1, "float32", True, True),
        ("cpu", False, CPU_STEPS_PER_EXECUTION, "float32", False, False),
    ],
)
def test_device_defaults(kind, drop, steps, policy, jit, autotune):
    s = device_settings(kind)
    assert (s.drop_remainder, s.steps_per_execution, s.dtype_policy, s.jit_compile) == (drop, steps, policy, jit)
    assert s.data_autotune is autotune


@pytest.mark.parametrize(
    "kind, replicas, xla_on_cpu, jit",
    [
        ("cpu", 1, True, True),  # the MLP: measured faster under XLA on the CPU
        ("cpu", 1, False, False),  # convolutions: slower
        ("cpu", 2, True, False),  # mirrored variables: XLA cannot compile the step
        ("gpu", 2, False, False),  # the same on several GPUs (keras-team/keras#18145)
        ("gpu", 1, False, True),
        ("tpu", 8, False, True),  # TPUStrategy compiles its replicas itself
    ],
)
def test_auto_xla_follows_the_model_and_the_replicas(kind, replicas, xla_on_cpu, jit):
    steps = 1 if kind == "cpu" and replicas > 1 else None
    s = device_settings(kind, replicas=replicas, xla_on_cpu=xla_on_cpu, steps_per_execution=steps)
    assert s.jit_compile is jit


def test_xla_asked_for_over_mirrored_replicas_is_a_user_error():
    with pytest.raises(ConfigError, match="XLA cannot compile a training step whose variables are mirrored over 2"):
        device_settings("gpu", jit_compile="true", replicas=2)
    assert device_settings("cpu", jit_compile="false", xla_on_cpu=True).jit_compile is False


def test_pipelines_on_the_cpu_run_without_tf_data_autotuning(image_folder, tmp_path):
    # With it, TensorFlow 2.21 waits seconds for the autotuning thread each time Keras discards an
    # epoch's iterator (benchmarks/RESULTS.md); GPU and TPU keep TensorFlow's default.
    assert data_autotune() is False  # the default strategy here computes on the CPU
    config = make_config("cifar10_cnn", "smoke", data=str(image_folder))
    splits = data.load_splits(config)
    context = FitContext(
        config, tmp_path, tf.distribute.get_strategy(), device_settings("cpu"), 1, data.EpochClock(), epochs=2
    )
    pipes = train.make_pipelines(splits, context, get_recipe("cifar10_cnn").head(splits.num_classes))
    for name, ds in pipes.items():
        assert ds.options().autotune.enabled is False, name
    assert data.prepare(splits.train, batch_size=8, autotune=True).options().autotune.enabled is True
    features = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D()])
    cached = finetune.cached_feature_pipelines(features, pipes, batch_size=8, seed=0)
    assert cached["train"].options().autotune.enabled is False
    images, labels = next(iter(pipes["train"]))  # still a working pipeline
    assert images.shape[1:] == (32, 32, 3) and labels.shape[0] == images.shape[0]


@pytest.mark.parametrize(
    "kind, native_bf16, policy",
    [
        ("tpu", False, "mixed_bfloat16"),
        ("gpu", False, "mixed_float16"),
        ("cpu", False, "float32"),
        ("cpu", True, "mixed_bfloat16"),
        ("gpu", True, "mixed_float16"),  # the host CPU's flags do not decide for an accelerator
    ],
)
def test_auto_mixed_precision_per_device(kind, native_bf16, policy, monkeypatch):
    monkeypatch.setattr(device, "read_cpuinfo", lambda: CPUINFO_AVX512_BF16 if native_bf16 else CPUINFO_AVX2)
    assert device_settings(kind, mixed_precision="auto").dtype_policy == policy


def test_the_cpu_is_read_only_when_auto_must_choose_for_it(monkeypatch):
    reads = []
    monkeypatch.setattr(device, "read_cpuinfo", lambda: reads.append(1) or CPUINFO_AVX2)
    for kind in ("tpu", "gpu"):
        device_settings(kind, mixed_precision="auto")
    device_settings("cpu", mixed_precision="bfloat16")
    assert reads == []
    device_settings("cpu", mixed_precision="auto")
    assert reads == [1]


CPUINFO_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n"
CPUINFO_AVX512_BF16 = CPUINFO_AVX2.replace("avx512f", "avx512f avx512_vnni avx512_bf16")
CPUINFO_AMX = CPUINFO_AVX2.replace("avx512f", "avx512f amx_tile amx_bf16 amx_int8")
CPUINFO_ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\nCPU implementer\t: 0x41\n"
CPUINFO_ARM = CPUINFO_ARM_BF16.replace(" bf16", "")


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        (CPUINFO_AVX2, False),
        (CPUINFO_AVX512_BF16, True),
        (CPUINFO_AMX, True),
        (CPUINFO_ARM_BF16, True),
        (CPUINFO_ARM, False),
        ("", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert device.cpu_has_native_bf16(cpuinfo) is native


def test_the_cpu_is_read_from_its_cpuinfo_file_and_a_missing_one_means_no_bf16(monkeypatch, tmp_path):
    # The tests' processes read os.devnull instead of /proc/cpuinfo (conftest.py, tests/fake_cpu).
    (tmp_path / "cpuinfo").write_text(CPUINFO_ARM_BF16)
    monkeypatch.setattr(device, "CPUINFO", str(tmp_path / "cpuinfo"))
    assert device.cpu_has_native_bf16() is True
    monkeypatch.setattr(device, "CPUINFO", str(tmp_path / "missing"))  # as on macOS
    assert device.read_cpuinfo() == "" and device.cpu_has_native_bf16() is False


def test_this_test_process_sees_a_cpu_without_bf16():
    # conftest.py's fake CPU: `--mixed-precision auto` trains float32 here on every CPU.
    assert device.CPUINFO == os.devnull and not device.cpu_has_native_bf16()


@pytest.mark.slow  # 9 s, a fresh process; the default suite checks this process (the test above)
def test_the_tests_and_the_processes_they_start_see_a_cpu_without_bf16():
    # So that `--mixed-precision auto` trains float32 in every test, on every CPU (conftest.py).
    assert device.CPUINFO == os.devnull
    code = "from kerastune_flow.runtime import device; print(device.CPUINFO, device.cpu_has_native_bf16())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [os.devnull, "False"]


def test_on_a_cpu_with_native_bf16_the_mlp_stays_float32(monkeypatch):
    monkeypatch.setattr(device, "read_cpuinfo", lambda: CPUINFO_AMX)
    assert make_config("scratch_mlp").train.mixed_precision == "off"  # bfloat16 slows its small matrices
    for recipe in ("cifar10_cnn", "vgg16_features", "vgg16_finetune"):
        assert device_settings("cpu", mixed_precision=make_config(recipe).train.mixed_precision).dtype_policy == (
            "mixed_bfloat16"
        )


def test_explicit_settings_win():
    s = device_settings("tpu", steps_per_execution=8, mixed_precision="off", jit_compile=False)
    assert (s.steps_per_execution, s.dtype_policy, s.jit_compile) == (8, "float32", False)
    assert device_settings("cpu", mixed_precision="bfloat16").dtype_policy == "mixed_bfloat16"
    with pytest.raises(ConfigError, match="mixed_precision"):
        device_settings("cpu", mixed_precision="int8")
    with pytest.raises(ConfigError, match="jit_compile must be one of auto, true, false. Received: jit_compile='yes'"):
        device_settings("gpu", jit_compile="yes")  # used to mean auto, without a word


def test_dtype_policy_is_set_inside_and_put_back_after_an_error():
    before = keras.config.dtype_policy().name
    with pytest.raises(KeyboardInterrupt), dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        assert keras.layers.Dense(2).compute_dtype == "bfloat16"
        raise KeyboardInterrupt  # as a user stopping a run in a notebook
    assert keras.config.dtype_policy().name == before


@pytest.fixture
def restore_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("builder", [models.build_scratch_mlp, models.build_cifar10_cnn])
def test_mixed_bfloat16_keeps_the_output_layer_in_float32(builder, restore_policy):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = builder(input_shape=(32, 32, 3))
    hidden = [layer for layer in model.layers if layer.weights][:-1]
    assert all(layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32" for layer in hidden)
    assert model.layers[-1].compute_dtype == "float32"
    out = model(np.zeros((2, 32, 32, 3), "float32"))
    assert out.dtype == "float32"


def test_mixed_float16_transfer_head_outputs_float32(restore_policy):
    keras.config.set_dtype_policy("mixed_float16")
    model = models.build_vgg16_feature_extractor(input_shape=(32, 32, 3), weights=None, num_classes=3)
    assert models.find_base(model).get_layer("block1_conv1").compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"  # Keras adds loss scaling for float16


def test_tpu_pipelines_have_static_batch_shapes(image_folder):
    splits = data.load_data(str(image_folder))
    ds = data.prepare(splits.train, batch_size=8, training=True, drop_remainder=device_settings("tpu").drop_remainder)
    images, labels = ds.element_spec
    assert images.shape.as_list() == [8, 32, 32, 3] and labels.shape.as_list() == [8]
    cpu = data.prepare(splits.train, batch_size=8, training=True, drop_remainder=device_settings("cpu").drop_remainder)
    assert cpu.element_spec[0].shape.as_list()[0] is None


def test_a_cpu_with_native_bf16_trains_the_cnn_in_bfloat16_by_default_and_restores_the_policy(
    image_folder, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(device, "read_cpuinfo", lambda: CPUINFO_AVX512_BF16)  # as on an AVX-512 BF16 CPU
    before = keras.config.dtype_policy().name
    config = make_config("cifar10_cnn", "smoke", data=str(image_folder), steps_per_execution=2)
    assert config.train.mixed_precision == "auto"
    with caplog.at_level("INFO", logger="kerastune_flow"):
        result = train.train_and_evaluate(config, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["device"]["dtype_policy"] == "mixed_bfloat16" and meta["device"]["steps_per_execution"] == 2
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dtype_policy"] == "mixed_bfloat16" and results["jit_compile"] is False  # XLA: slower convs
    assert "mixed_bfloat16 (auto: this CPU has native bfloat16)" in caplog.text  # the strategy line says why
    assert result.model.get_layer("conv_1").compute_dtype == "bfloat16"
    assert np.isfinite(result.test_metrics["loss"])
    assert keras.config.dtype_policy().name == before


@pytest.mark.slow  # 6 s; test_exact_resume's XLA resume (slow) trains it too; the settings' choice is tested in-process
def test_the_mlp_trains_under_xla_on_the_cpu_by_default(image_folder, tmp_path, caplog):
    assert make_config("scratch_mlp").train.jit_compile == "auto"  # the smoke preset turns it off
    config = make_config(
        "scratch_mlp", "smoke", data=str(image_folder), image_size=(16, 16), epochs=3, jit_compile="auto"
    )
    with caplog.at_level("INFO", logger="kerastune_flow"):
        result = train.train_and_evaluate(config, tmp_path / "run")
    assert "XLA on; float32" in caplog.text
    assert json.loads((tmp_path / "run" / "results.json").read_text())["jit_compile"] is True
    assert result.model.jit_compile is True
    losses = [row["loss"] for row in rundir.read_history(tmp_path / "run")]
    assert losses[-1] < losses[0]


def test_several_cpu_replicas_run_one_step_per_execution():
    # Keras 3.15 / TF 2.21 fail under MirroredStrategy on CPUs with more (tests/test_train.py runs it)
    assert device_settings("cpu", replicas=2).steps_per_execution == 1
    assert device_settings("tpu", replicas=8).steps_per_execution == TPU_STEPS_PER_EXECUTION
    with pytest.raises(ConfigError, match="steps_per_execution must be 1 with 2 CPU replicas"):
        device_settings("cpu", steps_per_execution=4, replicas=2)
