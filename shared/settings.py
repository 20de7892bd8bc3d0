"""Settings shared by every service, and the one loader (YAML file + environment).

Precedence: environment (``ES_`` prefix, ``__`` between nested keys, e.g.
``ES_REDIS__URL``; plain ``REDIS_URL`` is honoured too) over the YAML file over defaults.
Unknown keys are errors. :func:`load_or_exit` prints each problem as
``config error: <key.path> = <value>: <reason>`` and exits 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.masking import mask_text
from shared.masking import mask_url as mask_url  # the one masking function, still importable from here

ENV_PREFIX = "ES_"
# One YAML file may configure the whole pipeline: each service validates its own sections and
# leaves these, owned by the other services, to them. Any other unknown key is an error.
PIPELINE_SECTIONS = frozenset({"cameras", "ingest", "detect", "detector", "classify", "tracking", "web", "mqtt"})
# Keys one service needs from another service's section (which it otherwise drops): the copy
# defaults to the owner's value, and a file setting both to different values is an error.
MIRRORED_KEYS: dict[tuple[str, str], tuple[str, str]] = {("ingest", "detect_group"): ("detect", "group")}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL (may carry user:password)")
    password: str | None = Field(None, description="password, when not in the URL")
    username: str | None = Field(None, description="ACL user, when not in the URL")
    ssl_ca_certs: Path | None = Field(None, description="CA bundle for rediss://")
    ssl_certfile: Path | None = Field(None, description="client certificate for rediss://")
    ssl_keyfile: Path | None = Field(None, description="client key for rediss://")
    cluster: bool = Field(False, description="the URL names a node of a Redis Cluster (keys spread over its "
                          "shards by their hash tags)")
    socket_timeout_s: float = Field(5.0, gt=0, le=120, description="socket timeout for commands")
    prefix: str = Field("es", min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$",
                        description="key prefix, so several pipelines can share one Redis")
    backoff_initial_s: float = Field(0.2, gt=0, le=60, description="first reconnect delay")
    backoff_max_s: float = Field(5.0, gt=0, le=300, description="cap of the reconnect delay")

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"unsupported scheme {scheme!r}; use redis://, rediss:// or unix://")
        return v


class MetricsSettings(Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz and /readyz")
    host: str = Field("127.0.0.1", description="bind address of the metrics endpoint")
    port: int = Field(0, ge=0, le=65535, description="port of the metrics endpoint; 0 picks a free one")
    heartbeat_stale_s: float = Field(30.0, gt=0, description="/healthz fails when the loop is quiet this long")


class StreamSettings(Section):
    block_ms: int = Field(500, ge=10, le=10_000, description="XREADGROUP block time")
    claim_idle_ms: int = Field(30_000, ge=100, description="reclaim entries pending this long on dead consumers")
    claim_every_s: float = Field(5.0, gt=0, description="how often to look for entries to reclaim")
    max_deliveries: int = Field(5, ge=1, le=100, description="deliveries before an entry is dead-lettered")
    dead_letter_maxlen: int = Field(1_000, ge=100, description="approximate cap of each dead-letter stream")
    dead_letter_payload_max_bytes: int = Field(16_384, ge=0, description="dead letters keep payloads up to this "
                                               "size (face crops); larger ones (JPEG frames) keep only their size")
    claim_count: int = Field(8, ge=1, le=1000, description="entries taken over per XAUTOCLAIM and handled together "
                             "(small, so a poison entry that crashes its worker takes few innocent ones with it)")
    drain_timeout_s: float = Field(10.0, gt=0, le=300, description="first SIGTERM: finish in-flight work this long")


class ServiceSettings(BaseSettings):
    """Base of every service's settings: Redis, metrics, stream behaviour, logging."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      frozen=True)

    redis: RedisSettings = RedisSettings()
    metrics: MetricsSettings = MetricsSettings()
    streams: StreamSettings = StreamSettings()
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="logging level")
    consumer: str = Field("", description="consumer name in the group; default host-pid")

    @model_validator(mode="after")
    def _block_below_socket_timeout(self) -> ServiceSettings:
        if self.streams.block_ms / 1000 + 0.5 > self.redis.socket_timeout_s:
            raise ValueError(f"streams.block_ms ({self.streams.block_ms}) must stay at least 0.5 s below "
                             f"redis.socket_timeout_s ({self.redis.socket_timeout_s}): a blocking read would "
                             "time out on the client and count as a Redis outage")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs): 12-factor overrides.
        return env_settings, init_settings


S = TypeVar("S", bound=ServiceSettings)


class ConfigError(Exception):
    """Settings could not be loaded; ``lines`` name each key, value and reason."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def read_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError([f"config error: {path}: file not found"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"config error: {path}: invalid YAML: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config error: {path}: top level must be a mapping, got {type(data).__name__}"])
    return data


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        if not path:  # a check across keys: its message names each key and value
            lines.append(f"config error: {err['msg'].removeprefix('Value error, ')}")
            continue
        value = err.get("input")
        shown = mask_secret(path, value)
        lines.append(f"config error: {path} = {shown!r}: {err['msg']}")
    return lines


SECRET_WORDS = ("password", "secret", "token")


def mask_secret(path: str, value: Any) -> Any:
    if value is not None and any(w in path.lower() for w in SECRET_WORDS):
        return "***"
    if isinstance(value, str):
        return mask_text(value)
    return value


def load(cls: type[S], path: Path | None, overrides: dict[str, Any] | None = None) -> S:
    """YAML file + environment -> validated settings; raises :class:`ConfigError`."""
    data = _mirror(read_yaml(path), cls)
    foreign = PIPELINE_SECTIONS - set(cls.model_fields)
    data = {k: v for k, v in data.items() if k not in foreign}
    if overrides:
        data = _merge(data, overrides)
    redis_url = os.environ.get("REDIS_URL")
    if redis_url and f"{ENV_PREFIX}REDIS__URL" not in os.environ:
        data = _merge(data, {"redis": {"url": redis_url}})
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from exc


def _mirror(data: dict[str, Any], cls: type[BaseModel]) -> dict[str, Any]:
    """Fill or check the keys of :data:`MIRRORED_KEYS` before the other services' sections go."""
    out = dict(data)
    for (section, key), (owner, owner_key) in MIRRORED_KEYS.items():
        source = data.get(owner)
        if section not in cls.model_fields or not isinstance(source, dict) or owner_key not in source:
            continue
        found = out.get(section)
        mine: dict[str, Any] = found if isinstance(found, dict) else {}
        value = source[owner_key]
        if key in mine and mine[key] != value:
            raise ConfigError([f"config error: {section}.{key} = {mine[key]!r}: must equal {owner}.{owner_key} "
                               f"({value!r}), the same consumer group"])
        out[section] = {**mine, key: value}
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_or_exit(cls: type[S], path: Path | None, overrides: dict[str, Any] | None = None) -> S:
    try:
        return load(cls, path, overrides)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise SystemExit(1) from None


def dump_masked(settings: BaseModel) -> dict[str, Any]:
    """Settings as a dict with secrets and URL passwords masked (for ``--check-config``)."""
    return _mask_tree(settings.model_dump(mode="json"), "")


def _mask_tree(node: Any, path: str) -> Any:
    if isinstance(node, dict):
        return {k: _mask_tree(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_mask_tree(v, path) for v in node]
    return mask_secret(path, node)
