"""Live camera management: two ingest replicas share cameras through leases in Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, RedisServer, Service, outside_env, service_env, wait_for

from shared.cameras import CameraRegistry
from shared.sample import render_frames, write_video
from shared.schema import decode_frame
from shared.streams import Keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = Keys()


def cameras_cli(url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = outside_env()
    return subprocess.run([sys.executable, "-m", "shared.cli", "cameras", "--redis-url", url, *args], cwd=REPO,
                          env={**env, "PYTHONPATH": str(REPO), **settings}, capture_output=True, text=True,
                          timeout=60)


def local_files_under(folder: Path) -> dict[str, str]:
    """The settings that let cameras added at run time be files in ``folder`` (network only by default)."""
    return {"ES_INGEST__ALLOW_LOCAL_SOURCES": "true", "ES_INGEST__MEDIA_ROOT": str(folder)}


def seq_blocks_in_order(server: RedisServer, camera: str) -> list[int]:
    """Seq blocks (one per reader instance) in stream order; a reader that overlapped another interleaves."""
    entries = server.client().xrange(KEYS.frames(camera))
    blocks = [decode_frame(fields[b"m"]).seq // 1000 for _, fields in entries]
    return [b for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1]]


def test_cameras_added_removed_and_taken_over(tmp_path: Path, redis_server: RedisServer) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(10), fps=10)
    config = {"cameras": [{"id": "alpha", "url": str(video), "fps": 5, "loop": True}],
              "ingest": {"dynamic": True, "lease_s": 2.0, "refresh_s": 0.5, "allow_local_sources": True,
                         "media_root": str(tmp_path)},
              "metrics": {"enabled": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    r = redis_server.client()
    registry = CameraRegistry(r)
    replicas = {name: Service("ingest", tmp_path / "config.yaml", service_env(redis_server.url, ES_CONSUMER=name),
                              tmp_path, tag=f"-{name}") for name in ("one", "two")}
    try:
        wait_for(lambda: r.xlen(KEYS.frames("alpha")) >= 5, 60, what="seeded camera read")
        added = cameras_cli(redis_server.url, "add", "beta", str(video), "--fps", "5", "--loop",
                            **local_files_under(tmp_path))
        assert added.returncode == 0, added.stderr
        wait_for(lambda: r.xlen(KEYS.frames("beta")) >= 5, 30, what="added camera read")
        owners = wait_for(lambda: (o := {c: registry.owner(c) for c in ("alpha", "beta")})
                          and None not in o.values() and len(set(o.values())) == 2 and o, 30,
                          what="one camera per replica")
        status = cameras_cli(redis_server.url, "status")
        assert status.returncode == 0 and "beta" in status.stdout and "up" in status.stdout, status.stdout
        assert "fps" in status.stdout.splitlines()[0]

        victim = owners["beta"]
        replicas[victim].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        survivor = "one" if victim == "two" else "two"
        wait_for(lambda: registry.owner("beta") == survivor, 30, interval=0.1, what="take-over")
        takeover = time.monotonic() - killed
        before = r.xlen(KEYS.frames("beta"))
        wait_for(lambda: r.xlen(KEYS.frames("beta")) >= before + 5, 30, what="frames after take-over")
        print(f"camera beta taken over {takeover:.2f}s after its replica was killed (lease 2 s)")
        assert takeover < 2.0 + 2 * 0.5 + 1.5

        removed = cameras_cli(redis_server.url, "remove", "alpha")
        assert removed.returncode == 0, removed.stderr
        time.sleep(2.0)
        frozen = r.xlen(KEYS.frames("alpha"))
        time.sleep(2.0)
        assert r.xlen(KEYS.frames("alpha")) == frozen, "a removed camera must stop being read"
        listed = cameras_cli(redis_server.url, "list")
        assert "beta" in listed.stdout and "alpha" not in listed.stdout
    finally:
        for svc in replicas.values():
            svc.stop()
    for camera in ("alpha", "beta"):
        blocks = seq_blocks_in_order(redis_server, camera)
        assert len(blocks) == len(set(blocks)), f"{camera} was read by two replicas at once: {blocks}"


def test_cameras_cli_rejects_bad_input(redis_server: RedisServer) -> None:
    bad = cameras_cli(redis_server.url, "add", "x", "gopher://nowhere")
    assert bad.returncode == 2 and "unsupported URL scheme" in bad.stderr
    assert cameras_cli(redis_server.url, "update", "ghost", "rtsp://10.0.0.7/a").returncode == 2
    assert cameras_cli(redis_server.url, "remove", "ghost").returncode == 2
    assert cameras_cli(redis_server.url, "add", "ok", "rtsp://10.0.0.7/a").returncode == 0
    dup = cameras_cli(redis_server.url, "add", "ok", "rtsp://10.0.0.7/b")
    assert dup.returncode == 2 and "already exists" in dup.stderr
