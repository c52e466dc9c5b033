"""Canary, shadow, promote and rollback on the real cluster with the real tumour model.

The second version is the same ONNX artifact registered under another
version string (no invented weights); the mismatch case pins a wrong sha256.
The VGG16 classifier takes seconds per image on two shared cores, so the
500-request split is measured with CT slices that the chosen version's
engine decodes and refuses (the model is validated for MR only): every one
is routed, answered by that version and audited with its version and arm.
Real classifications are used wherever an answer must be 2xx.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from medserve.controlplane.render import render_serve_config
from medserve.controlplane.rollouts import RolloutController
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.errors import ArtifactIntegrityError
from medserve.registry import lifecycle
from medserve.registry.routing import bucket, in_canary, version_app_name
from medserve.registry.service import register_version
from medserve.specs import DeploymentSpec, deployments_of

from .conftest import Platform, json_of, new_patient_id

pytestmark = pytest.mark.slow

TUMOUR = "brain-mri-tumour"
BASE = "0.1.1"
CANDIDATE = "0.1.1-b"
BAD = "0.1.1-badsha"


def _version(spec: DeploymentSpec, version: str, sha256: str | None = None) -> DeploymentSpec:
    model = spec.model.model_copy(update={"version": version})
    if sha256 is not None:
        model = model.model_copy(update={"artifact": model.artifact.model_copy(update={"sha256": sha256})})
    return spec.model_copy(update={"model": model})


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def tumour(platform: Platform) -> DeploymentSpec:
    return next(spec for spec in deployments_of(platform.catalog()) if spec.model.name == TUMOUR)


@pytest.fixture(scope="module")
def controller(platform: Platform, tumour: DeploymentSpec):
    with session_scope(platform.database_url) as session:
        register_version(session, _version(tumour, CANDIDATE), "integration tests")
        register_version(session, _version(tumour, BAD, "0" * 64), "integration tests")
    ctl = RolloutController(
        platform.database_url, platform.catalog(), platform.target, platform.render_options(),
        require_approved=False, cache_seconds=platform.settings.rollout_cache_seconds,
    )
    yield ctl
    # Leave the shared cluster as the catalog describes it: base version only.
    with session_scope(platform.database_url) as session:
        model = lifecycle.get_model(session, TUMOUR)
        rollout = lifecycle.get_rollout(session, model)
        if rollout is not None:
            session.delete(rollout)
        alias = lifecycle.get_alias(session, model, "production")
        base = lifecycle.get_version(session, TUMOUR, BASE)
        alias.model_version_id, alias.previous_version_id = base.id, None
    time.sleep(platform.settings.rollout_cache_seconds + 1)
    ctl.apply()


@pytest.fixture(scope="module")
def app_key(platform: Platform) -> str:
    return platform.key("clinical-app", rate_limit_rps=0)  # 500-request loads below


def _classify(client, patient: str):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/imaging/{TUMOUR}", content=PNG,
                       headers={"Content-Type": "image/png", "X-Patient-Id": patient})


def _rows(platform: Platform, *conditions) -> list[AuditRecord]:  # type: ignore[no-untyped-def]
    with session_scope(platform.database_url) as session:
        return list(session.scalars(select(AuditRecord).where(*conditions)))


def test_a_version_whose_artifact_mismatches_is_refused_and_the_old_one_keeps_serving(
    platform: Platform, controller: RolloutController, tumour: DeploymentSpec, app_key: str
):
    with pytest.raises(ArtifactIntegrityError):
        controller.canary(TUMOUR, BAD, 20, "integration tests")
    with session_scope(platform.database_url) as session:
        assert lifecycle.get_rollout(session, lifecycle.get_model(session, TUMOUR)) is None

    # Past the control plane's check (an artifact only the node can see): the
    # engine refuses to load it, Serve marks that application failed, and a
    # rollout pointed at it sends it nothing: the old version answers.
    bad_app = version_app_name(tumour.name, BAD)
    config = render_serve_config(
        platform.catalog(), platform.render_options(), {tumour.name: [tumour, _version(tumour, BAD, "0" * 64)]}
    )
    platform.target.apply(config)
    deadline = time.monotonic() + 240
    while platform.target.application_status().get(bad_app, {}).get("status") != "DEPLOY_FAILED":
        assert time.monotonic() < deadline, platform.target.application_status().get(bad_app)
        time.sleep(2)
    with session_scope(platform.database_url) as session:
        lifecycle.start_rollout(session, TUMOUR, "canary", BAD, "admin api", percent=99, require_approved=False)
    time.sleep(platform.settings.rollout_cache_seconds + 1)
    patient = new_patient_id()
    with platform.client(app_key) as client:
        responses = [_classify(client, f"{patient}-{i}") for i in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-medserve-model-version"] for r in responses} == {BASE}
    controller.rollback(TUMOUR, "integration tests")  # ends the rollout and removes the failed app
    assert bad_app not in platform.target.application_status()


def test_canary_at_20_percent_over_500_requests_and_sticky_per_patient(
    platform: Platform, controller: RolloutController, app_key: str, ct_small_path
):
    controller.canary(TUMOUR, CANDIDATE, 20, "integration tests")
    time.sleep(platform.settings.rollout_cache_seconds + 1)
    ct = ct_small_path.read_bytes()
    run = new_patient_id()

    with platform.client(app_key) as client, ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(
            lambda i: client.post(f"/v1/imaging/{TUMOUR}", content=ct, headers={
                "Content-Type": "application/dicom", "X-Patient-Id": f"{run}-{i}"}).status_code,
            range(500),
        ))
    assert set(codes) == {422}  # refused by the chosen version's own input constraints
    pseudonyms = {platform.patient_pseudonym(f"{run}-{i}") for i in range(500)}
    rows = [r for r in _rows(platform, AuditRecord.model_name == TUMOUR, AuditRecord.rollout.is_not(None))
            if r.patient_pseudonym in pseudonyms]
    assert len(rows) == 500
    arms = Counter((r.rollout, r.model_version) for r in rows)
    assert set(arms) <= {("canary", CANDIDATE), ("primary", BASE)}
    # Each request went where the routing rule sends its patient (the split is
    # the gateway's, not chance's) ...
    with session_scope(platform.database_url) as session:
        rollout_id = str(lifecycle.get_rollout(session, lifecycle.get_model(session, TUMOUR)).id)
    for row in rows:
        assert (row.rollout == "canary") == in_canary(20, bucket(rollout_id, row.patient_pseudonym))
    # ... and the rule gives about a fifth. Patients and the rollout's salt are
    # new each run, so the share is binomial (n=500, p=0.2, sd 0.018): the band
    # is five sd wide each side, so a correct split fails it about once in 10^6.
    share = arms[("canary", CANDIDATE)] / 500
    print(f"canary share over 500 requests: {share:.3f}")
    assert 0.11 <= share <= 0.29

    # Sticky: one patient's requests all land on one version, and what the
    # caller is told is what the audit says.
    with platform.client(app_key) as client:
        for patient in (f"{run}-sticky-{i}" for i in range(2)):
            versions = {_classify(client, patient).headers["x-medserve-model-version"] for _ in range(2)}
            assert len(versions) == 1
            audited = {r.model_version for r in platform.audit_rows_for_patient(patient)}
            assert audited == versions


def test_shadow_answers_are_audited_and_never_returned(
    platform: Platform, controller: RolloutController, app_key: str
):
    controller.rollback(TUMOUR, "integration tests", tidy=False)
    controller.shadow(TUMOUR, CANDIDATE, "integration tests")
    time.sleep(platform.settings.rollout_cache_seconds + 1)
    patient = new_patient_id()
    with platform.client(app_key) as client:
        responses = [_classify(client, patient) for _ in range(3)]
    for response in responses:
        body = json_of(response)
        assert response.status_code == 200 and body["model_version"] == BASE
        assert response.headers["x-medserve-model-version"] == BASE and CANDIDATE not in response.text
    answered = {r.headers["x-medserve-inference-id"] for r in responses}

    deadline = time.monotonic() + 120  # shadow calls finish after the answers
    while len([r for r in platform.audit_rows_for_patient(patient) if r.shadow]) < 3:
        assert time.monotonic() < deadline
        time.sleep(1)
    rows = platform.audit_rows_for_patient(patient)
    primary = [r for r in rows if not r.shadow]
    shadow = [r for r in rows if r.shadow]
    assert {str(r.id) for r in primary} == answered and {r.rollout for r in primary} == {"primary"}
    assert {r.model_version for r in shadow} == {CANDIDATE} and {r.rollout for r in shadow} == {"shadow"}
    assert {str(r.shadow_of) for r in shadow} == answered
    assert all(r.outcome == "ok" and r.output_label for r in shadow)

    admin = platform.key("admin")
    with platform.client(admin) as client:
        report = json_of(client.get(f"/admin/models/{TUMOUR}/comparison"))
        listing = json_of(client.get("/admin/models"))
        refused = client.get("/admin/models", headers={"Authorization": f"Bearer {app_key}"})
    assert report["shadow"]["pairs"] >= 3 and report["shadow"]["label_agreement"] == 1.0
    assert report["shadow"]["output_agreement"] == 1.0  # same weights, same answers
    tumour_row = next(m for m in listing["models"] if m["name"] == TUMOUR)
    assert tumour_row["rollout"]["mode"] == "shadow" and tumour_row["rollout"]["candidate"] == CANDIDATE
    assert refused.status_code == 403


def test_canary_promote_and_rollback_under_steady_load_fail_no_request(
    platform: Platform, controller: RolloutController, app_key: str
):
    controller.rollback(TUMOUR, "integration tests", tidy=False)
    controller.canary(TUMOUR, CANDIDATE, 50, "integration tests")
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def load() -> None:
        with platform.client(app_key) as client:
            i = 0
            while not stop.is_set():
                i += 1
                response = _classify(client, f"load-{threading.get_ident()}-{i}")
                results.append((response.status_code, response.headers.get("x-medserve-model-version")))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        controller.promote(TUMOUR, CANDIDATE, "integration tests")
        time.sleep(3)
        controller.rollback(TUMOUR, "integration tests")  # back to the base version, then tidy
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    codes = Counter(code for code, _ in results)
    print(f"requests under load: {len(results)}, status codes: {dict(codes)}")
    assert codes and set(codes) == {200}
    assert {version for _, version in results} == {BASE, CANDIDATE}
    assert results[-1][1] == BASE
