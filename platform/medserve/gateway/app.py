"""The gateway application: a Ray Serve ingress deployment over a FastAPI app.

Every inference route runs inside one audit scope, so an answered, refused or
failed request leaves exactly one record. Bodies are parsed inside that scope
(not by FastAPI before the route runs) for the same reason: a malformed body
is a request that reached the gateway and must be accounted for.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve

from medserve import __version__
from medserve.gateway.errors import install_error_handlers
from medserve.gateway.fastpath import FastRoute, GatewayApp
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


@serve.ingress(app)
class Gateway:
    """One gateway replica: builds the shared state the routes use."""

    def __init__(
        self,
        catalog: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        pipelines: list[dict[str, Any]] | None = None,
        allow_unpinned: bool = False,
    ) -> None:
        self.state = GatewayState(catalog, settings, pipelines, allow_unpinned=allow_unpinned)
        set_gateway(self.state)
        app.max_body_bytes = self.state.settings.max_body_bytes

    def __del__(self) -> None:
        # Ray Serve calls this on graceful replica shutdown: drain the audit queue.
        state = getattr(self, "state", None)
        if state is not None:
            state.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named by import_path in the rendered Serve config."""
    return serve.deployment(Gateway, name="Gateway").bind(
        args["catalog"], args.get("settings") or {}, args.get("pipelines") or [], bool(args.get("allow_unpinned"))
    )
