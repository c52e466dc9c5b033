"""The OpenAI-compatible request and response shapes medserve accepts and returns.

Only the fields medserve honours are modelled; unknown fields are refused
(extra="forbid") rather than silently ignored, except a few that official SDKs
send by default and that change nothing here (listed as accepted below).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"] = Field(description="Who wrote the message.")
    content: str = Field(description="The message text.")
    name: str | None = Field(default=None, description="Optional author name.")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name as listed by GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Alias of max_tokens (newer SDKs).")
    temperature: float = Field(default=0.7, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(default=None, description="Sequences that end generation.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stream: bool = Field(default=False, description="Server-sent events (not in this release).")
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is supported.")
    user: str | None = Field(default=None, description="Accepted for compatibility; not stored.")

    def token_budget(self, cap: int) -> int:
        asked = self.max_completion_tokens or self.max_tokens or cap
        return min(asked, cap)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, Any]
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
