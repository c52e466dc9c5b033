"""Open Inference Protocol v2: JSON tensors in and out."""

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from medserve.digests import sha256_hex
from medserve.gateway.answers import InferAnswer, ok
from medserve.gateway.openapi import AUDITED, AUTHENTICATED, BODY, IMAGE_INPUT, MODEL_CALL, error_responses
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.state import GatewayState, get_gateway, json_body_schema, parse_json_body, provenance_raw_headers
from medserve.protocols.oip import InferRequest

router = APIRouter(tags=["oip-v2"])

ROUTE = "/v2/models/{name}/infer"


@router.post(
    ROUTE,
    responses={**ok(InferAnswer), **error_responses(AUTHENTICATED, AUDITED, MODEL_CALL, BODY, IMAGE_INPUT)},
    openapi_extra=json_body_schema(InferRequest),
)
async def infer(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    return await infer_tensors(gateway, name, request)


async def infer_tensors(gateway: GatewayState, name: str, request: Request) -> JSONResponse:
    """The route's work; the gateway's fast path (gateway/fastpath.py) calls it directly."""
    async with gateway.recorder.scope("oip.infer", name, request.headers) as audit:
        audit.principal = await gateway.principal(request, ROUTE)
        entry = gateway.authorize_model(audit.principal, name, task="imaging")
        entry = await gateway.route(entry, audit)
        body = await gateway.read_body(request)
        audit.input_sha256 = sha256_hex(body)
        parsed = parse_json_body(InferRequest, body)
        result = await gateway.call(entry, "infer", json.loads(parsed.model_dump_json(exclude_none=True)), audit=audit)
        audit.output_sha256 = result["output_sha256"]
        payload = {
            "model_name": entry.model_name,
            "model_version": entry.model_version,
            "id": parsed.id or audit.id_text,
            "outputs": result["outputs"],
            "parameters": {"inference_id": audit.id_text},
        }
    return JSONAnswer(payload, raw_headers=provenance_raw_headers(audit.id_text, entry, audit.landed))
