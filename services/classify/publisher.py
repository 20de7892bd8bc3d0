"""Classify's output side: events, track events and the acks of the faces they came from.

Order of hand-offs: the batcher (``ClassifyWorker``) gives :meth:`Publisher.publish` the
classified messages; the publisher updates the tracks, then writes events, track events and
acks. On a single Redis they go in one MULTI/EXEC, so the acks land exactly when the outputs
do. A cluster refuses a transaction across slots: there the outputs are written first and the
acks after, so a crash in between re-processes faces (same event ids) but never loses them.
If the write fails, the tracks are rolled back: the faces come again and must not count twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.classify.settings import ClassifyOptions
from shared.schema import FIELD, EventMsg, FaceCrop, FacesMsg, TrackEventMsg, encode_event, encode_track, event_id
from shared.streams import Entry, Keys, LivePublisher
from shared.zones import zone_label


@dataclass(frozen=True)
class Classified:
    """One faces message with the probabilities of each of its faces."""

    entry: Entry
    msg: FacesMsg
    probs: np.ndarray  # (faces, classes)


class Tracks(Protocol):
    def track(self, msg: FacesMsg, probs: np.ndarray) -> tuple[list[int | None], list[TrackEventMsg]]: ...

    def snapshot_trackers(self) -> Any: ...

    def restore_trackers(self, saved: Any) -> None: ...


class PublishMetrics(Protocol):
    events: Any
    track_events: Any
    end_to_end: Any


@dataclass(frozen=True)
class Model:
    classes: tuple[str, ...]
    version: str


class Publisher:
    def __init__(self, r: Any, keys: Keys, opts: ClassifyOptions, group: str, metrics: PublishMetrics,
                 model: Model, tracks: Tracks, transactional: bool,
                 writing: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self.r = r
        self.keys = keys
        self.opts = opts
        self.group = group
        self.metrics = metrics
        self.model = model
        self.tracks = tracks
        self.transactional = transactional
        self.writing = writing  # times the EXECs (the worker's write phase)
        self.live = LivePublisher(r)

    def publish(self, done: Sequence[Classified]) -> None:
        saved = self.tracks.snapshot_trackers()
        try:
            events, track_events = self._build(done)
            if self.transactional:
                pipe = self.r.pipeline(transaction=True)
                self._queue_outputs(pipe, events, track_events)
                self._queue_acks(pipe, done)
                with self.writing():
                    pipe.execute()
            else:
                outputs = self.r.pipeline(transaction=False)
                self._queue_outputs(outputs, events, track_events)
                with self.writing():
                    outputs.execute()
                acks = self.r.pipeline(transaction=False)
                self._queue_acks(acks, done)
                with self.writing():
                    acks.execute()
        except BaseException:
            self.tracks.restore_trackers(saved)
            self.live.pending.clear()
            raise
        self.live.flush()
        for ev in events:
            self.metrics.events.labels(camera=ev.camera, emotion=ev.label, zone=zone_label(ev.zones)).inc()
            self.metrics.end_to_end.labels(camera=ev.camera).observe(max(0.0, ev.publish_ts - ev.capture_ts))
        for te in track_events:
            self.metrics.track_events.labels(camera=te.camera, kind=te.kind).inc()

    def queue_tracks(self, pipe: Any, track_events: list[TrackEventMsg]) -> None:
        """Track events on their own (tracks ended by time, or at shutdown): nothing to ack."""
        self._queue_outputs(pipe, [], track_events)
        for te in track_events:
            self.metrics.track_events.labels(camera=te.camera, kind=te.kind).inc()

    def _build(self, done: Sequence[Classified]) -> tuple[list[EventMsg], list[TrackEventMsg]]:
        now = time.time()
        events: list[EventMsg] = []
        track_events: list[TrackEventMsg] = []
        for c in done:
            ids, tevs = self.tracks.track(c.msg, c.probs)
            track_events += tevs
            for index, face in enumerate(c.msg.faces):
                events.append(self._event(c.msg, index, face, c.probs[index], now, ids[index]))
        return events, track_events

    def _queue_outputs(self, pipe: Any, events: list[EventMsg], track_events: list[TrackEventMsg]) -> None:
        for te in track_events:
            payload = encode_track(te)
            pipe.xadd(self.keys.tracks, {FIELD: payload}, maxlen=self.opts.events_maxlen, approximate=True)
            if self.opts.publish_live:
                self.live.queue(pipe, self.keys.tracks_channel, payload)
        for ev in events:
            payload = encode_event(ev)
            pipe.xadd(self.keys.events, {FIELD: payload}, maxlen=self.opts.events_maxlen, approximate=True)
            if self.opts.publish_live:
                self.live.queue(pipe, self.keys.events_channel, payload)

    def _queue_acks(self, pipe: Any, done: Sequence[Classified]) -> None:
        by_stream: dict[str, list[str]] = {}
        for c in done:
            by_stream.setdefault(c.entry.stream, []).append(c.entry.id)
        for stream, ids in by_stream.items():
            pipe.xack(stream, self.group, *ids)

    def _event(self, msg: FacesMsg, index: int, face: FaceCrop, p: np.ndarray, now: float,
               track_id: int | None) -> EventMsg:
        best = int(np.argmax(p))
        classes = self.model.classes
        return EventMsg(event_id=event_id(msg.camera, msg.seq, index), camera=msg.camera, seq=msg.seq, face=index,
                        capture_ts=msg.capture_ts, publish_ts=now, box=face.box,
                        label=classes[best], score=float(p[best]), classes=classes,
                        probs=tuple(float(x) for x in p), model_version=self.model.version,
                        track_id=track_id, zones=face.zones)
