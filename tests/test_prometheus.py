"""A real Prometheus scrapes the running pipeline: every dashboard panel's query returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from media import HangingMjpeg
from support import REPO, RedisServer, Service, free_port, service_env, wait_for

from shared.sample import render_frames, write_video
from shared.schema import FIELD, FrameMsg, encode_frame
from shared.streams import Keys, ensure_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEYS = Keys()
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel["title"], target["expr"]))
    return out


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (deploy/run.sh test installs it)")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                               for job, port in targets.items()],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def inject_faults(r: Any) -> None:
    """A stale frame, an undecodable message and an entry left pending by a consumer that died."""
    r.xadd(KEYS.frames("good"), {FIELD: encode_frame(FrameMsg("good", 10**9, time.time() - 3600, 8, 8, b"\xff"))})
    r.xadd(KEYS.faces, {FIELD: b"not msgpack"})
    ghost = KEYS.frames("ghost")
    ensure_group(r, ghost, "detect")
    r.xadd(ghost, {FIELD: b"left behind"})
    r.xreadgroup("detect", "dead-consumer", {ghost: ">"}, count=1)
    r.sadd(KEYS.cameras, "ghost")


def test_every_dashboard_panel_returns_data(tmp_path: Path, redis_server: RedisServer, model_bundle: Path) -> None:
    assert DASHBOARDS, "no dashboards found"
    ports = {name: free_port() for name in ("ingest", "detect", "classify")}
    prom = Prometheus(tmp_path, ports)  # first: a skip here must leave nothing running
    video = write_video(tmp_path / "clip.mp4", render_frames(20), fps=10)
    hang = HangingMjpeg(render_frames(5)).start()
    cameras = [{"id": "good", "url": str(video), "fps": 5, "loop": True},
               {"id": "missing", "url": str(tmp_path / "nope.mp4"), "fps": 5},
               {"id": "hang", "url": hang.url, "fps": 0}]
    config = {"cameras": cameras, "ingest": {"watchdog_s": 2.0, "reconnect_max_s": 1.0},
              "detect": {"max_frame_age_s": 30}, "streams": {"claim_idle_ms": 500, "claim_every_s": 0.5},
              "classify": {"model": str(model_bundle), "runtime": "litert", "max_wait_ms": 10}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    services = [Service(n, tmp_path / "config.yaml", service_env(redis_server.url, ES_METRICS__PORT=str(p)), tmp_path)
                for n, p in ports.items()]
    try:
        wait_for(prom.ready, 30, interval=0.2, what="prometheus ready")
        wait_for(lambda: len(prom.query('up == 1')) == 3, 60, interval=0.5, what="three targets up")
        inject_faults(redis_server.client())
        missing: list[str] = []
        deadline = time.monotonic() + 60  # rates need a few scrapes to fill
        while time.monotonic() < deadline:
            missing = _empty_panels(prom)
            if not missing:
                break
            time.sleep(2)
        assert not missing, "panels without data:\n" + "\n".join(missing)
        _check_where_frames_wait(prom)
        rules = prom.get("/api/v1/rules")["data"]["groups"]
        assert rules and all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    finally:
        prom.stop()
        hang.stop()
        for svc in services:
            svc.stop()


def _empty_panels(prom: Prometheus) -> list[str]:
    return [f"{board} / {title}: {expr}" for board, title, expr in panel_queries() if not prom.query(expr)]


def _check_where_frames_wait(prom: Prometheus) -> None:
    """Each stage reports time in every phase and the cores it uses; a worker's phases cover its loop."""
    for stage in ("ingest", "detect", "classify"):
        for phase in ("wait", "work", "write"):
            expr = f'es_stage_phase_seconds_sum{{job="{stage}", stage="{stage}", phase="{phase}"}} > 0'
            assert prom.query(expr), f"no {phase} time from {stage}"
        assert prom.query(f'rate(process_cpu_seconds_total{{job="{stage}"}}[30s]) > 0'), f"no CPU time from {stage}"
    # One detect and one classify worker: their phases add up to the wall time of their loop
    # (once their series are older than the rate's window).
    wait_for(lambda: _loops_covered(prom), 45, interval=1.0, what="detect and classify phases covering their loops")


def _loops_covered(prom: Prometheus) -> bool:
    covered = prom.query('sum by (stage) (rate(es_stage_phase_seconds_sum{stage=~"detect|classify"}[10s]))')
    return {r["metric"]["stage"] for r in covered} == {"detect", "classify"} and all(
        0.8 < float(r["value"][1]) < 1.2 for r in covered)
