"""The run directory: preparing and clearing it, atomic writes, the history files, the backup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from kerastune_flow import rundir
from kerastune_flow.errors import RunDirError
from kerastune_flow.rundir import (
    BEST_MODEL,
    HISTORY_CSV,
    HISTORY_JSONL,
    atomic_file,
    atomic_save_model,
    atomic_write_json,
    atomic_write_text,
    read_history,
    records_to_csv,
    to_jsonable,
)


def _model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _kernel(model: keras.Model) -> np.ndarray:
    return keras.ops.convert_to_numpy(model.layers[0].kernel)


# --------------------------------------------------------------------------- the directory


def test_a_new_directory_is_prepared_and_is_no_resume(tmp_path):
    assert rundir.prepare_run_dir(tmp_path / "run") is False
    assert (tmp_path / "run").is_dir()


def test_a_directory_with_a_backup_and_no_results_is_a_resume(tmp_path):
    (tmp_path / rundir.BACKUP_DIR).mkdir()
    assert rundir.prepare_run_dir(tmp_path) is True


def test_a_finished_run_is_refused_unless_overwritten_and_cleared_only_when_asked(tmp_path):
    for name in (rundir.RESULTS_JSON, rundir.CONFIG_JSON, HISTORY_CSV, "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / rundir.TENSORBOARD_DIR).mkdir()
    (tmp_path / "export-onnx").mkdir()  # an export of the finished run's model
    (tmp_path / "export-onnx" / rundir.EXPORT_JSON).write_text("{}")
    (tmp_path / "export-mine").mkdir()  # a folder of the user's that only looks like one
    with pytest.raises(RunDirError, match="--overwrite"):
        rundir.prepare_run_dir(tmp_path)
    assert rundir.prepare_run_dir(tmp_path, overwrite=True) is False
    assert (tmp_path / rundir.RESULTS_JSON).exists()  # kept until the new run can start

    rundir.clear_finished_run(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["export-mine", "notes.txt"]  # only the run's own files go


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "nested" / "dir" / "notes.txt"

    atomic_write_text(path, "first\n")
    assert path.read_text(encoding="utf-8") == "first\n"
    atomic_write_text(path, "second, ünïcode\n")

    assert path.read_text(encoding="utf-8") == "second, ünïcode\n"
    assert os.listdir(path.parent) == ["notes.txt"]


def test_atomic_write_text_failing_midway_keeps_the_old_file(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old\n")

    # A lone surrogate cannot be encoded, so the write fails after the temporary file was opened.
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new text that breaks here: \ud800 and never ends")

    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_atomic_write_text_failing_at_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old\n")

    def no_replace(src, dst):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(RunDirError, match="read-only"):
        atomic_write_text(path, "new\n")

    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_atomic_write_json_converts_and_sorts(tmp_path):
    path = tmp_path / "results.json"

    atomic_write_json(path, {"b": np.float32(0.5), "a": (1, 2), "dir": tmp_path})

    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 0.5, "dir": str(tmp_path)}
    assert path.read_text().startswith('{\n  "a"')


def test_atomic_write_json_that_cannot_serialise_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"ok": 1})

    with pytest.raises(TypeError):
        atomic_write_json(path, {"ok": 2, "bad": object()})

    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_save_model_failing_midway_keeps_the_previous_model(tmp_path, monkeypatch):
    path = tmp_path / BEST_MODEL
    model = _model()
    atomic_save_model(model, path)
    saved_kernel = _kernel(model)
    model.layers[0].kernel.assign(saved_kernel + 1.0)

    def partial_save(filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_model(model, path)

    assert os.listdir(tmp_path) == [BEST_MODEL]
    np.testing.assert_array_equal(_kernel(keras.saving.load_model(path)), saved_kernel)


def test_atomic_save_model_replaces_the_model(tmp_path):
    path = tmp_path / BEST_MODEL
    model = _model()
    atomic_save_model(model, path)
    model.layers[0].kernel.assign(_kernel(model) + 1.0)

    atomic_save_model(model, path)

    np.testing.assert_array_equal(_kernel(keras.saving.load_model(path)), _kernel(model))
    assert os.listdir(tmp_path) == [BEST_MODEL]


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.float32(0.5), 0.5),
        (np.float64(2.25), 2.25),
        (np.int64(7), 7),
        (np.bool_(True), True),
        (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
        ((1, (2, 3)), [1, [2, 3]]),
        (Path("runs") / "a", os.path.join("runs", "a")),
        ({1: np.float32(0.5), "k": [np.int32(3)]}, {"1": 0.5, "k": [3]}),
        (float("nan"), None),
        (np.float64("nan"), None),
        (np.array([1.0, np.nan]), [1.0, None]),
        ("text", "text"),
        (None, None),
    ],
)
def test_to_jsonable(value, expected):
    converted = to_jsonable(value)

    assert converted == expected
    assert type(converted) is type(expected)
    assert json.loads(json.dumps(converted, allow_nan=False)) == expected


def test_records_to_csv_unions_columns_in_first_seen_order():
    text = records_to_csv([{"epoch": 0, "loss": 1.5}, {"epoch": 1, "stage": "ft", "loss": 1.0}])

    assert text == "epoch,loss,stage\n0,1.5,\n1,1.0,ft\n"


def test_read_history_of_a_missing_dir_is_empty(tmp_path):
    assert read_history(tmp_path / "does-not-exist") == []


def test_read_history_skips_blank_lines(tmp_path):
    (tmp_path / HISTORY_JSONL).write_text('{"epoch": 0}\n\n{"epoch": 1}\n   \n', encoding="utf-8")

    assert read_history(tmp_path) == [{"epoch": 0}, {"epoch": 1}]


def test_read_history_falls_back_to_the_csv_when_json_lines_are_off(tmp_path):
    records = [{"epoch": 0, "stage": "head", "loss": 1.5}, {"epoch": 1, "stage": "head", "loss": 0.75}]
    rundir.write_history(tmp_path, records, jsonl_log=False)

    assert not (tmp_path / HISTORY_JSONL).exists()
    assert read_history(tmp_path) == records


def test_atomic_file_renames_only_a_finished_file(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(ZeroDivisionError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise ZeroDivisionError("the writer fails half-way")
    assert os.listdir(tmp_path) == []

    with atomic_file(path) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"whole")
    assert path.read_bytes() == b"whole" and os.listdir(tmp_path) == ["plot.png"]
