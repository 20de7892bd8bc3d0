"""The single-process CLI, emotion_recognition.py, on real face images and short videos."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from shared.model_bundle import TFLITE_FILE, BundleMeta, read_meta, write_meta
from shared.sample import astronaut_bgr, render_frames, write_video

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "emotion_recognition.py"
LINE = re.compile(r"^Detected Emotion: (\S+)$")
VIDEO_LINE = re.compile(r"^\[t=(\d+\.\d\d)s\] Detected Emotion: (\S+)$")
FPS = 10
N_FRAMES = 6


def _load_cli() -> ModuleType:
    # the script lives at the repository root, outside the installed packages
    spec = importlib.util.spec_from_file_location("emotion_recognition", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    face = root / "astronaut.png"  # lossless, so the detector sees exactly the photo
    cv2.imwrite(str(face), astronaut_bgr())
    grey = root / "grey.png"
    cv2.imwrite(str(grey), np.full((240, 320, 3), 128, dtype=np.uint8))
    video = write_video(root / "face.mp4", render_frames(N_FRAMES), FPS)
    grey_video = write_video(root / "grey.mp4", [np.full((240, 320, 3), 128, dtype=np.uint8)] * 3, FPS)
    text = root / "notes.jpg"
    text.write_text("this is not a picture\n")
    return {"face": face, "grey": grey, "video": video, "grey_video": grey_video, "text": text}


def model_args(bundle: Path) -> list[str]:
    return ["--model", str(bundle), "--runtime", "litert"]


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    cap.release()
    return frames


def test_image_prints_one_emotion_line(media: dict[str, Path], model_bundle: Path) -> None:
    proc = run_script("--input", str(media["face"]), *model_args(model_bundle))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    match = LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match.group(1) in read_meta(model_bundle).classes


def test_json_and_annotated_image(media: dict[str, Path], model_bundle: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "annotated.png"
    code = cli.main(["--input", str(media["face"]), "--json", "--output", str(out), *model_args(model_bundle)])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 1
    rec = records[0]
    meta = read_meta(model_bundle)
    assert rec["input"] == str(media["face"])
    assert (rec["frame"], rec["time_s"], rec["face"]) == (0, None, 0)
    assert rec["model_version"] == meta.version
    assert list(rec["probabilities"]) == list(meta.classes)
    assert sum(rec["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert rec["label"] == max(rec["probabilities"], key=rec["probabilities"].get)
    x, y, w, h = rec["box"]
    assert w > 40 and h > 40 and 0 <= x < 512 and 0 <= y < 512

    original, annotated = cv2.imread(str(media["face"])), cv2.imread(str(out))
    assert annotated is not None and annotated.shape == original.shape
    assert not np.array_equal(annotated, original)


def test_video_prints_a_line_per_frame_and_writes_mp4(media: dict[str, Path], model_bundle: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "annotated.mp4"
    assert cli.main(["--input", str(media["video"]), "--output", str(out), *model_args(model_bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    matches = [VIDEO_LINE.match(line) for line in lines]
    assert all(matches) and len(matches) == N_FRAMES, lines
    times = [float(m.group(1)) for m in matches if m]
    assert times == pytest.approx([i / FPS for i in range(N_FRAMES)], abs=0.011)
    assert {m.group(2) for m in matches if m} <= set(read_meta(model_bundle).classes)

    frames = read_video(out)
    assert len(frames) == N_FRAMES and frames[0].shape == (480, 640, 3)


def test_video_every_nth_frame_as_json_to_avi(media: dict[str, Path], model_bundle: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "annotated.avi"
    argv = ["--input", str(media["video"]), "--json", "--every", "2", "--output", str(out), *model_args(model_bundle)]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in records] == [0, 2, 4]
    assert [r["time_s"] for r in records] == pytest.approx([0.0, 0.2, 0.4], abs=0.011)
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-3) for r in records)
    # every frame is written, not only the classified ones
    assert len(read_video(out)) == N_FRAMES


def test_no_face_in_image(media: dict[str, Path], model_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--input", str(media["grey"]), *model_args(model_bundle)]) == 0
    assert capsys.readouterr().out.strip() == "No face detected."

    assert cli.main(["--input", str(media["grey"]), "--json", *model_args(model_bundle)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays parseable JSON lines
    assert "No face detected" in captured.err


def test_no_face_in_video_said_once(media: dict[str, Path], model_bundle: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--input", str(media["grey_video"]), *model_args(model_bundle)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("No face detected"), lines


def test_missing_input_exits_2_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "photo.jpg"
    proc = run_script("--input", str(missing))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "No such file" in proc.stderr
    assert proc.stdout == ""


def test_text_file_named_jpg_exits_2(media: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--input", str(media["text"])]) == 2
    err = capfd.readouterr().err
    assert str(media["text"]) in err and "not a readable image or video" in err


def test_folder_as_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--input", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_missing_or_invalid_bundle_exits_2(media: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--input", str(media["face"]), "--model", str(empty)]) == 2
    assert "model.json not found" in capsys.readouterr().err

    (empty / "model.json").write_text("{not json")
    assert cli.main(["--input", str(media["face"]), "--model", str(empty)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_bundle_whose_classes_do_not_fit_the_network_exits_2(media: dict[str, Path], model_bundle: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(model_bundle / TFLITE_FILE, bundle / TFLITE_FILE)
    write_meta(bundle, BundleMeta(classes=("Happy", "Sad"), version="mismatch"))
    assert cli.main(["--input", str(media["face"]), "--model", str(bundle), "--runtime", "litert"]) == 2
    assert str(bundle) in capsys.readouterr().err


def test_bad_output_extension_exits_2_before_work(media: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--input", str(media["video"]), "--output", str(tmp_path / "out.png")]) == 2
    assert ".mp4 or .avi" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_detector_options_are_validated(media: dict[str, Path]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--input", str(media["face"]), "--scale-factor", "0.9"])
    assert exc.value.code == 2


def _stderr_on_a_terminal(*args: str) -> str:
    """Run the CLI with stderr on a pseudo-terminal (as a person at a shell has it); what it wrote there."""
    import os
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL, stderr=slave,
                              cwd=REPO, timeout=300)
    finally:
        os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_long_video_shows_progress_on_a_terminal_but_not_with_json(tmp_path: Path, model_bundle: Path) -> None:
    video = write_video(tmp_path / "long.mp4", render_frames(120, 640, 480), FPS)
    shown = _stderr_on_a_terminal("--input", str(video), "--no-motion", *model_args(model_bundle))
    assert re.search(r"frames \d+/120 \(\d+%\), [\d.]+ frames/s, ETA \d+:\d\d", shown), shown[-500:]
    quiet = _stderr_on_a_terminal("--input", str(video), "--no-motion", "--json", *model_args(model_bundle))
    assert "ETA" not in quiet
