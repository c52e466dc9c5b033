"""One structured report from a pipeline's steps: JSON, and a FHIR R4 DiagnosticReport.

Every finding carries the inference id of the step that produced it, which is
the id of that step's audit record (and what a clinician quotes to sign it
off with POST /v1/reviews/{inference_id}). The report is a draft: JSON
``status: draft``, FHIR ``status: preliminary``, until a clinician reviews
each result. A failed step stays in the report, marked failed with its error
code, and becomes a FHIR Observation with status ``cancelled`` and a
dataAbsentReason, so a reader can tell "not checked" from "nothing found".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from medserve.specs import PipelineSpec

# Identifier systems (absolute URIs, as FHIR requires).
INFERENCE_ID_SYSTEM = "urn:medserve:inference-id"
FINDING_SYSTEM = "urn:medserve:finding"
PIPELINE_SYSTEM = "urn:medserve:pipeline"
ARTIFACT_SYSTEM = "urn:medserve:artifact-sha256"
UCUM = "http://unitsofmeasure.org"
HU_UCUM = "[hnsf'U]"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@dataclass
class StepOutcome:
    """What one step produced (or why it did not)."""

    name: str
    model: str
    inference_id: str
    model_version: str | None = None
    artifact_sha256: str | None = None
    status: str = "completed"  # completed | failed
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None  # {"code", "message"} for failed steps


def build_report(
    pipeline: PipelineSpec, report_id: str, series: dict[str, Any], steps: list[StepOutcome], issued: datetime
) -> dict[str, Any]:
    """The JSON report; ``findings`` flattens every step's findings, each linked to its step's audit record."""
    findings = []
    for step in steps:
        for finding in step.findings:
            findings.append(
                {
                    "step": step.name,
                    "inference_id": step.inference_id,
                    "model": step.model,
                    "model_version": step.model_version,
                    **finding,
                }
            )
    return {
        "report_id": report_id,
        "inference_id": report_id,
        "pipeline": pipeline.name,
        "pipeline_version": pipeline.version,
        # Every AI result is a draft until a clinician signs it off.
        "status": "draft",
        "issued": issued.isoformat(),
        "series": series,
        "steps": [
            {
                "name": step.name,
                "model": step.model,
                "model_version": step.model_version,
                "artifact_sha256": step.artifact_sha256,
                "inference_id": step.inference_id,
                "status": step.status,
                "findings": len(step.findings),
                **({"error": step.error} if step.error else {}),
            }
            for step in steps
        ],
        "findings": findings,
    }


def _device(step: StepOutcome) -> dict[str, Any]:
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": f"device-{step.name}",
        "deviceName": [{"name": step.model, "type": "model-name"}],
    }
    if step.model_version:
        device["version"] = [{"value": step.model_version}]
    if step.artifact_sha256:
        device["identifier"] = [{"system": ARTIFACT_SYSTEM, "value": step.artifact_sha256}]
    return device


def _observation(step: StepOutcome, index: int, finding: dict[str, Any] | None) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{index}",
        # The audit record of the step: what a reviewer quotes to sign the result off.
        "identifier": [{"system": INFERENCE_ID_SYSTEM, "value": step.inference_id}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}
                ]
            }
        ],
        "device": {"reference": f"#device-{step.name}"},
    }
    if finding is None:  # the step failed: say so rather than leave a silent gap
        error = step.error or {}
        observation.update(
            status="cancelled",
            code={"coding": [{"system": FINDING_SYSTEM, "code": f"step-{step.name}"}], "text": f"step {step.name}"},
            dataAbsentReason={
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}],
                "text": str(error.get("code", "failed")),
            },
            note=[{"text": str(error.get("message", "The step failed."))}],
        )
        return observation
    observation["code"] = {
        "coding": [{"system": FINDING_SYSTEM, "code": str(finding["code"]), "display": str(finding["display"])}],
        "text": str(finding["display"]),
    }
    value, unit = finding.get("value"), finding.get("unit")
    if unit == "HU" and value is not None:
        observation["valueQuantity"] = {"value": value, "unit": "HU", "system": UCUM, "code": HU_UCUM}
    elif finding.get("label") is not None:
        observation["valueCodeableConcept"] = {
            "coding": [{"system": f"{FINDING_SYSTEM}:{step.model}", "code": str(finding["label"])}],
            "text": str(finding["label"]),
        }
    probabilities = (finding.get("details") or {}).get("probabilities")
    if probabilities:
        observation["component"] = [
            {
                "code": {"text": str(item["label"])},
                "valueQuantity": {"value": item["probability"], "unit": "probability", "system": UCUM, "code": "1"},
            }
            for item in probabilities
        ]
    if finding.get("flag") is not None:
        code, display = ("L", "Low") if finding["flag"] else ("N", "Normal")
        observation["interpretation"] = [
            {"coding": [{"system": INTERPRETATION_SYSTEM, "code": code, "display": display}],
             "text": str(finding.get("interpretation", display))}
        ]
    elif finding.get("interpretation"):
        observation["interpretation"] = [{"text": str(finding["interpretation"])}]
    roi = (finding.get("details") or {}).get("roi")
    if roi:
        observation["method"] = {"text": f"mean attenuation in ROI {roi} (source: {roi.get('source')})"}
    observation["note"] = [{"text": "AI-generated draft; not reviewed by a clinician."}]
    return observation


def to_fhir(report: dict[str, Any], pipeline: PipelineSpec, steps: list[StepOutcome]) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport with contained Devices (models) and Observations (findings)."""
    contained: list[dict[str, Any]] = [_device(step) for step in steps]
    references = []
    index = 0
    for step in steps:
        for finding in step.findings or ([None] if step.status == "failed" else []):
            index += 1
            contained.append(_observation(step, index, finding))
            references.append({"reference": f"#obs-{index}"})
    failed = [step.name for step in steps if step.status == "failed"]
    conclusion = (
        f"AI draft from pipeline {pipeline.name} {pipeline.version}: {len(report['findings'])} finding(s) "
        f"from {len(steps) - len(failed)} of {len(steps)} step(s)"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ". Not reviewed by a clinician."
    )
    return {
        "resourceType": "DiagnosticReport",
        "id": report["report_id"],
        "identifier": [{"system": INFERENCE_ID_SYSTEM, "value": report["report_id"]}],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": PIPELINE_SYSTEM, "code": pipeline.name, "display": pipeline.description or pipeline.name}],
            "text": pipeline.description or pipeline.name,
        },
        "issued": report["issued"],
        "contained": contained,
        "result": references,
        "conclusion": conclusion,
    }
