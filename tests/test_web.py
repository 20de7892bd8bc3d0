"""The web view's HTTP side on a real Redis: camera admin, credentials, auth, the event feed's resume, state."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient
from support import REPO, RedisServer, Service, endpoint_ok, free_port, isolate_env, outside_env, service_env, wait_for

from services.web.app import make_app
from services.web.context import WebContext
from services.web.metrics import WebMetrics
from services.web.settings import WebOptions, WebSettings
from services.web.state import LiveState
from shared.cameras import CameraRegistry, CameraSettings
from shared.sample import render_frames, write_video
from shared.schema import FIELD, Box, EventMsg, TrackEventMsg, encode_event
from shared.settings import ConfigError, RedisSettings, load
from shared.streams import Keys, connect

KEYS = Keys()
CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
SECRET_URL = "rtsp://admin:hunter2secret@10.0.0.7/stream1"


def event(camera: str, seq: int, label: str = "Happy", ts: float | None = None, track: int | None = 7) -> EventMsg:
    ts = time.time() if ts is None else ts
    probs = tuple(0.9 if c == label else 0.1 / 6 for c in CLASSES)
    return EventMsg(event_id=f"{camera}:{seq}:0", camera=camera, seq=seq, face=0, capture_ts=ts, publish_ts=ts + 0.05,
                    box=Box(10, 20, 60, 60), label=label, score=0.9, classes=CLASSES, probs=probs,
                    model_version="test", track_id=track)


def make_client(server: RedisServer, static: list[CameraSettings] | None = None, **opts: object) -> TestClient:
    r = connect(RedisSettings(url=server.url))
    ctx = WebContext(r=r, keys=KEYS, opts=WebOptions.model_validate(opts), state=LiveState(300.0),
                     registry=CameraRegistry(r), metrics=WebMetrics(CollectorRegistry()), static_cameras=static or [])
    return TestClient(make_app(ctx), base_url="http://localhost")  # a Host the page answers to by default


@pytest.fixture
def dynamic_registry(redis_server: RedisServer) -> CameraRegistry:
    """The registry, with an ingest replica in dynamic mode that looks alive (it beat just now)."""
    registry = CameraRegistry(redis_server.client())
    registry.beat("ingest-test", 60.0)
    return registry


# ----------------------------------------------------------------------------- settings


def test_settings_need_both_basic_auth_fields_and_accept_the_pipeline_file(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"web": {"basic_user": "ops"}, "cameras": [], "detect": {}}))
    with pytest.raises(ConfigError, match=r"basic_user and web\.basic_password must be set together"):
        load(WebSettings, path)
    path.write_text(yaml.safe_dump({"web": {"port": 9000, "token": "abcdefgh12"}, "cameras": [], "ingest": {}}))
    monkeypatch.setenv("ES_WEB__HOST", "0.0.0.0")
    settings = load(WebSettings, path)
    assert (settings.web.host, settings.web.port, settings.web.auth_required) == ("0.0.0.0", 9000, True)
    assert not settings.web.exposed_without_auth


def test_check_config_masks_the_token(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"web": {"token": "verysecrettoken"}}))
    out = subprocess.run([sys.executable, "-m", "services.web", "--config", str(path), "--check-config"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=service_env("redis://127.0.0.1:1/0"))
    assert out.returncode == 0, out.stderr
    assert "verysecrettoken" not in out.stdout and '"token": "***"' in out.stdout and "config ok" in out.stdout


# ----------------------------------------------------------------------------- camera admin


def test_camera_admin_validates_masks_credentials_and_keeps_them_on_update(
        redis_server: RedisServer, dynamic_registry: CameraRegistry) -> None:
    client = make_client(redis_server)
    bad = client.post("/api/cameras", json={"id": "door", "url": "gopher://x/y", "fps": 5})
    assert bad.status_code == 422
    assert any("url" in e and "unsupported URL scheme" in e for e in bad.json()["errors"]), bad.json()
    bad_fps = client.post("/api/cameras", json={"id": "door", "url": SECRET_URL, "fps": 500})
    assert bad_fps.status_code == 422 and any(e.startswith("fps = 500") for e in bad_fps.json()["errors"])

    assert client.post("/api/cameras", json={"id": "door", "url": SECRET_URL, "fps": 5}).status_code == 201
    again = client.post("/api/cameras", json={"id": "door", "url": SECRET_URL})
    assert again.status_code == 409 and "already exists" in again.json()["errors"][0]
    listing = client.get("/api/cameras")
    assert "hunter2secret" not in listing.text
    (cam,) = listing.json()["cameras"]
    assert cam["url"] == "rtsp://admin:***@10.0.0.7/stream1" and listing.json()["dynamic"] is True

    # the page sends back the masked URL it was shown: the stored password stays
    assert client.put("/api/cameras/door", json={"url": cam["url"], "fps": 12}).status_code == 200
    stored = dynamic_registry.cameras()[0]["door"]
    assert (stored.url, stored.fps) == (SECRET_URL, 12.0)
    assert client.put("/api/cameras/nope", json={"url": "x.mp4"}).status_code == 404

    assert client.delete("/api/cameras/door").status_code == 200
    assert dynamic_registry.cameras()[0] == {}
    assert client.delete("/api/cameras/door").status_code == 404


def test_static_cameras_come_from_the_settings_file_masked_and_the_registry_wins_when_dynamic(
        redis_server: RedisServer) -> None:
    static = [CameraSettings(id="gate", url=SECRET_URL, fps=4)]
    client = make_client(redis_server, static=static)
    redis_server.client().sadd(KEYS.cameras, "lobby")  # announced by a static ingest, not in this file
    listing = client.get("/api/cameras").json()
    assert [(c["id"], c["url"], c["fps"], c["state"]) for c in listing["cameras"]] == [
        ("gate", "rtsp://admin:***@10.0.0.7/stream1", 4.0, "no frames"), ("lobby", None, None, "no frames")]
    assert listing["dynamic"] is False
    CameraRegistry(redis_server.client()).put(CameraSettings(id="door", url="rtsp://10.0.0.9/door"))
    assert [c["id"] for c in client.get("/api/cameras").json()["cameras"]] == ["door"]


def test_camera_changes_are_refused_without_a_dynamic_ingest_or_from_another_origin(
        redis_server: RedisServer) -> None:
    client = make_client(redis_server)
    refused = client.post("/api/cameras", json={"id": "door", "url": "clip.mp4"})
    assert refused.status_code == 409 and "ingest.dynamic" in refused.json()["errors"][0]
    CameraRegistry(redis_server.client()).beat("ingest-test", 60.0)
    cross = client.post("/api/cameras", json={"id": "door", "url": "clip.mp4"},
                        headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    form = client.post("/api/cameras", content=b"id=door&url=clip.mp4",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert CameraRegistry(redis_server.client()).cameras()[0] == {}


def test_pages_and_assets_are_served_from_the_package_without_external_urls(redis_server: RedisServer) -> None:
    client = make_client(redis_server)
    for path in ("/", "/cameras/cam0", "/static/common.js", "/static/index.js", "/static/camera.js",
                 "/static/style.css"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert "http://" not in resp.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in resp.text


# ----------------------------------------------------------------------------- auth


def test_token_and_basic_auth_guard_everything_but_the_probes(redis_server: RedisServer) -> None:
    client = make_client(redis_server, token="s3cret-token", basic_user="ops", basic_password="pw")
    assert client.get("/api/cameras").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.get("/api/cameras", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/api/cameras", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    basic = base64.b64encode(b"ops:pw").decode()
    assert client.get("/api/cameras", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    denied = client.get("/", headers={"Authorization": "Basic " + base64.b64encode(b"ops:no").decode()})
    assert denied.status_code == 401 and "Basic" in denied.headers["www-authenticate"]
    # ?token= once: a cookie, and the token leaves the address
    first = client.get("/?token=s3cret-token", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"
    assert "HttpOnly" in first.headers["set-cookie"]
    assert client.get("/api/cameras").status_code == 200  # the client kept the cookie


# ----------------------------------------------------------------------------- live state


def test_live_state_keeps_the_newest_frame_faces_the_mix_and_track_timelines() -> None:
    now = 1_000_000.0
    state = LiveState(300.0, clock=lambda: now)
    state.add_events([event("a", 1, "Sad", now - 100), event("a", 2, "Happy", now - 10),
                      event("a", 2, "Happy", now - 10), event("a", 3, "Happy", now - 5), event("b", 9, "Fear", now)])
    state.add_tracks([TrackEventMsg("started", "a", 7, now - 30, "Sad", 0.8),
                      TrackEventMsg("changed", "a", 7, now - 12, "Happy", 0.9, previous="Sad",
                                    previous_duration_s=18.0)])
    assert [e.seq for e in state.latest_faces("a")] == [3]
    assert state.mix("a", 60.0) == {"Happy": 3}
    assert state.track_emotion("a", 7) == "Happy"
    (track,) = state.tracks("a")
    assert track["state"] == "active" and track["kinds"] == ["started", "changed"]
    assert [(s["emotion"], s["end"] - s["start"]) for s in track["segments"]] == [("Sad", 18.0), ("Happy", 12.0)]
    bins = state.history("a", 120.0, 5.0)
    assert len(bins) == 24 and sum(b["counts"].get("Happy", 0) for b in bins) == 3
    assert sum(b["counts"].get("Sad", 0) for b in bins) == 1
    assert state.history("a", 60.0, 5.0)[-1]["counts"] == {"Happy": 1}  # the newest bin holds the newest face
    state.add_tracks([TrackEventMsg("ended", "a", 7, now - 8, "Happy", 0.9),
                      TrackEventMsg("started", "a", 7, now - 2, "Neutral", 0.7)])  # back where they were
    (track,) = state.tracks("a")
    assert track["state"] == "active" and track["emotion"] == "Neutral", track


# ----------------------------------------------------------------------------- the event feed, as a process


@contextmanager
def run_web(tmp: Path, redis_url: str, **web: object) -> Iterator[int]:
    """The web service as a process; yields its port once ready."""
    port = free_port()
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"web": {"port": port, **web}}))
    svc = Service("web", config, service_env(redis_url, ES_METRICS__PORT=str(free_port())), tmp)
    try:
        wait_for(lambda: svc.proc.poll() is not None or endpoint_ok(port, "/readyz"), 30, what="web /readyz")
        assert svc.proc.poll() is None, svc.log()
        yield port
    finally:
        svc.stop()


@pytest.fixture
def web_process(tmp_path: Path, redis_server: RedisServer) -> Iterator[int]:
    with run_web(tmp_path, redis_server.url, feed_backfill=3) as port:
        yield port


def read_feed(port: int, query: str, count: int, last_id: str | None = None) -> list[tuple[str, dict[str, object]]]:
    """The first ``count`` events of the SSE feed, as (id, data)."""
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/events{query}", headers=headers)
    out: list[tuple[str, dict[str, object]]] = []
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        current_id = ""
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                current_id = line[4:]
            elif line.startswith("data: "):
                out.append((current_id, json.loads(line[6:])))
                if len(out) == count:
                    break
    return out


def test_feed_resumes_after_last_event_id_and_filters(web_process: int, redis_server: RedisServer) -> None:
    r = redis_server.client()
    ids = [r.xadd(KEYS.events, {FIELD: encode_event(event("a" if i % 2 else "b", i, "Happy" if i < 8 else "Sad"))})
           .decode() for i in range(12)]
    resumed = read_feed(web_process, "", 7, last_id=ids[4])
    assert [i for i, _ in resumed] == ids[5:12]
    assert [d["stream_id"] for _, d in resumed] == ids[5:12] and resumed[0][1]["seq"] == 5
    # without Last-Event-ID a feed starts a few events back (web.feed_backfill)
    assert [i for i, _ in read_feed(web_process, "", 3)] == ids[9:12]
    only = read_feed(web_process, "?camera=a&emotion=Happy&min_score=0.5", 3, last_id="0-0")
    assert [d["seq"] for _, d in only] == [1, 3, 5]
    with pytest.raises(urllib.error.HTTPError) as bad:
        read_feed(web_process, "?min_score=lots", 1)
    assert bad.value.code == 400 and b"min_score must be a number" in bad.value.read()


def test_open_feeds_are_bounded(tmp_path: Path, redis_server: RedisServer) -> None:
    with run_web(tmp_path, redis_server.url, max_feeds=2) as port:
        check_two_feeds_at_most(f"http://127.0.0.1:{port}/api/events")


def check_two_feeds_at_most(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10), urllib.request.urlopen(url, timeout=10):
        with pytest.raises(urllib.error.HTTPError) as third:
            urllib.request.urlopen(url, timeout=10)
        assert third.value.code == 503 and b"web.max_feeds" in third.value.read()
    # closed feeds free their places
    def opens() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return False

    wait_for(opens, 10, interval=0.2, what="a feed after closing two")


# ----------------------------------------------------------------------------- emotion-stream up


@pytest.mark.integration
def test_up_starts_the_web_view_prints_its_address_and_it_shows_the_face(tmp_path: Path, model_bundle: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=4)
    env = outside_env()
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--input", str(video), "--loop", "--fps", "4",
                             "--model", str(model_bundle), "--web-port", "0", "--json", "--logs", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("web view: ") or len(lines) > 50:
                break
        match = re.match(r"web view: http://127\.0\.0\.1:(\d+)/$", lines[-1].strip())
        assert match, "".join(lines)
        base = f"http://127.0.0.1:{match.group(1)}"

        def happy_face() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/api/cameras/cam0/latest", timeout=5) as resp:
                    latest = json.loads(resp.read())
            except OSError:
                return False
            return any(f["emotion"] == "Happy" for f in latest["faces"])

        wait_for(happy_face, 120, interval=0.5, what="the sample face on the web view")
        with urllib.request.urlopen(f"{base}/api/health", timeout=5) as resp:
            health = json.loads(resp.read())
        assert {s["name"] for s in health["services"]} == {"classify", "detect-0", "ingest"}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


# ----------------------------------------------------------------------------- deployment files


def test_compose_runs_the_web_view_on_loopback_with_the_pipeline_config(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["web"]
    assert svc["ports"] == ["127.0.0.1:8080:8080"]
    assert svc["build"]["dockerfile"] == "deploy/docker/web.Dockerfile"
    assert '"-m", "services.web"' in (REPO / svc["build"]["dockerfile"]).read_text()
    assert "9100/healthz" in " ".join(svc["healthcheck"]["test"])
    assert svc["environment"]["ES_WEB__TOKEN"].startswith("${ES_WEB_TOKEN:?")  # compose refuses to start without
    isolate_env(monkeypatch, {**svc["environment"], "ES_WEB__TOKEN": "operator-token"})
    settings = load(WebSettings, REPO / svc["volumes"][0].split(":")[0])
    assert (settings.web.host, settings.web.port, settings.metrics.port) == ("0.0.0.0", 8080, 9100)
    assert settings.web.auth_required
    assert [s.name for s in settings.web.services] == ["ingest", "detect", "classify"]


def test_k8s_web_deployment_has_probes_a_service_and_loads_its_settings(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    base = REPO / "deploy" / "k8s" / "base"
    assert "web.yaml" in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    docs = {(d["kind"], d["metadata"]["name"]): d for name in ("web.yaml", "config.yaml")
            for d in yaml.safe_load_all((base / name).read_text()) if d}
    (container,) = docs[("Deployment", "web")]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9100}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["port"] for p in docs[("Service", "web")]["spec"]["ports"]} == {8080, 9100}
    env = {**docs[("ConfigMap", "es-env")]["data"], **{e["name"]: e["value"] for e in container["env"]}}
    secrets = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
    assert {"name": "es-web"} in secrets  # required: the pod does not start without the page's credentials
    env["ES_WEB__TOKEN"] = "from-the-es-web-secret"
    isolate_env(monkeypatch, {k: v for k, v in env.items() if k.startswith("ES_")})
    config = tmp_path / "config.yaml"
    config.write_text(docs[("ConfigMap", "es-config")]["data"]["config.yaml"])
    settings = load(WebSettings, config)
    assert settings.web.port == 8080 and len(settings.web.services) == 3
