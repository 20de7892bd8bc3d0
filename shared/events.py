"""A small client for emotion events.

    from shared.events import EventFilter, subscribe
    from shared.streams import connect
    from shared.settings import RedisSettings

    r = connect(RedisSettings(url="redis://127.0.0.1:6379/0"))
    for event in subscribe(r, start="now", filt=EventFilter(emotions={"Happy"}, min_score=0.5)):
        print(event.camera, event.label, event.score)

Events are read from the durable events stream (``start``: ``"now"``, ``"start"`` or a stream
id), so a consumer can replay. With ``group=`` it reads through a consumer group: several
consumers share the work, and an entry is acked only once the caller has finished it: for
:func:`subscribe`, when the caller asks for the next event (an exception in the caller's loop
leaves that event pending); for :meth:`~_StreamReader.read`, on the next read. Delivery is
at least once: de-duplicate by ``event_id``. A consumer's unfinished entries come back to it on
its next read, or, once it is gone, to another consumer of the group after ``claim_idle_ms``
(default 30 s; raise it if handling one read's events can take longer). The default consumer
name is unique per process; give a stable ``consumer=`` to resume a consumer's own pending
entries at once after a restart. ``start`` places a new group; with ``reposition=True`` it also
moves an existing one.

Redis outages do not end a reader: a failed read waits (capped exponential backoff) and
returns nothing, and the next read resumes after the last entry received, or through the group.
Undecodable entries are skipped and counted on ``skipped``.
"""

from __future__ import annotations

import logging
import os
import secrets
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
# Entries a consumer of the group left pending this long are taken over (by default).
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 10.0
# subscribe() acks what its caller finished at least this often (in entries).
ACK_EVERY = 32


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


@dataclass(frozen=True)
class Read(Generic[M]):
    """One entry as read: its id and message, ``msg`` None when it could not be decoded (skipped)."""

    id: str
    msg: M | None


_PROCESS_CONSUMER: dict[int, str] = {}


def default_consumer() -> str:
    """Unique per process (host, pid, random): two consumers on one host never share pending entries."""
    pid = os.getpid()
    if pid not in _PROCESS_CONSUMER:  # keyed by pid: a forked child gets its own
        _PROCESS_CONSUMER[pid] = f"{socket.gethostname()}-{pid}-{secrets.token_hex(3)}"
    return _PROCESS_CONSUMER[pid]


def group_start(start: str) -> str:
    return {"now": "$", "start": "0"}.get(start, start)


class _StreamReader(Generic[M]):
    """Reads one stream from a position or through a consumer group; decodes, skips and counts bad entries.

    In group mode an entry is acked once the caller has finished it (:meth:`finish`; every
    entry :meth:`read` returns counts as finished at the next read or :meth:`ack`). Entries read
    and not finished are read again from this consumer's pending list on the next read.
    """

    def __init__(self, r: redis.Redis, stream: str, decode: Callable[[bytes], M], start: str, group: str | None,
                 consumer: str | None, block_ms: int, reposition: bool = False,
                 claim_idle_ms: int = CLAIM_IDLE_MS) -> None:
        if claim_idle_ms < 1:
            raise ValueError(f"claim_idle_ms must be at least 1, got {claim_idle_ms}")
        self.r = r
        self.stream = stream
        self.decode = decode
        self.group = group
        self.consumer = consumer or default_consumer()
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.skipped = 0
        self.reconnects = 0
        self.lost = 0  # group mode: events trimmed away before this group got them (logged)
        self._trimmed_seen = 0
        self.last_id = {"now": "$", "start": "0-0"}.get(start, start)
        self._start = start
        self._reposition = reposition
        self._group_ready = False
        self._own_pending: str | None = "0"  # group mode: re-read our own pending entries first
        self._open: list[str] = []  # read, handed out or about to be, not finished
        self._finished: list[str] = []  # finished by the caller, not acked yet
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
        batch = self.read_batch()
        for item in batch:
            self.finish(item.id)  # all handed out at once: finished when the caller reads again
        return [Positioned(item.id, item.msg) for item in batch if item.msg is not None]

    def read_batch(self) -> list[Read[M]]:
        """One read, nothing marked finished: the caller calls :meth:`finish` on each entry it is done with."""
        entries = self._with_retry(self._fetch) or []
        out: list[Read[M]] = []
        for entry in entries:
            try:
                out.append(Read(entry.id, self.decode(entry.payload or b"")))
            except DecodeError as exc:
                self.skipped += 1
                log.warning("skipping %s entry %s: %s", self.stream, entry.id, exc)
                out.append(Read(entry.id, None))
        if self.group:
            self._open = [e.id for e in entries]
        return out

    def finish(self, entry_id: str) -> None:
        """The caller is done with this entry (handled, filtered out or undecodable): ack it with the next ack."""
        if self.group and entry_id in self._open:
            self._open.remove(entry_id)
            self._finished.append(entry_id)

    def ack(self, ids: list[str] | None = None) -> None:
        """Ack finished entries (default: all of them); never an entry the caller has not finished."""
        if not self.group:
            return
        wanted = None if ids is None else set(ids)
        done = [i for i in self._finished if wanted is None or i in wanted]
        if done:
            self.r.xack(self.stream, self.group, *done)
            acked = set(done)
            self._finished = [i for i in self._finished if i not in acked]

    def iterate(self, wanted: Callable[[M], bool], stop: Callable[[], bool] | None = None) -> Iterator[M]:
        """Messages one at a time; each is finished when the caller asks for the next one.

        If the caller's loop raises (or it stops early), the message it was on and the rest of
        the read stay pending: they come again.
        """
        while stop is None or not stop():
            for item in self.read_batch():
                if item.msg is not None and wanted(item.msg):
                    yield item.msg
                self.finish(item.id)
                if len(self._finished) >= ACK_EVERY:
                    self.ack_quietly()

    def ack_quietly(self) -> None:
        """Ack what was finished; if Redis is down the entries stay pending and come again."""
        try:
            self.ack()
        except TRANSIENT_ERRORS as exc:
            log.warning("events: ack failed (%s); those events may be delivered again", exc)

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
        self.ack()
        if self._open:  # read but never finished (the caller stopped, or raised): read them again
            self._open = []
            self._own_pending = "0"
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
        self._open = []
        self._finished = []

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
        claimed = autoclaim(self.r, self.stream, self.group, self.consumer, self.claim_idle_ms, count=READ_COUNT)
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
                 block_ms: int = 500, reposition: bool = False, claim_idle_ms: int = CLAIM_IDLE_MS) -> None:
        super().__init__(r, (keys or Keys()).events, decode_event, start, group, consumer, block_ms, reposition,
                         claim_idle_ms)
        self.filt = filt or EventFilter()

    def poll(self) -> list[EventMsg]:
        """One blocking read; returns the matching events (maybe none)."""
        return [ev for ev in self.read() if self.filt.matches(ev)]

    def poll_positioned(self) -> list[Positioned[EventMsg]]:
        """:meth:`poll` with each event's stream id."""
        return [p for p in self.read_positioned() if self.filt.matches(p.msg)]

    def __iter__(self) -> Iterator[EventMsg]:
        return self.iterate(self.filt.matches)


class TrackReader(_StreamReader[TrackEventMsg]):
    """Track events (started / changed / ended), filtered by camera, emotion and confidence."""

    def __init__(self, r: redis.Redis, keys: Keys | None = None, start: str = "now",
                 cameras: frozenset[str] = frozenset(), group: str | None = None, consumer: str | None = None,
                 block_ms: int = 500, filt: EventFilter | None = None, reposition: bool = False,
                 claim_idle_ms: int = CLAIM_IDLE_MS) -> None:
        super().__init__(r, (keys or Keys()).tracks, decode_track, start, group, consumer, block_ms, reposition,
                         claim_idle_ms)
        self.filt = filt or EventFilter(cameras=cameras)

    def poll(self) -> list[TrackEventMsg]:
        return [te for te in self.read() if self.filt.matches_track(te)]


def subscribe(r: redis.Redis, start: str = "now", filt: EventFilter | None = None, keys: Keys | None = None,
              group: str | None = None, stop: Callable[[], bool] | None = None,
              consumer: str | None = None, claim_idle_ms: int = CLAIM_IDLE_MS) -> Generator[EventMsg, None, None]:
    """Iterate events until ``stop()`` returns true (forever when not given).

    With ``group``, an event is acked after the caller asks for the next one. The event the
    caller was on when the iterator closed (an exception in its loop, a ``break``) is not acked:
    it comes again. At least once: de-duplicate by ``event_id``.
    """
    reader = EventReader(r, keys=keys, start=start, filt=filt, group=group, consumer=consumer,
                         claim_idle_ms=claim_idle_ms)
    try:
        yield from reader.iterate(reader.filt.matches, stop)
    finally:
        reader.ack_quietly()
