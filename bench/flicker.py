"""Label flicker before and after per-track smoothing, on a real clip.

    python bench/flicker.py [--input VIDEO] [--model DIR] [--json OUT]

Runs detection and classification in-process on every frame (as the services do), feeds the
tracker, and reports, per track, label changes per minute of the raw per-frame labels and of
the smoothed track state.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from shared.classifier import DEFAULT_FLIP_TTA, load_classifier
from shared.detection import DetectorSettings, detect_and_crop, make_detector
from shared.model_bundle import DEFAULT_BUNDLE
from shared.sample import sample_video
from shared.tracking import CameraTracker, Detection, TrackerSettings, label_changes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=None, help="video (default: the demo's sample clip)")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    video = args.input or sample_video()
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    detector = make_detector(DetectorSettings())
    clf = load_classifier(args.model, "litert", flip_tta=DEFAULT_FLIP_TTA)
    tracker = CameraTracker("clip", clf.classes, TrackerSettings())
    raw: dict[int, list[str]] = {}
    smooth: dict[int, list[str]] = {}
    frame_index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        faces = detect_and_crop(detector, frame, 0.1)
        if faces:
            probs = clf.predict(np.stack([f.crop for f in faces]))
            ids, _ = tracker.update(frame_index / fps, [Detection(f.box, p) for f, p in zip(faces, probs, strict=True)])
            by_id = {t.id: t for t in tracker.tracks}
            for tid, pr in zip(ids, probs, strict=True):
                raw.setdefault(tid, []).append(clf.classes[int(pr.argmax())])
                smooth.setdefault(tid, []).append(clf.classes[by_id[tid].state])
        frame_index += 1
    rows = []
    for tid in sorted(raw, key=lambda t: -len(raw[t])):
        minutes = len(raw[tid]) / fps / 60
        rows.append({"track": tid, "frames": len(raw[tid]),
                     "raw_changes_per_min": round(label_changes(raw[tid]) / minutes, 1),
                     "smoothed_changes_per_min": round(label_changes(smooth[tid]) / minutes, 1)})
    print(f"{video} ({frame_index} frames at {fps:g} fps), model {clf.meta.version}")
    print("track\tframes\traw label changes/min\tsmoothed changes/min")
    for row in rows:
        print(f"{row['track']}\t{row['frames']}\t{row['raw_changes_per_min']}\t{row['smoothed_changes_per_min']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"input": str(video), "fps": fps, "tracks": rows}, indent=2))


if __name__ == "__main__":
    main()
