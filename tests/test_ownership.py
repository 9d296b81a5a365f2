"""Nothing of the user's lost: --overwrite replaces only what the package wrote, files get the
umask's mode, every removal is logged, and an interrupted command says how to go on."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import keras
import pytest

from kerastune_flow import run, rundir
from kerastune_flow.deploy import export
from kerastune_flow.errors import RunDirError, RunInterrupted
from kerastune_flow.recipes import make_config
from kerastune_flow.rundir import unfinished
from kerastune_flow.search import tune


def _user_folder(root: Path) -> dict[str, bytes]:
    """A folder of the user's: a precious.txt and a sub/thesis.tex; returns its files' bytes."""
    (root / "sub").mkdir(parents=True)
    (root / "precious.txt").write_text("years of work")
    (root / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    return _snapshot(root)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_file(tmp_path) -> Path:
    """A bare .keras model: export needs no run directory for these checks."""
    path = tmp_path / "model.keras"
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]).save(path)
    return path


# --------------------------------------------------------------------------- --overwrite


def test_export_overwrite_onto_a_users_folder_is_refused_and_leaves_it_untouched(model_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    before = _user_folder(mine)

    argv = ["export", str(model_file), "--format", "saved_model", "--out", str(mine), "--overwrite"]
    assert run.main(argv) == 2

    err = capsys.readouterr().err
    assert "did not write" in err and "precious.txt" in err and len(err.splitlines()) == 1
    assert _snapshot(mine) == before


def test_export_out_dot_is_refused_even_inside_an_export(model_file, tmp_path, monkeypatch, capsys):
    old_export = tmp_path / "old-export"
    old_export.mkdir()
    (old_export / rundir.EXPORT_JSON).write_text("{}")
    monkeypatch.chdir(old_export)

    assert run.main(["export", str(model_file), "--format", "saved_model", "--out", ".", "--overwrite"]) == 2

    assert "current folder" in capsys.readouterr().err
    assert sorted(p.name for p in old_export.iterdir()) == [rundir.EXPORT_JSON]


def test_train_overwrite_onto_a_users_folder_is_refused_and_leaves_it_untouched(image_folder, tmp_path, capsys):
    mine = tmp_path / "mine"
    before = _user_folder(mine)

    argv = ["train", "scratch_mlp", "--preset", "smoke", "--data", str(image_folder), "--run-dir", str(mine)]
    assert run.main([*argv, "--overwrite"]) == 2
    assert "--overwrite replaces only what kerastune_flow wrote" in capsys.readouterr().err
    assert run.main(argv) == 2
    assert _snapshot(mine) == before


@pytest.mark.parametrize(
    "marker, kinds, match",
    [
        (rundir.EXPORT_JSON, ("run",), "holds an export, not a run"),
        ("search.json", ("run",), "holds a search, not a run"),
        (rundir.CONFIG_JSON, ("export",), "holds a run, not an export"),
        (rundir.RESULTS_JSON, ("run",), "finished run; pass --overwrite"),
    ],
)
def test_one_rule_for_every_output_folder(marker, kinds, match, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).write_text("{}")
    with pytest.raises(RunDirError, match=match):
        rundir.claim_dir(tmp_path / "out", kinds=kinds)


def test_new_empty_and_own_folders_are_taken(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    (tmp_path / "run" / rundir.BACKUP_DIR).mkdir(parents=True)
    (tmp_path / "compare" / "scratch").mkdir(parents=True)  # a comparison stopped before its report
    (tmp_path / "compare" / "scratch" / rundir.CONFIG_JSON).write_text("{}")
    (tmp_path / "lr").mkdir()
    (tmp_path / "lr" / "lr_find.json").write_text("{}")  # find-lr's folder: train may go on there

    assert rundir.claim_dir(tmp_path / "new") is None
    assert rundir.claim_dir(tmp_path / "empty") is None
    assert rundir.claim_dir(tmp_path / "run") == "run"
    assert rundir.claim_dir(tmp_path / "lr", kinds=rundir.RUN_KINDS) == "lr_find"
    assert rundir.claim_dir(tmp_path / "compare", kinds=("compare",)) == "compare"
    with pytest.raises(RunDirError, match="holds a comparison"):  # a parent of runs is no run
        rundir.claim_dir(tmp_path / "compare")


# --------------------------------------------------------------------------- modes and removals


def test_files_written_get_the_umasks_mode(tmp_path):
    previous = os.umask(0o022)
    try:
        rundir.atomic_write_json(tmp_path / rundir.RESULTS_JSON, {"a": 1})
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        rundir.atomic_save_model(model, tmp_path / rundir.BEST_MODEL)
    finally:
        os.umask(previous)
    assert oct(os.stat(tmp_path / rundir.RESULTS_JSON).st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / rundir.BEST_MODEL).st_mode & 0o777) == "0o644"


def test_replacing_a_finished_run_or_an_export_logs_what_is_removed(tmp_path, caplog):
    for name in (rundir.RESULTS_JSON, rundir.CONFIG_JSON):
        (tmp_path / name).write_text("{}")
    (tmp_path / "export-onnx").mkdir()
    (tmp_path / "export-onnx" / rundir.EXPORT_JSON).write_text("{}")
    new, out = tmp_path / "new", tmp_path / "out"
    for folder in (new, out):
        folder.mkdir()
        (folder / rundir.EXPORT_JSON).write_text("{}")

    with caplog.at_level("INFO"):
        rundir.clear_finished_run(tmp_path)
        export._move_into_place(new, out)

    assert f"Replacing the finished run in {tmp_path}: removing config.json, results.json, export-onnx" in caplog.text
    assert f"Replacing the export in {out}: removing its previous export.json" in caplog.text


# --------------------------------------------------------------------------- going on after an interrupt


def _interrupted(monkeypatch, seen: list) -> None:
    def stop(config, run_dir, **kwargs):
        seen.append(str(run_dir))
        raise RunInterrupted("SIGTERM")

    monkeypatch.setattr(run, "train_and_evaluate", stop)


def test_an_interrupt_prints_the_command_that_resumes_with_its_run_dir(image_folder, monkeypatch, capsys):
    seen: list[str] = []
    _interrupted(monkeypatch, seen)
    argv = ["train", "scratch_mlp", "--preset", "smoke", "--data", str(image_folder)]

    assert run.main(argv) == 143

    err = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(err.split("to resume: ", 1)[1])
    assert command == ["kerastune-flow", *argv, "--run-dir", seen[0]] and seen[0].startswith("runs/scratch_mlp-")

    assert run.main([*argv, "--run-dir", "my run"]) == 143  # typed: kept as typed, quoted
    assert capsys.readouterr().err.strip().endswith(shlex.join(["kerastune-flow", *argv, "--run-dir", "my run"]))


def test_the_same_command_without_run_dir_takes_up_its_unfinished_run(image_folder, monkeypatch, caplog):
    config = make_config("scratch_mlp", "smoke", data=str(image_folder))
    recorded = config.replace(steps_per_execution=16).to_dict()  # as a run records it: resolved
    older, newer, other = (Path("runs") / f"scratch_mlp-2026120{i}-000000" for i in (1, 2, 3))
    for folder, settings in ((older, recorded), (newer, recorded), (other, config.replace(epochs=9).to_dict())):
        (folder / rundir.BACKUP_DIR).mkdir(parents=True)
        (folder / rundir.CONFIG_JSON).write_text(json.dumps({"config": rundir.to_jsonable(settings)}))
    os.utime(older, (1, 1))
    seen: list[str] = []
    _interrupted(monkeypatch, seen)

    with caplog.at_level("INFO"):
        run.main(["train", "scratch_mlp", "--preset", "smoke", "--data", str(image_folder)])
        (newer / rundir.RESULTS_JSON).write_text("{}")  # finished since: not taken up again
        run.main(["train", "scratch_mlp", "--preset", "smoke", "--data", str(image_folder)])

    assert seen == [str(newer), str(older)]
    assert f"Resuming the unfinished run {newer}: same recipe and settings" in caplog.text
    assert not unfinished.same_run(other, config.to_dict())


def test_the_same_tune_command_without_run_dir_takes_up_its_unfinished_search(image_folder, monkeypatch, capsys):
    asked = tune.search_settings(
        "scratch_mlp", tuner="random", objective="val_accuracy", preset="smoke", space=None, data=str(image_folder)
    )
    search = Path("runs") / "tune-scratch_mlp-20261206-000000"
    search.mkdir(parents=True)
    (search / tune.SEARCH_JSON).write_text(json.dumps({**rundir.to_jsonable(asked), "trials_asked": 3}))
    seen: list[str] = []

    def stop(recipe, run_dir, **kwargs):
        seen.append(str(run_dir))
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "tune", stop)
    argv = ["tune", "scratch_mlp", "--tuner", "random", "--preset", "smoke", "--data", str(image_folder)]

    assert run.main([*argv, "--trials", "5"]) == 130  # a larger budget is the same search
    assert run.main([*argv, "--objective", "val_loss"]) == 130  # another search: a new folder

    assert seen[0] == str(search) and seen[1] != str(search)
    assert f"to resume: {shlex.join(['kerastune-flow', *argv, '--trials', '5', '--run-dir', str(search)])}" in (
        capsys.readouterr().err
    )
