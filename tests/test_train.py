"""train_and_evaluate end to end on tiny generated folders: run directory, resume, staged fine-tune."""

import json
import os
import signal

import keras
import numpy as np
import pytest
from conftest import add_callbacks, smoke, staged

from kerastune_flow import models, rundir
from kerastune_flow.deploy import inference
from kerastune_flow.errors import DataError, RunDirError, RunInterrupted
from kerastune_flow.models import HeadSpec
from kerastune_flow.recipes import RECIPES
from kerastune_flow.training import callbacks as callbacks_lib
from kerastune_flow.training import train
from kerastune_flow.training.guards import InterruptGuard

RUN_FILES = ("config.json", "history.csv", "history.jsonl", "model.keras", "results.json", "curves.png")


class _HeadKernels(keras.callbacks.Callback):
    """The output layer's kernel as each fit begins and ends (the head model's in the cached stage)."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = [], []

    def on_train_begin(self, logs=None):
        self.begin.append(self.model.layers[-1].get_weights()[0].copy())

    def on_train_end(self, logs=None):
        self.end.append(self.model.layers[-1].get_weights()[0].copy())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_leaves_a_complete_run_directory(recipe, image_folder, tmp_path, monkeypatch):
    compiled = []
    original = keras.Model.compile

    def compile(self, *args, **kwargs):
        compiled.append((self.name, float(kwargs["optimizer"].learning_rate)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", compile)
    staged = RECIPES[recipe].staged
    rates = {"learning_rate": 2e-3, **({"finetune_learning_rate": 2e-5} if staged else {})}
    kernels = _HeadKernels()
    result = train.train_and_evaluate(smoke(recipe, image_folder, **rates), tmp_path / "run", callbacks=[kernels])
    # Compiled once per stage, at its rate, by the one function (training.fitting.compile_for).
    if staged:  # stage 1: the head on cached features and the full model (its checkpoint); stage 2: the
        # part above the cached prefix and the full model again (what is evaluated and saved)
        assert [name for name, _ in compiled] == ["head", result.model.name, "unfrozen_part", result.model.name]
        assert [rate for _, rate in compiled] == pytest.approx([2e-3, 2e-3, 2e-5, 2e-5])
        # One continuous run: the stages' epochs and rates in one history, stage 2 from stage 1's head,
        # the base's last block (and only it) unfrozen.
        assert [(r["epoch"], r["stage"]) for r in result.history] == [(0, "head"), (1, "finetune"), (2, "finetune")]
        assert result.results["stage_boundaries"] == [1]
        assert [r["learning_rate"] for r in result.history] == pytest.approx([2e-3, 2e-5, 2e-5])
        np.testing.assert_array_equal(kernels.begin[1], kernels.end[0])
        trainable = [
            layer.name for layer in result.model.get_layer("vgg16").layers if layer.trainable and layer.weights
        ]
        assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    else:
        assert compiled and len({name for name, _ in compiled}) == len(compiled)
        assert [rate for _, rate in compiled] == pytest.approx([2e-3] * len(compiled))
    run = tmp_path / "run"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert not (run / "backup").exists()  # a finished run leaves no resume state
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"loss", "accuracy"}
    epochs = 1 + 2 if RECIPES[recipe].staged else 2  # the smoke preset: 1 head epoch, 2 epochs
    assert results["epochs_run"] == len(result.history) == epochs
    meta = json.loads((run / "config.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert meta["config"]["model"]["recipe"] == recipe
    loaded = keras.saving.load_model(run / "model.keras")
    assert loaded.output_shape[-1] == meta["head"]["units"] == 3  # three classes: three logits or a softmax of 3


def test_cnn_learns_the_generated_classes(image_folder, tmp_path):
    config = smoke("cifar10_cnn", image_folder, epochs=12, learning_rate=3e-3, max_examples=None, patience=20)
    result = train.train_and_evaluate(config, tmp_path / "run")
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.test_metrics["accuracy"] >= 2 / 3


@pytest.mark.parametrize("backbone", ["users-base", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_mirrored_strategy_batches_globally_and_fits_the_cached_stages(
    backbone, image_folder, base_model, tmp_path, caplog
):
    # The fine-tune's head and its unfrozen rest are models of their own, made from the full one:
    # made outside the strategy's scope, their fit failed with 'Need to be inside "with strategy.scope()"'.
    # The default suite on the fixture's small base; VGG16 (24 s) with -m slow.
    if backbone == "vgg16":
        config = smoke("vgg16_finetune", image_folder, strategy="mirrored")
    else:
        config = staged(image_folder, base_model, strategy="mirrored")
    with caplog.at_level("INFO", logger="kerastune_flow"):
        result = train.train_and_evaluate(config, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["replicas"] == 2
    assert meta["global_batch_size"] == 2 * config.data.batch_size
    assert "MirroredStrategy" in result.results["strategy"]
    assert "Cached the frozen base features" in caplog.text and "Cached the frozen prefix" in caplog.text
    assert [r["stage"] for r in result.history].count("finetune") >= 1


def test_a_finished_run_is_not_overwritten_by_accident(image_folder, tmp_path):
    config = smoke("scratch_mlp", image_folder)
    train.train_and_evaluate(config, tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(RunDirError, match="--overwrite"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert (tmp_path / "run" / "results.json").read_text() == before
    train.train_and_evaluate(config, tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "results.json").exists()


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt  # as Ctrl-C or a kill right after the epoch's backup


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def on_epoch_begin(self, epoch, logs=None):
        self.sink.append(epoch)


def test_a_crashed_run_resumes_at_the_next_epoch(image_folder, tmp_path, monkeypatch):
    config = smoke("cifar10_cnn", image_folder, epochs=4, patience=10)
    with monkeypatch.context() as m:
        add_callbacks(m, _Crash(at_epoch=1))
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, tmp_path / "run")
    assert (tmp_path / "run" / "backup").is_dir()
    assert [r["epoch"] for r in rundir.read_history(tmp_path / "run")] == [0, 1]

    seen = []
    add_callbacks(monkeypatch, _EpochRecorder(seen))
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert seen == [2, 3]  # not from zero
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert result.results["resumed"] is True
    assert not (tmp_path / "run" / "backup").exists()


def test_evaluate_and_predict_use_the_saved_run(image_folder, tmp_path):
    result = train.train_and_evaluate(smoke("cifar10_cnn", image_folder), tmp_path / "run")
    metrics = inference.evaluate_saved(tmp_path / "run", str(image_folder))
    assert metrics["accuracy"] == pytest.approx(result.test_metrics["accuracy"], abs=1e-6)
    assert metrics["examples"] == 3
    assert metrics["test_split"] == f"0.1 of {image_folder} per class, held out with seed 0"
    assert inference.evaluate_saved(tmp_path / "run") == metrics  # the run's own data by default

    rows = inference.predict_images(tmp_path / "run", [str(image_folder / "square")], top_k=2)
    assert len(rows) == 12
    for row in rows:
        assert len(row["predictions"]) == 2
        assert {p["class"] for p in row["predictions"]} <= {"circle", "square", "triangle"}
        probs = [p["probability"] for p in row["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 <= probs[0] <= 1


def test_evaluate_refuses_data_with_other_classes(image_folder, tmp_path):
    from conftest import write_image_folder

    train.train_and_evaluate(smoke("scratch_mlp", image_folder), tmp_path / "run")
    other = write_image_folder(tmp_path / "two", classes=("a", "b"))
    with pytest.raises(DataError, match="2 classes but the model was trained on 3"):
        inference.evaluate_saved(tmp_path / "run", str(other))


def test_a_batch_larger_than_the_data_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(DataError, match="fewer than one global batch"):
        train.train_and_evaluate(smoke("scratch_mlp", image_folder, batch_size=64), tmp_path / "run")


def test_probabilities_for_every_head():
    logits = np.array([[2.0, 0.0, -1.0]])
    p = inference.probabilities(logits, HeadSpec(3, None, "int"))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p.argmax() == 0
    binary = HeadSpec(1, "sigmoid", "binary")
    np.testing.assert_allclose(inference.probabilities(np.array([[0.8]]), binary), [[0.2, 0.8]])


def test_head_is_head_specs_former_name_and_warns():
    with pytest.warns(DeprecationWarning, match="`Head` is now `HeadSpec`"):
        assert models.Head is HeadSpec


def test_no_validation_split_watches_the_training_loss(image_folder, tmp_path):
    config = smoke("scratch_mlp", image_folder, validation_fraction=0.0, epochs=2)
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert all("val_loss" not in r for r in result.history)
    assert (tmp_path / "run" / "model.keras").exists()  # the best model by training loss
    losses = [r["loss"] for r in result.history]
    assert result.results["best_epoch"] == losses.index(min(losses)) + 1
    saved = keras.saving.load_model(tmp_path / "run" / "model.keras")  # the best epoch's weights, kept at the end
    np.testing.assert_array_equal(saved.get_weights()[0], result.model.get_weights()[0])


def test_history_records_every_epoch_with_its_rate_and_the_cosine_decays_it_to_zero(image_folder, tmp_path):
    config = smoke("cifar10_cnn", image_folder, epochs=3, patience=10, lr_schedule="cosine", learning_rate=1e-3)
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert all({"loss", "val_loss", "accuracy", "val_accuracy", "epoch_seconds"} <= set(r) for r in result.history)
    csv_lines = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 4
    rates = [r["learning_rate"] for r in result.history]
    assert rates[0] < 1e-3 and rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)


def test_workdir_is_run_dirs_former_name_and_warns(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "_locked_run", lambda config, run_dir, *args, **kwargs: run_dir)
    config = smoke("scratch_mlp", image_folder)
    with pytest.warns(DeprecationWarning, match="`workdir=` is now `run_dir=`"):
        assert train.train_and_evaluate(config, workdir=tmp_path / "run") == tmp_path / "run"
    with pytest.raises(TypeError, match="Pass run_dir only"):
        train.train_and_evaluate(config, tmp_path / "a", workdir=tmp_path / "b")


def test_a_signal_during_training_stops_after_the_batch_with_a_backup(image_folder, tmp_path, monkeypatch):
    # The guard reaches the fit through the run's FitContext (no process-wide state): SIGTERM in the
    # second epoch ends the fit at the batch's end, and the first epoch's backup stays to resume from.
    class Terminate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    add_callbacks(monkeypatch, Terminate())
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train.train_and_evaluate(smoke("scratch_mlp", image_folder, epochs=3), tmp_path / "run")
    assert (tmp_path / "run" / "backup").is_dir() and not (tmp_path / "run" / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again


def test_standard_callbacks_hold_the_guard_only_when_given_it(tmp_path):
    with callbacks_lib.interrupt_guard() as guard:
        without = callbacks_lib.standard_callbacks(tmp_path / "a")
        given = callbacks_lib.standard_callbacks(tmp_path / "b", guard=guard)
    assert guard not in without and not any(isinstance(c, InterruptGuard) for c in without)
    assert guard in given
