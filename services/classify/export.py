"""Write a model bundle: Keras file, LiteRT flatbuffer and metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from shared.model_bundle import KERAS_FILE, TFLITE_FILE, BundleMeta, write_meta


def to_tflite(model: keras.Model) -> bytes:
    """Float32 LiteRT model with a dynamic batch dimension (from the Keras model directly:
    converting a hand-made concrete function gave NaN outputs here)."""
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()  # type: ignore[no-any-return]


def write_bundle(model: keras.Model, bundle: Path, classes: tuple[str, ...], version: str,
                 record: dict[str, Any]) -> None:
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    model.save(bundle / KERAS_FILE)
    (bundle / TFLITE_FILE).write_bytes(to_tflite(model))
    write_meta(bundle, BundleMeta(classes=classes, version=version, input_size=int(model.input_shape[1]),
                                  extra=record))
