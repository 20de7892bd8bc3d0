"""Masks and zones end to end: a file camera through ingest, detect and classify on a real Redis.

The clip shows the astronaut's head three times (left, middle, right) on a photograph. The
camera's mask covers the left third and its zone ``door`` the middle one, so the left head must
yield no event at all, the middle one events in ``door``, the right one events in no zone; and
``emotion-stream events --zone`` prints only what it is asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from skimage import data
from support import REPO, RedisServer, Service, free_port, metric, outside_env, service_env, wait_for

from shared.events import EventReader
from shared.model_bundle import DEFAULT_BUNDLE, META_FILE
from shared.sample import write_video
from shared.schema import EventMsg

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MASK = [[0, 0], [0.33, 0], [0.33, 1], [0, 1]]  # x < 211 of 640: the left head (centre near x=103)
DOOR = [[0.34, 0], [0.66, 0], [0.66, 1], [0.34, 1]]  # the middle head (near x=319); the right one (534) is in none
SERVICES = ("classify", "detect", "ingest")


def three_heads() -> np.ndarray:
    def grey(rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))

    frame = cv2.resize(grey(data.coffee()), (640, 400))
    head = grey(data.astronaut())[30:210, 140:310]
    for x in (20, 235, 450):
        frame[110:290, x:x + 170] = head
    return np.asarray(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))


class Run:
    def __init__(self, server: RedisServer, events: list[EventMsg], ports: dict[str, int]) -> None:
        self.server = server
        self.events = events
        self.ports = ports


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if not (DEFAULT_BUNDLE / META_FILE).exists():
        pytest.skip(f"no model bundle at {DEFAULT_BUNDLE} (train one with python -m services.classify.train)")
    tmp = tmp_path_factory.mktemp("zones")
    video = write_video(tmp / "three.mp4", [three_heads()] * 10, fps=5)
    config = {
        "cameras": [{"id": "cam0", "url": str(video), "fps": 5, "loop": True, "mask": [MASK],
                     "zones": [{"name": "door", "points": DOOR}]}],
        "detect": {"max_frame_age_s": 60},
        "classify": {"model": str(DEFAULT_BUNDLE), "runtime": "litert", "max_wait_ms": 10},
        "streams": {"block_ms": 200},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    server = RedisServer().start()
    ports = {name: free_port() for name in SERVICES}
    procs: dict[str, Service] = {}
    try:
        for name in SERVICES:
            env = service_env(server.url, ES_CONSUMER=f"{name}-test", ES_METRICS__PORT=str(ports[name]))
            procs[name] = Service(name, path, env, tmp)
        events = collect(server, procs)
        yield Run(server, events, ports)
    finally:
        for svc in procs.values():
            svc.stop()
        server.stop()


def collect(server: RedisServer, procs: dict[str, Service]) -> list[EventMsg]:
    reader = EventReader(server.client(), start="start", block_ms=200)
    events: list[EventMsg] = []

    def enough() -> bool:
        events.extend(reader.poll())
        for svc in procs.values():
            if svc.proc.poll() is not None:
                raise AssertionError(f"{svc.name} exited {svc.proc.returncode}:\n{svc.log()[-3000:]}")
        sides = [side(e) for e in events]
        return sides.count("middle") >= 6 and sides.count("right") >= 6

    try:
        wait_for(enough, 150, interval=0.0, what="events of the middle and right heads")
    except AssertionError:
        logs = "\n".join(f"--- {n}\n{s.log()[-1500:]}" for n, s in procs.items())
        raise AssertionError(f"{len(events)} events: {[side(e) for e in events]}\n{logs}") from None
    return events


def side(ev: EventMsg) -> str:
    cx = ev.box.x + ev.box.w / 2
    return "left" if cx < 211 else ("middle" if cx < 422 else "right")


def events_cli(url: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "shared.cli", "events", "--redis-url", url, "--from", "start",
                          "--json", *args], cwd=REPO, env={**outside_env(), "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_masked_head_yields_no_event_and_the_mask_is_counted(run: Run) -> None:
    assert [e for e in run.events if side(e) == "left"] == [], "the masked head must never be classified"
    assert metric(run.ports["detect"], "es_detect_masked_frames_total", camera="cam0") > 0


def test_events_carry_their_zone_and_events_zone_filters_them(run: Run) -> None:
    for ev in run.events:
        assert ev.zones == (("door",) if side(ev) == "middle" else ()), (side(ev), ev.zones)
    door = events_cli(run.server.url, "--zone", "door", "--count", "6")
    assert len(door) == 6 and all(e["zones"] == ["door"] for e in door), door
    nowhere = events_cli(run.server.url, "--zone", "none", "--count", "6")
    assert len(nowhere) == 6 and all(e["zones"] == [] and e["box"][0] > 422 for e in nowhere), nowhere
    assert metric(run.ports["classify"], "es_events_total", camera="cam0", zone="door") >= 6
    assert metric(run.ports["detect"], "es_detect_faces_total", camera="cam0", zone="none") >= 6
