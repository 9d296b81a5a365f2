"""Command line: `python -m kerastune_flow.run {list,train,evaluate,predict} ...`.

The only module that parses arguments or prints. A user error ends with one sentence on stderr
and exit code 2; an unexpected error (a bug) with one line and exit code 1, and its traceback
with KERASTUNE_FLOW_DEBUG=1; Ctrl-C ends with exit code 130 and a resumable run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time


EXAMPLES = """\
examples:
  # the demo: a CNN on the digits that ship in data/ (about a minute on 2 CPU cores)
  python -m kerastune_flow.run train cifar10_cnn --data data/digits --epochs 5 --run-dir runs/demo

  # the reference examples (tfds downloads; --manual-dir uses local archives instead)
  python -m kerastune_flow.run train scratch_mlp --data mnist
  python -m kerastune_flow.run train cifar10_cnn --data cifar10

  # transfer learning on your own image folder (one sub-folder per class)
  python -m kerastune_flow.run train vgg16_features --data ~/cats_vs_dogs --image-size 150
  python -m kerastune_flow.run train vgg16_finetune --data ~/cats_vs_dogs --head-epochs 5 --epochs 10
  python -m kerastune_flow.run train vgg16_finetune --data ~/flowers --backbone mobilenetv2 --image-size 160

  # full training, then fine-tune your own model on a new task (cut before its old head)
  python -m kerastune_flow.run train cifar10_cnn --data cifar10 --run-dir runs/cnn
  python -m kerastune_flow.run train vgg16_finetune --data ~/cats_vs_dogs --base runs/cnn --base-output dense

  # afterwards
  python -m kerastune_flow.run evaluate runs/demo --data data/digits
  python -m kerastune_flow.run predict runs/demo data/digits/7 --top-k 3

Every run directory holds config.json, history.csv/.jsonl, model.keras, results.json and
curves.png; `tensorboard --logdir RUN_DIR/tensorboard` shows the curves live. Run the same
train command again after a crash or Ctrl-C and it resumes at the last finished epoch.
"""


def _image_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, such as 32 or 150x150, not {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, not {text!r}")
    return (parts[0], parts[1])


def _augment(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _weights(text: str) -> str:
    return text.lower() if text.lower() in ("none", "imagenet") else text


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.1,0.3,1.0, not {text!r}") from None


def _bool(text: str) -> str:
    if text.lower() not in ("auto", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected auto, true or false, not {text!r}")
    return text.lower()


DEBUG_ENV = "KERASTUNE_FLOW_DEBUG"
UNSAFE_HELP = "load a .keras model holding Lambda layers: their Python code runs, so only for files you trust"


class UsageError(Exception):
    """A command line that argparse cannot parse (main turns it into one line and exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one sentence that points at --help, not a usage dump."""

    def error(self, message: str):
        raise UsageError(f"{message}; run `{self.prog} --help` for the flags and their values")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every sub-command (flags map one to one onto config fields)."""
    from kerastune_flow.config import (
        AUGMENTATIONS,
        BACKBONE_NAMES,
        CACHE_POLICIES,
        INITIALIZER_NAMES,
        OPTIMIZER_NAMES,
        PRESETS,
        RECIPES,
        STRATEGY_NAMES,
    )

    parser = _Parser(
        prog="python -m kerastune_flow.run",
        description="Train from scratch, train fully, or transfer and fine-tune with Keras 3.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("list", help="list the recipes and what each trains")

    recipes = "\n".join(f"  {name:<16}{text}" for name, text in RECIPES.items())
    train = sub.add_parser(
        "train",
        help="train a recipe and write a run directory",
        description=f"Train a recipe, evaluate it on the test split, and write a run directory.\n\nrecipes:\n{recipes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags left out take the recipe's reference value (shown by `list`).",
    )
    train.add_argument("recipe", choices=list(RECIPES), metavar="RECIPE", help=", ".join(RECIPES))
    g = train.add_argument_group("data")
    g.add_argument(
        "--data",
        default="data/digits",
        help="tfds name (mnist, cifar10) or an image folder: train/ and test/ with a folder per class, "
        "or class folders directly (default: data/digits, shipped with the project)",
    )
    g.add_argument("--image-size", type=_image_size, help="N or HxW; default: the recipe's (28, 32 or 150)")
    g.add_argument("--batch-size", type=int, help="per replica; the global batch is this x replicas (default 64/32)")
    g.add_argument("--augment", type=_augment, help=f"comma list of {', '.join(AUGMENTATIONS)} (default none)")
    g.add_argument("--validation-fraction", type=float, help="share of train held out for validation (0.1)")
    g.add_argument("--test-fraction", type=float, help="share held out for test when there is no test/ (0.1)")
    g.add_argument("--data-dir", help="tfds data directory (default ~/tensorflow_datasets)")
    g.add_argument("--manual-dir", help="folder with the original tfds archives: prepare without a download")
    g.add_argument("--max-examples", type=int, help="use at most N examples of each split (quick tries)")
    g.add_argument("--cache", choices=CACHE_POLICIES, help="keep decoded images in memory (auto: if they fit)")
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="leave out image files that cannot be decoded, with a warning naming each (default: refuse the folder)",
    )
    g = train.add_argument_group("model")
    g.add_argument("--weights", type=_weights, help="VGG16 recipes: imagenet (default), none, or a local file")
    g.add_argument("--learning-rate", type=float, help="1e-3 by default (the head's, for vgg16_finetune)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), help="cosine: decay to 0 over the epochs")
    g.add_argument("--optimizer", choices=OPTIMIZER_NAMES, help="adam (default), sgd with momentum 0.9, ...")
    g.add_argument("--initializer", choices=INITIALIZER_NAMES, help="kernel initializer (glorot_uniform)")
    g.add_argument("--dropout", type=float, help="dropout rate in the dense part (0)")
    g.add_argument("--l1", type=float, help="L1 weight penalty (0)")
    g.add_argument("--l2", type=float, help="L2 weight penalty (0)")
    g.add_argument("--dense-units", type=int, help="transfer head width (256)")
    g = train.add_argument_group("transfer learning (vgg16_features, vgg16_finetune)")
    g.add_argument("--backbone", choices=BACKBONE_NAMES, help="the pre-trained base (vgg16)")
    g.add_argument(
        "--base",
        help="your own pre-trained model instead: a .keras file or a run directory (e.g. of cifar10_cnn)",
    )
    g.add_argument("--base-output", help="the layer of --base to cut at (default: the one before its head)")
    g.add_argument("--unsafe-deserialization", action="store_true", default=None, help=UNSAFE_HELP)
    g.add_argument("--pooling", choices=("auto", "flatten", "avg"), help="after the base (auto: the backbone's)")
    g.add_argument(
        "--unfreeze-at",
        help="stage 2 unfreezes the base from here: layer index, layer name or fraction "
        "(default: the last block, block5_conv1 = 15 for VGG16)",
    )
    g.add_argument("--head-epochs", type=int, help="stage 1 epochs, head on the frozen base (5)")
    g.add_argument("--finetune-lr", dest="finetune_learning_rate", type=float, help="stage 2 rate (1e-5)")
    g.add_argument(
        "--progressive",
        help="stage 2 in steps EPOCH:UNFREEZE_AT:LR,... counted from its start, e.g. "
        "0:block5_conv1:1e-5,3:block4_conv1:5e-6",
    )
    g.add_argument(
        "--base-lr-multiplier",
        type=float,
        help="discriminative rates: the base trains at finetune-lr x this (e.g. 0.1), the head at finetune-lr",
    )
    g.add_argument(
        "--no-feature-cache",
        dest="feature_cache",
        action="store_const",
        const="off",
        help="always run the frozen base forward (by default its features are computed once)",
    )
    g = train.add_argument_group("training")
    g.add_argument("--preset", default="reference", choices=list(PRESETS), help="smoke: tiny, offline, seconds")
    g.add_argument("--epochs", type=int, help="epochs (stage 2 epochs for vgg16_finetune); default 10")
    g.add_argument("--strategy", choices=STRATEGY_NAMES, help="tf.distribute strategy (auto)")
    g.add_argument("--seed", type=int, help="seed for weights, shuffling and splits (0)")
    g.add_argument("--patience", type=int, help="early stopping patience in epochs (3)")
    g.add_argument("--no-early-stopping", dest="early_stopping", action="store_false", default=None)
    g.add_argument("--monitor", help="metric for early stopping and the best model (val_loss)")
    g.add_argument("--steps-per-execution", type=int, help="steps per graph call (default 32 on TPU, 16 on CPU, 1 on GPU)")
    g.add_argument(
        "--mixed-precision",
        nargs="?",
        const="auto",
        choices=("off", "auto", "bfloat16", "float16"),
        help="mixed precision; alone: bfloat16 on TPU, float16 on GPU (output layers stay float32)",
    )
    g.add_argument("--jit-compile", type=_bool, help="XLA: auto (on for GPU/TPU, off on CPU), true, false")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    g.add_argument("--no-backup", dest="backup", action="store_false", default=None, help="no resume state")
    g.add_argument("--run-dir", help="output folder (default runs/RECIPE-DATE-TIME)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --run-dir")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    comp = sub.add_parser(
        "compare",
        help="train from scratch, feature extraction and fine-tuning on the same data, and report",
        description="Trains each approach on the same split and budget, then writes report.md, a self-contained "
        "report.html and results.json in --run-dir, with a recommendation computed from the measured numbers.",
    )
    comp.add_argument("--data", required=True, help="tfds name or image folder, as for train")
    comp.add_argument("--approaches", type=_augment, default=("scratch", "features", "finetune"),
                      help="comma list of scratch, features, finetune (default all)")  # fmt: skip
    comp.add_argument("--train-fraction", type=_fractions, default=(1.0,),
                      help="comma list of shares of the training data, e.g. 0.1,0.3,1.0 (a data-size sweep)")  # fmt: skip
    comp.add_argument("--run-dir", help="output folder (default runs/compare-DATE-TIME)")
    comp.add_argument("--preset", default="reference", choices=list(PRESETS))
    comp.add_argument("--backbone", choices=BACKBONE_NAMES)
    comp.add_argument("--base", help="your own pre-trained model (a .keras file or a run directory)")
    comp.add_argument("--base-output", help="the layer of --base to cut at")
    comp.add_argument("--weights", type=_weights, help="imagenet (default), none, or a local file")
    comp.add_argument("--image-size", type=_image_size)
    comp.add_argument("--batch-size", type=int)
    comp.add_argument("--epochs", type=int, help="max epochs per approach (stage 2 of the fine-tune)")
    comp.add_argument("--head-epochs", type=int)
    comp.add_argument("--learning-rate", type=float, help="the from-scratch model's and the heads' rate")
    comp.add_argument("--finetune-lr", dest="finetune_learning_rate", type=float, help="stage 2 rate (1e-5)")
    comp.add_argument("--patience", type=int)
    comp.add_argument("--seed", type=int)
    comp.add_argument("--max-examples", type=int)
    comp.add_argument("--strategy", choices=STRATEGY_NAMES)
    comp.add_argument("--skip-bad-images", action="store_true", default=None, help="as for train")
    comp.add_argument("--unsafe-deserialization", action="store_true", default=None, help="as for train (--base)")

    evaluate = sub.add_parser("evaluate", help="test metrics of a saved model, as JSON")
    evaluate.add_argument("model", metavar="RUN_DIR_OR_MODEL")
    evaluate.add_argument("--data", required=True, help="tfds name or image folder; its test split is used")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--manual-dir")
    evaluate.add_argument("--max-examples", type=int)
    evaluate.add_argument("--skip-bad-images", action="store_true", help="leave out undecodable images, with a warning")
    evaluate.add_argument("--unsafe-deserialization", action="store_true", help=UNSAFE_HELP)

    predict = sub.add_parser(
        "predict",
        help="class probabilities for images",
        description="Predict with a run directory or .keras file; with --weights and no model, the stock "
        "VGG16 ImageNet classifier (a pre-trained model used as it is).",
    )
    predict.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_MODEL IMAGE_OR_FOLDER")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--json", action="store_true", help="JSON instead of a table")
    predict.add_argument("--weights", help="imagenet or a local file: use stock VGG16, every path is an image")
    predict.add_argument("--skip-bad-images", action="store_true", help="leave out undecodable images, with a warning")
    predict.add_argument("--unsafe-deserialization", action="store_true", help=UNSAFE_HELP)
    return parser


_TRAIN_FIELDS = (
    "data", "image_size", "batch_size", "augment", "validation_fraction", "test_fraction", "data_dir",
    "manual_dir", "max_examples", "cache", "learning_rate", "optimizer", "initializer", "dropout", "l1",
    "l2", "dense_units", "unfreeze_at", "finetune_learning_rate", "epochs", "head_epochs", "strategy",
    "seed", "patience", "early_stopping", "monitor", "steps_per_execution", "jit_compile", "tensorboard",
    "backup", "weights", "backbone", "base", "base_output", "pooling", "progressive", "base_lr_multiplier",
    "feature_cache", "lr_schedule", "mixed_precision", "skip_bad_images", "unsafe_deserialization",
)  # fmt: skip


def _cmd_list(args) -> int:
    from kerastune_flow.config import RECIPE_DEFAULTS, RECIPES

    for name, text in RECIPES.items():
        defaults = ", ".join(f"{k}={v}" for k, v in RECIPE_DEFAULTS[name].items())
        print(f"{name:<16}{text}\n{'':<16}defaults: {defaults}")
    return 0


def _cmd_train(args) -> int:
    from kerastune_flow.config import make_config
    from kerastune_flow.train import train_and_evaluate

    overrides = {name: getattr(args, name) for name in _TRAIN_FIELDS if getattr(args, name) is not None}
    if args.quiet:
        overrides["verbose"] = 0
    config = make_config(args.recipe, args.preset, **overrides)
    run_dir = args.run_dir or os.path.join("runs", f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    # Progress bars and Keras' messages go to stderr, so stdout carries only the JSON result.
    with contextlib.redirect_stdout(sys.stderr):
        result = train_and_evaluate(config, run_dir, overwrite=args.overwrite)
    print(json.dumps({"run_dir": str(result.run_dir), **result.results}, indent=2))
    return 0


_COMPARE_FIELDS = (
    "backbone", "base", "base_output", "weights", "image_size", "batch_size", "epochs", "head_epochs",
    "patience", "seed", "max_examples", "strategy", "learning_rate", "finetune_learning_rate", "skip_bad_images",
    "unsafe_deserialization",
)  # fmt: skip


def _cmd_compare(args) -> int:
    from kerastune_flow.compare import compare

    overrides = {name: getattr(args, name) for name in _COMPARE_FIELDS if getattr(args, name) is not None}
    run_dir = args.run_dir or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    with contextlib.redirect_stdout(sys.stderr):
        report = compare(
            args.data,
            run_dir,
            approaches=args.approaches,
            train_fractions=args.train_fraction,
            preset=args.preset,
            **overrides,
        )
    print("\n".join(report["recommendation"]))
    print(f"report: {os.path.join(run_dir, 'report.html')}")
    return 0


def _cmd_evaluate(args) -> int:
    from kerastune_flow.train import evaluate_saved

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


def _cmd_predict(args) -> int:
    from kerastune_flow.train import predict_images

    if args.weights:
        model, images = None, args.paths
    else:
        if len(args.paths) < 2:
            from kerastune_flow.errors import ConfigError

            raise ConfigError(
                "predict needs a run directory (or .keras file) and at least one image, or --weights imagenet "
                f"and images. Received: {' '.join(args.paths)}"
            )
        model, images = args.paths[0], args.paths[1:]
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
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["file"]) for r in rows)
    for r in rows:
        ranked = "  ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
        print(f"{r['file']:<{width}}  {ranked}")
    return 0


COMMANDS = {
    "list": _cmd_list,
    "train": _cmd_train,
    "compare": _cmd_compare,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code.

    0: done. 2: a user error (a bad flag, data, model file or run directory), told in one
    sentence on stderr. 1: an unexpected error, most likely a bug: one line, and the
    traceback with KERASTUNE_FLOW_DEBUG=1. 130 / 143: interrupted by SIGINT / SIGTERM.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[kerastune_flow] %(message)s", stream=sys.stderr)
    try:
        from kerastune_flow.errors import KerastuneFlowError
    except ImportError as error:  # TensorFlow missing: the package says which extra to install
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    try:
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
        print(
            f"interrupted by {name}: finished epochs are kept in the run directory; run the same command to resume",
            file=sys.stderr,
        )
        return 143 if name == "SIGTERM" else 130


if __name__ == "__main__":
    sys.exit(main())
