"""Redis Streams plumbing shared by the services: key names, connection, backoff, consumer groups.

Key names carry a ``{hash tag}`` so a camera's keys land on one Redis Cluster slot.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
from redis.crc import key_slot

from shared.schema import FIELD
from shared.settings import RedisSettings, StreamSettings, mask_url

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


@dataclass(frozen=True)
class Keys:
    """Every Redis key the pipeline uses, derived from one prefix."""

    prefix: str = "es"

    def frames(self, camera: str) -> str:
        return f"{self.prefix}:frames:{{{camera}}}"

    @property
    def cameras(self) -> str:
        return f"{self.prefix}:cameras"

    @property
    def faces(self) -> str:
        return f"{self.prefix}:{{faces}}"

    @property
    def events(self) -> str:
        return f"{self.prefix}:{{events}}"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events:live"

    @property
    def tracks(self) -> str:
        return f"{self.prefix}:{{tracks}}"

    @property
    def tracks_channel(self) -> str:
        return f"{self.prefix}:tracks:live"

    def dead_letter(self, stream: str) -> str:
        return f"{stream}:dead"

    def camera_from_frames(self, key: str) -> str:
        start, end = key.find("{"), key.rfind("}")
        return key[start + 1:end] if 0 <= start < end else key


def connect(cfg: RedisSettings) -> redis.Redis:
    """A client from settings; it does not touch the network until first used.

    With ``cluster`` set the client is a ``RedisCluster``: it offers the same commands the
    services use and routes each key to the shard owning its slot.
    """
    kwargs: dict[str, Any] = {"socket_timeout": cfg.socket_timeout_s, "socket_connect_timeout": cfg.socket_timeout_s,
                              "health_check_interval": 15}
    if cfg.password is not None:
        kwargs["password"] = cfg.password
    if cfg.username is not None:
        kwargs["username"] = cfg.username
    if cfg.url.startswith("rediss://"):
        kwargs.update(ssl_ca_certs=_opt(cfg.ssl_ca_certs), ssl_certfile=_opt(cfg.ssl_certfile),
                      ssl_keyfile=_opt(cfg.ssl_keyfile))
    if cfg.cluster:
        return cast(redis.Redis, redis.RedisCluster.from_url(cfg.url, **kwargs))
    return redis.Redis.from_url(cfg.url, **kwargs)


def is_cluster(r: Any) -> bool:
    return isinstance(r, redis.RedisCluster)


class LivePublisher:
    """PUBLISH for live subscribers, sent with the caller's pipeline.

    A cluster pipeline refuses PUBLISH; there the messages go in one pipeline to a single node,
    whose cluster bus forwards them to subscribers on every node.
    """

    def __init__(self, r: Any) -> None:
        self.r = r
        self.cluster = is_cluster(r)
        self.pending: list[tuple[str, bytes]] = []

    def queue(self, pipe: Any, channel: str, payload: bytes) -> None:
        if self.cluster:
            self.pending.append((channel, payload))
        else:
            pipe.publish(channel, payload)

    def flush(self) -> None:
        """Send what :meth:`queue` held back; call after the caller's pipeline executed."""
        if not self.pending:
            return
        node = self.r.get_redis_connection(self.r.get_default_node())
        pipe = node.pipeline(transaction=False)
        for channel, payload in self.pending:
            pipe.publish(channel, payload)
        self.pending.clear()
        pipe.execute()


def by_slot(streams: list[str]) -> list[list[str]]:
    """Streams grouped by cluster slot: one XREADGROUP may only name keys of one slot."""
    groups: dict[int, list[str]] = {}
    for stream in streams:
        groups.setdefault(key_slot(stream.encode()), []).append(stream)
    return list(groups.values())


def _opt(path: Any) -> str | None:
    return None if path is None else str(path)


def describe(cfg: RedisSettings) -> str:
    return mask_url(cfg.url)


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    """Create the group (and the stream) if missing; starting at 0 so nothing queued is skipped."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass(frozen=True)
class GroupStats:
    length: int
    pending: int
    lag: int


def group_stats(r: redis.Redis, stream: str, group: str, cap: int = 10_000) -> GroupStats | None:
    """Length of ``stream`` and the pending count and lag of ``group`` (None without the group).

    The lag is Redis' own where it can tell (Redis >= 7); otherwise the entries after the last
    delivered one are counted, up to ``cap``.
    """
    pipe = r.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    try:
        length, groups = pipe.execute()
    except redis.ResponseError:
        return None
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name != group:
            continue
        lag = g.get("lag")
        if lag is None:
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            lag = len(r.xrange(stream, min=f"({last}", max="+", count=cap) or [])
        return GroupStats(int(length), int(g["pending"]), int(lag))
    return None


def is_nogroup(exc: Exception) -> bool:
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


@dataclass(frozen=True)
class Entry:
    stream: str
    id: str
    payload: bytes | None  # None when the entry lacks the payload field


def parse_read(reply: Any) -> list[Entry]:
    """XREADGROUP/XREAD reply -> entries (deleted entries come back with no fields)."""
    out: list[Entry] = []
    for stream, items in reply or []:
        name = stream.decode() if isinstance(stream, bytes) else str(stream)
        for entry_id, fields in items:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            out.append(Entry(name, eid, (fields or {}).get(FIELD)))
    return out


def dead_letter(pipe: Any, keys: Keys, cfg: StreamSettings, entry: Entry, reason: str, detail: str,
                service: str) -> None:
    """Queue the entry's raw payload with the reason on ``<stream>:dead``; the caller acks it."""
    pipe.xadd(
        keys.dead_letter(entry.stream),
        {b"payload": entry.payload or b"", b"reason": reason, b"detail": detail[:500], b"source_id": entry.id,
         b"service": service, b"ts": f"{time.time():.3f}"},
        maxlen=cfg.dead_letter_maxlen, approximate=True,
    )


def autoclaim(r: redis.Redis, stream: str, group: str, consumer: str, idle_ms: int,
              count: int = 100) -> list[Entry]:
    """Take over entries another consumer left pending for ``idle_ms`` (it died or hangs)."""
    reply = r.xautoclaim(stream, group, consumer, min_idle_time=idle_ms, start_id="0-0", count=count)
    items = reply[1] if reply else []
    return parse_read([(stream, [i for i in items if i is not None])])


def delivery_counts(r: redis.Redis, stream: str, group: str, ids: list[str]) -> dict[str, int]:
    if not ids:
        return {}
    rows = r.xpending_range(stream, group, min=min(ids, key=_id_key), max=max(ids, key=_id_key),
                            count=len(ids) + 100)
    wanted = set(ids)
    out = {}
    for row in rows:
        mid = row["message_id"]
        mid = mid.decode() if isinstance(mid, bytes) else str(mid)
        if mid in wanted:
            out[mid] = int(row["times_delivered"])
    return out


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def retry_forever(fn: Callable[[], T], backoff: Backoff, stopping: Callable[[], bool], what: str,
                  on_error: Callable[[Exception], None] | None = None) -> T | None:
    """Call ``fn`` until it succeeds, sleeping with backoff on connection errors; None if stopping."""
    while not stopping():
        try:
            result = fn()
        except CONNECTION_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning("%s: Redis unavailable (%s); retrying in %.2fs", what, exc, delay)
            if on_error is not None:
                on_error(exc)
            _sleep_unless(delay, stopping)
            continue
        backoff.reset()
        return result
    return None


def _sleep_unless(delay: float, stopping: Callable[[], bool]) -> None:
    end = time.monotonic() + delay
    while not stopping() and time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
