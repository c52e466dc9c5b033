"""Dashboards and rules are well formed; promtool checks and tests the rules.

Whether every query returns data from a real scrape is
tests/integration/test_metrics_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from medserve import metrics

EXPECTED_UIDS = {"medserve-fleet", "medserve-model", "medserve-compliance"}
KNOWN_METRIC = re.compile(r"\b(ray_medserve_[a-z0-9_]+)")


def _dashboards(repo_root: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((repo_root / "monitoring/grafana").glob("*.json"))}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it)")
    return promtool


def test_dashboards_have_stable_uids_variables_and_units(repo_root: Path):
    dashboards = _dashboards(repo_root)
    assert {d["uid"] for d in dashboards.values()} == EXPECTED_UIDS
    for name, dashboard in dashboards.items():
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "model", "department"} <= variables, name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in dashboard["panels"]:
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}: {panel['title']} has no unit"
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}"


def test_dashboards_and_rules_only_use_defined_medserve_metrics(repo_root: Path):
    histogram_suffixes = ("_bucket", "_count", "_sum")
    exported = set()
    for metric in metrics.all_metrics():
        exported.add(metric.exported_name)
        if metric.kind == "histogram":
            exported.update(metric.exported_name + suffix for suffix in histogram_suffixes)
    texts = [json.dumps(d) for d in _dashboards(repo_root).values()]
    texts += [path.read_text() for path in (repo_root / "monitoring/prometheus").glob("*rules*.yaml")]
    used = {name for text in texts for name in KNOWN_METRIC.findall(text)}
    assert used and used <= exported, used - exported


def test_every_alert_has_severity_and_summary(repo_root: Path):
    for path in (repo_root / "monitoring/prometheus").glob("*rules*.yaml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
                    assert rule["annotations"]["summary"], rule["alert"]


def test_promtool_check_rules(repo_root: Path):
    files = sorted((repo_root / "monitoring/prometheus").glob("*rules*.yaml"))
    assert files
    result = subprocess.run([_promtool(), "check", "rules", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules_audit_failure_fires(repo_root: Path):
    tests = sorted((repo_root / "monitoring/prometheus/tests").glob("*.yaml"))
    assert tests
    # The test file itself asserts that these fire (and stay quiet on a healthy platform).
    text = tests[0].read_text()
    for alert in ("MedserveAuditWritesFailing", "MedserveAuditVerificationFailed", "MedserveAuditVerificationStale",
                  "MedserveReviewBacklogStale"):
        assert f"alertname: {alert}" in text, alert
    result = subprocess.run([_promtool(), "test", "rules", *map(str, tests)], capture_output=True, text=True,
                            cwd=tests[0].parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_onprem_scrape_config_example_is_valid(repo_root: Path, tmp_path: Path):
    example = repo_root / "monitoring/prometheus/prometheus-onprem.example.yaml"
    config = yaml.safe_load(example.read_text())
    # Point the rule file at the repository's copy so promtool can follow it.
    config["rule_files"] = [str(repo_root / "monitoring/prometheus/medserve-rules.yaml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = subprocess.run([_promtool(), "check", "config", str(checked)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_prometheus_config_is_valid(repo_root: Path, tmp_path: Path):
    from medserve.controlplane.prometheus import default_rule_files, prometheus_config, write_targets

    targets = tmp_path / "targets.json"
    write_targets(targets, ["127.0.0.1:1234"])
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(prometheus_config(targets, default_rule_files(repo_root))))
    result = subprocess.run([_promtool(), "check", "config", str(checked)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
