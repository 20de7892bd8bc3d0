"""Detect workers own cameras through leases: one worker per camera, frames in order, takeover on death.

Two real detect processes on a real Redis share three cameras whose frames are published
straight into their streams, every frame with a real face (the astronaut's head pasted into a
photograph), so every frame yields one faces message and the faces stream is the ledger of what
was processed, in which order.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
import yaml
from skimage import data
from support import RedisServer, Service, free_port, metric, metric_or, scrape, service_env, wait_for

from shared.detection import DetectorSettings, make_camera_detector
from shared.schema import FIELD, FrameMsg, decode_faces, encode_frame
from shared.streams import Keys, parse_read

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = Keys()
GROUP = "detect"
WORKERS = ("detect-a", "detect-b")
CAMERAS = ("cam0", "cam1", "cam2")
# Long enough that a batch on a loaded 2-core machine stays inside it (see the paused-worker
# test below for what happens when a worker does not renew in time).
LEASE_S = 3.0


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def camera_jpegs() -> dict[str, tuple[bytes, int, int]]:
    """One JPEG per camera: a different place each, the same face in it; (jpeg, width, height)."""
    coffee = grey(data.coffee())
    places = {"cam0": coffee, "cam1": np.ascontiguousarray(coffee[:, ::-1]),
              "cam2": np.ascontiguousarray(cv2.resize(grey(data.chelsea()), (coffee.shape[1], coffee.shape[0])))}
    head = grey(data.astronaut())[30:210, 140:310]
    out = {}
    for i, (camera, place) in enumerate(places.items()):
        frame = place.copy()
        x, y = 60 + 150 * i, 100 + 30 * i
        frame[y:y + head.shape[0], x:x + head.shape[1]] = head
        out[camera] = (cv2.imencode(".jpg", frame)[1].tobytes(), frame.shape[1], frame.shape[0])
    return out


def assert_every_frame_has_a_face(jpegs: dict[str, tuple[bytes, int, int]]) -> None:
    """The test's premise: detect, run the way the service runs it, finds the face in each camera's frames."""
    detector = make_camera_detector(DetectorSettings())
    for camera, (jpeg, _, _) in jpegs.items():
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        for i in range(4):
            assert len(detector.detect(image, camera, i * 0.1)) == 1, (camera, i)


class Publisher:
    """Frames onto each camera's stream, numbered 0, 1, 2, ... per camera, captured now."""

    def __init__(self, r: redis.Redis, jpegs: dict[str, tuple[bytes, int, int]]) -> None:
        self.r = r
        self.jpegs = jpegs
        self.sent = dict.fromkeys(jpegs, 0)

    def publish(self, camera: str, n: int) -> None:
        jpeg, width, height = self.jpegs[camera]
        pipe = self.r.pipeline(transaction=False)
        for seq in range(self.sent[camera], self.sent[camera] + n):
            msg = FrameMsg(camera=camera, seq=seq, capture_ts=time.time(), width=width, height=height, jpeg=jpeg)
            pipe.xadd(KEYS.frames(camera), {FIELD: encode_frame(msg)})
        pipe.execute()
        self.sent[camera] += n


def lease_owner(r: redis.Redis, camera: str) -> str | None:
    value = r.get(f"{KEYS.prefix}:detect-lease:{{{camera}}}")
    return value.decode() if value is not None else None


def owners(r: redis.Redis) -> dict[str, str | None]:
    return {camera: lease_owner(r, camera) for camera in CAMERAS}


def all_processed(r: redis.Redis, cameras: tuple[str, ...] = CAMERAS) -> bool:
    """Every camera's group read its stream to the end and acked everything."""
    for camera in cameras:
        stream = KEYS.frames(camera)
        groups = {g["name"].decode(): g for g in r.xinfo_groups(stream)} if r.exists(stream) else {}
        group = groups.get(GROUP)
        if group is None or group["pending"] or group["last-delivered-id"] != r.xinfo_stream(stream)[
                "last-generated-id"]:
            return False
    return True


def faces_by_camera(r: redis.Redis, cameras: tuple[str, ...] = CAMERAS) -> dict[str, list[int]]:
    """Each camera's frame numbers in the order their faces messages were written."""
    seqs: dict[str, list[int]] = {camera: [] for camera in cameras}
    for entry in parse_read([(KEYS.faces, r.xrange(KEYS.faces))]):
        msg = decode_faces(entry.payload or b"")
        assert len(msg.faces) == 1, (msg.camera, msg.seq, [f.box for f in msg.faces])
        seqs[msg.camera].append(msg.seq)
    return seqs


def per_camera(port: int, name: str) -> dict[str, float]:
    return {labels["camera"]: value for labels, value in scrape(port).get(name, [])}


def held(r: redis.Redis, camera: str, consumer: str) -> int:
    info = r.xpending(KEYS.frames(camera), GROUP)
    return next((int(c["pending"]) for c in info["consumers"] if c["name"].decode() == consumer), 0)


@contextmanager
def workers(tmp: Path, server: RedisServer, config: dict[str, Any]) -> Iterator[dict[str, tuple[Service, int]]]:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    procs: dict[str, tuple[Service, int]] = {}
    try:
        for name in WORKERS:
            port = free_port()
            env = service_env(server.url, ES_CONSUMER=name, ES_METRICS__PORT=str(port))
            procs[name] = (Service("detect", path, env, tmp, tag=f"-{name}"), port)
        yield procs
    finally:
        for svc, _ in procs.values():
            svc.stop()


def logs(procs: dict[str, tuple[Service, int]]) -> str:
    return "\n".join(f"--- {name}\n{svc.log()[-2500:]}" for name, (svc, _) in procs.items())


def freeze_while_holding_frames(r: redis.Redis, svc: Service, cameras: tuple[str, ...], consumer: str,
                                publisher: Publisher) -> int:
    """SIGSTOP ``svc`` at a moment it holds read, unacked frames; returns how many it holds.

    The process is frozen while its pending entries are counted, so it stays frozen holding
    work; when it has caught up, more frames are published for it.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        svc.proc.send_signal(signal.SIGSTOP)
        count = sum(held(r, camera, consumer) for camera in cameras)
        if count:
            return count
        svc.proc.send_signal(signal.SIGCONT)
        if all_processed(r, cameras):
            for camera in cameras:
                publisher.publish(camera, 4)
        time.sleep(0.005)
    raise AssertionError(f"{consumer} never held frames of {cameras}")


def test_each_camera_has_one_worker_in_order_and_a_killed_workers_cameras_are_taken_over(
        tmp_path: Path, redis_server: RedisServer) -> None:
    jpegs = camera_jpegs()
    assert_every_frame_has_a_face(jpegs)
    r = redis_server.client()
    r.sadd(KEYS.cameras, *CAMERAS)
    publisher = Publisher(r, jpegs)
    config = {
        # Nothing is stale on a busy machine; reclaiming of idle entries (120 s) stays out of
        # reach, so frames a dead worker held can only come back through the takeover claim.
        "detect": {"lease_s": LEASE_S, "max_frame_age_s": 3600, "read_count": 2, "cameras_refresh_s": 0.5},
        "streams": {"block_ms": 100, "claim_idle_ms": 120_000},
        "metrics": {"port": 0},
    }
    with workers(tmp_path, redis_server, config) as procs:
        ports = {name: port for name, (_, port) in procs.items()}

        def settled() -> bool:
            held_by = list(owners(r).values())
            counts = {name: held_by.count(name) for name in WORKERS}
            gauges = {name: metric_or(port, "es_detect_cameras_owned", -1) for name, port in ports.items()}
            return None not in held_by and sorted(counts.values()) == [1, 2] and gauges == counts

        try:
            wait_for(settled, 40, interval=0.1, what="the cameras shared out between both workers")
        except AssertionError:
            raise AssertionError(f"ownership: {owners(r)}\n{logs(procs)}") from None
        first_owners = owners(r)

        # One worker per camera, frames in capture order.
        for camera in CAMERAS:
            publisher.publish(camera, 12)
        wait_for(lambda: all_processed(r), 40, what="the first frames acked")
        assert faces_by_camera(r) == {camera: list(range(12)) for camera in CAMERAS}
        processed = {name: per_camera(port, "es_detect_frames_total") for name, port in ports.items()}
        full = {name: per_camera(port, "es_detect_full_searches_total") for name, port in ports.items()}
        for camera, owner in first_owners.items():
            assert owner is not None
            other = next(name for name in WORKERS if name != owner)
            assert processed[owner].get(camera) == 12 and camera not in processed[other], processed
            # Gated and stateful: one whole-frame search (the camera's first frame), the face
            # followed on the other eleven.
            assert full[owner].get(camera) == 1 and camera not in full[other], full
            assert metric(ports[owner], "es_detect_full_searches_total", camera=camera, reason="first") == 1

        # Kill the worker with two cameras while it holds frames; the other takes them over.
        victim = next(name for name in WORKERS if list(first_owners.values()).count(name) == 2)
        survivor = next(name for name in WORKERS if name != victim)
        victim_cameras = [c for c, o in first_owners.items() if o == victim]
        takeovers_before = metric(ports[survivor], "es_detect_camera_takeovers_total")
        for camera in CAMERAS:
            publisher.publish(camera, 30)
        frozen = freeze_while_holding_frames(r, procs[victim][0], tuple(victim_cameras), victim, publisher)
        procs[victim][0].proc.send_signal(signal.SIGKILL)
        procs[victim][0].proc.wait()
        for camera in CAMERAS:
            publisher.publish(camera, 10)
        try:
            wait_for(lambda: set(owners(r).values()) == {survivor} and all_processed(r), 40, interval=0.1,
                     what="the survivor handling every camera and every frame acked")
        except AssertionError:
            raise AssertionError(f"ownership: {owners(r)}, sent {publisher.sent}\n{logs(procs)}") from None
        survivor_port = ports[survivor]
        assert metric(survivor_port, "es_detect_cameras_owned") == 3
        assert metric(survivor_port, "es_detect_camera_takeovers_total") == takeovers_before + len(victim_cameras)
        reclaimed = sum(metric_or(survivor_port, "es_reclaimed_total", 0.0, stream=KEYS.frames(c))
                        for c in victim_cameras)
        assert reclaimed == frozen, f"the dead worker held {frozen} frames; {reclaimed} were claimed on takeover"
    for camera in CAMERAS:
        assert r.xpending(KEYS.frames(camera), GROUP)["pending"] == 0
    seqs = faces_by_camera(r)
    print(f"frames published {publisher.sent}; worker {victim} killed holding {frozen} frames of {victim_cameras}; "
          f"faces messages per camera {({c: len(s) for c, s in seqs.items()})}")
    # Every frame processed exactly once, each camera's in capture order, across the takeover.
    assert seqs == {camera: list(range(publisher.sent[camera])) for camera in CAMERAS}


def test_a_worker_paused_past_its_lease_writes_nothing_for_the_camera_taken_from_it(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """A worker stalled longer than its lease (CPU starvation, a VM pause; SIGSTOP here) while it
    holds a camera's frames. The other worker takes the camera over and processes those frames;
    when the stalled one resumes it must not write faces for frames of a camera it no longer
    owns: each frame once, in capture order, one worker at a time.
    """
    camera = "cam0"
    jpegs = {camera: camera_jpegs()[camera]}
    r = redis_server.client()
    r.sadd(KEYS.cameras, camera)
    publisher = Publisher(r, jpegs)
    config = {
        "detect": {"lease_s": 1.0, "max_frame_age_s": 3600, "read_count": 4, "cameras_refresh_s": 0.5},
        "streams": {"block_ms": 100, "claim_idle_ms": 120_000},
        "metrics": {"port": 0},
    }
    with workers(tmp_path, redis_server, config) as procs:
        ports = {name: port for name, (_, port) in procs.items()}

        def one_owner_and_both_up() -> bool:
            gauges = {name: metric_or(port, "es_detect_cameras_owned", -1) for name, port in ports.items()}
            return lease_owner(r, camera) in WORKERS and sorted(gauges.values()) == [0, 1]

        wait_for(one_owner_and_both_up, 40, interval=0.1, what="one worker owning the camera, the other idle")
        stalled = lease_owner(r, camera)
        assert stalled is not None
        other = next(name for name in WORKERS if name != stalled)
        publisher.publish(camera, 40)
        holding = freeze_while_holding_frames(r, procs[stalled][0], (camera,), stalled, publisher)
        try:
            wait_for(lambda: lease_owner(r, camera) == other and all_processed(r, (camera,)), 40, interval=0.1,
                     what="the other worker owning the camera and every frame acked")
        finally:
            procs[stalled][0].proc.send_signal(signal.SIGCONT)
        # The stalled worker finishes the batch it was in, then finds its lease gone.
        wait_for(lambda: metric_or(ports[stalled], "es_detect_cameras_owned", -1) == 0, 40, interval=0.1,
                 what=f"{stalled} noticing it lost the camera")
        publisher.publish(camera, 4)
        wait_for(lambda: all_processed(r, (camera,)), 40, what="the last frames acked")
        seqs = faces_by_camera(r, (camera,))[camera]
        # The stalled worker's writes were refused by the fence, and counted.
        assert metric(ports[stalled], "es_detect_lease_conflicts_total") >= 1
        assert metric(ports[stalled], "es_detect_refused_writes_total", reason="lease_lost") >= 1
        assert metric_or(ports[other], "es_detect_lease_conflicts_total", 0.0) == 0
    twice = sorted({s for s in seqs if seqs.count(s) > 1})
    assert seqs == list(range(publisher.sent[camera])), (
        f"{stalled} was paused holding {holding} frames; frames written twice: {twice}; "
        f"order: {seqs}")


@pytest.mark.parametrize("breaks", ["while the leases are read", "at the commit"])
def test_a_connection_lost_mid_batch_is_an_outage_not_a_lost_lease(redis_server: RedisServer, breaks: str) -> None:
    """redis-py reports a connection that broke while keys were watched as a WatchError: the worker
    must take it for what it is (an outage: retry with backoff, frames left pending), neither crash
    on it nor count a lease conflict."""
    from prometheus_client import CollectorRegistry

    from services.detect.settings import DetectSettings
    from services.detect.worker import DetectMetrics, DetectWorker
    from shared.streams import connect

    settings = DetectSettings.model_validate({"redis": {"url": redis_server.url}, "consumer": "detect-a"})
    r = connect(settings.redis)
    admin = redis_server.client()
    admin.sadd(KEYS.cameras, "cam0")
    Publisher(admin, {"cam0": camera_jpegs()["cam0"]}).publish("cam0", 2)
    metrics = DetectMetrics(CollectorRegistry())
    worker = DetectWorker(settings, r, make_camera_detector(settings.detector), metrics)
    streams = worker.streams()
    assert streams == [KEYS.frames("cam0")] and lease_owner(admin, "cam0") == "detect-a"
    entries = worker._read(streams)
    assert len(entries) == 2

    def kill_worker_connections() -> None:
        admin.client_kill_filter(_type="normal", skipme=True)

    if breaks == "at the commit":
        process = worker._process

        def process_then_break(pipe: Any, entry: Any) -> None:
            process(pipe, entry)
            kill_worker_connections()

        worker._process = process_then_break  # type: ignore[method-assign]
    else:
        make_pipe = worker.pipeline

        def pipe_breaking_after_watch() -> Any:
            pipe = make_pipe()
            watch = pipe.watch

            def watch_then_break(*keys: str) -> Any:
                result = watch(*keys)
                kill_worker_connections()
                return result

            pipe.watch = watch_then_break
            return pipe

        worker.pipeline = pipe_breaking_after_watch  # type: ignore[method-assign]
    try:
        with pytest.raises(redis.ConnectionError):
            worker.handle(entries)
    finally:
        worker.keeper.stop()
    assert metrics.lease_conflicts._value.get() == 0
    # Nothing was written or acked: the frames stay pending for a retry.
    assert admin.xlen(KEYS.faces) == 0
    assert admin.xpending(KEYS.frames("cam0"), GROUP)["pending"] == 2


def in_process_worker(url: str, consumer: str, lease_s: float = 0.5, read_count: int = 16, **redis: Any) -> Any:
    """A detect worker in this process (its hooks can be wrapped), with its metrics registry."""
    from prometheus_client import CollectorRegistry

    from services.detect.settings import DetectSettings
    from services.detect.worker import DetectMetrics, DetectWorker
    from shared.streams import connect

    settings = DetectSettings.model_validate({
        "redis": {"url": url, **redis}, "consumer": consumer,
        "detect": {"lease_s": lease_s, "max_frame_age_s": 3600, "read_count": read_count}})
    return DetectWorker(settings, connect(settings.redis), make_camera_detector(settings.detector),
                        DetectMetrics(CollectorRegistry()))


def test_a_batch_longer_than_the_lease_keeps_its_camera(redis_server: RedisServer) -> None:
    """Leases are renewed while a batch runs: a batch four times the lease (a loaded machine) is
    written, not aborted, and no other worker gets the camera meanwhile."""
    admin = redis_server.client()
    admin.sadd(KEYS.cameras, "cam0")
    Publisher(admin, {"cam0": camera_jpegs()["cam0"]}).publish("cam0", 4)
    worker = in_process_worker(redis_server.url, "detect-a", lease_s=0.5, read_count=4)
    rival = in_process_worker(redis_server.url, "detect-b", lease_s=0.5)
    rival_took: list[int] = []
    process = worker._process

    def slow_process(pipe: Any, entry: Any) -> None:
        time.sleep(0.5)  # the whole batch: 2 s, four leases
        rival_took.append(rival.leases.take("cam0", "detect-b", 0.5))
        process(pipe, entry)

    worker._process = slow_process
    try:
        streams = worker.streams()
        entries = worker._read(streams)
        assert len(entries) == 4
        worker.handle(entries)
    finally:
        worker.keeper.stop()
    assert rival_took == [0, 0, 0, 0], "another worker got the camera while its batch ran"
    assert worker.metrics.lease_conflicts._value.get() == 0
    assert [decode_faces(e.payload or b"").seq for e in parse_read([(KEYS.faces, admin.xrange(KEYS.faces))])] \
        == [0, 1, 2, 3]
    assert admin.xpending(KEYS.frames("cam0"), GROUP)["pending"] == 0


def test_a_lost_camera_is_dropped_at_once_and_its_read_frames_go_to_the_new_owner_now(
        redis_server: RedisServer) -> None:
    """A worker that read frames of a camera just taken from it (it stalled past its lease) writes
    nothing for them, stops reading the camera at once, and the new owner processes those frames
    on its next pass, long before ``claim_idle_ms`` (30 s by default)."""
    admin = redis_server.client()
    admin.sadd(KEYS.cameras, "cam0")
    Publisher(admin, {"cam0": camera_jpegs()["cam0"]}).publish("cam0", 3)
    old = in_process_worker(redis_server.url, "detect-a")
    new = in_process_worker(redis_server.url, "detect-b")
    try:
        assert old.streams() == [KEYS.frames("cam0")]
        # The lease lapses and detect-b takes it (what a stall past the lease lets happen).
        admin.set(old.leases.lease_key("cam0"), "detect-b", px=60_000)
        admin.incr(old.leases.epoch_key("cam0"))
        assert new.streams() == [KEYS.frames("cam0")]
        entries = old._read([KEYS.frames("cam0")])  # read after the new owner's takeover claim
        assert len(entries) == 3
        old.handle(entries)
        assert old.owned == set() and old.metrics.owned._value.get() == 0
        assert old.metrics.lease_conflicts._value.get() == 1
        assert admin.xlen(KEYS.faces) == 0 and held(admin, "cam0", "detect-a") == 3
        time.sleep(0.5 / 3)
        new.step()  # its next pass finds the frames pending on the former owner and takes them
        assert held(admin, "cam0", "detect-a") == 0
        assert admin.xpending(KEYS.frames("cam0"), GROUP)["pending"] == 0
        seqs = [decode_faces(e.payload or b"").seq for e in parse_read([(KEYS.faces, admin.xrange(KEYS.faces))])]
        assert seqs == [0, 1, 2]
        assert new.common.reclaimed.labels(stream=KEYS.frames("cam0"))._value.get() == 3
    finally:
        old.keeper.stop()
        new.keeper.stop()
