"""Metrics and health endpoints: ``/metrics``, ``/healthz`` (loop heartbeat) and ``/readyz``.

Every service declares its metrics once on its own registry (so tests can run several
services in one process) and serves them with :class:`HealthServer`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)

import shared
from shared.settings import MetricsSettings

log = logging.getLogger(__name__)

# The phases of a stage's loop (see :class:`shared.worker.PhaseClock`): a fixed label set.
PHASES = ("wait", "work", "write")
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class CommonMetrics:
    """Metrics every service has."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.info = Info("es_service", "Service build information", registry=registry)
        self.info.info({"service": service, "version": shared.__version__})
        self.dead_letters = Counter("es_dead_letters_total", "Entries moved to a dead-letter stream",
                                    ["stream", "reason"], registry=registry)
        self.redis_errors = Counter("es_redis_errors_total", "Redis connection errors (each is retried)",
                                    registry=registry)
        self.reclaimed = Counter("es_reclaimed_total", "Pending entries taken over from idle consumers",
                                 ["stream"], registry=registry)
        self.service = service
        self.dropped = Counter("es_frames_dropped_total", "Frames not passed on, by stage and reason",
                               ["camera", "stage", "reason"], registry=registry)
        self.heartbeat = Gauge("es_heartbeat_timestamp_seconds", "Last loop iteration (unix time)",
                               registry=registry)
        # Sampled by the stream readers every few seconds; replicas report the same values, so
        # dashboards take max by (stream, group).
        self.stream_length = Gauge("es_stream_length", "Entries in a stream (XLEN)", ["stream"], registry=registry)
        self.group_pending = Gauge("es_stream_pending", "Entries delivered to a consumer group and not acked yet",
                                   ["stream", "group"], registry=registry)
        self.group_lag = Gauge("es_stream_lag", "Entries not yet delivered to a consumer group",
                               ["stream", "group"], registry=registry)
        # Wall time of the stage's loop by phase; _sum over time is the share of time spent in
        # each. process_cpu_seconds_total (the process collector) says how many cores it uses.
        self.phase = Histogram("es_stage_phase_seconds", "Wall time of a stage's loop by phase (wait: blocked for "
                               "input; work: decode, detect, classify; write: Redis outputs and acks), per pass",
                               ["stage", "phase"], buckets=PHASE_BUCKETS, registry=registry)
        ProcessCollector(registry=registry)
        self.lost = Counter("es_stream_lost_total", "Stream entries lost before a group processed them "
                            "(trimmed_unread: MAXLEN trimmed them unread; trimmed_pending: trimmed while "
                            "pending; redis_oom: could be neither processed nor dead-lettered)",
                            ["stream", "group", "reason"], registry=registry)


    def drop(self, camera: str, reason: str, n: int = 1) -> None:
        self.dropped.labels(camera=camera, stage=self.service, reason=reason).inc(n)


class Heartbeat:
    def __init__(self, gauge: Gauge | None = None) -> None:
        self.last = time.monotonic()
        self._gauge = gauge

    def beat(self) -> None:
        self.last = time.monotonic()
        if self._gauge is not None:
            self._gauge.set(time.time())

    def age(self) -> float:
        return time.monotonic() - self.last


class HealthServer:
    """Serves metrics and health in a daemon thread."""

    def __init__(self, cfg: MetricsSettings, registry: CollectorRegistry, heartbeat: Heartbeat,
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.cfg = cfg
        handler = _make_handler(registry, heartbeat, cfg.heartbeat_stale_s, ready)
        self._server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self.cfg.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(registry: CollectorRegistry, heartbeat: Heartbeat, stale_s: float,
                  ready: Callable[[], tuple[bool, str]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                age = heartbeat.age()
                ok = age < stale_s
                self._send(200 if ok else 503, f"{'ok' if ok else 'stale'} heartbeat {age:.1f}s\n".encode())
            elif path == "/readyz":
                ok, why = _safe(ready)
                self._send(200 if ok else 503, f"{'ready' if ok else 'not ready'}: {why}\n".encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            return

    return Handler


def _safe(check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    try:
        return check()
    except Exception as exc:  # a readiness probe must answer, whatever broke
        return False, f"{type(exc).__name__}: {exc}"


class ServedWorker(Protocol):
    heartbeat: Heartbeat

    def ready(self) -> tuple[bool, str]: ...

    def run(self) -> object: ...


def run_served(cfg: MetricsSettings, registry: CollectorRegistry, worker: ServedWorker) -> int:
    """Run a service's worker with its metrics and health served beside it (when enabled)."""
    server = HealthServer(cfg, registry, worker.heartbeat, worker.ready).start() if cfg.enabled else None
    try:
        worker.run()
    finally:
        if server is not None:
            server.stop()
    return 0
