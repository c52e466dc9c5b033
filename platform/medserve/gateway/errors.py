"""The one mapping from exceptions to HTTP responses.

Responses carry the error's stable code and its safe message, never str() of
an arbitrary exception: exception text can carry patient data.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sqlalchemy.exc import SQLAlchemyError

from medserve import metrics
from medserve.errors import (
    BadRequestError,
    DatabaseUnavailableError,
    FrameworkHTTPError,
    MedserveError,
    MethodNotAllowedError,
    NotFoundError,
    RequestValidationFailed,
)
from medserve.gateway.responses import JSONAnswer

logger = logging.getLogger("medserve.gateway")

# What the framework's own HTTP errors (unknown route, wrong method) say.
ROUTE_UNAVAILABLE = "Not available."

# Every 429 and 503 says when to come back (the OpenAPI document promises it); an error's own
# details.retry_after_s, when it has one, replaces the default.
RETRY_AFTER_SECONDS = {429: "1", 503: "1"}


def error_response(error: MedserveError) -> JSONResponse:
    headers = {}
    if error.http_status in RETRY_AFTER_SECONDS:
        headers["Retry-After"] = RETRY_AFTER_SECONDS[error.http_status]
    retry_after = error.details.get("retry_after_s")
    if isinstance(retry_after, (int, float)):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if error.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONAnswer(error.to_payload(), status_code=error.http_status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedserveError)
    async def _medserve_error(_request: Request, error: MedserveError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        # Field locations only: pydantic's messages can quote the input.
        fields = [".".join(str(p) for p in item.get("loc", ())) for item in error.errors()]
        return error_response(RequestValidationFailed(BadRequestError.default_message, fields=fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        # The framework's own 404s and 405s say no more than "Not available." (no route names).
        typed = {404: NotFoundError, 405: MethodNotAllowedError}.get(error.status_code, FrameworkHTTPError)
        # The framework's headers stay: a 405 names the methods the route has (Allow, RFC 9110).
        return JSONAnswer(typed(ROUTE_UNAVAILABLE).to_payload(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        return response_for(error)


def known_error(error: BaseException) -> MedserveError | None:
    """The typed error of a failure the gateway knows it can meet, else None (a bug).

    The database going away under a route that must read or write it is
    known: 503 database_unavailable with Retry-After, not 500.
    """
    if isinstance(error, MedserveError):
        return error
    if isinstance(error, SQLAlchemyError):
        return DatabaseUnavailableError()
    return None


def response_for(error: Exception) -> JSONResponse:
    """Any exception as the caller sees it: a typed error's code, else a bare 500 that is counted
    (medserve_gateway_unhandled_errors_total, which an alert watches: each one is a bug)."""
    known = known_error(error)
    if known is not None:
        return error_response(known)
    metrics.record_unhandled_error()
    logger.error("unhandled %s in gateway", type(error).__name__)
    return JSONAnswer(MedserveError().to_payload(), status_code=MedserveError.http_status)
