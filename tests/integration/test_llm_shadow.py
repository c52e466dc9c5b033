"""A streamed chat completion under a shadow rollout on the real cluster, with the real SmolLM2.

The candidate is the same GGUF artifact registered under another version string (no invented weights),
given a quarter CPU so it fits beside the catalog. At temperature 0 both versions say the same thing, so
the shadow's record carrying the digest of the primary's whole answer shows that the gateway read the
shadow's stream to its end, although the client saw none of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from medserve.controlplane.rollouts import RolloutController
from medserve.db.engine import session_scope
from medserve.registry import lifecycle
from medserve.registry.service import register_version
from medserve.specs import DeploymentSpec, deployments_of

from .conftest import Platform, new_patient_id

pytestmark = pytest.mark.slow

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol(platform: Platform) -> DeploymentSpec:
    return next(spec for spec in deployments_of(platform.catalog()) if spec.model.name == SMOL)


@pytest.fixture(scope="module")
def shadowed(platform: Platform, smol: DeploymentSpec) -> Iterator[str]:
    candidate_version = smol.model.version + "-shadow"
    candidate = smol.model_copy(update={
        "model": smol.model.model_copy(update={"version": candidate_version}),
        "resources": smol.resources.model_copy(update={"num_cpus": 0.25}),
    })
    with session_scope(platform.database_url) as session:
        register_version(session, candidate, "integration tests")
    controller = RolloutController(
        platform.database_url, platform.catalog(), platform.target, platform.render_options(),
        require_approved=False, cache_seconds=platform.settings.rollout_cache_seconds,
    )
    controller.shadow(SMOL, candidate_version, "integration tests")
    time.sleep(platform.settings.rollout_cache_seconds + 1)  # every gateway replica follows the rollout
    yield candidate_version
    # Leave the shared cluster as the catalog describes it.
    with session_scope(platform.database_url) as session:
        rollout = lifecycle.get_rollout(session, lifecycle.get_model(session, SMOL))
        if rollout is not None:
            session.delete(rollout)
    time.sleep(platform.settings.rollout_cache_seconds + 1)
    controller.apply()


def test_streamed_answer_under_a_shadow_rollout(platform: Platform, smol: DeploymentSpec, shadowed: str):
    base = smol.model.version
    patient = new_patient_id()
    body = {"model": SMOL, "stream": True, "max_tokens": 16, "temperature": 0, "seed": 3,
            "messages": [{"role": "user", "content": "Name one bone of the human arm."}]}
    with platform.client(platform.key()) as client:
        with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Patient-Id": patient}) as response:
            assert response.status_code == 200
            assert response.headers["x-medserve-model-version"] == base
            raw = "".join(response.iter_text())
    assert shadowed not in raw
    frames = [frame[len("data: "):] for frame in raw.split("\n\n") if frame.strip()]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert {chunk["system_fingerprint"] for chunk in chunks} == {f"{SMOL}@{base}"}
    said = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert said

    deadline = time.monotonic() + 120  # the shadow's record is written when its own stream ends
    while not any(r.shadow for r in platform.audit_rows_for_patient(patient)):
        assert time.monotonic() < deadline, "no shadow record"
        time.sleep(1.0)
    rows = platform.audit_rows_for_patient(patient)
    [answered] = [r for r in rows if not r.shadow]
    [mirrored] = [r for r in rows if r.shadow]
    assert answered.model_version == base and answered.rollout == "primary" and answered.outcome == "ok"
    assert mirrored.model_version == shadowed and mirrored.rollout == "shadow"
    assert mirrored.shadow_of == answered.id and mirrored.outcome == "ok"
    assert mirrored.operation == "chat.completions" and mirrored.input_sha256 == answered.input_sha256
    # The whole answer: same weights at temperature 0, same words, same digest and token count.
    assert mirrored.output_sha256 == answered.output_sha256
    assert mirrored.completion_tokens == answered.completion_tokens and mirrored.finish_reason == answered.finish_reason
