"""Peer comparison: the ``fer`` package next to this project's detect + classify, in one process,
on the same frames.

    python bench/peer.py [--frames 60] [--seconds 10] [--json bench/results/peer.json]

Frame sets (640x480 BGR): the shared.sample frames (one real face, panning) and frames tiled 2x2
with four faces. Both systems get the decoded BGR frame and return boxes and emotions:

- fer: ``FER(mtcnn=False)`` (OpenCV's frontal-face Haar cascade, minimum face 50 px, then its
  bundled quantised TFLite emotion model, one face per interpreter call), ``detect_emotions``;
- ours: shared.detection (Haar cascade, default settings, plus each --downscale-widths value,
  plus following known faces between keyframes, ``--follow``: the detect service's
  ``detector.keyframe_interval``; both frame sets are consecutive video frames)
  and shared.classifier with LiteRT (all faces of a frame in one batch).

Both run single-process and in-process (no Redis, no JPEG), timed per frame in interleaved
rounds (fer over the set, then ours, repeated until each has run --seconds) so background load
affects both alike. Reported: frames/s, faces found and recall against the known face boxes
(IoU >= 0.4), the top emotions each system assigned, and ours/fer frames/s. OpenCV runs with
--opencv-threads for both; our classifier with --threads; fer's interpreter with its defaults.

Needs the bench extra: ``pip install --no-deps fer`` (with TensorFlow, setuptools < 82 for
pkg_resources, requests and Pillow present; see pyproject's ``bench`` extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import cv2
import numpy as np

from shared.classifier import DEFAULT_FLIP_TTA, DEFAULT_ZOOM_TTA, load_classifier
from shared.detection import Detector, DetectorSettings, FollowingDetector, HaarDetector, detect_and_crop
from shared.imaging import UInt8Array
from shared.model_bundle import DEFAULT_BUNDLE
from shared.schema import Box

DEFAULT_JSON = benchlib.RESULTS / "peer.json"
Process = Callable[[UInt8Array], tuple[list[Box], list[str]]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60, help="frames per set")
    p.add_argument("--seconds", type=float, default=10.0, help="minimum measuring time per system and frame set")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--downscale-widths", type=int, nargs="+", default=[0, 320],
                   help="our detector.downscale_width values (0 = full frame, the default)")
    p.add_argument("--follow", type=int, nargs="*", default=[5], metavar="N",
                   help="also run ours at the smallest non-zero --downscale-widths value, following known faces "
                        "between keyframes every N frames (detector.keyframe_interval; the frame sets are videos)")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="our model bundle folder")
    p.add_argument("--threads", type=int, default=1, help="our LiteRT threads (the classify service's default)")
    p.add_argument("--opencv-threads", type=int, default=1, help="cv2.setNumThreads for both; 0 = OpenCV's default")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON report")
    args = p.parse_args(argv)
    if args.frames < 1 or args.seconds <= 0:
        p.error("--frames and --seconds must be positive")
    return args


@dataclass
class SystemRun:
    name: str
    process: Process
    times_s: list[float] = field(default_factory=list)
    match: benchlib.MatchCount = field(default_factory=benchlib.MatchCount)
    labels: Counter[str] = field(default_factory=Counter)

    def first_pass(self, frames: list[UInt8Array], truths: list[list[Box]]) -> None:
        """Untimed: faces found, recall and labels (deterministic, so one pass is enough)."""
        for frame, truth in zip(frames, truths, strict=True):
            boxes, labels = self.process(frame)
            self.match.add(truth, boxes)
            self.labels.update(labels)

    def timed_pass(self, frames: list[UInt8Array]) -> None:
        for frame in frames:
            t0 = time.perf_counter()
            self.process(frame)
            self.times_s.append(time.perf_counter() - t0)

    def report(self, n_frames: int) -> dict[str, Any]:
        busy = sum(self.times_s)
        timing = benchlib.Timing(self.times_s).to_dict()
        return {"system": self.name, "frames_timed": len(self.times_s), "busy_s": busy,
                "frames_per_s": len(self.times_s) / busy if busy else None,
                "median_ms_per_frame": timing["median_ms"], "p95_ms_per_frame": timing["p95_ms"],
                "faces_found": self.match.detections, "faces_per_frame": self.match.detections / n_frames,
                **self.match.to_dict(), "top_emotions": dict(self.labels.most_common())}


def make_fer() -> tuple[Process, dict[str, Any]]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        from fer.fer import FER

        detector = FER(mtcnn=False)
    logging.getLogger().setLevel(logging.WARNING)  # fer configures the root logger at INFO
    load_s = time.perf_counter() - t0

    def process(frame: UInt8Array) -> tuple[list[Box], list[str]]:
        found = detector.detect_emotions(frame)
        boxes = [benchlib.box_of(f["box"]) for f in found]
        labels = [max(f["emotions"], key=f["emotions"].get).capitalize() for f in found]
        return boxes, labels

    import fer

    return process, {"version": getattr(fer, "__version__", "unknown"), "import_and_load_s": load_s,
                     "settings": "FER(mtcnn=False): Haar frontal-face cascade, scale 1.1, min_neighbors 5, "
                                 "min face 50 px; quantised TFLite model, one face per call"}


def make_ours(args: argparse.Namespace, downscale_width: int,
              keyframe_interval: int = 0) -> tuple[Process, dict[str, Any]]:
    t0 = time.perf_counter()
    cfg = DetectorSettings(downscale_width=downscale_width, keyframe_interval=keyframe_interval)
    detector: Detector = HaarDetector(cfg)
    if keyframe_interval:
        detector = FollowingDetector(detector, cfg)
    clf = load_classifier(args.model, "litert", args.threads, flip_tta=DEFAULT_FLIP_TTA, zoom_tta=DEFAULT_ZOOM_TTA)
    load_s = time.perf_counter() - t0

    def process(frame: UInt8Array) -> tuple[list[Box], list[str]]:
        found = detect_and_crop(detector, frame, cfg.margin)
        if not found:
            return [], []
        probs = clf.predict(np.stack([f.crop for f in found]))
        return [f.box for f in found], [clf.classes[int(i)] for i in np.argmax(probs, axis=1)]

    return process, {"model_version": clf.meta.version, "runtime": clf.runtime, "threads": args.threads,
                     "import_and_load_s": load_s,
                     "settings": f"Haar frontal-face cascade, scale {cfg.scale_factor}, min_neighbors "
                                 f"{cfg.min_neighbors}, min face {cfg.min_size} px, downscale_width "
                                 f"{cfg.downscale_width}, keyframe_interval {cfg.keyframe_interval}; all faces of "
                                 "a frame in one batch"}


def compare(frames: list[UInt8Array], truths: list[list[Box]], systems: dict[str, Process],
            seconds: float) -> list[dict[str, Any]]:
    runs = [SystemRun(name, proc) for name, proc in systems.items()]
    for run in runs:
        run.first_pass(frames, truths)
    while True:  # interleaved rounds: each system over the whole set, in turn
        for run in runs:
            run.timed_pass(frames)
        if all(sum(r.times_s) >= seconds for r in runs):
            break
    return [r.report(len(frames)) for r in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.opencv_threads:
        cv2.setNumThreads(args.opencv_threads)
    machine = benchlib.machine_info()
    try:
        fer_process, fer_info = make_fer()
    except ImportError as exc:
        print(f"cannot import fer ({exc}); install the bench extra: .venv/bin/pip install --no-deps fer",
              file=sys.stderr)
        return 2
    systems: dict[str, Process] = {"fer": fer_process}
    infos: dict[str, Any] = {"fer": fer_info}
    for width in sorted(set(args.downscale_widths)):
        name = "ours" if width == 0 else f"ours downscale {width}"
        systems[name], infos[name] = make_ours(args, width)
    for every in args.follow:
        width = min((w for w in args.downscale_widths if w), default=0)
        name = f"ours downscale {width} + follow (keyframe {every})"
        systems[name], infos[name] = make_ours(args, width, every)
    one = benchlib.sample_frames(args.frames, args.width, args.height)
    one_truth = [[benchlib.sample_face_box(f)] for f in one]
    four, four_truth = benchlib.four_face_frames(args.frames, args.width, args.height)
    sets = {"1 face": (one, one_truth), "4 faces": (four, four_truth)}
    results: dict[str, Any] = {}
    for set_name, (frames, truths) in sets.items():
        rows = compare(frames, truths, systems, args.seconds)
        fer_fps = rows[0]["frames_per_s"]
        for r in rows:
            r["ratio_vs_fer"] = r["frames_per_s"] / fer_fps if fer_fps else None
        results[set_name] = rows
    print(f"{args.frames} frames per set, {args.width}x{args.height}, single process, in-process (no Redis, no "
          f"JPEG); opencv threads {args.opencv_threads or 'default'}; loadavg at start {machine['loadavg_at_start']}")
    table = []
    for set_name, rows in results.items():
        for r in rows:
            table.append((set_name, r["system"], r["frames_per_s"], r["median_ms_per_frame"], r["ratio_vs_fer"],
                          r["faces_found"], r["faces_per_frame"], r["recall"], r["false_positives"],
                          ", ".join(f"{k} {v}" for k, v in list(r["top_emotions"].items())[:3])))
    benchlib.print_table(["frames", "system", "frames/s", "median ms", "x fer", "faces found", "faces/frame",
                          "recall", "false pos", "top emotions"], table, digits=2, left=2)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    benchlib.write_json(args.json, {"benchmark": "peer", "settings": settings, "machine": machine, "systems": infos,
                                    "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
