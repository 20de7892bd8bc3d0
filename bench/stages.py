"""Per-stage costs of the pipeline, in one process, on the same 640x480 frames the services see.

    python bench/stages.py [--frames 100] [--seconds 2] [--downscale-widths 0 320 480]
        [--runtimes litert litert-int8 tensorflow] [--json bench/results/stages.json]

Stages, each timed per call (median, mean, p95) for at least --seconds:

- source decode: cv2.VideoCapture.read of the sample video (mp4v);
- JPEG encode: BGR -> grey + cv2.imencode at --jpeg-quality (80, the ingest default);
- msgpack encode and decode of a frame message (shared.schema), and a Redis round trip
  (XADD with MAXLEN ~, then XRANGE of that id) against a private redis-server;
- JPEG decode: cv2.imdecode to grey (what a detect worker does first);
- Haar detection at the default settings and with each --downscale-widths value, with face
  recall on frames where the face's place is known (every shared.sample frame holds one face:
  a detection matches at IoU >= 0.4);
- crop: shared.detection.crop_face per face (64x64 grey);
- classification of real face crops at batch 1, 16 and 64 per runtime.

OpenCV runs with --opencv-threads (1, the detect service's default) and the classifier with
--threads (1, the classify service's default), so the numbers are per core, like the services.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import cv2
import numpy as np

from shared.classifier import load_classifier
from shared.detection import DetectorSettings, HaarDetector, crop_face
from shared.imaging import UInt8Array, to_gray
from shared.model_bundle import DEFAULT_BUNDLE
from shared.sample import write_video
from shared.schema import FIELD, Box, FrameMsg, decode_frame, encode_frame

DEFAULT_JSON = benchlib.RESULTS / "stages.json"
BATCHES = (1, 16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100, help="distinct sample frames (the face pans across them)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum measuring time per stage")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--jpeg-quality", type=int, default=80)
    p.add_argument("--downscale-widths", type=int, nargs="+", default=[0, 320, 480],
                   help="detector.downscale_width values to compare (0 = full frame)")
    p.add_argument("--runtimes", nargs="+", choices=["litert", "litert-int8", "tensorflow"],
                   default=["litert", "litert-int8", "tensorflow"])
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, help="model bundle folder")
    p.add_argument("--threads", type=int, default=1, help="classifier threads (the classify service's default)")
    p.add_argument("--opencv-threads", type=int, default=1, help="cv2.setNumThreads (the detect default); 0 = all")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON report")
    args = p.parse_args(argv)
    if args.frames < 1 or args.seconds <= 0:
        p.error("--frames and --seconds must be positive")
    return args


def row(stage: str, variant: str, unit: str, timing: benchlib.Timing, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "variant": variant, "unit": unit, **timing.to_dict(), **extra}


def bench_source(frames: list[UInt8Array], fps: float, seconds: float, workdir: Path) -> dict[str, Any]:
    video = write_video(workdir / "sample.mp4", frames, fps)
    cap = cv2.VideoCapture(str(video))

    def read(_: int) -> None:
        nonlocal cap
        ok, _frame = cap.read()
        if not ok:  # end of file: reopen (like a looping file camera) and read again
            cap.release()
            cap = cv2.VideoCapture(str(video))
            ok, _frame = cap.read()
            if not ok:
                raise RuntimeError(f"cannot read {video}")

    timing = benchlib.time_calls(read, seconds)
    cap.release()
    return row("source decode", "VideoCapture.read mp4v", "frame", timing)


def bench_jpeg(frames: list[UInt8Array], quality: int, seconds: float) -> tuple[list[dict[str, Any]], list[bytes]]:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    jpegs = [np.asarray(cv2.imencode(".jpg", to_gray(f), params)[1]).tobytes() for f in frames]
    enc = benchlib.time_calls(lambda i: cv2.imencode(".jpg", to_gray(frames[i % len(frames)]), params), seconds)
    dec = benchlib.time_calls(
        lambda i: cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], dtype=np.uint8), cv2.IMREAD_GRAYSCALE), seconds)
    size = float(np.mean([len(j) for j in jpegs]))
    return [row("JPEG encode", f"grey q{quality}", "frame", enc, mean_bytes=size),
            row("JPEG decode", "grey", "frame", dec, mean_bytes=size)], jpegs


def bench_messages(jpegs: list[bytes], width: int, height: int, seconds: float) -> list[dict[str, Any]]:
    msgs = [FrameMsg(camera="cam0", seq=i, capture_ts=1.7e9 + i, width=width, height=height, jpeg=j)
            for i, j in enumerate(jpegs)]
    payloads = [encode_frame(m) for m in msgs]
    enc = benchlib.time_calls(lambda i: encode_frame(msgs[i % len(msgs)]), seconds)
    dec = benchlib.time_calls(lambda i: decode_frame(payloads[i % len(payloads)]), seconds)
    rows = [row("msgpack", "encode frame msg", "frame", enc), row("msgpack", "decode frame msg", "frame", dec)]
    import redis

    with benchlib.EmbeddedRedis() as server:
        r = redis.Redis(port=server.port, socket_timeout=10)
        stream = "bench:frames:{cam0}"

        def round_trip(i: int) -> None:
            entry_id = r.xadd(stream, {FIELD: payloads[i % len(payloads)]}, maxlen=300, approximate=True)
            got: Any = r.xrange(stream, min=entry_id, max=entry_id)
            if not got or got[0][1][FIELD] != payloads[i % len(payloads)]:
                raise RuntimeError("XRANGE returned something else than was added")

        rt = benchlib.time_calls(round_trip, seconds)
        rows.append(row("redis", "XADD ~300 + XRANGE (loopback)", "frame", rt))
    return rows


def bench_detection(grays: list[UInt8Array], truths: list[Box], widths: list[int],
                    seconds: float) -> tuple[list[dict[str, Any]], list[tuple[int, Box]]]:
    rows = []
    boxes_full: list[tuple[int, Box]] = []
    for width in widths:
        det = HaarDetector(DetectorSettings(downscale_width=width))
        match = benchlib.MatchCount()
        for i, g in enumerate(grays):
            found = det.detect(g)
            match.add([truths[i]], found)
            if width == 0:
                boxes_full.extend((i, b) for b in found)
        def detect(i: int, d: HaarDetector = det) -> object:
            return d.detect(grays[i % len(grays)])

        timing = benchlib.time_calls(detect, seconds)
        name = "full frame" if width == 0 else f"downscale_width={width}"
        rows.append(row("Haar detect", name, "frame", timing, **match.to_dict()))
    return rows, boxes_full


def bench_crop(grays: list[UInt8Array], boxes: list[tuple[int, Box]], margin: float,
               seconds: float) -> tuple[dict[str, Any], list[UInt8Array]]:
    if not boxes:
        raise RuntimeError("no face found at the default detector settings: nothing to crop")
    crops = [crop_face(grays[i], b, margin) for i, b in boxes]
    timing = benchlib.time_calls(lambda k: crop_face(grays[boxes[k % len(boxes)][0]], boxes[k % len(boxes)][1],
                                                     margin), seconds)
    return row("crop", f"64x64 grey, margin {margin}", "face", timing), crops


def bench_classify(crops: list[UInt8Array], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    pool = np.stack(crops)
    for runtime in args.runtimes:
        try:
            clf = load_classifier(args.model, runtime, args.threads)
        except Exception as exc:  # e.g. TensorFlow not installed: report and go on
            print(f"classification with {runtime} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for batch in BATCHES:
            picks = np.resize(np.arange(len(pool)), batch)
            batch_crops = pool[picks]
            def predict(_: int, c: Any = clf, b: np.ndarray = batch_crops) -> object:
                return c.predict(b)

            timing = benchlib.time_calls(predict, args.seconds)
            r = row("classify", f"{runtime} batch {batch}", "call", timing, batch=batch, runtime=runtime)
            r["faces_per_s"] = batch * r["per_s"]
            r["ms_per_face"] = r["mean_ms"] / batch
            rows.append(r)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        extra = []
        if "recall" in r:
            extra.append(f"recall {r['recall']:.3f} ({r['faces_matched']}/{r['faces_known']}), "
                         f"false pos {r['false_positives']}")
        if "mean_bytes" in r:
            extra.append(f"{r['mean_bytes'] / 1024:.1f} KiB")
        if "faces_per_s" in r:
            extra.append(f"{r['faces_per_s']:.0f} faces/s, {r['ms_per_face']:.3f} ms/face")
        table.append((r["stage"], r["variant"], r["unit"], r["median_ms"], r["mean_ms"], r["p95_ms"], r["per_s"],
                      "; ".join(extra)))
    benchlib.print_table(["stage", "variant", "per", "median ms", "mean ms", "p95 ms", "per s (1 core)", "notes"],
                         table, digits=3, left=3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(args.opencv_threads)
    machine = benchlib.machine_info()
    frames = benchlib.sample_frames(args.frames, args.width, args.height)
    truths = [benchlib.sample_face_box(f) for f in frames]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        rows.append(bench_source(frames, 15.0, args.seconds, Path(tmp)))
    jpeg_rows, jpegs = bench_jpeg(frames, args.jpeg_quality, args.seconds)
    rows.append(jpeg_rows[0])
    rows.extend(bench_messages(jpegs, args.width, args.height, args.seconds))
    rows.append(jpeg_rows[1])
    # Detection runs on what a detect worker sees: the grey frame decoded from the published JPEG.
    grays = [cast(UInt8Array, cv2.imdecode(np.frombuffer(j, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)) for j in jpegs]
    det_rows, boxes = bench_detection(grays, truths, sorted(set(args.downscale_widths)), args.seconds)
    rows.extend(det_rows)
    crop_row, crops = bench_crop(grays, boxes, DetectorSettings().margin, args.seconds)
    rows.append(crop_row)
    rows.extend(bench_classify(crops, args))
    print(f"{args.frames} frames {args.width}x{args.height}; opencv threads {args.opencv_threads}, "
          f"classifier threads {args.threads}; loadavg at start {machine['loadavg_at_start']}")
    print_rows(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    benchlib.write_json(args.json, {"benchmark": "stages", "settings": settings, "machine": machine, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
