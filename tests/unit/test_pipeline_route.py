"""The pipeline route in-process (no Ray): the steps, the report, refusals, audit rows per step."""

from __future__ import annotations

import contextlib
import json
from typing import Any


from medserve.catalog import CatalogEntry
from medserve.errors import InputConstraintError
from medserve.specs import load_catalog, pipelines_of
from tests.series_data import BONE_ROI, ct_series, multipart

from .fake_gateway import REPO_ROOT, CannedGateway, gateway_client, make_key

CT_PIPELINE = "/v1/pipelines/ct-opportunistic-screen/studies"


class SeriesGateway(CannedGateway):
    """Answers analyze_series for every step, refusing the models in ``refuse``."""

    refuse: set[str] = set()

    async def _call(self, entry: CatalogEntry, method: str, *args: Any) -> dict[str, Any]:
        self.calls.append(f"{method} {entry.model_name}")
        if entry.model_name in self.refuse:
            raise InputConstraintError("not this series", model=entry.model_name)
        roi = args[1] if len(args) > 1 else None
        finding = {"code": entry.model_name, "display": entry.model_name, "label": "seen", "roi": roi}
        return {"output_sha256": "3" * 64, "findings": [finding]}


@contextlib.contextmanager
def _client(tmp_path, database_url, refuse=()):
    pipelines = [p.model_dump(mode="json") for p in pipelines_of(load_catalog(REPO_ROOT / "deployments"))]
    with gateway_client(tmp_path, database_url, state_class=SeriesGateway, pipelines=pipelines) as (client, state):
        state.refuse = set(refuse)
        yield client, state


def _post(client, key, options=None, accept=None):
    body, content_type = multipart(ct_series(6), json.dumps(options).encode() if options else None)
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {key}"}
    if accept:
        headers["Accept"] = accept
    return client.post(CT_PIPELINE, content=body, headers=headers)


def test_every_step_runs_with_its_roi_and_the_report_links_each_finding(tmp_path, database_url):
    key = make_key(database_url, "clinical-app", "radiology")
    with _client(tmp_path, database_url) as (client, state):
        response = _post(client, key, {"rois": {"bone": {**BONE_ROI, "z": [0, 6]}}})
        fhir = _post(client, key, accept="application/fhir+json")
    report = response.json()
    assert response.status_code == 200, report
    assert sorted(state.calls) == sorted(
        ["analyze_series ct-trabecular-bone-hu", "analyze_series ct-liver-attenuation-hu",
         "analyze_series ct-pancreas-screen"] * 2
    )
    assert [step["name"] for step in report["steps"]] == ["bone", "liver", "pancreas"]
    assert all(step["status"] == "completed" for step in report["steps"])
    findings = {finding["step"]: finding for finding in report["findings"]}
    assert findings["bone"]["roi"] == {**BONE_ROI, "z": [0, 6]} and findings["liver"]["roi"] is None
    assert len({finding["inference_id"] for finding in findings.values()} | {report["inference_id"]}) == 4
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "DiagnosticReport"


def test_a_refusing_step_is_reported_and_only_all_refusing_refuses_the_series(tmp_path, database_url):
    key = make_key(database_url, "clinical-app", "radiology")
    with _client(tmp_path, database_url, refuse={"ct-pancreas-screen"}) as (client, _):
        some = _post(client, key)
    steps = {step["name"]: step for step in some.json()["steps"]}
    assert some.status_code == 200
    assert steps["pancreas"]["status"] == "failed"
    assert steps["pancreas"]["error"] == {"code": InputConstraintError.code, "message": "not this series"}
    everything = {"ct-trabecular-bone-hu", "ct-liver-attenuation-hu", "ct-pancreas-screen"}
    with _client(tmp_path, database_url, refuse=everything) as (client, _):
        none = _post(client, key)
    assert none.status_code == InputConstraintError.http_status
    assert none.json()["error"]["code"] == InputConstraintError.code
    assert none.json()["error"]["details"] == {"pipeline": "ct-opportunistic-screen"}


def test_rois_for_an_unknown_step_or_outside_the_series_are_refused(tmp_path, database_url):
    key = make_key(database_url, "clinical-app", "radiology")
    with _client(tmp_path, database_url) as (client, state):
        unknown = _post(client, key, {"rois": {"spleen": BONE_ROI}})
        outside = _post(client, key, {"rois": {"bone": {**BONE_ROI, "z": [0, 60]}}})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["details"] == {"fields": ["rois"], "steps": ["bone", "liver", "pancreas"]}
    assert outside.status_code == 400 and "rois.bone" in json.dumps(outside.json())
    assert state.calls == []


def test_one_audit_row_for_the_pipeline_and_one_per_step(tmp_path, database_url):
    from sqlalchemy import select

    from medserve.db.engine import session_scope
    from medserve.db.models import AuditRecord

    key = make_key(database_url, "clinical-app", "icu")
    with _client(tmp_path, database_url) as (client, _):
        response = _post(client, key)
    report = response.json()
    assert response.status_code == 200, report
    # The pancreas model is open to radiology only: its step is refused for icu, and reported.
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["pancreas"]["error"]["code"] == "permission_denied"
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(AuditRecord)))
    operations = sorted((row.operation, row.model_name, row.outcome) for row in rows)
    assert operations == [
        ("pipeline.run", "ct-opportunistic-screen", "ok"),
        ("pipeline.step", "ct-liver-attenuation-hu", "ok"),
        ("pipeline.step", "ct-pancreas-screen", "denied"),
        ("pipeline.step", "ct-trabecular-bone-hu", "ok"),
    ]
