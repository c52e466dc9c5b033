"""One DICOM instance or PNG in, JSON findings out (always a draft for clinician review)."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from medserve.digests import sha256_hex
from medserve.errors import UnsupportedMediaTypeError
from medserve.gateway.answers import ImagingAnswer, ok
from medserve.gateway.openapi import AUDITED, AUTHENTICATED, BODY, IMAGE_INPUT, MODEL_CALL, error_responses
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.state import GatewayState, get_gateway, provenance_raw_headers
from medserve.reviews.results import keep_result, result_row

router = APIRouter(tags=["imaging"])

IMAGING_TYPES = ("application/dicom", "image/png")
ROUTE = "/v1/imaging/{name}"


@router.post(
    ROUTE,
    responses={**ok(ImagingAnswer), **error_responses(AUTHENTICATED, AUDITED, MODEL_CALL, BODY, IMAGE_INPUT)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGING_TYPES},
        }
    },
)
async def analyze_image(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    return await analyze(gateway, name, request)


async def analyze(gateway: GatewayState, name: str, request: Request) -> JSONResponse:
    """The route's work; the gateway's fast path (gateway/fastpath.py) calls it directly."""
    async with gateway.recorder.scope("imaging.analyze", name, request.headers) as audit:
        audit.principal = await gateway.principal(request, ROUTE)
        entry = gateway.authorize_model(audit.principal, name, task="imaging")
        entry = await gateway.route(entry, audit)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in IMAGING_TYPES:
            raise UnsupportedMediaTypeError(accepted=list(IMAGING_TYPES))
        body = await gateway.read_body(request)
        audit.input_sha256 = sha256_hex(body)
        result = await gateway.call(entry, "classify", body, content_type, audit=audit)
        audit.output_sha256 = result.pop("output_sha256")
        inference_id = audit.id_text
        payload = {
            "inference_id": inference_id,
            "model": entry.model_name,
            "model_version": entry.model_version,
            "artifact_sha256": entry.artifact_sha256,
            # Every AI result is a draft until a clinician signs it off.
            "status": "draft",
            **result,
        }
        if entry.review.store_output:  # the policy keeps the findings for GET /v1/reports/{id}
            stored = result_row(audit.id, audit.operation, entry, audit.principal, review_required=True,
                                content_sha256=audit.output_sha256, document={"findings": result.get("findings")})
            await keep_result(gateway.database_url, stored, required=False,
                              timeout_s=gateway.settings.audit_db_timeout_s)
    return JSONAnswer(payload, raw_headers=provenance_raw_headers(inference_id, entry, audit.landed))
