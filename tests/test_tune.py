"""`tune` on tiny data: KerasTuner drives the search, each trial is one whole run, the test split is
looked at once after the search, the best replays with `train --config`, and the files and the
report are there and agree with the trials."""

import json
import shutil
from html.parser import HTMLParser

import browser_check
import keras_tuner as kt
import pytest
from conftest import REPO, package_log_lines
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_tune_hparams import read_view

from kerastune_flow import config as config_lib
from kerastune_flow import data as data_lib
from kerastune_flow import run, rundir
from kerastune_flow.data.samples import sample_folder
from kerastune_flow.deploy import inference
from kerastune_flow.errors import ConfigError, DataError
from kerastune_flow.recipes import get_recipe, make_config
from kerastune_flow.reports import plots
from kerastune_flow.runtime import process
from kerastune_flow.search import tune as tune_lib
from kerastune_flow.search import tune_final, tune_hparams, tune_report, tune_space, tuner

DIGITS = str(sample_folder("digits"))  # the sample shipped in the package
SCREENSHOTS = REPO / "runs" / "screenshots"  # git-ignored, kept for a person
# One final seed: the best and the defaults on test as the search's own runs (test_folds.py trains more seeds).
TINY = dict(data=DIGITS, preset="smoke", epochs=2, verbose=0, final_seeds=1)


@pytest.fixture(scope="module")
def search_log():
    """The lines the search of `search` logged."""
    return []


@pytest.fixture(scope="module")
def search(tmp_path_factory, search_log):
    """One Bayesian search of three trials on the shipped digits, for the module."""
    run_dir = tmp_path_factory.mktemp("tune") / "search"
    evaluated = []
    original = inference.evaluate_saved

    def counting(path, *args, **kwargs):
        evaluated.append(str(path))
        return original(path, *args, **kwargs)

    with package_log_lines() as lines, pytest.MonkeyPatch.context() as m:
        m.setattr(inference, "evaluate_saved", counting)
        summary = tune_lib.tune("scratch_mlp", run_dir, trials=3, **TINY)
    search_log.extend(lines)
    return run_dir, summary, evaluated


def test_every_trial_is_a_whole_run_chosen_by_validation(search):
    run_dir, summary, evaluated = search
    trials = summary["trials"]
    assert [t["trial"] for t in trials] == ["0", "1", "2"]
    assert all(t["status"] == "COMPLETED" for t in trials)
    for t in trials:
        results = rundir.read_json(run_dir / "trials" / f"{int(t['trial']):03d}" / rundir.RESULTS_JSON)
        assert results["test"] is None  # the test split is never looked at during the search
        history = rundir.read_history(t["run_dir"])
        assert t["objective"] == max(r["val_accuracy"] for r in history)
        assert t["epochs_run"] == len(history) and t["best_epoch"] == results["best_epoch"]
        assert set(t["hyperparameters"]) == set(get_recipe("scratch_mlp").space)
    # The first trial is the recipe's defaults, and it is the defaults' run on the test split.
    assert trials[0]["hyperparameters"] == dict(
        learning_rate=1e-3, dropout=0.0, l2=0.0, optimizer="adam", initializer="glorot_uniform"
    )
    assert summary["defaults"]["run_dir"] == trials[0]["run_dir"]
    assert len({json.dumps(t["hyperparameters"], sort_keys=True) for t in trials}) == 3
    best = max(trials, key=lambda t: t["objective"])
    assert summary["best"]["trial"] == best["trial"] and summary["best"]["objective"] == best["objective"]
    # The test split: once for the best, once for the defaults, after the search.
    assert sorted(evaluated) == sorted([best["run_dir"], trials[0]["run_dir"]])
    assert summary["test"]["best"]["examples"] == summary["test"]["defaults"]["examples"] > 0
    assert rundir.read_json(run_dir / tune_report.TUNE_JSON) == rundir.to_jsonable(summary)


def test_train_with_the_best_config_replays_the_best_trial(search, tmp_path, capsys):
    run_dir, summary, _ = search
    assert (
        run.main(["train", "scratch_mlp", "--config", str(run_dir / "best_config.json"), "--run-dir", str(tmp_path)])
        == 0
    )
    replay = json.loads(capsys.readouterr().out)
    best = rundir.read_json(run_dir / "trials" / f"{int(summary['best']['trial']):03d}" / rundir.RESULTS_JSON)
    assert replay["weights_sha256"] == best["weights_sha256"]
    values = config_lib.load_config_file(run_dir / "best_config.json")
    for name, value in summary["best"]["hyperparameters"].items():
        assert values[tune_space.KNOBS[name].field] == value


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images = 0, []

    def handle_starttag(self, tag, attrs):
        self.rows += tag == "tr"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_the_report_shows_the_trials_sorted_and_the_plots(search):
    run_dir, summary, _ = search
    markdown = (run_dir / "report.md").read_text()
    order = [
        line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ") and "---" not in line
    ]
    objectives = {t["trial"]: t["objective"] for t in summary["trials"]}
    ranked = order[1:]  # after the header
    assert [objectives[t] for t in ranked] == sorted(objectives.values(), reverse=True)
    assert "--config" in markdown and "tuned against" in markdown
    page = _Page()
    page.feed((run_dir / "report.html").read_text())
    assert page.rows == 1 + len(summary["trials"])
    assert len(page.images) == 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    for name in ("objective_over_trials.png", "hyperparameters.png", "best_vs_defaults.png"):
        assert (run_dir / name).stat().st_size > 1000


def test_a_finished_search_run_again_trains_nothing(search, monkeypatch):
    run_dir, summary, _ = search
    for module in (tune_final, tuner):  # the trials' runs, and the runs after the search
        monkeypatch.setattr(module, "train_and_evaluate", lambda *a, **k: pytest.fail("trained again"))
    again = tune_lib.tune("scratch_mlp", run_dir, trials=3, **TINY)
    assert again["trials"] == summary["trials"] and again["best"] == summary["best"]


def test_each_trial_is_in_tensorboards_hparams_view(search):
    run_dir, summary, _ = search
    experiment, runs = read_view(run_dir / tune_hparams.TENSORBOARD_DIR)
    assert [h["name"] for h in experiment["hparamInfos"]] == summary["space"]
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["val_accuracy", "val_loss"]
    assert sorted(runs) == [tune_hparams.trial_folder_name(t["trial"]) for t in summary["trials"]]
    for t in summary["trials"]:
        run = runs[tune_hparams.trial_folder_name(t["trial"])]
        assert run["hparams"] == t["hyperparameters"]
        assert run["metrics"]["val_accuracy"][1] == pytest.approx(t["objective"])


def test_a_search_that_cannot_start_writes_nothing(tmp_path):
    with pytest.raises(Exception, match="/no/such/folder"):
        tune_lib.tune("scratch_mlp", tmp_path / "t", trials=2, **{**TINY, "data": "/no/such/folder"})
    assert not (tmp_path / "t").exists()


def test_a_resumed_search_must_be_the_same_search(search):
    run_dir, _, _ = search
    with pytest.raises(ConfigError, match="other settings.*dropout"):
        tune_lib.tune("scratch_mlp", run_dir, trials=3, dropout=0.2, **TINY)


def test_the_fine_tune_searches_its_rates_and_unfreeze_points_below_the_heads():
    recipe = get_recipe("vgg16_finetune")
    knobs = tune_space.resolve_space(recipe, None)
    assert [k.name for k in knobs] == list(recipe.space)
    config = make_config("vgg16_finetune", "smoke")
    assert tune_space.unfreeze_choices(config) == ["block3_conv1", "block4_conv1", "block5_conv1"]
    hp = tune_space.SearchSpace(knobs, config, tune_space.unfreeze_choices(config))
    values = kt.HyperParameters()
    hp.build(values)
    finetune, head = values._hps["finetune_learning_rate"][0], values._hps["learning_rate"][0]
    assert finetune.max_value <= head.min_value  # every fine-tune rate lies below every head rate
    assert values.get("unfreeze_at") == "block5_conv1"  # the default: the recipe's own boundary


@pytest.mark.parametrize(
    "space, fixed, match",
    [
        (("finetune_learning_rate",), (), "scratch_mlp has no tuning knob 'finetune_learning_rate'"),
        (("magic",), (), "--space takes a comma list of learning_rate"),
        (("dropout",), ("dropout",), "nothing to search"),
    ],
)
def test_space_errors_name_the_knobs(space, fixed, match):
    with pytest.raises(ConfigError, match=match):
        tune_space.resolve_space(get_recipe("scratch_mlp"), space, fixed=fixed)


def test_the_old_knob_name_finetune_lr_is_read_as_finetune_learning_rate_with_one_deprecation_line(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="kerastune_flow"), pytest.raises(Exception, match="/no/such/folder"):
        tune_lib.tune("vgg16_finetune", tmp_path / "t", space=("finetune_lr",), **{**TINY, "data": "/no/such/folder"})
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "`--space finetune_lr` is now `--space finetune_learning_rate`; the old name goes in the next release."
    ]
    assert tune_space.current_knob_names(("finetune_lr", "dropout")) == ["finetune_learning_rate", "dropout"]
    assert "finetune_lr" not in tune_space.KNOBS  # hidden: --help and the errors name the new knob only
    # A search started with the old name is the same search as with the new one (search.json's settings).
    same = dict(tuner="random", objective="val_accuracy", preset="smoke")
    assert tune_lib.search_settings("vgg16_finetune", space=("finetune_lr",), **same) == tune_lib.search_settings(
        "vgg16_finetune", space=("finetune_learning_rate",), **same
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--space", "magic"], "has no tuning knob 'magic'"),
        (["--validation-fraction", "0"], "--validation-fraction must be above 0"),
        (["--tuner", "grid"], "invalid choice"),
        (["--trials", "0"], "must be positive"),
        (["--data", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_bad_tune_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    argv = ["tune", "scratch_mlp", "--data", DIGITS, "--preset", "smoke", "--run-dir", str(tmp_path / "t"), *flags]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_the_report_renders_in_a_browser(search):
    if browser_check.missing():
        pytest.skip(browser_check.missing())
    run_dir, summary, _ = search
    page = browser_check.check_page(run_dir / "report.html", screenshot=run_dir / "tune_report.png")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(page.screenshot, SCREENSHOTS / "tune_report.png")  # for a person to look at
    assert not page.problems(), page.problems()
    assert page.tables == 1 and page.title == "kerastune_flow: Tuning scratch_mlp"
    assert len(page.images) == 3 and all(width > 0 for _, _, width in page.images), page.images
    assert page.overflow_px == 0


# Slow (15-21 s): the default suite searches the MLP (the module's search) and unit-tests the fine-tune's space.
@pytest.mark.slow
def test_both_stages_of_a_fine_tune_are_one_trial(image_folder, base_model, tmp_path):
    summary = tune_lib.tune(
        "vgg16_finetune",
        tmp_path / "search",
        tuner="random",
        trials=2,
        space=("finetune_learning_rate", "unfreeze_at"),
        data=str(image_folder),
        preset="smoke",
        base=str(base_model),
        base_output="dense",
        head_epochs=1,
        epochs=1,
        verbose=0,
        final_seeds=1,
    )
    choices = tune_space.unfreeze_choices(
        make_config("vgg16_finetune", "smoke", base=str(base_model), base_output="dense")
    )
    for trial in summary["trials"]:
        history = rundir.read_history(trial["run_dir"])
        assert [r["stage"] for r in history] == ["head", "finetune"]
        assert history[1]["learning_rate"] == pytest.approx(trial["hyperparameters"]["finetune_learning_rate"])
        assert trial["hyperparameters"]["unfreeze_at"] in choices
        ran = rundir.read_json(f"{trial['run_dir']}/config.json")["unfreeze"][0]["layer"]
        assert ran == trial["hyperparameters"]["unfreeze_at"]


@pytest.mark.slow  # a third oracle; the default suite searches with the Bayesian one
def test_hyperband_gives_each_trial_its_epochs_and_trains_the_defaults_apart(tmp_path):
    summary = tune_lib.tune("scratch_mlp", tmp_path / "search", tuner="hyperband", trials=2, **{**TINY, "epochs": 2})
    assert len(summary["trials"]) == 2 and all(t["status"] == "COMPLETED" for t in summary["trials"])
    assert all(1 <= t["epochs_run"] <= 2 for t in summary["trials"])  # Hyperband's budget, at most --epochs
    assert summary["defaults"]["run_dir"] == str(tmp_path / "search" / "defaults")  # no trial is the defaults
    assert (tmp_path / "search" / "defaults" / rundir.RESULTS_JSON).exists()


# Slow (7-13 s): the default suite checks the line that tells the budget left (trial_line).
@pytest.mark.slow
def test_the_time_budget_stops_the_next_trial_and_the_report_says_so(tmp_path):
    summary = tune_lib.tune("scratch_mlp", tmp_path / "search", trials=5, max_minutes=0.001, **{**TINY, "epochs": 1})
    assert [t["trial"] for t in summary["trials"]] == ["0"]  # the first always runs; then the time is spent
    assert summary["seconds"] > 0.06 and summary["max_minutes"] == 0.001
    assert "0.001 minutes allowed" in (tmp_path / "search" / "report.md").read_text()


def test_a_user_error_in_a_trial_stops_the_search_with_it_instead_of_retrying(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise DataError("the images went away")

    monkeypatch.setattr(tuner, "train_and_evaluate", failing)
    with pytest.raises(DataError, match="the images went away"):
        tune_lib.tune("scratch_mlp", tmp_path / "t", trials=3, **TINY)
    assert len(calls) == 1  # KerasTuner would retry, then fail three times with a RuntimeError
    with pytest.raises(ConfigError, match="log no 'val_accuracy'"):
        tuner.objective_value([{"accuracy": 0.5}], "val_accuracy")


# --------------------------------------------------------------------------- what a newcomer reads


def test_each_trial_line_says_its_objective_the_best_so_far_and_its_training_time(search, search_log):
    _, summary, _ = search
    lines = [line for line in search_log if line.startswith("Trial ")]
    assert len(lines) == len(summary["trials"]) == 3
    best = None
    for line, t in zip(lines, summary["trials"], strict=True):
        assert line.startswith(f"Trial {t['trial']}: ") and f"-> val_accuracy {t['objective']:.4f}, " in line
        if best is None:
            assert "best so far (the first result)" in line
        elif t["objective"] > best["objective"]:
            assert f"new best (was {best['objective']:.4f}, trial {best['trial']})" in line
        else:
            assert f"best so far {best['objective']:.4f} (trial {best['trial']})" in line
        if best is None or t["objective"] > best["objective"]:
            best = t
        # The log's training time is tune.json's and the report's; the wall time beside it is the trial's.
        assert line.endswith(f", training {t['seconds']:.1f} s")
    assert "| training s |" in (search[0] / "report.md").read_text()


def test_a_lower_loss_is_the_new_best_and_the_budget_left_is_told():
    line = tune_report.trial_line(
        "3", {"dropout": 0.30000000000000004}, "val_loss", 0.25, best=("1", 0.31), seconds=6.31, train_seconds=4.35
    )
    assert line == "Trial 3: dropout=0.3 -> val_loss 0.2500, new best (was 0.3100, trial 1); 6.3 s, training 4.3 s"
    line = tune_report.trial_line("4", {}, "val_loss", 0.4, best=("3", 0.25), seconds=5.0, minutes_left=2.04)
    assert line.endswith("-> val_loss 0.4000, best so far 0.2500 (trial 3); 5.0 s; 2.0 min left")


def test_hyperparameters_are_shown_rounded_and_kept_exact_in_the_files(tmp_path, capsys, monkeypatch):
    exact = {"learning_rate": 0.0015848931924611134, "dropout": 0.30000000000000004, "optimizer": "adam"}
    test = {"accuracy": 0.9, "examples": 10}
    summary = dict(objective="val_accuracy", test={"best": test, "defaults": test})
    summary["best"] = dict(trial="2", objective=0.95, hyperparameters=exact, config=str(tmp_path / "best_config.json"))
    monkeypatch.setattr(run, "tune", lambda *args, **kwargs: summary)
    assert run.main(["tune", "scratch_mlp", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Best trial 2: val_accuracy 0.9500, learning_rate=0.00158, dropout=0.3, optimizer=adam" in out
    assert "0.30000000000000004" not in out
    assert tune_report.display_values(exact) == "learning_rate=0.00158, dropout=0.3, optimizer=adam"


def test_the_best_against_the_defaults_is_zoomed_to_the_values_with_the_labels_inside():
    for defaults, tuned in ((97.5, 98.5), (99.4, 100.0), (92.18, 92.18)):
        figure = plots.plot_best_vs_defaults(defaults, tuned).figure
        FigureCanvasAgg(figure).draw()
        ax = figure.axes[0]
        low, high = ax.get_ylim()
        assert 0 < low < min(defaults, tuned) and max(defaults, tuned) < high and high - low < 10
        frame = ax.get_window_extent()
        labels = [t for t in ax.texts if t.get_text().endswith(" %")]
        assert [t.get_text() for t in labels] == [f"{defaults:.2f} %", f"{tuned:.2f} %"]
        for text in labels:  # each value on its bar, inside the frame
            box = text.get_window_extent()
            assert frame.y0 < box.y0 and box.y1 < frame.y1
        assert f"{tuned - defaults:+.2f} points" in ax.get_title()


def test_the_search_sets_the_threads_before_it_reads_the_data(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(process, "prepare_process", lambda *a, **k: calls.append("prepare_process"))

    def load_splits(*args, **kwargs):
        calls.append("load_splits")
        raise DataError("stop here")

    monkeypatch.setattr(data_lib, "load_splits", load_splits)
    with pytest.raises(DataError, match="stop here"):
        tune_lib.tune("scratch_mlp", tmp_path / "t", trials=2, **TINY)
    assert calls == ["prepare_process", "load_splits"]
