"""Two worker processes on loopback ports train with MultiWorkerMirroredStrategy through the CLI."""

import json
import os
import socket
import subprocess
import time

import pytest
from conftest import CHILD_PYTHONPATH, CLI


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(argv, cwd):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": CHILD_PYTHONPATH,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "CUDA_VISIBLE_DEVICES": "",
        }
        procs.append(
            subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _finish(procs):
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the two workers did not finish within 240 s")
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    return outputs


def _train(recipe, folder, run_dir, *flags):
    command = [*CLI, "train", recipe, "--data", str(folder), "--preset", "smoke", *flags]
    return [*command, "--strategy", "multiworker", "--quiet", "--run-dir", str(run_dir)]


# Slow (16-25 s, two worker processes): the slow test below trains the same two workers too, killed and restarted.
@pytest.mark.slow
def test_two_workers_train_in_step_and_only_the_chief_writes(image_folder, tmp_path):
    run_dir = tmp_path / "run"
    argv = _train("scratch_mlp", image_folder, run_dir, "--epochs", "2", "--no-early-stopping")
    chief, worker = _finish(_start_workers(argv, tmp_path))
    assert chief["weights_sha256"] == worker["weights_sha256"]  # identical weights on both workers
    assert chief["epochs_run"] == worker["epochs_run"] == 2
    assert "MultiWorkerMirroredStrategy with 2 replica(s)" in chief["strategy"]
    for name in ("config.json", "history.csv", "history.jsonl", "model.keras", "results.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["global_batch_size"] == 2 * 8  # per-worker batch x workers
    assert worker["run_dir"] != str(run_dir) and not os.path.exists(worker["run_dir"])  # private, removed


@pytest.mark.slow
def test_two_workers_killed_twice_and_restarted_end_as_the_uninterrupted_pair(image_folder, tmp_path):
    flags = ("--augment", "flip,crop", "--dropout", "0.3", "--epochs", "8", "--seed", "4")
    whole = _finish(_start_workers(_train("cifar10_cnn", image_folder, tmp_path / "whole", *flags), tmp_path))
    run_dir = tmp_path / "killed"
    state = run_dir / "backup" / "fit" / "state.json"
    for epoch in (2, 5):  # both workers killed (SIGKILL) once the chief has backed this epoch up
        procs = _start_workers(_train("cifar10_cnn", image_folder, run_dir, *flags), tmp_path)
        deadline = time.time() + 240
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
                break
            time.sleep(0.05)
        for p in procs:
            p.kill()
            p.communicate()
        assert json.loads(state.read_text())["epoch"] >= epoch
    resumed = _finish(_start_workers(_train("cifar10_cnn", image_folder, run_dir, *flags), tmp_path))
    assert resumed[0]["resumed"] is True
    assert resumed[0]["weights_sha256"] == resumed[1]["weights_sha256"] == whole[0]["weights_sha256"]
    assert resumed[0]["test"] == whole[0]["test"]
