"""`emotion-stream up` and `emotion-stream events` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, RedisServer, outside_env

from shared.sample import render_frames, write_video

pytestmark = [pytest.mark.integration]


def cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    base = outside_env()
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env})


def test_up_with_embedded_redis_prints_json_events_and_stops_at_end_of_file(tmp_path: Path,
                                                                            model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(12), fps=10)
    result = cli("up", "--input", str(video), "--json", "--fps", "10", "--model", str(model_bundle))
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) >= 10, result.stderr[-2000:]
    assert {e["camera"] for e in events} == {"cam0"}
    assert all(set(e["probabilities"]) == {"Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"}
               for e in events)
    assert "(embedded)" in result.stderr and "all inputs processed" in result.stderr
    assert "events in" in result.stderr  # the closing summary


def test_events_cli_replays_and_filters(tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(8), fps=10)
    up = cli("up", "--input", str(video), "--input", str(video), "--redis-url", redis_server.url,
             "--model", str(model_bundle))
    assert up.returncode == 0, up.stderr[-3000:]
    assert up.stdout.count("Detected Emotion:") >= 14
    replay = cli("events", "--redis-url", redis_server.url, "--from", "start", "--camera", "cam1", "--json",
                 "--count", "5", timeout=30)
    assert replay.returncode == 0, replay.stderr
    lines = [json.loads(line) for line in replay.stdout.splitlines()]
    assert len(lines) == 5 and {e["camera"] for e in lines} == {"cam1"}
    label = lines[0]["label"]
    only = cli("events", "--redis-url", redis_server.url, "--from", "start", "--emotion", label, "--min-score", "0",
               "--json", "--count", "3", timeout=30)
    assert {json.loads(line)["label"] for line in only.stdout.splitlines()} == {label}


def test_up_rejects_missing_input_and_unknown_scheme(tmp_path: Path) -> None:
    missing = cli("up", "--input", str(tmp_path / "nope.mp4"), timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    scheme = cli("up", "--input", "gopher://x/y", timeout=60)
    assert scheme.returncode == 2 and "unsupported URL scheme" in scheme.stderr
