"""The ``emotion-stream`` command: ``up``, ``events``, and the services by name."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time
from collections.abc import Callable, Sequence

import redis
from pydantic import ValidationError

from shared.cameras import CameraRegistry, CameraSettings
from shared.events import EventFilter, EventReader, TrackReader
from shared.schema import EventMsg, TrackEventMsg
from shared.settings import RedisSettings, format_errors, mask_url
from shared.streams import Keys, connect

SERVICES = ("ingest", "detect", "classify")


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
    return (f"[{ev.camera} #{ev.seq} face {ev.face}{track}] Detected Emotion: {ev.label} ({ev.score:.2f}) "
            f"box {b.x},{b.y},{b.w}x{b.h} latency {latency:.0f} ms")


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


def make_filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(cameras=frozenset(args.camera), emotions=frozenset(args.emotion), min_score=args.min_score)


def events_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="emotion-stream events", description="Print emotion events as they arrive.")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="es", help="key prefix of the pipeline")
    p.add_argument("--from", dest="start", default="now", help="'now', 'start' or a stream id to replay from")
    p.add_argument("--group", default=None, help="read through this consumer group (shared work, resumable)")
    p.add_argument("--count", type=int, default=0, help="exit after this many events (0 = run until Ctrl-C)")
    p.add_argument("--tracks", action="store_true",
                   help="print track events (started / changed / ended) instead of per-frame events")
    add_filter_args(p)
    args = p.parse_args(argv)
    url = args.redis_url or redis_url_from_env() or "redis://127.0.0.1:6379/0"
    try:
        r = connect(RedisSettings(url=url))
        if args.tracks:
            tracks = TrackReader(r, keys=Keys(args.prefix), start=args.start, cameras=frozenset(args.camera))
            return _print_loop(tracks.poll, args.json, args.count)
        reader = EventReader(r, keys=Keys(args.prefix), start=args.start, filt=make_filter(args), group=args.group)
    except (ValueError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _print_loop(reader.poll, args.json, args.count)


def _print_loop(poll: Callable[[], Sequence[EventMsg | TrackEventMsg]], as_json: bool, count: int) -> int:
    seen = 0
    try:
        while count <= 0 or seen < count:
            for ev in poll():
                print_event(ev, as_json)
                seen += 1
                if 0 < count <= seen:
                    break
    except KeyboardInterrupt:
        pass
    except redis.ConnectionError as exc:
        print(f"error: Redis connection lost: {exc}", file=sys.stderr)
        return 1
    return 0


def cameras_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="emotion-stream cameras",
                                description="Manage the cameras of ingest replicas running with ingest.dynamic: true.")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL or redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="es", help="key prefix of the pipeline")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="cameras and their settings")
    sub.add_parser("status", help="per camera: owner, state, fps, last frame age, last error")
    for action in ("add", "update"):
        a = sub.add_parser(action, help=f"{action} a camera")
        a.add_argument("id")
        a.add_argument("url")
        a.add_argument("--fps", type=float, default=10.0)
        a.add_argument("--loop", action="store_true")
    rm = sub.add_parser("remove", help="remove a camera")
    rm.add_argument("id")
    args = p.parse_args(argv)
    url = args.redis_url or redis_url_from_env() or "redis://127.0.0.1:6379/0"
    try:
        registry = CameraRegistry(connect(RedisSettings(url=url)), args.prefix)
        return _camera_action(registry, args)
    except (ValueError, KeyError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _camera_action(registry: CameraRegistry, args: argparse.Namespace) -> int:
    if args.action in ("add", "update"):
        try:
            cam = CameraSettings(id=args.id, url=args.url, fps=args.fps, loop=args.loop)
        except ValidationError as exc:
            print("\n".join(format_errors(exc)), file=sys.stderr)
            return 2
        registry.put(cam, must_exist=args.action == "update")
        print(f"camera {cam.id} {'added' if args.action == 'add' else 'updated'}")
    elif args.action == "remove":
        if not registry.remove(args.id):
            print(f"error: camera {args.id!r} does not exist", file=sys.stderr)
            return 2
        print(f"camera {args.id} removed")
    elif args.action == "list":
        cams, bad = registry.cameras()
        for cam in cams.values():
            print(f"{cam.id}\t{mask_url(cam.url)}\tfps={cam.fps:g}\tloop={cam.loop}")
        for line in bad:
            print(f"invalid: {line}", file=sys.stderr)
    else:
        _print_status(registry)
    return 0


def _print_status(registry: CameraRegistry) -> None:
    cams, _ = registry.cameras()
    statuses = registry.statuses()
    print("camera\towner\tstate\tfps\tlast_frame_age_s\tlast_error")
    for cid in sorted(cams):
        st = statuses.get(cid)
        if st is None or time.time() - float(st.get("updated", 0)) > 30:
            print(f"{cid}\t-\tunassigned\t-\t-\t-")
            continue
        print(f"{cid}\t{st.get('owner')}\t{st.get('state')}\t{st.get('fps')}\t{st.get('last_frame_age_s')}\t"
              f"{st.get('last_error') or '-'}")


def run_service(name: str, argv: list[str]) -> int:
    sys.argv = [f"emotion-stream {name}", *argv]
    try:
        runpy.run_module(f"services.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


USAGE = """usage: emotion-stream COMMAND [ARGS]

commands:
  up        run the whole pipeline (embedded Redis unless REDIS_URL is set) and print events
  events    print emotion events (or, with --tracks, track events) from a running pipeline
  cameras   list / add / update / remove cameras and show their status (ingest.dynamic)
  ingest    run the ingest service     (same as python -m services.ingest)
  detect    run the detect service     (same as python -m services.detect)
  classify  run the classify service   (same as python -m services.classify)

Run 'emotion-stream COMMAND --help' for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        from shared.launcher import up_main

        return up_main(rest)
    if command == "events":
        return events_main(rest)
    if command == "cameras":
        return cameras_main(rest)
    if command in SERVICES:
        return run_service(command, rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
