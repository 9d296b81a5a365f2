"""`tune`'s trials in TensorBoard's HParams view, read back with TensorBoard's own event reader: the
experiment names the knobs (with their domains) and the metrics, each finished trial's folder holds
its knob values and metrics, a resumed search writes no trial twice, and a failed write is a
warning. The trials here are KerasTuner's own, ended by hand on a real oracle (no training); the
module's search in test_tune.py checks the view of a real search, and the slow test asks a served
TensorBoard for it."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import browser_check
import keras_tuner as kt
import pytest
import tensorflow as tf
from conftest import CHILD_PYTHONPATH, REPO
from google.protobuf import json_format
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins.hparams import api_pb2, metadata

from kerastune_flow import rundir
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.search import tune_hparams, tune_report, tuner
from kerastune_flow.search.tune_space import SearchSpace, resolve_space

# (val_accuracy, val_loss) per epoch of each trial: trial 0 is best at its epoch 1, trial 1 at its epoch 0.
HISTORIES = {"0": [(0.5, 1.2), (0.75, 0.9), (0.7, 0.8)], "1": [(0.6, 1.0), (0.55, 1.1)]}
SERVE_SECONDS = 60
SCREENSHOTS = REPO / "runs" / "screenshots"  # git-ignored, kept for a person


def read_view(log_dir) -> tuple[dict, dict]:
    """What TensorBoard reads in `log_dir`: (the experiment as a dict, or {} without one;
    {run: {"hparams": {name: value}, "metrics": {tag: (step, value)}, "status": ...}})."""
    events = plugin_event_multiplexer.EventMultiplexer()
    events.AddRunsFromDirectory(str(log_dir))
    events.Reload()
    experiment, runs = {}, {}
    for run, tags in events.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        for tag, content in tags.items():
            if tag == metadata.EXPERIMENT_TAG:
                experiment = json_format.MessageToDict(metadata.parse_experiment_plugin_data(content))
            elif tag == metadata.SESSION_START_INFO_TAG:
                start = metadata.parse_session_start_info_plugin_data(content)
                hparams = {name: json_format.MessageToDict(value) for name, value in start.hparams.items()}
                runs.setdefault(run, {})["hparams"] = hparams
            elif tag == metadata.SESSION_END_INFO_TAG:
                end = metadata.parse_session_end_info_plugin_data(content)
                runs.setdefault(run, {})["status"] = end.status
    for run in runs:
        scalars = [t for t in events.GetAccumulator(run).Tags()["tensors"] if not t.startswith("_hparams_")]
        last = {tag: events.Tensors(run, tag)[-1] for tag in scalars}
        runs[run]["metrics"] = {tag: (e.step, float(tf.make_ndarray(e.tensor_proto))) for tag, e in last.items()}
    return experiment, runs


def _oracle(tmp_path, objective="val_accuracy"):
    """A real random-search oracle over scratch_mlp's knobs, its space declared as `tune` declares it."""
    config = make_config("scratch_mlp", "smoke")
    knobs = resolve_space(get_recipe("scratch_mlp"), None)
    oracle = tuner.make_oracle("random", objective, trials=3, epochs=3, seed=1, max_minutes=None)
    oracle._set_project_dir(str(tmp_path), tuner.PROJECT)
    declared = kt.HyperParameters()
    SearchSpace(knobs, config, []).build(declared)
    oracle.update_space(declared)
    return oracle, knobs


def _end_trial(oracle, run_dir, trial_id: str) -> kt.engine.trial.Trial:
    """Starts trial `trial_id` and ends it as a trial run would: its history written, its objective told."""
    trial = oracle.create_trial("tuner0")
    assert trial.trial_id == trial_id
    history = [dict(epoch=i, val_accuracy=a, val_loss=loss) for i, (a, loss) in enumerate(HISTORIES[trial_id])]
    rundir.write_history(tune_report.trial_run_dir(run_dir, trial_id), history)
    objective = oracle.objective.name
    oracle.update_trial(trial_id, {objective: tuner.objective_value(history, objective)})
    trial.status = kt.engine.trial.TrialStatus.COMPLETED
    oracle.end_trial(trial)
    return trial


@pytest.fixture
def ended(tmp_path):
    """A search folder whose two trials ended, each writing the view as `tune` does."""
    oracle, knobs = _oracle(tmp_path)
    written = []
    oracle.on_trial_ended = lambda: written.append(tune_hparams.write_trials(tmp_path, oracle, knobs))
    trials = [_end_trial(oracle, tmp_path, trial_id) for trial_id in HISTORIES]
    return oracle, knobs, trials, written


def test_each_finished_trial_shows_its_knobs_and_its_metrics_at_its_best_epoch(ended, tmp_path):
    oracle, knobs, trials, written = ended
    assert written == [["trial_000"], ["trial_001"]]  # each when it ended
    experiment, runs = read_view(tmp_path / tune_hparams.TENSORBOARD_DIR)
    domains = {h["name"]: h for h in experiment["hparamInfos"]}
    assert list(domains) == [k.name for k in knobs] == list(get_recipe("scratch_mlp").space)
    assert domains["learning_rate"]["domainInterval"] == {"minValue": 1e-4, "maxValue": 1e-2}
    assert domains["optimizer"]["domainDiscrete"] == ["adam", "rmsprop", "sgd"]  # TensorBoard sorts them
    assert domains["l2"]["domainDiscrete"] == [0.0, 1e-5, 1e-4, 1e-3]
    metrics = [(m["name"]["tag"], m.get("displayName")) for m in experiment["metricInfos"]]
    assert metrics == [("val_accuracy", "val_accuracy (objective)"), ("val_loss", "val_loss")]
    assert sorted(runs) == ["trial_000", "trial_001"]
    for trial in trials:
        run = runs[tune_hparams.trial_folder_name(trial.trial_id)]
        assert run["hparams"] == tune_report.shown_values(trial, knobs) != {}
        assert run["status"] == api_pb2.STATUS_SUCCESS
    assert runs["trial_000"]["metrics"] == {"val_accuracy": (1, 0.75), "val_loss": (1, pytest.approx(0.9))}
    assert runs["trial_001"]["metrics"] == {"val_accuracy": (0, pytest.approx(0.6)), "val_loss": (0, 1.0)}


def test_a_loss_objective_takes_the_lowest_epoch(tmp_path):
    oracle, knobs = _oracle(tmp_path, objective="val_loss")
    _end_trial(oracle, tmp_path, "0")
    assert tune_hparams.write_trials(tmp_path, oracle, knobs) == ["trial_000"]
    experiment, runs = read_view(tmp_path / tune_hparams.TENSORBOARD_DIR)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["val_loss", "val_accuracy"]
    assert runs["trial_000"]["metrics"] == {
        "val_loss": (2, pytest.approx(0.8)),
        "val_accuracy": (2, pytest.approx(0.7)),
    }


def test_a_resumed_search_writes_no_trial_twice_and_catches_up_on_a_lost_one(ended, tmp_path):
    oracle, knobs, _, _ = ended
    log_dir = tmp_path / tune_hparams.TENSORBOARD_DIR
    files = sorted(p.relative_to(log_dir) for p in log_dir.rglob("*"))
    assert tune_hparams.write_trials(tmp_path, oracle, knobs) == []
    assert sorted(p.relative_to(log_dir) for p in log_dir.rglob("*")) == files
    # A kill after the oracle recorded trial 1 and before its folder was renamed into place.
    (log_dir / "trial_001").rename(tmp_path / tune_hparams.PARTIAL_DIR)
    assert tune_hparams.write_trials(tmp_path, oracle, knobs) == ["trial_001"]
    assert not (tmp_path / tune_hparams.PARTIAL_DIR).exists()
    experiment, runs = read_view(log_dir)
    assert sorted(runs) == ["trial_000", "trial_001"] and experiment
    assert len([p for p in log_dir.iterdir() if p.is_file()]) == 1  # the experiment, written once


def test_a_failed_write_is_a_warning_and_the_next_trial_writes_it(tmp_path, monkeypatch, caplog):
    oracle, knobs = _oracle(tmp_path)
    _end_trial(oracle, tmp_path, "0")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(tune_hparams.tf.summary, "create_file_writer", full_disk)
        with caplog.at_level(logging.WARNING, logger="kerastune_flow"):
            assert tune_hparams.write_trials(tmp_path, oracle, knobs) == []
    assert "No space left on device" in caplog.text and "tried again at the next trial" in caplog.text
    _end_trial(oracle, tmp_path, "1")
    assert tune_hparams.write_trials(tmp_path, oracle, knobs) == ["trial_000", "trial_001"]


def test_a_trial_still_running_or_failed_is_not_shown(tmp_path):
    oracle, knobs = _oracle(tmp_path)
    oracle.create_trial("tuner0")  # running
    failed = oracle.create_trial("tuner1")
    failed.status = kt.engine.trial.TrialStatus.FAILED
    oracle.end_trial(failed)
    assert [str(t.status) for t in oracle.trials.values()] == ["RUNNING", "FAILED"]
    assert tune_hparams.write_trials(tmp_path, oracle, knobs) == []
    assert not (tmp_path / tune_hparams.TENSORBOARD_DIR).exists()


# --------------------------------------------------------------------------- TensorBoard itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """TensorBoard serving the view of two ended trials on a loopback port: its address."""
    run_dir = tmp_path_factory.mktemp("served")
    oracle, knobs = _oracle(run_dir)
    for trial_id in HISTORIES:
        _end_trial(oracle, run_dir, trial_id)
    tune_hparams.write_trials(run_dir, oracle, knobs)
    port = _free_port()
    log_dir = run_dir / tune_hparams.TENSORBOARD_DIR
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(log_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={"PYTHONPATH": CHILD_PYTHONPATH, "PATH": "/usr/bin:/bin", "HOME": str(run_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_SECONDS
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                _post(f"{address}/data/plugin/hparams/experiment", {"experimentName": ""})
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"TensorBoard did not answer in {SERVE_SECONDS} s"
                time.sleep(0.5)
        yield address, run_dir
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # starts a TensorBoard server (about 7 s)
def test_tensorboard_serves_the_trials_in_its_hparams_view(served):
    address, _ = served
    base = f"{address}/data/plugin/hparams"
    experiment = _post(f"{base}/experiment", {"experimentName": ""})
    assert sorted(h["name"] for h in experiment["hparamInfos"]) == sorted(get_recipe("scratch_mlp").space)
    groups = _post(
        f"{base}/session_groups",
        {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "startIndex": 0, "sliceSize": 10},
    )
    by_name = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(by_name) == ["trial_000", "trial_001"]
    values = {m["name"]["tag"]: m["value"] for m in by_name["trial_000"]["metricValues"]}
    assert values == {"val_accuracy": 0.75, "val_loss": pytest.approx(0.9)}


@pytest.mark.slow  # TensorBoard's page in headless Chromium (about 5 s more)
def test_the_hparams_dashboard_shows_the_trials_in_a_browser(served):
    if browser_check.missing():
        pytest.skip(browser_check.missing())
    address, run_dir = served
    driver = browser_check._driver()
    try:
        driver.set_page_load_timeout(browser_check.PAGE_LOAD_SECONDS)
        driver.get(f"{address}/#hparams")
        deadline, table = time.monotonic() + SERVE_SECONDS, ""
        while "trial_001" not in table and time.monotonic() < deadline:
            time.sleep(0.5)
            # The dashboard is Polymer inside Angular: its table lies in nested shadow roots.
            text = " ".join(driver.execute_script(_ALL_TEXT).split())
            table = text.split("Trial ID", 1)[-1] if "Trial ID" in text else ""
        shot = run_dir / "tune_hparams.png"
        shot.write_bytes(browser_check._full_page_png(driver))
    finally:
        driver.quit()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / "tune_hparams.png")  # for a person to look at
    assert "trial_000" in table and "trial_001" in table, table[:500]
    assert "val_accuracy (objective)" in table and "0.75000" in table and "glorot_uniform" in table


# Every text of the page, shadow roots included (document.body.innerText stops at them).
_ALL_TEXT = """
const texts = root => [root.textContent, ...Array.from(root.querySelectorAll('*'))
    .filter(el => el.shadowRoot).map(el => texts(el.shadowRoot))].join(' ');
return texts(document);
"""
