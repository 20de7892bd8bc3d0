"""Score a model bundle on labelled face sets: accuracy, per-class recall, confusion matrix,
and calibration (expected calibration error before and after the bundle's temperature).

    python -m services.classify.evaluate ../shared/data/fer2013/publictest.npz --flip-tta --zoom-tta

Each .npz holds ``images`` (uint8 N x S x S grey, any S) and ``labels`` (indices into the
bundle's classes: FER2013 order for the shipped model). Faces are resized exactly as the
classify service resizes them. Figures are given for the single view, with ``--flip-tta`` also
for the mean with the mirror image, and with ``--zoom-tta`` also for the served 6 views. The
last line on stdout is one JSON object covering all files.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from services.classify.datasets import DatasetError, FaceSet, load_npz
from shared.classifier import (
    DEFAULT_ZOOM_TTA,
    RUNTIMES,
    Classifier,
    apply_temperature,
    load_classifier,
    nll,
    views_key,
)
from shared.model_bundle import DEFAULT_BUNDLE, BundleError, BundleMeta, read_meta

EXIT_USAGE = 2
ECE_BINS = 15
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Scores:
    n: int
    accuracy: float
    per_class_recall: dict[str, float | None]  # None: no faces of that class
    confusion: IntArray  # rows = true class, columns = predicted class


@dataclass(frozen=True)
class Predictions:
    """Labels and uncalibrated probabilities of one file, per set of views (``views_key`` names:
    ``single`` always, then ``flip`` and ``flip+zoom...`` as asked for)."""

    path: Path
    labels: IntArray
    probs: dict[str, FloatArray]

    @property
    def plain(self) -> IntArray:
        return self.probs["single"].argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class Reliability:
    """Confidence bins: faces per bin, their mean confidence and their accuracy (0 when empty)."""

    counts: IntArray
    confidence: FloatArray
    accuracy: FloatArray

    @property
    def ece(self) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return 0.0
        return float(np.sum(self.counts * np.abs(self.accuracy - self.confidence)) / total)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.classify.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("npz", nargs="+", type=Path, help=".npz files with 'images' and 'labels'")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="model bundle folder")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="auto")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = runtime default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--flip-tta", action="store_true",
                   help="also score the mean of each face's and its mirror image's probabilities")
    p.add_argument("--zoom-tta", action="store_true",
                   help="with --flip-tta: the second score also averages views zoomed by "
                        + ", ".join(map(str, DEFAULT_ZOOM_TTA)) + " (as the classify service serves)")
    p.add_argument("--reliability-png", type=Path, default=None,
                   help="write a reliability diagram (before and after calibration) for the widest set of "
                        "views asked for (one per file, like --confusion-png)")
    p.add_argument("--confusion-png", type=Path, default=None,
                   help="write the confusion matrix as an image (one per file: the file's stem is appended "
                        "when several are given)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def load_sets(paths: Sequence[Path], meta: BundleMeta) -> list[FaceSet]:
    """Read and check every file before the model loads, so bad input fails fast."""
    sets = []
    for path in paths:
        faces = _load_one(path, meta)
        if len(faces.labels) == 0:
            raise DatasetError(f"{path}: holds no faces")
        sets.append(faces)
    return sets


def _load_one(path: Path, meta: BundleMeta) -> FaceSet:
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, not an .npz file")
    try:
        return load_npz(path, classes=meta.classes, size=meta.input_size)
    except DatasetError:
        raise
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        # np.load reports a non-.npz file in several ways (pickle refusal, bare array, bad zip).
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc


def view_sets(flip_tta: bool, zoom_tta: tuple[float, ...]) -> list[str]:
    """The view sets scored: the single view, then flip, then flip + zoom (as far as asked)."""
    keys = ["single"]
    if flip_tta:
        keys.append(views_key(True, ()))
        if zoom_tta:
            keys.append(views_key(True, zoom_tta))
    return keys


def predict_set(clf: Classifier, path: Path, faces: FaceSet, batch_size: int, flip_tta: bool,
                zoom_tta: tuple[float, ...] = ()) -> Predictions:
    """Every view is run once; the single, flip and flip + zoom means are taken from them."""
    clf.flip_tta, clf.zoom_tta = flip_tta, zoom_tta if flip_tta else ()
    try:
        views = np.concatenate([clf.predict_views(faces.images[i:i + batch_size])
                                for i in range(0, len(faces.images), batch_size)], axis=1)
    finally:
        clf.flip_tta, clf.zoom_tta = False, ()
    probs = {"single": views[0]}
    if flip_tta:
        mirror = len(views) // 2  # the mirror images follow the unflipped views in the same order
        probs[views_key(True, ())] = (views[0] + views[mirror]) / 2
        if zoom_tta:
            probs[views_key(True, zoom_tta)] = views.mean(axis=0)
    return Predictions(path, faces.labels, {k: np.asarray(v, dtype=np.float32) for k, v in probs.items()})


def reliability(probs: FloatArray, labels: IntArray, bins: int = ECE_BINS) -> Reliability:
    """Faces binned by confidence (the top probability) into ``bins`` equal-width bins, each
    bin (lower, upper]; the expected calibration error is the count-weighted mean gap between
    a bin's accuracy and its mean confidence."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    mean_conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    accuracy = np.bincount(index, weights=correct, minlength=bins) / safe
    return Reliability(counts.astype(np.int64), mean_conf.astype(np.float32), accuracy.astype(np.float32))


def expected_calibration_error(probs: FloatArray, labels: IntArray, bins: int = ECE_BINS) -> float:
    return reliability(probs, labels, bins).ece


def calibration_json(probs: FloatArray, labels: IntArray, temperature: float) -> dict[str, float]:
    calibrated = apply_temperature(probs, temperature)
    return {"temperature": temperature,
            "ece": expected_calibration_error(probs, labels),
            "ece_calibrated": expected_calibration_error(calibrated, labels),
            "nll": nll(probs, labels), "nll_calibrated": nll(calibrated, labels)}


def confusion_matrix(labels: IntArray, predicted: IntArray, num_classes: int) -> IntArray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def score(labels: IntArray, predicted: IntArray, classes: Sequence[str]) -> Scores:
    confusion = confusion_matrix(labels, predicted, len(classes))
    support = confusion.sum(axis=1)
    recall = {name: (float(confusion[i, i] / support[i]) if support[i] else None) for i, name in enumerate(classes)}
    accuracy = float(np.trace(confusion) / len(labels)) if len(labels) else 0.0
    return Scores(len(labels), accuracy, recall, confusion)


def scores_json(scores: Scores) -> dict[str, Any]:
    return {"n": scores.n, "accuracy": scores.accuracy, "per_class_recall": scores.per_class_recall,
            "confusion": scores.confusion.tolist()}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_scores(title: str, plain: Scores, flipped: Scores | None, classes: Sequence[str],
                  tta: str = "flip TTA") -> str:
    width = max(len(c) for c in classes) + 2
    lines = [f"{title}: {plain.n} faces, accuracy {plain.accuracy:.4f}"
             + (f", with {tta} {flipped.accuracy:.4f}" if flipped else "")]
    lines.append(f"  {'class':<{width}}{'n':>6}  {'recall':>8}" + (f"  {tta:>13}" if flipped else ""))
    support = plain.confusion.sum(axis=1)
    for i, name in enumerate(classes):
        row = f"  {name:<{width}}{support[i]:>6}  {_fmt(plain.per_class_recall[name]):>8}"
        if flipped:
            row += f"  {_fmt(flipped.per_class_recall[name]):>13}"
        lines.append(row)
    lines.append("  confusion (rows = true, columns = predicted):")
    lines.append("  " + " " * width + "".join(f"{c[:8]:>9}" for c in classes))
    for i, name in enumerate(classes):
        lines.append(f"  {name:<{width}}" + "".join(f"{v:>9}" for v in plain.confusion[i]))
    return "\n".join(lines)


def draw_confusion(confusion: IntArray, classes: Sequence[str], title: str) -> npt.NDArray[np.uint8]:
    """Cells shaded by row share (recall on the diagonal), annotated with counts."""
    cell, left, top, font = 64, 120, 120, cv2.FONT_HERSHEY_SIMPLEX
    k = len(classes)
    image = np.full((top + k * cell + 40, left + k * cell + 20, 3), 255, dtype=np.uint8)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    shades = cv2.applyColorMap((share * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    for i in range(k):
        for j in range(k):
            y, x = top + i * cell, left + j * cell
            colour = tuple(int(c) for c in shades[i, j])
            cv2.rectangle(image, (x, y), (x + cell - 1, y + cell - 1), colour, thickness=-1)
            ink = (0, 0, 0) if share[i, j] > 0.6 else (255, 255, 255)
            cv2.putText(image, str(confusion[i, j]), (x + 6, y + cell // 2 + 5), font, 0.45, ink, 1, cv2.LINE_AA)
        cv2.putText(image, classes[i][:10], (6, top + i * cell + cell // 2 + 5), font, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    _draw_column_names(image, classes, left, top, cell)
    cv2.putText(image, title, (6, 22), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, "rows: true class, columns: predicted", (6, image.shape[0] - 14), font, 0.45,
                (80, 80, 80), 1, cv2.LINE_AA)
    return image


def _draw_column_names(image: npt.NDArray[np.uint8], classes: Sequence[str], left: int, top: int, cell: int) -> None:
    # cv2 cannot write rotated text: draw the names on a strip and rotate the strip instead.
    strip = np.full((len(classes) * cell, top - 40, 3), 255, dtype=np.uint8)
    for j, name in enumerate(classes):
        cv2.putText(strip, name[:10], (4, j * cell + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    rotated = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    image[40:top, left:left + rotated.shape[1]] = rotated


def png_path(base: Path, source: Path, several: bool) -> Path:
    return base.with_name(f"{base.stem}_{source.stem}{base.suffix or '.png'}") if several else base


def write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: cannot write image")


def draw_reliability(panels: Sequence[tuple[str, Reliability]], title: str) -> npt.NDArray[np.uint8]:
    """Side-by-side reliability diagrams: per confidence bin, a bar to the bin's accuracy
    (shaded by how many faces it holds) against the diagonal of perfect calibration."""
    plot, margin, font = 300, 50, cv2.FONT_HERSHEY_SIMPLEX
    width = len(panels) * (plot + margin) + margin
    image = np.full((plot + 2 * margin + 40, width, 3), 255, dtype=np.uint8)
    cv2.putText(image, title, (8, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    for p, (name, rel) in enumerate(panels):
        x0, y0 = margin + p * (plot + margin), margin + 20  # top-left of the plot area
        bins = len(rel.counts)
        step = plot / bins
        most = max(int(rel.counts.max()), 1)
        for b in range(bins):
            if rel.counts[b] == 0:
                continue
            shade = int(220 - 180 * rel.counts[b] / most)
            top = y0 + plot - int(rel.accuracy[b] * plot + 0.5)
            left, right = x0 + int(b * step) + 1, x0 + int((b + 1) * step) - 1
            cv2.rectangle(image, (left, top), (right, y0 + plot), (shade, shade // 2 + 60, 40), thickness=-1)
            mid = y0 + plot - int(rel.confidence[b] * plot + 0.5)  # mean confidence of the bin
            cv2.line(image, (left, mid), (right, mid), (0, 0, 200), 2)
        cv2.line(image, (x0, y0 + plot), (x0 + plot, y0), (120, 120, 120), 1, cv2.LINE_AA)
        cv2.rectangle(image, (x0, y0), (x0 + plot, y0 + plot), (0, 0, 0), 1)
        cv2.putText(image, f"{name}: ECE {rel.ece:.4f}", (x0, y0 - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for tick in (0.0, 0.5, 1.0):
            cv2.putText(image, f"{tick:g}", (x0 + int(tick * plot) - 6, y0 + plot + 16), font, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
            cv2.putText(image, f"{tick:g}", (x0 - 26, y0 + plot - int(tick * plot) + 4), font, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
    cv2.putText(image, "x: confidence, bars: accuracy, red: mean confidence in the bin, grey: perfect calibration",
                (8, image.shape[0] - 10), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    return image


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    meta = read_meta(args.model)
    sets = load_sets(args.npz, meta)
    clf = load_classifier(args.model, args.runtime, args.threads)
    zoom = DEFAULT_ZOOM_TTA if args.zoom_tta else ()
    preds = [predict_set(clf, path, faces, args.batch_size, args.flip_tta, zoom)
             for path, faces in zip(args.npz, sets, strict=True)]
    files = [_report_file(p, meta, args) for p in preds]
    combined = _combine(preds)
    summary = _report(f"all {len(preds)} files", combined, meta, args) if len(preds) > 1 else files[0]
    return {"model_version": meta.version, "runtime": clf.runtime, "model": str(args.model),
            "classes": list(meta.classes), "ece_bins": ECE_BINS, **summary, "files": files}


def _report_file(pred: Predictions, meta: BundleMeta, args: argparse.Namespace) -> dict[str, Any]:
    result = {"path": str(pred.path), **_report(pred.path.name, pred, meta, args)}
    several = len(args.npz) > 1
    if args.confusion_png is not None:
        target = png_path(args.confusion_png, pred.path, several)
        title = f"{pred.path.name}: accuracy {result['accuracy']:.4f} ({result['n']} faces)"
        write_png(target, draw_confusion(np.asarray(result["confusion"], dtype=np.int64), meta.classes, title))
        result["confusion_png"] = str(target)
    if args.reliability_png is not None:
        key = list(pred.probs)[-1]
        temperature = meta.temperatures.get(key, 1.0)
        probs = pred.probs[key]
        panels = [("uncalibrated", reliability(probs, pred.labels)),
                  (f"temperature {temperature:.3f}", reliability(apply_temperature(probs, temperature), pred.labels))]
        target = png_path(args.reliability_png, pred.path, several)
        write_png(target, draw_reliability(panels, f"{pred.path.name}, views: {key} ({len(pred.labels)} faces)"))
        result["reliability_png"] = str(target)
    return result


TTA_FIELDS = {"flip": "flip_tta", views_key(True, DEFAULT_ZOOM_TTA): "flip_zoom_tta"}


def _report(title: str, pred: Predictions, meta: BundleMeta, args: argparse.Namespace) -> dict[str, Any]:
    """Print the human-readable figures and return the JSON ones."""
    classes = meta.classes
    plain = score(pred.labels, pred.plain, classes)
    widest = list(pred.probs)[-1]
    tta = None if widest == "single" else score(pred.labels, pred.probs[widest].argmax(axis=1), classes)
    label = "flip+zoom TTA" if widest != "flip" else "flip TTA"
    print(format_scores(title, plain, tta, classes, label), flush=True)
    result = scores_json(plain)
    calibration = {}
    for key, probs in pred.probs.items():
        calibration[key] = calibration_json(probs, pred.labels, meta.temperatures.get(key, 1.0))
        if key != "single":
            s = score(pred.labels, probs.argmax(axis=1).astype(np.int64), classes)
            result[TTA_FIELDS.get(key, key)] = {"accuracy": s.accuracy, "per_class_recall": s.per_class_recall}
    result["calibration"] = calibration
    for key, c in calibration.items():
        print(f"  {key}: ECE ({ECE_BINS} bins) {c['ece']:.4f} uncalibrated, {c['ece_calibrated']:.4f} at "
              f"temperature {c['temperature']:.3f}", flush=True)
    return result


def _combine(preds: Sequence[Predictions]) -> Predictions:
    return Predictions(
        Path("all"),
        np.concatenate([p.labels for p in preds]),
        {key: np.concatenate([p.probs[key] for p in preds]) for key in preds[0].probs},
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = evaluate(args)
    except (DatasetError, BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
