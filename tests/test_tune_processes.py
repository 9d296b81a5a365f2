"""`tune` as processes: a search SIGKILLed in a trial resumes with the same command (no finished
trial runs again, the interrupted one continues at its last finished epoch), and KerasTuner's
chief/worker mode on loopback ports runs every trial exactly once."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import CHILD_PYTHONPATH, CLI, backed_up_epoch

from kerastune_flow import rundir
from kerastune_flow.data.samples import sample_folder
from kerastune_flow.search import tune as tune_lib

DIGITS = str(sample_folder("digits"))  # the sample shipped in the package


def _command(run_dir, *flags):
    search = [
        *CLI,
        "tune",
        "scratch_mlp",
        "--data",
        DIGITS,
        "--preset",
        "smoke",
        "--tuner",
        "random",
        "--final-seeds",
        "1",
    ]
    return [*search, "--run-dir", str(run_dir), "--quiet", *flags]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH, **extra}


FLAGS = ("--trials", "3", "--epochs", "3", "--steps-per-execution", "1", "--seed", "3")


@pytest.mark.slow  # a SIGKILLed search process and its resume, about 45 s; CI runs it with `make slow`
def test_a_search_killed_in_a_trial_resumes_without_running_a_finished_trial_again(tmp_path):
    run_dir = tmp_path / "search"
    proc = subprocess.Popen(_command(run_dir, *FLAGS), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while backed_up_epoch(run_dir / "trials" / "001") < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    first = run_dir / "trials" / "000" / rundir.RESULTS_JSON
    assert first.exists() and not (run_dir / "trials" / "001" / rundir.RESULTS_JSON).exists()
    finished_before = first.stat().st_mtime_ns, first.read_text()
    shown_before = sorted((run_dir / "tensorboard").rglob("events.out.tfevents*"))  # the HParams view so far
    assert [p.parent.name for p in shown_before] == ["tensorboard", "trial_000"]

    done = subprocess.run(_command(run_dir, *FLAGS), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (first.stat().st_mtime_ns, first.read_text()) == finished_before  # not run again
    assert "Resuming the search" in done.stderr and "Trial 0:" not in done.stderr
    resumed = rundir.read_json(run_dir / "trials" / "001" / rundir.RESULTS_JSON)
    assert resumed["resumed"] is True  # it continued from its backup
    history = rundir.read_history(run_dir / "trials" / "001")
    assert [r["epoch"] for r in history] == list(range(len(history)))  # no epoch twice
    shown = sorted((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert set(shown_before) < set(shown) and [p.parent.name for p in shown][2:] == ["trial_001", "trial_002"]

    summary = json.loads((run_dir / "tune.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == ["0", "1", "2"]
    assert all(t["status"] == "COMPLETED" for t in summary["trials"])
    # The same trials as a search never interrupted: KerasTuner's random state was kept (a random
    # search draws them from its seed alone, so one epoch each is enough to compare).
    whole = tune_lib.tune(
        "scratch_mlp",
        tmp_path / "whole",
        tuner="random",
        trials=3,
        data=DIGITS,
        preset="smoke",
        epochs=1,
        seed=3,
        final_seeds=1,
    )
    assert [t["hyperparameters"] for t in whole["trials"]] == [t["hyperparameters"] for t in summary["trials"]]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three TensorFlow processes, about a minute; CI runs it with `make slow`
@pytest.mark.parametrize("folds", [1, 2])  # 2: a worker runs every fold of its trial
def test_a_chief_and_two_workers_run_every_trial_exactly_once(tmp_path, folds):
    run_dir = tmp_path / "search"
    port = str(_free_port())
    flags = ("--trials", "4", "--epochs", "1", "--seed", "5", "--folds", str(folds))
    procs = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        env = _env(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=port)
        procs[tuner_id] = subprocess.Popen(
            _command(run_dir, *flags), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    outputs = {}
    try:
        for tuner_id, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            outputs[tuner_id] = err
            assert proc.returncode == 0, f"{tuner_id}: {err[-3000:]}"
    finally:
        for proc in procs.values():
            proc.kill()
    ran = [
        line.split("Trial ")[1].split(":")[0]
        for worker in ("tuner0", "tuner1")
        for line in outputs[worker].splitlines()
        if "] Trial " in line and " -> " in line
    ]
    assert sorted(ran) == ["0", "1", "2", "3"]  # every trial once, by one worker or the other
    assert "] Trial " not in outputs["chief"]  # the chief only serves the oracle
    summary = json.loads((run_dir / "tune.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["COMPLETED"] * 4
    assert summary["test"]["best"]["examples"] > 0  # the chief wrote the summary once all had ended
    parts = [""] if folds == 1 else [f"fold-{k}" for k in range(folds)]
    trials = [run_dir / "trials" / f"{i:03d}" for i in range(4)]
    assert all((trial / part / rundir.RESULTS_JSON).exists() for trial in trials for part in parts)
    assert all(len(t.get("folds") or [None]) == folds for t in summary["trials"])  # each fold's score, with folds
    # TensorBoard's HParams view: every trial once, written by the chief (its pid in each event file's name).
    shown = sorted((run_dir / "tensorboard").glob("trial_*/events.out.tfevents*"))
    assert [p.parent.name for p in shown] == [f"trial_{i:03d}" for i in range(4)]
    assert all(f".{procs['chief'].pid}." in p.name for p in shown)


@pytest.fixture(autouse=True)
def _no_stray_kerastuner_env(monkeypatch):
    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        monkeypatch.delenv(name, raising=False)
