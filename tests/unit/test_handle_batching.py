"""Requests for one model in one event-loop tick share a handle call; each caller gets its own answer or error.

The handle here is a stand-in with DeploymentHandle's calling shape (``method.remote(...)`` returning an
awaitable): unit tests cannot start Ray, and Ray's side is covered by the integration tests, which reach
every imaging model through this path.
"""

from __future__ import annotations

import asyncio
from typing import Any

from medserve.gateway.batching import HandleBatcher


class _Method:
    def __init__(self, replica: "FakeReplica", name: str) -> None:
        self.replica, self.name = replica, name

    def remote(self, *args: Any) -> Any:
        self.replica.calls.append((self.name, args))
        return self.replica.answer(self.name, args)


class FakeReplica:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def answer(self, name: str, args: tuple[Any, ...]) -> Any:
        await asyncio.sleep(0.001)
        if self.fail is not None:
            raise self.fail
        if name == "call_many":
            method, calls = args
            return [{"error": {"code": "invalid_image"}} if call[0] == b"bad" else {"echo": call[0]} for call in calls]
        return {"echo": args[0]}


def test_calls_of_one_tick_travel_as_one_handle_call_and_each_gets_its_own_answer():
    replica = FakeReplica()

    async def scenario() -> list[Any]:
        batcher = HandleBatcher(lambda: replica, "classify")
        together = await asyncio.gather(*(batcher.call(body, "image/png") for body in (b"a", b"bad", b"c")))
        alone = await batcher.call(b"d", "image/png")  # a lone request goes out at once, as a plain call
        return [*together, alone]

    answers = asyncio.run(scenario())
    assert answers == [{"echo": b"a"}, {"error": {"code": "invalid_image"}}, {"echo": b"c"}, {"echo": b"d"}]
    assert [name for name, _ in replica.calls] == ["call_many", "classify"]
    assert replica.calls[0][1][0] == "classify" and len(replica.calls[0][1][1]) == 3


def test_a_failed_batch_fails_each_caller_with_the_error_and_a_caller_that_gave_up_is_not_sent():
    replica = FakeReplica(fail=ConnectionError("replica died"))

    async def scenario() -> list[Any]:
        batcher = HandleBatcher(lambda: replica, "infer")
        gave_up = batcher.call({"x": 0})
        gave_up.cancel()
        return await asyncio.gather(*(batcher.call({"x": i}) for i in (1, 2)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(result) for result in results] == [ConnectionError, ConnectionError]
    assert len(replica.calls) == 1 and len(replica.calls[0][1][1]) == 2  # the cancelled call never left


def test_batches_are_capped():
    replica = FakeReplica()

    async def scenario() -> None:
        batcher = HandleBatcher(lambda: replica, "classify", max_batch=4)
        await asyncio.gather(*(batcher.call(bytes([i]), "image/png") for i in range(10)))

    asyncio.run(scenario())
    assert [len(args[1]) for _, args in replica.calls] == [4, 4, 2]


def test_model_server_answers_a_batch_call_by_call():
    from medserve.bench.runner import noop_spec
    from medserve.engines.serve_app import ModelServer

    server = ModelServer(noop_spec("bench-noop", "replicas").model_dump(mode="json"))
    answers = asyncio.run(server.call_many("classify", [(b"\x89PNG-a", "image/png"), (b"\x89PNG-b", "image/png")]))
    assert [answer["top_label"] for answer in answers] == ["noop", "noop"]
    # The no-op engine has no tensor interface: each call of the batch gets its own error payload.
    refused = asyncio.run(server.call_many("infer", [({"inputs": []},), ({"inputs": []},)]))
    assert [answer["error"]["code"] for answer in refused] == ["operation_not_supported"] * 2
    # Only light, stateless methods travel in batches.
    assert asyncio.run(server.call_many("generate", [({},)]))[0]["error"]["code"] == "operation_not_supported"


def test_a_model_ray_serve_scales_gets_one_call_per_request_so_its_autoscaler_sees_the_load():
    """Ray Serve's autoscaler counts ongoing calls: merged into one, twelve waiting callers looked like one
    (a model under load that never scaled up). A fixed-size model keeps batching."""
    from types import SimpleNamespace

    from medserve.bench.runner import noop_spec
    from medserve.controlplane.render import catalog_entry
    from medserve.gateway.state import GatewayState

    fixed = catalog_entry(noop_spec("fixed-noop", "replicas"))
    scaled = catalog_entry(noop_spec("scaled-noop", "replicas",
                                     autoscaling={"min_replicas": 1, "max_replicas": 3}))
    assert not fixed.autoscaled and scaled.autoscaled
    replicas = {fixed.app_name: FakeReplica(), scaled.app_name: FakeReplica()}
    state = object.__new__(GatewayState)  # only what _call touches: no database, no Ray
    state._handles, state._batchers, state.local_engines = dict(replicas), {}, {}
    state.settings = SimpleNamespace(request_timeout_s=5.0)

    async def five_each() -> list[Any]:
        return await asyncio.gather(*(state._call(entry, "classify", f"img{i}".encode(), "image/png")
                                      for entry in (fixed, scaled) for i in range(5)))

    answers = asyncio.run(five_each())
    assert answers == [{"echo": f"img{i}".encode()} for _ in range(2) for i in range(5)]
    assert [name for name, _ in replicas[fixed.app_name].calls] == ["call_many"]
    assert [name for name, _ in replicas[scaled.app_name].calls] == ["classify"] * 5
