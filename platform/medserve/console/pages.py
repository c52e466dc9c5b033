"""What the console's pages show, read through the review service (no queries of its own but one:
the pipeline report that holds a step's findings)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from medserve.db.models import StoredResult, utcnow
from medserve.reviews.reports import REPORT_OPERATIONS
from medserve.reviews.results import LLM_OPERATIONS, kept

# Age filter choices of the queue: label -> minimum age.
AGES: dict[str, timedelta] = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
# How long after a step its pipeline's report can be stored (the pipeline waits for all its steps).
REPORT_WINDOW = timedelta(minutes=30)
QUEUE_LIMIT = 500


def older_than(items: list[dict[str, Any]], age: str | None, now: datetime | None = None) -> list[dict[str, Any]]:
    """The queue items at least ``age`` old (an AGES key; anything else: all)."""
    minimum = AGES.get(age or "")
    if minimum is None:
        return items
    cutoff = (now or utcnow()) - minimum
    return [item for item in items if datetime.fromisoformat(item["created_at"]) <= cutoff]


def waited(created_at: str, now: datetime | None = None) -> str:
    """How long a result has waited, for people: 5 min, 3 h, 2 d."""
    seconds = max(0.0, ((now or utcnow()) - datetime.fromisoformat(created_at)).total_seconds())
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


def enclosing_report(session: Session, view: dict[str, Any]) -> dict[str, Any] | None:
    """The stored pipeline report that holds a pipeline step's result (its findings live there).

    The report is stored after its steps, by the same caller: look at the reports of that department stored
    in the window after the step, newest last, for the one whose steps name this result.
    """
    created = datetime.fromisoformat(view["created_at"])
    query = (
        select(StoredResult)
        .where(StoredResult.operation.in_(REPORT_OPERATIONS))
        .where(StoredResult.created_at >= created, StoredResult.created_at <= created + REPORT_WINDOW)
        .order_by(StoredResult.created_at)
        .limit(50)
    )
    department = view.get("department")
    query = query.where(StoredResult.department.is_(None) if department is None
                        else StoredResult.department == department)
    for row in session.scalars(query):
        shown = kept(row)
        report = ((shown.document or {}).get("report") if shown is not None else None) or {}
        if any(step.get("inference_id") == view["report_id"] for step in report.get("steps", [])):
            return report
    return None


def draft(session: Session, view: dict[str, Any]) -> dict[str, Any]:
    """What the result page shows as the AI draft: the kind, the findings (with model version and audit id)
    or the answer text, and the pipeline report it belongs to."""
    operation = view["operation"]
    if operation in LLM_OPERATIONS:
        return {"kind": "llm", "text": view.get("output_text"), "input_text": view.get("input_text"),
                "findings": [], "report": None}
    if operation in REPORT_OPERATIONS:
        report = view.get("report") or {}
        return {"kind": "report", "text": None, "findings": report.get("findings", []), "report": report}
    report = enclosing_report(session, view) if operation == "pipeline.step" else None
    findings = view.get("findings")
    if findings is None and report is not None:
        findings = [f for f in report.get("findings", []) if f.get("inference_id") == view["report_id"]]
    findings = [{"model": view["model"], "model_version": view["model_version"], "inference_id": view["report_id"],
                 **finding} for finding in findings or []]
    return {"kind": "imaging", "text": None, "findings": findings, "report": report}


def chart(summary: list[dict[str, Any]], width: int = 640, bar_height: int = 22, gap: int = 10,
          label_width: int = 240) -> dict[str, Any]:
    """Geometry of the override-rate bar chart (one bar per model version), drawn as SVG by the template."""
    bars = []
    scale = width - label_width - 110
    for index, row in enumerate(summary):
        rate = row["override_rate"]
        bars.append({
            "label": f"{row['model']} {row['model_version']}",
            "y": gap + index * (bar_height + gap),
            "width": round(scale * rate, 1) if rate is not None else 0,
            "text": f"{rate:.0%} of {row['reviewed']}" if rate is not None else "no reviews yet",
        })
    return {"width": width, "height": gap + len(summary) * (bar_height + gap), "bar_height": bar_height,
            "label_width": label_width, "scale": scale, "bars": bars}


def parse_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None
