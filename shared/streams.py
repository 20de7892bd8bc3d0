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
# Refusals that pass on their own: memory freed (OOM with noeviction), a replica promoted after
# a failover (READONLY), a cluster slot moving (TRYAGAIN, CLUSTERDOWN). Retried like an outage,
# never treated as a bug in the data.
REFUSAL_ERRORS = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                  redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
TRANSIENT_ERRORS = CONNECTION_ERRORS + REFUSAL_ERRORS


def watch_broken(exc: redis.WatchError) -> bool:
    """True when a WatchError only reports that the connection broke while keys were watched
    (redis-py raises it then), not that a watched key changed."""
    cause = exc.__cause__ or exc.__context__
    return isinstance(cause, CONNECTION_ERRORS) or "ConnectionError occurred while watching" in str(exc)


def refusal_reason(exc: BaseException) -> str:
    """Metric label for a transient Redis error: ``redis_oom``, ``redis_readonly`` or ``redis_unavailable``."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "redis_oom"
    if isinstance(exc, redis.exceptions.ReadOnlyError):
        return "redis_readonly"
    if isinstance(exc, redis.exceptions.ExecAbortError) and "OOM" in str(exc):
        return "redis_oom"  # a MULTI refused at EXEC because a queued write hit maxmemory
    return "redis_unavailable"


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry after a pause can get past (see ``REFUSAL_ERRORS``)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ExecAbortError) and ("OOM" in str(exc) or "READONLY" in str(exc))



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


# Counts unread entries of a group that MAXLEN trimming removed, once: the marker remembers the
# group's last delivered id and how many were counted behind it, so replicas sampling the same
# gap (or one replica sampling it twice) add only what is new.
COUNT_TRIMMED = """
local mark = redis.call('GET', KEYS[1])
local counted = 0
if mark then
  local sep = string.find(mark, '|', 1, true)
  if string.sub(mark, 1, sep - 1) == ARGV[1] then counted = tonumber(string.sub(mark, sep + 1)) end
end
local now = tonumber(ARGV[2])
if now <= counted then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. now, 'EX', 86400)
return now - counted
"""


def trimmed_unread(r: redis.Redis, stream: str, group: str) -> int | None:
    """Entries MAXLEN trimmed before ``group`` read them, from Redis 7's counters; None if unknown.

    With no XDEL in the pipeline, ``entries-added - length`` entries were trimmed; when the
    group's last delivered id lies before the first entry, every entry it read was among them,
    so the rest of the trimmed ones were never read.
    """
    try:
        info = r.xinfo_stream(stream)
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    added, first = info.get("entries-added"), info.get("first-entry")
    if added is None or not first:
        return None  # Redis < 7, or an empty stream
    first_id = parse_id(_as_str(first[0]))
    for g in groups:
        if _as_str(g["name"]) != group:
            continue
        read, last = g.get("entries-read"), parse_id(_as_str(g["last-delivered-id"]))
        if last is None or first_id is None or last >= first_id:
            return 0
        if read is None:
            # A group that never read keeps no count; it missed every trimmed entry.
            return max(0, int(added) - int(info["length"])) if last == (0, 0) else None
        return max(0, int(added) - int(info["length"]) - int(read))
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
    """Queue the entry's payload with the reason on ``<stream>:dead``; the caller acks it.

    Payloads above ``dead_letter_payload_max_bytes`` (full JPEG frames) are replaced by their
    size: a systematic error dead-letters every frame, and whole frames would fill Redis.
    """
    payload = entry.payload or b""
    kept = payload if len(payload) <= cfg.dead_letter_payload_max_bytes else b""
    pipe.xadd(
        keys.dead_letter(entry.stream),
        {b"payload": kept, b"payload_bytes": len(payload), b"payload_kept": int(bool(kept) or not payload),
         b"reason": reason, b"detail": detail[:500], b"source_id": entry.id, b"service": service,
         b"ts": f"{time.time():.3f}"},
        maxlen=cfg.dead_letter_maxlen, approximate=True,
    )


@dataclass(frozen=True)
class Claimed:
    """What one XAUTOCLAIM call took over, and the pending ids whose entries no longer exist."""

    entries: list[Entry]
    deleted: list[str]
    next_id: str
    unnamed: int = 0  # Redis 6.2: trimmed entries returned without their ids


def autoclaim(r: redis.Redis, stream: str, group: str, consumer: str, idle_ms: int, count: int = 100,
              start_id: str = "0-0") -> Claimed:
    """Take over entries another consumer left pending for ``idle_ms`` (it died or hangs).

    Pending entries trimmed from the stream (MAXLEN) before anyone acked them come back in two
    forms: Redis >= 7 lists their ids in a third reply element (and drops them from the PEL);
    Redis 6.2 returns them as ``(id, None)`` or ``(None, None)`` items and keeps them pending,
    so they are acked here. Either way they are returned in ``deleted`` for the caller to count.
    """
    reply = r.xautoclaim(stream, group, consumer, min_idle_time=idle_ms, start_id=start_id, count=count)
    if not reply:
        return Claimed([], [], "0-0")
    next_id = _as_str(reply[0]) if reply[0] is not None else "0-0"
    items, gone = [], [_as_str(i) for i in (reply[2] if len(reply) > 2 and reply[2] else [])]
    unnamed = 0
    for item in reply[1] or []:
        if item is None or item[0] is None:
            unnamed += 1  # the caller finds these with :func:`trimmed_pending`
        elif item[1] is None:
            gone.append(_as_str(item[0]))
        else:
            items.append(item)
    return Claimed(parse_read([(stream, items)]), gone, next_id, unnamed)


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def trimmed_pending(r: redis.Redis, stream: str, group: str, consumer: str, count: int) -> list[str]:
    """Ids pending on ``consumer`` whose entries were trimmed away (XRANGE finds nothing).

    Redis 6.2's XAUTOCLAIM hands such entries to the claiming consumer without their ids.
    """
    rows = r.xpending_range(stream, group, min="-", max="+", count=count, consumername=consumer)
    ids = [_as_str(row["message_id"]) for row in rows]
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
    return [entry_id for entry_id, rows in zip(ids, pipe.execute(), strict=True) if not rows]


def delivery_counts(r: redis.Redis, stream: str, group: str, ids: list[str]) -> dict[str, int]:
    wanted = {i for i in ids if parse_id(i) is not None}
    if not wanted:
        return {}
    rows = r.xpending_range(stream, group, min=min(wanted, key=_id_key), max=max(wanted, key=_id_key),
                            count=len(wanted) + 100)
    out = {}
    for row in rows:
        mid = _as_str(row["message_id"])
        if mid in wanted:
            out[mid] = int(row["times_delivered"])
    return out


def parse_id(entry_id: str) -> tuple[int, int] | None:
    """``ms-seq`` -> (ms, seq); None for anything else (Redis 6.2 can hand back ``None``)."""
    ms, _, seq = entry_id.partition("-")
    if not ms.isdigit() or not (seq or "0").isdigit():
        return None
    return int(ms), int(seq or 0)


def _id_key(entry_id: str) -> tuple[int, int]:
    return parse_id(entry_id) or (0, 0)


def retry_forever(fn: Callable[[], T], backoff: Backoff, stopping: Callable[[], bool], what: str,
                  on_error: Callable[[Exception], None] | None = None) -> T | None:
    """Call ``fn`` until it succeeds, sleeping with backoff on connection errors; None if stopping."""
    while not stopping():
        try:
            result = fn()
        except TRANSIENT_ERRORS as exc:
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
