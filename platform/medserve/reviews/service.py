"""Record and query clinician sign-offs.

One queue for every kind of result, each identified by its audit record id
(the ``inference_id`` the caller got): an answered imaging inference (a
single-image analysis, ``imaging.analyze``, or one step of a pipeline,
``pipeline.step``), and an LLM answer whose spec's review policy required
review (it has a ``stored_results`` row with ``review_required``). The
pipeline's own record (``pipeline.run``) is the envelope, not a result; a
shadow call's record was never answered and is not reviewed either.

Clinicians see and sign off the results of their own department (the
caller's department on the audit record); a key bound to no department sees
all. Auditors read the queue and the override rates but cannot decide.

A review maps onto the FHIR status a consumer should give the Observation:
accept -> final, edit -> amended (with the corrected finding),
reject -> entered-in-error.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Select, case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from medserve.db.models import AuditRecord, Review, StoredResult
from medserve.digests import sha256_hex
from medserve.errors import (
    AlreadyReviewedError,
    NotFoundError,
    NotReviewableError,
    PermissionDeniedError,
    RequestValidationFailed,
)
from medserve.reviews.results import LLM_OPERATIONS, kept
from medserve.security.api_keys import Principal

# Imaging results are always reviewable from their audit record alone.
REVIEWABLE_OPERATIONS = ("imaging.analyze", "pipeline.step")
FHIR_STATUS = {"accept": "final", "edit": "amended", "reject": "entered-in-error"}


class CorrectedFinding(BaseModel):
    """The finding as the clinician says it should read (edit)."""

    model_config = ConfigDict(extra="forbid")

    code: str | None = Field(default=None, max_length=100, description="Code of the finding corrected.")
    label: str | None = Field(default=None, max_length=200, description="Corrected class label.")
    value: float | None = Field(default=None, description="Corrected measured value.")
    unit: str | None = Field(default=None, max_length=32, description="Unit of the corrected value.")
    flag: bool | None = Field(default=None, description="Whether the finding should be flagged.")
    interpretation: str | None = Field(default=None, max_length=1000, description="Corrected interpretation.")

    @model_validator(mode="after")
    def _not_empty(self) -> "CorrectedFinding":
        if not self.model_dump(exclude_none=True):
            raise ValueError("a corrected finding needs at least one field")
        return self


class ReviewRequest(BaseModel):
    """POST /v1/reviews/{inference_id}."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["accept", "edit", "reject"] = Field(
        description="accept, edit (with corrected_finding for imaging, edited_text for an LLM answer) or reject."
    )
    comment: str | None = Field(
        default=None, max_length=4000, description="Why; required to edit or reject."
    )
    corrected_finding: CorrectedFinding | None = Field(
        default=None, description="Imaging results: the corrected finding; required for edit, refused otherwise."
    )
    edited_text: str | None = Field(
        default=None, min_length=1, max_length=100_000,
        description="LLM answers: the text as the clinician signs it; kept beside the original answer "
        "(whose digest the review records). Required for edit, refused otherwise.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ReviewRequest":
        corrections = (self.corrected_finding is not None) + (self.edited_text is not None)
        if (self.decision == "edit") != (corrections == 1) or corrections > 1:
            raise ValueError("edit needs one of corrected_finding (imaging) or edited_text (LLM); "
                             "accept and reject take neither")
        if self.decision in ("edit", "reject") and not (self.comment or "").strip():
            raise ValueError("a comment is required to edit or reject")
        return self


def review_payload(review: Review) -> dict[str, Any]:
    return {
        "review_id": str(review.id),
        "inference_id": str(review.inference_id),
        "model": review.model_name,
        "model_version": review.model_version,
        "decision": review.decision,
        "fhir_status": FHIR_STATUS[review.decision],
        "corrected_finding": review.corrected_finding,
        "edited_text": review.edited_text,
        "edited_sha256": sha256_hex(review.edited_text) if review.edited_text is not None else None,
        "original_sha256": review.original_sha256,
        "comment": review.comment,
        "reviewer": {"key_id": review.reviewer_key_id, "name": review.reviewer_name, "role": review.reviewer_role},
        "created_at": review.created_at.isoformat(),
    }


def record_review(
    session: Session,
    inference_id: uuid.UUID,
    request: ReviewRequest,
    reviewer: Principal,
    *,
    clinician_pseudonym: str | None = None,
    authorize: Callable[[str | None], None] = lambda _model: None,
    via: str = "api",
    session_id: uuid.UUID | None = None,
    audit_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Store one sign-off; ``authorize(model_name)`` raises when the reviewer may not see that model.

    ``via``: where it was made (api, console); ``session_id``: the console sign-in session it came from;
    ``audit_id``: the id of the audit record written for the decision.
    """
    record = session.get(AuditRecord, inference_id)
    if record is None:
        raise NotFoundError("no inference has this id", inference_id=str(inference_id))
    authorize(record.model_name)
    check_department(reviewer, record.department)
    stored = session.get(StoredResult, inference_id)
    if not is_reviewable(record, stored):
        raise NotReviewableError(operation=record.operation, outcome=record.outcome)
    llm = record.operation in LLM_OPERATIONS
    if request.corrected_finding is not None and llm:
        raise RequestValidationFailed("an LLM answer is edited with edited_text", fields=["corrected_finding"])
    if request.edited_text is not None and not llm:
        raise RequestValidationFailed("an imaging result is edited with corrected_finding", fields=["edited_text"])
    if session.scalar(select(Review.id).where(Review.inference_id == inference_id)) is not None:
        raise AlreadyReviewedError(inference_id=str(inference_id))
    review = Review(
        inference_id=inference_id,
        model_name=record.model_name,
        model_version=record.model_version,
        decision=request.decision,
        corrected_finding=request.corrected_finding.model_dump(exclude_none=True) if request.corrected_finding else None,
        comment=request.comment,
        edited_text=request.edited_text,
        original_sha256=record.output_sha256,
        reviewer_key_id=reviewer.key_id,
        reviewer_name=reviewer.name,
        reviewer_role=reviewer.role.value,
        clinician_pseudonym=clinician_pseudonym,
        via=via,
        session_id=session_id,
        audit_id=audit_id,
    )
    session.add(review)
    try:
        session.flush()
    except IntegrityError:  # a concurrent sign-off of the same result won
        raise AlreadyReviewedError(inference_id=str(inference_id)) from None
    return review_payload(review)


def check_department(principal: Principal, department: str | None) -> None:
    """A department-bound key reaches only results of its own department."""
    if principal.department is not None and department != principal.department:
        raise PermissionDeniedError("this result belongs to another department")


def is_reviewable(record: AuditRecord, stored: StoredResult | None) -> bool:
    if record.outcome != "ok" or record.shadow:
        return False
    return record.operation in REVIEWABLE_OPERATIONS or bool(stored is not None and stored.review_required)


def reviewable(query: Select) -> Select:  # type: ignore[type-arg]
    """``query`` over audit records narrowed to reviewable results, as :func:`is_reviewable` decides for one:
    answered, not a shadow, and an imaging operation or an answer its policy stored for review (the
    stored_results row is joined here, so every query that counts results agrees)."""
    return query.outerjoin(StoredResult, StoredResult.id == AuditRecord.id).where(
        (AuditRecord.outcome == "ok")
        & AuditRecord.shadow.is_(False)
        & (AuditRecord.operation.in_(REVIEWABLE_OPERATIONS) | StoredResult.review_required.is_(True))
    )


def pending_results(
    session: Session, model: str | None = None, limit: int = 100, department: str | None = None
) -> list[dict[str, Any]]:
    """Answered results (imaging and LLM) nobody has signed off yet, oldest first.

    ``department``: only results of callers of that department (a department-bound reader).
    The answer's text is listed only where the policy kept it and its retention has not passed.
    """
    query = (
        reviewable(select(AuditRecord, StoredResult))
        .outerjoin(Review, Review.inference_id == AuditRecord.id)
        .where(Review.id.is_(None))
        .order_by(AuditRecord.created_at)
        .limit(limit)
    )
    if model is not None:
        query = query.where(AuditRecord.model_name == model)
    if department is not None:
        query = query.where(AuditRecord.department == department)
    items = []
    for row, stored in session.execute(query):
        item = {
            "inference_id": str(row.id),
            "created_at": row.created_at.isoformat(),
            "model": row.model_name,
            "model_version": row.model_version,
            "operation": row.operation,
            "caller_name": row.caller_name,
            "department": row.department,
            "content_sha256": row.output_sha256,
        }
        shown = kept(stored)
        if row.operation in LLM_OPERATIONS:
            item["output_text"] = shown.output_text if shown else None
            item["input_text"] = shown.input_text if shown else None
        items.append(item)
    return items


def override_summary(
    session: Session, model: str | None = None, department: str | None = None
) -> list[dict[str, Any]]:
    """Per model and version: results, reviews by decision, pending, and the override rate.

    override_rate = (edited + rejected) / reviewed; None before the first review.
    ``department``: only results of callers of that department.
    """
    def count(decision: str):  # type: ignore[no-untyped-def]
        return func.coalesce(func.sum(case((Review.decision == decision, 1), else_=0)), 0)

    query = (
        reviewable(select(
            AuditRecord.model_name,
            AuditRecord.model_version,
            func.count(AuditRecord.id),
            func.count(Review.id),
            count("accept"),
            count("edit"),
            count("reject"),
        ))
        .outerjoin(Review, Review.inference_id == AuditRecord.id)
        .group_by(AuditRecord.model_name, AuditRecord.model_version)
        .order_by(AuditRecord.model_name, AuditRecord.model_version)
    )
    if model is not None:
        query = query.where(AuditRecord.model_name == model)
    if department is not None:
        query = query.where(AuditRecord.department == department)
    summary = []
    for name, version, results, reviewed, accepted, edited, rejected in session.execute(query):
        summary.append(
            {
                "model": name,
                "model_version": version,
                "results": int(results),
                "reviewed": int(reviewed),
                "pending": int(results) - int(reviewed),
                "accepted": int(accepted),
                "edited": int(edited),
                "rejected": int(rejected),
                "override_rate": round((int(edited) + int(rejected)) / int(reviewed), 4) if reviewed else None,
            }
        )
    return summary
