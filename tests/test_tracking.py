"""`--track mlflow` against a real local MLflow store (sqlite, as MLflow's default): a run's parameters,
per-epoch metrics, results and files; a resumed run continuing its MLflow run; `tune` and `compare` as
parent runs with nested runs; a store that fails costing one warning, never the run; mlflow missing
costing one sentence. Skipped where mlflow is not installed (the `[track]` extra)."""

import logging
import shutil
import socket

import keras
import pytest
from conftest import add_callbacks, hide_modules, smoke

from kerastune_flow import run, rundir
from kerastune_flow.cli.parser import build_parser
from kerastune_flow.errors import MissingPackageError
from kerastune_flow.search import compare as compare_lib
from kerastune_flow.search import tune as tune_lib
from kerastune_flow.training import tracking, train

mlflow = pytest.importorskip("mlflow")

DIGITS = "digits"  # the sample shipped in the package
TINY = dict(data=DIGITS, preset="smoke", verbose=0)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow sqlite store with its tables made, once for the module (MLflow's migrations take seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A fresh store of the test's own, its URI; MLflow sends no telemetry from the tests."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    path = tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, path)
    return f"sqlite:///{path}"


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """A store in a folder: MLflow's file store, in maintenance but opened in milliseconds (a new sqlite
    store's migrations take seconds), for the default suite's run."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def _runs(uri, experiment):
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def _steps(client, run_id, key="loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_tracked_train_logs_its_params_epochs_results_and_files(file_store, tmp_path, monkeypatch, caplog):
    # No --tracking-uri: MLflow's own MLFLOW_TRACKING_URI decides the store.
    store = file_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    flags = ["--preset", "smoke", "--epochs", "2", "--patience", "5", "--track", "mlflow", "--quiet"]
    with caplog.at_level(logging.INFO, logger="kerastune_flow"):
        assert run.main(["train", "scratch_mlp", *flags, "--run-dir", str(tmp_path / "run")]) == 0
    runs = mlflow.search_runs(experiment_names=["scratch_mlp"], output_format="list")
    assert len(runs) == 1
    found = runs[0]
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    params = found.data.params
    assert params["model.recipe"] == "scratch_mlp" and params["data.image_size"] == "32,32"
    assert float(params["model.learning_rate"]) == 1e-3 and params["train.epochs"] == "2"
    assert not {"train.track", "train.tracking_uri"} & set(params)  # where it is recorded is not the run
    client = mlflow.MlflowClient()
    history = rundir.read_history(tmp_path / "run")
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "val_loss")] == [
        (r["epoch"], pytest.approx(r["val_loss"])) for r in history
    ]
    assert _steps(client, found.info.run_id, "learning_rate") == [0, 1]
    results = rundir.read_json(tmp_path / "run" / rundir.RESULTS_JSON)
    assert found.data.metrics["test_accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert found.data.metrics["best_epoch"] == results["best_epoch"]
    files = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert files == {"config.json", "results.json", "curves.png", "history.csv", "model.keras"}
    recorded = rundir.read_json(tmp_path / "run" / rundir.TRACKING_JSON)
    assert recorded == {"run_id": found.info.run_id, "experiment": "scratch_mlp", "tracking_uri": store}
    assert f"Tracking in MLflow: experiment scratch_mlp, new run {found.info.run_id}" in caplog.text


@pytest.mark.parametrize("command", ["train", "tune", "compare"])
def test_without_mlflow_the_tracking_flag_is_one_sentence_and_exit_2(command, tmp_path, monkeypatch, capsys):
    hide_modules(monkeypatch, ["mlflow"])
    args = {
        "train": ["train", "scratch_mlp"],
        "tune": ["tune", "scratch_mlp", "--trials", "1"],
        "compare": ["compare", "--data", DIGITS, "--approaches", "cnn"],
    }[command]
    code = run.main([*args, "--preset", "smoke", "--track", "mlflow", "--run-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'kerastune_flow[track]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything is written or trained
    with pytest.raises(MissingPackageError, match=r"kerastune_flow\[track\]"):
        tracking.require(smoke("scratch_mlp", DIGITS, track="mlflow"))
    tracking.require(smoke("scratch_mlp", DIGITS))  # off: mlflow is not needed


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is: nothing listens there


@pytest.mark.parametrize("where", ["server down", "unwritable"])
def test_a_store_that_fails_is_one_warning_and_no_tracker(where, tmp_path, caplog, monkeypatch, file_store):
    (tmp_path / "a_file").write_text("not a folder")
    uri = {
        "server down": f"http://127.0.0.1:{_closed_port()}",
        "unwritable": (tmp_path / "a_file" / "mlruns").as_uri(),  # under a file: even root cannot write there
    }[where]
    config = smoke("scratch_mlp", DIGITS, track="mlflow", tracking_uri=uri)
    (tmp_path / "run").mkdir()
    with caplog.at_level(logging.WARNING, logger="kerastune_flow"):
        tracker = tracking.start(config, tmp_path / "run", experiment="x", continue_run=False)
    assert not tracker.active
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("kerastune_flow")]
    assert len(ours) == 1 and "MLflow tracking is off for this run" in ours[0] and uri in ours[0]
    assert not (tmp_path / "run" / rundir.TRACKING_JSON).exists()


def test_a_store_that_fails_during_the_run_warns_once_and_stops_tracking(caplog):
    class Broken:
        calls = 0

        def log_batch(self, *args, **kwargs):
            Broken.calls += 1
            raise OSError("disk full")

    tracker = tracking.Tracker(Broken(), "run-id", "sqlite:///somewhere.db", "x")
    with caplog.at_level(logging.WARNING, logger="kerastune_flow"):
        for epoch in range(3):
            tracker.log_metrics({"loss": 1.0}, step=epoch)
        tracker.end("FINISHED")
    assert Broken.calls == 1 and not tracker.active
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("kerastune_flow")]
    assert len(ours) == 1 and "the run goes on untracked" in ours[0]


def test_params_are_the_config_flattened_and_cut_to_mlflows_longest_value():
    config = smoke("vgg16_finetune", DIGITS, augment=("flip", "crop"), track="mlflow", tracking_uri="sqlite:///x.db")
    params = tracking.config_params(config)
    assert params["data.augment"] == "flip,crop" and params["model.backbone"] == "vgg16"
    assert params["train.seed"] == "0" and "train.track" not in params and "train.tracking_uri" not in params
    long = tracking.param_value("x" * 10_000)
    assert len(long) == tracking.MAX_PARAM_LENGTH and long.endswith("...")


def test_the_tracking_flags_are_on_train_tune_and_compare_only():
    parser = build_parser()
    subs = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices
    for command in ("train", "tune", "compare"):
        text = subs[command].format_help()
        assert "--track {off,mlflow}" in text and "--tracking-uri URI" in text
    assert "--track" not in subs["find-lr"].format_help()
    args = parser.parse_args(["train", "scratch_mlp", "--track", "mlflow", "--tracking-uri", "sqlite:///a.db"])
    assert (args.track, args.tracking_uri) == ("mlflow", "sqlite:///a.db")


def test_a_parent_run_is_continued_from_its_folder_and_nests_the_runs_opened_in_it(file_store, tmp_path):
    config = smoke("scratch_mlp", DIGITS, track="mlflow", tracking_uri=file_store)
    folder = tmp_path / "search"
    (folder / "trials" / "000").mkdir(parents=True)
    with tracking.parent_run(config, folder, experiment="searches", params={"tuner": "random", "track": "mlflow"}) as p:
        child = tracking.start(config, folder / "trials" / "000", experiment="ignored", continue_run=False)
        child.end("FINISHED")
    client, runs = _runs(file_store, "searches")  # a nested run goes to its parent's experiment
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"search", "trials/000"} and by_name["search"].info.status == "FINISHED"
    assert by_name["trials/000"].data.tags["mlflow.parentRunId"] == p.run_id
    assert by_name["search"].data.params == {"tuner": "random"}  # the tracking settings are no parameter
    with tracking.parent_run(config, folder, experiment="searches", params={"tuner": "random"}) as again:
        assert again.run_id == p.run_id  # the same command continues its parent run
    # A distributed search's worker joins the parent the chief recorded, neither starting nor ending it.
    (folder / "trials" / "001").mkdir()
    with tracking.parent_run(config, folder, experiment="searches", params={}, join=True) as worker:
        assert not worker.active
        child = tracking.start(config, folder / "trials" / "001", experiment="ignored", continue_run=False)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == p.run_id
    with tracking.parent_run(config, folder, experiment="searches", params={}, continue_run=False) as other:
        assert other.run_id != p.run_id  # a comparison run again after it finished: a new parent run


def test_the_mlflow_run_file_is_the_packages_own(tmp_path):
    run_dir = tmp_path / "cmp" / "cnn"
    run_dir.mkdir(parents=True)
    for name in (rundir.CONFIG_JSON, rundir.RESULTS_JSON, rundir.TRACKING_JSON):
        rundir.atomic_write_json(run_dir / name, {})
    rundir.atomic_write_json(tmp_path / "cmp" / rundir.TRACKING_JSON, {})
    # A comparison stopped before its report: its approaches' runs and its own MLflow run.
    assert rundir.folder_kind(tmp_path / "cmp") == "compare"
    rundir.clear_finished_run(run_dir)  # --overwrite: the new run gets a new MLflow run
    assert not (run_dir / rundir.TRACKING_JSON).exists()


# --------------------------------------------------------------------------- slow: whole runs, searches, comparisons


class _KillAt(keras.callbacks.Callback):
    """A kill (KeyboardInterrupt) as epoch `epoch` ends, once: after its backup, before MLflow has it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.fired = epoch, False

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def _check_a_killed_and_resumed_run_continues_the_same_mlflow_run(store, tmp_path, monkeypatch):
    config = smoke("scratch_mlp", DIGITS, epochs=3, patience=5, track="mlflow", tracking_uri=store, verbose=0)
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        add_callbacks(patched, _KillAt(1))
        train.train_and_evaluate(config, tmp_path / "run")
    run_id = rundir.read_json(tmp_path / "run" / rundir.TRACKING_JSON)["run_id"]
    client, runs = _runs(store, "scratch_mlp")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert _steps(client, run_id) == [0]  # epoch 1 was backed up, not yet logged, when the kill came
    result = train.train_and_evaluate(config, tmp_path / "run")
    assert result.results["resumed"]
    client, runs = _runs(store, "scratch_mlp")
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert sorted(_steps(client, run_id)) == [0, 1, 2]  # each epoch once: the missed one logged at the end


@pytest.mark.slow
def test_a_run_whose_store_fails_finishes_untracked(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"http://127.0.0.1:{_closed_port()}"
    config = smoke("scratch_mlp", DIGITS, epochs=1, track="mlflow", tracking_uri=uri, verbose=0)
    with caplog.at_level(logging.WARNING, logger="kerastune_flow"):
        result = train.train_and_evaluate(config, tmp_path / "run")
    assert result.results["test"]["accuracy"] >= 0 and (tmp_path / "run" / rundir.RESULTS_JSON).exists()
    said = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        f"MLflow tracking is off for this run: the store {uri} does not answer"
    )
    assert not (tmp_path / "run" / rundir.TRACKING_JSON).exists()


class _Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(epoch)


def _check_a_tracked_search_is_a_parent_run_with_a_nested_run_per_trial(store, tmp_path):
    epochs = _Epochs()  # the user's own callback reaches every trial too
    summary = tune_lib.tune(
        "scratch_mlp",
        tmp_path / "search",
        trials=3,
        epochs=1,
        track="mlflow",
        tracking_uri=store,
        callbacks=[epochs],
        final_seeds=1,  # no runs after the trials: one nested run per trial
        **TINY,
    )
    assert epochs.seen == [0, 0, 0]
    client, runs = _runs(store, "scratch_mlp")
    runs = [r for r in runs if r.info.run_name != "run"]  # the killed and resumed run of the same recipe
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["tuner"] == "bayesian"
    assert parent.data.tags["best_trial"] == summary["best"]["trial"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(summary["best"]["objective"])
    trials = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in trials] == ["trials/000", "trials/001", "trials/002"]
    for found, trial in zip(trials, summary["trials"], strict=True):
        assert found.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert found.data.metrics["best_val_accuracy"] == pytest.approx(trial["objective"])
        assert float(found.data.params["hp.learning_rate"]) == pytest.approx(trial["hyperparameters"]["learning_rate"])
        assert _steps(client, found.info.run_id) == [0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "tune.json",
        "best_config.json",
        "report.html",
    }


def _check_a_tracked_comparison_is_a_parent_run_with_a_nested_run_per_approach(
    store, tmp_path, base_model, image_folder
):
    epochs = _Epochs()  # the user's own callback reaches every approach too
    report = compare_lib.compare(
        str(image_folder),
        tmp_path / "cmp",
        approaches=("cnn", "features"),
        preset="smoke",
        epochs=1,
        base=str(base_model),
        base_output="dense",
        track="mlflow",
        tracking_uri=store,
        callbacks=[epochs],
    )
    assert epochs.seen == [0, 0]
    client, runs = _runs(store, "compare")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    nested = {r.info.run_name: r for r in runs if r is not parent}
    assert set(nested) == {"cnn", "features"} and len(runs) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in nested.values())
    assert nested["features"].data.params["model.recipe"] == "vgg16_features"
    for result in report["results"]:
        name = result["approach"]
        assert parent.data.metrics[f"{name}.test_accuracy"] == pytest.approx(result["test_accuracy"])
        assert nested[name].data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert parent.data.params["approaches"] == "cnn,features"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"report.html", "results.json"}


@pytest.mark.slow
def test_a_train_a_search_and_a_comparison_are_tracked_in_one_store(
    store, tmp_path, monkeypatch, base_model, image_folder
):
    """Issue 28's check: a killed and resumed `train`, a 3-trial `tune` and a `compare`, each tracked in
    the same local store, then read back together through `mlflow.search_runs`."""
    _check_a_killed_and_resumed_run_continues_the_same_mlflow_run(store, tmp_path, monkeypatch)
    _check_a_tracked_search_is_a_parent_run_with_a_nested_run_per_trial(store, tmp_path)
    _check_a_tracked_comparison_is_a_parent_run_with_a_nested_run_per_approach(
        store, tmp_path, base_model, image_folder
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    found = mlflow.search_runs(search_all_experiments=True)
    names = dict(zip(found["run_id"], found["tags.mlflow.runName"], strict=True))
    nested = found["tags.mlflow.parentRunId"].map(names.get, na_action="ignore")
    assert sorted(found["tags.mlflow.runName"]) == sorted(
        ["run", "search", "trials/000", "trials/001", "trials/002", "cmp", "cnn", "features"]
    )
    assert sorted(nested.dropna()) == ["cmp", "cmp", "search", "search", "search"]
    assert (found["status"] == "FINISHED").all()
    assert found["params.model.recipe"].notna().sum() >= 6  # every run that trained logged its config
