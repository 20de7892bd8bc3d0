"""Redis AUTH, ACL users and TLS against real redis-servers; secrets never reach logs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import REPO, RedisServer, Service, endpoint_ok, free_port, make_certs, service_env, wait_for

from shared.settings import RedisSettings
from shared.streams import connect

pytestmark = [pytest.mark.integration]


@pytest.fixture
def auth_server() -> Iterator[RedisServer]:
    server = RedisServer(["--requirepass", "top-secret-pw", "--user", "camera-app", "on", ">app-secret-pw",
                          "~*", "&*", "+@all"]).start()
    try:
        yield server
    finally:
        server.stop()


def test_password_and_acl_user_authenticate(auth_server: RedisServer) -> None:
    url = f"redis://127.0.0.1:{auth_server.port}/0"
    assert connect(RedisSettings(url=url, password="top-secret-pw")).ping()
    assert connect(RedisSettings(url=url, username="camera-app", password="app-secret-pw")).ping()
    assert connect(RedisSettings(url=f"redis://camera-app:app-secret-pw@127.0.0.1:{auth_server.port}/0")).ping()
    with pytest.raises(redis.AuthenticationError):
        connect(RedisSettings(url=url, username="camera-app", password="wrong")).ping()
    with pytest.raises(redis.AuthenticationError):
        connect(RedisSettings(url=url)).ping()



def test_services_with_credentials_run_and_never_log_them(tmp_path: Path, auth_server: RedisServer) -> None:
    url = f"redis://camera-app:app-secret-pw@127.0.0.1:{auth_server.port}/0"
    (tmp_path / "config.yaml").write_text(
        "cameras:\n  - {id: door, url: 'rtsp://admin:cam-secret-pw@127.0.0.1:9/stream'}\n"
        "ingest: {reconnect_initial_s: 0.2, reconnect_max_s: 0.5, open_timeout_s: 1}\n")
    port = free_port()
    ingest = Service("ingest", tmp_path / "config.yaml", service_env(url, ES_METRICS__PORT=str(port)), tmp_path)
    try:
        wait_for(lambda: endpoint_ok(port, '/readyz'), 30, what="ingest ready with ACL credentials")
        wait_for(lambda: "reconnecting" in ingest.log(), 30, what="camera retry logged")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        ingest.stop()
    log = ingest.log()
    assert "rtsp://admin:***@127.0.0.1:9/stream" in log
    for secret in ("app-secret-pw", "cam-secret-pw"):
        assert secret not in log and secret not in metrics
    assert 'es_camera_reconnects_total{camera="door"}' in metrics


def test_tls_connection_with_ca(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    tls_port = free_port()
    binary = shutil.which("redis-server")
    assert binary
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(tls_port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
                             "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no", "--save", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.skip(f"this redis-server has no TLS support: {proc.stdout.read()[-300:]!r}")  # type: ignore[union-attr]
        url = f"rediss://127.0.0.1:{tls_port}/0"
        client = connect(RedisSettings(url=url, ssl_ca_certs=certs["ca"]))
        assert wait_for(lambda: _try_ping(client), 10, what="TLS ping")
        with pytest.raises(redis.ConnectionError):
            connect(RedisSettings(url=url, ssl_ca_certs=None)).ping()  # an unknown CA is refused
    finally:
        proc.kill()
        proc.wait()


def _try_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_security_secrets_in_camera_queries_masked_in_check_config_logs_metrics_and_errors(
        tmp_path: Path, auth_server: RedisServer) -> None:
    secrets = ("app-secret-pw", "cam-secret-pw", "q-secret-pw", "sig-secret", "key-secret")
    camera = "http://viewer:cam-secret-pw@127.0.0.1:9/video.mjpg?user=viewer&password=q-secret-pw&sig=sig-secret"
    (tmp_path / "config.yaml").write_text(
        f"cameras:\n  - {{id: door, url: '{camera}'}}\n  - {{id: yard, url: 'rtsp://127.0.0.1:9/s?apikey=key-secret'}}\n"
        "ingest: {reconnect_initial_s: 0.2, reconnect_max_s: 0.5, open_timeout_s: 1}\n")
    url = f"redis://camera-app:app-secret-pw@127.0.0.1:{auth_server.port}/0"
    checked = subprocess.run([sys.executable, "-m", "services.ingest", "--config", str(tmp_path / "config.yaml"),
                              "--check-config"], cwd=REPO, env=service_env(url), capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "password=***&sig=***" in checked.stdout and "apikey=***" in checked.stdout
    port = free_port()
    ingest = Service("ingest", tmp_path / "config.yaml", service_env(url, ES_METRICS__PORT=str(port)), tmp_path)
    try:
        wait_for(lambda: "reconnecting" in ingest.log() and "yard" in ingest.log(), 30, what="camera retries logged")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        ingest.stop()
    log = ingest.log()
    assert "http://viewer:***@127.0.0.1:9/video.mjpg?user=viewer&password=***&sig=***" in log
    refused = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--input",
                              "gopher://u:cam-secret-pw@127.0.0.1/x?token=q-secret-pw"], cwd=REPO,
                             env=service_env(url), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "gopher://u:***@127.0.0.1/x?token=***" in refused.stderr, refused.stderr
    for secret in secrets:
        for where, text in (("check-config", checked.stdout), ("log", log), ("metrics", metrics),
                            ("up", refused.stderr)):
            assert secret not in text, (secret, where)
