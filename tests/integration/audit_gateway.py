"""A Ray-free gateway for the audit fault tests: the real FastAPI app, GatewayState, audit scope and
writer, with the engine call replaced by a canned answer (the audit path is what is under test).

In-process: ``make_state(...)`` then ``create_app()`` over httpx's ASGI transport.
As a process (to be SIGKILLed): ``python audit_gateway.py DATABASE_URL HOME PORT``, served as a gateway
replica serves the gateway's own port.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

SIGNING_KEY = "fault-test-signing-key"
MODEL = "tumour-test"
CATALOG = [{
    "model_name": MODEL, "model_version": "1.0.0", "artifact_sha256": "a" * 64, "task": "imaging",
    "engine": "onnx", "app_name": "model-tumour-test", "deployment": "tumour-test",
}]
INFER_BODY = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}


def make_state(database_url: str, home: Path, **settings: Any):  # type: ignore[no-untyped-def]
    from medserve.gateway.state import GatewayState, set_gateway

    state = GatewayState(CATALOG, {
        "database_url": database_url, "home": str(home), "audit_signing_key": SIGNING_KEY,
        "pseudonym_key": "fault-test-pseudonyms", "api_key_cache_seconds": 3600, "audit_retry_s": 0.2,
        "audit_db_timeout_s": 2.0, "audit_batch_max": 200, **settings,
    })

    async def canned_engine(entry: Any, method: str, *args: Any) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        return {"outputs": [{"name": "p", "shape": [1], "datatype": "FP32", "data": [0.5]}], "output_sha256": "b" * 64}

    # Only the hop to an engine replica is canned: routing, quotas and the audit scope stay real.
    state._call = canned_engine  # type: ignore[method-assign]
    set_gateway(state)
    return state


async def serve_on_own_port(port: int) -> None:
    """Serve the app as a gateway replica serves the gateway's own port (gateway/listener.py)."""
    from medserve.gateway.app import create_app
    from medserve.gateway.listener import GatewayListener, ListenerConfig

    GatewayListener(create_app(), ListenerConfig(host="127.0.0.1", port=port)).start()
    await asyncio.Event().wait()  # until SIGKILLed


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))
    make_state(sys.argv[1], Path(sys.argv[2]))
    asyncio.run(serve_on_own_port(int(sys.argv[3])))
