"""A model bundle: one folder holding the weights and the metadata that must travel with them.

Layout: ``model.keras`` (Keras 3), ``model.tflite`` (LiteRT), optionally ``model_int8.tflite``
(LiteRT, int8 weights and activations) and ``model.json`` (class names, input size, version,
calibration temperatures, the zoom views it is served with, training record). The services and
the CLI read class names, temperatures and served views from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FER2013_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "fer2013_mini_xception"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
# Optional: weights and activations in int8 (calibrated on training faces), faster on CPUs.
TFLITE_INT8_FILE = "model_int8.tflite"
META_FILE = "model.json"
# Bounds of a zoom factor about the crop's centre, for the bundle's served views and the settings alike.
ZOOM_RANGE = (0.5, 2.0)
MAX_ZOOM_VIEWS = 4


class BundleError(RuntimeError):
    """The bundle folder is missing, incomplete or its metadata is invalid."""


@dataclass(frozen=True)
class BundleMeta:
    classes: tuple[str, ...]
    version: str
    input_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)
    # Calibration: a softmax temperature per set of test-time views (key: shared.classifier.views_key),
    # fitted on held-out faces; a view set without one is served uncalibrated.
    temperatures: dict[str, float] = field(default_factory=dict)
    # Zoom factors the model is served with, chosen per model on its selection set (a larger trunk
    # may gain less from zoom views than they cost); None: the classifier's default views.
    zoom_tta: tuple[float, ...] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["classes"] = list(self.classes)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def read_meta(bundle: Path) -> BundleMeta:
    path = Path(bundle) / META_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"model bundle {bundle}: {META_FILE} not found") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"model bundle {bundle}: {META_FILE} is not valid JSON: {exc}") from exc
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise BundleError(f"model bundle {bundle}: 'classes' must be a non-empty list of names")
    temperatures = raw.get("temperatures", {})
    if not isinstance(temperatures, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in temperatures.items()
    ):
        raise BundleError(f"model bundle {bundle}: 'temperatures' must map view names to positive numbers")
    return BundleMeta(
        classes=tuple(classes),
        version=str(raw.get("version", "unknown")),
        input_size=int(raw.get("input_size", 64)),
        extra=dict(raw.get("extra", {})),
        temperatures={k: float(v) for k, v in temperatures.items()},
        zoom_tta=read_zoom_tta(bundle, raw.get("zoom_tta")),
    )


def read_zoom_tta(bundle: Path, value: Any) -> tuple[float, ...] | None:
    """The bundle's served zoom factors (``null`` or absent: none chosen), checked like the setting."""
    if value is None:
        return None
    low, high = ZOOM_RANGE
    if (not isinstance(value, list) or len(value) > MAX_ZOOM_VIEWS
            or not all(isinstance(z, int | float) and not isinstance(z, bool) and low <= z <= high for z in value)):
        raise BundleError(f"model bundle {bundle}: 'zoom_tta' must be a list of at most {MAX_ZOOM_VIEWS} zoom "
                          f"factors in [{low}, {high}], got {value!r}")
    return tuple(float(z) for z in value)


def write_meta(bundle: Path, meta: BundleMeta) -> None:
    Path(bundle).mkdir(parents=True, exist_ok=True)
    (Path(bundle) / META_FILE).write_text(meta.to_json())
