"""The pipeline on a real 3-master Redis Cluster: two cameras whose streams live on different shards."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import RedisServer, free_port, pipeline, wait_for
from test_pipeline import collect_from, config, happy_faces, pasted

from shared.launcher import drained
from shared.sample import write_video
from shared.streams import Keys

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
                                                          model_bundle: Path, fer_dir: Path) -> None:
    rc = cluster.client()
    cams = cameras_on_two_shards(rc)
    frames = happy_faces(model_bundle, 6)
    video = write_video(tmp_path / "happy.mp4", frames, fps=10)
    cfg = config(model_bundle, [{"id": cam, "url": str(video), "fps": 10} for cam in cams])
    cfg["detector"] = {"motion": {"enabled": False}}  # faces cut in one after another: see test_pipeline
    with pipeline(tmp_path, cluster.url, cfg, ES_REDIS__CLUSTER="true") as procs:
        events = collect_from(rc, lambda evs: all(sum(e.camera == c for e in pasted(evs)) >= 6 for c in cams),
                              120, procs)
        assert procs["ingest"].proc.wait(30) == 0, "ingest should end at the end of the files"
        wait_for(lambda: drained(rc, KEYS, list(cams)), 30, interval=0.2, what="every frame acked")
    for cam in cams:
        mine = [e for e in pasted(events) if e.camera == cam]
        assert [e.label for e in mine] == ["Happy"] * 6, cam
        assert len({e.event_id for e in mine}) == 6
    # Each camera's frames really lived on its own shard, not on one node that took every key.
    homes = {cam: rc.get_node_from_key(KEYS.frames(cam)).port for cam in cams}
    assert len(set(homes.values())) == 2
    for cam, port in homes.items():
        node = next(n for n in cluster.nodes if n.port == port)
        assert node.client().xlen(KEYS.frames(cam)) == 6, cam
