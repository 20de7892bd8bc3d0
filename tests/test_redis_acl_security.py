"""Least privilege on Redis: the whole pipeline runs with deploy/redis/users.acl's users against a real
redis-server that loads the file, and each user is refused outside its rights."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from support import REPO, RedisServer, Service, endpoint_ok, free_port, service_env, wait_for

from shared.cameras import CameraRegistry
from shared.redis_acl import REPO_TEMPLATE, USERS, render, write
from shared.sample import render_frames, write_video
from shared.schema import FIELD
from shared.streams import COUNT_TRIMMED, Keys

pytestmark = [pytest.mark.integration]
KEYS = Keys()
SERVICES = ("classify", "detect", "ingest", "web")


def credentials(folder: Path) -> dict[str, dict[str, str]]:
    out = {}
    for user in USERS:
        pairs = dict(line.split("=", 1) for line in (folder / f"{user}.env").read_text().splitlines())
        out[user] = pairs
    return out


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[tuple[RedisServer, dict[str, dict[str, str]]]]:
    secrets = tmp_path / "secrets"
    write(secrets, REPO_TEMPLATE, "es")
    server = RedisServer(["--aclfile", str(secrets / "users.acl")]).start()
    try:
        yield server, credentials(secrets)
    finally:
        server.stop()


def as_user(server: RedisServer, creds: dict[str, str]) -> redis.Redis:
    return redis.Redis(port=server.port, username=creds["ES_REDIS__USERNAME"], password=creds["ES_REDIS__PASSWORD"],
                       socket_timeout=5)


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_security_template_renders_every_user_without_comments() -> None:
    text = render(REPO_TEMPLATE.read_text(), {u: f"pw-{u}" for u in USERS}, "site2")
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == ["default", *USERS]
    assert all(line.startswith("user ") for line in lines) and "$" not in text
    assert "%RW~site2:frames:*" in text and "~es:" not in text
    with pytest.raises(ValueError, match="prefix"):
        render(REPO_TEMPLATE.read_text(), {}, "a b")


def test_security_pipeline_runs_with_one_redis_user_per_service_each_refused_outside_its_rights(
        tmp_path: Path, acl_server: tuple[RedisServer, dict[str, dict[str, str]]], model_bundle: Path) -> None:
    server, creds = acl_server
    admin = as_user(server, creds["admin"])
    video = write_video(tmp_path / "astronaut.mp4", render_frames(30), fps=5)
    web_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "cameras": [{"id": "cam0", "url": str(video), "fps": 5, "loop": True}],
        "ingest": {"dynamic": True, "lease_s": 2.0, "refresh_s": 0.5},
        "detect": {"max_frame_age_s": 60},
        "classify": {"model": str(model_bundle), "runtime": "litert", "max_wait_ms": 10},
        "streams": {"block_ms": 200, "claim_every_s": 0.5},
        "web": {"port": web_port},
    }))
    procs: dict[str, Service] = {}
    try:
        for name in SERVICES:
            env = service_env(server.url, ES_CONSUMER=f"{name}-test", ES_METRICS__PORT=str(free_port()),
                              **creds[name])
            procs[name] = Service(name, config, env, tmp_path)
        try:
            wait_for(lambda: _all_running(procs) and admin.xlen(KEYS.events) >= 5 and admin.xlen(KEYS.tracks) >= 1,
                     120, what="events and tracks through the ACL users")
        except AssertionError:
            logs = "\n".join(f"--- {n}\n{s.log()[-2000:]}" for n, s in procs.items())
            raise AssertionError(f"{logs}\nACL LOG: {admin.acl_log()}") from None
        wait_for(lambda: endpoint_ok(web_port, "/readyz"), 30, what="web ready")
        _use_the_web_view(web_port, admin)
        printed = subprocess.run([sys.executable, "-m", "shared.cli", "events", "--group", "audit", "--from", "start",
                                  "--count", "3", "--json"], cwd=REPO, capture_output=True, text=True, timeout=60,
                                 env=service_env(server.url, **creds["events"]))
        assert printed.returncode == 0, printed.stderr
        assert [json.loads(line)["camera"] for line in printed.stdout.splitlines()] == ["cam0"] * 3
        assert all(svc.proc.poll() is None for svc in procs.values()), {n: s.log()[-2000:] for n, s in procs.items()}
    finally:
        for svc in procs.values():
            svc.stop()
    denied = [e for e in admin.acl_log() if e.get("object") != "client|setinfo"]  # redis-py does without it
    assert denied == [], denied
    for name, svc in procs.items():
        assert "NOPERM" not in svc.log(), (name, svc.log()[-3000:])
    _each_user_refused_outside_its_rights(server, creds)


def _all_running(procs: dict[str, Service]) -> bool:
    exited = {name: svc.proc.poll() for name, svc in procs.items() if svc.proc.poll() is not None}
    if exited:
        raise AssertionError(f"exited: {exited}")
    return True


def _use_the_web_view(port: int, admin: redis.Redis) -> None:
    base = f"http://127.0.0.1:{port}"
    for path in ("/api/cameras", "/api/health", "/api/cameras/cam0/latest", "/api/cameras/cam0/summary"):
        with urllib.request.urlopen(base + path, timeout=10) as resp:
            assert resp.status == 200, path
    newest = admin.xrevrange(KEYS.frames("cam0"), count=1)[0][0].decode()
    with urllib.request.urlopen(f"{base}/api/cameras/cam0/frames/{newest}.jpg", timeout=10) as resp:
        assert resp.read(2) == b"\xff\xd8"
    add = urllib.request.Request(f"{base}/api/cameras", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"id": "door", "url": "rtsp://127.0.0.1:9/s"}).encode())
    with urllib.request.urlopen(add, timeout=10) as resp:
        assert resp.status == 201
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/cameras/door", method="DELETE"), timeout=10) as r:
        assert r.status == 200
    assert set(CameraRegistry(admin).cameras()[0]) == {"cam0"}


def _each_user_refused_outside_its_rights(server: RedisServer, creds: dict[str, dict[str, str]]) -> None:
    frames, faces, events, tracks = KEYS.frames("cam0"), KEYS.faces, KEYS.events, KEYS.tracks
    fake = {FIELD: b"forged"}
    ingest, detect, classify, web, consumer, keda = (as_user(server, creds[u]) for u in
                                                     ("ingest", "detect", "classify", "web", "events", "keda"))
    forbidden: dict[str, list[Callable[[], Any]]] = {
        "ingest": [lambda: ingest.xadd(events, fake), lambda: ingest.xadd(faces, fake),
                   lambda: ingest.xreadgroup("detect", "x", {frames: ">"}),
                   lambda: ingest.hdel("es:camera-config", "cam0"),
                   lambda: ingest.keys("*"), lambda: ingest.flushall(), lambda: ingest.config_get("*")],
        "detect": [lambda: detect.xadd(events, fake), lambda: detect.xadd(frames, fake),
                   lambda: detect.set(frames, "x"), lambda: detect.xadd(tracks, fake),
                   lambda: detect.hset("es:camera-config", "x", "{}"),
                   lambda: detect.xreadgroup("classify", "x", {faces: ">"}), lambda: detect.delete(frames)],
        "classify": [lambda: classify.xadd(frames, fake), lambda: classify.xadd(faces, fake),
                     lambda: classify.xreadgroup("detect", "x", {frames: ">"}),
                     lambda: classify.hgetall("es:camera-config"), lambda: classify.delete(events)],
        "web": [lambda: web.xadd(frames, fake), lambda: web.xadd(events, fake), lambda: web.delete(events),
                lambda: web.xgroup_create(events, "spy"), lambda: web.xack(faces, "classify", "0-1"),
                lambda: web.hset("es:camera-status", "cam0", "{}"), lambda: web.set("es:lease:{cam0}", "me"),
                lambda: web.flushall()],
        "events": [lambda: consumer.xadd(events, fake), lambda: consumer.xrange(frames, count=1),
                   lambda: consumer.hgetall("es:camera-config"), lambda: consumer.xgroup_destroy(events, "audit"),
                   lambda: consumer.xrange(faces, count=1), lambda: consumer.delete(tracks)],
        "keda": [lambda: keda.xadd(frames, fake), lambda: keda.xreadgroup("detect", "k", {frames: ">"}),
                 lambda: keda.xrange(frames, count=1), lambda: keda.hgetall("es:camera-config")],
        "default": [lambda: server.client().xlen(events), lambda: server.client().hgetall("es:camera-config")],
    }
    for user, calls in forbidden.items():
        for i, call in enumerate(calls):
            assert refused(call), f"{user} was allowed forbidden call #{i}"
    # and what each one needs still works, also on paths a short run may not take (dead letters, trim markers)
    count_trimmed = {user: user_r.register_script(COUNT_TRIMMED) for user, user_r in (("detect", detect),
                                                                                      ("classify", classify))}
    assert detect.xadd(KEYS.dead_letter(frames), fake) and classify.xadd(KEYS.dead_letter(faces), fake)
    assert count_trimmed["detect"](keys=[f"{frames}:trimmed:detect"], args=["0-1", 3]) == 3
    assert count_trimmed["classify"](keys=[f"{faces}:trimmed:classify"], args=["0-1", 2]) == 2
    assert consumer.xautoclaim(events, "audit", "other", 0, count=1) is not None
    assert server.client().ping()
    assert web.hgetall("es:camera-config") and keda.xinfo_groups(frames) and consumer.xlen(events) >= 5
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, username="web", password="wrong").ping()
