"""The environment variables the package reads, in one table (README.md, section Environment variables).

    value = environment.read(environment.TF_CONFIG)

`read` refuses a name that is not in `VARIABLES`, so a new variable cannot be read without being
documented; tests/test_environment.py checks README.md's table against `VARIABLES` and looks for
reads of `os.environ` that bypass `read`. The package sets no environment variable: what it
reads is the user's (TensorFlow itself sets a few when it is imported).
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable the package reads.

    Attributes:
        name: the variable's name.
        read_by: who reads it: the package's modules, and the libraries that also do.
        does: what it changes.
        default: what happens when it is unset.
    """

    name: str
    read_by: str
    does: str
    default: str


TF_CONFIG = "TF_CONFIG"
KERASTUNER_TUNER_ID = "KERASTUNER_TUNER_ID"
KERASTUNER_ORACLE_IP = "KERASTUNER_ORACLE_IP"
KERASTUNER_ORACLE_PORT = "KERASTUNER_ORACLE_PORT"
TF_NUM_INTEROP_THREADS = "TF_NUM_INTEROP_THREADS"
TF_CPP_MIN_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
KERASTUNE_FLOW_DEBUG = "KERASTUNE_FLOW_DEBUG"
KERAS_BACKEND = "KERAS_BACKEND"
# Set where a TPU may be attached (Colab, Cloud TPU VM, GKE): only then does `--strategy auto` probe for
# one, since probing a normal host can hang.
TPU_HINTS = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")

_TPU_HINT = "any of the four set (or /dev/accel0 present): `--strategy auto` tries a TPU first"
VARIABLES = (
    Variable(
        TF_CONFIG,
        "runtime/strategy.py, TensorFlow",
        "the cluster (JSON: `cluster`, `task`) of `--strategy multiworker`, "
        "and of `auto` when it names several workers",
        "one machine",
    ),
    Variable(
        KERASTUNER_TUNER_ID,
        "search/tune.py, KerasTuner",
        "a distributed search: `chief` serves the trials, any other id is a worker",
        "the search runs in one process",
    ),
    Variable(KERASTUNER_ORACLE_IP, "search/tune.py, KerasTuner", "a distributed search: the chief's address", "-"),
    Variable(KERASTUNER_ORACLE_PORT, "search/tune.py, KerasTuner", "a distributed search: the chief's port", "-"),
    Variable(
        TF_NUM_INTEROP_THREADS,
        "runtime/process.py, TensorFlow",
        "TensorFlow's inter-op threads; when set, the package leaves them alone",
        "1 for CPU training without AVX-512, TensorFlow's default otherwise",
    ),
    Variable(
        TF_CPP_MIN_LOG_LEVEL,
        "runtime/logs.py, TensorFlow",
        "the lowest severity of TensorFlow's native log lines shown: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL",
        "1 for the lines while TensorFlow is imported, TensorFlow's 0 after",
    ),
    Variable(
        KERASTUNE_FLOW_DEBUG,
        "run.py, runtime/logs.py",
        "1: the traceback of an unexpected error, and TensorFlow's import lines as they come",
        "off",
    ),
    Variable(
        KERAS_BACKEND,
        "Keras; `kerastune_flow/__init__.py` checks the backend",
        "Keras' backend: must be tensorflow",
        "~/.keras/keras.json's, tensorflow unless changed",
    ),
    *(Variable(name, "runtime/strategy.py", _TPU_HINT, "no TPU probe") for name in TPU_HINTS),
)
NAMES = frozenset(v.name for v in VARIABLES)


def read(name: str, default: str = "") -> str:
    """The value of a documented environment variable.

    Args:
        name: a name in `VARIABLES`.
        default: returned when the variable is unset.

    Returns:
        The variable's value, or `default`.

    Raises:
        ValueError: for a name missing from `VARIABLES` (document it there, and in README.md).
    """
    if name not in NAMES:
        raise ValueError(
            f"{name} is not among the documented environment variables: add it to runtime/environment.py's "
            f"VARIABLES and to README.md's table. Received: name={name!r}"
        )
    return os.environ.get(name, default)


def is_on(name: str) -> bool:
    """True when a documented switch is set to anything but "" or "0"."""
    return read(name).strip() not in ("", "0")
