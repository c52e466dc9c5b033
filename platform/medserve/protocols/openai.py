"""The OpenAI-compatible request and response shapes medserve accepts and returns.

Only the fields medserve honours are modelled; unknown fields are refused
(extra="forbid") rather than silently ignored, except a few that official SDKs
send by default and that change nothing here (listed as accepted below).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")
    name: str | None = Field(default=None, description="Optional author name.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, description="Send a last chunk with token usage (choices empty).")


StopSequence = Annotated[str, Field(min_length=1)]
StopSequences = Annotated[list[StopSequence], Field(max_length=4)]


class GenerationRequest(BaseModel):
    """What chat and text completions share: sampling, limits and streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name as listed by GET /v1/models.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate (capped per model).")
    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    # The bounds are in the types (not only in a validator) so the published JSON schema states them.
    stop: StopSequence | StopSequences | None = Field(
        default=None, description="Up to 4 non-empty sequences that end generation."
    )
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = Field(default=False, description="Answer as server-sent events (text/event-stream).")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options (stream only).")
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is supported.")
    user: str | None = Field(default=None, description="Accepted for compatibility; not stored.")

    def asked_tokens(self) -> int | None:
        return self.max_tokens

    def token_budget(self, cap: int) -> int:
        return min(self.asked_tokens() or cap, cap)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def params(self, cap: int) -> dict[str, Any]:
        """Generation parameters for the engine, max_tokens capped by the model's limit."""
        return {
            "max_tokens": self.token_budget(cap),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop_list(),
            "seed": self.seed,
        }


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens (newer SDKs).")

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    # One prompt: a list must hold exactly one (in the type, so the published JSON schema says so).
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue (one prompt; a list must hold exactly one)."
    )
    max_tokens: int | None = Field(default=16, ge=1, description="Most tokens to generate (OpenAI default 16).")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]
    finish_reason: str | None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # medserve extensions: which exact model produced this, and its audit id.
    system_fingerprint: str | None = None
    medserve: dict[str, Any] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    medserve: dict[str, Any] | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChunkWriter:
    """The chunks of one streamed answer, shaped as OpenAI's SDKs parse them.

    Chat chunks are ``chat.completion.chunk`` objects whose choices carry a
    ``delta``; text completion chunks are ``text_completion`` objects whose
    choices carry ``text``. Every chunk shares one id and creation time; with
    include_usage every chunk has ``usage: null`` and one last chunk with no
    choices carries the usage.
    """

    def __init__(self, kind: Literal["chat", "completion"], model: str, fingerprint: str, include_usage: bool) -> None:
        self.kind = kind
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self._base: dict[str, Any] = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": fingerprint,
        }
        if include_usage:
            self._base["usage"] = None
        self._role_sent = False

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._base, "choices": [{"index": 0, "logprobs": None, **choice}]}

    def delta(self, content: str, reasoning: str | None = None) -> dict[str, Any]:
        if self.kind == "completion":
            return self._chunk({"text": content, "finish_reason": None})
        delta: dict[str, Any] = {"content": content}
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        return self._chunk({"delta": delta, "finish_reason": None})

    def finish(self, finish_reason: str) -> dict[str, Any]:
        if self.kind == "completion":
            return self._chunk({"text": "", "finish_reason": finish_reason})
        delta: dict[str, Any] = {} if self._role_sent else {"role": "assistant", "content": ""}
        self._role_sent = True
        return self._chunk({"delta": delta, "finish_reason": finish_reason})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
