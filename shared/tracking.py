"""Per-camera face tracks with a smoothed, hysteretic emotion state.

Faces are matched to tracks by IoU (greedy, best pairs first), falling back to centre
distance (and a similar size) for fast motion and for a face found again where it was lost; a
track survives ``max_gap_s`` without a match (and, where set, ``max_missed`` frames). Each
track that ended is remembered for ``return_s``: a face found again at the same place and size
takes its id back, with a new ``started`` event (a seated person who looked away is one id, and
the ``ended`` still comes ``max_gap_s`` after they were last seen). Each
track keeps an exponential moving average of the class probabilities, and its current
emotion changes only when another class leads the average by ``switch_margin`` for
``hold_frames`` consecutive frames. Track-level events: started, changed, ended.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.schema import Box
from shared.schema import TrackEventMsg as TrackEvent


class TrackerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="assign track ids and publish track events")
    iou_threshold: float = Field(0.3, gt=0, le=1, description="minimum IoU to continue a track")
    centre_distance: float = Field(1.0, ge=0, le=5, description="fallback: centre shift, in face widths, still a match")
    max_missed: int = Field(0, ge=0, le=1000,
                            description="frames with other faces a track survives without a detection "
                                        "(0 = no frame limit: max_gap_s alone ends it)")
    max_gap_s: float = Field(2.0, gt=0, le=3600,
                             description="a track not seen this long has ended; a face found again near where "
                                         "it was lost within this time keeps its track id")
    return_s: float = Field(10.0, ge=0, le=3600,
                            description="an ended track's id is given back to a face found at the same place and "
                                        "size within this time (a seated person who looked away); 0 = never")
    return_distance: float = Field(0.75, ge=0, le=5,
                                   description="a returning face's centre shift from where its track ended, in face "
                                               "widths")
    return_size_ratio: float = Field(1.4, ge=1.0, le=10.0,
                                     description="how much larger or smaller than its ended track a returning face "
                                                 "may be")
    size_ratio: float = Field(1.6, ge=1.0, le=10.0,
                              description="a face matched by centre distance alone is at most this much larger or "
                                          "smaller than the track's last box")
    ema_alpha: float = Field(0.3, gt=0, le=1, description="weight of the newest probabilities in the average")
    switch_margin: float = Field(0.1, ge=0, le=1, description="lead the new emotion needs over the current one")
    hold_frames: int = Field(3, ge=1, le=1000, description="frames the lead must hold before the state changes")


@dataclass(frozen=True)
class Detection:
    box: Box
    probs: np.ndarray


@dataclass
class Track:
    id: int
    box: Box
    smoothed: np.ndarray
    state: int
    started: float
    state_since: float
    last_seen: float
    missed: int = 0
    seen_at: float = field(default_factory=time.monotonic)  # local clock, for idle expiry
    candidate: int = -1
    candidate_frames: int = 0
    time_in: dict[int, float] = field(default_factory=dict)


def iou(a: Box, b: Box) -> float:
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def centre_shift(a: Box, b: Box) -> float:
    """Distance between centres, in units of the larger width."""
    dx = (a.x + a.w / 2) - (b.x + b.w / 2)
    dy = (a.y + a.h / 2) - (b.y + b.h / 2)
    return float(np.hypot(dx, dy)) / max(a.w, b.w, 1)


def size_ratio(a: Box, b: Box) -> float:
    """How much larger the larger box is (1.0 = the same width)."""
    return max(a.w, b.w) / max(1, min(a.w, b.w))


class CameraTracker:
    """Tracks of one camera; feed it every processed frame in capture order."""

    def __init__(self, camera: str, classes: Sequence[str], cfg: TrackerSettings, first_id: int = 1) -> None:
        self.camera = camera
        self.classes = tuple(classes)
        self.cfg = cfg
        self.tracks: list[Track] = []
        self.ended: list[Track] = []  # for return_s: ids that a face back at the same place takes again
        self._next_id = first_id
        self.last_ts = 0.0

    def update(self, ts: float, detections: Sequence[Detection]) -> tuple[list[int | None], list[TrackEvent]]:
        """Track id for each detection (same order), and the track events this frame caused.

        A frame older than the newest one seen (delivered late, e.g. re-processed after a worker
        crash) does not move any track: durations would run backwards. Its faces get the id of
        the track they overlap, or None, and cause no events.
        """
        if ts < self.last_ts:
            pairs = self._match(detections)
            return [pairs[i].id if i in pairs else None for i in range(len(detections))], []
        events: list[TrackEvent] = []
        self._advance(ts)
        pairs = self._match(detections)
        ids: list[int | None] = [None] * len(detections)
        matched_tracks = set()
        for det_index, track in pairs.items():
            ids[det_index] = track.id
            matched_tracks.add(track.id)
            events.extend(self._observe(track, detections[det_index], ts))
        returning = self._returning(detections, pairs, ts)
        for det_index, det in enumerate(detections):
            if det_index not in pairs:
                track = self._start(det, ts, returning.get(det_index))
                ids[det_index] = track.id
                matched_tracks.add(track.id)
                events.append(self._event("started", track, ts))
        for track in self.tracks:
            if track.id not in matched_tracks:
                track.missed += 1
        events.extend(self._expire(ts))
        return ids, events

    def expire_idle(self, now: float | None = None) -> list[TrackEvent]:
        """End tracks that got no detection for ``max_gap_s`` of local time (``time.monotonic``).

        Frames without faces never reach the tracker, so time, not frames, must end those tracks;
        the local clock is used because capture times lag by the pipeline's latency.
        """
        now = time.monotonic() if now is None else now
        done = [t for t in self.tracks if now - t.seen_at > self.cfg.max_gap_s]
        self.tracks = [t for t in self.tracks if t not in done]
        self._remember(done)
        return [self._ended(t, t.last_seen) for t in done]

    def flush(self) -> list[TrackEvent]:
        """End every track (camera removed or shutting down)."""
        events = [self._ended(t, t.last_seen) for t in self.tracks]
        self.tracks, self.ended = [], []
        return events

    def _advance(self, ts: float) -> None:
        self.last_ts = max(self.last_ts, ts)

    def _match(self, detections: Sequence[Detection]) -> dict[int, Track]:
        candidates = []
        for di, det in enumerate(detections):
            for track in self.tracks:
                overlap = iou(det.box, track.box)
                if overlap >= self.cfg.iou_threshold:
                    candidates.append((overlap, di, track))
                elif (centre_shift(det.box, track.box) <= self.cfg.centre_distance
                      and size_ratio(det.box, track.box) <= self.cfg.size_ratio):
                    candidates.append((overlap - 1.0, di, track))  # ranks after every IoU match
        candidates.sort(key=lambda c: -c[0])
        pairs: dict[int, Track] = {}
        used: set[int] = set()
        for _, di, track in candidates:
            if di in pairs or track.id in used:
                continue
            pairs[di] = track
            used.add(track.id)
        return pairs

    def _returning(self, detections: Sequence[Detection], pairs: dict[int, Track], ts: float) -> dict[int, int]:
        """Ended tracks' ids taken back by unmatched faces at the same place and size (closest first)."""
        self.ended = [t for t in self.ended if ts - t.last_seen <= self.cfg.return_s]
        candidates = sorted(
            (centre_shift(det.box, t.box), di, t.id) for di, det in enumerate(detections) if di not in pairs
            for t in self.ended
            if centre_shift(det.box, t.box) <= self.cfg.return_distance
            and size_ratio(det.box, t.box) <= self.cfg.return_size_ratio)
        back: dict[int, int] = {}
        for _, di, tid in candidates:
            if di not in back and tid not in back.values():
                back[di] = tid
        self.ended = [t for t in self.ended if t.id not in back.values()]
        return back

    def _remember(self, done: Sequence[Track]) -> None:
        if self.cfg.return_s > 0:
            self.ended.extend(done)

    def _start(self, det: Detection, ts: float, track_id: int | None = None) -> Track:
        probs = np.asarray(det.probs, dtype=np.float64)
        state = int(np.argmax(probs))
        if track_id is None:
            track_id = self._next_id
            self._next_id += 1
        track = Track(id=track_id, box=det.box, smoothed=probs.copy(), state=state, started=ts,
                      state_since=ts, last_seen=ts)
        self.tracks.append(track)
        return track

    def _observe(self, track: Track, det: Detection, ts: float) -> list[TrackEvent]:
        a = self.cfg.ema_alpha
        track.smoothed = (1 - a) * track.smoothed + a * np.asarray(det.probs, dtype=np.float64)
        track.box, track.last_seen, track.missed, track.seen_at = det.box, ts, 0, time.monotonic()
        leader = int(np.argmax(track.smoothed))
        lead = track.smoothed[leader] - track.smoothed[track.state]
        if leader == track.state or lead < self.cfg.switch_margin:
            track.candidate, track.candidate_frames = -1, 0
            return []
        if leader != track.candidate:
            track.candidate, track.candidate_frames = leader, 0
        track.candidate_frames += 1
        if track.candidate_frames < self.cfg.hold_frames:
            return []
        previous, since = track.state, track.state_since
        track.time_in[previous] = track.time_in.get(previous, 0.0) + (ts - since)
        track.state, track.state_since = leader, ts
        track.candidate, track.candidate_frames = -1, 0
        return [self._event("changed", track, ts, previous=self.classes[previous],
                            previous_duration_s=round(ts - since, 3))]

    def _expire(self, ts: float) -> list[TrackEvent]:
        too_many = self.cfg.max_missed > 0
        done = [t for t in self.tracks
                if (too_many and t.missed > self.cfg.max_missed) or ts - t.last_seen > self.cfg.max_gap_s]
        self.tracks = [t for t in self.tracks if t not in done]
        self._remember(done)
        return [self._ended(t, ts) for t in done]

    def _ended(self, track: Track, ts: float) -> TrackEvent:
        """Durations count up to the last frame the face was seen in."""
        end = track.last_seen
        track.time_in[track.state] = track.time_in.get(track.state, 0.0) + max(0.0, end - track.state_since)
        per = {self.classes[k]: round(v, 3) for k, v in sorted(track.time_in.items()) if v > 0}
        return self._event("ended", track, ts, duration_s=round(end - track.started, 3), time_per_emotion_s=per)

    def _event(self, kind: str, track: Track, ts: float, **extra: Any) -> TrackEvent:
        return TrackEvent(kind=kind, camera=self.camera, track_id=track.id, ts=ts, emotion=self.classes[track.state],
                          confidence=round(float(track.smoothed[track.state]), 4), **extra)


def label_changes(labels: Sequence[str]) -> int:
    """How often a label sequence switches (flicker measure)."""
    return sum(1 for a, b in itertools.pairwise(labels) if a != b)
