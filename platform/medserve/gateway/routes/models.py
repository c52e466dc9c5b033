"""Model listings: OpenAI's GET /v1/models and OIP v2 model metadata."""

from typing import Any

from fastapi import APIRouter, Depends, Request

from medserve.errors import OperationNotSupportedError
from medserve.gateway.auth import require_department
from medserve.gateway.answers import ModelListing, ok
from medserve.gateway.openapi import AUTHENTICATED, MODEL_ANSWER, MODEL_LOOKUP, error_responses
from medserve.gateway.state import GatewayState, get_gateway

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=None, responses={**ok(ModelListing), **error_responses(AUTHENTICATED)})
async def list_models(request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    entries = [await gateway.primary(entry) for entry in gateway.catalog.entries()]
    data = [
        {
            "id": entry.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "medserve",
            "task": entry.task,
            "version": entry.model_version,
            "artifact_sha256": entry.artifact_sha256,
        }
        for entry in entries
        if not entry.departments or principal.department in entry.departments
    ]
    return {"object": "list", "data": data}


@router.get("/v2/models/{name}", tags=["oip-v2"], responses=error_responses(AUTHENTICATED, MODEL_LOOKUP, MODEL_ANSWER))
async def model_metadata(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    principal = await gateway.principal(request)
    entry = await gateway.primary(gateway.catalog.get(name))
    require_department(principal, entry.departments, entry.model_name)
    if entry.task != "imaging":
        raise OperationNotSupportedError(model=entry.model_name, task=entry.task)
    return await gateway.call(entry, "metadata")
