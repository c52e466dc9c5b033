"""The review backlog in numbers, for the compliance metrics.

Read from the same tables and the same notion of "reviewable" as the queue
itself (:mod:`medserve.reviews.service`): a result is pending while it has no
review. Counts are aggregated in the database (one grouped query each), never
row by row, so sampling stays cheap however long the trail grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from medserve.db.models import AuditRecord, Review
from medserve.metrics import PENDING_AGE_BUCKETS as AGE_BUCKETS
from medserve.metrics import REVIEW_DECISION_VALUES as DECISIONS
from medserve.reviews.service import reviewable

NONE = "none"  # a result with no department (a key bound to none), or no model version


@dataclass
class Backlog:
    """Pending results per department and age bucket, the oldest per department, decisions per version."""

    pending: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_s: dict[str, float] = field(default_factory=dict)
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)


def _department(value: str | None) -> str:
    return value or NONE


def backlog(session: Session, now: datetime) -> Backlog:
    """The backlog as of ``now`` (timezone-aware UTC)."""
    result = Backlog()
    bounds = [(name, now - timedelta(seconds=upper)) for name, upper in AGE_BUCKETS[:-1]]
    columns = []
    for index, (name, _lower_time) in enumerate(bounds):
        younger = AuditRecord.created_at > bounds[index][1]
        older = AuditRecord.created_at <= bounds[index - 1][1] if index else None
        condition = younger if older is None else (younger & older)
        columns.append(func.coalesce(func.sum(case((condition, 1), else_=0)), 0).label(name))
    oldest_label = AGE_BUCKETS[-1][0]
    columns.append(
        func.coalesce(func.sum(case((AuditRecord.created_at <= bounds[-1][1], 1), else_=0)), 0).label(oldest_label)
    )
    query = (
        reviewable(select(AuditRecord.department, func.min(AuditRecord.created_at), *columns))
        .outerjoin(Review, Review.inference_id == AuditRecord.id)
        .where(Review.id.is_(None))
        .group_by(AuditRecord.department)
    )
    for row in session.execute(query):
        department = _department(row[0])
        counts = {name: int(value) for name, value in zip([b[0] for b in AGE_BUCKETS], row[2:])}
        merged = result.pending.setdefault(department, dict.fromkeys(counts, 0))
        for name, value in counts.items():
            merged[name] += value
        age = (now - row[1]).total_seconds()
        result.oldest_s[department] = max(result.oldest_s.get(department, 0.0), age)

    # Every version with reviewable results gets all three decisions (0 until made),
    # so an override rate reads 0/n rather than "no data".
    versions = reviewable(select(AuditRecord.model_name, AuditRecord.model_version)).distinct()
    for model, version in session.execute(versions):
        for decision in DECISIONS:
            result.decisions[(model or NONE, version or NONE, decision)] = 0
    decided = select(Review.model_name, Review.model_version, Review.decision, func.count()).group_by(
        Review.model_name, Review.model_version, Review.decision
    )
    for model, version, decision, count in session.execute(decided):
        result.decisions[(model or NONE, version or NONE, decision)] = int(count)
    return result
