"""Web view settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from shared.cameras import CameraSettings, SourcePolicyView
from shared.settings import Section, ServiceSettings

# Names a browser on the same machine uses for a loopback-bound page; always allowed by default.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    allowed_hosts: list[str] = Field(default_factory=list, description="host names the page answers to (the Host "
                                     "header, and the Origin of scripted requests); empty: the bound address and "
                                     "localhost, 127.0.0.1, ::1. '*' turns the check off (DNS rebinding then works)")
    tls_certfile: Path | None = Field(None, description="serve the page over HTTPS with this certificate (PEM); the "
                                      "session cookie is then Secure")
    tls_keyfile: Path | None = Field(None, description="the certificate's private key (PEM)")
    secure_cookie: bool = Field(False, description="mark the session cookie Secure even over plain HTTP: behind a "
                                "proxy that terminates HTTPS (an Ingress); with web.tls_* it always is")
    detect_group: str = Field("detect", min_length=1, description="the detect consumer group (for lag)")
    classify_group: str = Field("classify", min_length=1, description="the classify consumer group (for lag)")

    @model_validator(mode="after")
    def _basic_pair(self) -> WebOptions:
        if (self.basic_user is None) != (self.basic_password is None):
            raise ValueError("web.basic_user and web.basic_password must be set together")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> WebOptions:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("web.tls_certfile and web.tls_keyfile must be set together")
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _plain_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or "/" in name or (":" in name and not _is_ipv6(name)):
                raise ValueError(f"{name!r} is not a host name (give names without scheme or port)")
        return [name.lower().rstrip(".").strip("[]") for name in v]

    def hosts_allowed(self) -> frozenset[str]:
        """The Host names accepted: the configured list, else the bound address and the localhost names."""
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        bound = () if self.host in ANY_ADDRESS else (self.host.lower().strip("[]"),)
        return frozenset((*LOCAL_NAMES, *bound))

    @property
    def auth_required(self) -> bool:
        return self.token is not None or self.basic_user is not None

    @property
    def exposed_without_auth(self) -> bool:
        return not is_loopback(self.host) and not self.auth_required


def _is_ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")).version == 6
    except ValueError:
        return False


class WebSettings(ServiceSettings):
    web: WebOptions = WebOptions()
    cameras: list[CameraSettings] = Field(default_factory=list, description="the pipeline's cameras (ingest's "
                                          "section), shown with masked URLs while ingest is not dynamic")
    ingest: SourcePolicyView = Field(SourcePolicyView(), description="the camera source policy (ingest's keys "
                                     "allow_local_sources, media_root, allowed_source_hosts) the admin applies")

    @model_validator(mode="after")
    def _no_public_page_without_auth(self) -> WebSettings:
        # Anyone who reaches the port could watch faces and open any source as a camera: refuse to start.
        if self.web.exposed_without_auth:
            raise ValueError(f"web.host = {self.web.host!r} is not a loopback address, and neither web.token nor "
                             "web.basic_user/web.basic_password is set: set one (ES_WEB__TOKEN=...) or bind "
                             "web.host to 127.0.0.1")
        return self
