"""Stored results: what a spec's review policy keeps of an AI result beyond its audit record.

The audit record holds digests only. A ``stored_results`` row (same id as the
audit record) is written when a policy asks for more:

- an LLM answer from a spec with ``review.required`` (for a caller of one of
  ``review.departments``, or any department when empty): the pending result,
  with the answer's digest, and its text or the request's input text only
  when ``store_output`` / ``store_input`` say so;
- an imaging result with ``review.store_output``: its findings;
- every pipeline report: the JSON report and its FHIR DiagnosticReport.

Nothing is written for a spec that needs none of this, so an LLM without
review costs the request one attribute check. Texts and documents are pruned
once ``retention_days`` have passed (readers never show them after that, and
``prune_expired`` clears them); the row, its digest and the review stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from medserve.catalog import CatalogEntry
from medserve.db.engine import session_scope
from medserve.db.models import StoredResult, utcnow
from medserve.errors import DatabaseUnavailableError
from medserve.security.api_keys import Principal

logger = logging.getLogger("medserve.reviews")

LLM_OPERATIONS = ("chat.completions", "completions")
# How often a writing gateway process clears expired texts as it stores new ones.
PRUNE_EVERY_S = 600.0
_last_prune = {"at": 0.0}
# Stores run on threads of their own: a database that hangs (paused, not refusing) holds these, never the
# default executor that series assembly and the other routes share.
_STORE_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medserve-results")
_prune_lock = threading.Lock()


def needs_review(entry: CatalogEntry, principal: Principal | None) -> bool:
    """Whether an answer of this entry for this caller becomes a pending result (LLM policies)."""
    review = entry.review
    if not review.required:
        return False
    return not review.departments or (principal is not None and principal.department in review.departments)


def input_text(payload: dict[str, Any]) -> str:
    """The request's input as the reviewer reads it: the chat messages (JSON) or the prompt."""
    if "messages" in payload:
        return json.dumps(payload["messages"], ensure_ascii=False)
    return str(payload.get("prompt", ""))


def result_row(
    result_id: Any,
    operation: str,
    entry: CatalogEntry,
    principal: Principal | None,
    *,
    review_required: bool,
    content_sha256: str | None,
    output_text: str | None = None,
    input: str | None = None,
    document: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One stored_results row; texts only where the entry's policy keeps them."""
    now = now or utcnow()
    review = entry.review
    return {
        "id": result_id,
        "created_at": now,
        "operation": operation,
        "model_name": entry.model_name,
        "model_version": entry.model_version,
        "department": principal.department if principal is not None else None,
        "review_required": review_required,
        "content_sha256": content_sha256,
        "output_text": output_text if review.store_output else None,
        "input_text": input if review.store_input else None,
        "document": document,
        "expires_at": now + timedelta(days=review.retention_days),
        "pruned_at": None,
    }


def store_result(database_url: str, row: dict[str, Any]) -> None:
    """Insert one row (blocking: run it in a thread); now and then clear expired texts too."""
    with session_scope(database_url) as session:
        session.execute(StoredResult.__table__.insert(), [row])
    monotonic = time.monotonic()
    if monotonic - _last_prune["at"] >= PRUNE_EVERY_S and _prune_lock.acquire(blocking=False):
        try:
            _last_prune["at"] = monotonic
            prune_expired(database_url)
        finally:
            _prune_lock.release()


async def keep_result(database_url: str, row: dict[str, Any], *, required: bool, timeout_s: float) -> bool:
    """Store a row from the event loop, waiting at most ``timeout_s``.

    required (a pending result): a failure withholds the answer (503 database_unavailable, Retry-After), so
    no answer that needs review escapes the queue. Otherwise (a pipeline report, kept findings): the answer
    still goes out with its report, the audit row (spooled if need be) keeps its digest, and the failure is
    logged; only fetching it again is lost.
    """
    try:
        stored = asyncio.get_running_loop().run_in_executor(_STORE_THREADS, store_result, database_url, row)
        await asyncio.wait_for(stored, timeout_s)
        return True
    except (asyncio.TimeoutError, SQLAlchemyError, OSError) as error:
        if required:
            raise DatabaseUnavailableError("the result could not be queued for review; the answer is withheld") \
                from None
        logger.error("result %s could not be stored (%s): it cannot be fetched again", row["id"],
                     type(error).__name__)
        return False


def prune_expired(database_url: str, now: datetime | None = None) -> int:
    """Clear the texts and documents of results past their retention; returns how many rows were pruned."""
    now = now or utcnow()
    with session_scope(database_url) as session:
        result = session.execute(
            update(StoredResult)
            .where(StoredResult.expires_at <= now, StoredResult.pruned_at.is_(None))
            .values(output_text=None, input_text=None, document=None, pruned_at=now)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def kept(row: StoredResult | None, now: datetime | None = None) -> StoredResult | None:
    """The row if its texts may still be shown (within retention), else None."""
    if row is None or row.pruned_at is not None or row.expires_at <= (now or utcnow()):
        return None
    return row
