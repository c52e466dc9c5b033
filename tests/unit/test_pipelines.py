"""Pipeline specs, the hu_roi analyzers, reports and FHIR, clinician sign-off (no Ray)."""

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, utcnow
from medserve.engines.builtin import parameter_sha256
from medserve.engines.loader import load_engine
from medserve.engines.serve_app import ModelServer
from medserve.errors import (
    AlreadyReviewedError,
    ArtifactIntegrityError,
    InputConstraintError,
    NotReviewableError,
    SpecError,
)
from medserve.imaging.report import INFERENCE_ID_SYSTEM, StepOutcome, build_report, to_fhir
from medserve.imaging.series import assemble_series
from medserve.reviews.service import ReviewRequest, override_summary, pending_results, record_review
from medserve.security.api_keys import Principal, create_api_key
from medserve.security.roles import Role
from medserve.specs import DeploymentSpec, PipelineSpec, load_catalog, parse_spec
from tests.series_data import BONE_ROI, MUSCLE_ROI, ct_series, mr_instance


@pytest.fixture(scope="module")
def catalog(repo_root):
    return {spec.name: spec for spec in load_catalog(repo_root / "deployments")}


def run(coroutine):
    return asyncio.run(coroutine)


# --- specs -----------------------------------------------------------------


def test_kind_discriminates_and_defaults_to_deployment(catalog):
    assert isinstance(catalog["brain-mri-tumour"], DeploymentSpec)
    assert catalog["brain-mri-tumour"].kind == "deployment"
    pipeline = catalog["ct-opportunistic-screen"]
    assert isinstance(pipeline, PipelineSpec)
    assert [s.model for s in pipeline.steps] == ["ct-trabecular-bone-hu", "ct-liver-attenuation-hu", "ct-pancreas-screen"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "pipeline", "name": "p", "version": "1", "steps": [{"name": "a", "model": "m"}], "x": 1}, ": x:"),
        ({"kind": "pipeline", "name": "p", "version": "1", "steps": []}, ": steps:"),
        ({"kind": "pipeline", "name": "p", "version": "1",
          "steps": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, "unique"),
        ({"kind": "workflow", "name": "p"}, "kind"),
    ],
)
def test_bad_pipeline_specs_are_named(data, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(data, "p.yaml")
    assert message in caught.value.message


def test_pipeline_steps_must_name_catalog_imaging_models(tmp_path: Path, repo_root):
    for name in ("brain-mri-tumour", "mr-brain-screen"):
        (tmp_path / f"{name}.yaml").write_text((repo_root / "deployments" / f"{name}.yaml").read_text())
    load_catalog(tmp_path)
    data = yaml.safe_load((tmp_path / "mr-brain-screen.yaml").read_text())
    data["steps"][0]["model"] = "no-such-model"
    (tmp_path / "mr-brain-screen.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="no imaging model of this catalog"):
        load_catalog(tmp_path)


def test_builtin_artifacts_belong_to_builtin_engines(catalog):
    data = catalog["brain-mri-tumour"].model_dump(mode="json")
    data["model"]["artifact"]["uri"] = "builtin://hu_roi"
    with pytest.raises(SpecError, match="builtin"):
        parse_spec(data)
    data = catalog["ct-trabecular-bone-hu"].model_dump(mode="json")
    data["model"]["artifact"]["uri"] = "/models/x.onnx"
    with pytest.raises(SpecError, match="builtin://hu_roi"):
        parse_spec(data)


# --- hu_roi ------------------------------------------------------------------


def test_catalog_pins_the_digest_of_each_analyzer_parameter_document(catalog):
    for name in ("ct-trabecular-bone-hu", "ct-liver-attenuation-hu"):
        spec = catalog[name]
        assert spec.model.artifact.sha256 == parameter_sha256(spec)
        _, digest = load_engine(spec)
        assert digest == spec.model.artifact.sha256


def test_changing_a_threshold_without_a_new_pin_is_refused(catalog):
    data = catalog["ct-liver-attenuation-hu"].model_dump(mode="json")
    data["model"]["parameters"]["flag_below_hu"] = 48
    with pytest.raises(ArtifactIntegrityError) as caught:
        load_engine(DeploymentSpec.model_validate(data))
    assert caught.value.details["actual"] != caught.value.details["expected"]


def test_bone_and_liver_findings_from_request_rois(catalog):
    volume = assemble_series(ct_series(3))
    bone = ModelServer(catalog["ct-trabecular-bone-hu"].model_dump(mode="json"))
    liver = ModelServer(catalog["ct-liver-attenuation-hu"].model_dump(mode="json"))
    (bone_finding,) = run(bone.analyze_series(volume, BONE_ROI))["findings"]
    assert bone_finding["code"] == "trabecular-bone-attenuation"
    assert bone_finding["value"] == pytest.approx(205.8, abs=0.1) and bone_finding["unit"] == "HU"
    assert bone_finding["flag"] is False and bone_finding["details"]["threshold_hu"] == 160
    assert bone_finding["details"]["roi"]["source"] == "request"
    # Paraspinal muscle (about 18 HU) stands in for a fatty liver: below 40 HU is flagged.
    result = run(liver.analyze_series(volume, MUSCLE_ROI))
    assert result["findings"][0]["flag"] is True and result["findings"][0]["value"] < 40
    assert len(result["output_sha256"]) == 64


def test_default_roi_is_documented_in_the_finding(catalog):
    volume = assemble_series(ct_series(4))
    bone = ModelServer(catalog["ct-trabecular-bone-hu"].model_dump(mode="json"))
    (finding,) = run(bone.analyze_series(volume, None))["findings"]
    roi = finding["details"]["roi"]
    assert roi["source"] == "default"
    assert roi["z"] == [1, 4]  # an odd count of slices centred on slice 2, at most 10 mm at 2.5 mm
    assert finding["details"]["voxels"] == 3 * 21 * 21  # 15 mm at 0.66 mm: 21 voxels


def test_liver_refuses_contrast_ct_and_analyzers_refuse_mr(catalog):
    liver = ModelServer(catalog["ct-liver-attenuation-hu"].model_dump(mode="json"))
    refused = run(liver.analyze_series(assemble_series(ct_series(2, contrast=True)), MUSCLE_ROI))
    assert refused["error"]["code"] == InputConstraintError.code
    bone = ModelServer(catalog["ct-trabecular-bone-hu"].model_dump(mode="json"))
    refused = run(bone.analyze_series(assemble_series([mr_instance()]), None))
    assert refused["error"]["code"] == InputConstraintError.code


def test_tumour_classifier_takes_an_mr_series_and_refuses_ct(catalog):
    tumour = ModelServer(catalog["brain-mri-tumour"].model_dump(mode="json"))
    (finding,) = run(tumour.analyze_series(assemble_series([mr_instance()]), None))["findings"]
    assert finding["label"] in {"glioma", "meningioma", "notumor", "pituitary"}
    assert len(finding["details"]["probabilities"]) == 4
    refused = run(tumour.analyze_series(assemble_series(ct_series(2)), None))
    assert refused["error"]["code"] == "input_not_supported"


# --- report and FHIR ------------------------------------------------------------


def _report(catalog):
    pipeline = catalog["ct-opportunistic-screen"]
    steps = [
        StepOutcome(name="bone", model="ct-trabecular-bone-hu", inference_id=str(uuid.uuid4()), model_version="1.0.0",
                    artifact_sha256="a" * 64,
                    findings=[{"code": "trabecular-bone-attenuation", "display": "Bone", "value": 98.5, "unit": "HU",
                               "flag": True, "interpretation": "below threshold",
                               "details": {"roi": {"source": "request", "z": [0, 1]}}}]),
        StepOutcome(name="tumour", model="brain-mri-tumour", inference_id=str(uuid.uuid4()), model_version="0.1.1",
                    findings=[{"code": "c", "display": "Class", "label": "notumor", "value": 0.9, "unit": "probability",
                               "flag": None, "interpretation": "most probable class: notumor",
                               "details": {"probabilities": [{"label": "notumor", "probability": 0.9},
                                                             {"label": "glioma", "probability": 0.1}]}}]),
        StepOutcome(name="pancreas", model="ct-pancreas-screen", inference_id=str(uuid.uuid4()), status="failed",
                    error={"code": "model_unavailable", "message": "not deployed"}),
    ]
    report = build_report(pipeline, str(uuid.uuid4()), {"instances": 3}, steps, utcnow())
    return report, to_fhir(report, pipeline, steps), steps


def test_report_links_each_finding_to_its_step_audit_record(catalog):
    report, _, steps = _report(catalog)
    assert report["status"] == "draft"
    assert [f["inference_id"] for f in report["findings"]] == [steps[0].inference_id, steps[1].inference_id]
    assert report["steps"][2]["status"] == "failed" and report["steps"][2]["error"]["code"] == "model_unavailable"


def test_fhir_diagnostic_report_is_valid_r4_with_one_observation_per_finding(catalog):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    report, fhir, steps = _report(catalog)
    parsed = DiagnosticReport.model_validate(fhir)
    assert parsed.status == "preliminary"
    observations = [r for r in fhir["contained"] if r["resourceType"] == "Observation"]
    assert len(observations) == len(parsed.result) == 3  # two findings and the failed step
    linked = {o["identifier"][0]["value"]: o for o in observations}
    assert {o["identifier"][0]["system"] for o in observations} == {INFERENCE_ID_SYSTEM}
    assert set(linked) == {s.inference_id for s in steps}
    bone = linked[steps[0].inference_id]
    assert bone["status"] == "preliminary" and bone["valueQuantity"]["code"] == "[hnsf'U]"
    assert bone["interpretation"][0]["coding"][0]["code"] == "L"
    assert linked[steps[1].inference_id]["valueCodeableConcept"]["text"] == "notumor"
    failed = linked[steps[2].inference_id]
    assert failed["status"] == "cancelled" and failed["dataAbsentReason"]["text"] == "model_unavailable"
    assert "failed: pancreas" in fhir["conclusion"]


# --- sign-off --------------------------------------------------------------------


def _audit_row(database_url, model="ct-trabecular-bone-hu", version="1.0.0", operation="pipeline.step", outcome="ok"):
    row_id = uuid.uuid4()
    with session_scope(database_url) as session:
        session.add(AuditRecord(id=row_id, created_at=utcnow(), model_name=model, model_version=version,
                                operation=operation, outcome=outcome, http_status=200, latency_ms=1.0))
    return row_id


CLINICIAN = Principal(key_id="k1", name="dr who", role=Role.CLINICIAN, department=None)


def _review(database_url, inference_id, **body):
    with session_scope(database_url) as session:
        return record_review(session, inference_id, ReviewRequest.model_validate(body), CLINICIAN)


def test_accept_edit_reject_are_recorded_once_and_summarised(database_url):
    accepted, edited, rejected, pending = (_audit_row(database_url) for _ in range(4))
    other = _audit_row(database_url, model="brain-mri-tumour", version="0.1.1", operation="imaging.analyze")
    assert _review(database_url, accepted, decision="accept")["fhir_status"] == "final"
    edit = _review(database_url, edited, decision="edit", comment="ROI on cortex",
                   corrected_finding={"value": 120.0, "flag": True})
    assert edit["fhir_status"] == "amended" and edit["corrected_finding"] == {"value": 120.0, "flag": True}
    assert _review(database_url, rejected, decision="reject", comment="wrong level")["decision"] == "reject"
    with pytest.raises(AlreadyReviewedError):
        _review(database_url, accepted, decision="reject", comment="changed my mind")
    with session_scope(database_url) as session:
        waiting = pending_results(session)
        assert {item["inference_id"] for item in waiting} == {str(pending), str(other)}
        assert [i["inference_id"] for i in pending_results(session, "brain-mri-tumour")] == [str(other)]
        (bone,) = override_summary(session, "ct-trabecular-bone-hu")
    assert bone == {"model": "ct-trabecular-bone-hu", "model_version": "1.0.0", "results": 4, "reviewed": 3,
                    "pending": 1, "accepted": 1, "edited": 1, "rejected": 1, "override_rate": round(2 / 3, 4)}


def test_envelopes_and_failed_requests_are_not_reviewable(database_url):
    for operation, outcome in (("pipeline.run", "ok"), ("pipeline.step", "error")):
        row = _audit_row(database_url, operation=operation, outcome=outcome)
        with pytest.raises(NotReviewableError):
            _review(database_url, row, decision="accept")


@pytest.mark.parametrize(
    "body",
    [
        {"decision": "edit", "comment": "x"},  # no corrected finding
        {"decision": "reject"},  # no comment
        {"decision": "accept", "corrected_finding": {"value": 1}},
        {"decision": "edit", "comment": "x", "corrected_finding": {}},
        {"decision": "maybe"},
    ],
)
def test_inconsistent_review_requests_are_refused(body):
    with pytest.raises(ValueError):
        ReviewRequest.model_validate(body)


@pytest.fixture
def gateway_client(database_url, tmp_path):
    from medserve.gateway.app import create_app
    from medserve.gateway.state import GatewayState, set_gateway

    state = GatewayState([], {"database_url": database_url, "home": str(tmp_path)})
    set_gateway(state)
    try:
        yield TestClient(create_app())
    finally:
        set_gateway(None)
        state.close()


def _key(database_url, role):
    with session_scope(database_url) as session:
        return {"Authorization": f"Bearer {create_api_key(session, name=role, role=role)[1]}"}


def test_review_routes_enforce_roles(database_url, gateway_client):
    row = _audit_row(database_url)
    app, auditor, clinician = (_key(database_url, r) for r in ("clinical-app", "auditor", "clinician"))
    accept = json.dumps({"decision": "accept"})
    denied = gateway_client.post(f"/v1/reviews/{row}", content=accept, headers=app)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    assert gateway_client.post(f"/v1/reviews/{row}", content=accept, headers=auditor).status_code == 403
    listed = gateway_client.get("/v1/reviews/pending", params={"model": "ct-trabecular-bone-hu"}, headers=auditor)
    assert listed.status_code == 200 and [i["inference_id"] for i in listed.json()["data"]] == [str(row)]
    assert gateway_client.get("/v1/reviews/pending", headers=app).status_code == 403
    done = gateway_client.post(f"/v1/reviews/{row}", content=accept, headers={**clinician, "X-Clinician-Id": "D-1"})
    assert done.status_code == 200 and done.json()["decision"] == "accept"
    again = gateway_client.post(f"/v1/reviews/{row}", content=accept, headers=clinician)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_reviewed"
    assert gateway_client.post(f"/v1/reviews/{uuid.uuid4()}", content=accept, headers=clinician).status_code == 404
    bad = gateway_client.post(f"/v1/reviews/{row}", content=b'{"decision": "reject"}', headers=clinician)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    summary = gateway_client.get("/v1/reviews/summary", headers=auditor).json()["data"]
    assert summary[0]["accepted"] == 1 and summary[0]["override_rate"] == 0.0


def test_cli_hashes_an_analyzer_spec_and_prints_the_pipeline_schema(repo_root, catalog):
    from click.testing import CliRunner

    from medserve.cli.main import cli

    path = repo_root / "deployments" / "ct-liver-attenuation-hu.yaml"
    hashed = CliRunner().invoke(cli, ["artifact", "hash", "--spec", str(path)])
    assert hashed.exit_code == 0 and hashed.output.strip() == catalog["ct-liver-attenuation-hu"].model.artifact.sha256
    schema = CliRunner().invoke(cli, ["schema", "--kind", "pipeline"])
    assert schema.exit_code == 0 and json.loads(schema.output)["additionalProperties"] is False
