"""A small client for emotion events.

    from shared.events import EventFilter, subscribe
    from shared.streams import connect
    from shared.settings import RedisSettings

    r = connect(RedisSettings(url="redis://127.0.0.1:6379/0"))
    for event in subscribe(r, start="now", filt=EventFilter(emotions={"Happy"}, min_score=0.5)):
        print(event.camera, event.label, event.score)

Events are read from the durable events stream (``start``: ``"now"``, ``"start"`` or a stream
id), so a consumer can replay. With ``group=`` it reads through a consumer group and acks,
so several consumers share the work and a restarted one resumes where it stopped.
Undecodable entries are skipped and counted on ``EventReader.skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis

from shared.schema import DecodeError, EventMsg, TrackEventMsg, decode_event, decode_track
from shared.streams import Keys, ensure_group, parse_read

log = logging.getLogger(__name__)
M = TypeVar("M")


@dataclass(frozen=True)
class EventFilter:
    cameras: frozenset[str] = field(default_factory=frozenset)
    emotions: frozenset[str] = field(default_factory=frozenset)
    min_score: float = 0.0

    def matches(self, ev: EventMsg) -> bool:
        if self.cameras and ev.camera not in self.cameras:
            return False
        if self.emotions and ev.label.lower() not in {e.lower() for e in self.emotions}:
            return False
        return ev.score >= self.min_score


class _StreamReader(Generic[M]):
    """Reads one stream from a position or through a consumer group; decodes, skips and counts bad entries."""

    def __init__(self, r: redis.Redis, stream: str, decode: Callable[[bytes], M], start: str, group: str | None,
                 consumer: str, block_ms: int) -> None:
        self.r = r
        self.stream = stream
        self.decode = decode
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.skipped = 0
        self.last_id = {"now": "$", "start": "0-0"}.get(start, start)
        if group:
            ensure_group(r, stream, group)

    def read(self) -> list[M]:
        reply: Any
        if self.group:
            reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=256, block=self.block_ms)
        else:
            reply = self.r.xread({self.stream: self.last_id}, count=256, block=self.block_ms)
        entries = parse_read(reply)
        out = []
        for entry in entries:
            self.last_id = entry.id
            try:
                out.append(self.decode(entry.payload or b""))
            except DecodeError as exc:
                self.skipped += 1
                log.warning("skipping %s entry %s: %s", self.stream, entry.id, exc)
        if self.group and entries:
            self.r.xack(self.stream, self.group, *[e.id for e in entries])
        return out


class EventReader(_StreamReader[EventMsg]):
    """Per-frame emotion events, filtered."""

    def __init__(self, r: redis.Redis, keys: Keys | None = None, start: str = "now",
                 filt: EventFilter | None = None, group: str | None = None, consumer: str = "events-cli",
                 block_ms: int = 500) -> None:
        super().__init__(r, (keys or Keys()).events, decode_event, start, group, consumer, block_ms)
        self.filt = filt or EventFilter()

    def poll(self) -> list[EventMsg]:
        """One blocking read; returns the matching events (maybe none)."""
        return [ev for ev in self.read() if self.filt.matches(ev)]

    def __iter__(self) -> Iterator[EventMsg]:
        while True:
            yield from self.poll()


class TrackReader(_StreamReader[TrackEventMsg]):
    """Track events (started / changed / ended)."""

    def __init__(self, r: redis.Redis, keys: Keys | None = None, start: str = "now",
                 cameras: frozenset[str] = frozenset(), group: str | None = None, consumer: str = "tracks-cli",
                 block_ms: int = 500) -> None:
        super().__init__(r, (keys or Keys()).tracks, decode_track, start, group, consumer, block_ms)
        self.cameras = cameras

    def poll(self) -> list[TrackEventMsg]:
        return [te for te in self.read() if not self.cameras or te.camera in self.cameras]


def subscribe(r: redis.Redis, start: str = "now", filt: EventFilter | None = None, keys: Keys | None = None,
              group: str | None = None, stop: Callable[[], bool] | None = None) -> Iterator[EventMsg]:
    """Iterate events until ``stop()`` returns true (forever when not given)."""
    reader = EventReader(r, keys=keys, start=start, filt=filt, group=group)
    while stop is None or not stop():
        yield from reader.poll()
