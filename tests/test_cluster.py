"""The pipeline on a real 3-master Redis Cluster: two cameras whose streams live on different shards."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import RedisServer, free_port, pipeline, wait_for
from test_detect_ownership import GROUP, Publisher, camera_jpegs, in_process_worker
from test_pipeline import collect_from, config

from shared.launcher import drained
from shared.sample import render_frames, write_video
from shared.schema import FIELD, EventMsg, decode_faces
from shared.streams import Keys, parse_read

pytestmark = [pytest.mark.integration]
KEYS = Keys()


class Cluster:
    """Three redis-servers joined by ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, masters: int = 3) -> None:
        # The bus port defaults to port + 10000, which may be taken or beyond 65535: pick one.
        self.nodes = [RedisServer(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                                   "--cluster-port", str(free_port())]) for _ in range(masters)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)

        def ok() -> bool:
            return all(n.client().cluster("info").get("cluster_state") == "ok" for n in self.nodes)

        wait_for(ok, 30, interval=0.2, what="cluster_state:ok on every node")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not installed")
    c = Cluster().start()
    try:
        yield c
    finally:
        c.stop()


def cameras_on_two_shards(rc: redis.RedisCluster) -> tuple[str, str]:
    """Two camera ids whose frame streams hash to different masters."""
    first = "door"
    home = rc.get_node_from_key(KEYS.frames(first)).port
    for i in range(100):
        other = f"hall-{i}"
        if rc.get_node_from_key(KEYS.frames(other)).port != home:
            return first, other
    raise AssertionError("no camera id on another shard in 100 tries")


def test_two_cameras_end_to_end_on_a_three_master_cluster(tmp_path: Path, cluster: Cluster,
                                                          model_bundle: Path) -> None:
    rc = cluster.client()
    cams = cameras_on_two_shards(rc)
    video = write_video(tmp_path / "astronaut.mp4", render_frames(8), fps=10)
    cfg = config(model_bundle, [{"id": cam, "url": str(video), "fps": 10} for cam in cams])
    cfg["detector"] = {"motion": {"enabled": False}}  # every frame searched whole: one face per frame
    with pipeline(tmp_path, cluster.url, cfg, ES_REDIS__CLUSTER="true") as procs:
        events = collect_from(rc, lambda evs: all(len({e.seq for e in evs if e.camera == c}) >= 8 for c in cams),
                              120, procs)
        assert procs["ingest"].proc.wait(30) == 0, "ingest should end at the end of the files"
        wait_for(lambda: drained(rc, KEYS, list(cams)), 30, interval=0.2, what="every frame acked")
    for cam in cams:
        mine = [e for e in events if e.camera == cam]
        # Every frame has the face (Haar adds a second, false one on a few): each frame once, in order.
        assert sorted({e.seq for e in mine}) == list(range(8)) and [e.seq for e in mine] == sorted(e.seq for e in mine)
        assert len({e.event_id for e in mine}) == len(mine)
    # Each camera's frames really lived on its own shard, not on one node that took every key.
    homes = {cam: rc.get_node_from_key(KEYS.frames(cam)).port for cam in cams}
    assert len(set(homes.values())) == 2
    for cam, port in homes.items():
        node = next(n for n in cluster.nodes if n.port == port)
        assert node.client().xlen(KEYS.frames(cam)) == 8, cam


def camera_off_the_faces_shard(rc: redis.RedisCluster) -> str:
    """A camera id whose frame stream (and lease) live on another master than the faces stream."""
    faces = rc.get_node_from_key(KEYS.faces).port
    return next(cam for cam in (f"cam-{i}" for i in range(100)) if rc.get_node_from_key(KEYS.frames(cam)).port != faces)


def node_of(cluster: Cluster, rc: redis.RedisCluster, key: str) -> redis.Redis:
    port = rc.get_node_from_key(key).port
    return next(n for n in cluster.nodes if n.port == port).client()


def faces_seqs(rc: redis.RedisCluster) -> list[int]:
    return [decode_faces(e.payload or b"").seq for e in parse_read([(KEYS.faces, rc.xrange(KEYS.faces))])]


def test_a_frame_is_never_acked_when_the_faces_shard_refuses_its_faces(cluster: Cluster) -> None:
    """The faces slot's master runs out of memory while the frames slot's accepts: detect writes
    the faces first and acks only after they were written, so the refused frames stay pending
    (counted), and once memory is back they are processed: none acked without its faces."""
    rc = cluster.client()
    cam = camera_off_the_faces_shard(rc)
    rc.sadd(KEYS.cameras, cam)
    Publisher(rc, {cam: camera_jpegs()["cam0"]}).publish(cam, 3)
    worker = in_process_worker(cluster.url, "detect-a", cluster=True)
    faces_node = node_of(cluster, rc, KEYS.faces)
    try:
        streams = worker.streams()
        entries = worker._read(streams)
        assert len(entries) == 3
        faces_node.config_set("maxmemory-policy", "noeviction")
        faces_node.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            worker.handle(entries)
        assert rc.xpending(KEYS.frames(cam), GROUP)["pending"] == 3, "a frame was acked without its faces"
        assert worker.metrics.refused_writes.labels(reason="redis_oom")._value.get() == 1
        faces_node.config_set("maxmemory", "0")
        assert rc.xlen(KEYS.faces) == 0
        worker._claim_stream(KEYS.frames(cam), idle_ms=0)  # the retry (the loop's reclaim)
        assert faces_seqs(rc) == [0, 1, 2]
        assert rc.xpending(KEYS.frames(cam), GROUP)["pending"] == 0
    finally:
        faces_node.config_set("maxmemory", "0")
        worker.keeper.stop()


def test_a_stale_owner_on_a_cluster_writes_and_acks_nothing(cluster: Cluster) -> None:
    """Cluster-mode fencing: the lease is checked in its own slot just before the faces are
    written and again, atomically, with the acks; a worker whose camera changed hands while its
    batch ran writes no faces, acks nothing, counts the refusal and stops reading the camera."""
    rc = cluster.client()
    cam = camera_off_the_faces_shard(rc)
    rc.sadd(KEYS.cameras, cam)
    Publisher(rc, {cam: camera_jpegs()["cam0"]}).publish(cam, 3)
    worker = in_process_worker(cluster.url, "detect-a", cluster=True)
    try:
        entries = worker._read(worker.streams())
        assert len(entries) == 3
        process = worker._process

        def taken_over_midway(pipe: object, entry: object) -> None:
            process(pipe, entry)
            if rc.get(worker.leases.lease_key(cam)) == b"detect-a":  # a stall past the lease: taken over
                rc.set(worker.leases.lease_key(cam), "detect-b", px=60_000)
                rc.incr(worker.leases.epoch_key(cam))

        worker._process = taken_over_midway
        worker.handle(entries)
        assert rc.xlen(KEYS.faces) == 0, "a stale owner wrote faces"
        assert rc.xpending(KEYS.frames(cam), GROUP)["pending"] == 3
        assert worker.metrics.refused_writes.labels(reason="lease_lost")._value.get() == 1
        assert worker.owned == set()
    finally:
        worker.keeper.stop()


def test_classify_acks_no_face_whose_event_the_events_shard_refused(cluster: Cluster, model_bundle: Path) -> None:
    """Classify on a cluster: the events slot's master is out of memory, the faces slot's is not;
    the faces stay pending (no event, no ack), and are published once memory is back."""
    from prometheus_client import CollectorRegistry
    from test_classify_faults import faces

    from services.classify.settings import ClassifySettings
    from services.classify.worker import ClassifyMetrics, ClassifyWorker
    from shared.classifier import load_classifier
    from shared.streams import connect

    rc = cluster.client()
    assert rc.get_node_from_key(KEYS.events).port != rc.get_node_from_key(KEYS.faces).port
    settings = ClassifySettings(redis={"url": cluster.url, "cluster": True}, metrics={"enabled": False},
                                classify={"model": model_bundle, "runtime": "litert", "eager": True})
    worker = ClassifyWorker(settings, connect(settings.redis), load_classifier(model_bundle, "litert"),
                            ClassifyMetrics(CollectorRegistry()))
    rc.xadd(KEYS.faces, {FIELD: faces(0)})
    worker.step()  # one face through while memory is there: the tracks' id block is taken
    for seq in range(1, 4):
        rc.xadd(KEYS.faces, {FIELD: faces(seq)})
    events_node = node_of(cluster, rc, KEYS.events)
    try:
        events_node.config_set("maxmemory-policy", "noeviction")
        events_node.config_set("maxmemory", "1")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            worker.step()
        assert rc.xpending(KEYS.faces, "classify")["pending"] == 3, "a face was acked without its event"
    finally:
        events_node.config_set("maxmemory", "0")
    worker._claim_stream(KEYS.faces, idle_ms=0)
    assert sorted(e.seq for e in collect_events(rc)) == [0, 1, 2, 3]
    assert rc.xpending(KEYS.faces, "classify")["pending"] == 0


def collect_events(rc: redis.RedisCluster) -> list[EventMsg]:
    from shared.events import EventReader

    return EventReader(rc, start="start", block_ms=10).poll()  # type: ignore[arg-type]
