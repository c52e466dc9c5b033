"""The real gateway app and GatewayState in-process, with engines replaced by canned answers.

Ray is not what these tests check: authentication, route permissions,
departments, quotas and audit rows are all gateway code, so they run here
against a SQLite database without a cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from medserve.catalog import CatalogEntry
from medserve.controlplane.render import catalog_entry
from medserve.db.engine import session_scope
from medserve.gateway.app import create_app
from medserve.gateway.state import GatewayState, set_gateway
from medserve.security.api_keys import create_api_key
from medserve.specs import deployments_of, load_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]

CANNED: dict[str, dict[str, Any]] = {
    "generate": {
        "content": "ok",
        "reasoning": "",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "time_to_first_token_s": 0.01,
    },
    "classify": {"output_sha256": "1" * 64, "label": "no_tumour", "scores": {"no_tumour": 1.0}},
    "infer": {"output_sha256": "2" * 64, "outputs": []},
    "metadata": {"name": "brain-mri-tumour", "versions": ["0.1.1"], "platform": "onnxruntime"},
}


class CannedGateway(GatewayState):
    """GatewayState whose engine calls return canned results (and are counted)."""

    calls: list[str]

    async def _call(self, entry: CatalogEntry, method: str, *args: Any) -> dict[str, Any]:
        self.calls.append(method)
        return dict(CANNED.get(method, {}))


def catalog() -> list[dict[str, Any]]:
    return [catalog_entry(spec).model_dump(mode="json") for spec in deployments_of(load_catalog(REPO_ROOT / "deployments"))]


@contextlib.contextmanager
def gateway_client(
    tmp_path: Path,
    database_url: str,
    *,
    state_class: type[CannedGateway] = CannedGateway,
    pipelines: list[dict[str, Any]] | None = None,
    **settings: Any,
) -> Iterator[tuple[TestClient, CannedGateway]]:
    state = state_class(
        catalog(),
        {"home": tmp_path, "database_url": database_url, "pseudonym_key": "test-pseudonym-key", **settings},
        pipelines,
    )
    state.calls = []
    set_gateway(state)
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            yield client, state
    finally:
        set_gateway(None)
        state.close()


def make_key(database_url: str, role: str, department: str | None = None) -> str:
    with session_scope(database_url) as session:
        _, plaintext = create_api_key(session, name=f"test {role}", role=role, department=department)
    return plaintext
