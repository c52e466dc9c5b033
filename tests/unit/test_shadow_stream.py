"""A streamed chat completion under a shadow rollout, in process (real gateway and ModelServer, handles faked).

The primary and the shadow candidate are two versions of one model whose
engines say different things, so the test can tell whose words reach the
client: only the primary's; the shadow's whole answer is in its own audit row.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from medserve.controlplane.render import catalog_entry
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.gateway.app import create_app
from medserve.gateway.state import GatewayState, set_gateway
from medserve.registry import lifecycle
from medserve.registry.routing import version_app_name
from medserve.registry.service import register_version
from medserve.security.api_keys import create_api_key
from medserve.specs import DeploymentSpec, load_catalog
from medserve.engines.base import GenerationParams, Piece
from tests.unit.test_llm_gateway import FakeHandle, ScriptedEngine, _scripted_server

PRIMARY_WORDS = ["The", " humerus", "."]
SHADOW_WORDS = ["Shadow", " radius", " answer", "."]


class HeldEngine(ScriptedEngine):
    """Says nothing until released: a shadow slower than the primary by as long as the test likes."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.release = threading.Event()

    def generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event) -> Iterator[Piece]:
        self.release.wait(30)
        yield from super().generate(prompt, params, cancel)


def _version(spec: DeploymentSpec, version: str) -> DeploymentSpec:
    return spec.model_copy(update={"model": spec.model.model_copy(update={"version": version})})


@pytest.fixture
def shadowed(database_url, tmp_path, repo_root):
    spec = {s.name: s for s in load_catalog(repo_root / "deployments")}["smollm2-demo"]
    candidate = _version(spec, spec.model.version + "-shadow")
    with session_scope(database_url) as session:
        base = register_version(session, spec, "tester")
        lifecycle.ensure_alias(session, base.model, "production", base, "tester")
        register_version(session, candidate, "tester")
        lifecycle.set_status(session, spec.model.name, candidate.model.version, "validated", "qa")
        lifecycle.start_rollout(session, spec.model.name, "shadow", candidate.model.version, "tester",
                                require_approved=False)
        _, key = create_api_key(session, name="unit", role="clinical-app", department=None)
    state = GatewayState([catalog_entry(spec).model_dump(mode="json")],
                         {"database_url": database_url, "home": str(tmp_path), "require_approved_versions": False})
    state._handles[version_app_name(spec.name, spec.model.version)] = FakeHandle(_scripted_server(spec, PRIMARY_WORDS))
    shadow_server = _scripted_server(candidate, SHADOW_WORDS)
    shadow_server.engine = HeldEngine(SHADOW_WORDS)
    state._handles[version_app_name(spec.name, candidate.model.version)] = FakeHandle(shadow_server)
    set_gateway(state)
    # Entered: the app's event loop outlives each request, as a replica's does (the shadow task runs on it).
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client, spec, candidate, shadow_server.engine
        shadow_server.engine.release.set()
    set_gateway(None)
    state.close()


def _rows(database_url: str) -> list[AuditRecord]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(AuditRecord).order_by(AuditRecord.created_at)))


def test_streamed_answer_reaches_the_client_from_the_primary_only_and_the_shadow_is_audited(database_url, shadowed):
    client, spec, candidate, held = shadowed
    response = client.post("/v1/chat/completions", json={
        "model": spec.model.name, "stream": True, "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name a bone of the arm."}],
    })
    assert response.status_code == 200
    assert response.headers["x-medserve-model-version"] == spec.model.version
    frames = [frame[len("data: "):] for frame in response.text.split("\n\n") if frame]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    said = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert said == "".join(PRIMARY_WORDS)
    assert "Shadow" not in response.text and candidate.model.version not in response.text
    assert {c["system_fingerprint"] for c in chunks} == {f"{spec.model.name}@{spec.model.version}"}

    # The whole primary stream was answered while the shadow had not said a word.
    assert [r.shadow for r in _rows(database_url)] == [False]
    held.release.set()
    deadline = time.monotonic() + 10  # the shadow's record is written by its own task
    while len(_rows(database_url)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = _rows(database_url)
    primary = [r for r in rows if not r.shadow]
    shadow = [r for r in rows if r.shadow]
    assert len(primary) == 1 and len(shadow) == 1, [(r.model_version, r.shadow) for r in rows]
    answered, mirrored = primary[0], shadow[0]
    assert answered.model_version == spec.model.version and answered.rollout == "primary"
    assert answered.output_sha256 == hashlib.sha256("".join(PRIMARY_WORDS).encode()).hexdigest()
    assert mirrored.model_version == candidate.model.version
    assert mirrored.rollout == "shadow" and mirrored.shadow_of == answered.id
    assert mirrored.outcome == "ok" and mirrored.http_status == 200
    # Its whole answer, read to the end by the gateway although the client never saw it.
    assert mirrored.output_sha256 == hashlib.sha256("".join(SHADOW_WORDS).encode()).hexdigest()
    assert mirrored.completion_tokens == len(SHADOW_WORDS) and mirrored.finish_reason == "stop"
    assert mirrored.input_sha256 == answered.input_sha256 and mirrored.operation == "chat.completions"
