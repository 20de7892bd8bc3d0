"""Helpers shared by the benchmarks in this folder: paths, a private redis-server, /proc readings,
frames with faces at known places, timing and table printing.

Imported by the scripts next to it (``python bench/<name>.py``); it never imports the tests.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout without installing

import cv2  # noqa: E402

from shared.detection import DetectorSettings, HaarDetector  # noqa: E402
from shared.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from shared.imaging import UInt8Array, to_gray  # noqa: E402
from shared.sample import astronaut_bgr, render_frames  # noqa: E402
from shared.schema import Box  # noqa: E402

__all__ = ["RESULTS", "ROOT", "EmbeddedRedis", "free_port"]

SAMPLE_BACKGROUND = 60  # grey level around the photo in shared.sample frames
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- machine and process readings


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine already was."""
    load1, load5, load15 = os.getloadavg()
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "opencv": cv2.__version__, "platform": platform.platform(),
            "loadavg_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
            "niceness": os.nice(0), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the name may contain spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# ---------------------------------------------------------------- frames with known faces


@lru_cache(maxsize=1)
def photo_face() -> Box:
    """The astronaut's face in the 512x512 source photo (found once with the default Haar cascade)."""
    photo = astronaut_bgr()
    found = HaarDetector(DetectorSettings()).detect(to_gray(photo))
    if len(found) != 1:
        raise RuntimeError(f"expected one face in the astronaut photo, found {len(found)}")
    return found[0]


def sample_frames(n: int, width: int = 640, height: int = 480) -> list[UInt8Array]:
    """``shared.sample`` frames: one real face panning across a flat background."""
    return render_frames(n, width, height)


def sample_face_box(frame: UInt8Array) -> Box:
    """Where the face is in a ``shared.sample`` frame: the photo is located by its difference from the
    flat background, and the face's place inside the photo is scaled to the photo's size there."""
    mask = np.any(frame != SAMPLE_BACKGROUND, axis=2)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    side = int(rows[-1] - rows[0] + 1)
    src = astronaut_bgr().shape[0]
    f = photo_face()
    s = side / src
    return Box(x0 + round(f.x * s), y0 + round(f.y * s), round(f.w * s), round(f.h * s))


def four_face_frames(n: int, width: int = 640, height: int = 480) -> tuple[list[UInt8Array], list[list[Box]]]:
    """Frames tiled 2x2 with a head-and-shoulders crop of the photo in each tile, varied per tile
    (mirrored, scaled, darker), drifting sideways over the frames; returns frames and true face boxes."""
    photo = astronaut_bgr()
    f = photo_face()
    side = min(2 * f.w, photo.shape[0])
    cx, cy = f.x + f.w // 2, f.y + f.h // 2
    hx0 = int(np.clip(cx - side // 2, 0, photo.shape[1] - side))
    hy0 = int(np.clip(cy - side // 2, 0, photo.shape[0] - side))
    head = photo[hy0:hy0 + side, hx0:hx0 + side]
    face_in_head = Box(f.x - hx0, f.y - hy0, f.w, f.h)
    tw, th = width // 2, height // 2
    variants = [(0.90, False, 0), (0.80, True, 0), (0.85, False, -35), (0.75, True, 25)]  # scale, mirror, shift
    frames: list[UInt8Array] = []
    truths: list[list[Box]] = []
    for i in range(n):
        canvas = np.full((height, width, 3), SAMPLE_BACKGROUND, dtype=np.uint8)
        boxes = []
        for t, (scale, mirror, shift) in enumerate(variants):
            size = int(th * scale)
            tile = cv2.resize(head, (size, size), interpolation=cv2.INTER_AREA)
            fb = face_in_head
            if mirror:
                tile = tile[:, ::-1]
                fb = Box(side - fb.x - fb.w, fb.y, fb.w, fb.h)
            if shift:
                tile = np.clip(tile.astype(np.int16) + shift, 0, 255).astype(np.uint8)
            phase = 0.5 - 0.5 * np.cos(2 * np.pi * (i / max(1, n) + t / 4))
            ox = (t % 2) * tw + round(phase * (tw - size))
            oy = (t // 2) * th + (th - size) // 2
            canvas[oy:oy + size, ox:ox + size] = tile
            k = size / side
            boxes.append(Box(ox + round(fb.x * k), oy + round(fb.y * k), round(fb.w * k), round(fb.h * k)))
        frames.append(canvas)
        truths.append(boxes)
    return frames, truths


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


@dataclass
class MatchCount:
    """Detections against known faces (a detection matches a face at IoU >= ``threshold``)."""

    threshold: float = 0.4
    truths: int = 0
    matched: int = 0
    detections: int = 0
    false_positives: int = 0

    def add(self, truth: Sequence[Box], found: Sequence[Box]) -> None:
        self.truths += len(truth)
        self.detections += len(found)
        used: set[int] = set()
        for t in truth:
            best, best_iou = -1, self.threshold
            for j, d in enumerate(found):
                score = iou(t, d)
                if j not in used and score >= best_iou:
                    best, best_iou = j, score
            if best >= 0:
                used.add(best)
                self.matched += 1
        self.false_positives += len(found) - len(used)

    @property
    def recall(self) -> float:
        return self.matched / self.truths if self.truths else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"faces_known": self.truths, "faces_matched": self.matched, "recall": self.recall,
                "detections": self.detections, "false_positives": self.false_positives,
                "iou_threshold": self.threshold}


def box_of(xywh: Sequence[Any]) -> Box:
    x, y, w, h = (int(v) for v in xywh)
    return Box(x, y, w, h)


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-call times of one operation."""

    times_s: list[float]

    @property
    def calls(self) -> int:
        return len(self.times_s)

    def ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.times_s), q) * 1000.0)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_s) * 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "median_ms": self.ms(50), "mean_ms": self.mean_ms, "p95_ms": self.ms(95),
                "per_s": 1000.0 / self.mean_ms if self.mean_ms > 0 else float("inf")}


def time_calls(fn: Callable[[int], object], seconds: float, min_calls: int = 5, warmup: int = 2) -> Timing:
    """Call ``fn(i)`` with i = 0, 1, 2, ... for at least ``seconds`` and ``min_calls`` calls."""
    for i in range(warmup):
        fn(i)
    times = []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds or i < min_calls:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return Timing(times)


def percentiles_ms(values_s: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float | None]:
    if not values_s:
        return {f"p{int(q)}_ms": None for q in qs}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {f"p{int(q)}_ms": float(np.percentile(arr, q)) for q in qs}


# ---------------------------------------------------------------- output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2, left: int = 1) -> None:
    """A plain text table; the first ``left`` columns and the last one are left-aligned if text."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    last = len(headers) - 1
    text_last = bool(rows) and all(isinstance(r[last], str) for r in rows)

    def align(i: int, c: str, w: int) -> str:
        return c.ljust(w) if i < left or (i == last and text_last) else c.rjust(w)

    line = "  ".join(align(i, h, w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line.rstrip())
    print("-" * len(line.rstrip()))
    for r in cells:
        print("  ".join(align(i, c, w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print(f"written to {path}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
