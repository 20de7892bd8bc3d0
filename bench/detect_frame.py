"""What one detect worker's frame costs, step by step, on real frames through the real worker.

    python bench/detect_frame.py [--videos CLIP.mp4 ...] [--scenes door desk] [--frames 150] \\
        [--fps 15] [--json bench/results/detect_frame.json]

Each clip (a video file, or a bench/scenes.py clip rendered in memory) is read once, turned
into the frame messages ingest publishes (grey JPEG at ingest's default quality, capture times
1/fps apart) and written to a camera stream on a private redis-server. One DetectWorker, at the
service's defaults and with one OpenCV thread, then runs its real loop (``step()``) until the
stream is done, under cProfile. The report splits a frame's time into: msgpack decode of the
frame message, JPEG decode, motion analysis, Haar searches, the rest of the detector (following
faces by their look, bookkeeping), crops, msgpack encode of the faces, and the Redis
transaction (WATCH of the lease, EXEC with the faces and the ack); and the worker's own phase
clock (wait, work, write) for the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import cv2
import numpy as np
import redis
from prometheus_client import CollectorRegistry

from services.detect.settings import DetectSettings
from services.detect.worker import DetectMetrics, DetectWorker
from shared.detection import make_camera_detector
from shared.imaging import to_gray
from shared.schema import FIELD, FrameMsg, encode_frame
from shared.streams import Keys

DEFAULT_JSON = benchlib.RESULTS / "detect_frame.json"
DEFAULT_VIDEOS = sorted(Path(os.environ.get("ES_BENCH_VIDEOS", benchlib.ROOT.parent / "shared" / "data" / "video"))
                        .glob("dev_*.mp4"))[:2]

# (report row, profiled function names whose cumulative time it is); the rest of the frame is "other".
STEPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("msgpack decode (frame)", (("schema.py", "decode_frame"),)),
    ("JPEG decode", (("~", "<imdecode>"),)),
    ("motion", (("motion.py", "update"),)),
    ("Haar searches", (("~", "<method 'detectMultiScale' of 'cv2.CascadeClassifier' objects>"),)),
    ("crops", (("crop.py", "crop_faces"),)),
    ("msgpack encode (faces)", (("schema.py", "encode_faces"),)),
    ("Redis (WATCH, GET, EXEC)", (("client.py", "execute"), ("client.py", "watch"), ("client.py", "multi"),
                                   ("client.py", "get"))),
)
DETECT = ("gate.py", "detect")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, nargs="*", default=DEFAULT_VIDEOS, help="real clips (default: %(default)s)")
    p.add_argument("--scenes", nargs="*", default=["door", "desk"], help="bench/scenes.py clips")
    p.add_argument("--frames", type=int, default=150, help="frames per clip")
    p.add_argument("--fps", type=float, default=15.0, help="capture times are 1/fps apart")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return p.parse_args(argv)


def video_frames(path: Path, count: int) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise SystemExit(f"--videos {path}: no frame could be read")
    return frames


def scene_frames(name: str, count: int) -> list[np.ndarray]:
    import scenes

    with tempfile.TemporaryDirectory() as tmp:
        return video_frames(scenes.write(scenes.make(name), Path(tmp)), count)


def publish(r: redis.Redis, keys: Keys, camera: str, frames: list[np.ndarray], fps: float) -> None:
    start = time.time() + 3600  # never stale, whatever the machine's speed
    for i, frame in enumerate(frames):
        gray = to_gray(frame)
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 80])
        assert ok
        h, w = gray.shape[:2]
        msg = FrameMsg(camera=camera, seq=i, capture_ts=start + i / fps, width=w, height=h, jpeg=buf.tobytes())
        r.xadd(keys.frames(camera), {FIELD: encode_frame(msg)})
    r.sadd(keys.cameras, camera)


def profile_clip(url: str, camera: str, frames: list[np.ndarray], fps: float) -> dict[str, Any]:
    keys = Keys()
    r = redis.Redis.from_url(url)
    r.flushall()
    publish(r, keys, camera, frames, fps)
    settings = DetectSettings.model_validate({"redis": {"url": url}, "consumer": "profile",
                                              "streams": {"block_ms": 10}})
    cv2.setNumThreads(settings.detect.opencv_threads)
    registry = CollectorRegistry()
    metrics = DetectMetrics(registry)
    worker = DetectWorker(settings, redis.Redis.from_url(url), make_camera_detector(settings.detector), metrics)
    worker.streams()  # takes the camera's lease before the clock starts
    done = lambda: registry.get_sample_value("es_detect_frames_total", {"camera": camera}) or 0.0  # noqa: E731
    prof = cProfile.Profile()
    wall = 0.0
    while done() < len(frames):  # the check is outside the timed and profiled step
        began = time.perf_counter()
        prof.enable()
        worker.step()
        prof.disable()
        wall += time.perf_counter() - began
    stats = pstats.Stats(prof)
    n = len(frames)
    per_frame = {row: sum(_cumulative(stats, f) for f in funcs) / n * 1000.0 for row, funcs in STEPS}
    detector = _cumulative(stats, DETECT) / n * 1000.0
    per_frame["detector: following, bookkeeping"] = detector - per_frame["motion"] - per_frame["Haar searches"]
    per_frame["other (loop, leases, metrics)"] = wall / n * 1000.0 - sum(per_frame.values())
    phases = {p: registry.get_sample_value("es_stage_phase_seconds_sum", {"stage": "detect", "phase": p}) or 0.0
              for p in ("wait", "work", "write")}
    h, w = frames[0].shape[:2]
    return {"clip": camera, "frames": n, "size": f"{w}x{h}", "ms_per_frame": wall / n * 1000.0,
            "steps_ms": per_frame, "phase_ms": {p: s / n * 1000.0 for p, s in phases.items()},
            "faces": registry.get_sample_value("es_detect_faces_per_frame_sum") or 0.0,
            "profiler_note": "times under cProfile, which adds a little to every Python call"}


def _cumulative(stats: pstats.Stats, func: tuple[str, str]) -> float:
    """Cumulative seconds of the functions matching (file name ending, function name)."""
    total = 0.0
    for (path, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if name == func[1] and ((func[0] == "~" and path == "~") or path.endswith(func[0])):
            total += row[3]
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clips: list[tuple[str, list[np.ndarray]]] = [(v.stem, video_frames(v, args.frames)) for v in args.videos]
    clips += [(f"scene-{s}", scene_frames(s, args.frames)) for s in args.scenes]
    results = []
    with benchlib.EmbeddedRedis() as server:
        for name, frames in clips:
            results.append(profile_clip(server.url, name.replace("_", "-"), frames, args.fps))
    rows = [row for row, _ in STEPS] + ["detector: following, bookkeeping", "other (loop, leases, metrics)"]
    print("ms per frame, one detect worker (defaults, 1 OpenCV thread), under cProfile")
    benchlib.print_table(["step", *(r["clip"][:22] for r in results)],
                         [(row, *(r["steps_ms"][row] for r in results)) for row in rows]
                         + [("total", *(r["ms_per_frame"] for r in results)),
                            *((f"phase {p}", *(r["phase_ms"][p] for r in results)) for p in ("wait", "work", "write")),
                            ("faces per frame", *(r["faces"] / r["frames"] for r in results))], digits=2)
    benchlib.write_json(args.json, {"benchmark": "detect_frame", "machine": benchlib.machine_info(),
                                    "settings": {"frames": args.frames, "fps": args.fps}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
