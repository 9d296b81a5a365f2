"""SIGTERM through the real CLI: it stops after a batch with a clear message, and the same command
continues the run (SIGKILL at random moments: tests/test_exact_resume.py)."""

import json
import os
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
from conftest import CHILD_PYTHONPATH, CLI, backed_up_epoch

from kerastune_flow import rundir
from kerastune_flow.rundir import read_history
from kerastune_flow.training import resume

EPOCHS = 8  # SIGTERM comes after epoch 2's backup: the run is still going


def _command(folder, run_dir):
    flags = ["--preset", "smoke", "--epochs", str(EPOCHS), "--no-early-stopping"]
    return [*CLI, "train", "cifar10_cnn", "--data", str(folder), *flags, "--run-dir", str(run_dir), "--quiet"]


def _start(folder, run_dir):
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH}
    return subprocess.Popen(
        _command(folder, run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_backup(proc, run_dir, epoch, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if backed_up_epoch(run_dir) >= epoch:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before epoch {epoch} was backed up: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no backup of epoch {epoch} within {timeout} s")


def _finish_and_check(folder, run_dir, killed_at):
    backed_up = backed_up_epoch(run_dir)
    assert 2 <= backed_up < EPOCHS  # killed in the middle, not after the end
    restart = time.time()
    proc = subprocess.run(
        _command(folder, run_dir),
        env={**os.environ, "PYTHONPATH": CHILD_PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["resumed"] is True and result["epochs_run"] == EPOCHS
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == list(range(EPOCHS))  # one continuous log, no epoch twice
    first_run = [r for r in history if r["epoch"] < backed_up]
    second_run = [r for r in history if r["epoch"] >= backed_up]
    assert all(r["wall_time"] <= killed_at for r in first_run)  # kept from before the kill
    assert all(r["wall_time"] >= restart for r in second_run)  # resumed at the next epoch, not from zero
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == EPOCHS + 1
    keras.saving.load_model(run_dir / "model.keras")  # every file readable
    json.loads((run_dir / "results.json").read_text())
    assert not (run_dir / "backup").exists()


@pytest.mark.slow  # 31 s: the real command; the default suite's test_train sends SIGTERM to an in-process run
def test_sigterm_stops_after_a_batch_with_a_message(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(image_folder, run_dir)
    _wait_for_backup(proc, run_dir, epoch=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    killed_at = time.time()
    assert proc.returncode == 143
    assert "interrupted by SIGTERM" in err and "to resume: " in err and str(run_dir) in err
    assert "Traceback" not in err
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == list(range(len(history)))
    assert backed_up_epoch(run_dir) == len(history)  # the backup holds every logged epoch
    _finish_and_check(image_folder, run_dir, killed_at)


def test_a_workers_copy_starts_from_the_chiefs_backup(tmp_path):
    chief = tmp_path / "chief"
    (resume.backup_dir(chief) / "fit").mkdir(parents=True)
    (resume.backup_dir(chief) / "fit" / "state.json").write_text("{}")

    private = resume.worker_copy(chief)

    assert private != chief and (resume.backup_dir(private) / "fit" / "state.json").read_text() == "{}"
    resume.discard(private)
    assert not resume.backup_dir(private).exists()


def test_only_an_interrupted_run_gives_its_seed_back(tmp_path):
    (tmp_path / rundir.CONFIG_JSON).write_text(json.dumps({"config": {"train": {"seed": 7}}}))
    assert resume.recorded_seed(tmp_path) is None  # no backup: nothing was interrupted
    resume.backup_dir(tmp_path).mkdir(parents=True)
    assert resume.recorded_seed(tmp_path) == 7
    (tmp_path / rundir.RESULTS_JSON).write_text("{}")
    assert resume.recorded_seed(tmp_path) is None  # finished


def _trained_head():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(4)(inputs)))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(32, 6)).astype("float32"), np.arange(32) % 3
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model


def _state(model):
    return [keras.ops.convert_to_numpy(v) for v in [*model.weights, *model.optimizer.variables]]


def test_the_backups_state_file_gives_back_the_weights_and_the_optimizers_state(tmp_path):
    model = _trained_head()
    saved = _state(model)
    resume.save_state(model, tmp_path / "w.weights.h5")
    for variable in [*model.weights, *model.optimizer.variables]:  # the moments and the step count too
        variable.assign(keras.ops.ones_like(variable) * 7)
    weights = resume.load_state(model, tmp_path / "w.weights.h5")
    for now, then in zip(_state(model), saved, strict=True):
        np.testing.assert_array_equal(now, then)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4  # 32 examples / batch 8
    for array, then in zip(weights, model.get_weights(), strict=True):  # what early stopping keeps
        np.testing.assert_array_equal(array, then)


def test_a_backup_written_by_keras_save_weights_still_loads(tmp_path):
    model = _trained_head()  # a run interrupted before this format, resumed after an upgrade
    saved = _state(model)
    model.save_weights(tmp_path / "w.weights.h5")
    for variable in [*model.weights, *model.optimizer.variables]:
        variable.assign(keras.ops.zeros_like(variable))
    resume.load_state(model, tmp_path / "w.weights.h5")
    for now, then in zip(_state(model), saved, strict=True):
        np.testing.assert_array_equal(now, then)


def test_another_models_state_is_refused(tmp_path):
    resume.save_state(_trained_head(), tmp_path / "w.weights.h5")
    inputs = keras.Input((6,))
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match="holds the model variables of another model: 4 against 2"):
        resume.load_state(other, tmp_path / "w.weights.h5")
