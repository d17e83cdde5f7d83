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
