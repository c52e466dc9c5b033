"""Admin API for the model registry: versions, status gates, aliases, rollouts, comparisons.

Every route needs Permission.ADMINISTER (declared in ROUTE_PERMISSIONS, checked
by ``GatewayState.principal`` like every route's permission). Registry changes take effect in the
gateways within ``rollout_cache_seconds``. The gateway cannot deploy: a
canary or shadow started here sends the candidate traffic only once its
application runs (``medserve apply`` deploys it; ``medserve rollout`` does
both in order).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from medserve.db.engine import session_scope
from medserve.errors import NotFoundError, RolloutError
from medserve.gateway.openapi import (
    AUTHENTICATED,
    BODY,
    QUERY,
    REGISTER,
    REGISTRY_READ,
    ROLLOUT,
    STATUS_CHANGE,
    error_responses,
)
from medserve.gateway.state import GatewayState, get_gateway, json_body_schema, parse_json_body
from medserve.registry import admin, lifecycle
from medserve.security.api_keys import Principal
from medserve.specs import DeploymentSpec

router = APIRouter(prefix="/admin/models", tags=["admin"])

STATUS_ACTIONS = {"validate": "validated", "approve": "approved", "retire": "retired"}
# Ten years: far beyond any audit window, and well inside what a datetime can subtract.
MAX_SINCE_MINUTES = 10 * 366 * 24 * 60


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["canary", "shadow"] = Field(description="canary: a share of traffic; shadow: mirrored, never returned.")
    version: str = Field(description="Candidate version.")
    percent: float = Field(default=0.0, ge=0, le=100, description="Canary share of requests (sticky per patient).")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="Version the deployment's alias moves to.")


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="Version the alias points to.")


def _alias_of(gateway: GatewayState, name: str) -> str:
    entry = gateway.catalog.get(name)
    if entry.alias is None:
        raise RolloutError("the deployment pins its version (alias: null); no rollouts", model=name)
    return entry.alias


def _by(principal: Principal) -> str:
    return f"{principal.name} ({principal.key_id})"


@router.get("", responses=error_responses(AUTHENTICATED))
async def list_models(request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    await gateway.principal(request)
    return {"models": await asyncio.to_thread(admin.list_models, gateway.database_url)}


@router.get("/{name}/versions", responses=error_responses(AUTHENTICATED, REGISTRY_READ))
async def list_versions(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    await gateway.principal(request)
    return {"versions": await asyncio.to_thread(admin.list_versions, gateway.database_url, name)}


@router.post("/versions", status_code=201, responses=error_responses(AUTHENTICATED, BODY, REGISTER),
             openapi_extra=json_body_schema(DeploymentSpec))
async def register(request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    """Register the version a deployment spec (JSON) names."""
    principal = await gateway.principal(request)
    spec = parse_json_body(DeploymentSpec, await gateway.read_body(request))
    return await asyncio.to_thread(admin.register_from_spec, gateway.database_url, spec, _by(principal))


@router.post("/{name}/versions/{version}/{action}", responses=error_responses(AUTHENTICATED, STATUS_CHANGE))
async def change_status(
    name: str, version: str, request: Request,
    action: str = Path(description="The status change.", json_schema_extra={"enum": sorted(STATUS_ACTIONS)}),
    gateway: GatewayState = Depends(get_gateway),
) -> dict[str, Any]:
    # action is checked after authentication (a typed path parameter would
    # answer an anonymous caller with a validation error instead of 401).
    principal = await gateway.principal(request)
    if action not in STATUS_ACTIONS:
        raise NotFoundError("unknown version action", allowed=sorted(STATUS_ACTIONS))
    return await asyncio.to_thread(
        admin.change_status, gateway.database_url, name, version, STATUS_ACTIONS[action], _by(principal)
    )


@router.put("/{name}/aliases/{alias}", responses=error_responses(AUTHENTICATED, BODY, ROLLOUT),
            openapi_extra=json_body_schema(AliasRequest))
async def set_alias(name: str, alias: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    body = parse_json_body(AliasRequest, await gateway.read_body(request))
    await asyncio.to_thread(admin.point_alias, gateway.database_url, name, alias, body.version, _by(principal))
    return {"model": name, "alias": alias, "version": body.version}


@router.post("/{name}/rollout", responses=error_responses(AUTHENTICATED, BODY, ROLLOUT),
             openapi_extra=json_body_schema(RolloutRequest))
async def start_rollout(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    body = parse_json_body(RolloutRequest, await gateway.read_body(request))
    alias = _alias_of(gateway, name)

    def write() -> None:
        with session_scope(gateway.database_url) as session:
            lifecycle.start_rollout(session, name, body.mode, body.version, _by(principal), percent=body.percent,
                                    alias=alias, require_approved=gateway.settings.require_approved_versions)

    await asyncio.to_thread(write)
    return {"model": name, "mode": body.mode, "version": body.version, "percent": body.percent,
            "note": "the candidate takes traffic once its application runs (medserve apply)"}


@router.post("/{name}/promote", responses=error_responses(AUTHENTICATED, BODY, ROLLOUT),
             openapi_extra=json_body_schema(PromoteRequest))
async def promote(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    body = parse_json_body(PromoteRequest, await gateway.read_body(request))
    alias = _alias_of(gateway, name)
    state = await gateway.routes.state(name)
    running: set[str] = set()
    if state is not None:
        running.add(state.primary.version)
        if state.candidate is not None:
            running.add(state.candidate.version)
    if body.version not in running:
        raise RolloutError("promote a version that is running (the primary or a live candidate); "
                           "`medserve promote` deploys it first", model=name, version=body.version)

    def write() -> None:
        with session_scope(gateway.database_url) as session:
            lifecycle.promote(session, name, body.version, _by(principal), alias=alias,
                              require_approved=gateway.settings.require_approved_versions)

    await asyncio.to_thread(write)
    return {"model": name, "alias": alias, "version": body.version}


@router.post("/{name}/rollback", responses=error_responses(AUTHENTICATED, ROLLOUT))
async def rollback(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    alias = _alias_of(gateway, name)

    def write() -> lifecycle.RollbackResult:
        with session_scope(gateway.database_url) as session:
            return lifecycle.rollback(session, name, _by(principal), alias=alias)

    result = await asyncio.to_thread(write)
    return {"model": name, "action": result.action, "version": result.version}


@router.get("/{name}/history", responses=error_responses(AUTHENTICATED, REGISTRY_READ))
async def history(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    await gateway.principal(request)
    return {"events": await asyncio.to_thread(admin.model_history, gateway.database_url, name)}


@router.get("/{name}/comparison", responses=error_responses(AUTHENTICATED, QUERY, REGISTRY_READ))
async def comparison(
    name: str, request: Request, gateway: GatewayState = Depends(get_gateway),
    since_minutes: float | None = Query(
        default=None, gt=0, le=MAX_SINCE_MINUTES, description="Compare the last N minutes."
    ),
) -> dict[str, Any]:
    await gateway.principal(request)
    return await asyncio.to_thread(admin.comparison_report, gateway.database_url, name, since_minutes)
