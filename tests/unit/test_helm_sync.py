"""The chart's copies of the catalog, its Serve config and the monitoring material never drift.

Helm reads only files inside the chart; `make helm-sync` copies the masters in.
These tests run that very make target into a scratch copy of the chart and
compare, so a stale copy (or a broken target) fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from medserve.controlplane.render import COMPLIANCE_SETTING_NAMES, RenderOptions, render_serve_config
from medserve.settings import GATEWAY_SETTING_NAMES, Settings
from medserve.specs import load_catalog
from tests.unit.helm_support import CHART, REPO_ROOT, by_kind, one, render

pytestmark = pytest.mark.slow

# (master folder, glob, folder inside the chart)
COPIES = [
    ("deployments", "*.yaml", "files/deployments"),
    ("monitoring/grafana", "*.json", "dashboards"),
    ("monitoring/prometheus", "*rules*.yaml", "files/prometheus-rules"),
]


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob(pattern))}


@pytest.fixture(scope="module")
def synced_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make helm-sync` run now, into a scratch copy of the chart."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    chart = tmp_path_factory.mktemp("chart") / "medserve"
    shutil.copytree(CHART, chart)
    result = subprocess.run(
        ["make", "--no-print-directory", "helm-sync", f"CHART={chart}", f"VENV={sys.prefix}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return chart


def test_serve_config_matches_what_medserve_render_produces_now(synced_chart):
    committed = (CHART / "files" / "serve-config.yaml").read_text()
    assert committed == (synced_chart / "files" / "serve-config.yaml").read_text(), (
        "helm/medserve/files/serve-config.yaml is stale: run `make helm-sync`"
    )


def test_serve_config_is_the_catalog_rendered_for_a_pod(repo_root):
    """Independent of make: the shipped file is render_serve_config(catalog) with the proxy on every interface."""
    committed = yaml.safe_load((CHART / "files" / "serve-config.yaml").read_text())
    defaults = {name: Settings.model_fields[name].get_default(call_default_factory=True) for name in GATEWAY_SETTING_NAMES}
    compliance = {name: Settings.model_fields[name].get_default() for name in COMPLIANCE_SETTING_NAMES}
    options = RenderOptions(http_host="0.0.0.0", gateway_settings=defaults, compliance_settings=compliance)
    assert committed == render_serve_config(load_catalog(repo_root / "deployments"), options)


@pytest.mark.parametrize(("master", "pattern", "copy"), COPIES, ids=[c[0] for c in COPIES])
def test_chart_copies_match_their_masters(synced_chart, master: str, pattern: str, copy: str):
    masters = _files(REPO_ROOT / master, pattern)
    assert _files(CHART / copy, pattern) == masters, f"helm/medserve/{copy} drifted from {master}: run `make helm-sync`"
    assert _files(synced_chart / copy, pattern) == masters


def test_rendered_rayservice_carries_the_synced_config():
    rayservice = one(render(), "RayService")
    assert rayservice["spec"]["serveConfigV2"] == (CHART / "files" / "serve-config.yaml").read_text()


def test_catalog_configmap_holds_every_spec():
    data = one(render(), "ConfigMap", "-catalog")["data"]
    assert {name: text.encode() for name, text in data.items()} == _files(REPO_ROOT / "deployments", "*.yaml")


# --- dashboards and rules: one object per file, nothing without files ----------------------


def _dashboard_maps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]


def test_one_labelled_configmap_per_shipped_dashboard():
    shipped = _files(CHART / "dashboards", "*.json")
    maps = _dashboard_maps(render())
    # With no dashboards in monitoring/grafana/ yet, the feature renders nothing.
    assert sorted(name for m in maps for name in m["data"]) == sorted(shipped)
    for m in maps:
        (name, text), = m["data"].items()
        assert json.loads(text) == json.loads(shipped[name])


def test_prometheus_rule_carries_every_shipped_group():
    shipped = _files(CHART / "files" / "prometheus-rules", "*.yaml")
    docs = render(sets=("metrics.prometheusRule.enabled=true",))
    rules = by_kind(docs, "PrometheusRule")
    if not shipped:
        assert rules == []
        return
    (rule,) = rules
    expected = [group for text in shipped.values() for group in yaml.safe_load(text)["groups"]]
    assert rule["spec"]["groups"] == expected
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_and_rule_templates_with_sample_files(tmp_path):
    """The mechanism itself, on a scratch chart with a sample dashboard and rule file."""
    chart = tmp_path / "medserve"
    shutil.copytree(CHART, chart)
    for shipped in [*(chart / "dashboards").glob("*.json"), *(chart / "files" / "prometheus-rules").glob("*.yaml")]:
        shipped.unlink()  # only the sample files below
    sample = {"title": "Sample", "uid": "sample", "panels": []}
    (chart / "dashboards" / "Sample_Board.json").write_text(json.dumps(sample))
    # Prometheus' own {{ $labels }} templating must pass through Helm untouched.
    alert = {"alert": "SampleDown", "expr": "up == 0", "for": "5m", "annotations": {"summary": "{{ $labels.pod }} down"}}
    groups = [{"name": "sample", "rules": [alert]}]
    (chart / "files" / "prometheus-rules" / "sample-rules.yaml").write_text(yaml.safe_dump({"groups": groups}))

    docs = render(chart=chart, sets=("metrics.prometheusRule.enabled=true",))
    (dashboard,) = _dashboard_maps(docs)
    assert dashboard["metadata"]["name"] == "rel-medserve-dashboard-sample-board"
    assert json.loads(dashboard["data"]["Sample_Board.json"]) == sample
    assert one(docs, "PrometheusRule")["spec"]["groups"] == groups

    off = render(chart=chart, sets=("metrics.dashboards.enabled=false",))
    assert _dashboard_maps(off) == [] and by_kind(off, "PrometheusRule") == []
