"""Deployment files: Prometheus config and alert rules, Grafana dashboards, docker-compose, Kubernetes.

The checks in plain Python (wiring between the files, metric names, settings files) always run.
Those marked ``integration`` run the real tools (promtool, docker-compose, kubectl kustomize,
kubernetes-validate) and skip, saying which tool is missing, where it is not installed;
``bash deploy/run.sh test`` installs them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import isolate_env

from services.classify.settings import ClassifySettings
from services.detect.settings import DetectSettings
from services.ingest.settings import IngestSettings
from shared.redis_acl import REPO_TEMPLATE as REPO_ACL
from shared.redis_acl import write as write_acl
from shared.settings import ServiceSettings, load
from shared.streams import Keys

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = ROOT / "docker-compose.yml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "external-redis"
SERVICES = ("ingest", "detect", "classify")
METRICS_PORT = 9100
CRD_GROUPS = ("keda.sh/",)  # custom resources kubernetes-validate has no schema for

integration = pytest.mark.integration


# ----------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """Path of an external tool (PATH, then this interpreter's bin/); skips the test when absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (bash deploy/run.sh test installs it)")
    return found


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def yaml_docs(text: str) -> list[dict[str, Any]]:
    """Non-empty YAML documents (old kustomize leaves ``{}`` where a patch deleted an object)."""
    return [d for d in yaml.safe_load_all(text) if d]


def is_crd(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith(CRD_GROUPS)


def compose() -> dict[str, Any]:
    data = read_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


# ----------------------------------------------------------------------------- metric names

METRIC_CALL = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(es_\w+)\"")
SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_count", "_sum", "_created"),
    "Summary": ("", "_count", "_sum", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}


def service_metric_names() -> set[str]:
    """Every sample name the services expose, from the metric declarations in their source."""
    names: set[str] = set()
    for package in ("services", "shared"):
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in METRIC_CALL.findall(path.read_text()):
                base = name.removesuffix("_total") if kind == "Counter" else name
                names.update(base + suffix for suffix in SUFFIXES[kind])
    return names


STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
ES_NAME = re.compile(r"(?<![\w:])es_\w+")


def es_names_in(expr: str) -> set[str]:
    """The es_* metric names an expression uses (label values in quotes are ignored)."""
    return set(ES_NAME.findall(STRING.sub('""', expr)))


def test_metric_declarations_are_found_in_the_services() -> None:
    names = service_metric_names()
    # one of each kind, from each service and the shared module, as in the README's metrics table
    for expected in ("es_frames_read_total", "es_camera_up", "es_ingest_encode_seconds_bucket",
                     "es_detect_frames_total", "es_classify_batch_size_sum", "es_events_total",
                     "es_end_to_end_seconds_bucket", "es_dead_letters_total", "es_heartbeat_timestamp_seconds",
                     "es_service_info"):
        assert expected in names
    # a histogram is only queryable through its _bucket/_count/_sum series
    assert "es_end_to_end_seconds" not in names


def test_expression_metric_names_ignore_label_values() -> None:
    assert es_names_in('rate(es_a_total{stream="es:frames:{x}", b=\'es_c\'}[5m]) / es_d') == {"es_a_total", "es_d"}


# ----------------------------------------------------------------------------- dashboards


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those inside rows."""
    for panel in node.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard_targets(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of a dashboard: ``panels[].targets[].expr``."""
    dash = json.loads(path.read_text())
    return [(p["title"], t) for p in panels(dash) for t in p.get("targets", [])]


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARDS} >= {"pipeline-health.json", "emotions.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_provisionable_json_with_a_prometheus_query_per_panel(path: Path) -> None:
    dash = json.loads(path.read_text())
    datasource_uid = read_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    all_panels = list(panels(dash))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == datasource_uid
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target['refId']} has no expr"
            assert "$" not in target["expr"], "expressions must run as they are (no dashboard variables)"


@pytest.mark.parametrize("path", [*DASHBOARDS, PROMETHEUS / "alerts.yml"], ids=lambda p: p.name)
def test_queries_use_only_metrics_the_services_define(path: Path) -> None:
    if path.suffix == ".json":
        exprs = [(title, t["expr"]) for title, t in dashboard_targets(path)]
    else:
        exprs = [(r["alert"], r["expr"]) for g in read_yaml(path)["groups"] for r in g["rules"]]
    defined = service_metric_names()
    unknown = {f"{where}: {name}" for where, expr in exprs for name in es_names_in(expr) - defined}
    assert not unknown, f"metrics no service defines: {sorted(unknown)}"
    assert any(es_names_in(expr) for _, expr in exprs)


def test_pipeline_health_dashboard_covers_the_pipeline() -> None:
    targets = dashboard_targets(GRAFANA / "dashboards" / "pipeline-health.json")
    used = {name for _, t in targets for name in es_names_in(t["expr"])}
    for name in ("es_frames_read_total", "es_frames_published_total", "es_detect_frames_total", "es_events_total",
                 "es_frames_dropped_total", "es_end_to_end_seconds_bucket", "es_detect_seconds_bucket",
                 "es_classify_batch_size_bucket", "es_heartbeat_timestamp_seconds", "es_dead_letters_total",
                 "es_redis_errors_total", "es_camera_up", "es_stage_phase_seconds_sum",
                 "es_stage_phase_seconds_bucket", "es_stream_lag", "es_stream_pending",
                 "es_detect_relieved_frames_total"):
        assert name in used, name
    exprs = " ".join(t["expr"] for _, t in targets)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(es_end_to_end_seconds_bucket" in exprs
    assert "count by (job) (up" in exprs
    assert "rate(process_cpu_seconds_total" in exprs  # cores used per stage


def test_emotions_dashboard_has_emotions_over_time_and_the_current_mix() -> None:
    dash = json.loads((GRAFANA / "dashboards" / "emotions.json").read_text())
    by_type: dict[str, list[str]] = {}
    for panel in panels(dash):
        for target in panel.get("targets", []):
            by_type.setdefault(panel["type"], []).append(target["expr"])
    assert any("by (camera, emotion)" in e and "es_events_total" in e for e in by_type["timeseries"])
    assert any("by (emotion)" in e and "es_events_total" in e for e in by_type["piechart"])
    assert any("es_events_total" in e for e in by_type["bargauge"])


@integration
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules = []
    for path in DASHBOARDS:
        stem = re.sub(r"\W", "_", path.stem)
        for i, (_title, target) in enumerate(dashboard_targets(path)):
            rules.append({"record": f"dashboard:{stem}:{i}_{target['refId']}", "expr": target["expr"]})
    assert rules
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(rules_file)])
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


# ----------------------------------------------------------------------------- Prometheus


@integration
def test_promtool_accepts_the_prometheus_config() -> None:
    out = run([tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert "SUCCESS" in out.stdout


@integration
def test_promtool_accepts_the_alert_rules() -> None:
    run([tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml")])


@integration
def test_alert_rule_unit_tests_pass() -> None:
    run([tool("promtool"), "test", "rules", str(PROMETHEUS / "alerts_test.yml")], cwd=PROMETHEUS)


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    alerts = {r["alert"] for g in read_yaml(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {"CameraDown", "StreamLagGrowing", "EndToEndLatencyHigh", "DeadLettersAppearing", "ServiceMissing"}
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in read_yaml(PROMETHEUS / "alerts_test.yml")["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fired == alerts
    assert quiet == alerts


def test_prometheus_scrapes_each_compose_service_on_its_metrics_port() -> None:
    config = read_yaml(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    services = compose()["services"]
    for name in SERVICES:
        sd = jobs[name]["dns_sd_configs"][0]
        assert sd["names"] == [name] and name in services
        assert sd["port"] == METRICS_PORT
    assert config["rule_files"] == ["alerts.yml"]


# ----------------------------------------------------------------------------- Grafana and compose


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    services = compose()["services"]
    grafana_volumes = services["grafana"]["volumes"]
    datasource = read_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = read_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"][0]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_volumes
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def test_compose_runs_each_service_with_health_checks_config_and_redis() -> None:
    services = compose()["services"]
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["detect"]["deploy"]["replicas"] == 2
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert "healthcheck" in svc, name
    for name in SERVICES:
        svc = services[name]
        env = svc["environment"]
        assert env["ES_REDIS__URL"] == "redis://redis:6379/0"
        assert env["ES_METRICS__HOST"] == "0.0.0.0"
        assert int(env["ES_METRICS__PORT"]) == METRICS_PORT
        assert f"127.0.0.1:{METRICS_PORT}/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        source, target = svc["volumes"][0].split(":")[:2]
        assert (ROOT / source).is_file() and svc["command"] == ["--config", target]
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert dockerfile == DEPLOY / "docker" / f"{name}.Dockerfile"
        text = dockerfile.read_text()
        assert "FROM python:3.11-slim" in text and "pip install" in text
        assert f'"-m", "services.{name}"' in text


@pytest.mark.parametrize("settings_cls", [IngestSettings, DetectSettings, ClassifySettings], ids=SERVICES)
def test_compose_config_file_loads_with_the_compose_environment(
    settings_cls: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = compose()["services"][settings_cls.__name__.removesuffix("Settings").lower()]
    isolate_env(monkeypatch, svc["environment"])
    settings = load(settings_cls, ROOT / svc["volumes"][0].split(":")[0])
    assert settings.redis.url == "redis://redis:6379/0"
    assert (settings.metrics.host, settings.metrics.port) == ("0.0.0.0", METRICS_PORT)
    if isinstance(settings, IngestSettings):
        assert settings.cameras


@integration
def test_docker_compose_accepts_the_compose_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as an operator runs it: the Redis users written by `emotion-stream redis-acl`, and a page token
    write_acl(tmp_path / "deploy" / "redis" / "secrets", REPO_ACL, "es")
    monkeypatch.setenv("ES_WEB_TOKEN", "operator-token-123")
    run([tool("docker-compose"), "-f", str(COMPOSE), "--project-directory", str(tmp_path), "config", "-q"])
    monkeypatch.delenv("ES_WEB_TOKEN")
    unset = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "--project-directory", str(tmp_path),
                            "config", "-q"], capture_output=True, text=True, timeout=120)
    assert unset.returncode != 0 and "ES_WEB_TOKEN" in unset.stderr, unset.stderr


# ----------------------------------------------------------------------------- Kubernetes


def base_docs() -> list[dict[str, Any]]:
    kustomization = read_yaml(K8S_BASE / "kustomization.yaml")
    return [d for name in kustomization["resources"] for d in yaml_docs((K8S_BASE / name).read_text())]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def k8s_config(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The pipeline settings file of ConfigMap es-config, and the environment of ConfigMap es-env."""
    config = yaml.safe_load(find(docs, "ConfigMap", "es-config")["data"]["config.yaml"])
    return config, find(docs, "ConfigMap", "es-env")["data"]


def test_k8s_deployments_have_probes_resources_services_and_budgets() -> None:
    docs = base_docs()
    for name in SERVICES:
        pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for probe in ("livenessProbe", "readinessProbe"):
            port = container[probe]["httpGet"]["port"]
            assert ports.get(port, port) == METRICS_PORT
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        assert {"configMapRef": {"name": "es-env"}} in container["envFrom"]
        assert any(v.get("configMap", {}).get("name") == "es-config" for v in pod["volumes"])
        service = find(docs, "Service", name)
        assert service["spec"]["ports"][0]["port"] == METRICS_PORT
    for name in ("detect", "classify"):
        find(docs, "PodDisruptionBudget", name)
    find(docs, "Deployment", "redis")
    find(docs, "Service", "redis")
    assert find(docs, "Deployment", "ingest")["spec"]["replicas"] == 1


@pytest.mark.parametrize("settings_cls", [IngestSettings, DetectSettings, ClassifySettings], ids=SERVICES)
def test_k8s_config_loads_with_the_k8s_environment(
    settings_cls: type[ServiceSettings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config, env = k8s_config(base_docs())
    isolate_env(monkeypatch, {k: v for k, v in env.items() if k.startswith("ES_")})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(settings_cls, path)
    assert settings.redis.url == env["ES_REDIS__URL"]
    assert settings.metrics.port == METRICS_PORT


def test_keda_scales_detect_on_every_camera_stream_and_classify_on_faces() -> None:
    docs = base_docs()
    config, env = k8s_config(docs)
    keys = Keys(config.get("redis", {}).get("prefix", "es"))
    expected = {
        "detect": ({keys.frames(c["id"]) for c in config["cameras"]}, DetectSettings().detect.group),
        "classify": ({keys.faces}, ClassifySettings().classify.group),
    }
    for name, (streams, group) in expected.items():
        scaled = find(docs, "ScaledObject", name)
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        assert scaled["spec"]["scaleTargetRef"]["name"] == name
        find(docs, "Deployment", name)
        triggers = scaled["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"redis-streams"}
        assert {t["metadata"]["stream"] for t in triggers} == streams
        for trigger in triggers:
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == group
            assert int(meta["lagCount"]) > 0
            assert meta["addressFromEnv"] in env
    assert "es:{faces}" in expected["classify"][0] and "es:frames:{lobby}" in expected["detect"][0]
    # one detect worker per camera at a time: more replicas than cameras would only idle
    assert find(docs, "ScaledObject", "detect")["spec"]["maxReplicaCount"] <= len(config["cameras"])


def keda_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "keda", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_keda_manifest_is_the_one_generated_from_the_k8s_cameras() -> None:
    out = keda_command("--config", str(K8S_BASE / "config.yaml"), "--check", str(K8S_BASE / "keda.yaml"))
    assert out.returncode == 0, out.stderr


def test_a_camera_added_to_the_settings_gets_its_detect_trigger(tmp_path: Path) -> None:
    config, _ = k8s_config(base_docs())
    config["cameras"].append({"id": "garage", "url": "rtsp://camera-garage.example.internal/stream1"})
    settings = tmp_path / "config.yaml"
    settings.write_text(yaml.safe_dump(config))
    # The committed manifest no longer matches: --check says so and how to regenerate.
    stale = keda_command("--config", str(settings), "--check", str(K8S_BASE / "keda.yaml"))
    assert stale.returncode == 1 and "regenerate" in stale.stderr, stale.stderr
    written = tmp_path / "keda.yaml"
    assert keda_command("--config", str(settings), "--out", str(written)).returncode == 0
    detect = find(yaml_docs(written.read_text()), "ScaledObject", "detect")
    streams = [t["metadata"]["stream"] for t in detect["spec"]["triggers"]]
    assert streams == [Keys("es").frames(c["id"]) for c in config["cameras"]]
    assert "es:frames:{garage}" in streams and detect["spec"]["maxReplicaCount"] == len(config["cameras"])


def test_classify_stays_one_replica_while_it_tracks_and_scales_without_tracking(tmp_path: Path) -> None:
    """All of a camera's faces must reach one tracker: with tracking on (the default, and in the
    k8s settings) KEDA keeps classify at one replica and a rollout never runs two side by side."""
    docs = base_docs()
    config, _ = k8s_config(docs)
    assert (config.get("tracking") or {}).get("enabled", True), "the k8s settings track faces"
    assert find(docs, "ScaledObject", "classify")["spec"]["maxReplicaCount"] == 1
    assert find(docs, "Deployment", "classify")["spec"]["strategy"] == {"type": "Recreate"}
    config["tracking"] = {"enabled": False}
    settings = tmp_path / "config.yaml"
    settings.write_text(yaml.safe_dump(config))
    written = tmp_path / "keda.yaml"
    assert keda_command("--config", str(settings), "--out", str(written)).returncode == 0
    assert find(yaml_docs(written.read_text()), "ScaledObject", "classify")["spec"]["maxReplicaCount"] > 1


def test_keda_without_cameras_is_a_clear_error(tmp_path: Path) -> None:
    settings = tmp_path / "config.yaml"
    settings.write_text("redis:\n  prefix: es\n")
    out = keda_command("--config", str(settings))
    assert out.returncode == 1 and "cameras" in out.stderr and str(settings) in out.stderr, out.stderr
    settings.write_text("cameras:\n  - url: rtsp://camera.example.internal/stream1\n")
    out = keda_command("--config", str(settings))
    assert out.returncode == 1 and "cameras[0].id" in out.stderr, out.stderr


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = run([tool("kubectl"), "kustomize", str(path)])
    return yaml_docs(out.stdout)


def kubernetes_validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict on the core objects; KEDA's CRDs have no schema there and are left out."""
    validate = tool("kubernetes-validate")
    core = [d for d in docs if not is_crd(d)]
    assert core
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    out = run([validate, "--strict", str(manifest)])
    assert out.stdout.count("passed for resource") == len(core), out.stdout


@integration
def test_kustomize_base_builds_and_validates(tmp_path: Path) -> None:
    docs = kustomize(K8S_BASE)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"emotion-stream"}
    assert {d["kind"] for d in docs if is_crd(d)} == {"ScaledObject"}
    find(docs, "Deployment", "redis")
    kubernetes_validate(docs, tmp_path)


@integration
def test_kustomize_external_redis_overlay_drops_redis_and_repoints_the_url(tmp_path: Path) -> None:
    docs = kustomize(K8S_OVERLAY)
    assert not [d for d in docs if d["metadata"]["name"] == "redis"]
    _, env = k8s_config(docs)
    assert "redis://redis:" not in env["ES_REDIS__URL"]
    assert env["KEDA_REDIS_ADDRESS"].split(":")[0] in env["ES_REDIS__URL"]
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert "services-egress-external-redis" in policies and not {"redis-ingress", "redis-egress"} & policies
    for name in SERVICES:
        find(docs, "Deployment", name)
    kubernetes_validate(docs, tmp_path)


@integration
def test_k8s_manifests_validate_without_kubectl(tmp_path: Path) -> None:
    """The base files one by one, for machines without kubectl (kustomize adds only names and namespaces)."""
    kubernetes_validate(base_docs(), tmp_path)


# ----------------------------------------------------------------------------- security


def acl_users() -> dict[str, str]:
    """User name -> its line of deploy/redis/users.acl (the template)."""
    lines = [line for line in REPO_ACL.read_text().splitlines() if line.startswith("user ")]
    return {line.split()[1]: line for line in lines}


def test_security_compose_runs_redis_with_the_acl_file_and_each_service_as_its_user() -> None:
    services = compose()["services"]
    redis_svc = services["redis"]
    command = redis_svc["command"]
    assert command[command.index("--aclfile") + 1] == "/etc/redis/users.acl"
    assert "./deploy/redis/secrets/users.acl:/etc/redis/users.acl:ro" in redis_svc["volumes"]
    users = acl_users()
    assert users["default"].split()[-2:] == ["-@all", "+ping"]  # the healthcheck's PING, nothing else
    for name in (*SERVICES, "web"):
        assert services[name]["env_file"] == [f"deploy/redis/secrets/{name}.env"], name
        assert name in users
        assert "ES_REDIS__PASSWORD" not in services[name]["environment"]
    assert "deploy/redis/secrets/" in (ROOT / ".gitignore").read_text()


def test_security_k8s_requires_the_secrets_and_runs_redis_with_the_acl_file() -> None:
    docs = base_docs()
    for name in (*SERVICES, "web"):
        (container,) = find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
        assert {"name": f"es-redis-{name}"} in refs, (name, refs)  # not optional: no anonymous Redis access
        assert not any(r.get("optional") for r in refs), (name, refs)
    (web,) = find(docs, "Deployment", "web")["spec"]["template"]["spec"]["containers"]
    assert {"name": "es-web"} in [s["secretRef"] for s in web["envFrom"] if "secretRef" in s]
    pod = find(docs, "Deployment", "redis")["spec"]["template"]["spec"]
    (redis_c,) = pod["containers"]
    assert redis_c["args"][redis_c["args"].index("--aclfile") + 1] == "/etc/redis/users.acl"
    assert {"name": "acl", "mountPath": "/etc/redis", "readOnly": True} in redis_c["volumeMounts"]
    acl_volume = next(v for v in pod["volumes"] if v["name"] == "acl")
    assert acl_volume["secret"] == {"secretName": "es-redis-acl"}
    for scaled in (find(docs, "ScaledObject", "detect"), find(docs, "ScaledObject", "classify")):
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["usernameFromEnv"] == "ES_REDIS__USERNAME"
            assert trigger["metadata"]["passwordFromEnv"] == "ES_REDIS__PASSWORD"


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


def _selects(spec: dict[str, Any], app: str) -> bool:
    selector = spec["podSelector"]
    if not selector:
        return True
    if "matchLabels" in selector:
        return bool(selector["matchLabels"].get("app.kubernetes.io/name") == app)
    return any(e["key"] == "app.kubernetes.io/name" and app in e["values"] for e in selector["matchExpressions"])


def test_security_network_policy_only_the_operator_namespace_reaches_the_web_and_services_reach_only_redis() -> None:
    policies = _policies(base_docs())
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    web_in = [s for s in policies.values() if _selects(s, "web") and s.get("ingress")]
    port_8080 = [rule for s in web_in for rule in s["ingress"] if {"port": 8080, "protocol": "TCP"} in rule["ports"]]
    assert port_8080 == [{"from": [{"namespaceSelector": {"matchLabels": {"emotion-stream/web-access": "true"}}}],
                          "ports": [{"port": 8080, "protocol": "TCP"}]}]
    (redis_in,) = [s for s in policies.values() if _selects(s, "redis") and s.get("ingress")]
    (rule,) = redis_in["ingress"]
    pods = next(f["podSelector"] for f in rule["from"] if "podSelector" in f)["matchExpressions"][0]["values"]
    assert sorted(pods) == sorted([*SERVICES, "web"]) and rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    for app in ("detect", "classify", "web"):
        allowed = [peer for s in policies.values() if _selects(s, app) for rule in s.get("egress", [])
                   for peer in rule["to"] if "ipBlock" in peer]
        assert allowed == [], (app, allowed)  # no way out of the cluster: Redis, DNS (and for web, metrics)
    egress_ports = {p["port"] for s in policies.values() if _selects(s, "detect") for rule in s.get("egress", [])
                    for p in rule["ports"]}
    assert egress_ports == {6379, 53}
    assert policies["redis-egress"]["egress"] == []
# ----------------------------------------------------------------------------- MQTT output (opt-in)

K8S_MQTT = DEPLOY / "k8s" / "overlays" / "mqtt"


def mqtt_overlay_docs() -> list[dict[str, Any]]:
    return yaml_docs((K8S_MQTT / "mqtt.yaml").read_text())


def test_compose_mqtt_profile_runs_the_service_against_its_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.mqtt.settings import MqttSettings, broker

    services = compose()["services"]
    mqtt, mosquitto = services["mqtt"], services["mosquitto"]
    assert mqtt["profiles"] == ["mqtt"] and mosquitto["profiles"] == ["mqtt"]  # opt-in
    assert mosquitto["image"].startswith("eclipse-mosquitto:")
    assert mqtt["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert mqtt["depends_on"]["redis"]["condition"] == "service_healthy"
    conf_source, conf_target = mosquitto["volumes"][0].split(":")[:2]
    assert (ROOT / conf_source).is_file() and conf_target == "/mosquitto/config/mosquitto.conf"
    assert "listener 1883" in (ROOT / conf_source).read_text()
    assert mosquitto["ports"] == ["127.0.0.1:1883:1883"]  # anonymous broker: the host's loopback only
    dockerfile = ROOT / mqtt["build"]["dockerfile"]
    assert dockerfile == DEPLOY / "docker" / "mqtt.Dockerfile" and '"-m", "services.mqtt"' in dockerfile.read_text()
    isolate_env(monkeypatch, mqtt["environment"])
    settings = load(MqttSettings, ROOT / mqtt["volumes"][0].split(":")[0])
    assert (broker(settings.mqtt).host, broker(settings.mqtt).port) == ("mosquitto", 1883)
    assert settings.redis.url == "redis://redis:6379/0" and settings.metrics.port == METRICS_PORT
    assert settings.mqtt.discovery
    scrape = {j["job_name"]: j for j in read_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}["mqtt"]
    assert scrape["dns_sd_configs"][0]["names"] == ["mqtt"] and scrape["dns_sd_configs"][0]["port"] == METRICS_PORT
    # the other services accept the shared file with its mqtt section
    for cls in (IngestSettings, DetectSettings, ClassifySettings):
        load(cls, ROOT / mqtt["volumes"][0].split(":")[0])


def test_k8s_mqtt_overlay_runs_one_replica_with_probes_and_the_shared_config(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from services.mqtt.settings import MqttSettings

    docs = mqtt_overlay_docs()
    deployment = find(docs, "Deployment", "mqtt")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert ports[container[probe]["httpGet"]["port"]] == METRICS_PORT
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    assert {"configMapRef": {"name": "es-env"}} in container["envFrom"]
    assert {"secretRef": {"name": "es-mqtt", "optional": True}} in container["envFrom"]
    assert any(v.get("configMap", {}).get("name") == "es-config" for v in pod["volumes"])
    assert find(docs, "Service", "mqtt")["spec"]["ports"][0]["port"] == METRICS_PORT
    kustomization = read_yaml(K8S_MQTT / "kustomization.yaml")
    assert kustomization["bases"] == ["../../base"]
    assert kustomization["resources"] == ["mqtt.yaml", "network-policy.yaml"]
    assert {"secretRef": {"name": "es-redis-mqtt"}} in container["envFrom"]  # its own Redis user, required
    policies = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(
        (ROOT / "deploy/k8s/overlays/mqtt/network-policy.yaml").read_text())}
    assert policies["redis-ingress-mqtt"]["ingress"][0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mqtt"}}}]
    assert {"port": 1883, "protocol": "TCP"} in policies["mqtt-egress"]["egress"][2]["ports"]
    # the settings load as the pod sees them: es-config, es-env and the container's own variables
    config, env = k8s_config(base_docs())
    own = {e["name"]: e["value"] for e in container["env"]}
    isolate_env(monkeypatch, {**{k: v for k, v in env.items() if k.startswith("ES_")}, **own})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(MqttSettings, path)
    assert settings.mqtt.url == own["ES_MQTT__URL"] and settings.consumer == own["ES_CONSUMER"]


@integration
def test_kustomize_mqtt_overlay_builds_and_validates(tmp_path: Path) -> None:
    docs = kustomize(K8S_MQTT)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"emotion-stream"}
    deployment = find(docs, "Deployment", "mqtt")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "emotion-stream/mqtt:0.1.0"
    for name in SERVICES:
        find(docs, "Deployment", name)
    kubernetes_validate(docs, tmp_path)
