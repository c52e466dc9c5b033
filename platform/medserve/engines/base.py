"""The engine interface every runtime implements.

Engines are constructed inside a Ray Serve replica from the deployment spec's
model section, after the artifact has been resolved and its sha256 checked.
They know nothing of HTTP, Ray or the audit trail.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medserve.specs import DeploymentSpec

# ModelServer methods the gateway may send in batches (one handle call for the requests of one event-loop
# tick: gateway/batching.py): light, stateless whole answers. LLM generation stays one call per request
# (a batch would put several generations on one replica's single llama.cpp context instead of spreading them).
BATCHABLE_METHODS = frozenset({"classify", "infer"})


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    """Newly generated text and how many tokens it took; the last piece carries finish_reason."""

    text: str
    tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last piece


class Engine(ABC):
    """Common to every engine."""

    def __init__(self, spec: DeploymentSpec, artifact_path: Path) -> None:
        self.spec = spec
        self.artifact_path = artifact_path


class LLMEngine(Engine):
    @abstractmethod
    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt tokens of a conversation once the chat template is applied."""

    @abstractmethod
    def text_prompt(self, prompt: str) -> list[int]:
        """The prompt tokens of a plain completion prompt."""

    @abstractmethod
    def generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Piece]:
        """Generate from prompt tokens, piece by piece; stops soon after cancel is set.

        Runs in a worker thread. The last piece has finish_reason set.
        """

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Most tokens prompt and completion may use together."""


class ImagingEngine(Engine):
    labels: list[str]
    input_height: int
    input_width: int
    input_channels: int

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (batch, len(labels)), for an NHWC float32 batch."""

    @abstractmethod
    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw tensors in, raw tensors out (Open Inference Protocol v2)."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Input and output tensor descriptions for GET /v2/models/{name}."""


class VolumeEngine(Engine):
    """An analyzer of a whole assembled series (see medserve.imaging.series)."""

    @abstractmethod
    def analyze(self, volume: Any, roi: Any | None) -> list[dict[str, Any]]:
        """Findings for one volume; ``roi`` is a RoiBox from the request, or None for the engine's default."""
