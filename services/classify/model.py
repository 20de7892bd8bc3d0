"""Mini-XCEPTION (Arriaga et al. 2017) and the options this project trains with.

The model takes raw uint8 grey values as float32 (N, 64, 64, 1) and returns softmax
probabilities: scaling to [-1, 1] lives inside the graph so Keras, LiteRT and every caller
share one preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from keras import layers, regularizers

INPUT_SIZE = 64


@dataclass(frozen=True)
class ArchConfig:
    """Shape of the network. The defaults are the published Mini-XCEPTION."""

    num_classes: int = 7
    width: float = 1.0
    internal_size: int = INPUT_SIZE
    dropout: float = 0.0
    l2: float = 0.01


def _channels(base: int, width: float) -> int:
    return max(4, round(base * width / 4.0) * 4)


def _module(x: keras.KerasTensor, channels: int, reg: regularizers.Regularizer | None) -> keras.KerasTensor:
    residual = layers.Conv2D(channels, 1, strides=2, padding="same", use_bias=False)(x)
    residual = layers.BatchNormalization()(residual)
    x = layers.SeparableConv2D(
        channels, 3, padding="same", depthwise_regularizer=reg, pointwise_regularizer=reg, use_bias=False
    )(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(
        channels, 3, padding="same", depthwise_regularizer=reg, pointwise_regularizer=reg, use_bias=False
    )(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    return layers.Add()([x, residual])


def build_model(cfg: ArchConfig = ArchConfig()) -> keras.Model:
    """Build Mini-XCEPTION; ``width`` scales every channel count, ``internal_size`` resizes first."""
    reg = regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    inputs = keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 1), name="faces")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    if cfg.internal_size != INPUT_SIZE:
        # FER2013 is 48x48: running the trunk at its native size costs 44% fewer MACs.
        x = layers.Resizing(cfg.internal_size, cfg.internal_size, interpolation="bilinear")(x)
    for _ in range(2):
        x = layers.Conv2D(_channels(8, cfg.width), 3, kernel_regularizer=reg, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    for base in (16, 32, 64, 128):
        x = _module(x, _channels(base, cfg.width), reg)
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout)(x)
    x = layers.Conv2D(cfg.num_classes, 3, padding="same")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mini_xception")


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass (the convolutions; the model has no dense layer)."""
    total = 0
    for layer in model.layers:
        out_shape = getattr(layer, "output", None)
        if out_shape is None or not hasattr(layer, "kernel_size"):
            continue
        _, height, width, out_ch = layer.output.shape
        in_ch = layer.input.shape[-1]
        kh, kw = layer.kernel_size
        if isinstance(layer, layers.SeparableConv2D):
            total += height * width * in_ch * kh * kw + height * width * in_ch * out_ch
        elif isinstance(layer, layers.DepthwiseConv2D):
            total += height * width * in_ch * kh * kw
        else:
            total += height * width * in_ch * out_ch * kh * kw
    return int(total)


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, batch_size: int = 512) -> int:
    """Replace every BatchNormalization layer's moving mean and variance by their average over
    ``images`` (un-augmented faces), returning the number of layers changed.

    Training ends with statistics gathered on augmented batches (shifted, rotated, zoomed), while
    the service sees plain crops: re-estimating them on plain faces costs one forward pass and
    moves no weight. Each batch runs in training mode (normalised with its own statistics, as in
    training) and the moving statistics are set to the running mean over batches.
    """
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    if not norms or len(images) == 0:
        return 0
    saved = [layer.momentum for layer in norms]
    try:
        for k, start in enumerate(range(0, len(images), batch_size)):
            for layer in norms:
                # moving <- moving * k/(k+1) + batch / (k+1): the plain mean of the batches so far.
                layer.momentum = k / (k + 1)
            model(np.asarray(images[start:start + batch_size], dtype=np.float32), training=True)
    finally:
        for layer, momentum in zip(norms, saved, strict=True):
            layer.momentum = momentum
    return len(norms)
