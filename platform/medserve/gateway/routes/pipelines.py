"""Imaging pipelines: one DICOM series in (STOW-RS style), several checks in parallel, one draft report out.

The request leaves one audit record for the pipeline (operation
``pipeline.run``, model = the pipeline, version = the pipeline's version) and
one per step (``pipeline.step``, the step's model name, version and artifact
digest). Each finding in the report carries its step's audit record id.

The orchestration is medserve.imaging.pipeline's; this route admits the caller,
reads the upload and runs each step in its own audit scope over a model handle.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from medserve.db.models import utcnow
from medserve.digests import sha256_hex
from medserve.errors import MedserveError, ModelNotFoundError, ModelUnavailableError, PipelineNotFoundError
from medserve.gateway.auth import require_department
from medserve.gateway.answers import Listing, ok
from medserve.gateway.openapi import AUDITED, AUTHENTICATED, SERIES_INPUT, error_responses
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.state import GatewayState, get_gateway, parse_json_body, provenance_headers
from medserve.imaging.multipart import parse_series_upload
from medserve.imaging.pipeline import PipelineOptions, check_options, check_series, pipeline_entry, run_steps
from medserve.imaging.report import StepOutcome, build_report, to_fhir
from medserve.imaging.series import RoiBox, Volume, assemble_series
from medserve.reviews.results import keep_result, result_row
from medserve.security.api_keys import Principal
from medserve.specs import PipelineStepSpec

router = APIRouter(tags=["pipelines"])

FHIR_JSON = "application/fhir+json"


async def _run_step(
    gateway: GatewayState,
    principal: Principal,
    headers: Mapping[str, str],
    step: PipelineStepSpec,
    volume: Volume,
    roi: RoiBox | None,
    input_sha256: str | None,
) -> StepOutcome:
    """One step in its own audit scope; its failure is reported, never raised."""
    outcome = StepOutcome(name=step.name, model=step.model, inference_id="")
    try:
        async with gateway.recorder.scope("pipeline.step", step.model, headers) as audit:
            outcome.inference_id = audit.id_text
            audit.principal = principal
            audit.input_sha256 = input_sha256
            try:
                entry = gateway.catalog.get(step.model)
            except ModelNotFoundError:
                # The catalog names the model but this cluster does not serve it (e.g. no GPU node).
                raise ModelUnavailableError("the step's model is not deployed on this cluster", model=step.model) from None
            require_department(principal, entry.departments, entry.model_name)
            audit.entry = entry
            outcome.model_version, outcome.artifact_sha256 = entry.model_version, entry.artifact_sha256
            result = await gateway.call(entry, "analyze_series", volume, roi.model_dump(mode="json") if roi else None)
            audit.output_sha256 = result["output_sha256"]
            outcome.findings = list(result["findings"])
    except MedserveError as error:
        outcome.status = "failed"
        outcome.findings = []
        outcome.error = {"code": error.code, "message": error.message}
    return outcome


@router.post(
    "/v1/pipelines/{name}/studies",
    responses={
        200: {"description": "The draft report: medserve JSON, or, when `Accept` names application/fhir+json, "
                             "a FHIR R4 DiagnosticReport with its Devices and Observations contained.",
              "content": {"application/json": {"schema": {"type": "object"}},
                          FHIR_JSON: {"schema": {"type": "object", "required": ["resourceType"]}}}},
        **error_responses(AUTHENTICATED, AUDITED, SERIES_INPUT),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def run_pipeline(name: str, request: Request, gateway: GatewayState = Depends(get_gateway)) -> JSONResponse:
    """Run every step of a pipeline on one DICOM series; answer one draft report (JSON or FHIR)."""
    async with gateway.recorder.scope("pipeline.run", name, request.headers) as audit:
        principal = audit.principal = await gateway.principal(request)
        pipeline = gateway.pipelines.get(name)
        if pipeline is None:
            raise PipelineNotFoundError()
        require_department(principal, pipeline.access.departments, pipeline.name)
        entry = audit.entry = pipeline_entry(pipeline)
        body = await gateway.read_body(request)
        audit.input_sha256 = sha256_hex(body)
        upload = parse_series_upload(
            body, request.headers.get("content-type", ""), max_instances=pipeline.inputs.max_instances
        )
        options = parse_json_body(PipelineOptions, upload.options) if upload.options else PipelineOptions()
        check_options(pipeline, options)
        volume = await asyncio.to_thread(assemble_series, upload.instances)
        check_series(pipeline, volume, options)
        input_sha256 = audit.input_sha256

        def run_step(step: PipelineStepSpec, roi: RoiBox | None) -> Awaitable[StepOutcome]:
            return _run_step(gateway, principal, request.headers, step, volume, roi, input_sha256)

        steps = await run_steps(pipeline, options, run_step)
        report = build_report(pipeline, audit.id_text, volume.summary(), list(steps), utcnow())
        fhir = to_fhir(report, pipeline, list(steps))
        audit.output_sha256 = sha256_hex(json.dumps(report, sort_keys=True))
        # Kept so GET /v1/reports/{id} can give it again, its status following the steps' reviews.
        stored = result_row(audit.id, "pipeline.run", entry, principal, review_required=False,
                            content_sha256=audit.output_sha256, document={"report": report, "fhir": fhir})
        await keep_result(gateway.database_url, stored, required=False, timeout_s=gateway.settings.audit_db_timeout_s)
    headers = provenance_headers(audit.id_text, entry, audit.landed)
    if FHIR_JSON in request.headers.get("accept", ""):
        return JSONAnswer(fhir, media_type=FHIR_JSON, headers=headers)
    return JSONAnswer(report, headers=headers)


@router.get("/v1/pipelines", response_model=None, responses={**ok(Listing), **error_responses(AUTHENTICATED)})
async def list_pipelines(request: Request, gateway: GatewayState = Depends(get_gateway)) -> dict[str, Any]:
    """Pipelines this key may run, with their steps."""
    principal = await gateway.principal(request)
    data = [
        {
            "id": pipeline.name,
            "version": pipeline.version,
            "description": pipeline.description,
            "modalities": pipeline.inputs.modalities,
            "steps": [{"name": step.name, "model": step.model, "deployed": _deployed(gateway, step.model)}
                      for step in pipeline.steps],
        }
        for pipeline in gateway.pipelines.values()
        if not pipeline.access.departments or principal.department in pipeline.access.departments
    ]
    return {"object": "list", "data": data}


def _deployed(gateway: GatewayState, model: str) -> bool:
    try:
        gateway.catalog.get(model)
    except ModelNotFoundError:
        return False
    return True
