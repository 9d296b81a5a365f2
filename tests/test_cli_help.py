"""The command line's help: every flag of every sub-command says what it does and its default,
and `predict`'s usage reads as one model, then images (issue 26)."""

import argparse

import pytest

from kerastune_flow import run


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = run.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **subs.choices}


def _shown(default) -> list[str]:
    return [str(item) for item in default] if isinstance(default, tuple) else [str(default)]


@pytest.mark.parametrize("command", list(_commands()))
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{command} {name} has no help"
        takes_a_value = action.nargs != 0
        if action.option_strings and takes_a_value and action.default is not None:
            assert "default" in action.help, f"{command} {name}: {action.help!r} does not show its default"
            if not isinstance(action.default, tuple):
                assert any(s in action.help for s in _shown(action.default)), f"{command} {name}: {action.help!r}"


def test_the_help_of_evaluate_shows_each_default(capsys):
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch-size N images per batch (default: 64)" in out
    assert "--max-examples N at most N test images (default: all)" in out


def test_predicts_usage_is_one_model_then_images(capsys):
    with pytest.raises(SystemExit):
        run.build_parser().parse_args(["predict", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "predict [options] RUN_DIR_OR_MODEL IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...]" in usage
    assert "predict --weights imagenet [options] IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...]" in usage
    assert "[RUN_DIR_OR_MODEL" not in usage  # not read as repeated model/image pairs


def test_predict_takes_a_model_then_images_or_with_weights_images_only():
    parser = run.build_parser()
    args = parser.parse_args(["predict", "runs/demo", "a.png", "folder", "--top-k", "2"])
    assert (args.model, args.images, args.weights, args.top_k) == ("runs/demo", ["a.png", "folder"], None, 2)
    args = parser.parse_args(["predict", "--weights", "imagenet", "a.png", "b.png"])
    assert (args.weights, [args.model, *args.images]) == ("imagenet", ["a.png", "b.png"])
