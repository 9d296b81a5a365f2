"""Command line: `kerastune-flow {list,train,find-lr,compare,tune,evaluate,predict,export} ...`.

`kerastune-flow` is the console script the package installs; `python -m kerastune_flow.run` is the same.

The only module that prints; the parsers are in `cli/parser.py`. The flags of `train` and `compare` are
generated from the config's fields (`config.setting`), so a setting's name, help and choices
are written once. A user error ends with one sentence on stderr and exit code 2; an unexpected
error (a bug) with one line and exit code 1, and its traceback with KERASTUNE_FLOW_DEBUG=1;
Ctrl-C ends with exit code 130 and a resumable run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import sys

from kerastune_flow import config as config_lib
from kerastune_flow.cli.flags import config_overrides
from kerastune_flow.cli.parser import COMPARE_OWN, UsageError, build_parser
from kerastune_flow.config import BACKBONE_NAMES, ModelConfig
from kerastune_flow.deploy.export import export_model
from kerastune_flow.deploy.inference import evaluate_saved, predict_images
from kerastune_flow.errors import ConfigError, KerastuneFlowError
from kerastune_flow.models.hub import describe_families
from kerastune_flow.recipes import RECIPES, make_config
from kerastune_flow.rundir import unfinished
from kerastune_flow.runtime import logs, progress
from kerastune_flow.search.compare import compare
from kerastune_flow.search.tune import search_settings, tune
from kerastune_flow.search.tune_report import display_values, seeds_sentence
from kerastune_flow.training.lr_find import find_lr
from kerastune_flow.training.train import train_and_evaluate

__all__ = ["COMPARE_OWN", "build_parser", "config_overrides", "main"]

DEBUG_ENV = logs.DEBUG_ENV  # KERASTUNE_FLOW_DEBUG=1: tracebacks, and TensorFlow's lines as written


def _cmd_list(args: argparse.Namespace) -> int:
    for name, spec in RECIPES.items():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(
            f"{name:<16}{spec.description}\n{'':<16}defaults: {defaults}\n{'':<16}tune space: {', '.join(spec.space)}"
        )
    # The transfer recipes keep the names of the articles they reproduce, though any backbone runs them.
    transfer = ", ".join(name for name, spec in RECIPES.items() if spec.transfer)
    default = ModelConfig.backbone
    others = "|".join(name for name in BACKBONE_NAMES if name != default)
    print(f"\n--backbone also takes a KerasHub preset (hub:NAME, or a local preset folder) of:\n{describe_families()}")
    print(f"\n{transfer}: named after the {default.upper()} articles they follow; --backbone {others} runs them too")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = config_lib.load_config_file(args.config) if args.config else {}
    if overrides.pop("recipe", args.recipe) != args.recipe:
        logging.getLogger(__name__).info("Training %s with the settings of %s", args.recipe, args.config)
    overrides.update(config_overrides(args))
    if args.quiet:
        overrides["verbose"] = 0
    config = make_config(args.recipe, args.preset, **overrides)
    # Without --run-dir, the same command takes up its unfinished run (see `rundir/unfinished.py`).
    same = functools.partial(unfinished.same_run, config=config.to_dict())
    run_dir = args.run_dir = args.run_dir or str(unfinished.default_run_dir(f"{args.recipe}-", matches=same))
    # Progress bars and Keras' messages go to stderr, so stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        result = train_and_evaluate(config, run_dir, overwrite=args.overwrite)
    print(json.dumps({"run_dir": str(result.run_dir), **result.results}, indent=2))
    return 0


def _cmd_find_lr(args: argparse.Namespace) -> int:
    overrides = {**config_overrides(args), **({"verbose": 0} if args.quiet else {})}
    config = make_config(args.recipe, args.preset, **overrides)
    run_dir = args.run_dir = args.run_dir or str(unfinished.new_run_dir(f"find-lr-{args.recipe}-"))
    with contextlib.redirect_stdout(sys.stderr):
        record = find_lr(config, run_dir, stage=args.stage)
    shown = ("suggestion", "rule", "suggestions", "stage", "steps", "diverged", "json", "png")
    print(json.dumps({key: record[key] for key in shown}, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    run_dir = args.run_dir = args.run_dir or str(unfinished.new_run_dir("compare-"))
    with contextlib.redirect_stdout(sys.stderr):
        report = compare(
            args.data,
            run_dir,
            approaches=args.approaches,
            train_fractions=args.train_fraction,
            preset=args.preset,
            **config_overrides(args, skip=COMPARE_OWN),
            **({"verbose": 0} if args.quiet else {}),
        )
    print("\n".join(report["recommendation"]))
    print(f"report: {os.path.join(run_dir, 'report.html')}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.quiet:
        overrides["verbose"] = 0
    # Without --run-dir, the same command takes up its unfinished search (see `rundir/unfinished.py`).
    asked = search_settings(
        args.recipe, tuner=args.tuner, objective=args.objective, preset=args.preset, space=args.space, **overrides
    )
    same = functools.partial(unfinished.same_search, asked=asked)
    run_dir = args.run_dir = args.run_dir or str(unfinished.default_run_dir(f"tune-{args.recipe}-", matches=same))
    with contextlib.redirect_stdout(sys.stderr):
        summary = tune(
            args.recipe,
            run_dir,
            tuner=args.tuner,
            trials=args.trials,
            max_minutes=args.max_minutes,
            space=args.space,
            objective=args.objective,
            preset=args.preset,
            final_seeds=args.final_seeds,
            **overrides,
        )
    if "worker" in summary:
        print(f"worker {summary['worker']}: no trial left")
        return 0
    best, test = summary["best"], summary["test"]
    shown = display_values(best["hyperparameters"])  # 0.3, not 0.30000000000000004: tune.json keeps the exact value
    print(f"Best trial {best['trial']}: {summary['objective']} {best['objective']:.4f}, {shown}")
    print(f"Test accuracy {test['best']['accuracy']:.4f} (defaults {test['defaults']['accuracy']:.4f})")
    if "test_seeds" in summary:
        print(seeds_sentence(summary["test_seeds"]))
    print(f"best config: {best['config']}\nreport: {os.path.join(run_dir, 'report.html')}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):
        metrics = evaluate_saved(
            args.model,
            args.data,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            manual_dir=args.manual_dir,
            max_examples=args.max_examples,
            skip_bad_images=args.skip_bad_images,
            unsafe_deserialization=args.unsafe_deserialization,
        )
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.weights:  # no model: the first positional is an image too
        model, images = None, [args.model, *args.images]
    else:
        if not args.images:
            raise ConfigError(
                "predict needs a run directory (or .keras file) and at least one image, or --weights imagenet "
                f"and images. Received: {args.model}"
            )
        model, images = args.model, args.images
    with contextlib.redirect_stdout(sys.stderr):
        rows = predict_images(
            model,
            images,
            top_k=args.top_k,
            weights=args.weights,
            skip_bad_images=args.skip_bad_images,
            unsafe_deserialization=args.unsafe_deserialization,
        )
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))  # class names as typed
        return 0
    width = max(len(r["file"]) for r in rows)
    for r in rows:
        ranked = "  ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        print(f"{r['file']:<{width}}  {ranked}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # the converters print
        record = export_model(
            args.model,
            format=args.format,
            quantize=args.quantize,
            out=args.out,
            overwrite=args.overwrite,
            data=args.data,
            max_examples=args.max_examples,
            unsafe_deserialization=args.unsafe_deserialization,
        )
    shown = ("out", "format", "quantize", "size_bytes", "runtime", "parity")
    print(json.dumps({key: record[key] for key in shown}, indent=2))
    return 0


COMMANDS = {
    "list": _cmd_list,
    "train": _cmd_train,
    "find-lr": _cmd_find_lr,
    "compare": _cmd_compare,
    "tune": _cmd_tune,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "export": _cmd_export,
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _resume_hint(prog: str, argv: list[str], args: argparse.Namespace) -> str:
    """What to type to go on after an interrupt: the command as typed, with the folder it wrote."""
    run_dir = getattr(args, "run_dir", None)
    if not run_dir:
        return ""
    typed = any(arg == "--run-dir" or arg.startswith("--run-dir=") for arg in argv)
    command = shlex.join([prog, *argv, *([] if typed else ["--run-dir", run_dir])])
    verb = "run it again" if args.command == "find-lr" else "resume"
    return f": what was finished is kept in {run_dir}; to {verb}: {command}"


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code.

    0: done. 2: a user error (a bad flag, data, model file or run directory), told in one
    sentence on stderr. 1: an unexpected error, most likely a bug: one line, and the
    traceback with KERASTUNE_FLOW_DEBUG=1. 130 / 143: interrupted by SIGINT / SIGTERM.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    logs.log_to_stderr()  # before parsing: a flag's former name logs its deprecation as it is read
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    try:
        with progress.silenced(getattr(args, "quiet", False)):  # --quiet: no progress of any step, ours or Keras'
            return COMMANDS[args.command](args)
    except KerastuneFlowError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        # Not a user error that the package recognised: most likely a bug. One line by
        # default; the traceback on request, for the bug report.
        if logs.debugging():
            raise
        print(
            f"error: unexpected {type(error).__name__}: {_one_line(error)[:300]}; this is probably a bug in "
            f"kerastune_flow: rerun with {DEBUG_ENV}=1 to see the traceback and report it",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as error:
        name = getattr(error, "signal_name", "SIGINT")
        print(f"interrupted by {name}{_resume_hint(parser.prog, argv, args)}", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130


if __name__ == "__main__":
    sys.exit(main())
