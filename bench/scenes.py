"""Benchmark clips that look like camera deployments, with ground-truth face boxes.

    python bench/scenes.py --write DIR      # writes DIR/<clip>.mp4 and DIR/<clip>.json (boxes per frame)

Real faces (FER2013 PublicTest faces that the frontal-face cascade can see on their own, grown
to 80-130 px) on real photographs (scikit-image's coffee, rocket and motorcycle pictures),
as people: a head on a textured torso that walks in, stands, crosses and leaves. The camera
adds sensor noise every frame and the room's light flickers and steps. Clips, 640x480 at 15 fps:

- ``door``: a fixed camera; three people enter at different times, cross, stop, leave; the
  lights dim by a quarter for the last third; one hard cut to another camera view;
- ``desk``: a fixed camera on two seated people (small head motion) while a third walks by;
- ``pan``: a moving camera (pan and slow zoom over a larger scene) with two people in the
  scene and one walking in: every pixel changes every frame.

A face is in the ground truth while it is wholly inside the frame. Frames are made in memory
(deterministic, seeded); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.imaging import UInt8Array  # noqa: E402
from shared.schema import Box  # noqa: E402

FER_DIR = ROOT.parent / "shared" / "data" / "fer2013"
WIDTH, HEIGHT, FPS = 640, 480, 15
CLIPS = ("door", "desk", "pan")


@dataclass(frozen=True)
class Waypoint:
    t: float  # seconds
    x: float  # face centre, scene pixels
    y: float


@dataclass
class Person:
    face: UInt8Array  # square grey face
    side: int
    path: list[Waypoint]
    shirt: tuple[int, int, int]
    bob: float = 2.0  # head motion in pixels while standing

    def at(self, t: float) -> tuple[float, float] | None:
        if t < self.path[0].t or t > self.path[-1].t:
            return None
        for a, b in zip(self.path, self.path[1:], strict=False):
            if a.t <= t <= b.t:
                k = (t - a.t) / max(1e-6, b.t - a.t)
                x, y = a.x + k * (b.x - a.x), a.y + k * (b.y - a.y)
                return x + self.bob * math.sin(5.1 * t), y + self.bob * math.sin(3.7 * t + 1.0)
        return None


@dataclass
class Clip:
    name: str
    frames: list[UInt8Array] = field(default_factory=list)  # BGR
    truths: list[list[Box]] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)  # what happens when (seconds)


def visible_faces(count: int, seed: int = 7) -> list[UInt8Array]:
    """FER2013 PublicTest faces the frontal-face cascade finds on their own at 100 px."""
    if not (FER_DIR / "publictest.npz").exists():
        raise SystemExit(f"FER2013 data not found in {FER_DIR} (see ../shared/data/fer2013)")
    with np.load(FER_DIR / "publictest.npz") as data:
        images = data["images"]
    cascade = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"))  # type: ignore[attr-defined]
    rng = np.random.default_rng(seed)
    picked: list[UInt8Array] = []
    for i in rng.permutation(len(images)):
        face = cv2.resize(np.asarray(images[i]), (100, 100), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((200, 200), 128, np.uint8)
        canvas[50:150, 50:150] = face
        if len(cascade.detectMultiScale(canvas, 1.1, 5, minSize=(40, 40))) == 1:
            picked.append(np.asarray(images[i]))
            if len(picked) == count:
                break
    return picked


def background(name: str, width: int, height: int) -> UInt8Array:
    from skimage import data

    photo = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())
    bgr = cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)
    return cast(UInt8Array, cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA))


def _head_mask(side: int) -> UInt8Array:
    mask = np.zeros((side, side), np.float32)
    cv2.ellipse(mask, (side // 2, side // 2), (int(side * 0.47), int(side * 0.5)), 0, 0, 360, 1.0, -1)
    return cast(UInt8Array, cv2.GaussianBlur(mask, (0, 0), side * 0.03))


def draw_person(scene: UInt8Array, person: Person, cx: float, cy: float, rng: np.random.Generator) -> Box:
    """Torso then head, centred at (cx, cy) in scene pixels; returns the face box."""
    s = person.side
    x0, y0 = round(cx - s / 2), round(cy - s / 2)
    torso_w, torso_h = int(s * 1.7), int(s * 2.6)
    tx0, ty0 = round(cx - torso_w / 2), y0 + int(s * 0.9)
    h, w = scene.shape[:2]
    tx1, ty1 = min(w, tx0 + torso_w), min(h, ty0 + torso_h)
    if tx1 > max(0, tx0) and ty1 > max(0, ty0):
        shade = np.array(person.shirt, np.float32) + rng.normal(0, 6, (ty1 - max(0, ty0), tx1 - max(0, tx0), 1))
        scene[max(0, ty0):ty1, max(0, tx0):tx1] = np.clip(shade, 0, 255).astype(np.uint8)
    face = cv2.resize(person.face, (s, s), interpolation=cv2.INTER_CUBIC)
    alpha = _head_mask(s)
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)
    if fx1 > fx0 and fy1 > fy0:
        sub = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
        a = alpha[sub][..., None]
        region = scene[fy0:fy1, fx0:fx1].astype(np.float32)
        scene[fy0:fy1, fx0:fx1] = (a * face[sub][..., None] + (1 - a) * region).astype(np.uint8)
    return Box(x0, y0, s, s)


def camera_effects(frame: UInt8Array, t: float, rng: np.random.Generator, dim_from: float | None) -> UInt8Array:
    """Light flicker (and a dimming step), then sensor noise."""
    gain = 1.0 + 0.06 * math.sin(2 * math.pi * t / 1.7)
    if dim_from is not None and t >= dim_from:
        gain *= 0.75
    noisy = frame.astype(np.float32) * gain + rng.normal(0, 4.0, frame.shape)
    return cast(UInt8Array, np.clip(noisy, 0, 255).astype(np.uint8))


def _inside(box: Box, width: int, height: int) -> bool:
    return box.x >= 0 and box.y >= 0 and box.x + box.w <= width and box.y + box.h <= height


def render(name: str, people: list[Person], seconds: float, backgrounds: list[tuple[float, str]],
           dim_from: float | None = None, view: object = None, seed: int = 1) -> Clip:
    """Frames of a fixed camera (or a moving one: ``view(t) -> (x, y, zoom)`` over a 2x scene)."""
    rng = np.random.default_rng(seed)
    moving = view is not None
    sw, sh = (WIDTH * 2, HEIGHT * 2) if moving else (WIDTH, HEIGHT)
    scenes = {bg: background(bg, sw, sh) for _, bg in backgrounds}
    clip = Clip(name)
    for i in range(round(seconds * FPS)):
        t = i / FPS
        bg = [b for start, b in backgrounds if start <= t][-1]
        scene = scenes[bg].copy()
        boxes = [draw_person(scene, p, *pos, rng) for p in people if (pos := p.at(t)) is not None]
        if moving:
            vx, vy, zoom = view(t)  # type: ignore[operator]
            frame, boxes = _look(scene, boxes, vx, vy, zoom)
        else:
            frame = scene
        clip.frames.append(camera_effects(frame, t, rng, dim_from))
        clip.truths.append([b for b in boxes if _inside(b, WIDTH, HEIGHT)])
    return clip


def _look(scene: UInt8Array, boxes: list[Box], vx: float, vy: float, zoom: float) -> tuple[UInt8Array, list[Box]]:
    """The camera's view: a (WIDTH/zoom x HEIGHT/zoom) window at (vx, vy), scaled to the frame."""
    ww, wh = WIDTH / zoom, HEIGHT / zoom
    m = np.array([[zoom, 0, -vx * zoom], [0, zoom, -vy * zoom]], np.float32)
    frame = cv2.warpAffine(scene, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
    del ww, wh
    moved = [Box(round((b.x - vx) * zoom), round((b.y - vy) * zoom), round(b.w * zoom), round(b.h * zoom))
             for b in boxes]
    return cast(UInt8Array, frame), moved


def _walk(face: UInt8Array, side: int, shirt: tuple[int, int, int], *points: tuple[float, float, float]) -> Person:
    return Person(face, side, [Waypoint(*p) for p in points], shirt)


def make(name: str) -> Clip:
    faces = visible_faces(8)
    if name == "door":
        people = [
            _walk(faces[0], 110, (60, 40, 30), (1.0, -80, 150), (3.0, 200, 160), (7.0, 210, 160), (9.5, 720, 150)),
            _walk(faces[1], 95, (30, 60, 90), (3.0, 720, 200), (6.5, -80, 190)),
            _walk(faces[2], 125, (90, 90, 40), (5.5, 470, 140), (8.0, 460, 145), (11.0, 470, 150), (12.5, 720, 150)),
        ]
        clip = render(name, people, 13.0, [(0.0, "coffee"), (10.0, "motorcycle")], dim_from=8.5, seed=11)
        clip.events = {"enter": 1.0, "enter 2": 3.0, "appear 3": 5.5, "lights dim": 8.5, "cut": 10.0}
        return clip
    if name == "desk":
        people = [
            _walk(faces[3], 100, (40, 40, 40), (0.0, 170, 170), (12.0, 180, 175)),
            _walk(faces[4], 115, (100, 50, 50), (0.0, 440, 160), (12.0, 430, 165)),
            _walk(faces[5], 90, (50, 80, 50), (4.0, 720, 120), (8.0, -80, 110)),
        ]
        clip = render(name, people, 12.0, [(0.0, "rocket")], seed=12)
        clip.events = {"walk by": 4.0}
        return clip
    if name == "pan":
        people = [
            _walk(faces[6], 120, (60, 40, 30), (0.0, 500, 400), (10.0, 520, 410)),
            _walk(faces[7], 105, (30, 60, 90), (0.0, 800, 420), (10.0, 790, 430)),
            _walk(faces[0], 110, (90, 90, 40), (3.0, 1300, 380), (8.0, 650, 390), (10.0, 600, 390)),
        ]

        def view(t: float) -> tuple[float, float, float]:
            zoom = 1.0 + 0.15 * math.sin(2 * math.pi * t / 10.0)
            return 200 + 45 * t, 150 + 10 * math.sin(t), zoom

        clip = render(name, people, 10.0, [(0.0, "coffee")], view=view, seed=13)
        clip.events = {"walk in": 3.0}
        return clip
    raise ValueError(f"unknown clip {name!r}; known: {', '.join(CLIPS)}")


def write(clip: Clip, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{clip.name}.mp4"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))  # type: ignore[attr-defined]
    for frame in clip.frames:
        out.write(frame)
    out.release()
    truth = {"fps": FPS, "events_s": clip.events,
             "faces": [[[b.x, b.y, b.w, b.h] for b in boxes] for boxes in clip.truths]}
    (folder / f"{clip.name}.json").write_text(json.dumps(truth))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", type=Path, required=True, help="folder for the .mp4 clips and .json ground truth")
    p.add_argument("--clips", nargs="+", default=list(CLIPS), choices=CLIPS)
    args = p.parse_args(argv)
    for name in args.clips:
        clip = make(name)
        path = write(clip, args.write)
        faces = sum(len(t) for t in clip.truths)
        print(f"{path}: {len(clip.frames)} frames, {faces} face boxes, events {clip.events}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
