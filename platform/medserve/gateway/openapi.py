"""The gateway's OpenAPI document, made to tell the truth.

Every error response a route can give is declared from the error classes
themselves (:func:`error_responses`): the status is the class's
``http_status``, the body is :class:`ErrorPayload` with ``code`` limited to
the codes of the classes named, and the headers are the ones the one HTTP
mapping (gateway/errors.py) adds (``Retry-After`` on 429 and 503,
``WWW-Authenticate`` on 401). Routes name the error classes they can raise,
grouped below by the step that raises them; nobody writes a status or a
schema by hand.

:func:`install_openapi` then fixes what FastAPI would otherwise get wrong:
it drops the 422 ``HTTPValidationError`` FastAPI adds to every route with
parameters (the gateway answers validation failures with 400
``invalid_request``, declared like any other error) and declares bearer
authentication on exactly the routes ``ROUTE_PERMISSIONS`` does not mark
public.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from medserve.errors import (
    AlreadyReviewedError,
    AuditUnavailableError,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    DatabaseUnavailableError,
    InferenceError,
    InputConstraintError,
    InvalidDicomError,
    InvalidImageError,
    InvalidMultipartError,
    InvalidRoiError,
    InvalidSeriesError,
    MedserveError,
    ModelNotFoundError,
    ModelOverloadedError,
    ModelTimeoutError,
    ModelUnavailableError,
    NotFoundError,
    NotReviewableError,
    OperationNotSupportedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PipelineNotFoundError,
    RateLimitedError,
    RequestValidationFailed,
    RolloutError,
    StatusTransitionError,
    TokenBudgetExceededError,
    UnsupportedMediaTypeError,
    VersionConflictError,
    VersionNotApprovedError,
    VersionNotFoundError,
)
from medserve.security.roles import PUBLIC, ROUTE_PERMISSIONS

ErrorClass = type[MedserveError]

BEARER = "bearerAuth"


class ErrorBody(BaseModel):
    """What went wrong: a stable code clients branch on, a safe message, safe details."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable error code (docs/error-codes.md); clients branch on it.")
    message: str = Field(description="Human-readable and safe: never echoes request content.")
    details: dict[str, Any] | None = Field(
        default=None, description="Safe structured context (a model name, field names, a limit), never patient data."
    )


class ErrorPayload(BaseModel):
    """The body of every error the gateway answers (MedserveError.to_payload)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorBody = Field(description="The error.")


# --- the error classes each step of a request can raise ----------------------------

# Any route that runs gateway code: a bug (500 internal_error, counted and alerted on),
# or a replica still starting (503 model_unavailable).
GATEWAY: tuple[ErrorClass, ...] = (MedserveError, ModelUnavailableError)
# GatewayState.principal: the key, the route's permission, the key's request rate; a key
# never seen before while the database is down.
AUTHENTICATED: tuple[ErrorClass, ...] = (
    *GATEWAY, AuthenticationError, PermissionDeniedError, RateLimitedError, DatabaseUnavailableError,
)
# Query parameters out of range (FastAPI's validation, answered as 400 invalid_request).
QUERY: tuple[ErrorClass, ...] = (RequestValidationFailed,)
# GatewayState.read_body and parse_json_body.
BODY: tuple[ErrorClass, ...] = (RequestValidationFailed, PayloadTooLargeError)
# An audited route: the record could not be made durable.
AUDITED: tuple[ErrorClass, ...] = (AuditUnavailableError,)
# authorize_model: the model, its department, its task.
MODEL_LOOKUP: tuple[ErrorClass, ...] = (ModelNotFoundError, PermissionDeniedError, OperationNotSupportedError)
# call: the model's replicas, their capacity and time.
MODEL_ANSWER: tuple[ErrorClass, ...] = (ModelUnavailableError, ModelOverloadedError, ModelTimeoutError, InferenceError)
# authorize_model, route (the version answering must be approved) and call.
MODEL_CALL: tuple[ErrorClass, ...] = (*MODEL_LOOKUP, VersionNotApprovedError, *MODEL_ANSWER)
# What an imaging replica refuses.
IMAGE_INPUT: tuple[ErrorClass, ...] = (
    UnsupportedMediaTypeError, InvalidImageError, InvalidDicomError, InputConstraintError, BadRequestError,
    PayloadTooLargeError,
)
# What an LLM replica or the token budget refuses.
LLM_INPUT: tuple[ErrorClass, ...] = (ContextLengthExceededError, TokenBudgetExceededError)
# A DICOM series upload to a pipeline.
SERIES_INPUT: tuple[ErrorClass, ...] = (
    PipelineNotFoundError, UnsupportedMediaTypeError, InvalidMultipartError, InvalidDicomError, InvalidSeriesError,
    InvalidRoiError, InputConstraintError, RequestValidationFailed, PayloadTooLargeError,
)
REVIEW: tuple[ErrorClass, ...] = (NotFoundError, AlreadyReviewedError, NotReviewableError)
# Reading one model's registry entries.
REGISTRY_READ: tuple[ErrorClass, ...] = (ModelNotFoundError,)
# Registering a version: versions are immutable.
REGISTER: tuple[ErrorClass, ...] = (VersionConflictError,)
# A version's status change (an unknown action is a 404 not_found).
STATUS_CHANGE: tuple[ErrorClass, ...] = (NotFoundError, ModelNotFoundError, VersionNotFoundError, StatusTransitionError)
# Pointing an alias, rolling out, promoting, rolling back (the model must be deployed and follow an alias).
ROLLOUT: tuple[ErrorClass, ...] = (ModelNotFoundError, VersionNotFoundError, VersionNotApprovedError, RolloutError)

# Headers the one HTTP mapping (gateway/errors.py) adds, by status.
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Always `Bearer`.", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Whole seconds to wait before retrying.", "required": True,
                          "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
    503: {"Retry-After": {"description": "Whole seconds to wait before retrying.", "required": True,
                          "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
}


def error_schema(codes: Iterable[str]) -> dict[str, Any]:
    """ErrorPayload's JSON schema (inlined), with ``error.code`` limited to ``codes``."""
    schema = ErrorPayload.model_json_schema()
    body = dict(schema["$defs"]["ErrorBody"])
    body["properties"] = {**body["properties"], "code": {**body["properties"]["code"], "enum": sorted(set(codes))}}
    return {
        "type": "object",
        "title": "ErrorPayload",
        "description": schema["description"],
        "properties": {"error": body},
        "required": ["error"],
        "additionalProperties": False,
    }


def error_responses(*groups: Iterable[ErrorClass]) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for the error classes named (one entry per HTTP status)."""
    by_status: dict[int, set[str]] = {}
    for group in groups:
        for error in group:
            by_status.setdefault(error.http_status, set()).add(error.code)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status):
        codes = sorted(by_status[status])
        response: dict[str, Any] = {
            "description": "Error: " + ", ".join(f"`{code}`" for code in codes) + " (docs/error-codes.md).",
            "content": {"application/json": {"schema": error_schema(codes)}},
        }
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        responses[status] = response
    return responses


def _drop_framework_validation(document: dict[str, Any]) -> None:
    """Remove FastAPI's automatic 422 HTTPValidationError: the gateway never answers it."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("/HTTPValidationError"):
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if "components" in document and not schemas:
        document["components"].pop("schemas", None)


def _declare_security(document: dict[str, Any]) -> None:
    """Bearer authentication on every route ROUTE_PERMISSIONS does not mark public."""
    document.setdefault("components", {})["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "An API key (msk_...) or an OIDC access token."}
    }
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            permission = ROUTE_PERMISSIONS.get((method.upper(), path), PUBLIC)
            if permission is not PUBLIC:
                operation["security"] = [{BEARER: []}]
                needs = f"Needs permission `{permission.value}`."
                operation["description"] = (operation.get("description", "") + "\n\n" + needs).strip()


def install_openapi(app: FastAPI) -> None:
    """Serve the corrected document at /openapi.json (built once, like FastAPI's own)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _drop_framework_validation(document)
            _declare_security(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
