"""Clinician sign-off: accept, edit or reject an AI result; list what awaits review; override rates;
stored reports fetched again by id."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from medserve.db.engine import session_scope
from medserve.errors import ModelNotFoundError, NotFoundError
from medserve.gateway.auth import require_department
from medserve.gateway.answers import Listing, ok
from medserve.gateway.openapi import AUTHENTICATED, BODY, QUERY, REVIEW, error_responses
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.state import GatewayState, get_gateway, json_body_schema, parse_json_body
from medserve.reviews.reports import report_fhir, report_view
from medserve.reviews.service import ReviewRequest, override_summary, pending_results, record_review
from medserve.security.pseudonyms import pseudonymize_headers

router = APIRouter(tags=["reviews"])

FHIR_JSON = "application/fhir+json"


def model_access(gateway: GatewayState, principal: Any):  # type: ignore[no-untyped-def]
    """``authorize`` for record_review: a department-bound reviewer reaches only its departments' models."""

    def check(model_name: str | None) -> None:
        try:
            entry = gateway.catalog.get(model_name or "")
        except ModelNotFoundError:
            return  # a model no longer served: its results can still be signed off
        require_department(principal, entry.departments, entry.model_name)

    return check


LISTING_RESPONSES = {**ok(Listing), **error_responses(AUTHENTICATED, QUERY)}


@router.get("/v1/reviews/pending", response_model=None, responses=LISTING_RESPONSES)
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


@router.get("/v1/reviews/summary", response_model=None, responses=LISTING_RESPONSES)
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


# Declared after the fixed /v1/reviews/... paths, so a request for one of those with another method is
# answered 405 with their Allow, not routed here as an inference id.
@router.post(
    "/v1/reviews/{inference_id}",
    responses=error_responses(AUTHENTICATED, BODY, REVIEW),
    openapi_extra=json_body_schema(ReviewRequest),
)
async def review(
    request: Request,
    # A plain string checked after authentication (a typed UUID would answer an anonymous caller with a
    # validation error instead of 401); the document states the format, and any other id is a 404.
    inference_id: str = Path(description="The result's inference_id.", json_schema_extra={"format": "uuid"}),
    gateway: GatewayState = Depends(get_gateway),
) -> dict[str, Any]:
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
                clinician_pseudonym=clinician, authorize=model_access(gateway, principal),
            )

    return await asyncio.to_thread(store)


@router.get(
    "/v1/reports/{report_id}",
    response_model=None,
    responses={
        200: {"description": "The stored result or report: medserve JSON, or, when `Accept` names "
                             "application/fhir+json, a FHIR R4 DiagnosticReport whose status follows the review.",
              "content": {"application/json": {"schema": {"type": "object"}},
                          FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType"]}}}},
        **error_responses(AUTHENTICATED, (NotFoundError,)),
    },
)
async def report(
    request: Request,
    # A plain string checked after authentication, as for reviews; any other id is a 404.
    report_id: str = Path(description="The result's inference_id or the report's id.", json_schema_extra={"format": "uuid"}),
    gateway: GatewayState = Depends(get_gateway),
) -> JSONResponse:
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
