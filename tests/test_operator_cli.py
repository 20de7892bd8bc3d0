"""`emotion-stream events` and `cameras` speak the services' configuration: --config, ES_REDIS__*, prefix."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml
from support import REPO, RedisServer, outside_env

from shared.cameras import CameraRegistry
from shared.sample import render_frames, write_video
from shared.schema import FIELD, Box, EventMsg, encode_event
from shared.streams import Keys

CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    base = outside_env()
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env})


def happy(seq: int) -> bytes:
    ts = time.time()
    return encode_event(EventMsg(event_id=f"door:{seq}:0", camera="door", seq=seq, face=0, capture_ts=ts,
                                 publish_ts=ts, box=Box(1, 2, 30, 30), label="Happy", score=0.9, classes=CLASSES,
                                 probs=(0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.1), model_version="t"))


@pytest.fixture
def password_redis() -> RedisServer:
    server = RedisServer(["--requirepass", "s3cret"]).start()
    yield server  # type: ignore[misc]
    server.stop()


def test_events_reads_a_password_protected_redis_under_another_prefix_from_the_config(
        tmp_path: Path, password_redis: RedisServer) -> None:
    client = redis.Redis(port=password_redis.port, password="s3cret")
    for seq in range(3):
        client.xadd(Keys("site2").events, {FIELD: happy(seq)})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": password_redis.url, "prefix": "site2"},
                                      "cameras": [], "detect": {}}))
    out = cli("events", "--config", str(config), "--from", "start", "--count", "3", "--json",
              ES_REDIS__PASSWORD="s3cret")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["seq"] for line in out.stdout.splitlines()] == [0, 1, 2]


def test_cameras_takes_the_config_and_updates_only_the_fields_given(tmp_path: Path,
                                                                    redis_server: RedisServer) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"redis": {"prefix": "site2"}}))
    env = {"ES_REDIS__URL": redis_server.url}
    added = cli("cameras", "--config", str(config), "add", "door", "rtsp://u:pw@10.0.0.7/a", "--fps", "5", "--loop",
                **env)
    assert added.returncode == 0, added.stderr
    assert "no ingest replica runs with ingest.dynamic: true" in added.stderr
    registry = CameraRegistry(redis_server.client(), "site2")
    assert cli("cameras", "--config", str(config), "update", "door", "--fps", "7", **env).returncode == 0
    cam = registry.cameras()[0]["door"]
    assert (cam.url, cam.fps, cam.loop) == ("rtsp://u:pw@10.0.0.7/a", 7.0, True)
    registry.beat("ingest-1", 60.0)
    moved = cli("cameras", "--config", str(config), "update", "door", "rtsp://u:pw@10.0.0.7/b", "--no-loop", **env)
    assert moved.returncode == 0 and "warning" not in moved.stderr
    cam = registry.cameras()[0]["door"]
    assert (cam.url, cam.fps, cam.loop) == ("rtsp://u:pw@10.0.0.7/b", 7.0, False)
    assert CameraRegistry(redis_server.client()).cameras()[0] == {}  # nothing under the default prefix
    listed = cli("cameras", "--redis-url", redis_server.url, "--prefix", "site2", "list")
    assert "door\trtsp://u:***@10.0.0.7/b" in listed.stdout and "pw" not in listed.stdout


def test_bad_redis_settings_are_reported_with_their_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": "http://x"}}))
    out = cli("cameras", "--config", str(config), "list")
    assert out.returncode == 2 and "config error: redis.url = 'http://x'" in out.stderr
    flag = cli("events", "--redis-url", "gopher://x", "--count", "1")
    assert flag.returncode == 2 and "config error: redis.url = 'gopher://x'" in flag.stderr


@pytest.mark.integration
def test_up_takes_cameras_and_settings_from_the_config_and_warns_about_a_shared_redis(
        tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(6), fps=10)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "redis": {"prefix": "site2"},
        "cameras": [{"id": "lobby", "url": str(video), "fps": 10}],
        "classify": {"model": str(model_bundle), "runtime": "litert-int8"},
    }))
    redis_server.client().sadd(Keys("site2").cameras, "lobby")  # as a running pipeline's ingest leaves it
    out = cli("up", "--config", str(config), "--redis-url", redis_server.url, "--no-web", "--json", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "already holds a pipeline under prefix 'site2'" in out.stderr and "same camera ids: lobby" in out.stderr
    assert "web view" not in out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(events) >= 5 and {e["camera"] for e in events} == {"lobby"}
    assert redis_server.client().xlen(Keys("site2").events) == len(events)
    assert not redis_server.client().exists(Keys().events)


def test_cameras_remove_also_drops_the_camera_from_the_streams_detect_polls(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert cli("cameras", "--redis-url", redis_server.url, "add", "door", "rtsp://10.0.0.7/door").returncode == 0
    client.sadd(Keys().cameras, "door", "lobby")  # as ingest announces the cameras it reads
    assert cli("cameras", "--redis-url", redis_server.url, "remove", "door").returncode == 0
    assert client.smembers(Keys().cameras) == {b"lobby"}
