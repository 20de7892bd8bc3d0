"""Write a clip for bench/flicker.py: four real FER2013 PublicTest faces the model finds ambiguous.

    python bench/ambiguous_clip.py OUT.mp4 && python bench/flicker.py --input OUT.mp4

Faces are chosen (seeded) where the shipped model's two best classes are within 0.15 of each
other; they drift sideways with pixel noise and slow brightness changes, 150 frames at 10 fps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from shared.classifier import DEFAULT_FLIP_TTA, load_classifier
from shared.detection import DetectorSettings, HaarDetector, detect_and_crop
from shared.sample import write_video

FER = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013" / "publictest.npz"


def ambiguous_faces(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    clf = load_classifier(None, "litert", flip_tta=DEFAULT_FLIP_TTA)
    detector = HaarDetector(DetectorSettings())
    with np.load(FER) as data:
        faces = data["images"]
    chosen: list[np.ndarray] = []
    for i in rng.permutation(len(faces)):
        frame = np.full((480, 640), 90, np.uint8)
        frame[160:320, 240:400] = cv2.resize(faces[i], (160, 160))
        found = detect_and_crop(detector, frame, 0.1)
        if len(found) != 1:
            continue
        p = np.sort(clf.predict(found[0].crop[None])[0])
        if p[-1] - p[-2] < 0.15:
            chosen.append(faces[i])
        if len(chosen) == n:
            break
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    faces = ambiguous_faces(4, rng)
    frames = []
    for t in range(150):
        frame = np.full((480, 640), 90, np.uint8)
        for k, face in enumerate(faces):
            x = 40 + (k % 2) * 320 + int(20 * np.sin(t / 15 + k))
            y = 40 + (k // 2) * 230
            noisy = cv2.resize(face, (160, 160)).astype(np.int16) + rng.integers(-6, 7, (160, 160))
            frame[y:y + 160, x:x + 160] = np.clip(noisy + int(8 * np.sin(t / 7 + k)), 0, 255).astype(np.uint8)
        frames.append(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    write_video(args.out, frames, fps=10)
    print(f"{args.out}: {len(faces)} faces, {len(frames)} frames")


if __name__ == "__main__":
    main()
