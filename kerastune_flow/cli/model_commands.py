"""The flags of the commands that take a saved model: evaluate, predict and export (their own,
not config settings: each says what it does and its default in `--help`)."""

from __future__ import annotations

import argparse

from kerastune_flow import config as config_lib
from kerastune_flow.deploy.export import FORMATS, QUANTIZATIONS

PREDICT_USAGE = """\
%(prog)s [options] RUN_DIR_OR_MODEL IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...]
       %(prog)s --weights imagenet [options] IMAGE_OR_FOLDER [IMAGE_OR_FOLDER ...]"""


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """The sub-commands that take a saved model: evaluate, predict and export."""
    model_help = "a run directory, a .keras file or an export folder"
    unsafe_help = config_lib.field_help("unsafe_deserialization")
    bad_images_help = "leave out undecodable images, with a warning (default: refuse them)"
    evaluate = sub.add_parser(
        "evaluate",
        help="test metrics of a saved model, as JSON",
        description="Test metrics of a run directory, .keras file or export folder, with the number of test images "
        "and which they were. A run directory (or its export) is evaluated on its own test split (of --data, default "
        "the run's data); a .keras file without config.json needs --data with a test split of its own.",
    )
    evaluate.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=model_help)
    evaluate.add_argument("--data", help="tfds name or image folder (default: the run's); its test split is used")
    evaluate.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch")
    evaluate.add_argument("--data-dir", help=f"{config_lib.field_help('data_dir')} (default: the run's, else tfds's)")
    evaluate.add_argument("--manual-dir", help=f"{config_lib.field_help('manual_dir')} (default: the run's)")
    evaluate.add_argument("--max-examples", type=int, metavar="N", help="at most N test images (default: all)")
    evaluate.add_argument("--skip-bad-images", action="store_true", help=bad_images_help)
    evaluate.add_argument("--unsafe-deserialization", action="store_true", help=unsafe_help)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    predict = sub.add_parser(
        "predict",
        help="class probabilities for images",
        description="Predict with a run directory, .keras file or export folder; with --weights and no model, the "
        "stock VGG16 ImageNet classifier (a pre-trained model used as it is).",
        usage=PREDICT_USAGE,
    )
    predict.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=f"{model_help}; with --weights, the first image")
    predict.add_argument("images", nargs="*", metavar="IMAGE_OR_FOLDER", help="images or folders of images to classify")
    predict.add_argument("--top-k", type=int, default=3, metavar="K", help="the K most likely classes per image")
    predict.add_argument("--json", action="store_true", help="JSON instead of a table")
    predict.add_argument(
        "--weights",
        metavar="imagenet|FILE",
        help="no model: the stock VGG16 classifier with these weights, and every path is an image (default: none)",
    )
    predict.add_argument("--skip-bad-images", action="store_true", help=bad_images_help)
    predict.add_argument("--unsafe-deserialization", action="store_true", help=unsafe_help)
    predict.add_argument("--quiet", action="store_true", help="no progress bars")

    export = sub.add_parser(
        "export",
        help="a SavedModel, LiteRT or ONNX model for serving, checked against the Keras model",
        description="Writes OUT/ with the artifact, labels.txt and export.json, after running the artifact with its "
        "own runtime on the run's test split: a float export must agree on every top-1 and within 1e-4, or nothing "
        "is written; a quantized one reports its accuracy drop and size. `evaluate` and `predict` take OUT too.",
    )
    export.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=model_help)
    export.add_argument("--format", required=True, choices=FORMATS, help="the artifact to write (required)")
    export.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="litert and onnx: float16, or int8 calibrated on at most 500 training images (default float32)",
    )
    export.add_argument("--out", help="the export folder (default RUN_DIR/export-FORMAT[-QUANTIZE])")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--data", help="check on this data's test split (default: the run's)")
    export.add_argument("--max-examples", type=int, metavar="N", help="check on at most N test images (default: all)")
    export.add_argument("--unsafe-deserialization", action="store_true", help=unsafe_help)
    export.add_argument("--quiet", action="store_true", help="no progress bars")
