"""Emotion classification: uint8 face crops (N, 64, 64) in, (N, C) probabilities out.

Probabilities are calibrated when the bundle holds a temperature for the views in use (fitted on
held-out faces, ``model.json``'s ``temperatures``): the views' mean is sharpened or softened by it.

Two runtimes read the same bundle: LiteRT (``model.tflite``; the default, measured faster
here and free of TensorFlow's import cost) and TensorFlow (``model.keras``). Both pad each
batch up to a fixed bucket size, so shapes repeat and nothing is retraced or reallocated.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from shared.imaging import resize_faces
from shared.model_bundle import (
    DEFAULT_BUNDLE,
    KERAS_FILE,
    TFLITE_FILE,
    TFLITE_INT8_FILE,
    BundleError,
    BundleMeta,
    read_meta,
)

log = logging.getLogger(__name__)

# Powers of two and the steps between them: with six test-time views per face, one to four
# faces make 6, 12, 18 or 24 rows, which powers of two alone would pad by up to 78%.
BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Averaging each face with its mirror image: chosen by measurement on PublicTest (see the model card).
DEFAULT_FLIP_TTA = True
# Also averaging views zoomed in and out by these factors (about the crop's centre): chosen on
# PublicTest like the flip (see the model card); each factor costs one more pass (two with flip).
# The views served for bundles whose model.json names none (``zoom_tta``, see served_zoom).
DEFAULT_ZOOM_TTA: tuple[float, ...] = (0.9, 1.1)
Runtime = Literal["auto", "litert", "litert-int8", "tensorflow"]
RUNTIMES: tuple[Runtime, ...] = ("auto", "litert", "litert-int8", "tensorflow")
FloatArray = npt.NDArray[np.float32]


class Classifier(Protocol):
    meta: BundleMeta
    runtime: str
    flip_tta: bool
    zoom_tta: tuple[float, ...]
    temperature: float | None

    @property
    def classes(self) -> tuple[str, ...]: ...

    def predict(self, crops: npt.NDArray[np.uint8]) -> FloatArray: ...

    def predict_views(self, crops: npt.NDArray[np.uint8]) -> FloatArray: ...


def zoom_faces(crops: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    """Each crop scaled by ``factor`` about its centre, same size (edges replicated when < 1)."""
    size = crops.shape[1]
    centre = (size - 1) / 2.0
    matrix = cv2.getRotationMatrix2D((centre, centre), 0.0, factor)
    return np.stack([cv2.warpAffine(c, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE) for c in crops])


def views_key(flip_tta: bool, zoom_tta: tuple[float, ...]) -> str:
    """Name of a set of test-time views, as calibration temperatures are stored: ``single``,
    ``flip``, ``zoom0.9,1.1`` or ``flip+zoom0.9,1.1``."""
    parts = (["flip"] if flip_tta else []) + (["zoom" + ",".join(f"{z:g}" for z in zoom_tta)] if zoom_tta else [])
    return "+".join(parts) or "single"


def apply_temperature(probs: FloatArray, temperature: float) -> FloatArray:
    """Rescale probabilities as if their logits were divided by ``temperature`` (1 = unchanged)."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return np.asarray(scaled / scaled.sum(axis=-1, keepdims=True), dtype=np.float32)


def nll(probs: FloatArray, labels: npt.NDArray[np.int64]) -> float:
    """Mean negative log-likelihood of the true labels."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))


def fit_temperature(probs: FloatArray, labels: npt.NDArray[np.int64], low: float = 0.05, high: float = 20.0) -> float:
    """The temperature minimising the labels' negative log-likelihood (golden-section search on
    log T; the NLL is convex in 1/T, hence unimodal in log T)."""
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, float(np.exp(log_t))), labels)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def bucket_for(n: int) -> int:
    for b in BUCKETS:
        if n <= b:
            return b
    return BUCKETS[-1]


class _BucketedClassifier:
    """Splits and pads batches to the bucket sizes; subclasses run one padded batch."""

    runtime = "base"

    def __init__(self, meta: BundleMeta) -> None:
        self.meta = meta
        self.flip_tta = False
        self.zoom_tta: tuple[float, ...] = ()
        # None: the bundle's temperature for the views in use (1 when it has none); a number overrides it.
        self.temperature: float | None = None
        self._lock = threading.Lock()

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    def active_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return self.meta.temperatures.get(views_key(self.flip_tta, self.zoom_tta), 1.0)

    def predict(self, crops: npt.NDArray[np.uint8]) -> FloatArray:
        """Probabilities per crop: the mean over the test-time views, then calibrated."""
        return apply_temperature(self.predict_raw(crops), self.active_temperature())

    def predict_raw(self, crops: npt.NDArray[np.uint8]) -> FloatArray:
        """The mean of the views' probabilities, uncalibrated."""
        views = self.predict_views(crops)
        if len(views) == 1:
            return views[0]
        return np.asarray(views.mean(axis=0), dtype=np.float32)

    def predict_views(self, crops: npt.NDArray[np.uint8]) -> FloatArray:
        """Uncalibrated probabilities of every test-time view, (V, N, C): the crop, then each zoom
        factor in turn, then (with flip TTA) the mirror images of these in the same order."""
        crops = np.asarray(crops)
        if crops.ndim == 2:
            crops = crops[None]
        if crops.ndim != 3 or crops.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops (N, H, W), got {crops.dtype} {crops.shape}")
        size = self.meta.input_size
        crops = resize_faces(crops, size)
        views = [crops] + [zoom_faces(crops, z) for z in self.zoom_tta]
        if self.flip_tta:
            views += [v[:, :, ::-1] for v in views]
        if len(views) == 1:
            return self._predict(crops)[None]
        probs = self._predict(np.concatenate(views))
        return np.asarray(probs.reshape(len(views), len(crops), -1), dtype=np.float32)

    def _predict(self, crops: npt.NDArray[np.uint8]) -> FloatArray:
        size = self.meta.input_size
        out = np.empty((len(crops), len(self.classes)), dtype=np.float32)
        with self._lock:
            for start in range(0, len(crops), BUCKETS[-1]):
                chunk = crops[start:start + BUCKETS[-1]]
                n = len(chunk)
                padded = np.zeros((bucket_for(n), size, size, 1), dtype=np.float32)
                padded[:n, ..., 0] = chunk
                out[start:start + n] = self._run(padded)[:n]
        return out

    def _run(self, batch: FloatArray) -> FloatArray:
        raise NotImplementedError

    def warm_up(self) -> None:
        for b in BUCKETS:
            self._run(np.zeros((b, self.meta.input_size, self.meta.input_size, 1), dtype=np.float32))


class LiteRTClassifier(_BucketedClassifier):
    runtime = "litert"

    def __init__(self, bundle: Path, meta: BundleMeta, threads: int, int8: bool = False) -> None:
        super().__init__(meta)
        from ai_edge_litert.interpreter import Interpreter

        name = TFLITE_INT8_FILE if int8 else TFLITE_FILE
        self.runtime = "litert-int8" if int8 else "litert"
        path = Path(bundle) / name
        if not path.exists():
            hint = " (python -m services.classify.export BUNDLE --int8 writes it)" if int8 else ""
            raise BundleError(f"model bundle {bundle}: {name} not found{hint}")
        self._model = path.read_bytes()
        self._threads = threads
        self._interp_cls = Interpreter
        self._by_bucket: dict[int, Any] = {}

    def _interpreter(self, batch: int) -> Any:
        interp = self._by_bucket.get(batch)
        if interp is None:
            interp = self._interp_cls(model_content=self._model, num_threads=self._threads)
            index = interp.get_input_details()[0]["index"]
            interp.resize_tensor_input(index, [batch, self.meta.input_size, self.meta.input_size, 1])
            interp.allocate_tensors()
            self._by_bucket[batch] = interp
        return interp

    def _run(self, batch: FloatArray) -> FloatArray:
        interp = self._interpreter(len(batch))
        interp.set_tensor(interp.get_input_details()[0]["index"], batch)
        interp.invoke()
        return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]), dtype=np.float32)


class TensorFlowClassifier(_BucketedClassifier):
    runtime = "tensorflow"

    def __init__(self, bundle: Path, meta: BundleMeta, threads: int) -> None:
        super().__init__(meta)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        if threads > 0:
            _set_tf_threads(tf, threads)
        path = Path(bundle) / KERAS_FILE
        if not path.exists():
            raise BundleError(f"model bundle {bundle}: {KERAS_FILE} not found")
        model = keras.models.load_model(path, compile=False)
        size = meta.input_size
        # One trace for every bucket: the batch dimension is left open in the signature.
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)])

    def _run(self, batch: FloatArray) -> FloatArray:
        return np.asarray(self._fn(batch), dtype=np.float32)


def _set_tf_threads(tf: Any, threads: int) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process
        pass


def litert_available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def _check_output_width(clf: _BucketedClassifier, bundle: Path) -> None:
    size = clf.meta.input_size
    width = clf._run(np.zeros((1, size, size, 1), dtype=np.float32)).shape[-1]
    if width != len(clf.classes):
        raise BundleError(f"model bundle {bundle}: the network has {width} outputs but model.json lists "
                          f"{len(clf.classes)} classes")


def served_zoom(meta: BundleMeta) -> tuple[float, ...]:
    """The zoom factors a bundle is served with: its own choice, else the default views."""
    return DEFAULT_ZOOM_TTA if meta.zoom_tta is None else meta.zoom_tta


def load_classifier(bundle: Path | None = None, runtime: Runtime = "auto", threads: int = 0,
                    warm: bool = True, flip_tta: bool = False,
                    zoom_tta: tuple[float, ...] | None = ()) -> _BucketedClassifier:
    """Open a model bundle with the chosen runtime (``auto``: LiteRT when installed); ``zoom_tta``
    None serves the bundle's own zoom views (:func:`served_zoom`)."""
    bundle = Path(bundle or DEFAULT_BUNDLE)
    meta = read_meta(bundle)
    if zoom_tta is None:
        zoom_tta = served_zoom(meta)
    chosen = runtime
    if runtime == "auto":
        chosen = "litert" if litert_available() and (bundle / TFLITE_FILE).exists() else "tensorflow"
    clf: _BucketedClassifier
    if chosen in ("litert", "litert-int8"):
        clf = LiteRTClassifier(bundle, meta, threads or 1, int8=chosen == "litert-int8")
    else:
        clf = TensorFlowClassifier(bundle, meta, threads)
    clf.flip_tta = flip_tta
    clf.zoom_tta = tuple(zoom_tta)
    _check_output_width(clf, bundle)
    if warm:
        clf.warm_up()
    log.info("model %s (%s) via %s, classes %s", meta.version, bundle, clf.runtime, ",".join(meta.classes))
    return clf
