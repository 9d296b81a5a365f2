"""Issue 26, part 4: every long step shows how far it is (a Keras bar in a terminal, a line every few
seconds otherwise), nothing for a step of a second, nothing with --quiet. The helper runs on a fake
clock; each call site runs once with the delay and interval at 0, on a few tiny images."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import CHILD_PYTHONPATH, write_image_folder

from kerastune_flow import data, models, run
from kerastune_flow.deploy import export, inference
from kerastune_flow.runtime import progress
from kerastune_flow.training import caches

NUM_CLASSES = 3


class FakeClock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def shown(caplog):
    """The progress lines logged so far (the CLI writes them to stderr)."""
    caplog.set_level(logging.INFO, logger=progress.LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == progress.LOGGER]


@pytest.fixture
def at_once(monkeypatch):
    """Every step shows every update: no delay before the first line, none between lines."""
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(progress, "INTERVAL", 0.0)


def _tiny_classifier(size: int) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES, activation="softmax"),
        ]
    )


# --------------------------------------------------------------------------- the helper


def test_without_a_terminal_one_line_every_interval_with_the_time_left(shown):
    clock = FakeClock()
    options = dict(total=8000, unit="image", delay=2, interval=5, terminal=False, clock=clock)
    with progress.Progress("Feature pass", **options) as bar:
        assert bar.bar is None
        for seconds, done in [(1, 100), (11, 1280), (2, 1500), (6, 4000), (20, 8000)]:
            clock.now += seconds
            bar.update(done)
    assert shown() == [
        "Feature pass: 1,280 / 8,000 images (16 %), 12 s, about 1 min 03 s left",  # t=12: after the 2 s delay
        # t=14 is within the 5 s interval: no line
        "Feature pass: 4,000 / 8,000 images (50 %), 20 s, about 20 s left",
        "Feature pass: 8,000 images in 40 s",
    ]


def test_a_step_within_the_delay_shows_nothing_and_an_unknown_total_shows_counts(shown):
    clock = FakeClock()
    with progress.Progress("Image scan", total=10, delay=2, terminal=False, clock=clock) as bar:
        clock.now += 1.5
        bar.update(10)
    assert shown() == []
    with progress.Progress("Caching x", unit="batch", delay=2, terminal=False, clock=clock) as bar:
        clock.now += 130
        bar.advance(3)
    assert shown() == ["Caching x: 3 batches, 2 min 10 s", "Caching x: 3 batches in 2 min 10 s"]


def test_in_a_terminal_a_keras_progress_bar_is_drawn_after_the_delay(shown, capsys):
    clock = FakeClock()
    with progress.Progress("Parity check", total=10, delay=2, terminal=True, clock=clock) as bar:
        assert isinstance(bar.bar, keras.utils.Progbar)
        bar.update(3)
        assert capsys.readouterr().out == "" and shown() == []  # within the delay
        clock.now += 3
        bar.update(5)
        bar.update(10)
    drawn = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert " 5/10 " in drawn and drawn.count("10/10") == 1 and drawn.endswith("\n")
    with (
        pytest.raises(KeyboardInterrupt),
        progress.Progress("Parity check", total=10, terminal=True, clock=clock) as bar,
    ):
        clock.now += 3
        bar.update(4)
        raise KeyboardInterrupt
    assert capsys.readouterr().out.endswith("\n")  # a step cut short ends its bar's line: the error starts a line
    assert shown() == ["Parity check:"] * 2  # the title, then the bar


def test_quiet_shows_nothing_and_puts_the_level_back(shown, capsys):
    clock = FakeClock()
    with progress.silenced():
        for terminal in (True, False):
            with progress.Progress("Image scan", total=10, delay=0, interval=0, terminal=terminal, clock=clock) as bar:
                assert bar.bar is None
                clock.now += 5
                bar.update(10)
        with progress.timed("Converting the model to litert"):
            pass
    assert shown() == [] and capsys.readouterr().out == ""
    assert logging.getLogger(progress.LOGGER).level == logging.INFO
    with progress.silenced(False):
        assert logging.getLogger(progress.LOGGER).isEnabledFor(logging.INFO)


def test_an_opaque_call_gets_a_start_and_an_end_line(shown):
    clock = FakeClock()
    with progress.timed("Converting the model to litert", clock=clock):
        clock.now += 14.2
    assert shown() == ["Converting the model to litert ...", "Converting the model to litert: done in 14 s"]


def test_chunks_count_each_chunk_once_the_loop_is_done_with_it(shown, at_once):
    assert [len(c) for c in progress.chunks("Predicting", list(range(10)), 4)] == [4, 4, 2]
    lines = shown()
    assert [line.split(",")[0] for line in lines[:2]] == [
        "Predicting: 4 / 10 images (40 %)",
        "Predicting: 8 / 10 images (80 %)",
    ]
    assert len(lines) == 3 and re.fullmatch(r"Predicting: 10 images in \d+ s", lines[-1])


# --------------------------------------------------------------------------- the call sites


def test_the_image_scan_shows_its_progress(tmp_path, shown, at_once):
    folder = write_image_folder(tmp_path / "images", per_class=2, size=8)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    scan = data.scan_images(paths)
    assert len(scan.sizes) == 6
    assert len(shown()) == 1 and re.fullmatch(r"Image scan: 6 images in \d+ s", shown()[0])  # one batch: done


def test_the_feature_pass_shows_its_progress_by_batch(shown, at_once):
    features = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    ds = tf.data.Dataset.from_tensor_slices((np.ones((20, 4), np.float32), np.zeros(20, np.int32))).batch(8)
    cached = caches.compute(features, ds, policy="memory", name="frozen_base_features_train")
    assert cached.inputs.shape == (20, 2)
    lines = shown()
    assert [line.split(",")[0] for line in lines[:2]] == [
        "Caching frozen base features train: 1 / 3 batches (33 %)",
        "Caching frozen base features train: 2 / 3 batches (67 %)",
    ]
    assert len(lines) == 3 and re.fullmatch(r"Caching frozen base features train: 3 batches in \d+ s", lines[-1])


def test_the_export_parity_check_shows_its_progress(shown, at_once):
    model = _tiny_classifier(8)
    saved = inference.SavedRun(
        model=model,
        class_names=["a", "b", "c"],
        image_shape=(8, 8, 3),
        head=models.HeadSpec(units=NUM_CLASSES, activation="softmax", label_mode="categorical"),
        config=None,
        path=Path("tiny.keras"),
    )

    def artifact(images, batch_size=32):  # an export that agrees with the model exactly
        return model.predict_on_batch(np.asarray(images))

    images = np.random.default_rng(0).uniform(0, 255, (40, 8, 8, 3)).astype(np.float32)
    test = tf.data.Dataset.from_tensor_slices((images, np.zeros(40, np.int32)))
    parity = export.measure_parity(saved, artifact, test, labelled=True)
    assert parity["examples"] == 40 and parity["top1_agreement"] == 1.0
    assert shown()[0].startswith("Parity check: 32 / 40 images (80 %), ")
    assert re.fullmatch(r"Parity check: 40 images in \d+ s", shown()[-1])


def test_evaluate_on_the_cli_shows_its_progress_per_batch(split_image_folder, tmp_path, shown, at_once, capsys):
    model_path = tmp_path / "tiny.keras"
    _tiny_classifier(20).save(model_path)
    assert run.main(["evaluate", str(model_path), "--data", str(split_image_folder), "--batch-size", "4"]) == 0
    lines = shown()
    evaluating = [line.split(",")[0] for line in lines if line.startswith("Evaluating: ")]
    assert evaluating[:2] == ["Evaluating: 4 / 12 images (33 %)", "Evaluating: 8 / 12 images (67 %)"]
    assert re.fullmatch(r"Evaluating: 12 images in \d+ s", evaluating[-1]) and len(evaluating) == 3
    assert any(line.startswith("Image scan: ") for line in lines)  # loading the test split


def test_predict_shows_its_progress_and_quiet_on_any_command_hides_it(split_image_folder, tmp_path, shown, at_once):
    model_path = tmp_path / "tiny.keras"
    _tiny_classifier(20).save(model_path)
    predict = ["predict", str(model_path), str(split_image_folder / "test" / "circle")]
    assert run.main(predict) == 0
    assert any(re.fullmatch(r"Predicting: 4 images in \d+ s", line) for line in shown())
    before = len(shown())
    assert run.main([*predict, "--quiet"]) == 0
    assert shown()[before:] == []  # neither the scan nor the prediction
    assert logging.getLogger(progress.LOGGER).level == logging.INFO  # --quiet lasts one command
    parser = run.build_parser()  # every command that runs a long step takes --quiet
    for argv in (["evaluate", "R"], ["export", "R", "--format", "onnx"], ["compare", "--data", "D"], ["predict", "R"]):
        assert parser.parse_args([*argv, "--quiet"]).quiet


@pytest.mark.slow
def test_the_command_writes_progress_to_stderr_and_not_with_quiet(split_image_folder, tmp_path):
    """The real process: run.main's logging set-up writes the lines to stderr, and stdout keeps the
    JSON (two processes: TensorFlow's start-up makes it slow)."""
    model_path = tmp_path / "tiny.keras"
    _tiny_classifier(20).save(model_path)
    argv = ["evaluate", str(model_path), "--data", str(split_image_folder), "--batch-size", "4"]
    code = (
        "import sys; from kerastune_flow import run; from kerastune_flow.runtime import progress; "
        "progress.DELAY = progress.INTERVAL = 0; "
        f"raise SystemExit(run.main({argv!r} + sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH}
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "[kerastune_flow] Evaluating: 4 / 12 images (33 %), " in loud.stderr
    assert re.search(r"\[kerastune_flow\] Evaluating: 12 images in \d+ s", loud.stderr)
    assert "Evaluating" not in loud.stdout and '"examples": 12' in loud.stdout
    quiet = subprocess.run(
        [sys.executable, "-c", code, "--quiet"], capture_output=True, text=True, env=env, timeout=300
    )
    assert quiet.returncode == 0 and '"examples": 12' in quiet.stdout
    assert "Evaluating" not in quiet.stderr and "Image scan" not in quiet.stderr
