"""Two worker processes on loopback ports train with MultiWorkerMirroredStrategy through the CLI."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_train_in_step_and_only_the_chief_writes(image_folder, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "kerastune_flow.run",
        "train",
        "scratch_mlp",
        "--data",
        str(image_folder),
        "--preset",
        "smoke",
        "--epochs",
        "2",
        "--strategy",
        "multiworker",
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--no-early-stopping",
    ]
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "CUDA_VISIBLE_DEVICES": "",
        }
        procs.append(
            subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
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
    chief, worker = outputs
    assert chief["weights_sha256"] == worker["weights_sha256"]  # identical weights on both workers
    assert chief["epochs_run"] == worker["epochs_run"] == 2
    assert "MultiWorkerMirroredStrategy with 2 replica(s)" in chief["strategy"]
    for name in ("config.json", "history.csv", "history.jsonl", "model.keras", "results.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["global_batch_size"] == 2 * 8  # per-worker batch x workers
    assert worker["run_dir"] != str(run_dir) and not os.path.exists(worker["run_dir"])  # private, removed
