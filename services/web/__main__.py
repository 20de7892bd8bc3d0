"""python -m services.web: the live web view for operators (cameras, faces, events, tracks, health, admin)."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn
from prometheus_client import CollectorRegistry

from services.web.app import make_app
from services.web.context import WebContext
from services.web.metrics import WebMetrics
from services.web.settings import WebSettings
from services.web.state import LiveState, Tail
from shared.cameras import CameraRegistry
from shared.health import HealthServer, Heartbeat
from shared.service import service_main
from shared.streams import Keys, connect

log = logging.getLogger("services.web")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so the real port (for port 0) is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(settings: WebSettings) -> int:
    opts = settings.web
    try:
        sock = bind(opts.host, opts.port)
    except OSError as exc:
        print(f"error: cannot listen on {opts.host}:{opts.port}: {exc}", file=sys.stderr)
        return 1
    r = connect(settings.redis)
    keys = Keys(settings.redis.prefix)
    registry = CollectorRegistry()
    metrics = WebMetrics(registry)
    state = LiveState(opts.window_s)
    heartbeat = Heartbeat(metrics.heartbeat)
    tail = Tail(r, keys, state, heartbeat, metrics.redis_errors.inc)
    cameras = CameraRegistry(r, settings.redis.prefix, settings.ingest.policy())
    ctx = WebContext(r=r, keys=keys, opts=opts, state=state, registry=cameras,
                     metrics=metrics, static_cameras=list(settings.cameras))
    health = None
    if settings.metrics.enabled:
        health = HealthServer(settings.metrics, registry, heartbeat, lambda: (bool(r.ping()), "redis ok")).start()
    tail.start()
    port = sock.getsockname()[1]
    log.info("web view: %s://%s:%d/ (answers to Host %s)", "https" if opts.tls_certfile else "http", opts.host, port,
             ", ".join(sorted(opts.hosts_allowed())))
    server = uvicorn.Server(uvicorn.Config(make_app(ctx), log_level="warning", timeout_graceful_shutdown=2,
                                           access_log=False, ssl_certfile=opts.tls_certfile,
                                           ssl_keyfile=opts.tls_keyfile))
    try:
        server.run(sockets=[sock])
    finally:
        ctx.stopping = True
        tail.stop()
        if health is not None:
            health.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return service_main("python -m services.web", __doc__ or "", WebSettings, run, argv)


if __name__ == "__main__":
    sys.exit(main())
