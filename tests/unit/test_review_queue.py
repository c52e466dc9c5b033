"""Review policy in the spec, LLM answers in the review queue, stored reports with FHIR status.

The gateway runs in process with the real ModelServer over a scripted engine
(handles faked, no Ray) and a real SQLite database; the FHIR resources are
validated with fhir.resources.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select

from medserve.cli.main import cli
from medserve.db.engine import session_scope
from medserve.db.models import Review, StoredResult, utcnow
from medserve.errors import SpecError
from medserve.reviews.reports import _status_of_steps
from medserve.reviews.results import prune_expired
from medserve.security.api_keys import create_api_key
from medserve.specs import DeploymentSpec, ReviewSpec, load_spec, parse_spec

from .test_llm_gateway import Gateway, _scripted_server

ANSWER = ["Start ", "norepinephrine ", "at ", "0.05 ", "mcg/kg/min."]
MODEL = "icu-assistant"


def _llm_spec(specs_dir: Path, **review) -> DeploymentSpec:
    data = yaml.safe_load((specs_dir / "smollm2-demo.yaml").read_text())
    data["name"] = data["model"]["name"] = MODEL
    data["review"] = review
    return parse_spec(data)


@pytest.fixture
def reviewed(database_url, tmp_path, repo_root):
    spec = _llm_spec(repo_root / "deployments", required=True, departments=["icu"], store_output=True)
    gateway = Gateway(database_url, tmp_path, {MODEL: (spec, _scripted_server(spec, ANSWER))})
    yield gateway
    gateway.close()


def _key(database_url: str, role: str, department: str | None) -> dict[str, str]:
    with session_scope(database_url) as session:
        return {"Authorization": f"Bearer {create_api_key(session, name=role, role=role, department=department)[1]}"}


def _chat(gateway: Gateway, headers: dict[str, str], **extra) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "MAP 55 after fluids: what next?"}],
            "max_tokens": 16, **extra}
    response = gateway.client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["x-medserve-inference-id"]


def _stored(database_url: str) -> list[StoredResult]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(StoredResult)))


# --- the spec section --------------------------------------------------------------


def test_review_defaults_follow_the_kind(repo_root):
    from medserve.controlplane.render import catalog_entry

    llm = _llm_spec(repo_root / "deployments")
    assert llm.review == ReviewSpec() and catalog_entry(llm).review.required is False
    imaging = load_spec(repo_root / "deployments" / "brain-mri-tumour.yaml")
    assert catalog_entry(imaging).review.required is True
    deepseek = load_spec(repo_root / "deployments" / "deepseek-r1-distill-qwen-32b.yaml")
    assert deepseek.review.required and deepseek.review.store_output and not deepseek.review.store_input


@pytest.mark.parametrize(
    ("file", "review", "message"),
    [
        ("brain-mri-tumour.yaml", {"required": False}, "cannot be false for imaging"),
        ("brain-mri-tumour.yaml", {"store_input": True}, "store_input applies to LLMs only"),
        ("smollm2-demo.yaml", {"store_output": True}, "need review.required: true"),
        ("smollm2-demo.yaml", {"required": True, "retention_days": 0}, "review.retention_days"),
        ("ct-opportunistic-screen.yaml", {"departments": ["icu"]}, "departments applies to LLMs only"),
    ],
)
def test_inconsistent_review_policies_are_refused(tmp_path, repo_root, file, review, message):
    data = yaml.safe_load((repo_root / "deployments" / file).read_text())
    data["review"] = review
    path = tmp_path / file
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(path) in caught.value.message and message in caught.value.message


def test_validate_refuses_a_typo_in_review_naming_file_and_field(tmp_path, repo_root):
    data = yaml.safe_load((repo_root / "deployments" / "smollm2-demo.yaml").read_text())
    data["review"] = {"required": True, "store_ouput": True}
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(cli, ["validate", str(bad)])
    assert result.exit_code != 0
    assert f"{bad}: review.store_ouput: Extra inputs are not permitted" in result.output


# --- LLM answers in the queue ---------------------------------------------------------


def test_llm_without_review_stores_nothing(database_url, tmp_path, repo_root):
    spec = _llm_spec(repo_root / "deployments")
    gateway = Gateway(database_url, tmp_path, {MODEL: (spec, _scripted_server(spec, ANSWER))})
    try:
        _chat(gateway, {})
        _chat(gateway, {}, stream=True)
        assert _stored(database_url) == []
        auditor = _key(database_url, "auditor", None)
        assert gateway.client.get("/v1/reviews/pending", headers=auditor).json()["data"] == []
    finally:
        gateway.close()


def test_answer_is_pending_for_its_department_edited_and_linked_to_its_audit_row(reviewed, database_url):
    icu_app, cardio_app = _key(database_url, "clinical-app", "icu"), _key(database_url, "clinical-app", "cardiology")
    whole = _chat(reviewed, icu_app)
    streamed = _chat(reviewed, icu_app, stream=True)
    _chat(reviewed, cardio_app)  # a department the policy does not cover: answered, not queued
    text = "".join(ANSWER)
    rows = {str(row.id): row for row in _stored(database_url)}
    assert set(rows) == {whole, streamed}
    assert {row.output_text for row in rows.values()} == {text} and {row.input_text for row in rows.values()} == {None}
    digest = hashlib.sha256(text.encode()).hexdigest()
    audit = {str(row.id): row for row in reviewed.rows()}
    assert rows[whole].content_sha256 == audit[whole].output_sha256 == digest

    icu, cardio = _key(database_url, "clinician", "icu"), _key(database_url, "clinician", "cardiology")
    auditor = _key(database_url, "auditor", None)
    listed = reviewed.client.get("/v1/reviews/pending", headers=icu).json()["data"]
    assert {item["inference_id"] for item in listed} == {whole, streamed}
    assert {item["output_text"] for item in listed} == {text} and listed[0]["content_sha256"] == digest
    assert reviewed.client.get("/v1/reviews/pending", headers=cardio).json()["data"] == []

    edit = {"decision": "edit", "comment": "dose per local protocol", "edited_text": "Start norepinephrine 0.1."}
    other = reviewed.client.post(f"/v1/reviews/{whole}", json=edit, headers=cardio)
    assert other.status_code == 403 and other.json()["error"]["code"] == "permission_denied"
    assert reviewed.client.post(f"/v1/reviews/{whole}", json=edit, headers=auditor).status_code == 403
    wrong_kind = reviewed.client.post(f"/v1/reviews/{whole}", headers=icu, json={
        "decision": "edit", "comment": "x", "corrected_finding": {"label": "x"}})
    assert wrong_kind.status_code == 400
    done = reviewed.client.post(f"/v1/reviews/{whole}", json=edit, headers=icu)
    assert done.status_code == 200, done.text
    signed = done.json()
    assert signed["inference_id"] == whole and signed["original_sha256"] == digest
    assert signed["edited_text"] == edit["edited_text"] and signed["fhir_status"] == "amended"
    with session_scope(database_url) as session:
        review = session.scalar(select(Review).where(Review.inference_id == audit[whole].id))
        assert (review.decision, review.original_sha256, review.edited_text) == ("edit", digest, edit["edited_text"])

    (summary,) = reviewed.client.get("/v1/reviews/summary", headers=icu).json()["data"]
    assert (summary["model"], summary["results"], summary["edited"], summary["override_rate"]) == (MODEL, 2, 1, 1.0)
    assert reviewed.client.get("/v1/reviews/summary", headers=cardio).json()["data"] == []

    report = reviewed.client.get(f"/v1/reports/{whole}", headers=auditor).json()
    assert report["status"] == "amended" and report["output_text"] == text and report["input_text"] is None
    assert report["review"]["edited_text"] == edit["edited_text"]
    fhir = reviewed.client.get(f"/v1/reports/{whole}", headers={**icu, "Accept": "application/fhir+json"})
    assert fhir.headers["content-type"].startswith("application/fhir+json")
    parsed = DiagnosticReport.model_validate(fhir.json())
    assert parsed.status == "amended" and parsed.conclusion.startswith(edit["edited_text"])
    assert reviewed.client.get(f"/v1/reports/{whole}", headers=cardio).status_code == 403

    pending = reviewed.client.get(f"/v1/reports/{streamed}", headers={**icu, "Accept": "application/fhir+json"})
    assert DiagnosticReport.model_validate(pending.json()).status == "preliminary"
    rejected = reviewed.client.post(f"/v1/reviews/{streamed}", headers=icu,
                                    json={"decision": "reject", "comment": "hallucinated MAP target"})
    assert rejected.json()["fhir_status"] == "entered-in-error"
    fhir = reviewed.client.get(f"/v1/reports/{streamed}", headers={**icu, "Accept": "application/fhir+json"}).json()
    assert DiagnosticReport.model_validate(fhir).status == "entered-in-error"


def test_input_text_only_when_asked_and_texts_pruned_after_retention(database_url, tmp_path, repo_root):
    spec = _llm_spec(repo_root / "deployments", required=True, store_output=True, store_input=True,
                     retention_days=7)
    gateway = Gateway(database_url, tmp_path, {MODEL: (spec, _scripted_server(spec, ANSWER))})
    try:
        inference_id = _chat(gateway, {})
        (row,) = _stored(database_url)
        assert json.loads(row.input_text) == [{"role": "user", "content": "MAP 55 after fluids: what next?"}]
        assert timedelta(days=6.9) < row.expires_at - row.created_at <= timedelta(days=7)
        assert prune_expired(database_url) == 0
        assert prune_expired(database_url, now=utcnow() + timedelta(days=8)) == 1
        (row,) = _stored(database_url)
        assert (row.output_text, row.input_text, row.content_sha256 is not None) == (None, None, True)
        clinician = _key(database_url, "clinician", None)
        report = gateway.client.get(f"/v1/reports/{inference_id}", headers=clinician).json()
        assert report["pruned"] is True and report["output_text"] is None
        fhir = gateway.client.get(f"/v1/reports/{inference_id}",
                                  headers={**clinician, "Accept": "application/fhir+json"}).json()
        assert "not kept" in DiagnosticReport.model_validate(fhir).conclusion
    finally:
        gateway.close()


def test_unknown_and_non_reviewable_ids_are_404(reviewed, database_url):
    clinician = _key(database_url, "clinician", None)
    assert reviewed.client.get("/v1/reports/not-a-uuid", headers=clinician).status_code == 404
    unreviewed = _chat(reviewed, _key(database_url, "clinical-app", "cardiology"))
    assert reviewed.client.get(f"/v1/reports/{unreviewed}", headers=clinician).status_code == 404


def test_pipeline_report_status_follows_its_steps_reviews():
    accept, edit, reject = (Review(decision=d) for d in ("accept", "edit", "reject"))
    assert _status_of_steps([accept, None]) == "preliminary"
    assert _status_of_steps([accept, accept]) == "final"
    assert _status_of_steps([reject, reject]) == "entered-in-error"
    assert _status_of_steps([accept, edit]) == _status_of_steps([accept, reject]) == "amended"
    assert _status_of_steps([]) == "cancelled"


def test_a_pending_result_the_database_cannot_take_withholds_the_answer_a_report_does_not(tmp_path, repo_root):
    import asyncio
    import uuid

    from medserve.controlplane.render import catalog_entry
    from medserve.errors import DatabaseUnavailableError
    from medserve.reviews.results import keep_result, result_row

    unmigrated = f"sqlite:///{tmp_path / 'no-tables.db'}"  # a real database that refuses the insert
    entry = catalog_entry(_llm_spec(repo_root / "deployments", required=True))
    row = result_row(uuid.uuid4(), "chat.completions", entry, None, review_required=True, content_sha256="0" * 64)
    with pytest.raises(DatabaseUnavailableError) as caught:
        asyncio.run(keep_result(unmigrated, row, required=True, timeout_s=5))
    assert caught.value.http_status == 503
    assert asyncio.run(keep_result(unmigrated, row, required=False, timeout_s=5)) is False
