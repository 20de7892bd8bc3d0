"""Classify under faults, in-process against a real Redis and the shipped model: a poison
message is isolated, a failing batch is retried and narrowed down, a refused publish acks
nothing and rolls the tracks back, tracks end under steady load, late frames move no track."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support import RedisServer

from services.classify.settings import ClassifySettings
from services.classify.worker import ClassifyMetrics, ClassifyWorker
from shared.classifier import load_classifier
from shared.events import EventReader, TrackReader
from shared.model_bundle import FER2013_CLASSES
from shared.schema import FIELD, Box, FaceCrop, FacesMsg, encode_faces
from shared.streams import Keys, autoclaim, connect
from shared.tracking import CameraTracker, Detection, TrackerSettings

pytestmark = [pytest.mark.integration]
KEYS = Keys()
POISON = 255  # a crop of this value makes the patched model fail


def worker(server: RedisServer, bundle: Path, tracking: bool = False, **tracker: float) -> ClassifyWorker:
    settings = ClassifySettings(redis={"url": server.url}, metrics={"enabled": False},
                                classify={"model": bundle, "runtime": "litert", "eager": True, "max_batch": 64},
                                tracking={"enabled": tracking, **tracker}, streams={"block_ms": 50})
    return ClassifyWorker(settings, connect(settings.redis), load_classifier(bundle, "litert"),
                          ClassifyMetrics(CollectorRegistry()))


def faces(seq: int, camera: str = "cam", size: int = 64, value: int | None = None, n: int = 1) -> bytes:
    rng = np.random.default_rng(seq)
    crop = (np.full((size, size), value, np.uint8) if value is not None
            else rng.integers(0, 256, (size, size), dtype=np.uint8))
    msg = FacesMsg(camera=camera, seq=seq, capture_ts=time.time(), detect_ts=time.time(), size=size,
                   faces=tuple(FaceCrop(box=Box(10 + i * 100, 10, 64, 64), crop=crop.tobytes()) for i in range(n)))
    return encode_faces(msg)


def queue(server: RedisServer, *payloads: bytes) -> None:
    for payload in payloads:
        server.client().xadd(KEYS.faces, {FIELD: payload})


def events(server: RedisServer) -> list[int]:
    return sorted(e.seq for e in EventReader(server.client(), start="start", block_ms=10).poll())


def dead(server: RedisServer) -> list[str]:
    return [f[b"reason"].decode() for _, f in server.client().xrange(KEYS.dead_letter(KEYS.faces))]


def pending(server: RedisServer) -> int:
    return int(server.client().xpending(KEYS.faces, "classify")["pending"])


def test_a_malformed_message_is_dead_lettered_alone_and_other_sizes_are_resized(
        redis_server: RedisServer, model_bundle: Path) -> None:
    w = worker(redis_server, model_bundle)
    queue(redis_server, faces(0), faces(1, size=0), faces(2, size=48), faces(3))
    w.step()
    assert events(redis_server) == [0, 2, 3]
    assert dead(redis_server) == ["bad_faces"]
    assert pending(redis_server) == 0


def test_a_batch_that_fails_once_is_retried_and_a_culprit_is_isolated(redis_server: RedisServer,
                                                                      model_bundle: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w = worker(redis_server, model_bundle)
    real = w.classifier.predict
    calls = {"n": 0}

    def flaky(crops: np.ndarray) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("transient")
        if (crops == POISON).all(axis=(1, 2)).any():
            raise ValueError("this face breaks the model")
        return real(crops)

    monkeypatch.setattr(w.classifier, "predict", flaky)
    queue(redis_server, faces(0), faces(1))
    w.step()
    assert events(redis_server) == [0, 1] and dead(redis_server) == [], "a transient error is retried"
    queue(redis_server, faces(2), faces(3, value=POISON), faces(4))
    w.step()
    assert events(redis_server) == [0, 1, 2, 4]
    assert dead(redis_server) == ["inference_error"]
    assert pending(redis_server) == 0


def test_a_refused_publish_acks_nothing_and_rolls_the_tracks_back(redis_server: RedisServer,
                                                                  model_bundle: Path) -> None:
    w = worker(redis_server, model_bundle, tracking=True)
    r = redis_server.client()
    w._tracker("cam")  # the track id block is taken before Redis starts refusing writes
    w.cfg = w.cfg.model_copy(update={"eager": False})
    w.publisher.opts = w.cfg
    queue(redis_server, faces(0), faces(1))
    w.step()  # read and held in the batch
    assert len(w._waiting) == 2
    r.config_set("maxmemory", 1)  # every write refused (noeviction): the MULTI must not half-apply
    try:
        with pytest.raises(Exception, match="maxmemory"):
            w.flush()
    finally:
        r.config_set("maxmemory", 0)
    assert pending(redis_server) == 2 and events(redis_server) == []
    assert w._trackers["cam"].tracks == [], "the tracks forgot the faces that were not published"
    claimed = autoclaim(r, KEYS.faces, "classify", w.consumer, idle_ms=0)
    w.handle_claimed(claimed.entries)
    assert events(redis_server) == [0, 1] and pending(redis_server) == 0
    kinds = [t.kind for t in TrackReader(r, start="start", block_ms=10).poll()]
    assert kinds == ["started"], "replayed faces start the track once"


def test_tracks_of_a_camera_without_faces_end_while_other_cameras_keep_classify_busy(
        redis_server: RedisServer, model_bundle: Path) -> None:
    w = worker(redis_server, model_bundle, tracking=True, max_gap_s=0.3)
    queue(redis_server, faces(0, camera="gone"))
    w.step()
    deadline = time.monotonic() + 10
    seq = 1
    while time.monotonic() < deadline:
        queue(redis_server, faces(seq, camera="busy"))
        w.step()  # a read returns every time: idle() is never reached
        seq += 1
        ended = [t for t in TrackReader(redis_server.client(), start="start", block_ms=10).poll()
                 if t.kind == "ended"]
        if ended:
            break
    assert [t.camera for t in ended] == ["gone"]


def test_a_late_frame_moves_no_track() -> None:
    t = CameraTracker("cam", FER2013_CLASSES, TrackerSettings())
    happy = np.eye(7)[3]
    box = Box(100, 100, 80, 80)
    first, events_now = t.update(10.0, [Detection(box, happy)])
    assert [e.kind for e in events_now] == ["started"]
    late, events_late = t.update(9.0, [Detection(box, np.eye(7)[4]), Detection(Box(400, 10, 50, 50), happy)])
    assert late == [first[0], None] and events_late == []
    track = t.tracks[0]
    assert track.last_seen == 10.0 and len(t.tracks) == 1
    ended = t.flush()
    # Seen in one frame (at 10.0): the late frame at 9.0 neither stretched nor reversed its duration.
    assert ended[0].duration_s == 0.0 and ended[0].emotion == "Happy"


def redis_major(server: RedisServer) -> int:
    return int(str(server.client().info("server")["redis_version"]).split(".")[0])


def test_entries_trimmed_before_they_were_processed_are_counted(redis_server: RedisServer,
                                                                model_bundle: Path) -> None:
    r = redis_server.client()
    w = worker(redis_server, model_bundle)
    w._ensure_groups([KEYS.faces])
    queue(redis_server, *[faces(seq) for seq in range(10)])
    r.xtrim(KEYS.faces, maxlen=4, approximate=False)  # six gone before classify read them
    w.step()  # samples its streams first, then reads the four left
    assert events(redis_server) == [6, 7, 8, 9]
    lost = w.common.registry.get_sample_value("es_stream_lost_total", {"stream": KEYS.faces, "group": "classify",
                                                                        "reason": "trimmed_unread"})
    assert lost == (6 if redis_major(redis_server) >= 7 else None)  # Redis 6.2 cannot tell
    # Entries a dead consumer held when MAXLEN trimmed them: found on takeover, acked and counted.
    queue(redis_server, *[faces(seq) for seq in range(10, 16)])
    r.xreadgroup("classify", "dead", {KEYS.faces: ">"}, count=6)
    r.xtrim(KEYS.faces, maxlen=2, approximate=False)
    w.settings = w.settings.model_copy(update={"streams": w.settings.streams.model_copy(
        update={"claim_idle_ms": 0})})
    w._claim_stream(KEYS.faces)
    assert events(redis_server) == [6, 7, 8, 9, 14, 15]
    assert pending(redis_server) == 0
    assert w.common.registry.get_sample_value("es_stream_lost_total", {
        "stream": KEYS.faces, "group": "classify", "reason": "trimmed_pending"}) == 4


def test_dead_letters_keep_small_payloads_and_only_the_size_of_large_ones(redis_server: RedisServer) -> None:
    from shared.settings import StreamSettings
    from shared.streams import Entry, dead_letter

    r = redis_server.client()
    cfg = StreamSettings(dead_letter_payload_max_bytes=1000, dead_letter_maxlen=100)
    pipe = r.pipeline()
    dead_letter(pipe, KEYS, cfg, Entry("s", "1-0", b"x" * 10), "bad", "small", "test")
    dead_letter(pipe, KEYS, cfg, Entry("s", "2-0", b"x" * 100_000), "bad", "a whole frame", "test")
    pipe.execute()
    small, large = (fields for _, fields in r.xrange("s:dead"))
    assert small[b"payload"] == b"x" * 10 and small[b"payload_kept"] == b"1"
    assert large[b"payload"] == b"" and large[b"payload_bytes"] == b"100000" and large[b"payload_kept"] == b"0"
    for i in range(300):
        dead_letter(pipe, KEYS, cfg, Entry("s", f"{i + 3}-0", b"y"), "bad", "flood", "test")
    pipe.execute()
    assert r.xlen("s:dead") <= 100 + 100, "capped at dead_letter_maxlen (approximately: whole nodes are trimmed)"
