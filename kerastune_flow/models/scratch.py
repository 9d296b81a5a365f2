"""The from-scratch models of the reference examples: the MNIST MLP and the CIFAR-10 CNN.

Each builder returns a compiled `keras.Model` (pass `compile=False` for an uncompiled one) that
takes raw 0..255 pixels: the scaling the reference example applies to its inputs is the model's
first layer, so a saved `.keras` file predicts on images as they come. Call builders inside
`strategy.scope()` so that variables are created on the right devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from kerastune_flow.errors import ConfigError
from kerastune_flow.models.heads import compile_if, logits_head, regularizer

CNN_MIN_SIZE = 18  # cifar10_cnn: three valid 3x3 convolutions and two 2x2 poolings


def build_scratch_mlp(
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    hidden_units: Sequence[int] = (128, 64),
    kernel_initializer: str = "glorot_uniform",
    dropout: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    compile: bool = True,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
) -> keras.Model:
    """The from-scratch MLP: Flatten -> Dense 128 ReLU -> Dense 64 ReLU -> Dense 10 logits.

    Inputs are raw pixels, normalised to [-1, 1] (mean 0.5, std 0.5 after /255) by the first
    layer, as in the reference example's `Normalize((0.5,), (0.5,))`.

    Args:
        input_shape: (height, width, channels); 28x28x1 for MNIST.
        num_classes: logits out.
        hidden_units: widths of the hidden ReLU layers.
        kernel_initializer: e.g. "glorot_uniform" (Keras default) or "he_normal".
        dropout: rate after each hidden layer (0 = none, as in the reference).
        l1: L1 weight penalty on the dense kernels.
        l2: L2 weight penalty on the dense kernels.
        optimizer: "adam", "sgd", "rmsprop" or "adagrad".
        learning_rate: 1e-3 in the reference.
        compile: compile with sparse categorical cross-entropy from logits and accuracy.
        jit_compile: XLA (train turns it on for this MLP on the CPU too, where it is faster).
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "scratch_mlp".
    """
    head = logits_head(num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden_units, start=1):
        x = layers.Dense(
            units,
            activation="relu",
            kernel_initializer=kernel_initializer,
            kernel_regularizer=regularizer(l1, l2),
            name=f"dense_{i}",
        )(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = layers.Dense(
        head.units,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=regularizer(l1, l2),
        dtype="float32",  # the loss in float32 under a mixed-precision policy
        name="logits",
    )(x)
    model = keras.Model(inputs, outputs, name="scratch_mlp")
    return compile_if(compile, model, head, optimizer, learning_rate, jit_compile, steps_per_execution)


def build_cifar10_cnn(
    *,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    kernel_initializer: str = "glorot_uniform",
    dropout: float = 0.0,
    l1: float = 0.0,
    l2: float = 0.0,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    compile: bool = True,
    jit_compile: bool | str = False,
    steps_per_execution: int = 1,
) -> keras.Model:
    """The full-training CNN: Conv32-Pool-Conv64-Pool-Conv64-Flatten-Dense64-Dense10 (logits).

    Inputs are raw pixels, scaled to [0, 1] by the first layer. Any input of at least 18x18
    works (three valid 3x3 convolutions and two 2x2 poolings).

    Args:
        input_shape: (height, width, channels); 32x32x3 for CIFAR-10.
        num_classes: logits out.
        kernel_initializer: for every convolution and dense kernel.
        dropout: rate before the Dense 64 layer (0 = none, as in the reference).
        l1: L1 weight penalty on every kernel.
        l2: L2 weight penalty on every kernel.
        optimizer: "adam" in the reference.
        learning_rate: 1e-3 (Adam's default in the reference).
        compile: compile with sparse categorical cross-entropy from logits and accuracy.
        jit_compile: XLA (train leaves it off on the CPU, where convolutions run slower under it).
        steps_per_execution: training steps per call into the graph.

    Returns:
        A keras.Model named "cifar10_cnn".

    Raises:
        ConfigError: when the input is too small for the three convolutions.
    """
    if min(input_shape[:2]) < CNN_MIN_SIZE:
        raise ConfigError(
            "cifar10_cnn needs images of at least 18x18 pixels (three 3x3 convolutions, two poolings); "
            f"pass --image-size 32. Received: input_shape={tuple(input_shape)}"
        )
    head = logits_head(num_classes)
    reg = regularizer(l1, l2)
    conv = dict(activation="relu", kernel_initializer=kernel_initializer, kernel_regularizer=reg)
    inputs = keras.Input(shape=tuple(input_shape), name="pixels")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, name="conv_1", **conv)(x)
    x = layers.MaxPooling2D(2, name="pool_1")(x)
    x = layers.Conv2D(64, 3, name="conv_2", **conv)(x)
    x = layers.MaxPooling2D(2, name="pool_2")(x)
    x = layers.Conv2D(64, 3, name="conv_3", **conv)(x)
    x = layers.Flatten(name="flatten")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(64, name="dense", **conv)(x)
    outputs = layers.Dense(
        head.units, kernel_initializer=kernel_initializer, kernel_regularizer=reg, dtype="float32", name="logits"
    )(x)
    model = keras.Model(inputs, outputs, name="cifar10_cnn")
    return compile_if(compile, model, head, optimizer, learning_rate, jit_compile, steps_per_execution)
