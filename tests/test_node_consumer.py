"""The wire format read from another language: the Node.js consumer in clients/node decodes the
events the Python side wrote, through its own consumer group, and sees what the Python client sees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from support import REPO, RedisServer

from shared.events import EventReader
from shared.schema import FIELD, Box, EventMsg, encode_event
from shared.streams import Keys

pytestmark = [pytest.mark.integration]

CLIENT = REPO / "clients" / "node"
KEYS = Keys()
CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def npm_installed() -> Path:
    """``npm ci`` once: again only when package-lock.json changed since the last install."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (bash deploy/run.sh test installs them)"
    stamp = CLIENT / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < (CLIENT / "package-lock.json").stat().st_mtime:
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    return Path(node)


def events() -> list[EventMsg]:
    """Events with every field exercised: several cameras, with and without a track, odd characters."""
    out = []
    for i in range(40):
        label = CLASSES[i % len(CLASSES)]
        probs = [((i * 7 + k * 3) % 11 + 1) / 3.7 for k in range(len(CLASSES))]
        total = sum(probs)
        probs = [p / total for p in probs]
        probs[CLASSES.index(label)] += 1e-9 * i
        out.append(EventMsg(
            event_id=f"cam-{i % 3}:{i}:{i % 2}", camera=["door", "hall.2", "café"][i % 3], seq=i, face=i % 2,
            capture_ts=1_767_000_000.123456 + i / 7, publish_ts=1_767_000_000.2 + i / 7 + 0.0137 * (i % 5),
            box=Box(i, 2 * i, 40 + i, 41 + i), label=label, score=max(probs), classes=CLASSES,
            probs=tuple(probs), model_version="v4-ü", track_id=None if i % 4 == 0 else 1000 + i))
    return out


def run_consumer(node: Path, url: str, *args: str) -> tuple[list[dict[str, Any]], str]:
    out = subprocess.run([str(node), str(CLIENT / "consumer.js"), "--redis-url", url, *args], cwd=CLIENT,
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def python_view(r: redis.Redis) -> list[tuple[str, EventMsg]]:
    reader = EventReader(r, start="start", group="python", block_ms=100)
    seen = []
    while batch := reader.read_positioned():
        seen += [(p.id, p.msg) for p in batch]
    reader.ack()
    return seen


def test_node_consumer_decodes_every_field_as_the_python_client_does(redis_server: RedisServer) -> None:
    node = npm_installed()
    r = redis_server.client()
    written = events()
    for i, ev in enumerate(written):
        r.xadd(KEYS.events, {FIELD: encode_event(ev)})  # type: ignore[arg-type]
        if i == 20:
            r.xadd(KEYS.events, {FIELD: b"\x93 not a map"})  # skipped, counted and acked by both
    lines, stderr = run_consumer(node, redis_server.url, "--group", "node", "--idle-exit-ms", "1500")
    assert "40 events printed, 1 entries skipped" in stderr, stderr
    python = python_view(r)
    assert [msg for _, msg in python] == written
    assert [line["stream_id"] for line in lines] == [sid for sid, _ in python]
    for line, (_, ev) in zip(lines, python, strict=True):
        expected = ev.to_dict()
        assert set(line) - {"stream_id"} == set(expected), line
        for key in ("schema_version", "event_id", "camera", "seq", "face", "box", "label", "model_version",
                    "track_id", "zones"):
            assert line.get(key) == expected.get(key), key
        # full precision in Node; the Python JSON form rounds these
        assert (line["capture_ts"], line["publish_ts"], line["score"]) == (ev.capture_ts, ev.publish_ts, ev.score)
        assert line["probabilities"] == dict(zip(ev.classes, ev.probs, strict=True))
        assert list(line["probabilities"]) == list(ev.classes)
        assert line["latency_ms"] == pytest.approx(expected["latency_ms"], abs=0.011)
    # every entry acked in the consumer's own group, and the group is its own: Python's is untouched
    groups = {g["name"].decode(): g for g in r.xinfo_groups(KEYS.events)}
    assert groups["node"]["pending"] == 0 and groups["node"]["entries-read"] == 41


def test_node_consumer_resumes_through_its_group_without_losing_an_event(redis_server: RedisServer) -> None:
    node = npm_installed()
    r = redis_server.client()
    written = events()
    for ev in written:
        r.xadd(KEYS.events, {FIELD: encode_event(ev)})  # type: ignore[arg-type]
    first, _ = run_consumer(node, redis_server.url, "--count", "15", "--consumer", "n1")
    rest, _ = run_consumer(node, redis_server.url, "--consumer", "n1", "--idle-exit-ms", "1000")
    ids = [line["event_id"] for line in first + rest]
    assert len(first) == 15 and ids == [ev.event_id for ev in written]
    assert r.xpending(KEYS.events, "node")["pending"] == 0
