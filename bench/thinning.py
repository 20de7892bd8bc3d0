"""What thinning a fast live source costs: decode every frame, or grab all and decode only those kept.

    python bench/thinning.py [--source-fps 30] [--target-fps 10] [--seconds 10] [--width 1280 --height 720]

A clip at --source-fps (the door scene of bench/scenes.py, scaled to --width x --height, H.264
through ffmpeg when present, else MPEG-4) is read through ingest's VideoSource twice, as fast as
it decodes: ``read()`` of every frame (how a thinned camera was read before), and ``grab()`` of
every frame with ``retrieve()`` of one in source/target (what ingest does now). Reported: CPU
seconds and wall time per second of video for each, and the saving.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import cv2

from services.ingest.source import EndOfStream, VideoSource
from shared.cameras import CameraSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-fps", type=float, default=30.0)
    p.add_argument("--target-fps", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    return p.parse_args(argv)


def make_clip(args: argparse.Namespace, folder: Path) -> Path:
    import scenes

    frames = scenes.make("door").frames
    raw = folder / "clip.mp4"
    out = cv2.VideoWriter(str(raw), cv2.VideoWriter.fourcc(*"mp4v"), args.source_fps, (args.width, args.height))
    for i in range(round(args.seconds * args.source_fps)):
        frame = frames[round(i * scenes.FPS / args.source_fps) % len(frames)]
        out.write(cv2.resize(frame, (args.width, args.height)))
    out.release()
    if shutil.which("ffmpeg") is None:
        return raw
    h264 = folder / "clip-h264.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-c:v", "libx264", "-preset", "fast",
                    "-pix_fmt", "yuv420p", str(h264)], check=True)
    return h264


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_all(path: Path, keep_every: int, thin: bool) -> tuple[float, float, int]:
    source = VideoSource(CameraSettings(id="bench", url=str(path), fps=0), 10.0)
    source.open()
    kept = index = 0
    c0, t0 = cpu(), time.perf_counter()
    try:
        while True:
            keep = index % keep_every == 0
            if thin:
                source.grab()
                if keep:
                    source.retrieve()
            else:
                source.read()
            kept += keep
            index += 1
    except EndOfStream:
        pass
    finally:
        source.close()
    return cpu() - c0, time.perf_counter() - t0, kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)
    keep_every = max(1, round(args.source_fps / args.target_fps))
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args, Path(tmp))
        rows = []
        for name, thin in (("read() every frame", False), ("grab() all, retrieve() kept", True)):
            best = min((read_all(clip, keep_every, thin) for _ in range(3)), key=lambda r: r[0])
            rows.append((name, best[0] / args.seconds, best[1] / args.seconds, best[2]))
    load = benchlib.machine_info()["loadavg_at_start"]
    print(f"{clip.name}: {args.width}x{args.height} at {args.source_fps:g} fps, {args.seconds:g} s, kept 1 in "
          f"{keep_every} (target {args.target_fps:g} fps); best of 3; loadavg {load}")
    benchlib.print_table(["read", "CPU s per video s", "wall s per video s", "frames kept"], rows, digits=3)
    print(f"saving: {1 - rows[1][1] / rows[0][1]:.0%} of the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
