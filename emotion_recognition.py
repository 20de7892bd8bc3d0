"""Recognise facial emotions in one image or video file, in a single process.

    python emotion_recognition.py --input photo.jpg
    python emotion_recognition.py --input clip.mp4 --every 5 --json --output annotated.mp4

Faces are found and classified by the same code the detect and classify services run
(``shared.detection`` and ``shared.classifier``); only Redis and the JPEG hop between services are left out.
Exit status: 0 on success (also when no face is found), 2 for a bad input, output or model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
from pydantic import ValidationError

from shared.classifier import DEFAULT_FLIP_TTA, DEFAULT_ZOOM_TTA, Classifier, Runtime, load_classifier
from shared.detection import CameraDetector, DetectorSettings, crop_faces, make_camera_detector
from shared.imaging import UInt8Array, to_gray
from shared.masking import mask_text
from shared.model_bundle import DEFAULT_BUNDLE, BundleError
from shared.motion import MotionSettings
from shared.schema import Box

VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
FALLBACK_FPS = 25.0
BOX_COLOUR = (0, 255, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


class CliError(Exception):
    """A problem with the input, output or model that the user has to fix; exit status 2."""


@dataclass(frozen=True)
class Prediction:
    frame: int
    time_s: float | None  # None for a still image
    face: int
    box: Box
    label: str
    score: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Pipeline:
    detector: CameraDetector  # a video's frames in order, as the detect service sees a camera's
    classifier: Classifier
    margin: float

    def run(self, image: UInt8Array, frame: int, time_s: float | None) -> list[Prediction]:
        gray = to_gray(image)
        faces = crop_faces(gray, self.detector.detect(gray, "input", time_s or 0.0), self.margin)
        if not faces:
            return []
        probs = self.classifier.predict(np.stack([f.crop for f in faces]))
        classes = self.classifier.classes
        preds = []
        for i, (face, p) in enumerate(zip(faces, probs, strict=True)):
            best = int(np.argmax(p))
            preds.append(Prediction(frame=frame, time_s=time_s, face=i, box=face.box, label=classes[best],
                                    score=float(p[best]),
                                    probabilities={c: float(v) for c, v in zip(classes, p, strict=True)}))
        return preds


@dataclass(frozen=True)
class Reporter:
    source: str
    as_json: bool
    model_version: str

    def report(self, preds: list[Prediction]) -> None:
        for p in preds:
            print(self._line(p), flush=True)

    def no_face(self, message: str) -> None:
        # with --json, stdout stays pure JSON lines for whatever parses it
        print(message, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def _line(self, p: Prediction) -> str:
        if self.as_json:
            return json.dumps(self._record(p))
        prefix = "" if p.time_s is None else f"[t={p.time_s:.2f}s] "
        return f"{prefix}Detected Emotion: {p.label}"

    def _record(self, p: Prediction) -> dict[str, Any]:
        return {
            "input": self.source,
            "frame": p.frame,
            "time_s": None if p.time_s is None else round(p.time_s, 3),
            "face": p.face,
            "box": p.box.to_list(),
            "label": p.label,
            "score": round(p.score, 6),
            "probabilities": {c: round(v, 6) for c, v in p.probabilities.items()},
            "model_version": self.model_version,
        }


# ---------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Detect faces in an image or video and classify their emotion.")
    p.add_argument("--input", "-i", type=Path, required=True, metavar="PATH", help="image or video file")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="PATH",
                   help="write the input annotated with boxes and labels (video: .mp4 or .avi)")
    p.add_argument("--json", action="store_true", help="print one JSON object per face instead of text")
    p.add_argument("--model", type=Path, default=DEFAULT_BUNDLE, metavar="DIR",
                   help="model bundle folder (default: %(default)s)")
    p.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=DEFAULT_FLIP_TTA,
                   help="average each face with its mirror image, as the classify service does by default")
    p.add_argument("--zoom-tta", action=argparse.BooleanOptionalAction, default=True,
                   help="also average the zoomed views the bundle is served with (model.json zoom_tta; "
                        + ", ".join(map(str, DEFAULT_ZOOM_TTA)) + " where it names none), as the classify "
                        "service does by default")
    p.add_argument("--runtime", choices=("auto", "litert", "litert-int8", "tensorflow"), default="auto",
                   help="inference runtime; auto prefers LiteRT (default: %(default)s)")
    p.add_argument("--every", type=positive_int, default=1, metavar="N",
                   help="video: classify every Nth frame (default: 1)")
    d = p.add_argument_group("face detector (defaults as in the detect service)")
    d.add_argument("--scale-factor", type=float, default=None, metavar="F", help="Haar image-pyramid step, > 1")
    d.add_argument("--min-neighbors", type=int, default=None, metavar="N",
                   help="overlapping hits needed to accept a face")
    d.add_argument("--min-size", type=int, default=None, metavar="PX", help="smallest face side in pixels")
    d.add_argument("--motion", action=argparse.BooleanOptionalAction, default=None,
                   help="video: search for faces where the picture changes and around faces already found, "
                        "with whole-frame searches on cuts and every few seconds (the default); "
                        "--no-motion searches every whole frame")
    return p


def detector_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DetectorSettings:
    # only options given on the command line are passed, so the defaults live in DetectorSettings alone
    given: dict[str, object] = {k: getattr(args, k) for k in ("scale_factor", "min_neighbors", "min_size")
                                if getattr(args, k) is not None}
    if args.motion is not None:
        given["motion"] = MotionSettings(enabled=args.motion)
    try:
        return DetectorSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        parser.error(problems)


# ---------------------------------------------------------------- input and output


@dataclass(frozen=True)
class Video:
    cap: cv2.VideoCapture
    first: UInt8Array  # already read: some files open as a capture yet hold no decodable frame


def open_input(path: Path) -> UInt8Array | Video:
    """A BGR image, or a video whose first frame has been read."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from exc
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is not None:
        return cast(UInt8Array, image)
    cap = cv2.VideoCapture(str(path))
    ok, frame = cap.read() if cap.isOpened() else (False, None)
    if not ok or frame is None:
        cap.release()
        raise CliError(f"{path}: not a readable image or video")
    return Video(cap, cast(UInt8Array, frame))


def check_output(output: Path, source: Path, video: bool) -> None:
    """Fail before any work is done rather than after a long video."""
    if output.resolve() == source.resolve():
        raise CliError(f"{output}: output would overwrite the input")
    if not output.parent.is_dir():
        raise CliError(f"{output}: folder {output.parent} does not exist")
    if video and output.suffix.lower() not in VIDEO_CODECS:
        raise CliError(f"{output}: video output must end in {' or '.join(VIDEO_CODECS)}")
    if not video and not cv2.haveImageWriter(str(output)):
        raise CliError(f"{output}: no image format for extension '{output.suffix}'")


def open_classifier(bundle: Path, runtime: Runtime, flip_tta: bool = DEFAULT_FLIP_TTA,
                    zoom_tta: bool = True) -> Classifier:
    try:
        # warming every batch bucket pays off in a long-running service, not for one file
        clf = load_classifier(bundle, runtime, warm=False, flip_tta=flip_tta,
                              zoom_tta=None if zoom_tta else ())
    except BundleError as exc:
        raise CliError(f"{exc} (choose a bundle with --model)") from exc
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        raise CliError(f"model bundle {bundle} does not load with runtime '{runtime}': {exc}") from exc
    return clf


def annotate(image: UInt8Array, preds: list[Prediction]) -> UInt8Array:
    out = image.copy()
    thickness = max(1, round(min(out.shape[:2]) / 320))
    scale = 0.5 * thickness
    for p in preds:
        b = p.box
        cv2.rectangle(out, (b.x, b.y), (b.x + b.w, b.y + b.h), BOX_COLOUR, thickness)
        text = f"{p.label} {p.score:.2f}"
        (_, text_h), _ = cv2.getTextSize(text, FONT, scale, thickness)
        # above the box when it fits, else just inside its top edge, so the label stays in the picture
        y = b.y - 4 if b.y - 4 - text_h >= 0 else b.y + text_h + 4
        cv2.putText(out, text, (b.x, y), FONT, scale, BOX_COLOUR, thickness, cv2.LINE_AA)
    return out


def write_image(path: Path, image: UInt8Array) -> None:
    if not cv2.imwrite(str(path), image):
        raise CliError(f"{path}: cannot write image")


def open_video_writer(path: Path, fps: float, frame: UInt8Array) -> cv2.VideoWriter:
    h, w = frame.shape[:2]
    fourcc = cv2.VideoWriter.fourcc(*VIDEO_CODECS[path.suffix.lower()])
    writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    if not writer.isOpened():
        raise CliError(f"{path}: cannot open video writer")
    return writer


def frame_time(cap: cv2.VideoCapture, index: int, fps: float) -> float:
    # the container's timestamps give true times for variable-frame-rate video (common from phones);
    # some backends report 0 throughout, hence the constant-rate fallback
    ms = cap.get(cv2.CAP_PROP_POS_MSEC)
    if ms > 0 or index == 0:
        return float(ms) / 1000.0
    return index / fps


def read_frames(video: Video, fps: float) -> Iterator[tuple[int, float, UInt8Array]]:
    index, frame = 0, video.first
    while True:
        yield index, frame_time(video.cap, index, fps), frame
        ok, nxt = video.cap.read()
        if not ok:
            return
        index, frame = index + 1, cast(UInt8Array, nxt)


# ---------------------------------------------------------------- running


def run_image(image: UInt8Array, pipeline: Pipeline, reporter: Reporter, output: Path | None) -> int:
    preds = pipeline.run(image, 0, None)
    reporter.report(preds)
    if not preds:
        reporter.no_face("No face detected.")
    if output is not None:
        write_image(output, annotate(image, preds))
    return 0


def show_progress(reporter: Reporter) -> bool:
    """Progress goes to a terminal only: never into --json output or a log file."""
    return not reporter.as_json and sys.stderr.isatty()


class Progress:
    """``frames 120/900 (13%), 41.2 frames/s, ETA 0:19`` on stderr, rewritten in place twice a second."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = max(0, total)
        self.enabled = enabled
        self.started = time.monotonic()
        self._shown = self.started  # the first line after half a second: a rate worth reading
        self._visible = False

    def update(self, frames: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._shown < 0.5:
            return
        self._shown = now
        rate = frames / max(1e-6, now - self.started)
        line = f"frames {frames}"
        if self.total:
            left = max(0, self.total - frames) / max(rate, 1e-6)
            line += f"/{self.total} ({100 * frames // self.total}%)"
            line += f", {rate:.1f} frames/s, ETA {int(left // 60)}:{int(left % 60):02d}"
        else:
            line += f", {rate:.1f} frames/s"
        sys.stderr.write("\r" + line + "\x1b[K")
        sys.stderr.flush()
        self._visible = True

    def done(self) -> None:
        """Erase the line (before other output, and at the end)."""
        if self._visible:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._visible = False


def run_video(video: Video, pipeline: Pipeline, reporter: Reporter, every: int, output: Path | None) -> int:
    fps = video.cap.get(cv2.CAP_PROP_FPS)
    fps = fps if fps > 0 else FALLBACK_FPS
    writer: cv2.VideoWriter | None = None
    shown: list[Prediction] = []
    processed = found = 0
    progress = Progress(int(video.cap.get(cv2.CAP_PROP_FRAME_COUNT)), enabled=show_progress(reporter))
    try:
        for index, time_s, frame in read_frames(video, fps):
            progress.update(index + 1)
            if index % every == 0:
                shown = pipeline.run(frame, index, time_s)
                if shown:
                    progress.done()
                reporter.report(shown)
                processed += 1
                found += len(shown)
            if output is not None:
                writer = writer or open_video_writer(output, fps, frame)
                # skipped frames keep the latest boxes, so the annotation does not flicker with --every
                writer.write(annotate(frame, shown))
    finally:
        progress.done()
        if writer is not None:
            writer.release()  # also on Ctrl-C, so what was written stays playable
    if found == 0:
        reporter.no_face(f"No face detected in {processed} processed frames.")
    return 0


def run(args: argparse.Namespace, settings: DetectorSettings) -> int:
    source = open_input(args.input)
    try:
        if args.output is not None:
            check_output(args.output, args.input, isinstance(source, Video))
        classifier = open_classifier(args.model, args.runtime, args.flip_tta, args.zoom_tta)
        pipeline = Pipeline(make_camera_detector(settings), classifier, settings.margin)
        reporter = Reporter(source=str(args.input), as_json=args.json, model_version=classifier.meta.version)
        if isinstance(source, Video):
            return run_video(source, pipeline, reporter, args.every, args.output)
        return run_image(source, pipeline, reporter, args.output)
    finally:
        if isinstance(source, Video):
            source.cap.release()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = detector_settings(args, parser)
    try:
        return run(args, settings)
    except CliError as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (e.g. `head`) left; point stdout at devnull so the exit-time flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
