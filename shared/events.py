"""A small client for emotion events.

    from shared.events import EventFilter, subscribe
    from shared.streams import connect
    from shared.settings import RedisSettings

    r = connect(RedisSettings(url="redis://127.0.0.1:6379/0"))
    for event in subscribe(r, start="now", filt=EventFilter(emotions={"Happy"}, min_score=0.5)):
        print(event.camera, event.label, event.score)

Events are read from the durable events stream (``start``: ``"now"``, ``"start"`` or a stream
id), so a consumer can replay. With ``group=`` it reads through a consumer group: several
consumers share the work, and each entry is acked only once the caller has received it (on
the next read, or as :func:`subscribe` moves past it). A consumer that restarts under the same
name first reads its own pending entries again, so nothing it had not received is lost; it
may see the last few events twice (same ``event_id``). ``start`` places a new group; with
``reposition=True`` it also moves an existing one.

Redis outages do not end a reader: a failed read waits (capped exponential backoff) and
returns nothing, and the next read resumes after the last entry received, or through the group.
Undecodable entries are skipped and counted on ``skipped``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis

from shared.schema import NO_ZONE, DecodeError, EventMsg, TrackEventMsg, decode_event, decode_track
from shared.streams import (
    TRANSIENT_ERRORS,
    Backoff,
    Entry,
    Keys,
    autoclaim,
    is_nogroup,
    parse_read,
    trimmed_unread,
)

log = logging.getLogger(__name__)
M = TypeVar("M")

READ_COUNT = 256
# Entries a dead consumer of the group left pending this long are taken over.
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 10.0


@dataclass(frozen=True)
class EventFilter:
    cameras: frozenset[str] = field(default_factory=frozenset)
    emotions: frozenset[str] = field(default_factory=frozenset)
    min_score: float = 0.0
    # events whose face is in any of these zones ("none": in no zone); empty: any zone
    zones: frozenset[str] = field(default_factory=frozenset)

    def matches(self, ev: EventMsg) -> bool:
        return self._matches(ev.camera, ev.label, ev.score) and self.in_zones(ev.zones)

    def in_zones(self, zones: tuple[str, ...]) -> bool:
        if not self.zones:
            return True
        return bool(self.zones.intersection(zones)) or (NO_ZONE in self.zones and not zones)

    def matches_track(self, te: TrackEventMsg) -> bool:
        """Track events by camera, current emotion and its (smoothed) confidence."""
        return self._matches(te.camera, te.emotion, te.confidence)

    def _matches(self, camera: str, emotion: str, score: float) -> bool:
        if self.cameras and camera not in self.cameras:
            return False
        if self.emotions and emotion.lower() not in {e.lower() for e in self.emotions}:
            return False
        return score >= self.min_score


@dataclass(frozen=True)
class Positioned(Generic[M]):
    """A message and the id of its stream entry."""

    id: str
    msg: M


def default_consumer() -> str:
    """Stable across restarts on one host, so a restarted consumer finds its own pending entries."""
    return f"{socket.gethostname()}-events"


def group_start(start: str) -> str:
    return {"now": "$", "start": "0"}.get(start, start)


class _StreamReader(Generic[M]):
    """Reads one stream from a position or through a consumer group; decodes, skips and counts bad entries.

    In group mode the ids handed to the caller are acked at the start of the next read (or by
    :meth:`ack`); entries that failed to decode or were filtered out are acked with them.
    """

    def __init__(self, r: redis.Redis, stream: str, decode: Callable[[bytes], M], start: str, group: str | None,
                 consumer: str | None, block_ms: int, reposition: bool = False) -> None:
        self.r = r
        self.stream = stream
        self.decode = decode
        self.group = group
        self.consumer = consumer or default_consumer()
        self.block_ms = block_ms
        self.skipped = 0
        self.reconnects = 0
        self.lost = 0  # group mode: events trimmed away before this group got them (logged)
        self._trimmed_seen = 0
        self.last_id = {"now": "$", "start": "0-0"}.get(start, start)
        self._start = start
        self._reposition = reposition
        self._group_ready = False
        self._own_pending: str | None = "0"  # group mode: re-read our own pending entries first
        self._unacked: list[str] = []
        self._backoff = Backoff(0.2, 5.0)
        self._last_claim = 0.0
        if group:
            self._with_retry(self._ensure_group)

    def read(self) -> list[M]:
        return [p.msg for p in self.read_positioned()]

    def read_positioned(self) -> list[Positioned[M]]:
        """Like :meth:`read`, each message with its stream id (for resuming, e.g. SSE ``Last-Event-ID``).

        An empty list may also mean Redis is unavailable: the call has then waited a backoff delay.
        """
        entries = self._with_retry(self._fetch) or []
        out: list[Positioned[M]] = []
        for entry in entries:
            try:
                out.append(Positioned(entry.id, self.decode(entry.payload or b"")))
            except DecodeError as exc:
                self.skipped += 1
                log.warning("skipping %s entry %s: %s", self.stream, entry.id, exc)
        if self.group:
            self._unacked += [e.id for e in entries]
        return out

    def ack(self, ids: list[str] | None = None) -> None:
        """Ack entries the caller has received (default: everything handed out so far)."""
        if not self.group:
            return
        done = self._unacked if ids is None else [i for i in self._unacked if i in set(ids)]
        if done:
            self.r.xack(self.stream, self.group, *done)
            self._unacked = [i for i in self._unacked if i not in set(done)]

    def _with_retry(self, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except redis.ResponseError as exc:
            if is_nogroup(exc):
                log.warning("consumer group %s missing on %s (Redis lost its data?): re-creating it at the start",
                            self.group, self.stream)
                self._group_ready = False
                self._start = "start"  # everything in the new stream came after the loss: read it all
                return None
            if not isinstance(exc, TRANSIENT_ERRORS):
                raise
            self._wait(exc)
            return None
        except TRANSIENT_ERRORS as exc:
            self._wait(exc)
            return None
        self._backoff.reset()
        return result

    def _wait(self, exc: Exception) -> None:
        delay = self._backoff.next_delay()
        self.reconnects += 1
        log.warning("events: Redis unavailable (%s: %s); retrying in %.2fs", type(exc).__name__, exc, delay)
        # What a lost reply delivered to us is pending on us: read it again before new entries.
        self._own_pending = "0"
        time.sleep(delay)

    def _fetch(self) -> list[Entry]:
        if not self.group:
            if self.last_id == "$":
                # "$" means "after the newest entry at the time of this call": between two calls
                # it would skip what arrived in between, so pin it to an id once.
                newest = self.r.xrevrange(self.stream, count=1)
                self.last_id = parse_read([(self.stream, newest)])[0].id if newest else "0-0"
            entries = parse_read(self.r.xread({self.stream: self.last_id}, count=READ_COUNT, block=self.block_ms))
            if entries:
                self.last_id = entries[-1].id
            return entries
        if not self._group_ready:
            self._ensure_group()
        self.ack()  # the caller has received what the previous read handed out
        self._maybe_claim()
        if self._own_pending is not None:
            reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: self._own_pending}, count=READ_COUNT)
            entries = parse_read(reply)
            if entries:
                self._own_pending = entries[-1].id
                return entries
            self._own_pending = None
        return parse_read(self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=READ_COUNT,
                                            block=self.block_ms))

    def _ensure_group(self) -> None:
        assert self.group is not None
        position = group_start(self._start)
        try:
            self.r.xgroup_create(self.stream, self.group, id=position, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            if self._reposition:
                log.info("moving consumer group %s of %s to %s", self.group, self.stream, position)
                self.r.xgroup_setid(self.stream, self.group, id=position)
        self._reposition = False  # only once: a re-created group (Redis lost data) starts where asked
        self._group_ready = True
        self._own_pending = "0"
        self._unacked = []

    def _count_trimmed(self) -> None:
        """Events the stream's MAXLEN trimmed before this group read them (Redis >= 7 can tell)."""
        assert self.group is not None
        trimmed = trimmed_unread(self.r, self.stream, self.group) or 0
        if trimmed > self._trimmed_seen:
            log.warning("%d events were trimmed from %s (MAXLEN) before group %s read them",
                        trimmed - self._trimmed_seen, self.stream, self.group)
            self.lost += trimmed - self._trimmed_seen
        self._trimmed_seen = trimmed

    def _maybe_claim(self) -> None:
        """Take over what consumers of the group that never came back left pending."""
        now = time.monotonic()
        if now - self._last_claim < CLAIM_EVERY_S:
            return
        self._last_claim = now
        assert self.group is not None
        self._count_trimmed()
        claimed = autoclaim(self.r, self.stream, self.group, self.consumer, CLAIM_IDLE_MS, count=READ_COUNT)
        if claimed.deleted:
            self.lost += len(claimed.deleted)
            log.warning("%d events pending in group %s were trimmed (MAXLEN) before anyone acked them",
                        len(claimed.deleted), self.group)
            self.r.xack(self.stream, self.group, *claimed.deleted)
        if claimed.entries:
            log.info("took over %d events left pending by other consumers", len(claimed.entries))
            self._own_pending = "0"  # claimed entries are ours now: read them through the pending path


class EventReader(_StreamReader[EventMsg]):
    """Per-frame emotion events, filtered."""

    def __init__(self, r: redis.Redis, keys: Keys | None = None, start: str = "now",
                 filt: EventFilter | None = None, group: str | None = None, consumer: str | None = None,
                 block_ms: int = 500, reposition: bool = False) -> None:
        super().__init__(r, (keys or Keys()).events, decode_event, start, group, consumer, block_ms, reposition)
        self.filt = filt or EventFilter()

    def poll(self) -> list[EventMsg]:
        """One blocking read; returns the matching events (maybe none)."""
        return [ev for ev in self.read() if self.filt.matches(ev)]

    def poll_positioned(self) -> list[Positioned[EventMsg]]:
        """:meth:`poll` with each event's stream id."""
        return [p for p in self.read_positioned() if self.filt.matches(p.msg)]

    def __iter__(self) -> Iterator[EventMsg]:
        while True:
            yield from self.poll()


class TrackReader(_StreamReader[TrackEventMsg]):
    """Track events (started / changed / ended), filtered by camera, emotion and confidence."""

    def __init__(self, r: redis.Redis, keys: Keys | None = None, start: str = "now",
                 cameras: frozenset[str] = frozenset(), group: str | None = None, consumer: str | None = None,
                 block_ms: int = 500, filt: EventFilter | None = None, reposition: bool = False) -> None:
        super().__init__(r, (keys or Keys()).tracks, decode_track, start, group, consumer, block_ms, reposition)
        self.filt = filt or EventFilter(cameras=cameras)

    def poll(self) -> list[TrackEventMsg]:
        return [te for te in self.read() if self.filt.matches_track(te)]


def subscribe(r: redis.Redis, start: str = "now", filt: EventFilter | None = None, keys: Keys | None = None,
              group: str | None = None, stop: Callable[[], bool] | None = None,
              consumer: str | None = None) -> Generator[EventMsg, None, None]:
    """Iterate events until ``stop()`` returns true (forever when not given).

    With ``group``, each event is acked once the caller asks for the next one (or closes the
    iterator), never before it was handed over.
    """
    reader = EventReader(r, keys=keys, start=start, filt=filt, group=group, consumer=consumer)
    handed: list[str] = []
    try:
        while stop is None or not stop():
            batch = reader.read_positioned()
            skipped = [i for i in reader._unacked if i not in {p.id for p in batch}]
            handed += skipped
            for item in batch:
                handed.append(item.id)
                if reader.filt.matches(item.msg):
                    yield item.msg
                if len(handed) >= 32:
                    _ack_quietly(reader, handed)
                    handed = []
            _ack_quietly(reader, handed)
            handed = []
    finally:
        _ack_quietly(reader, handed)


def _ack_quietly(reader: _StreamReader[Any], ids: list[str]) -> None:
    """Ack what the caller received; if Redis is down the entries stay pending and come again."""
    if not ids:
        return
    try:
        reader.ack(ids)
    except TRANSIENT_ERRORS as exc:
        log.warning("events: ack failed (%s); those events may be delivered again", exc)
