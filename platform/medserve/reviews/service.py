"""Record and query clinician sign-offs.

A reviewable result is an answered imaging inference: a single-image
analysis (``imaging.analyze``) or one step of a pipeline (``pipeline.step``),
each identified by its audit record id (the ``inference_id`` the caller got).
The pipeline's own record (``pipeline.run``) is the envelope, not a result;
LLM answers are not in this queue yet.

A review maps onto the FHIR status a consumer should give the Observation:
accept -> final, edit -> amended (with the corrected finding),
reject -> entered-in-error.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from medserve.db.models import AuditRecord, Review
from medserve.errors import AlreadyReviewedError, NotFoundError, NotReviewableError
from medserve.security.api_keys import Principal

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

    decision: Literal["accept", "edit", "reject"] = Field(description="accept, edit (with corrected_finding) or reject.")
    comment: str | None = Field(
        default=None, max_length=4000, description="Why; required to edit or reject."
    )
    corrected_finding: CorrectedFinding | None = Field(default=None, description="Required for edit, refused otherwise.")

    @model_validator(mode="after")
    def _consistent(self) -> "ReviewRequest":
        if (self.decision == "edit") != (self.corrected_finding is not None):
            raise ValueError("corrected_finding is required for edit and refused for accept and reject")
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
) -> dict[str, Any]:
    """Store one sign-off; ``authorize(model_name)`` raises when the reviewer may not see that model."""
    record = session.get(AuditRecord, inference_id)
    if record is None:
        raise NotFoundError("no inference has this id", inference_id=str(inference_id))
    authorize(record.model_name)
    if record.outcome != "ok" or record.operation not in REVIEWABLE_OPERATIONS:
        raise NotReviewableError(operation=record.operation, outcome=record.outcome)
    if session.scalar(select(Review.id).where(Review.inference_id == inference_id)) is not None:
        raise AlreadyReviewedError(inference_id=str(inference_id))
    review = Review(
        inference_id=inference_id,
        model_name=record.model_name,
        model_version=record.model_version,
        decision=request.decision,
        corrected_finding=request.corrected_finding.model_dump(exclude_none=True) if request.corrected_finding else None,
        comment=request.comment,
        reviewer_key_id=reviewer.key_id,
        reviewer_name=reviewer.name,
        reviewer_role=reviewer.role.value,
        clinician_pseudonym=clinician_pseudonym,
    )
    session.add(review)
    try:
        session.flush()
    except IntegrityError:  # a concurrent sign-off of the same result won
        raise AlreadyReviewedError(inference_id=str(inference_id)) from None
    return review_payload(review)


def _reviewable():  # type: ignore[no-untyped-def]
    return (AuditRecord.outcome == "ok") & AuditRecord.operation.in_(REVIEWABLE_OPERATIONS)


def pending_results(session: Session, model: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Answered imaging results nobody has signed off yet, oldest first."""
    query = (
        select(AuditRecord)
        .outerjoin(Review, Review.inference_id == AuditRecord.id)
        .where(_reviewable(), Review.id.is_(None))
        .order_by(AuditRecord.created_at)
        .limit(limit)
    )
    if model is not None:
        query = query.where(AuditRecord.model_name == model)
    return [
        {
            "inference_id": str(row.id),
            "created_at": row.created_at.isoformat(),
            "model": row.model_name,
            "model_version": row.model_version,
            "operation": row.operation,
            "caller_name": row.caller_name,
            "department": row.department,
        }
        for row in session.scalars(query)
    ]


def override_summary(session: Session, model: str | None = None) -> list[dict[str, Any]]:
    """Per model and version: results, reviews by decision, pending, and the override rate.

    override_rate = (edited + rejected) / reviewed; None before the first review.
    """
    def count(decision: str):  # type: ignore[no-untyped-def]
        return func.coalesce(func.sum(case((Review.decision == decision, 1), else_=0)), 0)

    query = (
        select(
            AuditRecord.model_name,
            AuditRecord.model_version,
            func.count(AuditRecord.id),
            func.count(Review.id),
            count("accept"),
            count("edit"),
            count("reject"),
        )
        .outerjoin(Review, Review.inference_id == AuditRecord.id)
        .where(_reviewable())
        .group_by(AuditRecord.model_name, AuditRecord.model_version)
        .order_by(AuditRecord.model_name, AuditRecord.model_version)
    )
    if model is not None:
        query = query.where(AuditRecord.model_name == model)
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
