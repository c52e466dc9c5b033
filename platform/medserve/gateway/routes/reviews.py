"""Clinician sign-off: accept, edit or reject an AI result; list what awaits review; override rates;
stored reports fetched again by id."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from medserve.db.engine import session_scope
from medserve.errors import ModelNotFoundError, NotFoundError
from medserve.gateway.auth import require_department
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.state import GatewayState, get_gateway, json_body_schema, parse_json_body
from medserve.reviews.reports import report_fhir, report_view
from medserve.reviews.service import ReviewRequest, override_summary, pending_results, record_review
from medserve.security.pseudonyms import pseudonymize_headers

router = APIRouter(tags=["reviews"])

FHIR_JSON = "application/fhir+json"


def _authorize_model(gateway: GatewayState, principal: Any):  # type: ignore[no-untyped-def]
    def check(model_name: str | None) -> None:
        try:
            entry = gateway.catalog.get(model_name or "")
        except ModelNotFoundError:
            return  # a model no longer served: its results can still be signed off
        require_department(principal, entry.departments, entry.model_name)

    return check


@router.post("/v1/reviews/{inference_id}", openapi_extra=json_body_schema(ReviewRequest))
async def review(inference_id: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    """Sign off one result (its inference_id): accept, edit (corrected finding or edited text), or reject; once."""
    principal = await gateway.principal(request)
    try:
        parsed_id = uuid.UUID(inference_id)
    except ValueError:
        raise NotFoundError("no inference has this id") from None
    body = await gateway.read_body(request)
    decision = parse_json_body(ReviewRequest, body)
    clinician = pseudonymize_headers(gateway.settings.pseudonym_key_bytes(), request.headers).get("clinician")

    def store() -> dict[str, Any]:
        with session_scope(gateway.database_url) as session:
            return record_review(
                session, parsed_id, decision, principal,
                clinician_pseudonym=clinician, authorize=_authorize_model(gateway, principal),
            )

    return await asyncio.to_thread(store)


@router.get("/v1/reviews/pending")
async def pending(
    request: Request,
    model: str | None = Query(default=None, max_length=100, description="Only this model's results."),
    limit: int = Query(default=100, ge=1, le=1000, description="Most results returned, oldest first."),
    gateway: GatewayState = Depends(get_gateway),
) -> dict[str, Any]:
    """Answered results (imaging and LLM) nobody has signed off yet, of the reader's department
    (a key bound to no department sees all); clinicians and auditors."""
    principal = await gateway.principal(request)

    def query() -> list[dict[str, Any]]:
        with session_scope(gateway.database_url) as session:
            return pending_results(session, model, limit, department=principal.department)

    return {"object": "list", "data": await asyncio.to_thread(query)}


@router.get("/v1/reviews/summary")
async def summary(
    request: Request,
    model: str | None = Query(default=None, max_length=100, description="Only this model."),
    gateway: GatewayState = Depends(get_gateway),
) -> dict[str, Any]:
    """Per model and version: results, reviews by decision, pending, override rate (of the reader's department)."""
    principal = await gateway.principal(request)

    def query() -> list[dict[str, Any]]:
        with session_scope(gateway.database_url) as session:
            return override_summary(session, model, department=principal.department)

    return {"object": "list", "data": await asyncio.to_thread(query)}


@router.get("/v1/reports/{report_id}")
async def report(report_id: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    """A pipeline report or a reviewable result, fetched again: JSON, or with Accept: application/fhir+json
    a FHIR R4 DiagnosticReport whose status follows the review."""
    principal = await gateway.principal(request)
    try:
        parsed_id = uuid.UUID(report_id)
    except ValueError:
        raise NotFoundError("no stored report or reviewable result has this id") from None

    def query() -> dict[str, Any]:
        with session_scope(gateway.database_url) as session:
            return report_view(session, parsed_id, principal)

    view = await asyncio.to_thread(query)
    if FHIR_JSON in request.headers.get("accept", ""):
        return JSONAnswer(report_fhir(view), media_type=FHIR_JSON)
    return JSONAnswer(view)
