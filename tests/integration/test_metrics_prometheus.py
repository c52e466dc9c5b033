"""A real Prometheus scrapes the running platform; every dashboard and rule query returns data.

Ray exports metrics on a report interval, so the checks poll until the data
arrives (bounded by a deadline) rather than sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from medserve.controlplane.prometheus import (
    LocalPrometheus,
    default_rule_files,
    metrics_targets,
    start_prometheus,
    stop_prometheus,
)
from medserve.specs import deployments_of, pipelines_of

from .conftest import Platform, free_port, new_patient_id

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m-instruct"
TUMOUR = "brain-mri-tumour"
DEADLINE_S = 180.0
# What Grafana puts in place of its variables when "All" is selected.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
    "$department": ".*",
}
GPU_METRIC = re.compile(r"ray_medserve_gpu_\w+")
METRIC_NAME = re.compile(r"\b(ray_[a-z0-9_]+|medserve:[a-z0-9_:]+)\b")


def _has_gpu() -> bool:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001
        return False


def dashboard_queries(repo_root: Path) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of every dashboard, variables substituted."""
    queries = []
    for path in sorted((repo_root / "monitoring" / "grafana").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"{path.name}: unsubstituted variable in {expr}"
                queries.append((f"{path.name}: {panel['title']}", expr))
    return queries


def rule_expressions(repo_root: Path) -> list[tuple[str, str, str]]:
    """(kind, name, PromQL) for every rule in every rule file."""
    rules = []
    for path in default_rule_files(repo_root):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind = "alert" if "alert" in rule else "record"
                rules.append((kind, rule.get("alert") or rule["record"], rule["expr"]))
    return rules


def _query(prometheus: LocalPrometheus, expr: str) -> dict[str, Any]:
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=30.0)
    body = response.json()
    assert body["status"] == "success", f"{expr!r} does not parse or evaluate: {body.get('error')}"
    return body["data"]


def _poll_until_data(prometheus: LocalPrometheus, exprs: dict[str, str], deadline: float) -> dict[str, str]:
    """Query until each expression returns data or the deadline passes; returns those still empty."""
    waiting = dict(exprs)
    while waiting:
        for where, expr in list(waiting.items()):
            if _query(prometheus, expr)["result"]:
                del waiting[where]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    return waiting


@pytest.fixture(scope="module")
def prometheus(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrometheus]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    token = platform.env.get("RAY_AUTH_TOKEN") or None
    targets = metrics_targets(platform.target.dashboard_url, token)
    assert targets, "the Ray dashboard lists no node metrics export port"
    directory = tmp_path_factory.mktemp("prometheus")
    server = start_prometheus(directory, targets, port=free_port(),
                              rule_files=default_rule_files(platform.repo_root), interval="2s")
    try:
        yield server
    finally:
        stop_prometheus(directory)


@pytest.fixture(scope="module")
def traffic(platform: Platform, mr_small_path: Path) -> None:
    """Answered LLM and imaging calls, refused ones (401, 403), from two departments."""
    platform.apply()  # the catalog as committed, whatever earlier test files applied
    cardiology = platform.key("clinical-app", department="cardiology")
    radiology = platform.key("clinical-app", department="radiology")
    auditor = platform.key("auditor")
    headers = {"X-Patient-Id": new_patient_id()}
    with platform.client(cardiology) as client:
        response = client.post("/v1/chat/completions", headers=headers, json={
            "model": SMOL, "messages": [{"role": "user", "content": "Name one sign of sepsis."}], "max_tokens": 8})
        assert response.status_code == 200, response.text[:300]
    with platform.client(radiology) as client:
        response = client.post(f"/v1/imaging/{TUMOUR}", content=mr_small_path.read_bytes(),
                               headers={**headers, "Content-Type": "application/dicom"})
        assert response.status_code == 200, response.text[:300]
    with platform.client(auditor) as client:
        assert client.post(f"/v1/imaging/{TUMOUR}", content=b"x", headers=headers).status_code == 403
    with platform.client("msk_nope_nope") as client:
        assert client.post("/v1/chat/completions", json={}).status_code == 401


def test_every_dashboard_query_returns_data(prometheus: LocalPrometheus, traffic: None, repo_root: Path):
    queries = dashboard_queries(repo_root)
    assert len(queries) >= 25
    gpu_queries = {where: expr for where, expr in queries if GPU_METRIC.search(expr)}
    for expr in gpu_queries.values():
        _query(prometheus, expr)  # parses and evaluates, with or without a GPU
    required = {where: expr for where, expr in queries if where not in gpu_queries or _has_gpu()}
    empty = _poll_until_data(prometheus, required, time.monotonic() + DEADLINE_S)
    assert empty == {}, f"no data after traffic for: {sorted(empty)}"


def test_every_rule_is_healthy_and_its_inputs_have_data(prometheus: LocalPrometheus, traffic: None,
                                                         repo_root: Path):
    rules = rule_expressions(repo_root)
    for _, _, expr in rules:
        _query(prometheus, expr)  # parses and evaluates
    # Recording rules produce series; alerts are quiet (nothing is failing)
    # but every series they read exists.
    wanted = {name: name for kind, name, _ in rules if kind == "record"}
    for kind, name, expr in rules:
        if kind == "alert":
            for metric in set(METRIC_NAME.findall(expr)):
                if not GPU_METRIC.fullmatch(metric) or _has_gpu():
                    wanted[f"{name} reads {metric}"] = metric
    deadline = time.monotonic() + DEADLINE_S
    empty = _poll_until_data(prometheus, wanted, deadline)
    assert empty == {}, f"no data for: {sorted(empty)}"

    while True:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10.0).json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        if all(rule.get("lastEvaluation", "").startswith("20") for rule in loaded) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(loaded) == len(rules)
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
    # Firing, not pending: earlier tests in this session redeploy applications,
    # and a replica being replaced reads unhealthy for a moment; the rules'
    # `for:` windows exist so that such moments do not page anyone.
    firing = [r["name"] for r in loaded if r["type"] == "alerting" and r["state"] == "firing"]
    assert firing == []


def test_medserve_and_ray_serve_metrics_share_the_node_export(prometheus: LocalPrometheus, traffic: None,
                                                               platform: Platform):
    def names() -> set[str]:
        body = httpx.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=10.0).json()
        return set(body["data"])

    deadline = time.monotonic() + DEADLINE_S
    # The gateway's failure signals exist from its start, at zero: an alert on them reads data, not absence.
    expected = {"ray_medserve_requests_total", "ray_serve_deployment_replica_healthy",
                "ray_medserve_gateway_state_refresh_failures_total", "ray_medserve_gateway_state_age_seconds",
                "ray_medserve_gateway_unhandled_errors_total"}
    while not expected <= names():
        assert time.monotonic() < deadline, sorted(expected - names())
        time.sleep(2.0)
    ages = _query(prometheus, "ray_medserve_gateway_state_age_seconds")["result"]
    assert {s["metric"]["state"] for s in ages} >= {"keys", "routes"}
    assert all(not s["metric"]["replica"].startswith("pid-") for s in ages)
    # A gateway replica redeployed for this file's catalog exports its first
    # samples at its next export: wait for this traffic's departments too.
    while True:
        series = _query(prometheus, "ray_medserve_requests_total")["result"]
        departments = {s["metric"]["department"] for s in series}
        if {"cardiology", "radiology", "none"} <= departments or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert {"cardiology", "radiology", "none"} <= departments
    # No free text: model names only from the catalog, its models and pipelines (earlier modules' traffic
    # may still be exported).
    specs = platform.catalog()
    catalog_names = {spec.model.name for spec in deployments_of(specs)} | {p.name for p in pipelines_of(specs)}
    for sample in series:
        assert sample["metric"]["model"] in catalog_names | {"none"}
    # Gauges name the Serve replica (Ray merges same-labelled gauges on a node).
    info = _query(prometheus, "ray_medserve_model_info")["result"]
    assert {s["metric"]["model"] for s in info} >= {SMOL, TUMOUR}
    assert all(not s["metric"]["replica"].startswith("pid-") for s in info)
    queue = _query(prometheus, "ray_medserve_audit_queue_depth")["result"]
    assert queue and all(not s["metric"]["replica"].startswith("pid-") for s in queue)


def test_up_prints_the_metrics_endpoints_and_starts_prometheus_that_down_stops(platform: Platform):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    port = free_port()
    env = {**os.environ, **platform.env, "RAY_ADDRESS": platform.target.dashboard_url,
           "MEDSERVE_DEPLOYMENTS_DIR": str(platform.repo_root / "deployments"), "MEDSERVE_PROMETHEUS_PORT": str(port),
           # The CLI runs the medserve source under test, not an installed copy.
           "PYTHONPATH": os.pathsep.join(filter(None, [str(platform.repo_root / "platform"),
                                                       os.environ.get("PYTHONPATH")]))}

    def medserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "medserve.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=600, cwd=platform.repo_root)

    targets = metrics_targets(platform.target.dashboard_url, platform.env.get("RAY_AUTH_TOKEN") or None)
    try:
        up = medserve("up", "--detach", "--with-prometheus")
        assert up.returncode == 0, up.stderr[-3000:]
        for target in targets:
            assert f"http://{target}/metrics" in up.stdout
        assert f"Prometheus: http://127.0.0.1:{port}" in up.stdout
        ready = httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=10.0)
        assert ready.status_code == 200
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10.0).json()["data"]["groups"]
        assert {group["name"] for group in rules} == {"medserve-recording", "medserve-alerts"}

        down = medserve("down")
        assert down.returncode == 0 and "Prometheus stopped." in down.stdout, down.stdout + down.stderr
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2.0)
    finally:
        stop_prometheus(platform.settings.resolved_home / "prometheus")  # when `down` did not get to it
        platform.apply()  # later tests expect the catalog to be served
