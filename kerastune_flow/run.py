"""Command line: `kerastune-flow {list,train,find-lr,compare,tune,evaluate,predict,export} ...`.

`kerastune-flow` is the console script the package installs; `python -m kerastune_flow.run` is the same.

The only module that parses arguments or prints. The flags of `train` and `compare` are
generated from the config's fields (`config.setting`), so a setting's name, help and choices
are written once. A user error ends with one sentence on stderr and exit code 2; an unexpected
error (a bug) with one line and exit code 1, and its traceback with KERASTUNE_FLOW_DEBUG=1;
Ctrl-C ends with exit code 130 and a resumable run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import sys

import keras
import tensorflow as tf

from kerastune_flow import config as config_lib
from kerastune_flow import unfinished
from kerastune_flow.cli.model_commands import add_model_commands
from kerastune_flow.config import PRESETS
from kerastune_flow.deploy.export import export_model
from kerastune_flow.deploy.inference import evaluate_saved, predict_images
from kerastune_flow.errors import ConfigError, KerastuneFlowError
from kerastune_flow.flags import add_config_flags, config_overrides, show_defaults, text_type
from kerastune_flow.recipes import RECIPES, make_config
from kerastune_flow.runtime import logs, progress
from kerastune_flow.search.compare import APPROACHES, compare
from kerastune_flow.search.tune import DEFAULT_TRIALS, OBJECTIVES, TUNERS, search_settings, tune
from kerastune_flow.search.tune_report import display_values
from kerastune_flow.search.tune_space import KNOBS
from kerastune_flow.training.lr_find import STAGES, find_lr
from kerastune_flow.training.train import train_and_evaluate

EXAMPLES = """\
examples:
  # the demo (`make demo`): a CNN on the digits that ship in the package (about a minute on 2 CPU cores)
  kerastune-flow train cifar10_cnn --data digits --epochs 10 --run-dir runs/demo

  # the reference examples (tfds downloads; --manual-dir uses local archives instead)
  kerastune-flow train scratch_mlp --data mnist
  kerastune-flow train cifar10_cnn --data cifar10

  # transfer learning on your own image folder (one sub-folder per class)
  kerastune-flow train vgg16_features --data ~/cats_vs_dogs --image-size 150
  kerastune-flow train vgg16_finetune --data ~/cats_vs_dogs --head-epochs 5 --epochs 10
  kerastune-flow train vgg16_finetune --data ~/flowers --backbone mobilenetv2 --image-size 160

  # full training, then fine-tune your own model on a new task (cut before its old head)
  kerastune-flow train cifar10_cnn --data cifar10 --run-dir runs/cnn
  kerastune-flow train vgg16_finetune --data ~/cats_vs_dogs --base runs/cnn --base-output dense

  # afterwards
  kerastune-flow evaluate runs/demo --data digits
  kerastune-flow predict runs/demo digits/7 --top-k 3   # digits/7: the sample's class-7 folder
  kerastune-flow export runs/demo --format litert --quantize int8   # then predict with it

`python -m kerastune_flow.run` is the same command as `kerastune-flow`.
Every run directory holds config.json, history.csv/.jsonl, model.keras, results.json and
curves.png; `tensorboard --logdir RUN_DIR/tensorboard` shows the curves live. Run the same
train command again after a crash or Ctrl-C and it resumes at the last finished epoch.
"""

DEBUG_ENV = logs.DEBUG_ENV  # KERASTUNE_FLOW_DEBUG=1: tracebacks, and TensorFlow's lines as written
# The console script pyproject.toml installs; `python -m kerastune_flow.run` runs the same main().
PROG = "kerastune-flow"
DISTRIBUTION = "kerastune_flow"
# Flags of `compare` that are its own, not config fields shared by every approach.
COMPARE_OWN = ("data", "train_fraction")


class UsageError(Exception):
    """A command line that argparse cannot parse (main turns it into one line and exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one sentence that points at --help, not a usage dump."""

    def error(self, message: str):
        raise UsageError(f"{message}; run `{self.prog} --help` for the flags and their values")


def version_text() -> str:
    """`kerastune-flow VERSION (keras ..., tensorflow ..., Python ...)`: what `--version` prints."""
    try:
        ours = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        ours = "(not installed)"
    return f"{PROG} {ours} (keras {keras.__version__}, tensorflow {tf.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every sub-command."""
    parser = _Parser(
        prog=PROG,
        description="Train from scratch, train fully, or transfer and fine-tune with Keras 3.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text(), help="print the versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("list", help="list the recipes and what each trains")

    recipes = "\n".join(f"  {name:<16}{spec.description}" for name, spec in RECIPES.items())
    train = sub.add_parser(
        "train",
        help="train a recipe and write a run directory",
        description=f"Train a recipe, evaluate it on the test split, and write a run directory.\n\nrecipes:\n{recipes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left out take the recipe's reference value (shown by `list`).",
    )
    train.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))
    add_config_flags(train)
    g = train.add_argument_group("the run")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="take every setting from a run's config.json (or JSON of the same shape); flags typed here win",
    )
    g.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    g.add_argument("--run-dir", help="output folder (default runs/RECIPE-DATE-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --run-dir (its exports too)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    find = sub.add_parser(
        "find-lr",
        help="a learning-rate range test: the rate to train a recipe's stage at",
        description="A learning-rate range test on one stage of a recipe: the rate grows exponentially step by step "
        "until the loss diverges, then the model is put back. Writes DIR/lr_find.json (the suggestion, its rule, the "
        "curve) and DIR/lr_find.png. `train --learning-rate auto` (or --finetune-lr auto) runs it before its fit.",
    )
    find.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))
    add_config_flags(find)
    g = find.add_argument_group("the range test")
    g.add_argument(
        "--stage",
        choices=STAGES,
        default="head",
        help="head: the first fit (a transfer recipe's head on cached features); finetune: stage 2 of a staged "
        "recipe, unfrozen, after training stage 1 (default head)",
    )
    g.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    g.add_argument("--run-dir", help="output folder (default runs/find-lr-RECIPE-DATE-TIME)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    comp = sub.add_parser(
        "compare",
        help="train from scratch, feature extraction and fine-tuning on the same data, and report",
        description="Trains each approach on the same split and budget, then writes report.md, a self-contained "
        "report.html and results.json in --run-dir, with a recommendation computed from the measured numbers. "
        "The config flags apply to every approach that has the setting.",
    )
    comp.add_argument("--data", required=True, help="tfds name or image folder, as for train")
    comp.add_argument(
        "--approaches",
        type=text_type(config_lib.parse_names),
        default=tuple(APPROACHES),
        help=f"comma list of {', '.join(APPROACHES)} (default all)",
    )
    comp.add_argument(
        "--train-fraction",
        type=text_type(config_lib.parse_fractions),
        default=(1.0,),
        help="comma list of shares of the training data, e.g. 0.1,0.3,1.0 (a data-size sweep)",
    )
    add_config_flags(comp, skip=COMPARE_OWN)
    g = comp.add_argument_group("the comparison")
    g.add_argument("--run-dir", help="output folder (default runs/compare-DATE-TIME)")
    g.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    tune_cmd = sub.add_parser(
        "tune",
        help="search the knobs that decide the result with KerasTuner, and report",
        description="A KerasTuner search in which every trial is a whole run (DIR/trials/NNN, both stages of a "
        "fine-tune in one trial), chosen by validation only. Writes DIR/tune.json, DIR/best_config.json (replay it "
        "with `train RECIPE --config`), report.md and report.html with the best and the recipe's defaults on the "
        "test split. The same command resumes an interrupted search. Config flags are fixed for every trial; a "
        "knob given as a flag is not searched. Distributed: set KERASTUNER_TUNER_ID (chief / tuner0, tuner1, ...), "
        "KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT and run the same command on each machine.",
    )
    tune_cmd.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))
    g = tune_cmd.add_argument_group("the search")
    g.add_argument("--tuner", choices=TUNERS, default="bayesian", help="KerasTuner's oracle (default bayesian)")
    g.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"at most N trials (default {DEFAULT_TRIALS})")
    g.add_argument("--max-minutes", type=float, help="start no trial after this many minutes of searching")
    g.add_argument(
        "--space",
        type=text_type(config_lib.parse_names),
        help=f"comma list of knobs to search, of {', '.join(KNOBS)} (default: the recipe's, see `list`)",
    )
    g.add_argument("--objective", choices=OBJECTIVES, default="val_accuracy", help="(default val_accuracy)")
    g.add_argument("--run-dir", help="the search's folder (default runs/tune-RECIPE-DATE-TIME)")
    g.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(tune_cmd)

    add_model_commands(sub)
    show_defaults(parser)
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    for name, spec in RECIPES.items():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        print(
            f"{name:<16}{spec.description}\n{'':<16}defaults: {defaults}\n{'':<16}tune space: {', '.join(spec.space)}"
        )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = config_lib.load_config_file(args.config) if args.config else {}
    if overrides.pop("recipe", args.recipe) != args.recipe:
        logging.getLogger(__name__).info("Training %s with the settings of %s", args.recipe, args.config)
    overrides.update(config_overrides(args))
    if args.quiet:
        overrides["verbose"] = 0
    config = make_config(args.recipe, args.preset, **overrides)
    # Without --run-dir, the same command takes up its unfinished run (see `unfinished.py`).
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
    # Without --run-dir, the same command takes up its unfinished search (see `unfinished.py`).
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
            **overrides,
        )
    if "worker" in summary:
        print(f"worker {summary['worker']}: no trial left")
        return 0
    best, test = summary["best"], summary["test"]
    shown = display_values(best["hyperparameters"])  # 0.3, not 0.30000000000000004: tune.json keeps the exact value
    print(f"Best trial {best['trial']}: {summary['objective']} {best['objective']:.4f}, {shown}")
    print(f"Test accuracy {test['best']['accuracy']:.4f} (defaults {test['defaults']['accuracy']:.4f})")
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
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    logs.log_to_stderr()
    try:
        with progress.silenced(getattr(args, "quiet", False)):  # --quiet: no progress of any step, ours or Keras'
            return COMMANDS[args.command](args)
    except KerastuneFlowError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        # Not a user error that the package recognised: most likely a bug. One line by
        # default; the traceback on request, for the bug report.
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
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
