"""Version gates, aliases, canary split and stickiness, promote and rollback (no Ray)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from medserve.audit.queries import compare_versions
from medserve.controlplane.render import COMPLIANCE_APP, GATEWAY_APP, RenderOptions, render_serve_config
from medserve.controlplane.rollouts import RolloutController
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, utcnow
from medserve.errors import ArtifactIntegrityError, RolloutError, StatusTransitionError, VersionNotApprovedError
from medserve.registry import lifecycle
from medserve.registry.routing import CANARY, SHADOW, RouteState, VersionRef, bucket, choose, in_canary
from medserve.registry.service import register_version
from medserve.specs import load_catalog, load_spec

TUMOUR = "brain-mri-tumour"


@pytest.fixture
def tumour(repo_root):
    return load_spec(repo_root / "deployments" / "brain-mri-tumour.yaml")


def _version(spec, version: str, sha256: str | None = None):
    model = spec.model.model_copy(update={"version": version})
    if sha256 is not None:
        model = model.model_copy(update={"artifact": model.artifact.model_copy(update={"sha256": sha256})})
    return spec.model_copy(update={"model": model})


def _ref(version: str, status: str = "approved") -> VersionRef:
    return VersionRef(version=version, artifact_sha256=None, status=status, app_name=f"model-x-v{version}")


# --- split and stickiness ----------------------------------------------------------


def test_canary_split_by_patient_lands_near_the_percentage():
    state = RouteState(primary=_ref("1"), mode=CANARY, candidate=_ref("2"), percent=20, rollout_id="r1")
    arms = [choose(state, f"patient-{i}", require_approved=True).arm for i in range(20_000)]
    share = arms.count(CANARY) / len(arms)
    assert 0.19 < share < 0.21


def test_a_patient_stays_on_one_side_for_the_whole_rollout():
    state = RouteState(primary=_ref("1"), mode=CANARY, candidate=_ref("2"), percent=30, rollout_id="r1")
    for i in range(200):
        first = choose(state, f"p{i}", require_approved=True).version.version
        assert all(choose(state, f"p{i}", require_approved=True).version.version == first for _ in range(5))


def test_raising_the_percentage_only_moves_patients_onto_the_canary():
    keys = [f"p{i}" for i in range(5_000)]
    at_10 = {k for k in keys if in_canary(10, bucket("r1", k))}
    at_40 = {k for k in keys if in_canary(40, bucket("r1", k))}
    assert at_10 < at_40


def test_a_new_rollout_reshuffles_patients():
    keys = [f"p{i}" for i in range(2_000)]
    first = {k for k in keys if in_canary(50, bucket("r1", k))}
    second = {k for k in keys if in_canary(50, bucket("r2", k))}
    assert first != second


def test_requests_without_a_patient_split_at_random():
    state = RouteState(primary=_ref("1"), mode=CANARY, candidate=_ref("2"), percent=20, rollout_id="r1")
    arms = [choose(state, None, require_approved=True).arm for _ in range(20_000)]
    assert 0.18 < arms.count(CANARY) / len(arms) < 0.22


def test_an_unapproved_canary_takes_no_clinical_traffic_unless_relaxed():
    state = RouteState(primary=_ref("1"), mode=CANARY, candidate=_ref("2", "validated"), percent=99, rollout_id="r")
    assert {choose(state, f"p{i}", require_approved=True).version.version for i in range(200)} == {"1"}
    assert "2" in {choose(state, f"p{i}", require_approved=False).version.version for i in range(200)}


def test_shadow_answers_with_the_primary_and_mirrors_to_the_candidate():
    state = RouteState(primary=_ref("1"), mode=SHADOW, candidate=_ref("2", "validated"), rollout_id="r")
    choice = choose(state, "p", require_approved=True)
    assert choice.version.version == "1" and choice.shadow.version == "2"
    unvalidated = RouteState(primary=_ref("1"), mode=SHADOW, candidate=_ref("2", "registered"), rollout_id="r")
    assert choose(unvalidated, "p", require_approved=True).shadow is None


# --- status transitions ------------------------------------------------------------------


def test_status_moves_one_way_and_approval_records_who_and_when(database_url, tumour):
    with session_scope(database_url) as session:
        register_version(session, tumour, "tester")
        with pytest.raises(StatusTransitionError):
            lifecycle.set_status(session, TUMOUR, "0.1.1", "approved", "dr a")  # must be validated first
        lifecycle.set_status(session, TUMOUR, "0.1.1", "validated", "qa")
        row = lifecycle.set_status(session, TUMOUR, "0.1.1", "approved", "dr a")
        assert row.approved_by == "dr a" and row.approved_at is not None
        assert row.approved_at.tzinfo is not None
        row = lifecycle.set_status(session, TUMOUR, "0.1.1", "retired", "dr a")
        with pytest.raises(StatusTransitionError):
            lifecycle.set_status(session, TUMOUR, "0.1.1", "approved", "dr a")


def _registered(session, tumour, *versions: tuple[str, str]) -> None:
    """Register the spec's version as production (approved) plus extra (version, status) pairs."""
    base = register_version(session, tumour, "tester")
    for status in ("validated", "approved"):
        lifecycle.set_status(session, TUMOUR, "0.1.1", status, "dr a")
    lifecycle.ensure_alias(session, base.model, "production", base, "tester")
    for version, status in versions:
        register_version(session, _version(tumour, version), "tester")
        path = {"registered": [], "validated": ["validated"], "approved": ["validated", "approved"]}[status]
        for step in path:
            lifecycle.set_status(session, TUMOUR, version, step, "dr a")


def test_only_approved_versions_take_a_canary(database_url, tumour):
    with session_scope(database_url) as session:
        _registered(session, tumour, ("0.2.0", "validated"))
        with pytest.raises(VersionNotApprovedError):
            lifecycle.start_rollout(session, TUMOUR, CANARY, "0.2.0", "ops", percent=20)
        # A validated version may run as a shadow: its answers are never returned.
        lifecycle.start_rollout(session, TUMOUR, SHADOW, "0.2.0", "ops")
        with pytest.raises(RolloutError):
            lifecycle.start_rollout(session, TUMOUR, CANARY, "0.2.0", "ops", percent=20, require_approved=False)


def test_a_serving_version_cannot_be_retired(database_url, tumour):
    with session_scope(database_url) as session:
        _registered(session, tumour)
        with pytest.raises(StatusTransitionError):
            lifecycle.set_status(session, TUMOUR, "0.1.1", "retired", "dr a")


def test_promote_then_rollback_then_rollback_again(database_url, tumour):
    with session_scope(database_url) as session:
        _registered(session, tumour, ("0.2.0", "approved"))
        first = lifecycle.start_rollout(session, TUMOUR, CANARY, "0.2.0", "ops", percent=10)
        again = lifecycle.start_rollout(session, TUMOUR, CANARY, "0.2.0", "ops", percent=50)
        assert again.id == first.id and again.percent == 50  # re-weighting keeps the sticky salt
        assert [v.version for v in lifecycle.active_versions(session, TUMOUR, "production")] == ["0.1.1", "0.2.0"]

        result = lifecycle.rollback(session, TUMOUR, "ops")
        assert (result.action, result.version) == ("rollout_ended", "0.1.1")
        assert [v.version for v in lifecycle.active_versions(session, TUMOUR, "production")] == ["0.1.1"]

        lifecycle.promote(session, TUMOUR, "0.2.0", "ops")
        # The old version stays deployed so that rolling back is instant.
        assert [v.version for v in lifecycle.active_versions(session, TUMOUR, "production")] == ["0.2.0", "0.1.1"]
        result = lifecycle.rollback(session, TUMOUR, "ops")
        assert (result.action, result.version) == ("alias_reverted", "0.1.1")
        actions = [(e.action, e.version) for e in lifecycle.history(session, TUMOUR)]
        assert actions[-3:] == [("rollback", "0.2.0"), ("promote", "0.2.0"), ("rollback", "0.1.1")]
        assert ("canary", "0.2.0") in actions and ("approved", "0.2.0") in actions
        states = lifecycle.route_states(session, {TUMOUR: ("brain-mri-tumour", "production")})
        assert states[TUMOUR].primary.version == "0.1.1"
        assert states[TUMOUR].primary.app_name == "model-brain-mri-tumour-v0-1-1"


def test_rollback_with_nothing_to_undo_is_refused(database_url, tumour):
    with session_scope(database_url) as session:
        _registered(session, tumour)
        with pytest.raises(RolloutError):
            lifecycle.rollback(session, TUMOUR, "ops")


# --- rendering and the control plane --------------------------------------------------------


def test_each_version_has_its_own_app_and_the_gateway_args_never_change(tumour):
    alone = render_serve_config([tumour], RenderOptions())
    both = render_serve_config([tumour], RenderOptions(), {tumour.name: [tumour, _version(tumour, "0.2.0")]})
    names = [app["name"] for app in both["applications"]]
    assert names == [GATEWAY_APP, "model-brain-mri-tumour-v0-1-1", "model-brain-mri-tumour-v0-2-0", COMPLIANCE_APP]
    # Same gateway app in both: Serve does not redeploy the gateway when a canary starts.
    assert alone["applications"][0] == both["applications"][0]
    assert alone["applications"][1] == both["applications"][1]


class FakeTarget:
    description = "fake"

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    def node_resources(self) -> list[dict[str, float]]:
        return [{"CPU": 8.0}]

    def apply(self, config: dict[str, Any]) -> None:
        self.applied.append(config)

    def application_status(self) -> dict[str, dict[str, Any]]:
        return {}

    def delete_all(self) -> None:
        pass

    def wait_until_running(self, names: list[str], timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
        return {}


def _controller(database_url, tumour, target) -> RolloutController:
    return RolloutController(database_url, [tumour], target, RenderOptions(), require_approved=False, cache_seconds=0)


def test_a_candidate_whose_artifact_mismatches_is_refused_before_anything_changes(database_url, tumour):
    target = FakeTarget()
    controller = _controller(database_url, tumour, target)
    controller.apply()
    with session_scope(database_url) as session:
        register_version(session, _version(tumour, "0.1.1-badsha", "0" * 64), "tester")
    with pytest.raises(ArtifactIntegrityError):
        controller.canary(TUMOUR, "0.1.1-badsha", 20, "ops")
    assert len(target.applied) == 1  # nothing re-applied
    with session_scope(database_url) as session:
        model = lifecycle.get_model(session, TUMOUR)
        assert lifecycle.get_rollout(session, model) is None


def test_a_canary_deploys_its_candidate_before_the_registry_points_at_it(database_url, tumour):
    target = FakeTarget()
    controller = _controller(database_url, tumour, target)
    controller.apply()
    with session_scope(database_url) as session:
        register_version(session, _version(tumour, "0.1.1-b"), "tester")
    controller.canary(TUMOUR, "0.1.1-b", 20, "ops")
    apps = [app["name"] for app in target.applied[-1]["applications"]]
    assert "model-brain-mri-tumour-v0-1-1-b" in apps
    assert target.applied[0]["applications"][0] == target.applied[-1]["applications"][0]
    controller.rollback(TUMOUR, "ops")
    assert "model-brain-mri-tumour-v0-1-1-b" not in [app["name"] for app in target.applied[-1]["applications"]]


def test_a_model_listed_after_a_pipeline_in_the_catalog_can_roll_out(database_url, tumour, repo_root):
    pipelines = [spec for spec in load_catalog(repo_root / "deployments") if spec.kind == "pipeline"]
    assert pipelines
    target = FakeTarget()
    controller = RolloutController(database_url, [*pipelines, tumour], target, RenderOptions(),
                                   require_approved=False, cache_seconds=0)
    controller.apply()
    with session_scope(database_url) as session:
        register_version(session, _version(tumour, "0.1.1-b"), "tester")
    controller.shadow(TUMOUR, "0.1.1-b", "ops")
    assert "model-brain-mri-tumour-v0-1-1-b" in [app["name"] for app in target.applied[-1]["applications"]]


def test_unapproved_production_is_skipped_with_a_reason(database_url, tumour):
    target = FakeTarget()
    controller = RolloutController(database_url, [tumour], target, RenderOptions(), require_approved=True)
    result = controller.apply()
    assert not result.plan[0].deploy and "not approved" in result.plan[0].reason


# --- comparison ------------------------------------------------------------------------------


def _record(version: str, arm: str, label: str, *, shadow_of=None, outcome="ok", latency=10.0) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(), "created_at": utcnow(), "model_name": TUMOUR, "model_version": version,
        "operation": "imaging.analyze", "outcome": outcome, "http_status": 200 if outcome == "ok" else 500,
        "latency_ms": latency, "rollout": arm, "shadow": shadow_of is not None, "shadow_of": shadow_of,
        "output_label": label, "output_sha256": label * 4,
    }


def test_comparison_pairs_shadow_records_with_the_answers_they_mirrored(database_url):
    records = []
    for i in range(10):
        primary = _record("1", "primary", "glioma")
        records.append(primary)
        records.append(_record("2", "shadow", "glioma" if i < 8 else "notumor", shadow_of=primary["id"], latency=20))
    records.append(_record("2", "shadow", "glioma", outcome="error"))
    from sqlalchemy import insert

    from medserve.db.engine import get_engine

    with get_engine(database_url).begin() as connection:
        connection.execute(insert(AuditRecord.__table__), records)
    report = compare_versions(database_url, TUMOUR)
    by_arm = {row["arm"]: row for row in report["versions"]}
    assert by_arm["primary"]["requests"] == 10 and by_arm["primary"]["error_rate"] == 0
    assert by_arm["shadow"]["requests"] == 11 and by_arm["shadow"]["errors"] == 1
    assert by_arm["shadow"]["latency_ms_p50"] == 20
    assert report["shadow"]["pairs"] == 10
    assert report["shadow"]["label_agreement"] == 0.8
