"""The web view's metrics (declared once, on its own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.health import CommonMetrics


class WebMetrics(CommonMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "web")
        self.sse_clients = Gauge("es_web_feed_clients", "Open live event feeds (SSE connections)",
                                 registry=registry)
        self.events_sent = Counter("es_web_events_sent_total", "Events sent to live feeds", registry=registry)
        self.frames_served = Counter("es_web_frames_served_total", "Camera frames sent to pages", registry=registry)
        self.camera_changes = Counter("es_web_camera_changes_total", "Camera changes made from the page",
                                      ["action", "result"], registry=registry)
