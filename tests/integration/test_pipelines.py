"""One sweep, several checks, on the real cluster: series in, one report out, clinician sign-off."""

from __future__ import annotations

import json

import pytest

from tests.series_data import BONE_ROI, MUSCLE_ROI, ct_series, mr_instance, multipart

from .conftest import Platform, json_of, new_patient_id

pytestmark = pytest.mark.slow

CT_PIPELINE = "/v1/pipelines/ct-opportunistic-screen/studies"
MR_PIPELINE = "/v1/pipelines/mr-brain-screen/studies"


@pytest.fixture(scope="module")
def keys(platform: Platform) -> dict[str, str]:
    return {role: platform.key(role) for role in ("clinical-app", "clinician", "auditor")}


def _post(platform: Platform, key: str, path: str, instances: list[bytes], options: dict | None = None,
          patient: str | None = None, accept: str | None = None):
    body, content_type = multipart(instances, json.dumps(options).encode() if options else None)
    headers = {"Content-Type": content_type}
    if patient:
        headers["X-Patient-Id"] = patient
    if accept:
        headers["Accept"] = accept
    with platform.client(key) as client:
        return client.post(path, content=body, headers=headers)


def test_ct_series_comes_back_as_one_report_with_findings_linked_to_audit_rows(platform: Platform, keys):
    patient = new_patient_id()
    response = _post(platform, keys["clinical-app"], CT_PIPELINE, ct_series(6),
                     {"rois": {"bone": {**BONE_ROI, "z": [0, 6]}, "liver": {**MUSCLE_ROI, "z": [2, 4]}}}, patient)
    report = json_of(response)
    assert response.status_code == 200, report
    assert report["status"] == "draft" and report["series"]["instances"] == 6
    assert report["series"]["ordered_by"] == "position"
    steps = {step["name"]: step for step in report["steps"]}
    assert steps["bone"]["status"] == steps["liver"]["status"] == "completed"
    # The pancreas model needs a GPU node: skipped here, so its step fails and the rest is returned.
    assert steps["pancreas"]["status"] == "failed" and steps["pancreas"]["error"]["code"] == "model_unavailable"
    findings = {finding["step"]: finding for finding in report["findings"]}
    assert set(findings) == {"bone", "liver"}
    assert findings["bone"]["flag"] is False and findings["liver"]["flag"] is True

    rows = {str(row.id): row for row in platform.audit_rows_for_patient(patient)}
    assert len(rows) == 4  # the pipeline and one per step
    envelope = rows[report["inference_id"]]
    assert (envelope.operation, envelope.model_name, envelope.model_version) == (
        "pipeline.run", "ct-opportunistic-screen", "1.0.0")
    for finding in findings.values():
        row = rows[finding["inference_id"]]
        assert row.operation == "pipeline.step" and row.outcome == "ok"
        assert (row.model_name, row.model_version) == (finding["model"], finding["model_version"])
        assert len(row.artifact_sha256) == 64
    failed = rows[steps["pancreas"]["inference_id"]]
    assert failed.outcome == "error" and failed.error_code == "model_unavailable"


def test_fhir_report_and_contrast_ct_marks_only_the_liver_step_failed(platform: Platform, keys):
    response = _post(platform, keys["clinical-app"], CT_PIPELINE, ct_series(3, contrast=True),
                     {"rois": {"bone": BONE_ROI}}, accept="application/fhir+json")
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("application/fhir+json")
    fhir = response.json()
    assert fhir["resourceType"] == "DiagnosticReport" and fhir["status"] == "preliminary"
    observations = [r for r in fhir["contained"] if r["resourceType"] == "Observation"]
    statuses = sorted(o["status"] for o in observations)
    assert statuses == ["cancelled", "cancelled", "preliminary"]  # liver (contrast) and pancreas failed
    assert "failed: liver, pancreas" in fhir["conclusion"]


def test_mr_instance_reaches_the_tumour_classifier(platform: Platform, keys):
    response = _post(platform, keys["clinical-app"], MR_PIPELINE, [mr_instance()])
    report = json_of(response)
    assert response.status_code == 200, report
    (finding,) = report["findings"]
    assert finding["model"] == "brain-mri-tumour" and finding["label"] in {"glioma", "meningioma", "notumor", "pituitary"}


def test_ct_series_sent_to_an_mr_only_pipeline_is_refused(platform: Platform, keys):
    response = _post(platform, keys["clinical-app"], MR_PIPELINE, ct_series(2))
    assert response.status_code == 422
    assert json_of(response)["error"]["code"] == "input_not_supported"


def test_malformed_uploads_are_4xx(platform: Platform, keys):
    with platform.client(keys["clinical-app"]) as client:
        garbage = client.post(CT_PIPELINE, content=b"--x\r\n\r\nabc",
                              headers={"Content-Type": "multipart/related; boundary=x"})
        assert garbage.status_code == 400 and json_of(garbage)["error"]["code"] == "invalid_multipart"
        wrong_type = client.post(CT_PIPELINE, content=b"x", headers={"Content-Type": "application/dicom"})
        assert wrong_type.status_code == 415
    outside = _post(platform, keys["clinical-app"], CT_PIPELINE, ct_series(2), {"rois": {"bone": {**BONE_ROI, "z": [0, 9]}}})
    assert outside.status_code == 400 and json_of(outside)["error"]["code"] == "invalid_roi"


def test_clinician_signs_off_and_auditor_lists_what_is_pending(platform: Platform, keys):
    report = json_of(_post(platform, keys["clinical-app"], CT_PIPELINE, ct_series(2),
                           {"rois": {"bone": BONE_ROI, "liver": MUSCLE_ROI}}))
    ids = {finding["step"]: finding["inference_id"] for finding in report["findings"]}
    with platform.client(keys["auditor"]) as auditor:
        pending = json_of(auditor.get("/v1/reviews/pending", params={"model": "ct-trabecular-bone-hu", "limit": 1000}))
        assert ids["bone"] in {item["inference_id"] for item in pending["data"]}
        assert auditor.post(f"/v1/reviews/{ids['bone']}", json={"decision": "accept"}).status_code == 403
    with platform.client(keys["clinical-app"]) as app:
        refused = app.post(f"/v1/reviews/{ids['bone']}", json={"decision": "accept"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    with platform.client(keys["clinician"]) as clinician:
        accepted = clinician.post(f"/v1/reviews/{ids['bone']}", json={"decision": "accept", "comment": "agree"})
        rejected = clinician.post(f"/v1/reviews/{ids['liver']}",
                                  json={"decision": "reject", "comment": "ROI is in muscle, not liver"})
        assert accepted.status_code == 200 and accepted.json()["fhir_status"] == "final"
        assert rejected.status_code == 200 and rejected.json()["fhir_status"] == "entered-in-error"
    with platform.client(keys["auditor"]) as auditor:
        pending = json_of(auditor.get("/v1/reviews/pending", params={"limit": 1000}))
        assert not {ids["bone"], ids["liver"]} & {item["inference_id"] for item in pending["data"]}
        summary = {row["model"]: row for row in json_of(auditor.get("/v1/reviews/summary"))["data"]}
    assert summary["ct-liver-attenuation-hu"]["rejected"] >= 1
    assert summary["ct-liver-attenuation-hu"]["override_rate"] > 0


def test_stored_report_is_fetched_again_with_fhir_status_following_the_reviews(platform: Platform, keys):
    """preliminary until reviewed; final once every completed step is accepted; entered-in-error once rejected."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    options = {"rois": {"bone": BONE_ROI, "liver": MUSCLE_ROI}}
    reports = [json_of(_post(platform, keys["clinical-app"], CT_PIPELINE, ct_series(2), options)) for _ in range(2)]
    with platform.client(keys["clinician"]) as clinician:
        def fetch(report_id: str) -> tuple[dict, DiagnosticReport]:
            as_json = clinician.get(f"/v1/reports/{report_id}")
            as_fhir = clinician.get(f"/v1/reports/{report_id}", headers={"Accept": "application/fhir+json"})
            assert as_fhir.headers["content-type"].startswith("application/fhir+json")
            return json_of(as_json), DiagnosticReport.model_validate(as_fhir.json())

        for report, decision, status in ((reports[0], {"decision": "accept"}, "final"),
                                         (reports[1], {"decision": "reject", "comment": "motion artefact"},
                                          "entered-in-error")):
            stored, fhir = fetch(report["report_id"])
            assert stored["report"] == report and stored["operation"] == "pipeline.run"
            assert stored["status"] == fhir.status == "preliminary" and fhir.id == report["report_id"]
            for finding in report["findings"]:
                signed = clinician.post(f"/v1/reviews/{finding['inference_id']}", json=decision)
                assert signed.status_code == 200, signed.text
            stored, fhir = fetch(report["report_id"])
            assert stored["status"] == fhir.status == status
            assert set(stored["step_reviews"]) == {finding["inference_id"] for finding in report["findings"]}
            observations = [r for r in fhir.model_dump(mode="json")["contained"] if r["resourceType"] == "Observation"]
            assert sorted(o["status"] for o in observations) == sorted(
                ["cancelled", *[{"final": "final", "entered-in-error": "entered-in-error"}[status]] * 2])
        # A single step's result is a report of its own.
        step, step_fhir = fetch(reports[0]["findings"][0]["inference_id"])
        assert step["status"] == step_fhir.status == "final" and step["review"]["decision"] == "accept"
