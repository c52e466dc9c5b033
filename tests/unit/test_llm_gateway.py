"""The LLM routes in process: real gateway code and real ModelServer, handles faked (no Ray).

The fake handle mimics what Ray Serve gives the gateway: ``.remote()`` is
awaitable, ``.options(stream=True)`` gives an async iterator with ``cancel()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from medserve.controlplane.render import catalog_entry
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.engines.base import GenerationParams, LLMEngine, Piece
from medserve.engines.serve_app import ModelServer
from medserve.gateway.app import create_app
from medserve.gateway.state import GatewayState, set_gateway
from medserve.security.api_keys import create_api_key
from medserve.specs import DeploymentSpec, StreamingSpec, load_catalog

SMOL = "smollm2-135m-instruct"


class _Stream:
    def __init__(self, generator: Any) -> None:
        self._generator = generator
        self.cancelled = False

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> Any:
        return await self._generator.__anext__()

    def cancel(self) -> None:
        self.cancelled = True
        asyncio.ensure_future(self._generator.aclose())


class _Method:
    def __init__(self, server: ModelServer, name: str, stream: bool) -> None:
        self._server, self._name, self._stream = server, name, stream

    def remote(self, *args: Any) -> Any:
        result = getattr(self._server, self._name)(*args)
        return _Stream(result) if self._stream else result


class FakeHandle:
    def __init__(self, server: ModelServer, stream: bool = False) -> None:
        self._server, self._stream = server, stream

    def options(self, stream: bool = False) -> "FakeHandle":
        return FakeHandle(self._server, stream)

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._server, name, self._stream)


class ScriptedEngine(LLMEngine):
    """Replays fixed pieces (a reasoning model's output, which SmolLM2 cannot produce)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    @property
    def context_length(self) -> int:
        return 4096

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return [1] * sum(len(m["content"].split()) for m in messages)

    def text_prompt(self, prompt: str) -> list[int]:
        return [1] * len(prompt.split())

    def generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Piece]:
        for text in self.pieces[: params.max_tokens]:
            yield Piece(text=text, tokens=1)
        yield Piece(text="", tokens=0, finish_reason="stop" if params.max_tokens >= len(self.pieces) else "length")


@pytest.fixture(scope="module")
def specs(repo_root) -> dict[str, DeploymentSpec]:
    return {spec.name: spec for spec in load_catalog(repo_root / "deployments")}


@pytest.fixture(scope="module")
def smol_server(specs) -> ModelServer:
    return ModelServer(specs["smollm2-demo"].model_dump(mode="json"))


def _reasoning_spec(specs, return_to_client: bool) -> DeploymentSpec:
    base = specs["smollm2-demo"]
    return base.model_copy(update={
        "name": "thinker",
        "model": base.model.model_copy(update={"name": "thinker"}),
        "reasoning": base.reasoning.model_copy(update={"parser": "deepseek_r1", "return_to_client": return_to_client}),
    })


def _scripted_server(spec: DeploymentSpec, pieces: list[str]) -> ModelServer:
    server = ModelServer.__new__(ModelServer)
    server.spec = spec
    server.engine = ScriptedEngine(pieces)
    return server


class Gateway:
    def __init__(self, database_url: str, home, servers: dict[str, tuple[DeploymentSpec, ModelServer]]) -> None:
        catalog = [catalog_entry(spec).model_dump(mode="json") for spec, _ in servers.values()]
        self.state = GatewayState(catalog, {"database_url": database_url, "home": str(home)})
        for spec, server in servers.values():
            self.state._handles[catalog_entry(spec).app_name] = FakeHandle(server)
        self.database_url = database_url
        with session_scope(database_url) as session:
            _, self.key = create_api_key(session, name="unit", role="clinical-app", department=None)
        set_gateway(self.state)
        self.client = TestClient(create_app(), headers={"Authorization": f"Bearer {self.key}"})

    def rows(self) -> list[AuditRecord]:
        with session_scope(self.database_url) as session:
            return list(session.scalars(select(AuditRecord).order_by(AuditRecord.created_at)))

    def close(self) -> None:
        set_gateway(None)
        self.state.close()


@pytest.fixture
def gateway(database_url, tmp_path, specs, smol_server):
    gateway = Gateway(database_url, tmp_path, {SMOL: (specs["smollm2-demo"], smol_server)})
    yield gateway
    gateway.close()


def _events(response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in response.text.split("\n\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    return [frame[len("data: "):] if frame == "data: [DONE]" else json.loads(frame[len("data: "):]) for frame in frames]


def _chat(**extra):
    return {"model": SMOL, "messages": [{"role": "user", "content": "Name a bone of the arm."}],
            "max_tokens": 8, "temperature": 0, "seed": 7, **extra}


def test_streamed_chat_matches_the_whole_answer_and_is_audited_once(gateway):
    whole = gateway.client.post("/v1/chat/completions", json=_chat()).json()
    response = gateway.client.post("/v1/chat/completions", json=_chat(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk = events[-2], events[-3]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert finish_chunk["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0]["role"] == "assistant"
    text = "".join(d.get("content", "") for d in deltas)
    assert text == whole["choices"][0]["message"]["content"]
    assert {e["id"] for e in events[:-1]} == {events[0]["id"]}

    whole_row, streamed_row = gateway.rows()
    assert streamed_row.outcome == "ok" and streamed_row.http_status == 200
    assert str(streamed_row.id) == response.headers["x-medserve-inference-id"]
    assert streamed_row.output_sha256 == hashlib.sha256(text.encode()).hexdigest() == whole_row.output_sha256
    assert streamed_row.completion_tokens == whole["usage"]["completion_tokens"]
    assert streamed_row.finish_reason == whole_row.finish_reason
    assert streamed_row.time_to_first_token_ms > 0 and whole_row.time_to_first_token_ms > 0
    assert streamed_row.reasoning_sha256 is None


def test_streamed_text_completion(gateway):
    body = {"model": SMOL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True}
    events = _events(gateway.client.post("/v1/completions", json=body))
    assert events[-1] == "[DONE]"
    assert {e["object"] for e in events[:-1]} == {"text_completion"}
    assert events[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert "".join(e["choices"][0]["text"] for e in events[:-1])
    assert "usage" not in events[0]  # only with stream_options.include_usage


def test_whole_text_completion_honours_max_tokens(gateway):
    body = {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    answer = gateway.client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion"
    assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["finish_reason"] == "length"


def test_max_tokens_is_capped_by_the_spec(database_url, tmp_path, specs):
    base = specs["smollm2-demo"]
    spec = base.model_copy(update={"inputs": base.inputs.model_copy(update={"max_output_tokens": 3})})
    gateway = Gateway(database_url, tmp_path, {SMOL: (spec, _scripted_server(spec, ["a"] * 10))})
    try:
        body = {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 100}
        answer = gateway.client.post("/v1/completions", json=body).json()
        assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"
    finally:
        gateway.close()


def test_long_prompt_is_refused_before_the_stream_starts(gateway):
    body = _chat(stream=True, messages=[{"role": "user", "content": "word " * 3000}])
    response = gateway.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    (row,) = gateway.rows()
    assert row.outcome == "error" and row.error_code == "context_length_exceeded"


def test_invalid_stream_request_is_a_json_error(gateway):
    response = gateway.client.post("/v1/chat/completions", json=_chat(stream=True, stop=["a", "b", "c", "d", "e"]))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_client_gone_after_the_first_chunk_cancels_and_audits_once(gateway, smol_server):
    body = json.dumps(_chat(stream=True, max_tokens=200, messages=[
        {"role": "user", "content": "Write a long story about a hospital."}])).encode()
    app = create_app()
    sent: list[dict[str, Any]] = []
    first_chunk = asyncio.Event()

    async def scenario() -> None:
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await first_chunk.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_chunk.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"authorization", f"Bearer {gateway.key}".encode()), (b"content-type", b"application/json")],
        }
        await app(scope, receive, send)
        for _ in range(300):  # the engine notices the cancel flag at its next token
            if not smol_server.engine._lock.locked():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the engine kept generating after the client left")

    asyncio.run(scenario())
    chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert chunks and not any(b"[DONE]" in m["body"] for m in chunks)
    (row,) = gateway.rows()
    assert row.outcome == "cancelled" and row.finish_reason == "cancelled"
    assert row.completion_tokens is not None and row.completion_tokens < 200


@pytest.mark.parametrize("return_to_client", [True, False])
def test_reasoning_is_split_audited_and_shown_only_when_the_spec_says(
    database_url, tmp_path, specs, return_to_client
):
    spec = _reasoning_spec(specs, return_to_client)
    pieces = ["<th", "ink>", "Fever and ", "low BP.", "</thi", "nk>", "Sepsis", " likely."]
    gateway = Gateway(database_url, tmp_path, {"thinker": (spec, _scripted_server(spec, pieces))})
    try:
        body = {"model": "thinker", "messages": [{"role": "user", "content": "Why?"}], "max_tokens": 50}
        whole = gateway.client.post("/v1/chat/completions", json=body).json()
        message = whole["choices"][0]["message"]
        assert message["content"] == "Sepsis likely."
        assert message.get("reasoning_content") == ("Fever and low BP." if return_to_client else None)

        events = _events(gateway.client.post("/v1/chat/completions", json={**body, "stream": True}))
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        assert "".join(d.get("content", "") for d in deltas) == "Sepsis likely."
        shown = "".join(d.get("reasoning_content") or "" for d in deltas)
        assert shown == ("Fever and low BP." if return_to_client else "")
        assert "think>" not in json.dumps(events)

        for row in gateway.rows():
            assert row.reasoning_sha256 == hashlib.sha256(b"Fever and low BP.").hexdigest()
            assert row.output_sha256 == hashlib.sha256(b"Sepsis likely.").hexdigest()
    finally:
        gateway.close()


class PacedEngine(ScriptedEngine):
    """Pieces 10 ms apart, whatever the machine's speed."""

    def generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Piece]:
        for piece in super().generate(prompt, params, cancel):
            time.sleep(0.01)
            yield piece


def test_the_engine_thread_wakes_the_event_loop_per_item_not_per_token():
    """A whole answer wakes the replica's event loop for its first piece and its last only; a stream
    without an interval once per piece the loop has taken; an error at once."""
    from medserve.engines.serve_app import _PieceChannel

    class Loop:  # counts the worker's wake-ups instead of scheduling them
        wakes = 0

        def call_soon_threadsafe(self, callback) -> None:  # type: ignore[no-untyped-def]
            self.wakes += 1

    pieces = [Piece(text=f"w{i} ", tokens=1) for i in range(29)] + [Piece(text=".", tokens=1, finish_reason="stop")]
    loop = Loop()
    whole = _PieceChannel(loop, None)  # type: ignore[arg-type]
    whole.put(pieces[0])
    assert loop.wakes == 1 and whole.take() == pieces[:1]  # the first piece is never held
    for piece in pieces[1:-1]:
        whole.put(piece)
    assert loop.wakes == 1  # 28 pieces held, nobody woken
    whole.put(pieces[-1])
    assert loop.wakes == 2 and whole.take() == pieces[1:]  # the last wakes the loop, with all of them

    loop = Loop()
    stream = _PieceChannel(loop, 0.0)  # type: ignore[arg-type]
    stream.put(pieces[0])
    stream.put(pieces[1])  # a wake-up is already under way: no second one
    assert loop.wakes == 1 and stream.take() == pieces[:2]
    stream.put(pieces[2])
    assert loop.wakes == 2 and stream.take() == pieces[2:3]

    loop = Loop()
    failing = _PieceChannel(loop, None)  # type: ignore[arg-type]
    failing.put(pieces[0])
    failing.take()
    error = RuntimeError("engine failed")
    failing.put(error)
    assert loop.wakes == 2 and failing.take() == [error]


def test_a_streaming_interval_gathers_tokens_after_the_first_one(specs):
    """streaming.interval_ms: the same answer in fewer items; the first token still leaves alone."""
    pieces = [f"w{i} " for i in range(30)]
    request = {"kind": "chat", "messages": [{"role": "user", "content": "go"}],
               "params": {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 1}}

    async def deltas(interval_ms: float) -> list[tuple[float, dict[str, Any]]]:
        spec = specs["smollm2-demo"].model_copy(update={"streaming": StreamingSpec(interval_ms=interval_ms)})
        server = _scripted_server(spec, pieces)
        server.engine = PacedEngine(pieces)
        loop = asyncio.get_running_loop()
        return [(loop.time(), event) async for event in server.generate_stream(request) if event["type"] == "delta"]

    gathered = asyncio.run(deltas(60))
    assert "".join(e["content"] for _, e in gathered) == "".join(pieces)
    assert sum(e["tokens"] for _, e in gathered) == len(pieces)
    # Pieces 10 ms apart in items at least 60 ms apart: far fewer items than pieces (about 6 here;
    # not a fixed count, which a slower machine, pacing the pieces further apart, would raise).
    assert len(gathered) < len(pieces) / 2
    # The first token never waits for company (two at most, when the next was generated before it left).
    assert gathered[0][1]["tokens"] <= 2
    gaps = [later - earlier for (earlier, _), (later, _) in zip(gathered, gathered[1:])]
    assert min(gaps[:-1]) >= 0.055  # each item but the last waited out the interval
