"""OpenAI-compatible chat and text completions, whole or streamed as server-sent events.

One exchange is one async generator that holds the audit scope open from the
first byte of the request to the last event of the answer, so a streamed
answer is audited exactly once, when it ends: answered, failed, timed out or
cancelled by a client that went away. Everything that can refuse the request
(authentication, validation, the prompt length check on the replica) happens
before the first event, so those refusals are still plain JSON errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medserve.audit.writer import SPOOLED
from medserve.catalog import CatalogEntry
from medserve.digests import sha256_hex
from medserve.errors import MedserveError
from medserve.gateway.audit_scope import AuditScope
from medserve.gateway.openapi import AUDITED, AUTHENTICATED, BODY, LLM_INPUT, MODEL_CALL, error_responses
from medserve.gateway.responses import JSONAnswer
from medserve.gateway.sse import DONE, EventStreamResponse, sse_event
from medserve.gateway.state import (
    AUDIT_HEADER,
    GatewayState,
    get_gateway,
    json_body_schema,
    parse_json_body,
    provenance_headers,
)
from medserve.protocols.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkWriter,
    CompletionRequest,
    CompletionResponse,
    GenerationRequest,
    usage,
)
from medserve.reviews.results import input_text, keep_result, needs_review, result_row

router = APIRouter(tags=["llm"])

Kind = Literal["chat", "completion"]
REQUEST_MODELS: dict[str, type[GenerationRequest]] = {"chat": ChatCompletionRequest, "completion": CompletionRequest}


def _responses(answer: type) -> dict[int | str, dict[str, Any]]:
    """The whole answer (JSON) or, with ``stream: true``, server-sent events; and every error."""
    ok = {"description": "The answer: whole (JSON), or streamed as server-sent events (`stream: true`).",
          "model": answer, "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    return {200: ok, **error_responses(AUTHENTICATED, AUDITED, BODY, MODEL_CALL, LLM_INPUT)}


@router.post("/v1/chat/completions", responses=_responses(ChatCompletionResponse),
             openapi_extra=json_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await _answer(request, gateway, "chat")


@router.post("/v1/completions", responses=_responses(CompletionResponse),
             openapi_extra=json_body_schema(CompletionRequest))
async def completions(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await _answer(request, gateway, "completion")


async def _answer(request: Request, gateway: GatewayState, kind: Kind) -> Response:
    exchange = _exchange(request, gateway, kind)
    # Runs the exchange up to its answer (whole) or its first event (streamed);
    # a refusal before that raises here and becomes a JSON error.
    first = await exchange.__anext__()
    if isinstance(first, Response):
        await exchange.aclose()
        return first
    return EventStreamResponse(exchange, headers=first)


def _engine_request(kind: Kind, generation: GenerationRequest, entry: CatalogEntry) -> dict[str, Any]:
    payload: dict[str, Any] = {"kind": kind, "params": generation.params(entry.max_output_tokens)}
    if isinstance(generation, ChatCompletionRequest):
        payload["messages"] = [message.model_dump(exclude_none=True) for message in generation.messages]
    else:
        assert isinstance(generation, CompletionRequest)
        payload["prompt"] = generation.prompt_text()
    return payload


def _extensions(audit: AuditScope, entry: CatalogEntry) -> dict[str, Any]:
    return {"inference_id": audit.id_text, "model_version": entry.model_version,
            "artifact_sha256": entry.artifact_sha256}


def _fingerprint(entry: CatalogEntry) -> str:
    return f"{entry.model_name}@{entry.model_version}"


class _Digests:
    """Running sha256 of the answer and of the reasoning, kept current on the audit scope;
    with keep_text, the answer's text too (for a review policy that stores it)."""

    def __init__(self, audit: AuditScope, keep_text: bool = False) -> None:
        self._audit = audit
        self._content = hashlib.sha256()
        self._reasoning = hashlib.sha256()
        self.parts: list[str] | None = [] if keep_text else None
        audit.output_sha256 = self._content.hexdigest()

    def add(self, content: str, reasoning: str) -> None:
        if content:
            self._content.update(content.encode())
            self._audit.output_sha256 = self._content.hexdigest()
            if self.parts is not None:
                self.parts.append(content)
        if reasoning:
            self._reasoning.update(reasoning.encode())
            self._audit.reasoning_sha256 = self._reasoning.hexdigest()


async def _exchange(
    request: Request, gateway: GatewayState, kind: Kind
) -> AsyncGenerator[Response | dict[str, str] | bytes, None]:
    """Yields the whole Response, or: the stream's headers, then SSE frames."""
    operation = "chat.completions" if kind == "chat" else "completions"
    started = False
    try:
        async with gateway.recorder.scope(operation, None, request.headers) as audit:
            audit.principal = await gateway.principal(request)
            body = await gateway.read_body(request)
            audit.input_sha256 = sha256_hex(body)
            generation = parse_json_body(REQUEST_MODELS[kind], body)
            audit.model_name = generation.model
            entry = gateway.authorize_model(audit.principal, generation.model, task="llm")
            # The version that answers (canary split, sticky per patient); sets audit.entry.
            entry = await gateway.route(entry, audit)
            payload = _engine_request(kind, generation, entry)
            # A review policy makes the answer a pending result; without one this check is the whole cost.
            review = entry.review.required and needs_review(entry, audit.principal)
            if not generation.stream:
                response, text = await _whole(gateway, entry, kind, payload, audit)
                if review:
                    await _keep_pending(gateway, entry, audit, payload, text)
            else:
                audit.streamed = True
                events = gateway.stream(entry, "generate_stream", payload)
                # A shadow candidate gets the same streamed call, read by a task of its own.
                gateway.mirror_stream(audit, "generate_stream", payload)
                try:
                    # The replica checks the prompt before its first event.
                    start = await events.__anext__()
                    audit.prompt_tokens = start.get("prompt_tokens")
                    audit.completion_tokens = 0
                    started = True
                    # The record is written at the stream's end; while the writer spools, it will be spooled.
                    yield provenance_headers(audit.id_text, entry, SPOOLED if gateway.writer.spooling else None)
                    digests = _Digests(audit, keep_text=review and entry.review.store_output)
                    async for frame in _frames(events, kind, generation, entry, audit, digests):
                        yield frame
                    if review:
                        await _keep_pending(gateway, entry, audit, payload, "".join(digests.parts or ()))
                finally:
                    await events.aclose()
    except MedserveError as error:
        if not started:
            raise
        # Headers are sent: the error travels as the stream's last event.
        yield sse_event(error.to_payload())
        return
    if not generation.stream:
        if audit.landed is not None:
            response.headers[AUDIT_HEADER] = audit.landed
        yield response
        return
    yield DONE


async def _frames(
    events: AsyncGenerator[dict[str, Any], None],
    kind: Kind,
    generation: GenerationRequest,
    entry: CatalogEntry,
    audit: AuditScope,
    digests: _Digests,
) -> AsyncGenerator[bytes, None]:
    writer = ChunkWriter(kind, entry.model_name, _fingerprint(entry), generation.include_usage)
    show_reasoning = kind == "chat" and entry.reasoning_to_client
    async for event in events:
        if event["type"] == "delta":
            audit.observe_tokens(event["tokens"])
            audit.completion_tokens = (audit.completion_tokens or 0) + event["tokens"]
            digests.add(event["content"], event["reasoning"])
            reasoning = event["reasoning"] if show_reasoning and event["reasoning"] else None
            if event["content"] or reasoning:
                yield sse_event(writer.delta(event["content"], reasoning))
        elif event["type"] == "end":
            audit.prompt_tokens = event["prompt_tokens"]
            audit.completion_tokens = event["completion_tokens"]
            audit.finish_reason = event["finish_reason"]
            yield sse_event(writer.finish(event["finish_reason"]))
            if generation.include_usage:
                yield sse_event(writer.usage(event["prompt_tokens"], event["completion_tokens"]))


async def _whole(
    gateway: GatewayState, entry: CatalogEntry, kind: Kind, payload: dict[str, Any], audit: AuditScope
) -> tuple[Response, str]:
    """The answer, and its text (for a review policy)."""
    # audit: a shadow candidate, when a shadow rollout runs, gets the same call.
    result = await gateway.call(entry, "generate", payload, audit=audit)
    digests = _Digests(audit)
    digests.add(result["content"], result["reasoning"])
    audit.prompt_tokens = result["prompt_tokens"]
    audit.completion_tokens = result["completion_tokens"]
    audit.finish_reason = result["finish_reason"]
    # Whole answers: the replica measured its first token (no per-token arrivals here).
    audit.time_to_first_token_s = result.get("time_to_first_token_s")
    common = {
        "model": entry.model_name,
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
        "system_fingerprint": _fingerprint(entry),
        "medserve": _extensions(audit, entry),
    }
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": result["content"]}
        if entry.reasoning_to_client:
            message["reasoning_content"] = result["reasoning"] or None
        body = ChatCompletionResponse(
            choices=[{"index": 0, "message": message, "finish_reason": result["finish_reason"]}], **common
        ).model_dump()
    else:
        body = CompletionResponse(
            choices=[{"index": 0, "text": result["content"], "finish_reason": result["finish_reason"]}], **common
        ).model_dump()
    return JSONAnswer(body, headers=provenance_headers(audit.id_text, entry)), result["content"]


async def _keep_pending(
    gateway: GatewayState, entry: CatalogEntry, audit: AuditScope, payload: dict[str, Any], text: str
) -> None:
    """The answer becomes a pending result, stored before it is given: an answer the review queue
    cannot hold is withheld (503 database_unavailable)."""
    row = result_row(audit.id, audit.operation, entry, audit.principal, review_required=True,
                     content_sha256=audit.output_sha256, output_text=text,
                     input=input_text(payload) if entry.review.store_input else None)
    await keep_result(gateway.database_url, row, required=True, timeout_s=gateway.settings.audit_db_timeout_s)

