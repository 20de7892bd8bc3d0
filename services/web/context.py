"""What the web view's routes share: the context (Redis, settings, state, metrics) and request errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from services.web.metrics import WebMetrics
from services.web.settings import WebOptions
from services.web.state import LiveState
from shared.cameras import CameraRegistry, CameraSettings
from shared.streams import Keys

CAMERA_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass
class WebContext:
    """What the routes share: Redis, settings, the in-memory state, metrics."""

    r: Any
    keys: Keys
    opts: WebOptions
    state: LiveState
    registry: CameraRegistry
    metrics: WebMetrics
    static_cameras: list[CameraSettings] = field(default_factory=list)
    stopping: bool = False
    feeds: int = 0
    scraped: tuple[float, list[dict[str, Any]]] = (0.0, [])
    _feed_threads: anyio.CapacityLimiter | None = None

    def feed_threads(self) -> anyio.CapacityLimiter:
        """Feeds block in threads of their own, so open feeds never starve the page's other requests."""
        if self._feed_threads is None:
            self._feed_threads = anyio.CapacityLimiter(self.opts.max_feeds)
        return self._feed_threads


class RequestError(Exception):
    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.status = status
        self.errors = errors


def context_of(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def camera_id(request: Request) -> str:
    cid = str(request.path_params["camera"])
    if not CAMERA_ID.match(cid):
        raise RequestError(400, [f"bad camera id {cid!r}"])
    return cid
