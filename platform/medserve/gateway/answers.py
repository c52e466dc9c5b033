"""The success bodies of the gateway's routes, as the OpenAPI document states them.

Documentation models: routes keep building their answers as they do (the hot
ones as raw JSON), and declare these with ``responses={200: {"model": ...}}``
so that FastAPI publishes them without validating each answer again. The
schemathesis runs (tests/schemathesis_run.py) check every answer against
them, so a field a route stops sending, or a type it changes, fails there.
Engine results are open (``extra="allow"``): each engine adds its own fields
beside the ones every answer carries.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Model name: what a request names.")
    object: Literal["model"] = Field(description="Always `model` (OpenAI's listing).")
    created: int = Field(description="Always 0 (OpenAI's field; versions carry their own dates).")
    owned_by: str = Field(description="Always `medserve`.")
    task: str = Field(description="`imaging` or `llm`.")
    version: str = Field(description="The version the model's alias names now.")
    artifact_sha256: str | None = Field(description="Digest of that version's weights (null: not pinned).")


class ModelListing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = Field(description="Always `list`.")
    data: list[ModelCard] = Field(description="The models this key may call (its department's, and open ones).")


class ImagingAnswer(BaseModel):
    """One image's findings, always a draft until a clinician signs it off (engine fields beside these)."""

    model_config = ConfigDict(extra="allow")

    inference_id: str = Field(description="The audit record's id: quote it to review the result.")
    model: str = Field(description="The model that answered.")
    model_version: str = Field(description="The exact version that answered.")
    artifact_sha256: str | None = Field(description="Digest of the weights that answered.")
    status: Literal["draft"] = Field(description="Every AI result is a draft until signed off.")


class InferAnswerParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inference_id: str = Field(description="The audit record's id.")


class InferAnswer(BaseModel):
    """Open Inference Protocol v2 response."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(description="The model that answered.")
    model_version: str = Field(description="The exact version that answered.")
    id: str = Field(description="The request's id, or the audit record's id when it gave none.")
    outputs: list[dict[str, Any]] = Field(description="Output tensors.")
    parameters: InferAnswerParameters = Field(description="medserve's extensions.")


class AuditPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: list[dict[str, Any]] = Field(description="Audit records, newest first (pseudonyms, never clear ids).")
    limit: int = Field(description="Page size asked for.")
    offset: int = Field(description="Rows skipped.")
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class Listing(BaseModel):
    """A list envelope (pipelines, pending reviews, override rates)."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = Field(description="Always `list`.")
    data: list[dict[str, Any]] = Field(description="The items.")


def ok(model: type[BaseModel], description: str = "Successful Response") -> dict[int | str, dict[str, Any]]:
    """A ``responses=`` entry for the route's success body."""
    return {200: {"description": description, "model": model}}
