"""Write a model bundle: Keras file, LiteRT flatbuffers and metadata.

    python -m services.classify.export BUNDLE --int8 [--calibration NPZ]
    python -m services.classify.export BUNDLE --temperature [--val NPZ]
    python -m services.classify.export BUNDLE --serve-zoom [F ...]

``--int8`` adds ``model_int8.tflite`` (int8 weights and activations, float input and output) to
an existing bundle, its activation ranges set on training faces. ``--temperature`` fits a
softmax temperature per set of test-time views (single, flip, flip + zoom as served) on the
selection faces (default FER2013 PublicTest) and stores them in ``model.json``; the classifier
applies them after averaging the views. ``--serve-zoom`` records the zoom factors the bundle is
served with (``model.json`` ``zoom_tta``; none given: flips only), chosen per model on the
selection set with ``python -m services.classify.evaluate --flip-tta --zoom-tta``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from shared.model_bundle import (
    KERAS_FILE,
    TFLITE_FILE,
    TFLITE_INT8_FILE,
    BundleError,
    BundleMeta,
    read_meta,
    read_zoom_tta,
    write_meta,
)

if TYPE_CHECKING:
    from services.classify.datasets import FaceSet

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


def fit_temperatures(bundle: Path, faces: FaceSet) -> dict[str, float]:
    """Temperatures for the single view, flip and flip + zoom (served) on labelled ``faces``,
    fitted to the float LiteRT model's uncalibrated probabilities."""
    from services.classify.evaluate import predict_set
    from shared.classifier import DEFAULT_ZOOM_TTA, fit_temperature, load_classifier

    clf = load_classifier(bundle, "litert")
    pred = predict_set(clf, Path("fit"), faces, 64, flip_tta=True, zoom_tta=DEFAULT_ZOOM_TTA)
    return {key: round(fit_temperature(probs, pred.labels), 4) for key, probs in pred.probs.items()}


def store_temperatures(bundle: Path, temperatures: dict[str, float], fitted_on: str) -> BundleMeta:
    meta = read_meta(bundle)
    extra = {**meta.extra, "calibration": {"fitted_on": fitted_on, "method": "temperature, minimum NLL"}}
    updated = dataclasses.replace(meta, temperatures=dict(temperatures), extra=extra)
    write_meta(bundle, updated)
    return updated


def calibrate_bundle(bundle: Path, faces: FaceSet, fitted_on: str) -> dict[str, float]:
    temperatures = fit_temperatures(bundle, faces)
    store_temperatures(bundle, temperatures, fitted_on)
    return temperatures


def main(argv: Sequence[str] | None = None) -> int:
    from services.classify.datasets import default_fer_dir, load_any

    p = argparse.ArgumentParser(prog="python -m services.classify.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="model bundle folder (model.keras + model.json)")
    p.add_argument("--int8", action="store_true", help="write model_int8.tflite")
    p.add_argument("--calibration", type=Path, default=default_fer_dir() / "train.npz",
                   help="training faces for the int8 activation ranges (.npz or folder per class)")
    p.add_argument("--temperature", action="store_true",
                   help="fit calibration temperatures on --val and store them in model.json")
    p.add_argument("--val", type=Path, default=default_fer_dir() / "publictest.npz",
                   help="labelled faces the temperatures are fitted on (never the test set)")
    p.add_argument("--serve-zoom", type=float, nargs="*", default=None, metavar="F",
                   help="store the zoom factors the bundle is served with in model.json (none: flips only)")
    args = p.parse_args(argv)
    if not (args.int8 or args.temperature or args.serve_zoom is not None):
        p.error("nothing to do: give --int8, --temperature and/or --serve-zoom")
    meta = read_meta(args.bundle)
    if args.serve_zoom is not None:
        try:
            zoom = read_zoom_tta(args.bundle, args.serve_zoom)
        except BundleError as exc:
            p.error(f"--serve-zoom {args.serve_zoom}: {exc}")
        write_meta(args.bundle, dataclasses.replace(meta, zoom_tta=zoom))
        print(f"served zoom views {list(zoom or ())} stored in {args.bundle / 'model.json'}")
    if args.int8:
        if not args.calibration.exists():
            p.error(f"--calibration {args.calibration} not found")
        model = keras.models.load_model(args.bundle / KERAS_FILE, compile=False)
        faces = calibration_faces(args.calibration, meta.input_size)
        (args.bundle / TFLITE_INT8_FILE).write_bytes(to_tflite_int8(model, faces))
        print(f"wrote {args.bundle / TFLITE_INT8_FILE} ({len(faces)} calibration faces)")
    if args.temperature:
        if not args.val.exists():
            p.error(f"--val {args.val} not found")
        temperatures = calibrate_bundle(args.bundle, load_any(args.val, size=meta.input_size), args.val.name)
        print(f"temperatures fitted on {args.val.name}: {temperatures}; stored in {args.bundle / 'model.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
