"""Fault tests on real processes: killed workers, a restarted Redis, lost cameras, shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from media import HangingMjpeg, RtspServer
from support import (
    REPO,
    RedisServer,
    Service,
    endpoint_ok,
    free_port,
    group_idle,
    metric,
    metric_or,
    outside_env,
    pipeline,
    service_env,
    wait_for,
)

from shared.detection import DetectorSettings, HaarDetector, detect_and_crop
from shared.events import EventReader
from shared.sample import render_frames, write_video
from shared.schema import (
    FIELD,
    EventMsg,
    FaceCrop,
    FacesMsg,
    FrameMsg,
    decode_faces,
    decode_frame,
    encode_faces,
    encode_frame,
)
from shared.streams import Keys, parse_read

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = Keys()

FAST_RECOVERY = {"block_ms": 100, "claim_idle_ms": 1500, "claim_every_s": 0.5, "drain_timeout_s": 5}


def base_config(bundle: Path, cameras: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "cameras": cameras,
        "detect": {"max_frame_age_s": 600, "read_count": 2},
        "classify": {"model": str(bundle), "runtime": "litert", "max_wait_ms": 10, "max_batch": 8},
        "streams": FAST_RECOVERY,
        "redis": {"backoff_initial_s": 0.1, "backoff_max_s": 1.0},
        "ingest": {"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "watchdog_s": 2.0},
        "metrics": {"port": 0},
    }


def all_events(server: RedisServer) -> list[EventMsg]:
    reader = EventReader(server.client(), start="start", block_ms=10)
    events: list[EventMsg] = []
    while batch := reader.read():  # a read returns at most 256 entries
        events += batch
    return events


def frames_with_faces(server: RedisServer, camera: str) -> set[int]:
    """Sequence numbers of the published frames in which the detector finds a face."""
    detector = HaarDetector(DetectorSettings())
    seqs = set()
    for entry in parse_read([(KEYS.frames(camera), server.client().xrange(KEYS.frames(camera)))]):
        msg = decode_frame(entry.payload or b"")
        image = cv2.imdecode(np.frombuffer(msg.jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        if detect_and_crop(detector, image, 0.1):
            seqs.add(msg.seq)
    return seqs


def kill_a_holder(server: RedisServer, workers: dict[str, Service], stream: str, group: str) -> tuple[str, int]:
    """SIGKILL one of ``workers`` (by consumer name) at a moment it holds delivered, unacked entries.

    The workers are frozen (SIGSTOP) while the pending counts are read, so the kill cannot land
    in the gap between two batches and let the test pass with nothing to take over. Returns the
    name of the killed worker and how many entries it held.
    """
    r = server.client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for svc in workers.values():
            svc.proc.send_signal(signal.SIGSTOP)
        held = {c["name"].decode(): int(c["pending"]) for c in r.xpending(stream, group)["consumers"]}
        victim = next((name for name in workers if held.get(name)), None)
        if victim is not None:
            workers[victim].proc.send_signal(signal.SIGKILL)
            workers[victim].proc.wait()
        for name, svc in workers.items():
            if name != victim:
                svc.proc.send_signal(signal.SIGCONT)
        if victim is not None:
            return victim, held[victim]
        time.sleep(0.01)
    raise AssertionError(f"no worker of {sorted(workers)} ever held entries of {stream}")


def test_killed_workers_lose_nothing(tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(60), fps=20)
    cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 20}])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    ports = {name: free_port() for name in ("detect-a", "detect-b", "classify-a", "classify-b")}
    workers = {name: Service(name.split("-")[0], tmp_path / "config.yaml",
                             service_env(redis_server.url, ES_CONSUMER=name, ES_METRICS__PORT=str(port)),
                             tmp_path, tag=name[-2:])
               for name, port in ports.items()}
    try:
        wait_for(lambda: all(endpoint_ok(port, "/readyz") for port in ports.values()), 120, what="workers ready")
        with pipeline(tmp_path, redis_server.url, cfg, services=("ingest",)) as procs:
            wait_for(lambda: len(all_events(redis_server)) >= 10, 90, what="first events")
            detects = {n: w for n, w in workers.items() if n.startswith("detect")}
            dead_detect, held_frames = kill_a_holder(redis_server, detects, KEYS.frames("cam"), "detect")
            wait_for(lambda: len(all_events(redis_server)) >= 25, 90, what="events after killing detect")
            classifies = {n: w for n, w in workers.items() if n.startswith("classify")}
            dead_classify, held_faces = kill_a_holder(redis_server, classifies, KEYS.faces, "classify")
            assert procs["ingest"].proc.wait(60) == 0
            wait_for(lambda: group_idle(redis_server, KEYS.frames("cam"), "detect")
                     and group_idle(redis_server, KEYS.faces, "classify"), 60, what="all entries acked")
        survivors = {n: p for n, p in ports.items() if n not in (dead_detect, dead_classify)}
        reclaimed = {n: metric(p, "es_reclaimed_total", stream=KEYS.frames("cam") if n.startswith("detect")
                               else KEYS.faces) for n, p in survivors.items()}
    finally:
        for svc in workers.values():
            svc.stop()
    expected = frames_with_faces(redis_server, "cam")
    events = all_events(redis_server)
    by_id: dict[str, EventMsg] = {}
    for ev in events:
        if ev.event_id in by_id:  # a re-delivered frame: same id, same answer
            assert by_id[ev.event_id].label == ev.label
        by_id[ev.event_id] = ev
    published = redis_server.client().xlen(KEYS.frames("cam"))
    print(f"killed workers: {published} frames published, {len(expected)} with a face, {len(events)} events "
          f"({len(events) - len(by_id)} re-deliveries with the same id), {len(by_id)} distinct; killed {dead_detect} "
          f"holding {held_frames} frames and {dead_classify} holding {held_faces} faces messages; survivors "
          f"reclaimed {reclaimed}")
    assert {e.seq for e in by_id.values()} == expected
    assert len(expected) >= 50
    assert sum(v for n, v in reclaimed.items() if n.startswith("detect")) >= held_frames
    assert sum(v for n, v in reclaimed.items() if n.startswith("classify")) >= held_faces


def test_redis_restart_recovers_within_5s(tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(30), fps=10)
    cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 10, "loop": True}])
    with pipeline(tmp_path, redis_server.url, cfg) as procs:
        wait_for(lambda: len(all_events(redis_server)) >= 5, 90, what="events before the restart")
        redis_server.stop()
        time.sleep(3.0)
        redis_server.start()
        back = time.monotonic()
        try:
            wait_for(lambda: len(all_events(redis_server)) >= 3, 30, interval=0.05, what="events after the restart")
        except AssertionError as exc:
            logs = "\n".join(f"--- {svc.name}\n{svc.log()[-3000:]}" for svc in procs.values())
            raise AssertionError(f"{exc}\n{logs}") from None
        recovery = time.monotonic() - back
        for svc in procs.values():
            assert svc.proc.poll() is None, f"{svc.name} exited:\n{svc.log()[-2000:]}"
        print(f"events flowed again {recovery:.2f}s after Redis came back")
    assert recovery < 5.0


def test_rtsp_camera_lost_and_back_while_others_flow(tmp_path: Path, redis_server: RedisServer,
                                                     model_bundle: Path) -> None:
    frames = render_frames(40)
    rtsp = RtspServer("--test").start()
    port = rtsp.port
    video = write_video(tmp_path / "clip.mp4", frames, fps=10)
    cams = [{"id": "rtsp", "url": rtsp.url, "fps": 5}, {"id": "file", "url": str(video), "fps": 5, "loop": True}]
    metrics_port = free_port()
    cfg = base_config(model_bundle, cams)
    try:
        with pipeline(tmp_path, redis_server.url, cfg, services=("ingest",),
                      ES_METRICS__PORT=str(metrics_port)) as procs:
            r = redis_server.client()
            wait_for(lambda: r.xlen(KEYS.frames("rtsp")) >= 5, 60, what="rtsp frames")
            assert metric(metrics_port, "es_camera_up", camera="rtsp") == 1.0
            rtsp.stop()
            down_at = time.monotonic()
            wait_for(lambda: metric_or(metrics_port, "es_camera_up", -1, camera="rtsp") == 0.0, 15,
                     what="camera down")
            file_before = r.xlen(KEYS.frames("file"))
            time.sleep(3)
            assert r.xlen(KEYS.frames("file")) >= file_before + 10, "the other camera must keep flowing"
            rtsp = RtspServer("--test")
            rtsp.port = port
            rtsp.start()
            back_at = time.monotonic()
            wait_for(lambda: metric_or(metrics_port, "es_camera_up", -1, camera="rtsp") == 1.0, 30, what="camera up")
            print(f"camera down detected, reconnected {time.monotonic() - back_at:.2f}s after the server returned "
                  f"({back_at - down_at:.1f}s outage)")
            assert metric(metrics_port, "es_camera_reconnects_total", camera="rtsp") >= 1
            assert procs["ingest"].proc.poll() is None
    finally:
        rtsp.stop()


def test_hung_source_is_caught_by_the_frame_age_watchdog(tmp_path: Path, redis_server: RedisServer,
                                                         model_bundle: Path) -> None:
    server = HangingMjpeg(render_frames(10)).start()
    metrics_port = free_port()
    cfg = base_config(model_bundle, [{"id": "hang", "url": server.url, "fps": 0}])
    try:
        with pipeline(tmp_path, redis_server.url, cfg, services=("ingest",),
                      ES_METRICS__PORT=str(metrics_port)) as procs:
            wait_for(lambda: metric_or(metrics_port, "es_camera_up", -1, camera="hang") == 1.0, 30, what="camera up")
            wait_for(lambda: metric_or(metrics_port, "es_camera_stalls_total", -1, camera="hang") >= 1, 20,
                     what="watchdog")
            assert metric(metrics_port, "es_camera_up", camera="hang") == 0.0
            assert procs["ingest"].proc.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize("service", ["ingest", "detect", "classify"])
def test_sigterm_drains_and_exits_0_and_a_second_exits_at_once(tmp_path: Path, redis_server: RedisServer,
                                                               model_bundle: Path, service: str) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=10)
    cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 10, "loop": True}])
    metrics_port = free_port()
    with pipeline(tmp_path, redis_server.url, cfg, services=(service,), ES_METRICS__PORT=str(metrics_port)) as procs:
        proc = procs[service].proc
        wait_for(lambda: endpoint_ok(metrics_port, '/healthz'), 60, what=f"{service} healthy")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, procs[service].log()[-2000:]
        assert time.monotonic() - started < 6
    with pipeline(tmp_path, redis_server.url, cfg, services=(service,), ES_METRICS__PORT=str(metrics_port)) as procs:
        proc = procs[service].proc
        wait_for(lambda: endpoint_ok(metrics_port, '/healthz'), 60, what=f"{service} healthy again")
        # Redis frozen: the drain the first SIGTERM starts hangs on it (up to the socket timeout,
        # then the drain timeout); the second SIGTERM must end the process at once.
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the first is handled (a second sent at once could merge with it)
            assert proc.poll() is None, "the drain should still be waiting on the frozen Redis"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(5)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        # 143 from the handler; -15 when the process was already past its main function (the
        # interpreter puts the default handler back while it waits for threads).
        assert code in (128 + signal.SIGTERM, -signal.SIGTERM), f"exit code {code}:\n{procs[service].log()[-2000:]}"
        assert time.monotonic() - started < 1.0



def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_overload_stays_bounded_and_every_frame_is_counted(tmp_path: Path, redis_server: RedisServer,
                                                           model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(30), fps=30)
    cams = [{"id": f"c{i}", "url": str(video), "fps": 30, "loop": True} for i in range(3)]
    cfg = base_config(model_bundle, cams)
    cfg["detect"] = {"max_frame_age_s": 0.5, "read_count": 4}
    # Detect must fall behind 90 frames/s whatever the machine: gated detection of this still
    # scene keeps up on an idle 2-core machine, so every frame is searched whole here.
    cfg["detector"] = {"motion": {"enabled": False}}
    cfg["ingest"] = {"stream_maxlen": 100, "backpressure_lag": 50}
    ports = {"detect": free_port(), "classify": free_port()}
    r = redis_server.client()
    with pipeline(tmp_path, redis_server.url, cfg, services=("ingest",)) as procs:
        for name, port in ports.items():
            procs[name] = Service(name, tmp_path / "config.yaml",
                                  service_env(redis_server.url, ES_METRICS__PORT=str(port)), tmp_path)
        wait_for(lambda: metric_or(ports["classify"], "es_events_total", 0) >= 5, 90, what="first events")
        rss_start = {n: rss_kb(p.proc.pid) for n, p in procs.items()}
        window_start = window_counts(ports["detect"], r, cams)
        lengths = []
        for _ in range(20):  # 20 s of overload
            lengths.append(max(r.xlen(KEYS.frames(c["id"])) for c in cams))
            time.sleep(1)
        window = window_counts(ports["detect"], r, cams) - window_start
        rss_end = {n: rss_kb(p.proc.pid) for n, p in procs.items()}
        assert procs["ingest"].stop() == 0
        for cam in cams:
            wait_for(lambda c=cam: group_idle(redis_server, KEYS.frames(c["id"]), "detect"), 30, what="detect idle")
        published = sum(decode_frame(r.xrevrange(KEYS.frames(c["id"]), count=1)[0][1][b"m"]).seq + 1 for c in cams)
        processed = metric(ports["detect"], "es_detect_frames_total")
        dropped = metric(ports["detect"], "es_frames_dropped_total", stage="detect")
        stale = metric(ports["detect"], "es_frames_dropped_total", stage="detect", reason="stale")
        p99 = histogram_quantile(ports["classify"], "es_end_to_end_seconds", 0.99)
        latencies = sorted(e.publish_ts - e.capture_ts for e in all_events(redis_server))
        exact_p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"overload: published {published}, detected {processed:.0f}, dropped stale {stale:.0f}, "
          f"in the 20 s window {window}, "
          f"max stream length {max(lengths)}, e2e p99 {exact_p99:.3f}s (histogram bucket <= {p99}s), "
          f"rss {rss_start} -> {rss_end}")
    assert published == processed + dropped, "every published frame is processed or counted as dropped"
    # Overloaded during the window itself (not only frames that aged while detect started): a
    # good share of what ingest published then was dropped as stale, and detect worked throughout.
    assert window["stale"] >= 0.1 * window["published"] and window["processed"] > 0, window
    assert max(lengths) <= 100 + 100  # MAXLEN ~ trims whole macro nodes (100 entries)
    # Bounded by the stale limit (0.5 s) plus one detect call and a batch, on a busy 2-core machine.
    assert exact_p99 < 0.5 + 1.5
    for name in rss_start:
        assert rss_end[name] - rss_start[name] < 50_000, f"{name} memory grew {rss_start} -> {rss_end}"


def window_counts(port: int, r: Any, cams: list[dict[str, Any]]) -> Counter[str]:
    """Frames published so far (all cameras) and detect's processed and stale counts."""
    published = sum(decode_frame(r.xrevrange(KEYS.frames(c["id"]), count=1)[0][1][b"m"]).seq + 1 for c in cams)
    return Counter(published=published,
                   processed=int(metric_or(port, "es_detect_frames_total", 0.0)),
                   stale=int(metric_or(port, "es_frames_dropped_total", 0.0, stage="detect", reason="stale")))


def histogram_quantile(port: int, name: str, q: float) -> float:
    """Upper bucket bound holding the q-quantile, from the cumulative buckets of all label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    total = buckets.get(float("inf"), 0.0)
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return float("inf")


def face_entries(n: int, camera: str = "cam") -> list[bytes]:
    """Faces messages as detect writes them, one real face each."""
    detector = HaarDetector(DetectorSettings())
    gray = cv2.cvtColor(render_frames(1)[0], cv2.COLOR_BGR2GRAY)
    found = detect_and_crop(detector, gray, 0.1)
    assert found
    out = []
    for seq in range(n):
        msg = FacesMsg(camera=camera, seq=seq, capture_ts=time.time(), detect_ts=time.time(),
                       size=found[0].crop.shape[0], faces=(FaceCrop(box=found[0].box, crop=found[0].crop.tobytes()),))
        out.append(encode_faces(msg))
    return out


def consumer_pending(server: RedisServer, stream: str, group: str, consumer: str) -> int:
    info = server.client().xpending(stream, group)
    return next((int(c["pending"]) for c in info["consumers"] if c["name"].decode() == consumer), 0)


def test_sigterm_publishes_the_faces_waiting_in_a_batch(tmp_path: Path, redis_server: RedisServer,
                                                        model_bundle: Path) -> None:
    cfg = base_config(model_bundle, [])
    # Faces wait for a full batch (or 8 s): at SIGTERM they are in flight, read and unacked.
    cfg["classify"].update({"eager": False, "max_batch": 64, "max_wait_ms": 8000})
    cfg["streams"] = {**FAST_RECOVERY, "claim_idle_ms": 30_000}
    r = redis_server.client()
    with pipeline(tmp_path, redis_server.url, cfg, services=("classify",)) as procs:
        wait_for(lambda: r.exists(KEYS.faces) and r.xinfo_groups(KEYS.faces), 60, what="classify's group")
        for payload in face_entries(5):
            r.xadd(KEYS.faces, {FIELD: payload})
        wait_for(lambda: consumer_pending(redis_server, KEYS.faces, "classify", "classify-test") == 5, 30,
                 what="five faces waiting in the batch")
        assert r.xlen(KEYS.events) == 0
        procs["classify"].proc.send_signal(signal.SIGTERM)
        assert procs["classify"].proc.wait(15) == 0, procs["classify"].log()[-2000:]
    assert sorted(e.seq for e in all_events(redis_server)) == [0, 1, 2, 3, 4]
    assert group_idle(redis_server, KEYS.faces, "classify")


def test_sigterm_finishes_the_frames_detect_holds(tmp_path: Path, redis_server: RedisServer,
                                                  model_bundle: Path) -> None:
    """SIGTERM lands while detect holds a whole batch it has read and not finished (large frames,
    every one searched whole: the batch takes a while): each frame of it is still processed."""
    cfg = base_config(model_bundle, [])
    cfg["detect"] = {"max_frame_age_s": 600, "read_count": 8}
    cfg["detector"] = {"motion": {"enabled": False}}
    r = redis_server.client()
    frames = render_frames(8, 1280, 960)
    r.sadd(KEYS.cameras, "cam")
    with pipeline(tmp_path, redis_server.url, cfg, services=("detect",)) as procs:
        wait_for(lambda: r.exists(KEYS.frames("cam")) and r.xinfo_groups(KEYS.frames("cam")), 60,
                 what="detect's group")
        proc = procs["detect"].proc
        proc.send_signal(signal.SIGSTOP)
        pipe = r.pipeline()  # all eight at once: detect reads them in one batch
        for seq, image in enumerate(frames):
            jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes()
            msg = FrameMsg(camera="cam", seq=seq, capture_ts=time.time(), width=image.shape[1],
                           height=image.shape[0], jpeg=jpeg)
            pipe.xadd(KEYS.frames("cam"), {FIELD: encode_frame(msg)})
        pipe.execute()
        proc.send_signal(signal.SIGCONT)
        # Freeze detect as soon as it holds the batch, ask it to stop, and let it go on.
        deadline = time.monotonic() + 30
        while True:
            proc.send_signal(signal.SIGSTOP)
            if consumer_pending(redis_server, KEYS.frames("cam"), "detect", "detect-test") == len(frames):
                break
            proc.send_signal(signal.SIGCONT)
            assert time.monotonic() < deadline, "detect never held the batch"
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(30) == 0, procs["detect"].log()[-2000:]
    info = r.xinfo_groups(KEYS.frames("cam"))[0]
    assert info["pending"] == 0, "every frame detect held was finished before it exited"
    faces = [decode_faces(e.payload or b"").seq for e in parse_read([(KEYS.faces, r.xrange(KEYS.faces))])]
    assert faces == list(range(len(frames))), f"faces written for frames {faces}"


def test_backpressure_drops_are_counted_when_detect_falls_behind(tmp_path: Path, redis_server: RedisServer,
                                                                 model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=20)
    cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 20, "loop": True}])
    cfg["ingest"] = {"stream_maxlen": 60, "backpressure_lag": 20}
    r = redis_server.client()
    r.xgroup_create(KEYS.frames("cam"), "detect", id="0", mkstream=True)
    # A detect worker that reads every frame and never acks (stuck, or dead before its lease
    # lapsed): no lag, only pending entries, and they are frames detect has not finished.
    stuck = threading.Event()

    def read_never_ack() -> None:
        reader = redis_server.client()
        while not stuck.is_set():
            reader.xreadgroup("detect", "stuck-worker", {KEYS.frames("cam"): ">"}, count=100, block=50)

    thread = threading.Thread(target=read_never_ack, daemon=True)
    thread.start()
    port = free_port()
    try:
        with pipeline(tmp_path, redis_server.url, cfg, services=("ingest",), ES_METRICS__PORT=str(port)):
            wait_for(lambda: metric_or(port, "es_frames_dropped_total", 0, reason="backpressure") >= 20, 60,
                     what="backpressure drops")
            published = metric(port, "es_frames_published_total", camera="cam")
            read = metric(port, "es_frames_read_total", camera="cam")
            dropped = metric(port, "es_frames_dropped_total", camera="cam")
            length = r.xlen(KEYS.frames("cam"))
            stats = r.xinfo_groups(KEYS.frames("cam"))[0]
    finally:
        stuck.set()
        thread.join(5)
    print(f"backpressure: read {read:.0f}, published {published:.0f}, dropped {dropped:.0f}, stream length {length}, "
          f"pending {stats['pending']}, lag {stats['lag']}")
    assert stats["pending"] >= 20 and stats["lag"] <= 10, "the frames must wait as pending, not as lag"
    assert length < 60, "ingest stopped before MAXLEN had to trim unread frames"
    # The lag is looked at twice a second: up to half a second of frames (10) may pass the limit.
    assert 20 <= published <= 20 + 10 + 1
    assert read - published - dropped <= 1  # one frame may be between the two counters


def test_redis_out_of_memory_keeps_the_camera_supervised_and_ingest_ends_at_end_of_file(
        tmp_path: Path, model_bundle: Path) -> None:
    server = RedisServer(["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]).start()
    try:
        video = write_video(tmp_path / "clip.mp4", render_frames(40), fps=20)
        cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 20}])
        cfg["ingest"] = {"stream_maxlen": 5000, "backpressure_lag": 4000, "jpeg_quality": 95, "grayscale": False}
        port = free_port()
        with pipeline(tmp_path, server.url, cfg, services=("ingest",), ES_METRICS__PORT=str(port)) as procs:
            wait_for(lambda: metric_or(port, "es_frames_dropped_total", 0, reason="redis_oom") >= 5, 60,
                     what="frames dropped as redis_oom")
            assert metric(port, "es_camera_up", camera="cam") == 1.0, "the camera is still read"
            assert endpoint_ok(port, "/healthz")
            oom = metric(port, "es_frames_dropped_total", camera="cam", reason="redis_oom")
            assert procs["ingest"].proc.wait(90) == 0, "ingest ends at the end of the file"
            log = procs["ingest"].log()
    finally:
        server.stop()
    print(f"out of memory: {oom:.0f} frames dropped as redis_oom while the camera stayed up")
    assert "Traceback" not in log, log[-3000:]


def test_dynamic_cameras_come_back_after_redis_lost_its_data(tmp_path: Path, redis_server: RedisServer,
                                                             model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=10)
    cfg = base_config(model_bundle, [{"id": "cam", "url": str(video), "fps": 10, "loop": True}])
    cfg["ingest"] = {"dynamic": True, "lease_s": 2.0, "refresh_s": 0.5}
    r = redis_server.client()
    with pipeline(tmp_path, redis_server.url, cfg) as procs:
        wait_for(lambda: len(all_events(redis_server)) >= 5, 90, what="events before the data loss")
        redis_server.stop()
        redis_server.start()  # empty: no persistence
        wait_for(lambda: r.exists(KEYS.events) and len(all_events(redis_server)) >= 5, 60,
                 what="events after Redis came back empty")
        assert r.hexists("es:camera-config", "cam"), "the registry was seeded again from the file"
        for svc in procs.values():
            assert svc.proc.poll() is None, f"{svc.name} exited:\n{svc.log()[-2000:]}"


def test_up_ends_at_the_end_of_input_when_redis_is_out_of_memory(tmp_path: Path, model_bundle: Path) -> None:
    server = RedisServer(["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]).start()
    try:
        video = write_video(tmp_path / "clip.mp4", render_frames(60), fps=10)
        env = outside_env()
        result = subprocess.run(
            [sys.executable, "-m", "shared.cli", "up", "--input", str(video), "--redis-url", server.url,
             "--model", str(model_bundle), "--fps", "10", "--no-web", "--logs", str(tmp_path / "logs")],
            cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
    finally:
        server.stop()
    ingest_log = (tmp_path / "logs" / "ingest.log").read_text()
    print(result.stderr[-600:])
    assert "redis_oom" in ingest_log, "frames refused by Redis are dropped and counted as redis_oom"
    assert "Traceback" not in ingest_log
    # Either everything still drained, or up gave up on the stalled pipeline with a reason.
    assert (result.returncode == 0 and "all inputs processed" in result.stderr) or (
        result.returncode == 1 and "made no progress" in result.stderr), result.stderr[-2000:]


def test_up_waits_out_an_external_redis_restart_and_ends_at_the_end_of_input(tmp_path: Path,
                                                                            model_bundle: Path) -> None:
    server = RedisServer().start()  # no persistence: it comes back empty, as after a crash
    out = tmp_path / "events.jsonl"
    try:
        video = write_video(tmp_path / "clip.mp4", render_frames(120), fps=10)
        env = outside_env()
        with out.open("w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "up", "--input", str(video), "--redis-url", server.url,
                 "--model", str(model_bundle), "--fps", "10", "--no-web", "--json"],
                cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=sink, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: len(out.read_text().splitlines()) >= 5, 120, what="events before the restart")
            server.stop()
            time.sleep(3.0)
            server.start()
            before = len(out.read_text().splitlines())
            _, err = proc.communicate(timeout=180)
    finally:
        server.stop()
    after = len(out.read_text().splitlines())
    print(f"up across a Redis restart: {before} events before it came back, {after} in all")
    assert proc.returncode == 0 and "all inputs processed" in err, err[-3000:]
    assert "Traceback" not in err
    assert after > before, "events flowed again after the restart"
