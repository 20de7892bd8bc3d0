"""The retained per-camera state: how many faces are present and their dominant smoothed emotion.

Faces are counted by track. Track events set a track's emotion (the tracker's smoothed state)
and end it; a frame event refreshes its track (and introduces one this service has not seen
start, e.g. after a restart). A track that no message mentions for ``ttl_s`` stops counting,
so a lost ``ended`` cannot leave a face present for good. Frame events without a track id
(tracking switched off) do not change the state.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.schema import EventMsg, TrackEventMsg

NO_FACE = "none"
ENDED_MEMORY = 256  # per camera: ids of ended tracks, so a late frame event does not revive one


@dataclass
class Face:
    emotion: str
    confidence: float
    seen: float


@dataclass(frozen=True)
class Summary:
    emotion: str
    faces: int


@dataclass
class CameraState:
    faces: dict[int, Face] = field(default_factory=dict)
    ended: deque[int] = field(default_factory=lambda: deque(maxlen=ENDED_MEMORY))

    def summary(self) -> Summary:
        if not self.faces:
            return Summary(NO_FACE, 0)
        votes = Counter(f.emotion for f in self.faces.values())
        weight: dict[str, float] = {}
        for f in self.faces.values():
            weight[f.emotion] = weight.get(f.emotion, 0.0) + f.confidence
        # most faces first; a tie goes to the more confident emotion, then the name (stable)
        best = max(votes, key=lambda e: (votes[e], weight[e], e))
        return Summary(best, len(self.faces))


class Presence:
    """Faces present per camera, fed by frame and track events."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.cameras: dict[str, CameraState] = {}

    def track_event(self, te: TrackEventMsg) -> None:
        cam = self.cameras.setdefault(te.camera, CameraState())
        if te.kind == "ended":
            cam.faces.pop(te.track_id, None)
            cam.ended.append(te.track_id)
            return
        if te.track_id in cam.ended:
            if te.kind != "started":
                return
            cam.ended.remove(te.track_id)  # the same person back where they were: the id returns
        cam.faces[te.track_id] = Face(te.emotion, te.confidence, self.clock())

    def event(self, ev: EventMsg) -> None:
        if ev.track_id is None:
            return
        cam = self.cameras.setdefault(ev.camera, CameraState())
        if ev.track_id in cam.ended:
            return
        face = cam.faces.get(ev.track_id)
        if face is None:
            cam.faces[ev.track_id] = Face(ev.label, ev.score, self.clock())
        else:
            face.seen = self.clock()

    def expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        for cam in self.cameras.values():
            for tid in [t for t, f in cam.faces.items() if f.seen < cutoff]:
                del cam.faces[tid]

    def forget(self, camera: str) -> None:
        self.cameras.pop(camera, None)

    def summaries(self) -> dict[str, Summary]:
        return {cid: cam.summary() for cid, cam in self.cameras.items()}
