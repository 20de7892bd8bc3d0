"""The web view safe to expose, against the real server: no public page without auth, the Host and Origin
allow-list (DNS rebinding, also in headless Chromium), security headers, no open redirect, Secure cookie
under TLS, secrets masked in every answer, and the camera source policy on the admin API."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO, RedisServer, Service, free_port, make_certs, service_env, wait_for

from shared.cameras import CameraRegistry, CameraSettings

pytestmark = [pytest.mark.integration]
REBIND = "rebind.attacker.example"
SECRET_URL = "rtsp://admin:cam-pw-4711@10.0.0.7/stream1?user=admin&password=q-pw-4711&channel=2"


@dataclass
class Web:
    port: int
    svc: Service
    tls: ssl.SSLContext | None = None

    def request(self, method: str, path: str, host: str | None = None, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """One request with exactly the Host header given (default: 127.0.0.1:port)."""
        conn: http.client.HTTPConnection
        if self.tls is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.tls)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {"Host": host or f"127.0.0.1:{self.port}", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(errors="replace")
        finally:
            conn.close()


def start_web(tmp: Path, redis_url: str, web: dict[str, Any], ingest: dict[str, Any] | None = None,
              tls: ssl.SSLContext | None = None) -> Web:
    port = free_port()
    config = tmp / "web.yaml"
    config.write_text(yaml.safe_dump({"web": {"port": port, **web}, "ingest": ingest or {}}))
    svc = Service("web", config, service_env(redis_url), tmp)
    server = Web(port, svc, tls)

    def up() -> bool:
        if svc.proc.poll() is not None:
            raise AssertionError(f"web exited {svc.proc.returncode}:\n{svc.log()}")
        try:
            return server.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    wait_for(up, 30, interval=0.1, what="web view up")
    return server


@pytest.fixture
def web(tmp_path: Path, redis_server: RedisServer) -> Iterator[Web]:
    CameraRegistry(redis_server.client()).beat("ingest-test", 600.0)  # an ingest replica in dynamic mode
    server = start_web(tmp_path, redis_server.url, {})
    try:
        yield server
    finally:
        server.svc.stop()


def test_security_public_bind_without_auth_is_refused(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0", ES_WEB__HOST="0.0.0.0", ES_WEB__PORT="0", ES_METRICS__ENABLED="false")
    refused = subprocess.run([sys.executable, "-m", "services.web"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1, refused
    assert "web.host = '0.0.0.0' is not a loopback address" in refused.stderr
    assert "web.token" in refused.stderr and "web.basic_user" in refused.stderr
    env["ES_WEB__TOKEN"] = "a-long-enough-token"
    accepted = subprocess.run([sys.executable, "-m", "services.web", "--check-config"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0 and "a-long-enough-token" not in accepted.stdout, accepted


def test_security_foreign_host_is_refused_before_any_route(web: Web, redis_server: RedisServer) -> None:
    registry = CameraRegistry(redis_server.client())
    registry.put(CameraSettings(id="door", url="rtsp://10.0.0.7/s"))
    paths = ["/", "/cameras/door", "/api/cameras", "/api/config", "/api/health", "/api/cameras/door/latest",
             "/api/cameras/door/frames/1-0.jpg", "/api/events", "/static/index.js", "/nope"]
    for path in paths:
        status, _, body = web.request("GET", path, host=f"{REBIND}:{web.port}")
        assert status == 421 and "web.allowed_hosts" in body and "door" not in body, (path, status, body)
    for method, path in (("POST", "/api/cameras"), ("PUT", "/api/cameras/door"), ("DELETE", "/api/cameras/door")):
        status, _, _ = web.request(method, path, host=REBIND, body={"id": "x", "url": "rtsp://10.0.0.8/s"})
        assert status == 421, (method, path, status)
    assert set(registry.cameras()[0]) == {"door"}
    # the names a local browser uses are answered, with or without port
    for host in (f"127.0.0.1:{web.port}", f"localhost:{web.port}", "localhost", f"[::1]:{web.port}"):
        assert web.request("GET", "/api/cameras", host=host)[0] == 200, host
    assert web.request("GET", "/healthz", host=REBIND)[0] == 200  # probes come by pod IP


def test_security_origin_must_be_the_page_itself(web: Web, redis_server: RedisServer) -> None:
    own = f"http://127.0.0.1:{web.port}"
    cam = {"id": "door", "url": "rtsp://10.0.0.7/s"}
    for origin in (f"http://{REBIND}:{web.port}", "null", f"http://localhost:{web.port}", "http://127.0.0.1:1"):
        status, _, body = web.request("POST", "/api/cameras", body=cam, headers={"Origin": origin})
        assert status == 403 and "cross-origin" in body, (origin, status, body)
        assert web.request("GET", "/api/cameras", headers={"Origin": origin})[0] == 403, origin
    assert CameraRegistry(redis_server.client()).cameras()[0] == {}
    status, _, body = web.request("POST", "/api/cameras", body=cam, headers={"Origin": own})
    assert status == 201, body


def test_security_headers_on_pages_and_no_inline_script(web: Web) -> None:
    status, headers, page = web.request("GET", "/")
    assert status == 200
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split("; ")}
    assert csp["script-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["default-src"] == ["'self'"] and csp["object-src"] == ["'none'"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in page and " on" + "click=" not in page  # every script is a file of its own
    assert web.request("GET", "/api/cameras")[1]["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in web.request("GET", "/x", host=REBIND)[1]["content-security-policy"]


def test_security_token_redirect_stays_on_site_and_cookie_is_secure_under_tls(tmp_path: Path,
                                                                              redis_server: RedisServer) -> None:
    certs = make_certs(tmp_path)
    tls = ssl.create_default_context(cafile=str(certs["ca"]))
    server = start_web(tmp_path, redis_server.url, {"token": "tok-12345678", "tls_certfile": str(certs["cert"]),
                                                     "tls_keyfile": str(certs["key"])}, tls=tls)
    try:
        for path in ("//evil.example", "/\\evil.example", "///evil.example/x"):
            status, headers, _ = server.request("GET", f"{path}?token=tok-12345678")
            assert status == 303, path
            location = headers["location"]
            assert location.startswith("/") and not location.startswith(("//", "/\\")), location
            cookie = headers["set-cookie"]
            assert "es_token=tok-12345678" in cookie and "; Secure" in cookie and "HttpOnly" in cookie, cookie
        assert server.request("GET", "/api/cameras")[0] == 401
        cookie_hdr = {"Cookie": "es_token=tok-12345678"}
        assert server.request("GET", "/api/cameras", headers=cookie_hdr)[0] == 200
        assert server.request("GET", "/api/cameras", host=REBIND, headers=cookie_hdr)[0] == 421
    finally:
        server.svc.stop()
    plain = start_web(tmp_path, redis_server.url, {"token": "tok-12345678"})
    try:
        status, headers, _ = plain.request("GET", "/?token=tok-12345678")
        assert status == 303 and "Secure" not in headers["set-cookie"]  # a Secure cookie would never come back
    finally:
        plain.svc.stop()
    proxied = start_web(tmp_path, redis_server.url, {"token": "tok-12345678", "secure_cookie": True})
    try:  # behind a proxy that terminates HTTPS
        assert "; Secure" in proxied.request("GET", "/?token=tok-12345678")[1]["set-cookie"]
    finally:
        proxied.svc.stop()


def test_security_api_and_log_never_show_camera_secrets(web: Web, redis_server: RedisServer) -> None:
    own = {"Origin": f"http://127.0.0.1:{web.port}"}
    status, _, body = web.request("POST", "/api/cameras", body={"id": "door", "url": SECRET_URL}, headers=own)
    assert status == 201, body
    _, _, listing = web.request("GET", "/api/cameras")
    (cam,) = json.loads(listing)["cameras"]
    assert cam["url"] == "rtsp://admin:***@10.0.0.7/stream1?user=admin&password=***&channel=2"
    # the page sends the masked URL back with another channel: the stored secrets stay
    moved = cam["url"].replace("channel=2", "channel=3")
    assert web.request("PUT", "/api/cameras/door", body={"url": moved}, headers=own)[0] == 200
    stored = CameraRegistry(redis_server.client()).cameras()[0]["door"].url
    assert stored == SECRET_URL.replace("channel=2", "channel=3")
    web.svc.stop()
    for secret in ("cam-pw-4711", "q-pw-4711"):
        assert secret not in listing and secret not in web.svc.log()
    assert "camera door added from the web view (rtsp://admin:***@10.0.0.7" in web.svc.log()


def test_security_rebinding_page_in_chromium_cannot_read_or_change_anything(web: Web,
                                                                            redis_server: RedisServer) -> None:
    """Chromium resolves rebind.attacker.example to 127.0.0.1, as a rebinding attack makes it do."""
    registry = CameraRegistry(redis_server.client())
    registry.put(CameraSettings(id="door", url="rtsp://10.0.0.7/s"))
    driver = chromium([f"--host-resolver-rules=MAP {REBIND} 127.0.0.1"])
    probe = """
        const done = arguments[arguments.length - 1];
        const out = {};
        const tryFetch = async (name, url, opts) => {
          try { const r = await fetch(url, opts); out[name] = [r.status, await r.text()]; }
          catch (e) { out[name] = ["blocked", String(e)]; }
        };
        const post = {method: "POST", headers: {"Content-Type": "application/json"},
                      body: JSON.stringify({id: "evil", url: "/etc/passwd"})};
        (async () => {
          await tryFetch("read", "/api/cameras");
          await tryFetch("add", "/api/cameras", post);
          await tryFetch("remove", "/api/cameras/door", {method: "DELETE"});
          await tryFetch("direct_read", "PAGE/api/cameras");
          await tryFetch("direct_add", "PAGE/api/cameras", post);
          done(out);
        })();
    """.replace("PAGE", f"http://127.0.0.1:{web.port}")
    try:
        driver.set_script_timeout(30)
        driver.get(f"http://{REBIND}:{web.port}/")
        assert "web.allowed_hosts" in driver.page_source
        attack = driver.execute_async_script(probe)
        driver.get(f"http://127.0.0.1:{web.port}/")  # the operator's own page, for contrast
        own = driver.execute_async_script("const d = arguments[0]; fetch('/api/cameras').then(r => r.json())"
                                          ".then(j => d(j.cameras.map(c => c.id)))")
    finally:
        driver.quit()
    assert own == ["door"]
    for name in ("read", "add", "remove"):
        assert attack[name][0] == 421 and "door" not in attack[name][1], (name, attack[name])
    assert attack["direct_read"][0] in ("blocked", 403), attack["direct_read"]
    assert "door" not in str(attack["direct_read"]) and attack["direct_add"][0] in ("blocked", 403), attack
    assert set(registry.cameras()[0]) == {"door"}


def chromium(extra: list[str]) -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (bash deploy/run.sh test installs them)")
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
                *extra):
        opts.add_argument(arg)
    return webdriver.Chrome(service=DriverService(driver), options=opts)


# ----------------------------------------------------------------------------- camera source policy


def test_security_local_sources_refused_by_the_web_admin_unless_allowed_under_media_root(
        tmp_path: Path, redis_server: RedisServer) -> None:
    registry = CameraRegistry(redis_server.client())
    registry.beat("ingest-test", 600.0)
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"not decoded here")
    (media / "escape.mp4").symlink_to("/etc/passwd")
    strict = start_web(tmp_path, redis_server.url, {})
    try:
        for url in ("/etc/passwd", "file:///etc/passwd", str(media / "clip.mp4"), "0"):
            status, _, body = strict.request("POST", "/api/cameras", body={"id": "x", "url": url})
            assert status == 422 and "ingest.allow_local_sources" in body, (url, status, body)
        assert strict.request("POST", "/api/cameras", body={"id": "x", "url": "rtsp://10.0.0.7/s"})[0] == 201
    finally:
        strict.svc.stop()
    policy = {"allow_local_sources": True, "media_root": str(media), "allowed_source_hosts": ["cam.example"]}
    allowing = start_web(tmp_path, redis_server.url, {}, ingest=policy)
    try:
        refused = {"/etc/passwd": "not under ingest.media_root", str(media / "escape.mp4"): "not under",
                   f"{media}/../config.yaml": "not under", "clip.mp4": "absolute path",
                   "rtsp://10.0.0.7/s": "not in ingest.allowed_source_hosts"}
        for url, rule in refused.items():
            status, _, body = allowing.request("POST", "/api/cameras", body={"id": "y", "url": url})
            assert status == 422 and rule in body, (url, status, body)
        for cid, url in (("y", str(media / "clip.mp4")), ("z", "rtsp://cam.example/s"), ("usb", "0")):
            status, _, body = allowing.request("POST", "/api/cameras", body={"id": cid, "url": url})
            assert status == 201, (url, body)
    finally:
        allowing.svc.stop()
    assert sorted(registry.cameras()[0]) == ["usb", "x", "y", "z"]


def test_security_local_sources_refused_by_the_cameras_command_unless_allowed(tmp_path: Path,
                                                                              redis_server: RedisServer) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")

    def cameras(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.cli", "cameras", "--redis-url", redis_server.url, *args],
                              cwd=REPO, env={**service_env(redis_server.url), **env}, capture_output=True, text=True,
                              timeout=60)

    refused = cameras("add", "door", str(clip))
    assert refused.returncode == 2 and "ingest.allow_local_sources" in refused.stderr, refused
    assert cameras("add", "door", "rtsp://u:pw-77@10.0.0.7/s?token=tk-77").returncode == 0
    moved = cameras("update", "door", "/etc/passwd")
    assert moved.returncode == 2 and "refused" in moved.stderr
    allow = {"ES_INGEST__ALLOW_LOCAL_SOURCES": "true", "ES_INGEST__MEDIA_ROOT": str(tmp_path)}
    assert "not under ingest.media_root" in cameras("add", "etc", "/etc/passwd", **allow).stderr
    assert cameras("add", "clip", str(clip), **allow).returncode == 0
    listed = cameras("list").stdout
    assert "rtsp://u:***@10.0.0.7/s?token=***" in listed and "pw-77" not in listed and "tk-77" not in listed
    # the masked URL sent back with a new query keeps the stored secrets
    assert cameras("update", "door", "rtsp://u:***@10.0.0.7/s?token=***&channel=2").returncode == 0
    stored = CameraRegistry(redis_server.client()).cameras()[0]
    assert stored["door"].url == "rtsp://u:pw-77@10.0.0.7/s?token=tk-77&channel=2"
    assert set(stored) == {"door", "clip"}


def test_security_dynamic_ingest_refuses_a_local_camera_written_to_redis_directly(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Whoever can write the registry in Redis, bypassing the admin, still cannot make ingest open a file."""
    from shared.sample import render_frames, write_video

    video = write_video(tmp_path / "own.mp4", render_frames(10), fps=10)
    planted = CameraSettings(id="planted", url=str(video), fps=5, loop=True)
    r = redis_server.client()
    config = tmp_path / "ingest.yaml"
    config.write_text(yaml.safe_dump({"cameras": [{"id": "own", "url": str(video), "fps": 5, "loop": True}],
                                      "ingest": {"dynamic": True, "lease_s": 2.0, "refresh_s": 0.5},
                                      "metrics": {"enabled": False}}))
    r.hset("es:camera-config", "planted", planted.model_dump_json())
    ingest = Service("ingest", config, service_env(redis_server.url, ES_CONSUMER="ingest-a"), tmp_path)
    try:
        wait_for(lambda: r.xlen("es:frames:{own}") >= 5, 60, what="the settings file's own camera read")
        wait_for(lambda: "camera planted: local files are refused" in ingest.log(), 30, what="planted camera refused")
        assert not r.exists("es:frames:{planted}") and not r.exists("es:lease:{planted}")
    finally:
        ingest.stop()
