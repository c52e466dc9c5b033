"""Raw Ray Serve with nothing of medserve: the baseline `medserve bench` measures the gateway against.

One deployment that reads the body and answers a fixed JSON document, as
the noop engine does behind the gateway. It is deployed only by the
benchmark, into its own private Ray, never into a hospital's cluster: it has
an HTTP route and no authentication.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from medserve.controlplane.render import serve_logging_config

RAW_APP = "bench-raw"
RAW_ROUTE = "/raw"
RAW_DEPLOYMENT = "RawNoop"
ANSWER = b'{"findings":[{"label":"noop","probability":1.0}]}'


class RawNoop:
    async def __call__(self, request: Request) -> Response:
        await request.body()
        return Response(ANSWER, media_type="application/json")


def raw_application(
    max_ongoing_requests: int, num_cpus: float, replicas: int = 1, *, access_log: bool = True
) -> dict[str, Any]:
    """The Serve config entry of the baseline, with the same concurrency limit as the gateway's.

    ``access_log``: Ray Serve's access-log line per request, on as Serve ships it. The gateway turns
    its own off (its audit trail records each request); off here, the baseline drops it too, in the
    same way (``serve_logging_config``: the log off and Serve's logger at WARNING).
    """
    return {
        "name": RAW_APP,
        "route_prefix": RAW_ROUTE,
        "import_path": "medserve.bench.raw_app:build_app",
        "deployments": [
            {
                "name": RAW_DEPLOYMENT,
                "num_replicas": replicas,
                "max_ongoing_requests": max_ongoing_requests,
                "ray_actor_options": {"num_cpus": num_cpus},
                "logging_config": serve_logging_config(access_log=access_log),
            }
        ],
    }


def build_app(_args: dict[str, Any]) -> serve.Application:
    return serve.deployment(RawNoop, name=RAW_DEPLOYMENT).bind()
