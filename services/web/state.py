"""What the page shows about faces: recent events and tracks per camera, kept in memory.

A :class:`Tail` thread follows the events and tracks streams (after a backfill of the last
``window_s``) and feeds :class:`LiveState`, which answers the page's questions: the faces of a
camera's newest classified frame, its emotion mix, a binned history for the plot, its tracks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.events import EventReader, TrackReader
from shared.health import Heartbeat
from shared.schema import EventMsg, TrackEventMsg
from shared.streams import CONNECTION_ERRORS, Backoff, Keys

log = logging.getLogger(__name__)


@dataclass
class Segment:
    """A stretch of one track during which its smoothed emotion stayed the same."""

    start: float
    emotion: str
    confidence: float


@dataclass
class TrackView:
    camera: str
    track_id: int
    started: float
    segments: list[Segment] = field(default_factory=list)
    ended: float | None = None

    @property
    def emotion(self) -> str:
        return self.segments[-1].emotion if self.segments else ""

    def to_dict(self, now: float) -> dict[str, Any]:
        end = self.ended if self.ended is not None else now
        spans = []
        for i, seg in enumerate(self.segments):
            stop = self.segments[i + 1].start if i + 1 < len(self.segments) else end
            spans.append({"start": seg.start, "end": stop, "emotion": seg.emotion,
                          "confidence": round(seg.confidence, 3)})
        return {"camera": self.camera, "track_id": self.track_id, "started": self.started, "ended": self.ended,
                "state": "ended" if self.ended is not None else "active", "emotion": self.emotion,
                "kinds": ["started"] + ["changed"] * (len(self.segments) - 1) + (["ended"] if self.ended else []),
                "segments": spans}


class LiveState:
    """Per-camera recent events and tracks; safe to use from several threads."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._events: dict[str, deque[EventMsg]] = {}
        self._tracks: dict[tuple[str, int], TrackView] = {}

    def add_events(self, events: Sequence[EventMsg]) -> None:
        with self._lock:
            for ev in events:
                self._events.setdefault(ev.camera, deque()).append(ev)
            self._prune()

    def add_tracks(self, track_events: Sequence[TrackEventMsg]) -> None:
        with self._lock:
            for te in track_events:
                self._apply_track(te)
            self._prune()

    def _apply_track(self, te: TrackEventMsg) -> None:
        key = (te.camera, te.track_id)
        view = self._tracks.get(key)
        if view is None:
            view = TrackView(te.camera, te.track_id, started=te.ts)
            self._tracks[key] = view
        if te.kind == "started" and view.ended is not None:
            view.ended = None  # the same person back where they were: the track goes on
        if te.kind == "started" or (te.kind == "changed" and view.emotion != te.emotion):
            view.segments.append(Segment(te.ts, te.emotion, te.confidence))
        elif te.kind == "ended":
            view.ended = te.ts
            if not view.segments:
                view.segments.append(Segment(view.started, te.emotion, te.confidence))

    def _prune(self) -> None:
        horizon = self.clock() - self.window_s
        for dq in self._events.values():
            while dq and dq[0].capture_ts < horizon:
                dq.popleft()
        for key in [k for k, t in self._tracks.items() if t.ended is not None and t.ended < horizon]:
            del self._tracks[key]

    def cameras(self) -> list[str]:
        with self._lock:
            return sorted(self._events)

    def latest_faces(self, camera: str) -> list[EventMsg]:
        """The events of the camera's newest classified frame."""
        with self._lock:
            dq = self._events.get(camera)
            if not dq:
                return []
            newest = dq[-1].seq
            return [ev for ev in reversed(dq) if ev.seq == newest][::-1]

    def track_emotion(self, camera: str, track_id: int | None) -> str | None:
        if track_id is None:
            return None
        with self._lock:
            view = self._tracks.get((camera, track_id))
            return view.emotion if view is not None and view.segments else None

    def mix(self, camera: str, seconds: float) -> dict[str, int]:
        """Faces per emotion over the last ``seconds``."""
        since = self.clock() - seconds
        with self._lock:
            return dict(Counter(ev.label for ev in self._events.get(camera, ()) if ev.capture_ts >= since))

    def history(self, camera: str, seconds: float, bin_s: float) -> list[dict[str, Any]]:
        """Faces per emotion in consecutive bins of ``bin_s`` covering the last ``seconds``, oldest first."""
        now = self.clock()
        nbins = max(1, int(seconds // bin_s))
        start = now - nbins * bin_s
        bins: list[Counter[str]] = [Counter() for _ in range(nbins)]
        with self._lock:
            for ev in self._events.get(camera, ()):
                i = int((ev.capture_ts - start) // bin_s)
                if 0 <= i < nbins:
                    bins[i][ev.label] += 1
        return [{"start": start + i * bin_s, "counts": dict(b)} for i, b in enumerate(bins)]

    def tracks(self, camera: str) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            views = sorted((t for t in self._tracks.values() if t.camera == camera),
                           key=lambda t: (t.ended is not None, -t.started))
            return [t.to_dict(now) for t in views]


class Tail(threading.Thread):
    """Follows the events and tracks streams into a :class:`LiveState` until stopped."""

    def __init__(self, r: Any, keys: Keys, state: LiveState, heartbeat: Heartbeat,
                 on_redis_error: Callable[[], None]) -> None:
        super().__init__(name="web-tail", daemon=True)
        self.state = state
        self.heartbeat = heartbeat
        self.on_redis_error = on_redis_error
        self.stop_event = threading.Event()
        since = f"{int((time.time() - state.window_s) * 1000)}-0"
        self.events = EventReader(r, keys=keys, start=since, block_ms=250)
        self.tracks = TrackReader(r, keys=keys, start=since, block_ms=250)
        self._backoff = Backoff(0.2, 5.0)

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.heartbeat.beat()
            try:
                self.state.add_tracks(self.tracks.poll())
                self.state.add_events(self.events.poll())
                self._backoff.reset()
            except CONNECTION_ERRORS as exc:
                self.on_redis_error()
                delay = self._backoff.next_delay()
                log.warning("events tail: Redis unavailable (%s); retrying in %.2fs", exc, delay)
                self.stop_event.wait(delay)

    def stop(self) -> None:
        self.stop_event.set()
