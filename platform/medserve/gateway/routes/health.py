"""Liveness and readiness probes (no authentication: Kubernetes and load balancers call them)."""

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from medserve.db.engine import get_engine
from medserve.gateway.state import GatewayState, get_gateway

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    def ping() -> None:
        with get_engine(gateway.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        await asyncio.to_thread(ping)
    except Exception:  # noqa: BLE001
        return JSONResponse({"status": "not ready", "reason": "database unreachable"}, status_code=503)
    return JSONResponse({"status": "ready", "models": len(gateway.catalog.entries())})
