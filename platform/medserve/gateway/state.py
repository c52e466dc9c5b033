"""Everything a gateway replica holds: settings, catalog, auth, audit, model handles.

Routes reach it through the ``get_gateway`` dependency;
keeping it out of the route modules lets each protocol live in its own file.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from ray import serve

from medserve import metrics
from medserve.audit.writer import AuditWriter
from medserve.errors import (
    ModelTimeoutError,
    ModelUnavailableError,
    OperationNotSupportedError,
    PayloadTooLargeError,
    RequestValidationFailed,
    error_from_payload,
)
from medserve.gateway.audit_scope import AuditRecorder
from medserve.gateway.auth import Authenticator, require, require_department
from medserve.gateway.catalog import Catalog, CatalogEntry
from medserve.security.api_keys import Principal
from medserve.security.roles import Permission
from medserve.settings import Settings

logger = logging.getLogger("medserve.gateway")


class GatewayState:
    def __init__(self, catalog: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> None:
        self.settings = Settings(**(settings or {}))
        self.catalog = Catalog([CatalogEntry.model_validate(entry) for entry in catalog])
        self.database_url = self.settings.resolved_database_url
        self.authenticator = Authenticator(self.database_url, self.settings.api_key_cache_seconds)
        self.writer = AuditWriter(
            self.database_url, batch_max=self.settings.audit_batch_max, queue_max=self.settings.audit_queue_max
        )
        self.recorder = AuditRecorder(
            self.writer, self.settings.pseudonym_key_bytes(), durable=self.settings.audit_durability == "strict"
        )
        self._handles: dict[str, Any] = {}
        metrics.init_audit_counters()
        self.sampler = metrics.gateway_sampler(lambda: self.writer.queue_depth).start()

    def close(self) -> None:
        self.sampler.stop()
        self.writer.close()

    # --- callers -------------------------------------------------------------

    async def principal(self, request: Request) -> Principal:
        return await self.authenticator.authenticate(request.headers.get("authorization"))

    def authorize_model(self, principal: Principal, model_name: str, task: str | None = None) -> CatalogEntry:
        """Function-level (may this role infer?) then object-level (this model, this department) checks."""
        require(principal, Permission.INFER)
        entry = self.catalog.get(model_name)
        require_department(principal, entry.departments, entry.model_name)
        if task is not None and entry.task != task:
            raise OperationNotSupportedError(model=entry.model_name, task=entry.task)
        return entry

    # --- request bodies --------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The body, refusing (413) anything over the limit before reading it all."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(limit_bytes=limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(limit_bytes=limit)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- engines -------------------------------------------------------------

    def _handle(self, entry: CatalogEntry) -> Any:
        handle = self._handles.get(entry.app_name)
        if handle is None:
            handle = serve.get_deployment_handle(entry.deployment_name, app_name=entry.app_name)
            self._handles[entry.app_name] = handle
        return handle

    async def call(self, entry: CatalogEntry, method: str, *args: Any) -> dict[str, Any]:
        """Call an engine replica; its error payloads come back as MedserveErrors."""
        response = getattr(self._handle(entry), method).remote(*args)
        try:
            result = await asyncio.wait_for(response, timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ModelTimeoutError(model=entry.model_name) from None
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - replica died, application missing, ...
            logger.warning("call to %s failed: %s", entry.app_name, type(error).__name__)
            raise ModelUnavailableError(model=entry.model_name) from None
        if isinstance(result, dict) and "error" in result:
            raise error_from_payload(result)
        return result


_replica_state: GatewayState | None = None


def set_gateway(state: GatewayState | None) -> None:
    """Called by the Gateway replica once its state is built.

    A module global rather than ``app.state``: Ray Serve serialises the
    FastAPI app into the replica, so the app object a request sees is not
    the one the replica's constructor can reach.
    """
    global _replica_state
    _replica_state = state


async def get_gateway() -> GatewayState:
    # async: FastAPI would run a plain function dependency in a thread pool.
    if _replica_state is None:
        raise ModelUnavailableError("the gateway is starting")
    return _replica_state


def provenance_headers(inference_id: str, entry: CatalogEntry) -> dict[str, str]:
    """Which exact model answered, and the audit id to quote when reviewing it."""
    return {
        "X-Medserve-Inference-Id": inference_id,
        "X-Medserve-Model": entry.model_name,
        "X-Medserve-Model-Version": entry.model_version,
    }


def parse_json_body(model: type, body: bytes) -> Any:
    """Validate a JSON body inside the audit scope; field paths only, never values."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        fields = [".".join(str(p) for p in item["loc"]) for item in error.errors()]
        raise RequestValidationFailed(fields=fields[:20]) from None


def json_body_schema(model: type) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (so fuzzers and SDK generators see it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
