"""The registry's admin API and CLI against a real SQLite database (no Ray)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from medserve.cli.main import cli
from medserve.controlplane.render import catalog_entry
from medserve.db.engine import session_scope
from medserve.gateway.app import create_app
from medserve.gateway.state import GatewayState, set_gateway
from medserve.registry import lifecycle
from medserve.registry.service import register_version
from medserve.security.api_keys import create_api_key
from medserve.specs import load_spec

TUMOUR = "brain-mri-tumour"


@pytest.fixture
def tumour(repo_root):
    return load_spec(repo_root / "deployments" / "brain-mri-tumour.yaml")


def _version(spec, version):
    return spec.model_copy(update={"model": spec.model.model_copy(update={"version": version})})


@pytest.fixture
def gateway(database_url, tumour, tmp_path):
    with session_scope(database_url) as session:
        base = register_version(session, tumour, "tester")
        lifecycle.ensure_alias(session, base.model, "production", base, "tester")
    state = GatewayState(
        [catalog_entry(tumour).model_dump(mode="json")],
        # The approval gate is what this test exercises: set it, whatever the environment says.
        {"database_url": database_url, "home": str(tmp_path), "rollout_cache_seconds": 0,
         "require_approved_versions": True},
    )
    set_gateway(state)
    yield state
    set_gateway(None)
    state.close()


def _key(database_url, role):
    with session_scope(database_url) as session:
        return create_api_key(session, name=f"test {role}", role=role)[1]


def test_admin_api_runs_the_version_lifecycle(database_url, gateway, tumour):
    admin = {"Authorization": f"Bearer {_key(database_url, 'admin')}"}
    app_key = {"Authorization": f"Bearer {_key(database_url, 'clinical-app')}"}
    client = TestClient(create_app())

    assert client.get("/admin/models", headers=app_key).status_code == 403
    candidate = _version(tumour, "0.2.0").model_dump(mode="json")
    created = client.post("/admin/models/versions", headers=admin, json=candidate)
    assert created.status_code == 201 and created.json()["status"] == "registered"

    refused = client.post(f"/admin/models/{TUMOUR}/rollout", headers=admin,
                          json={"mode": "canary", "version": "0.2.0", "percent": 20})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "version_not_approved"
    skipped = client.post(f"/admin/models/{TUMOUR}/versions/0.2.0/approve", headers=admin)
    assert skipped.json()["error"]["code"] == "invalid_status_transition"
    for action in ("validate", "approve"):
        assert client.post(f"/admin/models/{TUMOUR}/versions/0.2.0/{action}", headers=admin).status_code == 200
    versions = {v["version"]: v for v in client.get(f"/admin/models/{TUMOUR}/versions", headers=admin).json()["versions"]}
    assert versions["0.2.0"]["approved_by"].startswith("test admin")

    started = client.post(f"/admin/models/{TUMOUR}/rollout", headers=admin,
                          json={"mode": "canary", "version": "0.2.0", "percent": 20})
    assert started.status_code == 200
    listing = client.get("/admin/models", headers=admin).json()["models"][0]
    assert listing["rollout"] == {**listing["rollout"], "mode": "canary", "candidate": "0.2.0", "percent": 20}

    rolled = client.post(f"/admin/models/{TUMOUR}/rollback", headers=admin)
    assert rolled.json() == {"model": TUMOUR, "action": "rollout_ended", "version": "0.1.1"}
    again = client.post(f"/admin/models/{TUMOUR}/rollback", headers=admin)
    assert again.status_code == 409 and again.json()["error"]["code"] == "rollout_conflict"
    events = client.get(f"/admin/models/{TUMOUR}/history", headers=admin).json()["events"]
    assert [e["action"] for e in events][-4:] == ["validated", "approved", "canary", "rollback"]
    assert events[-3]["actor"].startswith("test admin")
    report = client.get(f"/admin/models/{TUMOUR}/comparison", headers=admin).json()
    assert report["model"] == TUMOUR and report["versions"] == []


def test_models_cli_registers_validates_approves_and_lists(database_url, tumour, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSERVE_DATABASE_URL", database_url)
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    spec_file = tmp_path / "candidate.yaml"
    spec_file.write_text(json.dumps(_version(tumour, "0.2.0").model_dump(mode="json")))  # JSON is YAML
    runner = CliRunner()

    result = runner.invoke(cli, ["models", "register", "-f", str(spec_file), "--by", "ml team"])
    assert result.exit_code == 0 and "brain-mri-tumour 0.2.0: registered" in result.output
    assert runner.invoke(cli, ["models", "validate", TUMOUR, "0.2.0", "--by", "qa"]).exit_code == 0
    approved = runner.invoke(cli, ["models", "approve", TUMOUR, "0.2.0", "--by", "Dr A"])
    assert "approved (by Dr A)" in approved.output
    versions = runner.invoke(cli, ["models", "versions", TUMOUR]).output
    assert "0.2.0" in versions and "approved by Dr A" in versions
    assert runner.invoke(cli, ["models", "alias", TUMOUR, "staging", "0.2.0"]).exit_code == 0
    assert "staging=0.2.0" in runner.invoke(cli, ["models", "list"]).output
    # Rollouts need the running platform; without `medserve up` state they say so.
    refused = runner.invoke(cli, ["rollout", TUMOUR, "--canary", "0.2.0", "--percent", "20"])
    assert refused.exit_code != 0 and "not up here" in refused.output
