"""The default camera detector: search where the scene moves, follow the faces already found.

Each frame of a camera:

1. motion of the view (:class:`~shared.motion.MotionAnalyzer`): what changed since the previous
   frame, what differs from the learnt background, a scene cut, a moving camera;
2. every face already found is carried to this frame: kept where nothing changed over it,
   else followed by its look (:mod:`shared.detection.appearance`); the detector confirms it
   around its box at least every ``still_recheck_s`` (still) or ``follow_confirm_s`` (moving),
   and on every frame where its look is lost. A face stays while the detector or its look holds
   it, and is dropped when both lose it, when it leaves the frame, or when the detector has not
   found it for ``max_unconfirmed_s`` (so no box outlives its face by more than that);
3. a face just lost is searched for around where it was on every frame for ``forget_after_s``;
4. new faces are searched where the scene changed, less the change that a followed face's own
   head explains, and now and then where the picture differs from the background (people
   standing still); the whole frame is searched on a camera's first frame, on a scene cut, at
   most every ``camera_search_s`` while the camera moves, when the regions would cover most of
   the frame anyway, and every ``full_search_s`` as a safety net. While frames reach detection
   ``behind_s`` late or later, the safety net and the background search wait ``behind_search_s``:
   rarer searches lose less than the frames a worker that cannot keep up would drop.

A still scene with still faces costs one small resize, two differences and, now and then, a
search around each face.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from shared.detection.appearance import Look, follow, look_of
from shared.detection.base import FOLLOW_SIDE, Detector, DetectorSettings, GateReport, overlap, search_around
from shared.imaging import UInt8Array
from shared.motion import Motion, MotionAnalyzer, area, grow, merge
from shared.schema import Box

# A known face the shrunk search misses is looked for at full resolution on this many frames
# after it was last found (a face too faint for one frame often is for the next as well).
FULL_RETRY_FRAMES = 2

# A change counts as a known person moving when at least this share of it lies in their zone:
# the face grown by this many face sides, and their body below it (this many face sides down).
EXPLAINED_SHARE = 0.7
EXPLAINED_MARGIN = 0.45
EXPLAINED_BODY = 0.0

# Phases of cameras' periodic searches are multiples of the golden ratio's fraction.
GOLDEN = 0.6180339887

# Two faces overlapping this much (intersection over the smaller) are one face.
SAME_FACE = 0.5
# A hit overlapping a known face with at least this share of its width is that face; a smaller
# one inside it is a part of it (when the search saw only part of the face) or another face.
PART_OF_FACE = 0.6


@dataclass
class _Face:
    box: Box
    confirmed: float  # when the detector last found it
    seen: float  # when it was last on a frame (found, followed or kept)
    look: Look | None
    present: bool = True  # on the previous frame (else: lost, searched for where it was)
    misses: int = 0  # frames since the detector last found it


@dataclass
class _GateState:
    motion: MotionAnalyzer
    faces: list[_Face] = field(default_factory=list)
    last_full: float = float("-inf")
    last_foreground: float = float("-inf")
    last_frame: float = float("-inf")
    phase: float = 0.0  # of the camera's periodic searches, as a fraction of their interval


class GatedDetector:
    """Faces searched where the scene moves, followed once found (see the module's docstring)."""

    def __init__(self, base: Detector, cfg: DetectorSettings) -> None:
        self.base = base
        self.cfg = cfg
        self.motion_cfg = cfg.motion
        self._cameras: dict[str, _GateState] = {}
        self._met = 0  # cameras seen so far
        self.last: GateReport | None = GateReport(None, 0.0, 0.0, False)

    def detect(self, gray: UInt8Array, camera: str = "", ts: float | None = None, lag_s: float = 0.0) -> list[Box]:
        now = time.monotonic() if ts is None else ts
        state = self._cameras.get(camera)
        if state is None:
            # 0, .62, .24, .85, .47, ...: phases that stay spread out however many cameras come
            phase = self._met * GOLDEN % 1.0
            self._met += 1
            state = self._cameras[camera] = _GateState(MotionAnalyzer(self.motion_cfg), phase=phase)
        motion = state.motion.update(gray)
        self._move_with_view(state, motion)
        h, w = gray.shape[:2]
        behind = bool(self.motion_cfg.behind_s) and lag_s >= self.motion_cfg.behind_s
        reason, relieved = self._full_reason(state, motion, now, w, behind)
        regions: list[Box] = []
        if reason is None:
            regions = self._regions(state, motion, now, w, h, behind)
            if area(regions) > self.motion_cfg.max_region_fraction * w * h:
                # Most of the view changes (a zoom, a crowd): the whole frame is searched, at
                # most every camera_search_s (as for a moving camera); in between the known
                # faces are followed and new ones wait for that search.
                regions = []
                if now - state.last_full >= self.motion_cfg.camera_search_s:
                    reason = "large_motion"
            elif self._planned(state, regions, now) >= w * h:
                regions, reason = [], "crowded"  # piece by piece would cost more than the whole frame
        searched = self._carry(gray, state, motion, now, confirm=reason is None)
        searched += self._search_regions(gray, state, regions, now)
        if reason is not None:
            self._add_hits(gray, state, self.base.detect(gray), now)
            searched += w * h
            state.last_full = state.last_foreground = now
            if reason == "first":
                self._stagger(state)
        self._forget_old(state, now)
        state.last_frame = now
        self.last = GateReport(reason, min(1.0, searched / max(1, w * h)), motion.fraction,
                               skipped=reason is None and searched == 0, relieved=relieved and reason is None)
        return [f.box for f in state.faces if f.present]

    def forget(self, camera: str) -> None:
        """Drop a camera's state (another worker took it over, or it was removed)."""
        self._cameras.pop(camera, None)

    def _stagger(self, state: _GateState) -> None:
        """Cameras started together would run their safety-net and background searches on the same
        frames, second after second: a burst that every camera's frames queue behind. Each camera
        gets its own phase within the interval (from its name, so any worker gives it the same)."""
        state.last_full -= state.phase * self.motion_cfg.full_search_s
        state.last_foreground -= state.phase * self.motion_cfg.foreground_recheck_s

    def _planned(self, state: _GateState, regions: list[Box], now: float) -> int:
        """Pixels this frame would run through the detector without a whole-frame search."""
        cfg = self.motion_cfg
        planned = area(regions)
        for face in state.faces:
            if not face.present or now - face.confirmed >= min(cfg.follow_confirm_s, cfg.still_recheck_s):
                roi = _around(face.box, self.cfg.roi_expand)
                # searched on a copy shrunk so the face is FOLLOW_SIDE pixels wide
                shrink = min(1.0, FOLLOW_SIDE / max(face.box.w, face.box.h, 1))
                planned += round(roi.w * roi.h * shrink * shrink)
        return planned

    @staticmethod
    def _move_with_view(state: _GateState, motion: Motion) -> None:
        if motion.kind == "cut":  # another view: whoever was there is gone
            state.faces = []
        elif motion.kind == "camera":  # known faces move with the view
            dx, dy = round(motion.shift[0]), round(motion.shift[1])
            for face in state.faces:
                face.box = Box(face.box.x + dx, face.box.y + dy, face.box.w, face.box.h)

    def _full_reason(self, state: _GateState, motion: Motion, now: float, width: int,
                     behind: bool) -> tuple[str | None, bool]:
        """Why the whole frame is searched (None: it is not), and whether the safety net was due
        but put off because detect is behind."""
        cfg = self.motion_cfg
        if motion.kind == "first":
            return "first", False
        if width <= cfg.width:
            # The motion copy is no smaller than the frame itself: gating costs about what a
            # whole-frame search does, and Haar's flicker on tiny faces is only caught by looking
            # on every frame.
            return "small_frame", False
        if motion.kind == "cut":
            return "scene_change", False
        if motion.kind == "camera" and now - state.last_full >= cfg.camera_search_s:
            return "camera_motion", False
        due = bool(cfg.full_search_s) and now - state.last_full >= cfg.full_search_s
        if due and behind and now - state.last_full < cfg.behind_search_s:
            # A worker that cannot keep up drops whole frames as stale: the safety net, a large
            # share of a busy camera's detector time, waits longer instead.
            return None, True
        return ("interval", False) if due else (None, False)

    # Known faces -----------------------------------------------------------------------------

    def _carry(self, gray: UInt8Array, state: _GateState, motion: Motion, now: float, confirm: bool) -> int:
        """Every known face carried to this frame (kept, followed, confirmed, or lost); returns
        the pixels run through the detector. Without ``confirm`` (a whole-frame search follows)
        no face is searched for here: the whole-frame search confirms them."""
        searched = 0
        for face in state.faces:
            if face.present:
                searched += self._carry_present(gray, state, face, motion, now, confirm)
            elif confirm:
                searched += self._look_for_lost(gray, face, now)
        self._merge_duplicates(state)
        return searched

    def _carry_present(self, gray: UInt8Array, state: _GateState, face: _Face, motion: Motion,
                       now: float, confirm: bool) -> int:
        cfg = self.motion_cfg
        still = self._still(face, state, motion)
        holds = still
        if not still and face.look is not None:
            moved = follow(gray, face.box, face.look, self.cfg.roi_expand)
            if moved is not None and moved.score >= cfg.follow_min_score:
                face.box, holds = moved.box, True
        interval = cfg.still_recheck_s if still else cfg.follow_confirm_s
        searched = 0
        if confirm and (not holds or now - face.confirmed >= interval):
            hit, searched = self._search_near(gray, face)
            if hit is not None:
                self._confirm(gray, face, hit, now)
                return searched
            face.misses += 1
        if holds and now - face.confirmed <= cfg.max_unconfirmed_s and self._inside(face.box, gray):
            face.seen = now
        else:
            face.present = False
        return searched

    def _search_near(self, gray: UInt8Array, face: _Face) -> tuple[Box | None, int]:
        hit, searched = search_around(self.base, gray, face.box, self.cfg.roi_expand)
        if hit is None and face.misses < FULL_RETRY_FRAMES:
            # Found a moment ago: a face partly hidden by someone passing, or turning, can be
            # too faint for the shrunk search; look once more at full resolution.
            hit, more = search_around(self.base, gray, face.box, self.cfg.roi_expand, at_scale=False)
            searched += more
        return hit, searched

    def _look_for_lost(self, gray: UInt8Array, face: _Face, now: float) -> int:
        hit, searched = self._search_near(gray, face)
        if hit is not None:
            self._confirm(gray, face, hit, now)
        else:
            face.misses += 1
        return searched

    @staticmethod
    def _confirm(gray: UInt8Array, face: _Face, hit: Box, now: float) -> None:
        face.box, face.confirmed, face.seen, face.present, face.misses = hit, now, now, True, 0
        face.look = look_of(gray, hit) or face.look

    def _still(self, face: _Face, state: _GateState, motion: Motion) -> bool:
        """On the previous frame, and nothing changed over it since."""
        if face.seen < state.last_frame or motion.kind != "local":
            return False
        around = grow(face.box, round(max(face.box.w, face.box.h) * 0.25), 1, 1 << 30, 1 << 30)
        return all(overlap(around, b) == 0 for b in motion.boxes)

    @staticmethod
    def _inside(box: Box, gray: UInt8Array) -> bool:
        """At least half the face is inside the frame (else it has left)."""
        h, w = gray.shape[:2]
        ix = max(0, min(box.x + box.w, w) - max(box.x, 0))
        iy = max(0, min(box.y + box.h, h) - max(box.y, 0))
        return 2 * ix * iy >= box.w * box.h

    @staticmethod
    def _merge_duplicates(state: _GateState) -> None:
        """Two followed faces that drifted onto one: the one confirmed last stays."""
        kept: list[_Face] = []
        for face in sorted(state.faces, key=lambda f: (not f.present, -f.confirmed)):
            if not any(overlap(face.box, k.box) >= SAME_FACE and _similar(face.box, k.box)
                       for k in kept if k.present or not face.present):
                kept.append(face)
        state.faces = kept

    def _forget_old(self, state: _GateState, now: float) -> None:
        state.faces = [f for f in state.faces if f.present or now - f.seen < self.motion_cfg.forget_after_s]

    # New faces -------------------------------------------------------------------------------

    def _add_hits(self, gray: UInt8Array, state: _GateState, hits: list[Box], now: float,
                  window: Box | None = None) -> None:
        """Detector hits in ``window`` (None: the whole frame): each confirms the known face it
        overlaps, or is a new face."""
        for hit in sorted(hits, key=lambda b: -b.w):
            same = [f for f in state.faces if overlap(hit, f.box) >= SAME_FACE]
            if not same:
                state.faces.append(_Face(hit, now, now, look_of(gray, hit)))
                continue
            face = max(same, key=lambda f: (f.present, f.confirmed))
            if hit.w >= PART_OF_FACE * face.box.w or now - face.confirmed > self.motion_cfg.max_unconfirmed_s:
                self._confirm(gray, face, hit, now)
            elif window is None or _encloses(window, face.box):
                # Haar saw the large box and kept this one apart: another face in front of or
                # inside a large (often false) box, as whole-frame search reports them
                state.faces.append(_Face(hit, now, now, look_of(gray, hit)))
            # else: a region holding only part of a large face: Haar fires on its parts (the
            # eyes and nose, the mouth); that is the face found lately, not a new one

    def _regions(self, state: _GateState, motion: Motion, now: float, w: int, h: int, behind: bool) -> list[Box]:
        """What changed (and now and then what differs from the background), less what a face
        followed on this frame explains (that person's own head and body), grown and merged."""
        side = self.cfg.min_size
        pad = round(side * self.motion_cfg.region_margin)
        changes = motion.boxes
        recheck = self.motion_cfg.foreground_recheck_s
        if behind:
            recheck = max(recheck, self.motion_cfg.behind_search_s)
        if now - state.last_foreground >= recheck:
            state.last_foreground = now
            changes = changes + motion.foreground
        found = [f.box for f in state.faces if f.present]
        lost = [f.box for f in state.faces if not f.present]
        return merge([self._grow(b, pad, w, h) for b in changes if not _explained(b, found, lost, self.cfg)])

    def _grow(self, box: Box, pad: int, w: int, h: int) -> Box:
        # A large change may be part of a larger face (a new face where another was differs
        # only in places): the margin grows with the change's narrow side (a tall change is a
        # walking body, not a taller face).
        extra = round(min(box.w, box.h) * 0.25)
        return grow(box, pad + extra, round(self.cfg.min_size * 1.5), w, h)

    def _search_regions(self, gray: UInt8Array, state: _GateState, regions: list[Box], now: float) -> int:
        """New faces inside the regions; returns the pixels searched."""
        searched = 0
        for region in regions:
            roi = np.ascontiguousarray(gray[region.y:region.y + region.h, region.x:region.x + region.w])
            searched += region.w * region.h
            hits = [Box(b.x + region.x, b.y + region.y, b.w, b.h) for b in self.base.detect(roi)]
            self._add_hits(gray, state, hits, now, window=region)
        return searched


def _explained(change: Box, found: list[Box], lost: list[Box], cfg: DetectorSettings) -> bool:
    """A change mostly inside the zone of a face followed on this frame (around it, and its body
    below it) is that person moving; one touching a face that was just lost is not (whoever it
    was may have moved on: search there)."""
    if any(overlap(change, _around(k, cfg.roi_expand)) > 0 for k in lost):
        return False
    inside = 0
    for face in found:
        zone = _around(face, EXPLAINED_MARGIN)
        zone = Box(zone.x, zone.y, zone.w, zone.h + round(face.h * EXPLAINED_BODY))
        inside = max(inside, _intersection(change, zone))
    return inside >= EXPLAINED_SHARE * change.w * change.h


def _similar(a: Box, b: Box) -> bool:
    """Sizes close enough for two overlapping boxes to be one face."""
    return min(a.w, b.w) >= PART_OF_FACE * max(a.w, b.w)


def _encloses(outer: Box, inner: Box) -> bool:
    return (outer.x <= inner.x and outer.y <= inner.y and inner.x + inner.w <= outer.x + outer.w
            and inner.y + inner.h <= outer.y + outer.h)


def _around(box: Box, expand: float) -> Box:
    pad = int(max(box.w, box.h) * expand)
    return Box(box.x - pad, box.y - pad, box.w + 2 * pad, box.h + 2 * pad)


def _intersection(a: Box, b: Box) -> int:
    x1, y1 = max(a.x, b.x), max(a.y, b.y)
    x2, y2 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    return max(0, x2 - x1) * max(0, y2 - y1)
