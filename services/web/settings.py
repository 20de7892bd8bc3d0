"""Web view settings."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from shared.cameras import CameraSettings
from shared.settings import Section, ServiceSettings

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class MetricsEndpoint(Section):
    name: str = Field(min_length=1, max_length=64, description="service name shown on the page")
    url: str = Field(min_length=1, description="the service's /metrics URL (http://host:port/metrics)")

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class WebOptions(Section):
    host: str = Field("127.0.0.1", description="bind address of the page; other than loopback, set token or "
                      "basic_user/basic_password")
    port: int = Field(8080, ge=0, le=65535, description="port of the page; 0 picks a free one")
    token: str | None = Field(None, min_length=8, description="when set, requests need it (Authorization: Bearer, "
                              "or ?token= once, which sets a cookie)")
    basic_user: str | None = Field(None, min_length=1, description="HTTP basic auth user")
    basic_password: str | None = Field(None, min_length=1, description="HTTP basic auth password")
    frame_fps: float = Field(3.0, ge=0.2, le=15.0, description="camera tile refreshes per second (on-screen only)")
    window_s: float = Field(300.0, ge=60.0, le=3600.0, description="how much event and track history the page "
                            "keeps in memory (plots, mix, timelines)")
    max_feeds: int = Field(50, ge=1, le=1000, description="open live event feeds at most (each holds a Redis "
                           "connection and a thread)")
    feed_backfill: int = Field(30, ge=0, le=1000, description="events a new feed starts with")
    frame_scan: int = Field(15, ge=1, le=300, description="newest frames searched for the one the latest faces "
                            "were found in")
    services: list[MetricsEndpoint] = Field(default_factory=list,
                                            description="metrics endpoints whose heartbeat and drops are shown")
    grafana_url: str | None = Field(None, description="link to Grafana shown on the page")
    detect_group: str = Field("detect", min_length=1, description="the detect consumer group (for lag)")
    classify_group: str = Field("classify", min_length=1, description="the classify consumer group (for lag)")

    @model_validator(mode="after")
    def _basic_pair(self) -> WebOptions:
        if (self.basic_user is None) != (self.basic_password is None):
            raise ValueError("web.basic_user and web.basic_password must be set together")
        return self

    @property
    def auth_required(self) -> bool:
        return self.token is not None or self.basic_user is not None

    @property
    def exposed_without_auth(self) -> bool:
        return self.host not in LOOPBACK and not self.auth_required


class WebSettings(ServiceSettings):
    web: WebOptions = WebOptions()
    cameras: list[CameraSettings] = Field(default_factory=list, description="the pipeline's cameras (ingest's "
                                          "section), shown with masked URLs while ingest is not dynamic")
