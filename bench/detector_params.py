"""Choose the Haar parameters by measurement: recall, false positives and time per 640x480 frame.

    python bench/detector_params.py [--json bench/results/detector_params.json]

Frame sets with known face boxes: the demo's photo panning (one face, ~70 px) and FER2013
PublicTest faces (when ../shared/data is present) pasted at 50-140 px, four per frame, on a
textured background.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import cv2
import numpy as np
from benchlib import MatchCount, print_table, sample_face_box, sample_frames, time_calls, write_json

from shared.detection import DetectorSettings, HaarDetector
from shared.imaging import to_gray
from shared.schema import Box

FER = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "publictest.npz"


def fer_frames(n: int, seed: int = 3) -> tuple[list[np.ndarray], list[list[Box]]]:
    rng = np.random.default_rng(seed)
    with np.load(FER) as data:
        faces = data["images"]
    frames, truths = [], []
    for _ in range(n):
        canvas = cv2.GaussianBlur(rng.integers(40, 200, (480, 640), dtype=np.uint8), (0, 0), 6)
        boxes = []
        for k in range(4):
            size = int(rng.integers(50, 141))
            x = (k % 2) * 320 + int(rng.integers(0, 320 - size))
            y = (k // 2) * 240 + int(rng.integers(0, 240 - size))
            face = faces[int(rng.integers(0, len(faces)))]
            canvas[y:y + size, x:x + size] = cv2.resize(face, (size, size), interpolation=cv2.INTER_LINEAR)
            # FER crops are tight: the face proper is about the inner 80% of the image.
            boxes.append(Box(x + size // 10, y + size // 10, size * 8 // 10, size * 8 // 10))
        frames.append(canvas)
        truths.append(boxes)
    return frames, truths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cv2.setNumThreads(1)
    photo = [to_gray(f) for f in sample_frames(args.frames)]
    sets = {"photo": (photo, [[sample_face_box(f)] for f in sample_frames(args.frames)])}
    if FER.exists():
        sets["fer4"] = fer_frames(args.frames)
    rows, report = [], []
    for sf, mn, ds in itertools.product((1.1, 1.2), (3, 5), (0, 480, 320)):
        det = HaarDetector(DetectorSettings(scale_factor=sf, min_neighbors=mn, downscale_width=ds))
        row: list[object] = [sf, mn, ds or "full"]
        entry: dict[str, object] = {"scale_factor": sf, "min_neighbors": mn, "downscale_width": ds}
        for name, (frames, truths) in sets.items():
            count = MatchCount(threshold=0.3)
            for frame, truth in zip(frames, truths, strict=True):
                count.add(truth, det.detect(frame))
            timing = time_calls(lambda i, fr=frames, d=det: d.detect(fr[i % len(fr)]), seconds=1.0)
            row += [round(count.recall, 3), round(count.false_positives / len(frames), 2), round(timing.ms(50), 1)]
            entry[name] = {**count.to_dict(), "median_ms": timing.ms(50)}
        rows.append(row)
        report.append(entry)
    headers = ["scale", "neighbors", "width"]
    for name in sets:
        headers += [f"{name} recall", f"{name} FP/frame", f"{name} ms"]
    print_table(headers, rows)
    if args.json:
        write_json(args.json, {"results": report})


if __name__ == "__main__":
    main()
