"""Each log line once (issue 26): TensorFlow's native lines at import came twice (a second copy of
absl's logging in its profiler plugin), and its Python logger's lines twice (its own handler and the
CLI's root handler)."""

import io
import logging
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import CLI, REPO

from kerastune_flow import run
from kerastune_flow.runtime import logs

BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = "port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.\n"
GUARD = "cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions.\n"
# The full `tensorflow` wheel (KerasHub's requirements install it) on a machine without CUDA: not an error here.
NO_GPU = (
    "cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
# What `import tensorflow` 2.21 writes to file descriptor 2 (shortened): the second copy's lines come later.
TF_IMPORT = (
    f"{BANNER}I0000 00:00:1796532652.553146    4873 {ONEDNN}"
    f"I0000 00:00:1796532652.600000    4873 {GUARD}To enable the following instructions: AVX2 FMA.\n"
    f"W0000 00:00:1796532653.000000    4873 some.cc:1] a warning of its own\n"
    f"E0000 00:00:1796532653.100000    4873 {NO_GPU}"
    f"{BANNER}I0000 00:00:1796532655.517474    4873 {ONEDNN}"
)


@pytest.mark.parametrize("level", ["0", "1"])
def test_native_lines_written_twice_while_tensorflow_loads_are_shown_once(level, monkeypatch, capfd):
    monkeypatch.delitem(sys.modules, "tensorflow")  # once_each holds nothing once TensorFlow is loaded
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    monkeypatch.delenv(logs.DEBUG_ENV, raising=False)
    capfd.readouterr()
    with logs.once_each():
        os.write(2, TF_IMPORT.encode())
        print("python's own line", file=sys.stderr)
    err = capfd.readouterr().err
    assert err.count("a warning of its own") == 1 and err.count("python's own line") == 1
    if level == "0":  # asked for INFO lines: each once
        assert (err.count(BANNER), err.count(ONEDNN), err.count(GUARD), err.count("AVX2 FMA")) == (1, 1, 1, 1)
        assert err.count(NO_GPU) == 1
    else:  # the default: no INFO line, and not the banner that comes with them
        assert BANNER not in err and ONEDNN not in err and GUARD not in err and "AVX2 FMA" not in err
        assert NO_GPU not in err  # "no GPU" is not an error on a CPU machine


def test_a_handler_made_while_tensorflow_loads_still_writes_after(monkeypatch, capfd):
    # TensorFlow's logger gets its handler during `import tensorflow`, inside once_each, where
    # sys.stderr is a stream once_each closes after: its retracing warning in compare and tune was
    # "--- Logging error --- I/O operation on closed file" (fixed 2026-12-06).
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.delenv(logs.DEBUG_ENV, raising=False)
    fd_2 = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    monkeypatch.setattr(sys, "stderr", fd_2)  # as in the command line: Python's stderr is fd 2
    logger = logging.getLogger("kerastune_flow_test_import_time")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", False)
    with logs.once_each():
        assert sys.stderr is not fd_2  # held: the block's Python writes go through another stream
        logger.addHandler(logging.StreamHandler())  # takes sys.stderr as it is now
    logger.warning("a retracing warning after the import")
    assert logger.handlers[0].stream is fd_2
    assert "a retracing warning after the import" in capfd.readouterr().err


def test_tensorflows_python_log_lines_are_printed_once(monkeypatch, capsys):
    # As in the CLI's process: TensorFlow was imported before the root logger had a handler, so
    # its logger has one of its own.
    root, tf_logger = logging.getLogger(), logging.getLogger("tensorflow")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(tf_logger, "handlers", [logging.StreamHandler(sys.stderr)])
    monkeypatch.setattr(tf_logger, "propagate", True)
    monkeypatch.setattr(tf_logger, "level", logging.NOTSET)
    assert run.main(["list"]) == 0
    tf_logger.warning("5 out of the last 5 calls to f triggered tf.function retracing.")
    tf_logger.info("Assets written to: /tmp/.export.tmp/saved_model/assets")
    err = capsys.readouterr().err
    assert err.count("triggered tf.function retracing") == 1
    assert err.count("Assets written to") <= 1


def _counted(stderr: str) -> Counter:
    watched = ("absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard", "retracing", "Assets written")
    return Counter(w for line in stderr.splitlines() for w in watched if w in line)


@pytest.mark.slow
def test_every_command_prints_each_tensorflow_line_at_most_once(tmp_path):
    """`list`, a smoke `train` and a SavedModel `export` through the real command, as a user runs them
    (TF_CPP_MIN_LOG_LEVEL unset, then 0: INFO lines asked for)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", logs.DEBUG_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # keeps FAKE_CPU
    run_dir = tmp_path / "run"
    commands = [
        ["list"],
        ["train", "scratch_mlp", "--data", str(REPO / "kerastune_flow/sample_data/digits")]
        + ["--preset", "smoke", "--run-dir", str(run_dir)],
        ["export", str(run_dir), "--format", "saved_model", "--out", str(tmp_path / "sm")],
    ]
    for level in (None, "0"):
        for command in commands[:1] if level else commands:
            proc = subprocess.run(
                [*CLI, *command],
                capture_output=True,
                text=True,
                env={**env, **({"TF_CPP_MIN_LOG_LEVEL": level} if level else {})},
                cwd=tmp_path,
                timeout=600,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            counts = _counted(proc.stderr)
            assert all(n <= 1 for n in counts.values()), (command, level, counts)
            if level == "0":
                assert counts["oneDNN custom operations"] == 1  # shown when asked for, once
