"""Imaging pipelines: one DICOM series, several checks in parallel, one draft report.

The orchestration lives here, beside the series and the report it works on:
what the upload's options may say, which series a pipeline accepts, running
the steps and when a series is refused as a whole. The gateway's route admits
the caller, reads the upload and hands in a step runner that audits each step
and calls its model; nothing here imports the gateway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field

from medserve.catalog import CatalogEntry
from medserve.digests import sha256_hex
from medserve.errors import InputConstraintError, RequestValidationFailed
from medserve.imaging.report import StepOutcome
from medserve.imaging.series import RoiBox, Volume
from medserve.specs import PipelineSpec, PipelineStepSpec

# Runs one step on the series with its region of interest (None: the model's
# default) and reports its outcome; a step's failure is reported, never raised.
StepRunner = Callable[[PipelineStepSpec, RoiBox | None], Awaitable[StepOutcome]]


class PipelineOptions(BaseModel):
    """The optional application/json part of a series upload."""

    model_config = ConfigDict(extra="forbid")

    rois: dict[str, RoiBox] = Field(
        default_factory=dict,
        description="Region of interest per step name; steps without one use their model's documented default.",
    )


def pipeline_entry(pipeline: PipelineSpec) -> CatalogEntry:
    """How the pipeline's own audit record names it: its version, and the digest of its definition."""
    definition = json.dumps(pipeline.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return CatalogEntry(
        model_name=pipeline.name,
        model_version=pipeline.version,
        artifact_sha256=sha256_hex(definition),
        task="pipeline",
        engine="pipeline",
        app_name="gateway",
        deployment_name="Gateway",
        departments=list(pipeline.access.departments),
        deployment=pipeline.name,
        review=pipeline.review.model_copy(update={"required": True}),
    )


def check_options(pipeline: PipelineSpec, options: PipelineOptions) -> None:
    """Before the series is assembled: the options name only steps the pipeline has."""
    step_names = {step.name for step in pipeline.steps}
    if not set(options.rois) <= step_names:
        raise RequestValidationFailed("rois names a step this pipeline does not have", fields=["rois"],
                                      steps=sorted(step_names))


def check_series(pipeline: PipelineSpec, volume: Volume, options: PipelineOptions) -> None:
    """The series is one the pipeline accepts, and every requested region lies within it."""
    inputs = pipeline.inputs
    if inputs.modalities and volume.modality not in inputs.modalities:
        raise InputConstraintError(
            "the series modality is not one this pipeline accepts",
            pipeline=pipeline.name, accepted_modalities=inputs.modalities, modality=volume.modality,
        )
    if inputs.body_parts and volume.body_part not in inputs.body_parts:
        raise InputConstraintError(
            "the series body part is not one this pipeline accepts",
            pipeline=pipeline.name, accepted_body_parts=inputs.body_parts, body_part=volume.body_part,
        )
    for step_name, roi in options.rois.items():
        roi.check_within(volume.shape, field=f"rois.{step_name}")


async def run_steps(pipeline: PipelineSpec, options: PipelineOptions, run_step: StepRunner) -> list[StepOutcome]:
    """Every step at once; the series is refused only when every step refused its input."""
    steps = await asyncio.gather(*(run_step(step, options.rois.get(step.name)) for step in pipeline.steps))
    refused = [s for s in steps if s.error and s.error["code"] == InputConstraintError.code]
    if len(refused) == len(steps):
        raise InputConstraintError("no step of this pipeline accepts this series", pipeline=pipeline.name)
    return list(steps)
