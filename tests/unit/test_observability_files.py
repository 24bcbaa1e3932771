"""Prometheus rules, scrape config and the Grafana dashboard agree with serving/metrics.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import serving.metrics  # noqa: F401  (registers every metric)
from tests.conftest import ROOT

PROMETHEUS = ROOT / "infra" / "prometheus"
GRAFANA = ROOT / "infra" / "grafana"
# Built-in series Prometheus adds itself, not defined by us.
BUILTIN = {"up"}


def our_metric_names() -> set[str]:
    """Every series name the registry can emit (counters' _total, histograms' _bucket, ...)."""
    return set(REGISTRY._names_to_collectors)  # noqa: SLF001 (no public listing)


def referenced_metrics(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(recsys_[a-z_]+|up)\b", expr)}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in (GRAFANA / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


def test_every_alert_names_known_metrics_and_has_a_summary() -> None:
    known = our_metric_names() | BUILTIN
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        assert referenced_metrics(rule["expr"]) <= known, rule["alert"]
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in {"page", "ticket"}


def test_alerts_cover_latency_errors_quality_and_lag() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"RecsysRecommendationLatencyHigh", "RecsysServerErrorRateHigh", "RecsysCtrDrop",
            "RecsysDiversityDrop", "RecsysFlowLagHigh"} <= names


def test_dashboard_queries_name_known_metrics() -> None:
    known = our_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        assert referenced_metrics(expr) and referenced_metrics(expr) <= known, expr


def test_grafana_provisioning_points_at_the_mounted_paths() -> None:
    source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == "prometheus"
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/recsys.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./infra/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts
    prom_mounts = compose["services"]["prometheus"]["volumes"]
    assert "./infra/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prom_mounts


def promtool() -> str | None:
    found = shutil.which("promtool") or os.environ.get("PROMTOOL")
    return found if found and Path(found).exists() else None


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_rules_and_config(tmp_path: Path) -> None:
    config = (PROMETHEUS / "prometheus.yml").read_text().replace(
        "/etc/prometheus/alerts.yml", str(PROMETHEUS / "alerts.yml"))
    (tmp_path / "prometheus.yml").write_text(config)
    result = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_are_summed_over_workers_in_multiprocess_mode(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (compose runs 2 workers), /metrics merges every worker."""
    script = """
from fastapi.testclient import TestClient
from serving.app import create_app
from serving.config import Settings
app = create_app(Settings(_env_file=None, environment="test"))
with TestClient(app) as client:
    for _ in range(3):
        client.get("/healthz")
    print(client.get("/metrics").text)
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           timeout=60, cwd=ROOT) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    # The second "worker" sees the first one's 3 requests plus its own 3.
    line = next(text for text in runs[1].stdout.splitlines()
                if text.startswith('recsys_http_requests_total{') and 'route="/healthz"' in text)
    assert float(line.rsplit(" ", 1)[1]) == 6.0
