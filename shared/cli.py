"""The ``emotion-stream`` command: ``up``, ``events``, and the services by name."""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from shared.cameras import CameraRegistry, CameraSettings, SourcePolicyView
from shared.console import add_filter_args, make_filter, print_event
from shared.events import CLAIM_IDLE_MS, EventReader, TrackReader
from shared.masking import mask_text, restore_secrets
from shared.schema import EventMsg, TrackEventMsg
from shared.settings import ConfigError, RedisSettings, ServiceSettings, format_errors, load, mask_url
from shared.sources import SourceRefusedError
from shared.streams import TRANSIENT_ERRORS, Keys, connect
from shared.zones import geometry_errors, parse_points, parse_zone

SERVICES = ("ingest", "detect", "classify", "web", "mqtt")


def add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="the pipeline's YAML settings: its redis section (URL, password, username, TLS files, "
                        "cluster, prefix) is used; ES_REDIS__* variables override it, as for the services")
    p.add_argument("--redis-url", default=None,
                   help="overrides --config and the environment (default: ES_REDIS__URL, $REDIS_URL or "
                        "redis://127.0.0.1:6379/0)")
    p.add_argument("--prefix", default=None, help="key prefix of the pipeline (default: the config's, else es)")


def redis_settings(args: argparse.Namespace) -> RedisSettings:
    """The services' Redis settings (file + ES_REDIS__* + REDIS_URL), then this command's flags."""
    base = load(ServiceSettings, args.config).redis
    flags = {k: v for k, v in {"url": args.redis_url, "prefix": args.prefix}.items() if v is not None}
    try:
        return RedisSettings.model_validate({**base.model_dump(), **flags})
    except ValidationError as exc:
        raise ConfigError([line.replace("config error: ", "config error: redis.", 1)
                           for line in format_errors(exc)]) from None


def events_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="emotion-stream events", description="Print emotion events as they arrive.")
    add_redis_args(p)
    p.add_argument("--from", dest="start", default=None,
                   help="'now' (default), 'start' or a stream id to replay from; with --group: where a new group "
                        "starts, and an existing group is moved there")
    p.add_argument("--group", default=None, help="read through this consumer group (shared work, resumable; each "
                   "event is acked after it is printed)")
    p.add_argument("--consumer", default=None, help="consumer name in the group (default: unique per run, "
                   "HOST-PID-RANDOM); a restart under the same name first prints what it had read but not printed")
    p.add_argument("--claim-idle-ms", type=int, default=CLAIM_IDLE_MS,
                   help="with --group: take over events other consumers left pending this long (default: "
                        "%(default)s); longer than this consumer ever needs to print one read's events")
    p.add_argument("--count", type=int, default=0, help="exit after this many events (0 = run until Ctrl-C)")
    p.add_argument("--tracks", action="store_true",
                   help="print track events (started / changed / ended) instead of per-frame events")
    add_filter_args(p)
    args = p.parse_args(argv)
    if args.tracks and args.zone:
        print("error: --zone filters per-frame events; track events carry no zones", file=sys.stderr)
        return 2
    try:
        cfg = redis_settings(args)
    except ConfigError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 2
    options = {"keys": Keys(cfg.prefix), "start": args.start or "now", "filt": make_filter(args),
               "group": args.group, "consumer": args.consumer, "reposition": args.start is not None,
               "claim_idle_ms": args.claim_idle_ms}
    try:
        r = connect(cfg)
        reader: EventReader | TrackReader = TrackReader(r, **options) if args.tracks else EventReader(r, **options)
    except (ValueError, redis.RedisError) as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    return _print_loop(reader, args.json, args.count)


def _print_loop(reader: EventReader | TrackReader, as_json: bool, count: int) -> int:
    """Print until ``count`` events or Ctrl-C; Redis outages are waited out inside the reader.

    With a group, an entry is acked only after its event was printed (or filtered out): on
    ``--count`` or Ctrl-C the rest of the last read stays pending for this consumer's next run.
    """
    seen = 0
    try:
        while count <= 0 or seen < count:
            for item in reader.read_batch():
                if item.msg is not None and _wanted(reader, item.msg):
                    print_event(item.msg, as_json)
                    seen += 1
                reader.finish(item.id)
                if 0 < count <= seen:
                    break
    except KeyboardInterrupt:
        pass
    # If Redis is down, unacked entries stay pending and come again.
    with contextlib.suppress(*TRANSIENT_ERRORS):
        reader.ack()
    return 0


def _wanted(reader: EventReader | TrackReader, msg: EventMsg | TrackEventMsg) -> bool:
    if isinstance(msg, EventMsg):
        return reader.filt.matches(msg)
    return reader.filt.matches_track(msg)


class CamerasCommandSettings(ServiceSettings):
    """What ``emotion-stream cameras`` reads besides Redis: the source policy, from the ingest section."""

    ingest: SourcePolicyView = SourcePolicyView()


def cameras_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="emotion-stream cameras",
                                description="Manage the cameras of ingest replicas running with ingest.dynamic: true.")
    add_redis_args(p)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="cameras and their settings")
    sub.add_parser("status", help="per camera: owner, state, fps, last frame age, last error")
    add = sub.add_parser("add", help="add a camera")
    add.add_argument("id")
    add.add_argument("url")
    add.add_argument("--fps", type=float, default=10.0)
    add.add_argument("--loop", action=argparse.BooleanOptionalAction, default=False)
    add_geometry_args(add)
    update = sub.add_parser("update", help="change a camera: only the fields given")
    update.add_argument("id")
    update.add_argument("url", nargs="?", default=None)
    update.add_argument("--fps", type=float, default=None)
    update.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None)
    add_geometry_args(update)
    update.add_argument("--clear-mask", action="store_true", help="remove the camera's mask")
    update.add_argument("--clear-zones", action="store_true", help="remove the camera's zones")
    rm = sub.add_parser("remove", help="remove a camera")
    rm.add_argument("id")
    args = p.parse_args(argv)
    try:
        cfg = redis_settings(args)
        policy = load(CamerasCommandSettings, args.config).ingest.policy()
        registry = CameraRegistry(connect(cfg), cfg.prefix, policy)
        return _camera_action(registry, args)
    except ConfigError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 2
    except (ValueError, KeyError, redis.RedisError) as exc:
        print(f"error: {mask_text(str(exc))}", file=sys.stderr)
        return 2


def _camera_action(registry: CameraRegistry, args: argparse.Namespace) -> int:
    if args.action in ("add", "update"):
        current = registry.cameras()[0].get(args.id) if args.action == "update" else None
        if args.action == "update" and current is None:
            print(f"error: camera {args.id!r} does not exist", file=sys.stderr)
            return 2
        url = restore_secrets(args.url, current.url) if args.url and current else args.url
        given = {k: v for k, v in {"url": url, "fps": args.fps, "loop": args.loop}.items() if v is not None}
        try:
            given.update(geometry_given(args))
            cam = CameraSettings.model_validate({**(current.model_dump() if current else {}), "id": args.id, **given})
        except ValidationError as exc:
            print("\n".join(f"error: {line}" for line in geometry_errors(exc)), file=sys.stderr)
            return 2
        try:
            registry.put(cam, must_exist=args.action == "update")
        except SourceRefusedError as exc:
            print(f"error: url = {mask_url(cam.url)!r}: {exc}", file=sys.stderr)
            return 2
        print(f"camera {cam.id} {'added' if args.action == 'add' else 'updated'}")
        _warn_without_dynamic_ingest(registry)
    elif args.action == "remove":
        if not registry.remove(args.id):
            print(f"error: camera {args.id!r} does not exist", file=sys.stderr)
            return 2
        print(f"camera {args.id} removed")
    elif args.action == "list":
        cams, bad = registry.cameras()
        for cam in cams.values():
            zones = ",".join(z.name for z in cam.zones) or "-"
            print(f"{cam.id}\t{mask_url(cam.url)}\tfps={cam.fps:g}\tloop={cam.loop}\tmask={len(cam.mask)}\t"
                  f"zones={zones}")
        for line in bad:
            print(f"invalid: {line}", file=sys.stderr)
    else:
        _print_status(registry)
    return 0


def add_geometry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask", action="append", default=None, metavar="'X,Y X,Y X,Y ...'",
                   help="a polygon where faces are ignored (repeatable; replaces the camera's mask): pixels, or "
                        "fractions 0..1 of the frame")
    p.add_argument("--zone", action="append", default=None, metavar="'NAME=X,Y X,Y X,Y ...'",
                   help="a named zone (repeatable; replaces the camera's zones); events carry the zones of their face")


def geometry_given(args: argparse.Namespace) -> dict[str, object]:
    """The mask and zones the options set; a polygon that does not parse is refused by field name."""
    given: dict[str, object] = {}
    try:
        if args.mask is not None or getattr(args, "clear_mask", False):
            given["mask"] = [_parsed(f"mask[{i}]", parse_points, text) for i, text in enumerate(args.mask or [])]
        if args.zone is not None or getattr(args, "clear_zones", False):
            given["zones"] = [_parsed(f"zones[{i}]", parse_zone, text) for i, text in enumerate(args.zone or [])]
    except ValueError as exc:
        raise ConfigError([f"error: {exc}"]) from None
    return given


def _parsed(field: str, parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None


def _warn_without_dynamic_ingest(registry: CameraRegistry) -> None:
    if not registry.r.zcount(registry.replicas_key, time.time() - 30, "+inf"):
        print("warning: no ingest replica runs with ingest.dynamic: true; the change takes effect when one starts",
              file=sys.stderr)


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
  redis-acl write the Redis ACL file (a user per service) and each service's credentials
  keda      write the KEDA ScaledObjects (a detect trigger per camera) from a settings file
  ingest    run the ingest service     (same as python -m services.ingest)
  detect    run the detect service     (same as python -m services.detect)
  classify  run the classify service   (same as python -m services.classify)
  web       run the web view           (same as python -m services.web)
  mqtt      publish events to MQTT     (same as python -m services.mqtt)

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
    if command == "redis-acl":
        from shared.redis_acl import main as redis_acl_main

        return redis_acl_main(rest)
    if command == "keda":
        from shared.keda import keda_main

        return keda_main(rest)
    if command in SERVICES:
        return run_service(command, rest)
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
