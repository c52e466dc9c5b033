"""Liveness and readiness probes (no authentication: Kubernetes and load balancers call them).

Readiness follows what the gateway needs to answer, not whether the database
answers this second: with last-known-good keys and routes in memory and a
healthy audit spool, a database outage costs no clinical answer, so the
replica stays ready and says ``degraded`` in the body. It is not ready when
it holds no copy of the keys or routes yet, or when audit records can be
made durable neither in the database nor in the spool.
"""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from medserve.db.engine import get_engine
from medserve.gateway.openapi import GATEWAY, error_responses, error_schema
from medserve.gateway.state import GatewayState, get_gateway

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        **error_responses(GATEWAY),
        503: {"description": "Not ready (the readiness body says why), or the replica is still starting "
              "(`model_unavailable`).",
              "content": {"application/json": {"schema": {"anyOf": [
                  {"type": "object", "required": ["status", "reasons"]}, error_schema(["model_unavailable"]),
              ]}}}},
    },
)
async def readyz(gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    def ping() -> None:
        with get_engine(gateway.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        await asyncio.to_thread(ping)
        database_ok = True
    except Exception:  # noqa: BLE001 - any failure to answer counts as unreachable
        database_ok = False
    health = gateway.health()
    reasons = []
    if not database_ok:
        reasons.append("database unreachable: answering from last-known-good state, audit records spooled")
    if health["audit"]["spooled"]:
        reasons.append("audit records wait in the spool for the database")
    never_loaded = sorted(name for name, age in health["state_age_s"].items() if age is None)
    unready = []
    if never_loaded:
        unready.append(f"no copy of {', '.join(never_loaded)} loaded yet")
    if health["audit"]["durable_writes_failing"]:
        unready.append("audit records can be made durable neither in the database nor in the spool")
    body = {
        "status": "not ready" if unready else "degraded" if reasons else "ready",
        "models": len(gateway.catalog.entries()),
        "database": "ok" if database_ok else "unreachable",
        **health,
    }
    if unready or reasons:
        body["reasons"] = unready + reasons
    return JSONResponse(body, status_code=503 if unready else 200)
