"""The learning-rate range test: it leaves the model exactly as it was, stops where the loss
diverges, reads the curve by each rule, suggests the same rate on one replica and on two, and
`find-lr` / `--learning-rate auto` write it down and resume with it."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_outcome, staged

from kerastune_flow import models, run, rundir
from kerastune_flow.data.samples import sample_folder
from kerastune_flow.errors import ConfigError, TrainingDivergedError
from kerastune_flow.recipes import make_config
from kerastune_flow.reports import plots
from kerastune_flow.training import lr_find, lr_range, resume, train
from kerastune_flow.training.lr_find import find_lr

NUM_EXAMPLES = 64
BATCH = 16
DIGITS = str(sample_folder("digits"))  # the sample shipped in the package
FIT = keras.Model.fit
SHORT_TEST = 40  # steps of the range tests of whole runs, where the test's length does not matter


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(128, 40, size=(NUM_EXAMPLES, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 128).astype("int64")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _mlp(*, dropout=0.3, steps_per_execution=4):
    keras.utils.set_random_seed(0)
    return models.build_scratch_mlp(
        input_shape=(6, 6, 1),
        num_classes=2,
        hidden_units=(8,),
        dropout=dropout,
        steps_per_execution=steps_per_execution,
    )


def _state(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in [*model.variables, *model.optimizer.variables]]


# --------------------------------------------------------------------------- the range test


def test_the_range_test_leaves_weights_optimizer_and_the_next_fit_exactly_as_they_were():
    ds = _data()
    tested, plain = _mlp(), _mlp()
    for model in (tested, plain):
        model.fit(ds, epochs=1, verbose=0)  # the optimizer has moments and a step count
    before = _state(tested)
    assert int(tested.optimizer.iterations) == NUM_EXAMPLES // BATCH
    test = lr_range.range_test(tested, ds, max_steps=40)
    assert len(test.lrs) > 10  # it did train
    after = _state(tested)
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    for model in (tested, plain):  # dropout seeds included: the next fit is the same fit
        model.fit(ds, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(_state(tested), _state(plain), strict=True))


def test_the_curve_stops_where_the_loss_diverges():
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
    ds = _data().map(lambda x, y: (x / 128.0, tf.cast(y, tf.float32)))
    test = lr_range.range_test(model, ds, min_lr=1e-4, max_lr=1e3, max_steps=60)
    assert test.diverged and len(test.lrs) < 60
    assert test.lrs == pytest.approx(list(np.logspace(-4, 3, 60)[: len(test.lrs)]))
    finite = [s for s in test.smoothed if np.isfinite(s)]
    last = test.smoothed[-1]
    assert not np.isfinite(last) or last > lr_range.DIVERGE_FACTOR * min(finite)


def _settling_curve(steps=300):
    """A from-scratch CNN's curve (find-lr cifar10_cnn on the digits): flat at chance (2.3), down to
    0.12, then shooting up to 6.6 within a few steps and settling back at chance. The exponentially
    smoothed loss lags so far behind that it never reaches 4 times its minimum."""
    i = np.arange(steps)
    losses = np.full(steps, 2.3)
    losses = np.where((i >= 130) & (i < 190), 2.3 - 2.18 * (i - 130) / 60, losses)
    losses = np.where((i >= 190) & (i < 200), 0.12, losses)
    losses = np.where((i >= 200) & (i < 210), 6.6, losses)
    return list(np.where(i >= 210, 2.3 + 0.05 * np.sin(i), losses))


def _fake_steps(monkeypatch, losses):
    """The range test's steps return `losses` one by one (the model and the data still go through it)."""
    feed = iter(losses)
    monkeypatch.setattr(lr_range, "_step_function", lambda model, optimizer, strategy: lambda batch: next(feed))


def test_a_loss_that_shoots_up_and_settles_at_chance_is_a_divergence(monkeypatch, caplog):
    losses = _settling_curve()
    smoothed = lr_range.ema_smooth(losses)
    assert max(smoothed[150:]) < lr_range.DIVERGE_FACTOR * min(smoothed)  # the smoothed rule alone misses it
    _fake_steps(monkeypatch, losses)
    with caplog.at_level("INFO", logger="kerastune_flow.training.lr_range"):
        test = lr_range.range_test(_mlp(), _data())
    assert test.diverged and 200 < len(test.lrs) < 215  # stopped a few steps into the rise
    assert "median" in test.why and test.record()["diverged_how"] == test.why
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Range test:")]
    assert "stopped where the loss diverged" in line and "never" not in line
    # The default rule reads the same rate as on the whole curve: the stop comes long after it.
    whole = lr_range.suggest(np.logspace(-7, 1, 300), losses, planned_steps=300)
    assert test.suggestion() == pytest.approx(whole, rel=1e-9)


def test_one_noisy_batch_is_not_a_divergence(monkeypatch, caplog):
    losses = [0.5] * 100
    losses[60] = 5.0  # ten times the loss, once
    _fake_steps(monkeypatch, losses)
    with caplog.at_level("INFO", logger="kerastune_flow.training.lr_range"):
        test = lr_range.range_test(_mlp(), _data(), max_steps=100)
    assert not test.diverged and len(test.lrs) == 100 and test.why == ""
    assert any("the loss never diverged (its lowest 0.5, its last 0.5" in r.getMessage() for r in caplog.records)


def test_a_model_that_is_not_compiled_or_bad_rates_are_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ConfigError, match="compiled model"):
        lr_range.range_test(model, _data())
    with pytest.raises(ConfigError, match="min_lr < max_lr"):
        lr_range.range_test(_mlp(), _data(), min_lr=1.0, max_lr=0.1)


def _synthetic_curve():
    """100 steps, 1e-7 to 10: a drop in the first steps (noise the rules must skip), flat to step 40,
    a cosine-shaped descent to step 70 (steepest at 55, lowest at 70), then a rise."""
    lrs = np.logspace(-7, 1, 100)
    i = np.arange(100)
    losses = np.where(i < 5, 3.0 - 0.2 * i, 2.0)
    descent = (i >= 40) & (i <= 70)
    losses = np.where(descent, 1.25 + 0.75 * np.cos(np.pi * (i - 40) / 30), losses)
    losses = np.where(i > 70, 0.5 + 0.1 * (i - 70), losses)
    return lrs, losses


def test_each_rule_reads_the_point_it_is_defined_by_on_a_known_curve():
    lrs, losses = _synthetic_curve()
    assert lr_range.suggest(lrs, losses, "descent") == lrs[55]  # smoothed without lag: the same point
    # fastai's and Lightning's rules on the curve as given (beta=0: no exponential smoothing)
    assert lr_range.suggest(lrs, losses, "steepest", beta=0) == lrs[55]  # not the drop at the start
    assert lr_range.suggest(lrs, losses, "minimum", beta=0) == pytest.approx(lrs[70] / 10)
    valley = lr_range.suggest(lrs, losses, "valley", beta=0)
    assert lrs[40] < valley < lrs[70]  # inside the descent, short of its bottom
    assert valley == lrs[54]  # fastai: 39 + 31 // 3 + 31 // 6, the valley being 31 steps down to step 70
    cut = losses.copy()
    cut[80:] = np.nan  # a NaN ends the curve
    assert lr_range.suggest(lrs, cut, "minimum", beta=0) == pytest.approx(lrs[70] / 10)
    # Smoothed exponentially, the curve lags: its lowest point comes later than the loss's.
    assert lr_range.suggest(lrs, losses, "minimum") > lrs[70] / 10


def test_a_curve_too_short_to_read_and_an_unknown_rule_are_errors():
    lrs, losses = _synthetic_curve()
    with pytest.raises(ConfigError, match="Unknown suggestion rule"):
        lr_range.suggest(lrs, losses, "median")
    with pytest.raises(TrainingDivergedError, match="diverged within 1 step"):
        lr_range.suggest(lrs[:2], [1.0, np.nan], "valley")


# --------------------------------------------------------------------------- find-lr


def _digits(**overrides):
    return make_config("scratch_mlp", "smoke", data=DIGITS, image_size=(8, 8), verbose=0, **overrides)


@pytest.mark.slow  # 7 s; the default suite trains under MirroredStrategy in test_train.py
def test_the_suggestion_is_the_same_on_two_replicas_as_on_one_device(tmp_path):
    steps = 100
    one = find_lr(_digits(strategy="cpu", batch_size=8), tmp_path / "one", max_steps=steps)  # 16 per execution
    two = find_lr(_digits(strategy="mirrored", batch_size=4), tmp_path / "two", max_steps=steps)  # 2 x 4 = 8
    assert one["global_batch_size"] == two["global_batch_size"] == 8
    assert one["suggestions"] == two["suggestions"]
    assert two["losses"][: steps // 2] == pytest.approx(one["losses"][: steps // 2], rel=1e-4)
    assert 1e-5 < one["suggestion"] < 1.0


def test_find_lr_through_the_cli_writes_the_record_and_the_plot(tmp_path, capsys, monkeypatch):
    titles = []
    plot_lr_find = plots.plot_lr_find

    def plotted(record, **kwargs):
        plot = plot_lr_find(record, **kwargs)
        titles.append(plot.figure.axes[0].get_title())
        return plot

    monkeypatch.setattr(plots, "plot_lr_find", plotted)
    argv = ["find-lr", "cifar10_cnn", "--data", DIGITS, "--preset", "smoke", "--run-dir", str(tmp_path / "r")]
    assert run.main([*argv, "--quiet"]) == 0
    # The plot names what was fitted: the whole CNN, trained from scratch, not a "head".
    (title,) = titles
    assert title.startswith("Range test of the cifar10_cnn model: suggestion") and "head" not in title
    printed = json.loads(capsys.readouterr().out)
    record = rundir.read_json(tmp_path / "r" / "lr_find.json")
    assert {"suggestion", "lrs", "losses", "rule"} <= set(record)
    assert record["rule"] == lr_range.DEFAULT_RULE and record["stage"] == "head"
    assert printed["suggestion"] == record["suggestion"] == record["suggestions"][record["rule"]]
    assert len(record["lrs"]) == len(record["losses"]) == record["steps"] > 10
    assert (tmp_path / "r" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The staged fine-tune's settings, on the `folder` fixture's images and the `base_model` fixture.
STAGES = dict(max_examples=None, unfreeze_at="conv_3", head_epochs=1, epochs=1, steps_per_execution=1, verbose=0)


def _short_range_tests(monkeypatch, *, kill_at=None):
    """Range tests of SHORT_TEST steps (the tests run many), each call recorded; with `kill_at`,
    the call of that number raises KeyboardInterrupt, as a kill would end the process."""
    calls = []
    original = lr_range.range_test

    def short(model, dataset, **kwargs):
        calls.append(
            {
                "model": model.name,
                "trainable": {v.path for v in model.trainable_variables},
                "multiplier": getattr(model.optimizer, "base_multiplier", None),
            }
        )
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return original(model, dataset, **{**kwargs, "max_steps": SHORT_TEST})

    monkeypatch.setattr(lr_range, "range_test", short)
    return calls


def test_stage_finetune_tests_stage_two_after_training_stage_one(folder, base_model, tmp_path, monkeypatch):
    calls = _short_range_tests(monkeypatch)
    fits = []

    def fit(self, *args, **kwargs):
        fits.append(self.name)
        return FIT(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    record = find_lr(staged(folder, base_model, **STAGES, base_lr_multiplier=0.1), tmp_path / "r", stage="finetune")
    assert fits == ["head"]  # stage 1: the head on cached features, then no other fit
    (call,) = calls
    assert call["model"] != "head" and call["multiplier"] == 0.1  # the whole model, as stage 2 compiles it
    assert any("conv_3" in path for path in call["trainable"])  # the base from unfreeze_at on trains
    assert record["stage"] == "finetune" and (tmp_path / "r" / "lr_find.json").exists()
    assert record["fitted"] == f"the fine-tune stage ({base_model.name} base)"


def test_each_range_test_is_titled_by_what_it_fits():
    scratch, staged = make_config("cifar10_cnn", "smoke"), make_config("vgg16_finetune", "smoke")
    assert lr_find.fitted(scratch, "head") == "the cifar10_cnn model"
    assert lr_find.fitted(staged, "head") == "the head on the frozen vgg16 base"
    mobile = staged.replace(backbone="mobilenetv2")
    assert lr_find.fitted(mobile, "finetune") == "the fine-tune stage (mobilenetv2 base)"
    record = dict(suggestion=1.23e-4, rule="descent", stage="head", lrs=[1e-7, 1e-6], losses=[2.3, 2.3])
    record.update(smoothed=[2.3, 2.3], fitted=lr_find.fitted(staged, "head"))
    title = plots.plot_lr_find(record).figure.axes[0].get_title()
    assert title == "Range test of the head on the frozen vgg16 base: suggestion 0.00012 (descent)"


def test_bad_input_to_find_lr_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        (["find-lr", "scratch_mlp", "--stage", "finetune"], "no fine-tune stage"),
        (["find-lr", "scratch_mlp", "--data", str(tmp_path / "missing")], "missing"),
        (["train", "scratch_mlp", "--learning-rate", "fast"], "or auto"),
        (["train", "vgg16_finetune", "--finetune-learning-rate", "auto", "--progressive", "0:1:1e-5"], "progressive"),
    ]
    for argv, words in cases:
        assert run.main([*argv, "--preset", "smoke", "--run-dir", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


# --------------------------------------------------------------------------- train --learning-rate auto


def test_train_learning_rate_auto_trains_at_the_rate_found_and_records_it(tmp_path, capsys, monkeypatch):
    _short_range_tests(monkeypatch)
    argv = ["train", "scratch_mlp", "--data", DIGITS, "--image-size", "8", "--preset", "smoke", "--quiet"]
    assert run.main([*argv, "--learning-rate", "auto", "--run-dir", str(tmp_path / "r")]) == 0
    results = json.loads(capsys.readouterr().out)
    found = results["learning_rate_found"]["head"]
    record = rundir.read_json(tmp_path / "r" / "lr_find.json")
    assert found == record["suggestion"]
    assert record["fitted"] == "the scratch_mlp model"  # what was fitted: the whole model, not a "head" stage
    assert (tmp_path / "r" / "lr_find.png").exists()
    history = rundir.read_history(tmp_path / "r")
    assert [r["learning_rate"] for r in history] == pytest.approx([found] * len(history), rel=1e-6)
    assert rundir.read_json(tmp_path / "r" / "config.json")["config"]["model"]["learning_rate"] == "auto"


@pytest.mark.slow  # a fine-tune run twice (about a minute)
def test_a_fine_tune_killed_in_its_stage_two_range_test_resumes_with_the_same_rates(
    folder, base_model, tmp_path, monkeypatch
):
    config = staged(folder, base_model, **STAGES, learning_rate="auto", finetune_learning_rate="auto", checkpoint=False)
    with monkeypatch.context() as m:
        _short_range_tests(m)
        whole = train.train_and_evaluate(config, tmp_path / "whole")
    assert set(whole.results["learning_rate_found"]) == {"head", "finetune"}
    assert rundir.read_json(tmp_path / "whole" / "lr_find_finetune.json")["stage"] == "finetune"
    assert rundir.read_json(tmp_path / "whole" / "lr_find_finetune.json")["fitted"].startswith("the fine-tune stage")
    with monkeypatch.context() as m:
        _short_range_tests(m, kill_at=2)  # killed in stage 2's range test
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, tmp_path / "run")
    assert set(resume.found_learning_rates(tmp_path / "run")) == {"head"}
    calls = _short_range_tests(monkeypatch)
    resumed = train.train_and_evaluate(config, tmp_path / "run")
    assert len(calls) == 1 and calls[0]["model"] != "head"  # stage 2's test again, the head's rate reused
    assert resumed.results["resumed"] is True
    assert resumed.results["learning_rate_found"] == whole.results["learning_rate_found"]
    assert run_outcome(tmp_path / "run") == run_outcome(tmp_path / "whole")
