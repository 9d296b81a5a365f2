"""Heads, optimizers and compiling: what every recipe's model ends in and how it learns.

A `HeadSpec` says what the output layer emits and which labels and loss go with it: the
from-scratch examples emit one logit per class, the transfer examples one sigmoid unit for two
classes or a softmax. `compile_model` compiles with the head's loss and a fresh optimizer, and
with `base_multiplier` gives a pre-trained base a lower learning rate than the head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import keras

from kerastune_flow.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What the output layer emits and what the labels must look like (the head's description;
    the head itself is the model's last layers, and "head" on disk also names the frozen stage).

    Attributes:
        units: output units.
        activation: None for logits, "sigmoid" or "softmax".
        label_mode: "int", "binary" or "categorical" (see `data.prepare`).
    """

    units: int
    activation: str | None
    label_mode: str

    def loss(self) -> keras.losses.Loss:
        if self.activation is None:
            return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if self.activation == "sigmoid":
            return keras.losses.BinaryCrossentropy()
        return keras.losses.CategoricalCrossentropy()


def logits_head(num_classes: int) -> HeadSpec:
    """The from-scratch examples' head: one logit per class, sparse integer labels."""
    check_num_classes(num_classes)
    return HeadSpec(units=num_classes, activation=None, label_mode="int")


def transfer_head(num_classes: int) -> HeadSpec:
    """The transfer examples' head: 1 sigmoid unit for two classes, else softmax."""
    check_num_classes(num_classes)
    if num_classes == 2:
        return HeadSpec(units=1, activation="sigmoid", label_mode="binary")
    return HeadSpec(units=num_classes, activation="softmax", label_mode="categorical")


def check_num_classes(num_classes: int) -> None:
    """Refuses fewer than two classes (nothing to learn).

    Raises:
        ConfigError: naming the count.
    """
    if num_classes < 2:
        raise ConfigError(
            "A classifier needs at least two classes; a folder or label set with one class cannot be "
            f"learnt. Received: num_classes={num_classes}"
        )


_OPTIMIZER_CLASSES = {
    "adam": (keras.optimizers.Adam, {}),
    "sgd": (keras.optimizers.SGD, {"momentum": 0.9}),
    "rmsprop": (keras.optimizers.RMSprop, {}),
    "adagrad": (keras.optimizers.Adagrad, {}),
}


def _discriminative(cls: type) -> type:
    """`cls` with a lower learning rate for some variables (the base) than for the rest (the head)."""

    class Discriminative(cls):
        def __init__(self, *args: Any, base_paths: Sequence[str] = (), base_multiplier: float = 0.1, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.base_paths = tuple(base_paths)
            self.base_multiplier = float(base_multiplier)
            self._base_keys: set = set()

        def build(self, variables):
            paths = set(self.base_paths)
            self._base_keys = {self._var_key(v) for v in variables if v.path in paths}
            super().build(variables)

        def update_step(self, gradient, variable, learning_rate):
            if self._var_key(variable) in self._base_keys:
                learning_rate = learning_rate * self.base_multiplier
            return super().update_step(gradient, variable, learning_rate)

        def get_config(self):
            return {
                **super().get_config(),
                "base_paths": list(self.base_paths),
                "base_multiplier": self.base_multiplier,
            }

        def as_builtin(self) -> keras.optimizers.Optimizer:
            """The built-in optimizer this one extends, with the same settings but one rate for all:
            what a saved `.keras` file holds (see `rundir.atomic_save_model`), so that plain
            Keras loads it. Its state variables are the same, so the saved state fits it."""
            return cls.from_config(super().get_config())

    Discriminative.__name__ = Discriminative.__qualname__ = f"Discriminative{cls.__name__}"
    return keras.saving.register_keras_serializable(package="kerastune_flow")(Discriminative)


_DISCRIMINATIVE = {name: _discriminative(cls) for name, (cls, _) in _OPTIMIZER_CLASSES.items()}


def make_optimizer(
    name: str = "adam",
    learning_rate: float = 1e-3,
    *,
    base_variables: Sequence[Any] | None = None,
    base_multiplier: float | None = None,
) -> keras.optimizers.Optimizer:
    """Returns a fresh optimizer: adam, sgd (momentum 0.9), rmsprop or adagrad.

    Args:
        name: optimizer name.
        learning_rate: the rate (of the head, with discriminative rates).
        base_variables: variables that train at `learning_rate * base_multiplier`
            (discriminative learning rates: a lower rate for the pre-trained base).
        base_multiplier: the factor for `base_variables`; None for one rate for all.

    Raises:
        ConfigError: for an unknown name or a rate that is not positive.
    """
    if name not in _OPTIMIZER_CLASSES:
        raise ConfigError(
            f"Unknown optimizer {name!r}; choose one of {', '.join(_OPTIMIZER_CLASSES)}. Received: {name}"
        )
    if isinstance(learning_rate, (int, float)) and learning_rate <= 0:
        raise ConfigError(f"The learning rate must be positive. Received: learning_rate={learning_rate}")
    cls, extra = _OPTIMIZER_CLASSES[name]
    if base_multiplier is None:
        return cls(learning_rate, **extra)
    if base_multiplier <= 0:
        raise ConfigError(f"The base learning-rate multiplier must be positive. Received: {base_multiplier}")
    paths = [v.path for v in (base_variables or ())]
    return _DISCRIMINATIVE[name](learning_rate, base_paths=paths, base_multiplier=base_multiplier, **extra)


def compile_model(
    model: keras.Model,
    head: HeadSpec,
    *,
    optimizer: str = "adam",
    learning_rate: Any = 1e-3,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
    base_variables: Sequence[Any] | None = None,
    base_multiplier: float | None = None,
) -> keras.Model:
    """Compiles with the head's loss, accuracy, and a fresh optimizer; returns the model.

    Args:
        model: the model.
        head: its head's spec (the loss follows from it).
        optimizer: adam, sgd (momentum 0.9), rmsprop or adagrad.
        learning_rate: a rate or a `keras.optimizers.schedules` schedule.
        jit_compile: XLA.
        steps_per_execution: training steps per call into the graph.
        base_variables: with `base_multiplier`, the variables that train at
            `learning_rate * base_multiplier` (the pre-trained base); the rest trains at
            `learning_rate`.
        base_multiplier: the factor for `base_variables`; None for one rate for all.
    """
    model.compile(
        optimizer=make_optimizer(
            optimizer, learning_rate, base_variables=base_variables, base_multiplier=base_multiplier
        ),
        loss=head.loss(),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model


def compile_if(
    compile: bool, model: keras.Model, head: HeadSpec, optimizer: str, learning_rate: Any, jit: bool | str, spe: int
) -> keras.Model:
    """What the public builders return: `model` compiled as their docstrings say when `compile`
    (see `compile_model`: `jit` is `jit_compile`, `spe` the steps per execution), else as built."""
    if not compile:
        return model
    return compile_model(
        model, head, optimizer=optimizer, learning_rate=learning_rate, jit_compile=jit, steps_per_execution=spe
    )


def regularizer(l1: float, l2: float) -> keras.regularizers.Regularizer | None:
    """An L1/L2 kernel penalty, or None when both are 0."""
    return keras.regularizers.L1L2(l1=l1, l2=l2) if (l1 or l2) else None


def count_params(model: keras.Model) -> dict[str, int]:
    """Trainable and total parameter counts."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    total = sum(math.prod(w.shape) for w in model.weights)
    return {"trainable_params": trainable, "total_params": total}
