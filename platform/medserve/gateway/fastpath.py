"""The gateway's hot inference routes, dispatched without FastAPI's per-request machinery.

Measured on the 2-core development machine (`medserve bench`, direct
ingress): FastAPI's own per-request work (a regex scan over every route,
dependency solving, five middlewares) cost more than the whole of Ray
Serve's path for a no-op answer; a bare FastAPI route ran at 0.64 of raw Ray
Serve before medserve did anything. The routes clinical apps call at high
rates are matched here by their fixed prefix and suffix and run the very
same handler the FastAPI route runs: one implementation, one audit scope, one
error mapping. FastAPI keeps every route for OpenAPI, the docs and all other
requests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from medserve.gateway.body_drain import BODY_METHODS, BodyDrainGuard
from medserve.gateway.errors import response_for
from medserve.gateway.state import GatewayState, get_gateway, route_path

Handler = Callable[[GatewayState, str, Request], Awaitable[Response]]


@dataclass(frozen=True)
class FastRoute:
    """``METHOD prefix{name}suffix``: one path parameter, a model name (never containing '/')."""

    method: str
    prefix: str
    suffix: str
    handler: Handler

    def name_in(self, path: str) -> str | None:
        if not path.startswith(self.prefix) or not path.endswith(self.suffix):
            return None
        name = path[len(self.prefix):len(path) - len(self.suffix)]
        return name if name and "/" not in name else None


class GatewayApp(FastAPI):
    """FastAPI, with a dispatch table consulted before FastAPI's router."""

    fast_routes: tuple[FastRoute, ...] = ()
    # Set from the gateway's settings when a replica starts; bounds the drain of unread bodies.
    max_body_bytes: int = 64 * 1024 * 1024

    def fast_match(self, scope: dict[str, Any]) -> tuple[FastRoute, str] | None:
        """The hot route a request is for and its model name, else None."""
        if scope["type"] != "http":
            return None
        path, method = route_path(scope), scope["method"]
        for route in self.fast_routes:
            if route.method == method:
                name = route.name_in(path)
                if name is not None:
                    return route, name
        return None

    async def fast_response(self, route: FastRoute, name: str, scope: dict[str, Any], receive: Any) -> Response:
        """A hot route's answer, built without FastAPI; the caller sends it.

        The gateway replica's ``__call__`` returns it to Ray Serve, which sends
        it exactly as raw Ray Serve sends a deployment's Response (no ASGI app
        around it); as an ASGI app (tests, uvicorn) ``__call__`` sends it.
        """
        request = _FastRequest(scope, receive)
        try:
            return await route.handler(await get_gateway(), name, request)
        except Exception as error:  # noqa: BLE001 - the FastAPI handlers' mapping, never exception text
            response = response_for(error)
        if request.body_complete:
            return response
        # Answered before the whole body arrived (401 on an upload, 413): sent through the drain guard.
        return _DrainedResponse(response, self.max_body_bytes, body_started=request.body_started)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        matched = self.fast_match(scope)
        if matched is not None:
            response = await self.fast_response(*matched, scope, receive)
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            guard = BodyDrainGuard(scope, receive, send, self.max_body_bytes)
            receive, send = guard.receive, guard.send
        await super().__call__(scope, receive, send)


class _FastRequest(Request):
    """A Starlette request whose headers are a plain dict (ASGI names are lower-case), and
    which knows whether its body has all been read (``GatewayState.read_body``).

    Starlette's ``Headers.get`` scans and decodes the raw header list on every
    call, and a request's handlers look headers up several times.
    """

    body_started = False
    body_complete = False

    @property
    def headers(self) -> dict[str, str]:  # type: ignore[override]
        cached = self.__dict__.get("_fast_headers")
        if cached is None:
            # First occurrence wins, as with Starlette's Headers.get.
            cached = {key.decode("latin-1"): value.decode("latin-1") for key, value in reversed(self.scope["headers"])}
            self.__dict__["_fast_headers"] = cached
        return cached


class _DrainedResponse(Response):
    """An early answer sent through BodyDrainGuard (gateway/body_drain.py)."""

    def __init__(self, response: Response, max_body_bytes: int, *, body_started: bool) -> None:
        self.response = response
        self.status_code = response.status_code
        self.max_body_bytes = max_body_bytes
        self.body_started = body_started

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def,override]
        guard = BodyDrainGuard(scope, receive, send, self.max_body_bytes, body_started=self.body_started)
        await self.response(scope, guard.receive, guard.send)
