"""Write a model bundle: Keras file, LiteRT flatbuffers and metadata.

    python -m services.classify.export BUNDLE --int8 [--calibration NPZ]

adds ``model_int8.tflite`` (int8 weights and activations, float input and output) to an
existing bundle, calibrated on training faces.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from shared.model_bundle import KERAS_FILE, TFLITE_FILE, TFLITE_INT8_FILE, BundleMeta, read_meta, write_meta

CALIBRATION_FACES = 1024


def to_tflite(model: keras.Model) -> bytes:
    """Float32 LiteRT model with a dynamic batch dimension (from the Keras model directly:
    converting a hand-made concrete function gave NaN outputs here)."""
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()  # type: ignore[no-any-return]


def to_tflite_int8(model: keras.Model, faces: np.ndarray) -> bytes:
    """Int8 weights and activations; ``faces`` (N, S, S) uint8 set the activation ranges."""
    batches = np.asarray(faces, dtype=np.float32)[..., None]

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(0, len(batches), 32):
            yield [batches[i:i + 32]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    return converter.convert()  # type: ignore[no-any-return]


def write_bundle(model: keras.Model, bundle: Path, classes: tuple[str, ...], version: str,
                 record: dict[str, Any], calibration: np.ndarray | None = None) -> None:
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    model.save(bundle / KERAS_FILE)
    (bundle / TFLITE_FILE).write_bytes(to_tflite(model))
    if calibration is not None:
        (bundle / TFLITE_INT8_FILE).write_bytes(to_tflite_int8(model, calibration))
    write_meta(bundle, BundleMeta(classes=classes, version=version, input_size=int(model.input_shape[1]),
                                  extra=record))


def calibration_faces(path: Path, size: int, n: int = CALIBRATION_FACES, seed: int = 0) -> np.ndarray:
    """``n`` faces drawn at random from an .npz or class folders, at the model's input size."""
    from services.classify.datasets import load_any

    data = load_any(path, size=size)
    pick = np.random.default_rng(seed).permutation(len(data.labels))[:n]
    return np.asarray(data.images[pick])


def main(argv: Sequence[str] | None = None) -> int:
    from services.classify.datasets import default_fer_dir

    p = argparse.ArgumentParser(prog="python -m services.classify.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="model bundle folder (model.keras + model.json)")
    p.add_argument("--int8", action="store_true", required=True, help="write model_int8.tflite")
    p.add_argument("--calibration", type=Path, default=default_fer_dir() / "train.npz",
                   help="training faces for the activation ranges (.npz or folder per class)")
    args = p.parse_args(argv)
    meta = read_meta(args.bundle)
    if not args.calibration.exists():
        p.error(f"--calibration {args.calibration} not found")
    model = keras.models.load_model(args.bundle / KERAS_FILE, compile=False)
    faces = calibration_faces(args.calibration, meta.input_size)
    (args.bundle / TFLITE_INT8_FILE).write_bytes(to_tflite_int8(model, faces))
    print(f"wrote {args.bundle / TFLITE_INT8_FILE} ({len(faces)} calibration faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
