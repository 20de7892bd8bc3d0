"""Console output and event-filter options shared by ``emotion-stream events`` and ``emotion-stream up``.

Both commands import from here (and not from each other), so neither module imports the other.
"""

from __future__ import annotations

import argparse
import json
import os

from shared.events import EventFilter
from shared.schema import EventMsg, TrackEventMsg


def format_track(te: TrackEventMsg) -> str:
    if te.kind == "changed":
        what = f"{te.previous} -> {te.emotion} ({te.confidence:.2f}) after {te.previous_duration_s:.1f}s"
    elif te.kind == "ended":
        mix = ", ".join(f"{k} {v:.1f}s" for k, v in (te.time_per_emotion_s or {}).items())
        what = f"after {te.duration_s:.1f}s ({mix})"
    else:
        what = f"{te.emotion} ({te.confidence:.2f})"
    return f"[{te.camera} track {te.track_id}] {te.kind} {what}"


def format_event(ev: EventMsg) -> str:
    b = ev.box
    latency = (ev.publish_ts - ev.capture_ts) * 1000
    track = f" track {ev.track_id}" if ev.track_id is not None else ""
    zones = f" zones {','.join(ev.zones)}" if ev.zones else ""
    return (f"[{ev.camera} #{ev.seq} face {ev.face}{track}] Detected Emotion: {ev.label} ({ev.score:.2f}) "
            f"box {b.x},{b.y},{b.w}x{b.h}{zones} latency {latency:.0f} ms")


def print_event(ev: EventMsg | TrackEventMsg, as_json: bool) -> None:
    if as_json:
        print(json.dumps(ev.to_dict()), flush=True)
    else:
        print(format_event(ev) if isinstance(ev, EventMsg) else format_track(ev), flush=True)


def redis_url_from_env() -> str | None:
    return os.environ.get("ES_REDIS__URL") or os.environ.get("REDIS_URL")


def add_filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.add_argument("--camera", action="append", default=[], help="only this camera (repeatable)")
    p.add_argument("--emotion", action="append", default=[], help="only this emotion (repeatable)")
    p.add_argument("--min-score", type=float, default=0.0, help="only events with at least this score")
    p.add_argument("--zone", action="append", default=[],
                   help="only events whose face is in this zone of its camera (repeatable; 'none': in no zone)")


def make_filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(cameras=frozenset(args.camera), emotions=frozenset(args.emotion), min_score=args.min_score,
                       zones=frozenset(getattr(args, "zone", ())))
