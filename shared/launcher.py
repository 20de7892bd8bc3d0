"""``emotion-stream up``: start ingest, detect and classify as processes and print their events."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import yaml
from pydantic import ValidationError

from shared.console import add_filter_args, make_filter, print_event, redis_url_from_env
from shared.embedded_redis import EmbeddedRedis, free_port
from shared.events import EventReader
from shared.masking import install_log_masking, mask_text
from shared.settings import ConfigError, RedisSettings, ServiceSettings, format_errors, load, mask_url, read_yaml
from shared.sources import file_path, source_kind
from shared.streams import TRANSIENT_ERRORS, Keys, connect, group_stats

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="emotion-stream up",
        description="Run the pipeline on one or more inputs and print emotion events. Without --input, "
                    "a sample video with a real face is used. Without REDIS_URL, an embedded Redis is started.")
    p.add_argument("--input", "-i", action="append", default=[],
                   help="video file, rtsp:// or http(s):// MJPEG URL, or device index (repeatable: one camera each)")
    p.add_argument("--fps", type=float, default=10.0, help="target frames/s per camera")
    p.add_argument("--loop", action="store_true", help="loop file inputs (then only Ctrl-C stops)")
    p.add_argument("--detect-workers", type=int, default=1, help="detect processes in the pool")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="pipeline settings (YAML, as for the services): its cameras unless --input is given, and "
                        "every other section; the flags below override it")
    p.add_argument("--runtime", choices=["auto", "litert", "litert-int8", "tensorflow"], default=None,
                   help="inference runtime (default: the config's, else auto)")
    p.add_argument("--model", default=None, help="model bundle folder (default: the shipped model)")
    p.add_argument("--logs", default=None, help="folder for the services' logs (default: a temporary one)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0 = no limit)")
    p.add_argument("--web-port", type=int, default=8080,
                   help="port of the web view on 127.0.0.1 (a free one when taken; 0 = any free port)")
    p.add_argument("--no-web", action="store_true", help="do not start the web view")
    p.add_argument("--mqtt-url", default=None,
                   help="also publish events to this MQTT broker: mqtt://[user:password@]host:port (or mqtts://); "
                        "the config's mqtt.url does the same")
    add_filter_args(p)
    return p.parse_args(argv)


@dataclass
class Stats:
    events: int = 0
    latencies: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, latency_s: float) -> None:
        self.events += 1
        self.latencies.append(latency_s)

    def summary(self) -> str:
        elapsed = time.monotonic() - self.started
        if not self.latencies:
            return f"{self.events} events in {elapsed:.1f}s"
        lat = sorted(self.latencies)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
        return (f"{self.events} events in {elapsed:.1f}s ({self.events / elapsed:.1f}/s); capture->event latency "
                f"median {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")


class Pipeline:
    """The three services as child processes sharing one config file."""

    def __init__(self, url: str, config: dict[str, Any], workdir: Path, detect_workers: int) -> None:
        self.url = url
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.mqtt: dict[str, Any] = config.get("mqtt") or {}
        self.detect_workers = detect_workers
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def start(self, timeout: float = 120.0, outputs_started: Callable[[], bool] | None = None) -> None:
        """Workers first; ingest once they answer /readyz, so no frame ages while they load.

        The outputs (MQTT) need only have created their consumer groups (``outputs_started``),
        so that they miss no event: a broker that does not answer yet holds up nothing, the
        events wait in Redis for it.
        """
        workers = ["classify"] + [f"detect-{i}" for i in range(self.detect_workers)]
        for name in workers + self.outputs():
            self._spawn(name)
        deadline = time.monotonic() + timeout
        while not all(_ready(self.ports[n]) for n in workers) or (
                self.outputs() and outputs_started is not None and not _quietly(outputs_started)):
            if self.failed() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self._spawn("ingest")

    def outputs(self) -> list[str]:
        """Consumers of the events besides this command: the MQTT service when a broker is set."""
        return ["mqtt"] if self.mqtt.get("url") else []

    def start_web(self, port: int) -> str:
        """The web view, shown the other services' metrics; returns its address."""
        endpoints = [{"name": n, "url": f"http://127.0.0.1:{p}/metrics"} for n, p in self.ports.items()]
        self._spawn("web", {"ES_WEB__HOST": "127.0.0.1", "ES_WEB__PORT": str(port),
                            "ES_WEB__SERVICES": json.dumps(endpoints)})
        return f"http://127.0.0.1:{port}/"

    def _spawn(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "ES_REDIS__URL": self.url, "ES_CONSUMER": name, **(extra_env or {})}
        env.pop("REDIS_URL", None)
        self.ports[name] = free_port()
        env["ES_METRICS__PORT"] = str(self.ports[name])
        log_file = (self.workdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name.split('-')[0]}", "--config", str(self.config_path)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )

    def failed(self) -> str | None:
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and (code != 0 or name != "ingest"):
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                return f"{name} exited with code {code}; last log lines:\n{tail}"
        return None

    def ingest_done(self) -> bool:
        return "ingest" in self.procs and self.procs["ingest"].poll() == 0

    def stop(self, timeout: float = 15.0, outputs_caught_up: Callable[[], bool] | None = None) -> None:
        """The pipeline first, then the outputs (MQTT) once they published what it wrote last:
        classify ends its open tracks on the way out, and those events should reach the broker."""
        outputs = set(self.outputs())
        _terminate([p for n, p in self.procs.items() if n not in outputs], timeout)
        if outputs and outputs_caught_up is not None:
            deadline = time.monotonic() + OUTPUT_CATCH_UP_S
            while time.monotonic() < deadline and not _quietly(outputs_caught_up):
                time.sleep(0.1)
        _terminate([p for n, p in self.procs.items() if n in outputs], timeout)


# How long ``up`` waits, at the end, for the MQTT service to publish the last events.
OUTPUT_CATCH_UP_S = 10.0


def _terminate(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _quietly(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except TRANSIENT_ERRORS:
        return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def drained(r: redis.Redis, keys: Keys, cameras: list[str], outputs: tuple[tuple[str, str], ...] = ()) -> bool:
    """True when every frame and face entry (and of ``outputs``, (stream, group) pairs) has been
    delivered and acked."""
    checks = [(keys.frames(c), "detect") for c in cameras] + [(keys.faces, "classify"), *outputs]
    for stream, group in checks:
        if not r.exists(stream):
            continue
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in r.xinfo_groups(stream)}
        info = groups.get(group)
        if info is None or int(info["pending"]) > 0:
            return False
        last = r.xinfo_stream(stream)["last-generated-id"]
        delivered = info["last-delivered-id"]
        if _as_str(delivered) != _as_str(last):
            return False
    return True


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_inputs(inputs: list[str]) -> str | None:
    for url in inputs:
        try:
            kind = source_kind(url)
        except ValueError as exc:
            return f"--input {mask_url(url)}: {exc}"
        if kind == "file" and not Path(file_path(url)).is_file():
            return f"--input {mask_url(url)}: no such file"
    return None


def build_config(args: argparse.Namespace, inputs: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The services' settings: ``base`` (the --config file) with the launcher's defaults and flags."""
    config: dict[str, Any] = {
        "metrics": {"host": "127.0.0.1"},
        "log_level": "INFO",
        "classify": {"runtime": "auto", "max_wait_ms": 10},
        "detect": {"max_frame_age_s": 5.0},
    }
    for section, value in (base or {}).items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    if inputs or not config.get("cameras"):
        config["cameras"] = [{"id": f"cam{i}", "url": url, "fps": args.fps, "loop": bool(args.loop)}
                             for i, url in enumerate(inputs)]
    if args.runtime:
        config["classify"]["runtime"] = args.runtime
    if args.model:
        config["classify"]["model"] = args.model
    if getattr(args, "mqtt_url", None):
        config["mqtt"] = {**(config.get("mqtt") or {}), "url": args.mqtt_url}
    return config


class _Interrupt:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def up_main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_masking()
    args = parse_args(argv)
    try:
        args.file_config = read_yaml(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 2
    if not args.input and not args.file_config.get("cameras"):
        from shared.sample import sample_video

        args.input = [str(sample_video())]
    problem = check_inputs(args.input)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    url = args.redis_url or redis_url_from_env() or args.file_config.get("redis", {}).get("url")
    embedded = None if url else EmbeddedRedis().start()
    url = url or embedded.url  # type: ignore[union-attr]
    config = build_config(args, args.input, args.file_config)
    print(f"redis: {mask_url(url)}{' (embedded)' if embedded else ''}; inputs: "
          f"{', '.join(mask_url(str(c['url'])) for c in config['cameras'])}", file=sys.stderr)
    workdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="emotion-stream-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, url, workdir, config)
    finally:
        if embedded is not None:
            embedded.stop()


def _run(args: argparse.Namespace, url: str, workdir: Path, config: dict[str, Any]) -> int:
    try:
        # the services' own view: the file's redis section, ES_REDIS__* over it, then this run's URL
        file_redis = load(ServiceSettings, None, {"redis": config.get("redis", {})}).redis
        redis_cfg = RedisSettings.model_validate({**file_redis.model_dump(), "url": url})
    except ConfigError as exc:
        print("\n".join(exc.lines), file=sys.stderr)
        return 2
    except ValidationError as exc:
        print("\n".join(format_errors(exc)), file=sys.stderr)
        return 2
    r = connect(redis_cfg)
    keys = Keys(redis_cfg.prefix)
    _warn_if_in_use(r, keys, [str(c["id"]) for c in config["cameras"]])
    start_id = _last_id(r, keys.events)
    pipeline = Pipeline(url, config, workdir, args.detect_workers)
    interrupt = _Interrupt()
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    reader = EventReader(r, keys=keys, start=start_id, filt=make_filter(args), block_ms=200)
    stats = Stats()
    pipeline.start(outputs_started=lambda: all(has_group(r, stream, group)
                                               for stream, group in output_groups(pipeline, keys)))
    print(f"services started (logs in {workdir}); Ctrl-C stops", file=sys.stderr)
    if not args.no_web:
        print(f"web view: {pipeline.start_web(web_port(args.web_port))}", file=sys.stderr)
    code = 0
    try:
        code = _event_loop(args, pipeline, reader, stats, interrupt, r, keys, [str(c["id"]) for c in config["cameras"]])
    finally:
        pipeline.stop(outputs_caught_up=lambda: drained(r, keys, [], output_groups(pipeline, keys)))
        reader.block_ms = 10
        while batch := reader.read():  # what arrived while the services stopped (a read holds 256 at most)
            for ev in (e for e in batch if reader.filt.matches(e)):
                print_event(ev, args.json)
                stats.add(ev.publish_ts - ev.capture_ts)
        print(stats.summary(), file=sys.stderr)
    return code


# After the end of input, a pipeline whose queues stop moving (Redis refusing writes when out of
# memory, say) is given up on after this long rather than waited on forever.
STALL_S = 30.0


def _event_loop(args: argparse.Namespace, pipeline: Pipeline, reader: EventReader, stats: Stats,
                interrupt: _Interrupt, r: redis.Redis, keys: Keys, cameras: list[str]) -> int:
    deadline = time.monotonic() + args.max_seconds if args.max_seconds > 0 else float("inf")
    progress = Progress()
    while not interrupt.requested and time.monotonic() < deadline:
        for ev in reader.poll():  # waits out Redis outages and resumes after the last event
            print_event(ev, args.json)
            stats.add(ev.publish_ts - ev.capture_ts)
            progress.moved()
        failure = pipeline.failed()
        if failure:
            print(f"error: {mask_text(failure)}", file=sys.stderr)
            return 1
        if not pipeline.ingest_done():
            continue
        try:
            if drained(r, keys, cameras, output_groups(pipeline, keys)):
                print("all inputs processed", file=sys.stderr)
                return 0
            progress.observe(backlog(r, keys, cameras, output_groups(pipeline, keys)))
        except TRANSIENT_ERRORS:
            continue  # Redis is restarting: the services retry, so does this loop
        if progress.stalled(STALL_S):
            print(f"error: inputs ended, but the pipeline made no progress for {STALL_S:.0f}s with "
                  f"{progress.last} entries unprocessed (Redis refusing writes{mqtt_hint(pipeline)}? see the "
                  "services' logs and es_frames_dropped_total / es_stream_lost_total)", file=sys.stderr)
            return 1
    return 0


def output_groups(pipeline: Pipeline, keys: Keys) -> tuple[tuple[str, str], ...]:
    """The MQTT service's group on the events and tracks streams: stopping before it caught up
    would leave the last events unpublished."""
    if "mqtt" not in pipeline.outputs():
        return ()
    group = str(pipeline.mqtt.get("group", "mqtt"))
    return ((keys.events, group), (keys.tracks, group))


def has_group(r: redis.Redis, stream: str, group: str) -> bool:
    try:
        return any(_as_str(g["name"]) == group for g in r.xinfo_groups(stream))
    except redis.ResponseError:
        return False  # no such stream yet


def mqtt_hint(pipeline: Pipeline) -> str:
    if not pipeline.outputs():
        return ""
    return f", or the MQTT broker {mask_url(str(pipeline.mqtt.get('url')))} not answering (mqtt.log)"


class Progress:
    """Notices when the backlog stops changing and no event arrives."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.since = time.monotonic()

    def moved(self) -> None:
        self.since = time.monotonic()

    def observe(self, backlog: int) -> None:
        if backlog != self.last:
            self.last = backlog
            self.moved()

    def stalled(self, seconds: float) -> bool:
        return time.monotonic() - self.since > seconds


def backlog(r: redis.Redis, keys: Keys, cameras: list[str], outputs: tuple[tuple[str, str], ...] = ()) -> int:
    """Entries pending or not yet delivered in the frame and face streams (and ``outputs``'s)."""
    total = 0
    for stream, group in [(keys.frames(c), "detect") for c in cameras] + [(keys.faces, "classify"), *outputs]:
        stats = group_stats(r, stream, group)
        if stats is not None:
            total += stats.pending + stats.lag
    return total


def _warn_if_in_use(r: redis.Redis, keys: Keys, cameras: list[str]) -> None:
    """A Redis that already holds a pipeline under this prefix: camera ids and consumer names would collide."""
    try:
        known = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in r.smembers(keys.cameras))
    except TRANSIENT_ERRORS:
        return
    if known:
        shared = sorted(set(known) & set(cameras))
        print(f"warning: this Redis already holds a pipeline under prefix {keys.prefix!r} (cameras: "
              f"{', '.join(known[:10])}){'; same camera ids: ' + ', '.join(shared) if shared else ''}. Its "
              "streams, consumer groups and consumer names are shared with this run; use another Redis or "
              "redis.prefix to keep them apart", file=sys.stderr)


def web_port(wanted: int) -> int:
    """``wanted`` when it is free on loopback, else any free port."""
    if wanted:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", wanted))
                return wanted
            except OSError:
                print(f"port {wanted} is taken; the web view uses another", file=sys.stderr)
    return free_port()


def _last_id(r: redis.Redis, stream: str) -> str:
    newest = r.xrevrange(stream, count=1)
    return _as_str(newest[0][0]) if newest else "0-0"
