"""One process per output folder: a live lock refuses, a dead one is taken over, the inner runs of a
command and the workers of a cluster are not refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kerastune_flow import run
from kerastune_flow.errors import RunDirError
from kerastune_flow.recipes import make_config
from kerastune_flow.rundir import LOCK_FILE, lock
from kerastune_flow.training import train


def _hold(folder, pid: int, host: str | None = None) -> None:
    """FOLDER/.lock as another process would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-12-06 05:01:00 UTC"}
    (folder / LOCK_FILE).write_text(json.dumps({**record, "command": "kerastune-flow train scratch_mlp"}))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_live_lock_refuses_a_second_process_and_names_it(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _hold(run_dir, os.getpid())
    argv = ["train", "scratch_mlp", "--preset", "smoke", "--data", str(image_folder), "--run-dir", str(run_dir)]

    assert run.main(argv) == 2

    err = capsys.readouterr().err
    assert f"in use by PID {os.getpid()} on {socket.gethostname()}, started 2026-12-06 05:01:00 UTC" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()  # the holder's, kept


def test_a_lock_on_another_host_says_how_to_remove_it(tmp_path):
    _hold(tmp_path, 1, host="elsewhere.example")
    with pytest.raises(RunDirError, match=f"another host.*remove {tmp_path / LOCK_FILE}"):
        lock.acquire(tmp_path)


def test_a_lock_left_by_a_killed_process_is_taken_over_and_logged(tmp_path, caplog):
    dead = _dead_pid()
    _hold(tmp_path, dead)

    with caplog.at_level("WARNING"), lock.run_lock(tmp_path):
        assert lock.read_lock(tmp_path)["pid"] == os.getpid()

    assert f"PID {dead} started 2026-12-06 05:01:00 UTC, no longer runs" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_goes_on_errors_and_ctrl_c_and_inner_runs_take_none(tmp_path):
    with pytest.raises(KeyboardInterrupt), lock.run_lock(tmp_path):
        with lock.run_lock(tmp_path / "trials" / "000"):  # a trial of this search: re-entrant
            assert (tmp_path / LOCK_FILE).exists() and not (tmp_path / "trials" / "000" / LOCK_FILE).exists()
        raise KeyboardInterrupt
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("chief", [True, False])
def test_only_the_chief_of_a_multi_worker_run_takes_the_lock(chief, image_folder, tmp_path, monkeypatch):
    # The chief holds the run directory; another worker writes a private folder and must not be refused.
    _hold(tmp_path / "run", os.getpid())
    monkeypatch.setattr(train, "is_chief", lambda strategy: chief)
    monkeypatch.setattr(train, "_locked_run", lambda *args, **kwargs: "trained")
    config = make_config("scratch_mlp", "smoke", data=str(image_folder))
    if chief:
        with pytest.raises(RunDirError, match=f"in use by PID {os.getpid()}"):
            train.train_and_evaluate(config, tmp_path / "run")
    else:
        assert train.train_and_evaluate(config, tmp_path / "run") == "trained"


def test_a_command_refused_before_writing_leaves_no_empty_folder(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "new"
    argv = ["train", "scratch_mlp", "--preset", "smoke", "--data", str(tmp_path / "missing"), "--run-dir", str(run_dir)]

    assert run.main(argv) == 2

    assert "does not exist" in capsys.readouterr().err
    assert not run_dir.exists()  # the folder the lock made is gone with it; a run that wrote files keeps them
