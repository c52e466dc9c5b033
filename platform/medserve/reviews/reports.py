"""Stored reports: any reviewable result, or a pipeline's report, fetched again by id.

``GET /v1/reports/{id}`` answers JSON (:func:`report_view`) or a FHIR R4
DiagnosticReport (:func:`report_fhir`) whose ``status`` follows the review:

- one result (an LLM answer, an imaging result, a pipeline step):
  ``preliminary`` until reviewed, then ``final`` (accepted), ``amended``
  (edited; the edited text or corrected finding is shown, the original's
  digest kept) or ``entered-in-error`` (rejected);
- a pipeline report: ``preliminary`` while any completed step awaits review;
  once all are reviewed, ``final`` when all were accepted,
  ``entered-in-error`` when all were rejected, otherwise ``amended``. Each
  contained Observation carries its own step's status.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from medserve.db.models import AuditRecord, Review, StoredResult
from medserve.errors import NotFoundError
from medserve.imaging.report import INFERENCE_ID_SYSTEM
from medserve.reviews.results import LLM_OPERATIONS, kept
from medserve.reviews.service import FHIR_STATUS, check_department, is_reviewable, review_payload
from medserve.security.api_keys import Principal

MODEL_SYSTEM = "urn:medserve:model"
REPORT_OPERATIONS = ("pipeline.run",)


def _status_of_steps(reviews: list[Review | None]) -> str:
    if not reviews:
        return "cancelled"  # no step produced a result
    if any(review is None for review in reviews):
        return "preliminary"
    decisions = {review.decision for review in reviews if review is not None}
    if decisions == {"accept"}:
        return "final"
    if decisions == {"reject"}:
        return "entered-in-error"
    return "amended"


def report_view(session: Session, report_id: uuid.UUID, reader: Principal) -> dict[str, Any]:
    """The stored result or report as JSON, with its review (or its steps' reviews) and FHIR status."""
    record = session.get(AuditRecord, report_id)
    stored = session.get(StoredResult, report_id)
    if record is None or not (is_reviewable(record, stored) or (
            record.operation in REPORT_OPERATIONS and record.outcome == "ok")):
        raise NotFoundError("no stored report or reviewable result has this id", report_id=str(report_id))
    check_department(reader, record.department)
    shown = kept(stored)
    view: dict[str, Any] = {
        "report_id": str(record.id),
        "operation": record.operation,
        "model": record.model_name,
        "model_version": record.model_version,
        "artifact_sha256": record.artifact_sha256,
        "department": record.department,
        "created_at": record.created_at.isoformat(),
        "content_sha256": record.output_sha256,
        "expires_at": stored.expires_at.isoformat() if stored is not None else None,
        "pruned": stored is not None and shown is None,
    }
    if record.operation in REPORT_OPERATIONS:
        document = shown.document if shown is not None and shown.document else None
        report = (document or {}).get("report")
        steps = [step for step in (report or {}).get("steps", []) if step.get("status") == "completed"]
        step_ids = [uuid.UUID(step["inference_id"]) for step in steps]
        reviews = {r.inference_id: r for r in session.scalars(select(Review).where(Review.inference_id.in_(step_ids)))}
        view.update(
            status=_status_of_steps([reviews.get(i) for i in step_ids]) if report else "preliminary",
            report=report,
            step_reviews={str(i): review_payload(r) for i, r in reviews.items()},
            fhir=(document or {}).get("fhir"),
        )
        return view
    review = session.scalar(select(Review).where(Review.inference_id == record.id))
    view.update(status=FHIR_STATUS[review.decision] if review is not None else "preliminary",
                review=review_payload(review) if review is not None else None)
    if record.operation in LLM_OPERATIONS:
        view.update(output_text=shown.output_text if shown else None, input_text=shown.input_text if shown else None)
    else:
        view["findings"] = ((shown.document or {}).get("findings") if shown is not None else None)
    return view


def report_fhir(view: dict[str, Any]) -> dict[str, Any]:
    """The view as a FHIR R4 DiagnosticReport."""
    if view.get("fhir") is not None:
        return _pipeline_fhir(view)
    review = view.get("review")
    llm = view["operation"] in LLM_OPERATIONS
    text: str | None
    if review is not None and review["edited_text"] is not None:
        text = review["edited_text"]
    elif llm:
        text = view.get("output_text")
    else:
        findings = view.get("findings")
        text = "; ".join(_finding_text(f) for f in findings) if findings else None
        if review is not None and review["corrected_finding"]:
            text = (text + "; " if text else "") + "corrected: " + _finding_text(review["corrected_finding"])
    if text is None:
        text = f"AI result sha256 {view['content_sha256']} (its text is not kept under the model's review policy)."
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": view["report_id"],
        "identifier": [{"system": INFERENCE_ID_SYSTEM, "value": view["report_id"]}],
        "status": view["status"],
        "code": {
            "coding": [{"system": MODEL_SYSTEM, "code": view["model"] or "unknown",
                        "display": f"{view['model']} {view['model_version']}"}],
            "text": f"AI {'answer' if llm else 'imaging result'} from {view['model']} {view['model_version']}",
        },
        "issued": view["created_at"],
        "conclusion": text + _signature(review),
    }
    return resource


def _finding_text(finding: dict[str, Any]) -> str:
    parts = [str(finding.get(key)) for key in ("display", "label", "code") if finding.get(key) is not None][:1]
    if finding.get("value") is not None:
        parts.append(f"{finding['value']} {finding.get('unit') or ''}".strip())
    if finding.get("interpretation"):
        parts.append(str(finding["interpretation"]))
    return " ".join(parts) or "finding"


def _signature(review: dict[str, Any] | None) -> str:
    if review is None:
        return " AI-generated draft; not reviewed by a clinician."
    verb = {"accept": "accepted", "edit": "edited", "reject": "rejected"}[review["decision"]]
    return f" {verb.capitalize()} by {review['reviewer']['name']} ({review['created_at']})."


def _pipeline_fhir(view: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(view["fhir"])
    resource["status"] = view["status"]
    reviews = view["step_reviews"]
    for contained in resource.get("contained", []):
        if contained.get("resourceType") != "Observation" or contained.get("status") == "cancelled":
            continue
        review = reviews.get(contained["identifier"][0]["value"])
        if review is None:
            continue
        contained["status"] = review["fhir_status"]
        note = f"{review['decision']} by {review['reviewer']['name']}"
        if review["corrected_finding"]:
            note += f"; corrected: {_finding_text(review['corrected_finding'])}"
        if review["comment"]:
            note += f"; {review['comment']}"
        contained["note"] = [{"text": note}]
    reviewed = len(reviews)
    conclusion = str(resource.get("conclusion", "")).replace(" Not reviewed by a clinician.", "")
    resource["conclusion"] = (
        conclusion + (f" Reviewed: {reviewed} result(s) signed off by a clinician." if reviewed
                      else " Not reviewed by a clinician.")
    )
    return resource
