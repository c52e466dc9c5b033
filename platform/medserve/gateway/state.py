"""Everything a gateway replica holds: settings, catalog, auth, audit, model handles.

Routes reach it through the ``get_gateway`` dependency;
keeping it out of the route modules lets each protocol live in its own file.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from ray import serve
from ray.serve.exceptions import BackPressureError

from medserve import metrics
from medserve.audit.writer import AuditWriter
from medserve.catalog import Catalog, CatalogEntry
from medserve.digests import sha256_hex
from medserve.engines.base import BATCHABLE_METHODS
from medserve.errors import (
    MedserveError,
    ModelOverloadedError,
    ModelTimeoutError,
    ModelUnavailableError,
    OperationNotSupportedError,
    PermissionDeniedError,
    PayloadTooLargeError,
    RequestValidationFailed,
    VersionNotApprovedError,
    error_from_payload,
)
from medserve.gateway.audit_scope import AuditRecorder, AuditScope, current_scope
from medserve.gateway.auth import Authenticator, require, require_department
from medserve.gateway.batching import HandleBatcher
from medserve.gateway.deadlines import deadlines
from medserve.gateway.known_state import StateRefresher
from medserve.gateway.quotas import PriorityGate, RateLimiter, TokenBudget, priority_class
from medserve.gateway.routing import RouteTable, entry_for
from medserve.registry.routing import choose
from medserve.security.api_keys import Principal
from medserve.security.oidc import verifier_from_settings
from medserve.security.roles import UndeclaredRouteError, route_permission
from medserve.settings import Settings

logger = logging.getLogger("medserve.gateway")

# The caller of the request being handled (set by GatewayState.principal):
# lets call() pick the priority class and count tokens without every route
# passing the principal along.
_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "medserve_principal", default=None
)


class GatewayState:
    def __init__(
        self,
        catalog: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        pipelines: list[dict[str, Any]] | None = None,
        allow_unpinned: bool = False,
    ) -> None:
        from medserve.specs import PipelineSpec

        self.settings = Settings(**(settings or {}))
        self.catalog = Catalog([CatalogEntry.model_validate(entry) for entry in catalog])
        self.pipelines = {spec.name: spec for spec in (PipelineSpec.model_validate(p) for p in pipelines or [])}
        self.database_url = self.settings.resolved_database_url
        self.authenticator = Authenticator(
            self.database_url, self.settings.api_key_cache_seconds, verifier_from_settings(self.settings)
        )
        self.rate_limiter = RateLimiter(
            self.settings.rate_limit_key_rps,
            self.settings.rate_limit_department_rps,
            departments=self.settings.rate_limit_departments,
            replicas=self.settings.gateway_replicas,
            burst_seconds=self.settings.rate_limit_burst_seconds,
        )
        self.token_budget = TokenBudget(
            self.database_url,
            self.settings.token_budget_key_per_day,
            self.settings.token_budget_department_per_day,
            cache_seconds=self.settings.token_budget_cache_seconds,
        )
        self._gates: dict[str, PriorityGate] = {}
        self.writer = AuditWriter(
            self.database_url,
            signing_key=self.settings.audit_signing_key_bytes(),
            batch_max=self.settings.audit_batch_max,
            queue_max=self.settings.audit_queue_max,
            spool_dir=self.settings.resolved_audit_spool_dir,
            checkpoint_every=self.settings.audit_checkpoint_every,
            retry_s=self.settings.audit_retry_s,
            db_timeout_s=self.settings.audit_db_timeout_s,
        )
        self.recorder = AuditRecorder(
            self.writer, self.settings.pseudonym_key_bytes(), durable=self.settings.audit_durability == "strict"
        )
        self.routes = RouteTable(self.database_url, self.catalog, self.settings.rollout_cache_seconds)
        self._handles: dict[str, Any] = {}
        self.local_engines = load_local_engines(self.catalog, allow_unpinned=allow_unpinned)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._stream_handles: dict[str, Any] = {}
        self._batchers: dict[tuple[str, str], HandleBatcher] = {}
        # What the request path needs from the database, held as last-known-good copies.
        self.known_states = [self.authenticator.keys, self.routes.known]
        for known in self.known_states:
            known.refresh()  # the first copy now, so the first request does not wait (a failure is retried)
        self.refresher = StateRefresher(self.known_states).start()
        metrics.init_gateway_counters(tuple(known.name for known in self.known_states))
        self.sampler = metrics.gateway_sampler(
            lambda: self.writer.queue_depth, lambda: self.writer.spool_records,
            lambda: {known.name: known.staleness_s for known in self.known_states},
        ).start()

    def close(self) -> None:
        self.refresher.stop()
        self.sampler.stop()
        self.writer.close()
        metrics.flush()

    def health(self) -> dict[str, Any]:
        """What /readyz and `medserve status` show: the audit spool and the age of each known state."""
        return {
            "audit": {"queued": self.writer.queue_depth, "spooled": self.writer.spool_records,
                      "durable_writes_failing": self.writer.failing},
            "state_age_s": {known.name: None if known.age_s is None else round(known.age_s, 1)
                            for known in self.known_states},
        }

    # --- versions ------------------------------------------------------------

    async def primary(self, entry: CatalogEntry) -> CatalogEntry:
        """The entry of the version the model's alias names now (no rollout arm)."""
        state = await self.routes.state(entry.model_name) if entry.alias is not None else None
        return entry if state is None else entry_for(entry, state.primary)

    async def route(self, entry: CatalogEntry, audit: AuditScope) -> CatalogEntry:
        """Choose the version that answers this request (canary split sticky per
        patient pseudonym) and the shadow candidate to mirror it to, if any."""
        state = await self.routes.state(entry.model_name) if entry.alias is not None else None
        if state is None:
            audit.entry = entry
            return entry
        require_approved = self.settings.require_approved_versions
        choice = choose(state, audit.context.get("patient"), require_approved=require_approved)
        chosen = entry_for(entry, choice.version)
        audit.entry, audit.rollout = chosen, choice.arm
        if require_approved and choice.version.status != "approved":
            raise VersionNotApprovedError(model=entry.model_name, version=choice.version.version)
        audit.shadow_entry = entry_for(entry, choice.shadow) if choice.shadow is not None else None
        return chosen

    def _mirror(self, audit: AuditScope, method: str, args: tuple[Any, ...]) -> None:
        assert audit.shadow_entry is not None
        self._background(self._shadow_call(audit.shadow_scope(audit.shadow_entry), method, args))

    def mirror_stream(self, audit: AuditScope, method: str, *args: Any) -> None:
        """Mirror a streamed call to the shadow candidate :meth:`route` chose, if any.

        The shadow's stream is consumed by a task of its own, never by the
        caller's: the primary stream neither waits for it nor sees any of it.
        Its whole answer goes to its own audit record (``shadow``, ``shadow_of``).
        """
        if audit.shadow_entry is not None:
            scope = audit.shadow_scope(audit.shadow_entry)
            scope.streamed = True
            self._background(self._shadow_stream(scope, method, args))

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        # Keep a reference until done: the event loop holds tasks only weakly.
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow_call(self, scope: AuditScope, method: str, args: tuple[Any, ...]) -> None:
        assert scope.entry is not None
        try:
            # Straight to the engine: a shadow neither spends the caller's
            # token budget nor takes a slot at the priority gate.
            result = await self._call(scope.entry, method, *args)
        except MedserveError as error:
            record = scope.to_record(error.http_status, error.code, "error")
        except Exception:  # noqa: BLE001 - a shadow must never affect the answered request
            record = scope.to_record(500, "internal_error", "error")
        else:
            # LLM engines return text; the gateway digests it (as for answered calls).
            content = result.get("content")
            scope.output_sha256 = result.get("output_sha256") or (sha256_hex(content) if content is not None else None)
            scope.output_label = result.get("top_label")
            record = scope.to_record(200, None, "ok")
        await self.recorder.write_shadow(record)

    async def _shadow_stream(self, scope: AuditScope, method: str, args: tuple[Any, ...]) -> None:
        """Read a shadow's whole stream (no budget, no priority slot) and write its record."""
        assert scope.entry is not None
        content, reasoning = hashlib.sha256(), hashlib.sha256()
        try:
            async for event in self._stream(self._open_stream(scope.entry, method, args), scope.entry):
                kind = event.get("type")
                if kind == "start":
                    scope.prompt_tokens, scope.completion_tokens = event.get("prompt_tokens"), 0
                elif kind == "delta":
                    scope.observe_tokens(event["tokens"])
                    scope.completion_tokens = (scope.completion_tokens or 0) + event["tokens"]
                    content.update(event["content"].encode())
                    if event["reasoning"]:
                        reasoning.update(event["reasoning"].encode())
                        scope.reasoning_sha256 = reasoning.hexdigest()
                elif kind == "end":
                    scope.prompt_tokens = event["prompt_tokens"]
                    scope.completion_tokens = event["completion_tokens"]
                    scope.finish_reason = event["finish_reason"]
        except MedserveError as error:
            record = scope.to_record(error.http_status, error.code, "error")
        except Exception:  # noqa: BLE001 - a shadow must never affect the answered request
            record = scope.to_record(500, "internal_error", "error")
        else:
            scope.output_sha256 = content.hexdigest()  # as the answered stream digests its content
            record = scope.to_record(200, None, "ok")
        await self.recorder.write_shadow(record)

    # --- callers -------------------------------------------------------------

    async def principal(self, request: Request, route: str | None = None) -> Principal:
        """Authenticate the caller, then enforce the route's permission and the caller's request rate.

        The permission comes from ROUTE_PERMISSIONS for the matched route, so
        every authenticated route is guarded by the one table (fail closed: a
        route missing from it is refused). A caller that knows its route
        template passes it, sparing the scan of the table's patterns.
        """
        principal = await self.authenticator.authenticate(request.headers.get("authorization"))
        audit = current_scope.get()
        if audit is not None:
            audit.principal = principal  # a refusal below still names the caller
        self.authorize_route(principal, request.method, route or route_path(request.scope))
        _current_principal.set(principal)
        return principal

    def authorize_route(self, principal: Principal, method: str, route: str) -> None:
        """The route's permission from ROUTE_PERMISSIONS (fail closed), then the caller's request rate;
        for callers authenticated some other way too (the console's sign-in session)."""
        try:
            permission = route_permission(method, route)
        except UndeclaredRouteError:
            # The path is not logged: a concrete path can carry identifiers.
            logger.error("a %s route missing from ROUTE_PERMISSIONS was called", method)
            raise PermissionDeniedError("this route is not open to any role") from None
        if permission is not None:
            require(principal, permission)
        self.rate_limiter.check(principal)

    def authorize_model(self, principal: Principal, model_name: str, task: str | None = None) -> CatalogEntry:
        """Object-level checks (this model, this department, this task) for a caller that
        ``principal`` admitted; whether the role may infer at all is the route's table entry."""
        entry = self.catalog.get(model_name)
        require_department(principal, entry.departments, entry.model_name)
        if task is not None and entry.task != task:
            raise OperationNotSupportedError(model=entry.model_name, task=entry.task)
        return entry

    async def check_token_budget(self, principal: Principal, entry: CatalogEntry) -> None:
        """429 token_budget_exceeded when the caller's key or department used its LLM tokens today."""
        if entry.task == "llm" and self.token_budget.enabled:
            await asyncio.to_thread(self.token_budget.check, principal)

    # --- request bodies --------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The body, refusing (413) anything over the limit before reading it all."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(limit_bytes=limit)
        read = request.__dict__.get("_body")  # read already (Starlette keeps it there)
        if read is not None:
            return read
        # Straight from the ASGI channel rather than through request.stream(): one
        # awaited message for a small body, no async generator per request.
        receive = request.receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client went away
                raise ClientDisconnect()
            request.body_started = True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(limit_bytes=limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        request.body_complete = True
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        request._body = body  # later request.body() calls see it
        return body

    # --- engines -------------------------------------------------------------

    def _handle(self, entry: CatalogEntry) -> Any:
        handle = self._handles.get(entry.app_name)
        if handle is None:
            handle = serve.get_deployment_handle(entry.deployment_name, app_name=entry.app_name)
            self._handles[entry.app_name] = handle
        return handle

    def gate(self, entry: CatalogEntry) -> PriorityGate | None:
        """The model's priority gate (None when the catalog gives no capacity).

        For a model in its own replicas, this replica's share of the model's
        capacity and queue; for one loaded in the gateway, the spec's limits
        hold in each gateway replica.
        """
        if not entry.max_in_flight:
            return None
        gate = self._gates.get(entry.app_name)
        if gate is None:
            share = 1 if entry.placement == "gateway" else self.settings.gateway_replicas
            max_waiting = None if entry.max_queued is None else math.ceil(entry.max_queued / share)
            gate = PriorityGate(math.ceil(entry.max_in_flight / share), max_waiting=max_waiting,
                                model=entry.model_name)
            self._gates[entry.app_name] = gate
        return gate

    def priority_class(self, principal: Principal | None = None) -> str:
        principal = principal or _current_principal.get()
        return priority_class(principal.department if principal else None, self.settings.department_priority)

    async def call(self, entry: CatalogEntry, method: str, *args: Any, audit: AuditScope | None = None) -> dict[str, Any]:
        """Call an engine replica; its error payloads come back as MedserveErrors.

        When the model is saturated the call waits at the model's priority
        gate, where emergency departments go before standard and research.
        With ``audit``, a shadow candidate chosen by :meth:`route` gets the same
        call, concurrently; its answer goes to its own audit record only.
        """
        if audit is not None and audit.shadow_entry is not None:
            self._mirror(audit, method, args)
        # _admit and a plain try rather than the _admitted context manager: this runs on every
        # hot request, and a generator-based context manager costs more than the checks themselves.
        principal, gate = await self._admit(entry)
        try:
            result = await self._call(entry, method, *args)
        finally:
            if gate is not None:
                gate.release()
        if principal is not None and self.token_budget.enabled and "prompt_tokens" in result:
            self.token_budget.add(principal, int(result["prompt_tokens"]) + int(result.get("completion_tokens", 0)))
        if audit is not None and isinstance(result.get("top_label"), str):
            audit.output_label = result["top_label"][:64]
        return result

    async def _admit(self, entry: CatalogEntry) -> tuple[Principal | None, PriorityGate | None]:
        """Admission to a model, shared by whole and streamed calls: the caller's token budget is
        checked, then a slot taken at the model's priority gate (the caller releases it)."""
        principal = _current_principal.get()
        if principal is not None and entry.task == "llm":
            await self.check_token_budget(principal, entry)
        gate = self.gate(entry)
        if gate is not None and not gate.enter_now():
            await gate.wait(self.priority_class(principal))
        return principal, gate

    @contextlib.asynccontextmanager
    async def _admitted(self, entry: CatalogEntry) -> AsyncIterator[Principal | None]:
        """_admit for a stream: the slot is held until the stream ends."""
        principal, gate = await self._admit(entry)
        try:
            yield principal
        finally:
            if gate is not None:
                gate.release()

    async def _answer(self, entry: CatalogEntry, pending: Any, timeout_s: float) -> Any:
        """One item from an engine replica, with the gateway's error mapping applied."""
        # One sweep per event loop watches every call's deadline (gateway/deadlines.py):
        # no timer of its own per call, no extra Task as with wait_for.
        watched = deadlines()
        watch = watched.watch(timeout_s)
        try:
            result = await pending
        except asyncio.CancelledError:
            if watch.timed_out():
                raise ModelTimeoutError(model=entry.model_name) from None
            raise
        except TimeoutError:
            raise ModelTimeoutError(model=entry.model_name) from None
        except StopAsyncIteration:
            raise
        except BackPressureError:
            # Ray Serve's queue for the model (max_queued_requests) is full.
            raise ModelOverloadedError(model=entry.model_name) from None
        except Exception as error:  # noqa: BLE001 - replica died, application missing, ...
            logger.warning("call to %s failed: %s", entry.app_name, type(error).__name__)
            raise ModelUnavailableError(model=entry.model_name) from None
        finally:
            watched.release(watch)
        if isinstance(result, dict) and "error" in result:
            raise error_from_payload(result)
        return result

    def _local_engine(self, entry: CatalogEntry) -> Any | None:
        """The engine this replica loaded for the entry (placement gateway), else None."""
        if entry.placement != "gateway":
            return None
        local = self.local_engines.get(entry.app_name)
        if local is None:
            raise ModelUnavailableError(model=entry.model_name)  # it failed to load here (logged)
        return local

    async def _call(self, entry: CatalogEntry, method: str, *args: Any) -> dict[str, Any]:
        local = self._local_engine(entry)
        if local is not None:
            # In this replica: the same ModelServer method, without the handle hop.
            response = getattr(local, method)(*args)
        elif method in BATCHABLE_METHODS and not entry.autoscaled:
            # Calls to this model in the same event-loop tick share one handle call (gateway/batching.py).
            # Not for a model Ray Serve scales: its autoscaler counts ongoing calls, so requests merged
            # into one call would hide their load (measured: 12 callers on one replica, never scaled up).
            response = self._batcher(entry, method).call(*args)
        else:
            response = getattr(self._handle(entry), method).remote(*args)
        return await self._answer(entry, response, self.settings.request_timeout_s)

    def _batcher(self, entry: CatalogEntry, method: str) -> HandleBatcher:
        batcher = self._batchers.get((entry.app_name, method))
        if batcher is None:
            batcher = HandleBatcher(lambda: self._handle(entry), method)
            self._batchers[(entry.app_name, method)] = batcher
        return batcher

    async def stream(self, entry: CatalogEntry, method: str, *args: Any) -> AsyncIterator[dict[str, Any]]:
        """Items of a streaming engine method, within the request timeout.

        Closing this generator early (the client went away) cancels the call
        on the replica, which stops the generation.
        """
        # Admission (budget, priority slot) holds for the whole stream; its
        # audited tokens count towards the caller's later requests.
        async with self._admitted(entry):
            async for item in self._stream(self._open_stream(entry, method, args), entry):
                yield item

    def _open_stream(self, entry: CatalogEntry, method: str, args: tuple[Any, ...]) -> Any:
        local = self._local_engine(entry)
        if local is not None:
            return _LocalStream(getattr(local, method)(*args))
        return getattr(self._stream_handle(entry), method).remote(*args)

    def _stream_handle(self, entry: CatalogEntry) -> Any:
        handle = self._stream_handles.get(entry.app_name)
        if handle is None:
            handle = self._handle(entry).options(stream=True)
            self._stream_handles[entry.app_name] = handle
        return handle

    async def _stream(self, responses: Any, entry: CatalogEntry) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s  # one deadline for the whole answer
        try:
            while True:
                try:
                    item = await self._answer(entry, responses.__anext__(), max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            responses.cancel()


def load_local_engines(catalog: Catalog, *, allow_unpinned: bool = False) -> dict[str, Any]:
    """The engines of catalog entries placed in the gateway, by application name.

    One that fails to load (a missing extra, a changed artifact) is left out
    and answers 503 model_unavailable, rather than keeping the whole gateway
    (and every other model behind it) from starting.
    """
    from medserve.engines.serve_app import ModelServer

    engines: dict[str, Any] = {}
    for entry in catalog.entries():
        if entry.placement != "gateway" or entry.engine_spec is None:
            continue
        try:
            engines[entry.app_name] = ModelServer(entry.engine_spec, allow_unpinned=allow_unpinned)
        except MedserveError as error:
            logger.error("engine of %s not loaded in the gateway: %s (%s)", entry.model_name, error.code, error.message)
    return engines


class _LocalStream:
    """A streaming call to an engine in this replica, shaped like a streaming
    DeploymentHandle's response: ``__anext__`` and ``cancel()``."""

    def __init__(self, generator: Any) -> None:
        self._generator = generator

    def __anext__(self) -> Any:
        return self._generator.__anext__()

    def cancel(self) -> None:
        # The generator's own finally (the engine's cancel flag) runs on close.
        task = asyncio.get_running_loop().create_task(self._generator.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


# Closes in progress (the event loop holds tasks only weakly).
_closing: set[asyncio.Task[None]] = set()


def route_path(scope: dict[str, Any]) -> str:
    """The request's path inside the app (without the ASGI root_path a proxy may add)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


_replica_state: GatewayState | None = None


def set_gateway(state: GatewayState | None) -> None:
    """Called by the Gateway replica once its state is built.

    A module global rather than ``app.state``: Ray Serve serialises the
    FastAPI app into the replica, so the app object a request sees is not
    the one the replica's constructor can reach.
    """
    global _replica_state
    _replica_state = state


async def get_gateway() -> GatewayState:
    # async: FastAPI would run a plain function dependency in a thread pool.
    if _replica_state is None:
        raise ModelUnavailableError("the gateway is starting")
    return _replica_state


# The provenance headers every answer carries, named once: the dict form and the hot routes' raw form.
INFERENCE_ID_HEADER = "X-Medserve-Inference-Id"
MODEL_HEADER = "X-Medserve-Model"
MODEL_VERSION_HEADER = "X-Medserve-Model-Version"
AUDIT_HEADER = "X-Medserve-Audit"
_RAW_NAMES = tuple(name.lower().encode("latin-1")
                   for name in (INFERENCE_ID_HEADER, MODEL_HEADER, MODEL_VERSION_HEADER, AUDIT_HEADER))


def provenance_headers(inference_id: str, entry: CatalogEntry, landed: str | None = None) -> dict[str, str]:
    """Which exact model answered, the audit id to quote when reviewing it, and where its audit
    record is (``X-Medserve-Audit``: committed, or spooled while the database is unreachable)."""
    headers = {
        INFERENCE_ID_HEADER: inference_id,
        MODEL_HEADER: entry.model_name,
        MODEL_VERSION_HEADER: entry.model_version,
    }
    if landed is not None:
        headers[AUDIT_HEADER] = landed
    return headers


def provenance_raw_headers(inference_id: str, entry: CatalogEntry, landed: str | None = None
                           ) -> list[tuple[bytes, bytes]]:
    """``provenance_headers`` as raw header pairs (lower-case names, latin-1 values, as Starlette writes
    them), for the hot routes' JSONAnswer: no header dict to lower-case and encode on every answer."""
    id_name, model_name, version_name, audit_name = _RAW_NAMES
    headers = [(id_name, inference_id.encode("latin-1")), (model_name, entry.model_name.encode("latin-1")),
               (version_name, entry.model_version.encode("latin-1"))]
    if landed is not None:
        headers.append((audit_name, landed.encode("latin-1")))
    return headers


def parse_json_body(model: type, body: bytes) -> Any:
    """Validate a JSON body inside the audit scope; field paths only, never values."""
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        fields = [".".join(str(p) for p in item["loc"]) for item in error.errors()]
        raise RequestValidationFailed(fields=fields[:20]) from None


def _inline_refs(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(definitions[ref.removeprefix("#/$defs/")], definitions)
        return {key: _inline_refs(value, definitions) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(item, definitions) for item in node]
    return node


def json_body_schema(model: type) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (so fuzzers and SDK generators see it).

    Nested models are inlined: pydantic's local ``#/$defs/...`` references do
    not resolve once the schema sits inside the OpenAPI document.
    """
    schema = model.model_json_schema()
    schema = _inline_refs(schema, schema.get("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
