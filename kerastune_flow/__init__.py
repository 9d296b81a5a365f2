"""kerastune_flow: train from scratch, train fully, or transfer and fine-tune, with Keras 3."""

from kerastune_flow.runtime import logs as _logs

__version__ = "0.1.0"

# TensorFlow's native lines at import (absl's banner, the oneDNN notice) came twice and ignore
# TF_CPP_MIN_LOG_LEVEL: each is shown once, INFO ones only at level 0 (see logs.py). Importing the
# package sets no environment variable (tests/test_environment.py): Keras' backend is KERAS_BACKEND's or
# keras.json's (tensorflow unless changed), checked below. The variables the package reads are in one
# table: runtime/environment.py, and README.md's section Environment variables.
try:
    with _logs.once_each():
        import tensorflow as _tf  # noqa: F401
except ImportError:
    raise ImportError(
        "kerastune_flow needs TensorFlow, which is an extra so you can choose the build: "
        "pip install 'kerastune_flow[cpu]' (or [gpu] for CUDA, [tpu] on a TPU VM; Colab already has it)."
    ) from None
import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"kerastune_flow runs on Keras' TensorFlow backend, but Keras' backend is {_keras.backend.backend()!r} "
        "(from KERAS_BACKEND or ~/.keras/keras.json): set KERAS_BACKEND=tensorflow before importing keras."
    )

from kerastune_flow.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from kerastune_flow.data import load_data, prepare  # noqa: E402
from kerastune_flow.deploy.export import export_model  # noqa: E402
from kerastune_flow.deploy.inference import evaluate_saved, predict_images  # noqa: E402
from kerastune_flow.errors import KerastuneFlowError  # noqa: E402
from kerastune_flow.models import (  # noqa: E402
    build_cifar10_cnn,
    build_scratch_mlp,
    build_vgg16_feature_extractor,
    build_vgg16_finetune,
)
from kerastune_flow.recipes import RECIPES, make_config  # noqa: E402
from kerastune_flow.runtime.process import prepare_process  # noqa: E402
from kerastune_flow.runtime.strategy import get_strategy, global_batch_size  # noqa: E402
from kerastune_flow.search.compare import compare  # noqa: E402
from kerastune_flow.search.tune import tune  # noqa: E402
from kerastune_flow.training.callbacks import standard_callbacks  # noqa: E402
from kerastune_flow.training.lr_find import find_lr  # noqa: E402
from kerastune_flow.training.train import train_and_evaluate  # noqa: E402

# compare and tune are the functions; their modules are kerastune_flow.search.compare and .tune.
__all__ = [
    "RECIPES",
    "Config",
    "DataConfig",
    "KerastuneFlowError",
    "ModelConfig",
    "TrainConfig",
    "build_cifar10_cnn",
    "build_scratch_mlp",
    "build_vgg16_feature_extractor",
    "build_vgg16_finetune",
    "compare",
    "evaluate_saved",
    "export_model",
    "find_lr",
    "get_strategy",
    "global_batch_size",
    "load_data",
    "make_config",
    "predict_images",
    "prepare",
    "prepare_process",
    "standard_callbacks",
    "train_and_evaluate",
    "tune",
]
