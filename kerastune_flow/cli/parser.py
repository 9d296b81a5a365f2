"""The command line's parsers: one function per command, the config flags generated from the
config's fields (`cli/flags.py`), the saved-model commands' flags in `cli/model_commands.py`."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import keras
import tensorflow as tf

from kerastune_flow import config as config_lib
from kerastune_flow.cli.flags import add_config_flags, show_defaults, text_type
from kerastune_flow.cli.model_commands import add_model_commands
from kerastune_flow.config import PRESETS
from kerastune_flow.config.settings import TRACKING_FIELDS
from kerastune_flow.recipes import RECIPES
from kerastune_flow.search.compare import APPROACHES
from kerastune_flow.search.tune import DEFAULT_TRIALS, OBJECTIVES, TUNERS
from kerastune_flow.search.tune_final import FINAL_SEEDS
from kerastune_flow.search.tune_space import KNOBS
from kerastune_flow.training.lr_find import STAGES

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
    _add_train(sub)
    _add_find_lr(sub)
    _add_compare(sub)
    _add_tune(sub)
    add_model_commands(sub)
    show_defaults(parser)
    return parser


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))


def _add_run_flags(group: argparse._ArgumentGroup, run_dir_help: str) -> None:
    """--run-dir, --preset and --quiet: the flags every training command has."""
    group.add_argument("--run-dir", help=run_dir_help)
    group.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(sub: argparse._SubParsersAction) -> None:
    recipes = "\n".join(f"  {name:<16}{spec.description}" for name, spec in RECIPES.items())
    train = sub.add_parser(
        "train",
        help="train a recipe and write a run directory",
        description=f"Train a recipe, evaluate it on the test split, and write a run directory.\n\nrecipes:\n{recipes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left out take the recipe's reference value (shown by `list`).",
    )
    _add_recipe(train)
    add_config_flags(train)
    g = train.add_argument_group("the run")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="take every setting from a run's config.json (or JSON of the same shape); flags typed here win",
    )
    _add_run_flags(g, "output folder (default runs/RECIPE-DATE-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --run-dir (its exports too)")


def _add_find_lr(sub: argparse._SubParsersAction) -> None:
    find = sub.add_parser(
        "find-lr",
        help="a learning-rate range test: the rate to train a recipe's stage at",
        description="A learning-rate range test on one stage of a recipe: the rate grows exponentially step by step "
        "until the loss diverges, then the model is put back. Writes DIR/lr_find.json (the suggestion, its rule, the "
        "curve) and DIR/lr_find.png. `train --learning-rate auto` (or --finetune-learning-rate auto) runs it before "
        "its fit.",
    )
    _add_recipe(find)
    add_config_flags(find, skip=TRACKING_FIELDS)  # a range test is no run to track
    g = find.add_argument_group("the range test")
    g.add_argument(
        "--stage",
        choices=STAGES,
        default="head",
        help="head: the first fit (a transfer recipe's head on cached features); finetune: stage 2 of a staged "
        "recipe, unfrozen, after training stage 1 (default head)",
    )
    _add_run_flags(g, "output folder (default runs/find-lr-RECIPE-DATE-TIME)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
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
    add_config_flags(comp, skip=(*COMPARE_OWN, "folds", "fold"))  # cross-validation is tune's
    _add_run_flags(comp.add_argument_group("the comparison"), "output folder (default runs/compare-DATE-TIME)")


def _add_tune(sub: argparse._SubParsersAction) -> None:
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
    _add_recipe(tune_cmd)
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
    g.add_argument(
        "--final-seeds",
        type=int,
        default=FINAL_SEEDS,
        help=f"after the search, the best and the defaults each train on the whole training split with N seeds "
        f"for the test split, and the report says whether their difference is beyond noise (default {FINAL_SEEDS})",
    )
    _add_run_flags(g, "the search's folder (default runs/tune-RECIPE-DATE-TIME)")
    add_config_flags(tune_cmd, skip=("fold",))  # a search runs every fold of --folds
