"""What the gateway routes to: model name -> the Serve application serving it.

Built by the control plane into the gateway's application args, so a gateway
replica needs no database round trip to route a request. It lives beside
neither room: the control plane writes it and the gateway reads it, and
neither imports the other for it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medserve.errors import ModelNotFoundError
from medserve.specs import ReviewSpec


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(description="Name clients use.")
    model_version: str = Field(description="Version served.")
    artifact_sha256: str | None = Field(description="Pinned digest of the weights served.")
    task: str = Field(description="llm or imaging.")
    engine: str = Field(description="Engine name.")
    app_name: str = Field(description="Ray Serve application hosting the model.")
    deployment_name: str = Field(default="ModelServer", description="Deployment inside that application.")
    departments: list[str] = Field(default_factory=list, description="Departments allowed; empty: all.")
    max_output_tokens: int = Field(default=512, description="Cap on generated tokens.")
    reasoning_to_client: bool = Field(
        default=False, description="Whether the split-off reasoning_content reaches the caller."
    )
    deployment: str = Field(description="Deployment spec name.")
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Requests the model can work on at once (max_ongoing_requests x max_replicas); "
        "beyond it requests wait at the gateway's priority gate. None: no gate.",
    )
    autoscaled: bool = Field(
        default=False,
        description="Whether Ray Serve scales the model's replicas (min_replicas below max_replicas). Its calls "
        "then leave one per request, not batched: the autoscaler counts calls, and a batch of many requests "
        "counts as one.",
    )
    max_queued: int | None = Field(
        default=None,
        ge=0,
        description="Requests that may wait for the model (max_queued_requests); beyond it 503 "
        "model_overloaded with Retry-After. None: unbounded.",
    )
    placement: Literal["replicas", "gateway"] = Field(
        default="replicas", description="replicas: reached by DeploymentHandle; gateway: loaded in the gateway."
    )
    engine_spec: dict[str, Any] | None = Field(
        default=None, description="The deployment spec, for an engine the gateway loads itself (placement gateway)."
    )
    review: ReviewSpec = Field(
        default_factory=ReviewSpec,
        description="The spec's review policy, with `required` resolved for the task (never None here).",
    )
    alias: str | None = Field(
        default=None,
        description="Registry alias the deployment follows; the registry then decides the version "
        "(model_version above is the spec's own, a fallback). None: pinned to model_version.",
    )


class Catalog:
    def __init__(self, entries: list[CatalogEntry]) -> None:
        self._by_name = {entry.model_name: entry for entry in entries}

    def get(self, name: str) -> CatalogEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise ModelNotFoundError() from None

    def entries(self) -> list[CatalogEntry]:
        return list(self._by_name.values())
