"""The CLI: help that teaches, every sub-command end to end, user errors as one line and exit 2."""

import argparse
import json
import os
import re
import shlex
import subprocess

import pytest
from conftest import CHILD_PYTHONPATH, CLI, REPO

from kerastune_flow import config as config_lib
from kerastune_flow import run, rundir


def _cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": CHILD_PYTHONPATH}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _help(*argv, capsys):
    with pytest.raises(SystemExit) as info:
        run.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_teaches_the_commands_and_examples(capsys):
    top = _help(capsys=capsys)
    for word in ("train", "compare", "evaluate", "predict", "list", "examples:", "--data digits", "resume"):
        assert word in top
    train_help = _help("train", capsys=capsys)
    for flag in ("--batch-size", "--strategy", "--weights", "--unfreeze-at", "--head-epochs", "per replica"):
        assert flag in train_help
    assert "--train-fraction" in _help("compare", capsys=capsys)


def test_help_names_the_installed_command(capsys):
    top = _help(capsys=capsys)
    assert top.startswith("usage: kerastune-flow ")  # the console script pyproject.toml installs
    assert "python -m kerastune_flow.run` is the same command" in top
    assert "usage: kerastune-flow train " in _help("train", capsys=capsys)
    # the demo of --help is `make demo`'s: the same command and epochs
    demo = re.search(r"^  (kerastune-flow train cifar10_cnn --data digits .*)$", top, flags=re.M).group(1)
    makefile = (REPO / "Makefile").read_text()
    assert demo.split(" --run-dir")[0].replace("kerastune-flow ", "$(BIN)/kerastune-flow ") in makefile


def test_every_readme_command_line_parses():
    """The `kerastune-flow` lines of README's bash blocks parse (tests/test_installed.py runs them)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("kerastune-flow ")]
    assert len(lines) >= 9  # the installed demo and Deploy
    parser = run.build_parser()
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        if argv != ["--version"]:
            assert parser.parse_args(argv).command in run.COMMANDS, line


def test_version_names_the_package_keras_and_tensorflow(capsys):
    import keras
    import tensorflow as tf

    from kerastune_flow import __version__

    with pytest.raises(SystemExit) as info:
        run.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"kerastune-flow {__version__} (")
    assert f"keras {keras.__version__}" in out and f"tensorflow {tf.__version__}" in out


# Slow (6 s, a process of its own): test_bad_input's real-command test runs a bad folder through a process in the
# default suite, and its corpus the missing folder in-process.
@pytest.mark.slow
def test_a_missing_data_folder_is_one_line_and_exit_2():
    proc = _cli("train", "cifar10_cnn", "--data", "does/not/exist", "--run-dir", "r")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does/not/exist" in errors[0]


def test_list_names_every_recipe(capsys):
    assert run.main(["list"]) == 0
    out = capsys.readouterr().out
    for recipe in ("scratch_mlp", "cifar10_cnn", "vgg16_features", "vgg16_finetune"):
        assert recipe in out
    # The transfer recipes keep the articles' names; `list` says in one line that any backbone runs them.
    note = out.strip().splitlines()[-1]
    assert (
        note.startswith("vgg16_features, vgg16_finetune: named after") and "resnet50|mobilenetv2|efficientnetb0" in note
    )


def test_train_evaluate_predict(image_folder, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    code = run.main(
        ["train", "cifar10_cnn", "--data", str(image_folder), "--preset", "smoke", "--run-dir", run_dir, "--quiet"]
    )
    assert code == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["run_dir"] == run_dir and trained["epochs_run"] == 2

    assert run.main(["evaluate", run_dir, "--data", str(image_folder)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(trained["test"]["accuracy"], abs=1e-6)

    image = str(image_folder / "triangle" / "000.png")
    assert run.main(["predict", run_dir, image, "--json", "--top-k", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [p["class"] for p in rows[0]["predictions"]] != [] and len(rows[0]["predictions"]) == 3
    assert run.main(["predict", run_dir, image]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(image) and "triangle" in line


def test_flags_map_onto_the_config(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "scratch_mlp",
        "--data",
        str(image_folder),
        "--preset",
        "smoke",
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--learning-rate",
        "0.01",
        "--optimizer",
        "sgd",
        "--initializer",
        "he_normal",
        "--dropout",
        "0.1",
        "--l2",
        "0.001",
        "--image-size",
        "24x20",
        "--augment",
        "flip,zoom",
        "--no-early-stopping",
        "--seed",
        "3",
    ]
    assert run.main(argv) == 0
    meta = json.loads((run_dir / "config.json").read_text())
    cfg = meta["config"]
    assert cfg["train"]["epochs"] == 1 and cfg["data"]["batch_size"] == 4 and cfg["train"]["seed"] == 3
    assert cfg["model"]["optimizer"] == "sgd" and cfg["model"]["initializer"] == "he_normal"
    assert cfg["model"]["learning_rate"] == 0.01 and cfg["model"]["dropout"] == 0.1 and cfg["model"]["l2"] == 0.001
    assert cfg["data"]["augment"] == ["flip", "zoom"] and cfg["train"]["early_stopping"] is False
    assert meta["image_shape"] == [24, 20, 3]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "scratch_mlp", "--epochs", "0"], "epochs must be at least 1"),
        (["train", "scratch_mlp", "--learning-rate", "-1"], "learning_rate must be positive"),
        (["train", "scratch_mlp", "--augment", "blur"], "augment must be one of flip, rotation, zoom, crop"),
        (["predict", "only-one-path"], "at least one image"),
        (["evaluate", "no/such/run", "--data", "x"], "No model at"),
    ],
)
def test_user_errors_exit_2_with_one_sentence(argv, match, capsys):
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "resnet"], ["train", "scratch_mlp", "--image-size", "big"], ["fly"]])
def test_bad_flags_exit_2_from_argparse(argv, capsys):
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument ") and "--help" in err and len(err.strip().splitlines()) == 1


def test_a_finished_run_dir_is_refused(image_folder, tmp_path, capsys):
    argv = [
        "train",
        "scratch_mlp",
        "--data",
        str(image_folder),
        "--preset",
        "smoke",
        "--run-dir",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert run.main(argv) == 0
    capsys.readouterr()
    assert run.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite reaching the run is test_train's test_a_finished_run_is_not_overwritten_by_accident
    assert run.build_parser().parse_args([*argv, "--overwrite"]).overwrite


@pytest.mark.slow  # 6 s; test_installed runs the demo itself from the wheel, and the sample's loading is test_samples'
def test_the_demo_data_trains(tmp_path, capsys):
    """The digits shipped in the package, by name, through the demo's recipe (one epoch; `make demo` runs ten)."""
    argv = [
        "train",
        "cifar10_cnn",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--run-dir",
        str(tmp_path / "demo"),
        "--no-tensorboard",
    ]
    assert run.main(argv) == 0
    shown = capsys.readouterr()
    result = json.loads(shown.out)  # stdout holds only the result; progress goes to stderr
    assert result["test"]["accuracy"] > 0.5  # ten classes: chance is 0.1
    # 26 steps run 16 at a time (the CPU default): the bar counts 16 and 26, never past the epoch
    train = json.loads((tmp_path / "demo" / "config.json").read_text())["sizes"]["train"]
    total = -(-train // 64)
    assert total == 26 and train == 1618  # no validation held out: the reference CNN trains on all of train
    steps = [tuple(map(int, m)) for m in re.findall(r"(\d+)/(\d+) ", re.sub(r"\x1b\[[0-9;]*m", "", shown.err))]
    assert (16, total) in steps and (total, total) in steps and all(done <= total for done, total in steps)


def test_predict_with_stock_imagenet_vgg16_offline_is_one_sentence(monkeypatch, capsys):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    image = "digits/3/0000.png"  # an image of the sample shipped in the package
    assert run.main(["predict", "--weights", "imagenet", image]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vgg16_weights_tf_dim_ordering_tf_kernels.h5" in err
    assert "~/.keras/models/" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- flags generated from the config


def _flags(parser_name):
    sub = next(a for a in run.build_parser()._actions if a.dest == "command").choices[parser_name]
    return {a.dest: a for a in sub._actions if a.help != argparse.SUPPRESS}  # not a flag's former name


@pytest.mark.parametrize(
    "command, skip",
    [("train", ()), ("compare", (*run.COMPARE_OWN, "folds", "fold")), ("tune", ("fold",))],  # folds: tune's
)
def test_every_setting_has_one_flag_with_the_configs_help_and_choices(command, skip):
    flags = _flags(command)
    assert "verbose" not in flags  # a setting without a flag (--quiet sets it)
    for field in config_lib.fields():
        meta = field.metadata
        if meta["flag"] is None or field.name in skip:
            continue
        action = flags[field.name]
        assert action.default is None, field.name  # not given: the recipe's default applies
        assert meta["help"] in action.help, field.name
        if meta["store"] is not None:
            assert action.const == meta["store"] and action.const in meta["choices"], field.name
        elif isinstance(field.default, tuple):  # a comma list: its items are checked by the config
            assert ", ".join(meta["choices"] or ()) in action.help, field.name
        elif meta["choices"]:
            assert tuple(action.choices) == meta["choices"], field.name


def test_generated_flags_parse_into_config_values():
    parser = run.build_parser()
    args = parser.parse_args(
        ["train", "vgg16_finetune", "--image-size", "40x48", "--augment", "flip, crop", "--weights", "None"]
        + ["--unfreeze-at", "0.5", "--feature-cache", "off", "--mixed-precision", "--no-jsonl-log", "--skip-bad-images"]
        + ["--train-fraction", "0.5", "--finetune-learning-rate", "1e-4", "--steps-per-execution", "4"]
        + ["--cache", "off"]
    )
    assert run.config_overrides(args) == {
        "image_size": (40, 48),
        "augment": ("flip", "crop"),
        "weights": "none",
        "unfreeze_at": "0.5",
        "feature_cache": "off",
        "mixed_precision": "auto",
        "jsonl_log": False,
        "skip_bad_images": True,
        "train_fraction": 0.5,
        "finetune_learning_rate": 1e-4,
        "steps_per_execution": 4,
        "cache": "off",
    }


@pytest.mark.parametrize(
    "argv, old, new, field, value",
    [
        (["--finetune-lr", "1e-4"], "--finetune-lr", "--finetune-learning-rate", "finetune_learning_rate", 1e-4),
        (["--cache", "none"], "--cache none", "--cache off", "cache", "off"),
    ],
)
def test_a_former_name_still_works_hidden_with_one_deprecation_line(argv, old, new, field, value, caplog, capsys):
    with caplog.at_level("WARNING"):
        args = run.build_parser().parse_args(["train", "vgg16_finetune", *argv])
    assert getattr(args, field) == value
    assert [r.getMessage() for r in caplog.records] == [
        f"`{old}` is now `{new}`; the old name goes in the next release."
    ]
    shown = _help("train", capsys=capsys)
    assert "--finetune-learning-rate" in shown and "--finetune-lr" not in shown and "{auto,memory,off}" in shown


@pytest.mark.slow  # 11 s; the staged fine-tune itself runs in the default suite (tests/test_train.py)
def test_a_staged_fine_tune_with_a_cosine_schedule_runs_both_stages(image_folder, tmp_path, capsys):
    # Stage 2 used to get the progressive plan (a list) as its steps per epoch: "'>' not supported
    # between instances of 'list' and 'int'" after stage 1 had trained.
    argv = ["train", "vgg16_finetune", "--data", str(image_folder), "--weights", "none", "--image-size", "32"]
    argv += ["--head-epochs", "1", "--epochs", "2", "--lr-schedule", "cosine", "--no-early-stopping"]
    argv += [
        "--batch-size",
        "8",
        "--max-examples",
        "24",
        "--no-tensorboard",
        "--quiet",
        "--run-dir",
        str(tmp_path / "r"),
    ]

    assert run.main(argv) == 0, capsys.readouterr().err[-2000:]
    history = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in history] == ["head", "finetune", "finetune"]
    # Each stage's own cosine, logged at the end of each epoch: stage 1 from 1e-3 to 0 in its one
    # epoch, stage 2 from the fine-tune rate 1e-5, half-way (5e-6) after one of its two epochs.
    assert [r["learning_rate"] for r in history] == pytest.approx([0.0, 5e-6, 0.0], abs=1e-9)


def test_without_json_lines_the_results_still_count_the_epochs(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "r"
    argv = ["train", "scratch_mlp", "--data", str(image_folder), "--preset", "smoke", "--epochs", "3"]
    argv += ["--patience", "5", "--no-jsonl-log", "--quiet", "--run-dir", str(run_dir)]

    assert run.main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert not (run_dir / "history.jsonl").exists()
    assert (
        results["epochs_run"] == 3
        and results["examples_seen"] == 3 * json.loads((run_dir / "config.json").read_text())["sizes"]["train"]
    )
    history = rundir.read_history(run_dir)
    losses = [r["val_loss"] for r in history]
    assert results["best_epoch"] == losses.index(min(losses)) + 1
    assert (run_dir / "curves.png").stat().st_size > 10_000


# --------------------------------------------------------------------------- seeds and replays


# Slow (8-12 s): the default suite has the picked seed resumed (test_exact_resume) and a config replayed (test_tune).
@pytest.mark.slow
def test_a_run_without_a_seed_records_the_one_it_picked_and_config_replays_it(image_folder, tmp_path, capsys):
    small = ["--data", str(image_folder), "--image-size", "32", "--batch-size", "8", "--epochs", "2"]
    small += ["--no-tensorboard", "--quiet"]
    assert run.main(["train", "cifar10_cnn", *small, "--run-dir", str(tmp_path / "a")]) == 0
    first = json.loads(capsys.readouterr().out)
    recorded = json.loads((tmp_path / "a" / "config.json").read_text())["config"]["train"]["seed"]
    assert isinstance(recorded, int) and first["seed"] == recorded

    config = str(tmp_path / "a" / "config.json")
    assert run.main(["train", "cifar10_cnn", "--config", config, "--quiet", "--run-dir", str(tmp_path / "b")]) == 0
    replay = json.loads(capsys.readouterr().out)
    assert (replay["seed"], replay["weights_sha256"], replay["test"]) == (
        recorded,
        first["weights_sha256"],
        first["test"],
    )

    argv = ["train", "cifar10_cnn", "--config", config, "--epochs", "1", "--quiet", "--run-dir", str(tmp_path / "c")]
    assert run.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1  # a typed flag wins over the file


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("{not json", "is not readable JSON"),
        ('{"results": {}}', "holds no settings"),
        ('{"train": {"learning_rate": 0.1}}', "puts 'learning_rate' under 'train'; it belongs in 'model'"),
        ('{"model": {"nonsense": 1}}', "Unknown setting 'nonsense'"),
    ],
)
def test_a_config_file_that_cannot_be_used_is_one_sentence(content, match, tmp_path, capsys):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    assert run.main(["train", "cifar10_cnn", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1
