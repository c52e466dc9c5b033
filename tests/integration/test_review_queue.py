"""LLM answers under human oversight, on the shared Ray cluster: a spec whose review policy requires review
turns every answer given through the openai SDK into a pending result that a clinician of the calling
department lists, edits and signs; the edit, the original's digest and the decision share the audit row."""

from __future__ import annotations

import hashlib
import time
import uuid

import openai
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select

from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, Review, StoredResult
from medserve.specs import ReviewSpec

from .conftest import Platform, json_of, new_patient_id

SMOL = "smollm2-135m-instruct"
FHIR_JSON = "application/fhir+json"


def _stored(platform: Platform, inference_id: str) -> StoredResult | None:
    with session_scope(platform.database_url) as session:
        return session.get(StoredResult, uuid.UUID(inference_id))


@pytest.fixture(scope="module")
def reviewed(platform: Platform):
    """The catalog with SmolLM2 under a review policy for the icu department (answer text kept)."""
    policy = ReviewSpec(required=True, departments=["icu"], store_output=True, retention_days=30)
    specs = [spec.model_copy(update={"review": policy}) if spec.name == "smollm2-demo" else spec
             for spec in platform.catalog()]
    platform.apply(specs)
    sdk = openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key=platform.key("clinical-app", department="icu"),
                        max_retries=0)
    # Serve may report RUNNING for a moment before the new gateway takes over: wait for a pending result.
    deadline = time.monotonic() + 180
    while True:
        probe = sdk.chat.completions.with_raw_response.create(
            model=SMOL, messages=[{"role": "user", "content": "ok?"}], max_tokens=2)
        if _stored(platform, probe.headers["x-medserve-inference-id"]) is not None:
            break
        if time.monotonic() > deadline:
            pytest.fail("the review policy did not take effect")
        time.sleep(1)
    yield sdk
    platform.apply()


def test_sdk_answer_is_pending_edited_by_its_department_and_linked_to_its_audit_row(
        platform: Platform, reviewed: openai.OpenAI):
    patient = new_patient_id()
    raw = reviewed.chat.completions.with_raw_response.create(
        model=SMOL, messages=[{"role": "user", "content": "Name one sign of sepsis."}], max_tokens=12,
        temperature=0, seed=3, extra_headers={"X-Patient-Id": patient})
    completion = raw.parse()  # the answer comes back as usual
    answer = completion.choices[0].message.content
    assert answer and completion.usage.completion_tokens <= 12
    inference_id = raw.headers["x-medserve-inference-id"]
    digest = hashlib.sha256(answer.encode()).hexdigest()

    # One pending result for this answer, with its digest and its text (store_output); no input text.
    stored = _stored(platform, inference_id)
    assert stored is not None and stored.review_required and stored.department == "icu"
    assert (stored.content_sha256, stored.output_text, stored.input_text) == (digest, answer, None)
    (row,) = platform.audit_rows_for_patient(patient)
    assert str(row.id) == inference_id and row.output_sha256 == digest and row.model_version == "0.1.2-q4_1"

    icu, cardio = platform.key("clinician", department="icu"), platform.key("clinician", department="cardiology")
    with platform.client(icu) as clinician:
        before = {r["model_version"]: r for r in json_of(clinician.get("/v1/reviews/summary", params={"model": SMOL}))["data"]}
        pending = json_of(clinician.get("/v1/reviews/pending", params={"model": SMOL, "limit": 1000}))["data"]
        (item,) = [p for p in pending if p["inference_id"] == inference_id]
        assert (item["output_text"], item["content_sha256"], item["model_version"]) == (answer, digest, "0.1.2-q4_1")
    with platform.client(cardio) as other:
        listed = json_of(other.get("/v1/reviews/pending", params={"limit": 1000}))["data"]
        assert inference_id not in {p["inference_id"] for p in listed}
        refused = other.post(f"/v1/reviews/{inference_id}",
                             json={"decision": "edit", "comment": "no", "edited_text": "no"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
        assert other.get(f"/v1/reports/{inference_id}").status_code == 403
    with platform.client(platform.key("auditor")) as auditor:
        assert auditor.post(f"/v1/reviews/{inference_id}", json={"decision": "accept"}).status_code == 403
        preliminary = auditor.get(f"/v1/reports/{inference_id}", headers={"Accept": FHIR_JSON})
        assert DiagnosticReport.model_validate(preliminary.json()).status == "preliminary"

    edited = "Fever above 38 C with tachycardia; check lactate."
    with platform.client(icu) as clinician:
        done = clinician.post(f"/v1/reviews/{inference_id}",
                              json={"decision": "edit", "comment": "more specific", "edited_text": edited})
        assert done.status_code == 200, done.text
        after = {r["model_version"]: r for r in json_of(clinician.get("/v1/reviews/summary", params={"model": SMOL}))["data"]}
        fhir = clinician.get(f"/v1/reports/{inference_id}", headers={"Accept": FHIR_JSON})
    with session_scope(platform.database_url) as session:
        review = session.scalar(select(Review).where(Review.inference_id == row.id))
        audit = session.get(AuditRecord, review.inference_id)
        assert (review.decision, review.edited_text, review.original_sha256) == ("edit", edited, audit.output_sha256)
        assert review.model_version == audit.model_version == "0.1.2-q4_1"
    version = before["0.1.2-q4_1"]
    moved = after["0.1.2-q4_1"]
    assert moved["edited"] == version["edited"] + 1 and moved["pending"] == version["pending"] - 1
    assert moved["override_rate"] is not None and moved["override_rate"] != version["override_rate"]
    report = DiagnosticReport.model_validate(fhir.json())
    assert report.status == "amended" and report.conclusion.startswith(edited)


def test_streamed_answer_is_pending_too_and_another_departments_answer_is_not(platform: Platform, reviewed):
    raw = reviewed.chat.completions.with_raw_response.create(
        model=SMOL, messages=[{"role": "user", "content": "Name one sign of shock."}], max_tokens=8,
        temperature=0, stream=True)
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Stored before the stream's last event, so it is there once the client has read it all.
    stored = _stored(platform, raw.headers["x-medserve-inference-id"])
    assert stored is not None and stored.review_required
    assert (stored.output_text, stored.content_sha256) == (text, hashlib.sha256(text.encode()).hexdigest())

    cardiology = openai.OpenAI(base_url=f"{platform.base_url}/v1", max_retries=0,
                               api_key=platform.key("clinical-app", department="cardiology"))
    raw = cardiology.chat.completions.with_raw_response.create(
        model=SMOL, messages=[{"role": "user", "content": "ok?"}], max_tokens=2)
    assert raw.parse().choices[0].message.content is not None
    assert _stored(platform, raw.headers["x-medserve-inference-id"]) is None
