"""A run is a function of its seed: two runs agree, and a run killed anywhere and resumed ends
bit-identical to the run never interrupted (weights and every logged number but the timings)."""

import json
import os
import random
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
from conftest import CHILD_PYTHONPATH, CLI, backed_up_epoch, run_outcome, smoke, staged

from kerastune_flow import rundir
from kerastune_flow.training import callbacks as cb
from kerastune_flow.training import finetune, train

# Augmentation, dropout and early stopping on: every kind of randomness and state a resume needs.
RANDOM = dict(augment=("flip", "crop"), dropout=0.3, epochs=4, patience=2, steps_per_execution=1)


def _config(folder, recipe="cifar10_cnn", **overrides):
    return smoke(recipe, folder, max_examples=None, **{**RANDOM, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    """The CNN run never interrupted, once for the module."""
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    keras.utils.set_random_seed(0)
    train.train_and_evaluate(_config(folder), run_dir)
    return run_outcome(run_dir)


class _KillOnce(keras.callbacks.Callback):
    """Raises KeyboardInterrupt (as a kill would end the process) at one point, once per test."""

    def __init__(self, fired, *, epoch, batch=None, at="epoch_end"):
        super().__init__()
        self.fired, self.epoch, self.batch, self.at = fired, epoch, batch, at

    def _kill(self, epoch, batch=None):
        if not self.fired and epoch == self.epoch and batch == self.batch:
            self.fired.append((epoch, batch))
            raise KeyboardInterrupt

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch
        if self.at == "epoch_begin":
            self._kill(epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self.at == "batch":
            self._kill(self._current, batch)

    def on_epoch_end(self, epoch, logs=None):
        if self.at == "epoch_end":
            self._kill(epoch)


def _with_kill(monkeypatch, kill, *, before_backup=True):
    original = cb.standard_callbacks

    def patched(*args, **kwargs):
        callbacks = original(*args, **kwargs)
        callbacks.insert(len(callbacks) - 1 if before_backup else len(callbacks), kill)  # RunBackup is last
        return callbacks

    monkeypatch.setattr(cb, "standard_callbacks", patched)


def _killed_then_resumed(config, run_dir, monkeypatch, kill_setup, *, after_an_epoch=True):
    fired = []
    with monkeypatch.context() as m:
        kill_setup(m, fired)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, run_dir)
    assert fired, "the kill never came"
    assert not (run_dir / rundir.RESULTS_JSON).exists()
    assert (run_dir / rundir.BACKUP_DIR).is_dir() == after_an_epoch  # else nothing to resume: it starts over
    result = train.train_and_evaluate(config, run_dir)
    assert result.results["resumed"] is after_an_epoch
    return run_outcome(run_dir)


@pytest.mark.slow  # 14 s; the default suite's resumed run equals the uninterrupted one, bit for bit
def test_two_runs_with_one_seed_are_identical(folder, tmp_path, uninterrupted):
    # Augmentation used to draw from Keras layers' seed generators in a parallel map: epoch 0 differed.
    train.train_and_evaluate(_config(folder), tmp_path / "again")
    assert run_outcome(tmp_path / "again") == uninterrupted
    train.train_and_evaluate(_config(folder, seed=1), tmp_path / "other")
    assert run_outcome(tmp_path / "other")[0] != uninterrupted[0]


KILLS = {
    # After epoch 1's backup: the next epoch had begun.
    "between-epochs": lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=2, at="epoch_begin")),
    # In the middle of epoch 1: its batches so far are lost and redone.
    "mid-epoch": lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=1, batch=1, at="batch")),
    # Epoch 1 logged and its best model saved, its backup not yet written: the epoch is redone.
    "before-the-backup": lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=1, at="epoch_end")),
    # Training over, the final evaluation under way: nothing is trained again.
    "final-evaluation": lambda m, fired: _kill_evaluation(m, fired),
}
# The default suite kills between epochs; the other moments run with `-m slow` (CI runs both).
SLOW_KILLS = ("mid-epoch", "before-the-backup", "final-evaluation")


def _kill_evaluation(monkeypatch, fired):
    original = keras.Model.evaluate

    def evaluate(self, *args, **kwargs):
        if not fired and "_use_cached_eval_dataset" not in kwargs:  # the test split, not fit's validation
            fired.append("evaluate")
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "evaluate", evaluate)


@pytest.mark.parametrize("where", [pytest.param(w, marks=pytest.mark.slow) if w in SLOW_KILLS else w for w in KILLS])
def test_a_run_killed_anywhere_ends_as_the_uninterrupted_one(where, folder, tmp_path, monkeypatch, uninterrupted):
    assert _killed_then_resumed(_config(folder), tmp_path / "run", monkeypatch, KILLS[where]) == uninterrupted


@pytest.mark.slow  # eight epochs and a resume: a minute of the default suite's five
def test_a_resumed_run_keeps_early_stoppings_state(folder, tmp_path, monkeypatch):
    # With patience 1 the run stops early; a kill after the stop must not train on.
    config = _config(folder, epochs=8, patience=1, learning_rate=1e-1)
    train.train_and_evaluate(config, tmp_path / "whole")
    whole = run_outcome(tmp_path / "whole")
    assert len(whole[2]) < 8  # it did stop early
    stop = len(whole[2]) - 1
    kill = lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=stop, at="epoch_end"), before_backup=False)  # noqa: E731
    assert _killed_then_resumed(config, tmp_path / "run", monkeypatch, kill) == whole


# --------------------------------------------------------------------------- the staged fine-tune


# The staged fine-tune: two epochs a stage, its base's frozen layers cut at conv_3.
STAGES = {**RANDOM, "max_examples": None, "head_epochs": 2, "epochs": 2, "augment": (), "unfreeze_at": "conv_3"}


def _kill_feature_pass(monkeypatch, fired):
    original = finetune.extract_features

    def extract(*args, **kwargs):
        if not fired:
            fired.append("features")
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "extract_features", extract)


STAGED_KILLS = {
    "stage-1": lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=1, at="epoch_end")),
    "stage-2": lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=3, at="epoch_begin")),
    "feature-cache-pass": _kill_feature_pass,
}


@pytest.fixture(scope="module")
def staged_uninterrupted(folder, base_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "staged"
    train.train_and_evaluate(staged(folder, base_model, **STAGES), run_dir)
    return run_outcome(run_dir)


@pytest.mark.parametrize(
    "where", [w if w == "stage-2" else pytest.param(w, marks=pytest.mark.slow) for w in STAGED_KILLS]
)  # a kill in stage 1 is the plain run's kill; stage 2 is the fine-tune's own (the feature pass: slow, 7 s)
def test_a_fine_tune_killed_in_any_stage_ends_as_the_uninterrupted_one(
    where, folder, base_model, tmp_path, monkeypatch, staged_uninterrupted
):
    assert [r["stage"] for r in staged_uninterrupted[2]] == ["head"] * 2 + ["finetune"] * 2
    config = staged(folder, base_model, **STAGES)
    first_epoch = where != "feature-cache-pass"  # the features are computed before stage 1's first epoch
    outcome = _killed_then_resumed(
        config, tmp_path / "run", monkeypatch, STAGED_KILLS[where], after_an_epoch=first_epoch
    )
    assert outcome == staged_uninterrupted


# --------------------------------------------------------------------------- chaos: SIGKILL at random moments


def _command(folder, run_dir):
    flags = ["--preset", "smoke", "--max-examples", "64", "--augment", "flip,crop", "--dropout", "0.3"]
    flags += ["--epochs", "6", "--patience", "3", "--steps-per-execution", "1", "--seed", "4", "--quiet"]
    return [*CLI, "train", "cifar10_cnn", "--data", str(folder), *flags, "--run-dir", str(run_dir)]


def _run(folder, run_dir, *, kill_at=None):
    """Runs the command to the end, or SIGKILLs it `kill_at` = (epochs backed up, then seconds later)."""
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH}
    proc = subprocess.Popen(_command(folder, run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_at is None:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        return json.loads(out)
    epochs, seconds = kill_at
    deadline = time.time() + 300
    while backed_up_epoch(run_dir) < epochs and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return None


@pytest.mark.slow  # six CLI processes; the default suite's SIGKILLs are in test_tune_processes.py
def test_chaos_five_sigkills_at_random_moments_end_as_the_uninterrupted_run(folder, tmp_path):
    whole = _run(folder, tmp_path / "whole")
    rng = random.Random(2026)  # seeded: the same moments on every run of the test, whatever the machine's speed
    # Each kill: once so many epochs are backed up (0: from the imports on), then a random fraction
    # of a second later, so it lands anywhere in an epoch, in a save, or in the start-up.
    moments = sorted((rng.randrange(whole["epochs_run"]), rng.uniform(0.0, 0.6)) for _ in range(5))
    assert sum(epochs > 0 for epochs, _ in moments) >= 2  # at least two resumes from a backup
    run_dir = tmp_path / "chaos"
    for moment in moments:
        _run(folder, run_dir, kill_at=moment)
        assert not (run_dir / rundir.RESULTS_JSON).exists()  # killed before the end
    resumed = _run(folder, run_dir)
    assert resumed["resumed"] is True
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["test"] == whole["test"]
    assert run_outcome(run_dir)[2] == run_outcome(tmp_path / "whole")[2]
    keras.saving.load_model(run_dir / rundir.BEST_MODEL)  # every file whole
    np.testing.assert_equal(resumed["epochs_run"], whole["epochs_run"])


@pytest.mark.slow  # three runs (10 s); the default suite resumes seeded runs killed between epochs and in stage 2
def test_a_run_without_a_seed_resumes_with_the_seed_it_picked(folder, tmp_path, monkeypatch):
    config = _config(folder, seed=None, epochs=4)
    kill = lambda m, fired: _with_kill(m, _KillOnce(fired, epoch=2, at="epoch_begin"))  # noqa: E731
    outcome = _killed_then_resumed(config, tmp_path / "run", monkeypatch, kill)
    seed = rundir.read_json(tmp_path / "run" / rundir.RESULTS_JSON)["seed"]
    assert rundir.read_json(tmp_path / "run" / rundir.CONFIG_JSON)["config"]["train"]["seed"] == seed
    train.train_and_evaluate(_config(folder, seed=seed, epochs=4), tmp_path / "replay")
    assert run_outcome(tmp_path / "replay") == outcome


def test_the_first_run_after_reading_the_data_starts_as_every_later_one(folder, tmp_path, monkeypatch):
    # tfds preparing MNIST the first time drew from Python's generator, and the weights came out otherwise.
    train.train_and_evaluate(_config(folder, epochs=2), tmp_path / "plain")
    original = train.data_lib.load_splits

    def load_and_draw(*args, **kwargs):
        random.random(), np.random.rand()  # as a data set being prepared might
        return original(*args, **kwargs)

    monkeypatch.setattr(train.data_lib, "load_splits", load_and_draw)
    train.train_and_evaluate(_config(folder, epochs=2), tmp_path / "drawn")
    assert run_outcome(tmp_path / "drawn") == run_outcome(tmp_path / "plain")


@pytest.mark.slow  # two runs of 4 epochs: the default suite's between-epochs kill covers the CNN
def test_the_mlp_under_xla_resumes_as_the_uninterrupted_run(folder, tmp_path, monkeypatch):
    # The MLP's CPU default compiles its step with XLA (benchmarks/RESULTS.md): resuming must still
    # give the bits of the run never interrupted.
    config = _config(folder, recipe="scratch_mlp", jit_compile="true", augment=())
    keras.utils.set_random_seed(0)
    result = train.train_and_evaluate(config, tmp_path / "once")
    assert result.results["jit_compile"] is True
    resumed = _killed_then_resumed(config, tmp_path / "run", monkeypatch, KILLS["between-epochs"])
    assert resumed == run_outcome(tmp_path / "once")
