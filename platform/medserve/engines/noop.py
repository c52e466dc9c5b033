"""noop: a model that answers without reading its input.

It measures the platform rather than a model: `medserve bench` compares the
gateway on this engine with raw Ray Serve on a bare no-op deployment, and the
autoscaling and backpressure tests give it a delay so that requests hold a
replica's slots (an asyncio sleep: busy without using a core, as a request
waiting on a GPU is). Its answer is a fixed, clearly labelled result, never
a clinical finding.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medserve.digests import sha256_hex
from medserve.engines.base import Engine
from medserve.specs import DeploymentSpec

# Bump when the answer changes: the pinned digest of every noop spec changes with it.
NOOP_VERSION = "1"


class NoopParameters(BaseModel):
    """The spec's model.parameters for engine noop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: float = Field(
        default=0.0, ge=0, le=600_000,
        description="How long each request holds its slot before the answer (no CPU used).",
    )
    label: str = Field(default="noop", min_length=1, max_length=64, description="The label every answer carries.")


class NoopEngine(Engine):
    def __init__(self, spec: DeploymentSpec, artifact_path: Path | None = None) -> None:
        super().__init__(spec, artifact_path or Path("."))
        self.parameters = NoopParameters.model_validate(spec.model.parameters)
        self._delay_s = self.parameters.delay_ms / 1000.0
        findings = [{"label": self.parameters.label, "probability": 1.0}]
        # Built once: the answer never depends on the input.
        self._answer = {
            "findings": findings,
            "top_label": self.parameters.label,
            "input": {"format": "unread", "modality": None, "body_part": None},
            "output_sha256": sha256_hex(json.dumps(findings, sort_keys=True)),
        }

    async def classify(self) -> dict[str, Any]:
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        return dict(self._answer)
