"""Chaos with a ledger: the whole pipeline under a seeded schedule of crashes, and an account of
every frame.

Two cameras (a looping file and a live MJPEG camera), ingest, two detect workers, classify and
an ``emotion-stream events --group`` consumer run as processes. A seeded random schedule kills
each kind of process with SIGKILL (and starts it again), restarts Redis with its data kept
(AOF, fsync always) and takes the live camera away for a few seconds. After each step the
test waits for new events, so every step must be recovered from. Detect and classify are
killed while they hold read, unacked entries (frozen until XPENDING shows some), and each step
checks that those entries were taken over (``es_reclaimed_total`` of the processes that
remain) and acked. At the end the ledger reconciles: every frame in the frame streams (each
one ingest published) is an event the consumer printed or a frame without a face; a dead
letter (none is expected here) is a problem, whatever its reason; none is missing. Events seen
twice carry the same id and the same answer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from media import MjpegServer
from support import REPO, RedisServer, Service, free_port, group_idle, outside_env, scrape, service_env, wait_for

from shared.detection import DetectorSettings, HaarDetector, detect_and_crop
from shared.sample import render_frames, write_video
from shared.schema import decode_event, decode_faces, decode_frame
from shared.streams import Keys, parse_read

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]
KEYS = Keys()
SEED = int(os.environ.get("ES_CHAOS_SEED", "12"))
CAMERAS = ("file", "live")
FPS = 3


def chaos_config(bundle: Path, video: Path, live_url: str) -> dict[str, Any]:
    detector: dict[str, Any] = {}
    if "motion" in DetectorSettings.model_fields:
        detector["motion"] = {"enabled": False}  # every frame searched, so the ledger can re-detect
    return {
        "cameras": [{"id": "file", "url": str(video), "fps": FPS, "loop": True},
                    {"id": "live", "url": live_url, "fps": FPS}],
        "ingest": {"stream_maxlen": 5000, "backpressure_lag": 4000, "reconnect_initial_s": 0.2,
                   "reconnect_max_s": 1.0, "watchdog_s": 3.0},
        "detect": {"max_frame_age_s": 3600, "read_count": 2},
        "detector": detector,
        "classify": {"model": str(bundle), "runtime": "litert", "max_wait_ms": 10, "max_batch": 8},
        "streams": {"block_ms": 100, "claim_idle_ms": 1500, "claim_every_s": 0.5, "drain_timeout_s": 5},
        "redis": {"backoff_initial_s": 0.1, "backoff_max_s": 1.0},
    }


class Consumer:
    """``emotion-stream events --group`` printing JSON lines, appended to one file across restarts."""

    def __init__(self, url: str, out: Path) -> None:
        self.url = url
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        # Only the first start places the group; later ones resume it (and their own pending).
        where = ["--from", "start"] if self.starts == 0 else []
        env = outside_env()
        with self.out.open("ab") as sink, (self.out.parent / "consumer.err").open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "events", "--redis-url", self.url, "--group", "ledger",
                 "--consumer", "ledger", "--json", *where],
                cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=sink, stderr=err)
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(15)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.out.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@dataclass
class Chaos:
    tmp: Path
    redis: RedisServer
    config: Path
    camera: MjpegServer
    consumer: Consumer
    procs: dict[str, Service] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def spawn(self, role: str) -> None:
        service = role.split("-")[0]
        self.ports.setdefault(role, free_port())
        env = service_env(self.redis.url, ES_CONSUMER=role, ES_METRICS__PORT=str(self.ports[role]))
        tag = f"-{role}-{sum(1 for line in self.log if role in line)}"
        self.procs[role] = Service(service, self.config, env, self.tmp, tag=tag)

    def kill(self, role: str) -> None:
        if role == "ingest":
            try:
                self.ingest_runs.append(ingest_counts(self.ports["ingest"]))  # its counters die with it
            except OSError:
                self.ingest_runs.append(None)  # not serving metrics yet: what it read is unknown
        if role == "consumer":
            self.consumer.kill()
        else:
            self.procs[role].proc.kill()
            self.procs[role].proc.wait()

    def restart(self, role: str, rng: random.Random) -> Takeover | None:
        takeover = None
        if role.startswith(("detect", "classify")):
            held = self.freeze_holding(role)
            takeover = Takeover(role, held, self.reclaimed(role, exclude=role))
        self.kill(role)
        time.sleep(rng.uniform(0.5, 2.0))
        if role == "consumer":
            self.consumer.start()
        else:
            self.spawn(role)
        return takeover

    def held_by(self, role: str) -> list[tuple[str, str]]:
        """(stream, id) of the entries ``role`` read and has not acked (its consumer name is its role)."""
        r = self.redis.client()
        group, streams = worker_streams(role)
        out = []
        for stream in streams:
            if r.exists(stream):
                out += [(stream, p["message_id"].decode())
                        for p in r.xpending_range(stream, group, "-", "+", 1000, consumername=role)]
        return out

    def freeze_holding(self, role: str) -> list[tuple[str, str]]:
        """SIGSTOP ``role`` at a moment it holds read, unacked entries; the kill then hits work in flight."""
        proc = self.procs[role].proc
        deadline = time.monotonic() + 60
        while True:
            proc.send_signal(signal.SIGSTOP)
            held = self.held_by(role)
            if held:
                return held
            proc.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, f"{role} never held an entry in 60 s"
            time.sleep(0.003)

    def reclaimed(self, kind: str, exclude: str | None = None) -> float:
        """es_reclaimed_total over the live processes of a kind (detect or classify); a failed scrape retries."""
        kind = kind.split("-")[0]
        total = 0.0
        for role in [r for r in self.procs if r.startswith(kind) and r != exclude]:
            samples = wait_for(lambda role=role: _scrape_or_none(self.ports[role]), 60, interval=0.2,
                               what=f"{role}'s metrics")
            total += sum(value for _, value in samples.get("es_reclaimed_total", []))
        return total

    def check_takeover(self, takeover: Takeover) -> None:
        """The killed worker's entries were taken over by the processes now running, and acked."""
        r = self.redis.client()
        group, _ = worker_streams(takeover.role)

        def acked() -> bool:
            return not any(r.xpending_range(stream, group, entry_id, entry_id, 1)
                           for stream, entry_id in takeover.held)

        wait_for(acked, 90, interval=0.2, what=f"the entries {takeover.role} held acked")
        gained = self.reclaimed(takeover.role) - takeover.reclaimed_before
        assert gained >= len(takeover.held), (
            f"{takeover.role} was killed holding {len(takeover.held)} entries; only {gained:.0f} were reclaimed")
        self.log[-1] += f" holding {len(takeover.held)} (reclaimed {gained:.0f})"

    def restart_redis(self) -> None:
        self.redis.stop()  # SIGKILL: what the AOF (fsync always) holds is what survives
        time.sleep(2.0)
        self.redis.start()

    def drop_camera(self) -> None:
        port = self.camera.port
        self.camera.stop()
        time.sleep(3.0)
        self.camera = MjpegServer(self.camera_frames, fps=2 * FPS, port=port).start()

    camera_frames: list[np.ndarray] = field(default_factory=list)
    ingest_runs: list[Counter[str] | None] = field(default_factory=list)

    def event_count(self) -> int:
        try:
            return int(self.redis.client().xlen(KEYS.events))
        except Exception:  # Redis still loading its AOF
            return -1


@dataclass(frozen=True)
class Takeover:
    role: str
    held: list[tuple[str, str]]  # (stream, id) read and unacked when the process was killed
    reclaimed_before: float  # es_reclaimed_total of the other processes of its kind


def worker_streams(role: str) -> tuple[str, list[str]]:
    """The consumer group and streams a detect or classify process reads."""
    if role.startswith("detect"):
        return "detect", [KEYS.frames(c) for c in CAMERAS]
    return "classify", [KEYS.faces]


def _scrape_or_none(port: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    try:
        return scrape(port)
    except OSError:
        return None


def frames_of(server: RedisServer, camera: str) -> list[tuple[str, int, np.ndarray]]:
    entries = parse_read([(KEYS.frames(camera), server.client().xrange(KEYS.frames(camera)))])
    out = []
    for entry in entries:
        msg = decode_frame(entry.payload or b"")
        out.append((entry.id, msg.seq, cv2.imdecode(np.frombuffer(msg.jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)))
    return out


def dead_letters(server: RedisServer) -> dict[tuple[str, int], str]:
    """(camera, seq) -> reason, from the frame and face dead-letter streams."""
    r = server.client()
    out: dict[tuple[str, int], str] = {}
    for camera in CAMERAS:
        ids = {e.id: decode_frame(e.payload or b"").seq
               for e in parse_read([(KEYS.frames(camera), r.xrange(KEYS.frames(camera)))])}
        for _, fields in r.xrange(KEYS.dead_letter(KEYS.frames(camera))):
            seq = ids.get(fields[b"source_id"].decode())
            if seq is not None:
                out[(camera, seq)] = fields[b"reason"].decode()
    for _, fields in r.xrange(KEYS.dead_letter(KEYS.faces)):
        try:
            msg = decode_faces(fields[b"payload"])
        except ValueError:
            continue
        out[(msg.camera, msg.seq)] = fields[b"reason"].decode()
    return out


def reconcile(chaos: Chaos) -> tuple[dict[str, Counter[str]], list[str]]:
    """Per camera: how each published frame ended; and the problems found."""
    detector = HaarDetector(DetectorSettings())
    seen = chaos.consumer.events()
    by_id: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for ev in seen:
        first = by_id.setdefault(ev["event_id"], ev)
        if (first["label"], first["box"]) != (ev["label"], ev["box"]):
            problems.append(f"event {ev['event_id']} seen twice with different answers")
    published = {decode_event(e.payload or b"").event_id
                 for e in parse_read([(KEYS.events, chaos.redis.client().xrange(KEYS.events))])}
    for missed in sorted(published - by_id.keys())[:20]:
        problems.append(f"event {missed} is in the events stream but the consumer never printed it")
    frames_with_events = Counter((e["camera"], e["seq"]) for e in by_id.values())
    dead = dead_letters(chaos.redis)
    ledger: dict[str, Counter[str]] = {}
    for camera in CAMERAS:
        counts: Counter[str] = Counter()
        for _, seq, image in frames_of(chaos.redis, camera):
            counts["published"] += 1
            if frames_with_events[(camera, seq)]:
                counts["event(s) seen by the consumer"] += 1
                counts["events"] += frames_with_events[(camera, seq)]
            elif (camera, seq) in dead:
                # Every frame here is valid and no entry is delivered max_deliveries times:
                # whatever the reason, a dead letter means something was lost on the way.
                counts[f"dead letter: {dead[(camera, seq)]}"] += 1
                problems.append(f"{camera} frame {seq}: dead-lettered ({dead[(camera, seq)]})")
            elif not detect_and_crop(detector, image, 0.1):
                counts["no face in the frame"] += 1
            else:
                counts["MISSING"] += 1
                problems.append(f"{camera} frame {seq}: a face, but no event and no dead letter")
        ledger[camera] = counts
    return ledger, problems


def print_ledger(chaos: Chaos, ledger: dict[str, Counter[str]], duplicates: int) -> None:
    print(f"\nchaos ledger (seed {SEED})")
    print("schedule: " + "; ".join(chaos.log))
    for camera, counts in ledger.items():
        rest = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                         if k not in ("published", "events", "event(s) seen by the consumer"))
        print(f"  {camera}: {counts['published']} frames published -> {counts['event(s) seen by the consumer']} "
              f"with events ({counts['events']} events), {rest or 'nothing else'}")
    print(f"  consumer: {len(chaos.consumer.events())} events printed over {chaos.consumer.starts} runs, "
          f"{duplicates} printed again after a crash (same event id)")
    for run, counts in enumerate(chaos.ingest_runs):
        if counts is None:
            print(f"  ingest run {run + 1}: killed before it served metrics (not counted)")
            continue
        drops = ", ".join(f"{k.removeprefix('dropped ')} {v:.0f}" for k, v in sorted(counts.items())
                          if k.startswith("dropped "))
        print(f"  ingest run {run + 1}: {counts['read']:.0f} frames read, {counts['published']:.0f} published, "
              f"dropped (counted): {drops or 'none'}")


def ingest_counts(port: int) -> Counter[str]:
    """What one ingest process read, published and dropped (by reason), from its /metrics (OSError if down)."""
    counts: Counter[str] = Counter()
    samples = scrape(port)
    for _, value in samples.get("es_frames_read_total", []):
        counts["read"] += value
    for _, value in samples.get("es_frames_published_total", []):
        counts["published"] += value
    for labels, value in samples.get("es_frames_dropped_total", []):
        counts[f"dropped {labels['reason']}"] += value
    return counts


def _counts_or_none(port: int) -> Counter[str] | None:
    try:
        return ingest_counts(port)
    except OSError:
        return None


def test_chaos_every_published_frame_is_accounted_for(tmp_path: Path, model_bundle: Path) -> None:
    rng = random.Random(SEED)
    frames = render_frames(24, 400, 300)  # Haar misses the face at 320x240
    video = write_video(tmp_path / "clip.mp4", frames, fps=FPS)
    camera = MjpegServer(frames, fps=2 * FPS).start()
    redis = RedisServer(["--appendonly", "yes", "--appendfsync", "always"]).start()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(chaos_config(model_bundle, video, camera.url)))
    chaos = Chaos(tmp_path, redis, config, camera, Consumer(redis.url, tmp_path / "events.jsonl"),
                  camera_frames=frames)
    roles = ["classify", "detect-0", "detect-1", "ingest"]
    try:
        for role in roles:
            chaos.spawn(role)
        chaos.consumer.start()
        wait_for(lambda: chaos.event_count() >= 10, 120, interval=0.2, what="first events")
        steps: list[tuple[str, Callable[[], Takeover | None]]] = [
            *[(f"kill -9 {role}", lambda role=role: chaos.restart(role, rng)) for role in [*roles, "consumer"]],
            ("restart Redis", chaos.restart_redis),
            ("camera 'live' gone for 3 s", chaos.drop_camera),
        ]
        rng.shuffle(steps)
        for name, step in steps:
            time.sleep(rng.uniform(2.0, 5.0))
            before = max(chaos.event_count(), 0)
            takeover = step()
            chaos.log.append(name)
            wait_for(lambda before=before: chaos.event_count() >= before + 8, 90, interval=0.2,
                     what=f"events flowing again after: {name}")
            if takeover is not None:
                chaos.check_takeover(takeover)
        last = wait_for(lambda: _counts_or_none(chaos.ports["ingest"]), 30, interval=0.2, what="ingest's metrics")
        chaos.procs["ingest"].stop()
        wait_for(lambda: all(group_idle(redis, KEYS.frames(c), "detect", missing_is_idle=True) for c in CAMERAS)
                 and group_idle(redis, KEYS.faces, "classify", missing_is_idle=True)
                 and group_idle(redis, KEYS.events, "ledger", missing_is_idle=True),
                 120, interval=0.2, what="every frame, face and event processed")
        for role in roles:
            svc = chaos.procs[role]
            assert svc.proc.poll() is None or role == "ingest", f"{role} exited:\n{svc.log()[-2000:]}"
        ledger, problems = reconcile(chaos)
        seen = chaos.consumer.events()
        duplicates = len(seen) - len({e["event_id"] for e in seen})
        chaos.ingest_runs.append(last)
        print_ledger(chaos, ledger, duplicates)
    finally:
        chaos.consumer.stop()
        for svc in chaos.procs.values():
            svc.stop()
        chaos.camera.stop()
        redis.stop()
    assert not problems, "\n".join(problems[:20])
    # The last ingest process ran to the end: each frame it read was published or counted as a
    # drop, give or take the one frame per camera between two counters when it was scraped.
    unaccounted = last["read"] - last["published"] - sum(v for k, v in last.items() if k.startswith("dropped "))
    assert 0 <= unaccounted <= len(CAMERAS), last
    assert all(counts["published"] > 0 and counts["events"] > 0 for counts in ledger.values())
