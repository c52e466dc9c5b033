"""The gateway application: a Ray Serve HTTP deployment that runs a FastAPI app.

Every inference route runs inside one audit scope, so an answered, refused or
failed request leaves exactly one record. Bodies are parsed inside that scope
(not by FastAPI before the route runs) for the same reason: a malformed body
is a request that reached the gateway and must be accounted for.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from medserve import __version__
from medserve.console.routes import router as console_router
from medserve.gateway.errors import install_error_handlers
from medserve.gateway.fastpath import FastRoute, GatewayApp
from medserve.gateway.listener import GatewayListener, ListenerConfig
from medserve.gateway.openapi import install_openapi
from medserve.gateway.routes import admin_audit, admin_models, chat, health, imaging, models, oip, pipelines, reviews
from medserve.gateway.state import GatewayState, set_gateway


def create_app() -> FastAPI:
    app = GatewayApp(
        title="medserve gateway",
        version=__version__,
        description="Authenticated, audited access to the hospital's models.",
    )
    install_error_handlers(app)
    install_openapi(app)
    # Hot routes first: Ray Serve names each request's route for its metrics by
    # scanning the app's routes in order, before the app itself runs.
    for module in (imaging, oip, chat, models, health, pipelines, reviews, admin_audit, admin_models):
        app.include_router(module.router)
    app.include_router(console_router)  # the review console's pages, after every API route
    # The hot inference routes skip FastAPI's routing and dependency solving
    # (gateway/fastpath.py); their FastAPI routes stay for OpenAPI and docs.
    app.fast_routes = (
        FastRoute("POST", "/v1/imaging/", "", imaging.analyze),
        FastRoute("POST", "/v2/models/", "/infer", oip.infer_tensors),
    )
    return app


def route_table(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, routers' prefixes included (HEAD folded into GET)."""
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        # FastAPI >= 0.16x wraps included routers; older versions flatten them into APIRoutes.
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            original = getattr(context, "original_route", context)
            for method in getattr(original, "methods", None) or ():
                if method != "HEAD":
                    found.add((method, context.path))
    return sorted(found)


app = create_app()


class _RunApp(Response):
    """Hands the request's ASGI triple to the gateway app when Ray Serve "sends" this response.

    Why the gateway is not a ``@serve.ingress(app)`` deployment: for an ASGI
    ingress Ray Serve names every request's route by matching it against each
    of the app's routes (regular expressions) and wraps the app once more;
    measured on the 2-core development machine that cost about 30 µs of the
    replica's CPU per request (direct ingress, no-op model: 276-297 µs per
    request as an ingress, 256-260 µs this way; raw Ray Serve 160-170 µs).
    A plain ``__call__`` deployment is Ray Serve's cheapest HTTP path, the one
    raw Ray Serve takes: Ray sends a returned Response by calling it with the
    request's scope, receive and send, so returning this object runs the
    whole gateway app (FastAPI routes, streaming; the hot routes are answered
    before it, in Gateway.__call__) on exactly the
    ASGI channel an ingress would have had. Ray's own request metrics then
    carry the route prefix instead of the route; medserve's carry the route.
    """

    def __init__(self) -> None:  # no body, headers or background: the app writes the answer itself
        pass

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def,override]
        await app(scope, receive, send)


_RUN_APP = _RunApp()


class Gateway:
    """One gateway replica: builds the shared state the routes use, and serves the gateway's own port.

    Requests reach the same app on the gateway's own port (gateway/listener.py:
    no Ray Serve layer per request, the fastest door), on Serve's proxy port and
    on the replica's Serve direct-ingress port (both through ``__call__``).
    """

    def __init__(
        self,
        catalog: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        pipelines: list[dict[str, Any]] | None = None,
        allow_unpinned: bool = False,
        listener: dict[str, Any] | None = None,
    ) -> None:
        self.state = GatewayState(catalog, settings, pipelines, allow_unpinned=allow_unpinned)
        set_gateway(self.state)
        app.max_body_bytes = self.state.settings.max_body_bytes
        self.listener: GatewayListener | None = None
        if listener:
            # Bound here, in the constructor: a port already taken or an unreadable certificate fails
            # the replica's start with the reason (GatewayListenerError), and the audit writer it
            # started is stopped, since Serve does not call __del__ on a replica that never started.
            try:
                self.listener = GatewayListener(app, ListenerConfig.model_validate(listener))
            except BaseException:
                self.state.close()
                raise
            self.listener.start()

    async def __call__(self, request: Request) -> Response:
        # A hot inference route is answered here and its Response handed back to
        # Ray Serve to send, as raw Ray Serve does: no ASGI app around it.
        scope = request.scope
        matched = app.fast_match(scope)
        if matched is not None:
            return await app.fast_response(*matched, scope, request.receive)
        # Anything else runs the whole gateway app; Ray built ``request`` from the
        # ASGI triple it now passes to the returned object.
        return _RUN_APP

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose own port stopped serving is restarted."""
        if self.listener is not None and (error := self.listener.failed) is not None:
            raise RuntimeError(f"the gateway's own port stopped serving: {error!r}")

    async def __del__(self) -> None:
        # Ray Serve awaits this on graceful replica shutdown: finish the requests on
        # the gateway's own port (Serve does not see them), then drain the audit queue.
        listener = getattr(self, "listener", None)
        try:
            if listener is not None:
                self.listener = None
                await listener.stop()
        finally:  # the audit queue is drained whatever became of the port
            state = getattr(self, "state", None)
            if state is not None:
                self.state = None
                state.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named by import_path in the rendered Serve config."""
    return serve.deployment(Gateway, name="Gateway").bind(
        args["catalog"], args.get("settings") or {}, args.get("pipelines") or [], bool(args.get("allow_unpinned")),
        args.get("listener"),
    )
