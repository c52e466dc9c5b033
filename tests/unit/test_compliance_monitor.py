"""The compliance monitor against a real database (SQLite and PostgreSQL): periodic verification that
notices an altered row, and the review backlog by department, age and model version."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text

from medserve import metrics
from medserve.audit.monitor import ComplianceMonitor
from medserve.audit.writer import AuditWriter
from medserve.controlplane.render import COMPLIANCE_APP, RenderOptions, render_serve_config
from medserve.db.engine import get_engine, session_scope
from medserve.db.models import utcnow
from medserve.reviews.service import ReviewRequest, record_review
from medserve.security.api_keys import Principal
from medserve.security.roles import Role
from medserve.settings import Settings

KEY = b"compliance-monitor-test-key"


class Recording:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, dict[str, str]]] = []

    def record(self, definition, value, labels):  # type: ignore[no-untyped-def]
        self.samples.append((definition.name, value, dict(labels)))

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, v, l in self.samples if n == name and all(l.get(k) == x for k, x in labels.items()))

    def last(self, name: str, **labels: str) -> float | None:
        values = [v for n, v, l in self.samples if n == name and all(l.get(k) == x for k, x in labels.items())]
        return values[-1] if values else None


@pytest.fixture
def recording():  # type: ignore[no-untyped-def]
    backend = Recording()
    metrics.use_backend(backend)
    yield backend
    metrics.use_backend(None)


def _imaging(department: str | None, age: timedelta, version: str = "0.1.1") -> dict:
    return {"id": uuid.uuid4(), "created_at": utcnow() - age, "operation": "imaging.analyze", "outcome": "ok",
            "http_status": 200, "latency_ms": 12.0, "model_name": "brain-mri-tumour", "model_version": version,
            "caller_name": "pacs", "api_key_id": "k1", "caller_role": "clinical-app", "department": department,
            "output_label": "no_tumour"}


def _write(url: str, records: list[dict]) -> None:
    writer = AuditWriter(url, signing_key=KEY, batch_max=50, checkpoint_every=10)

    async def write_all() -> None:
        for record in records:
            await writer.write(record, durable=True)

    asyncio.run(write_all())
    writer.close()


def _monitor(url: str, **intervals: float) -> ComplianceMonitor:
    return ComplianceMonitor(url, KEY, verify_interval_s=intervals.get("verify", 60.0),
                             review_interval_s=intervals.get("review", 60.0))


def _sql(url: str, statement: str, **params) -> None:  # type: ignore[no-untyped-def]
    with get_engine(url).begin() as connection:
        connection.execute(text(statement), params)


def _id_param(url: str, value: uuid.UUID):  # type: ignore[no-untyped-def]
    return value.hex if url.startswith("sqlite") else value


def test_an_altered_row_makes_the_periodic_verification_fail_and_count(audit_db_url, recording, caplog):
    records = [_imaging("radiology", timedelta(minutes=i)) for i in range(12)]
    _write(audit_db_url, records)
    monitor = _monitor(audit_db_url)
    metrics.init_audit_verify_metrics()
    assert recording.total("medserve_audit_verify_failures_total", reason="problems") == 0

    assert monitor.verify_once().ok
    assert recording.last("medserve_audit_verify_interval_seconds") == 60.0
    first_success = recording.last("medserve_audit_verify_last_success_timestamp_seconds")
    assert first_success is not None and abs(first_success - time.time()) < 60
    assert recording.last("medserve_audit_verify_problems") == 0

    # Someone with database access changes what a result was.
    target = records[5]["id"]
    _sql(audit_db_url, "UPDATE audit_records SET output_label = 'glioma' WHERE id = :id",
         id=_id_param(audit_db_url, target))
    result = monitor.verify_once()
    assert not result.ok and result.problems[0].kind == "changed" and result.problems[0].record_id == str(target)
    assert recording.total("medserve_audit_verify_failures_total", reason="problems") == 1
    assert recording.last("medserve_audit_verify_problems") == 1
    # The log names the record (kind, id, chain, seq), never what it holds.
    assert f"first: changed of record {target}" in caplog.text and "glioma" not in caplog.text
    # No success while the trail is broken: the last-success time stays where it was.
    assert recording.last("medserve_audit_verify_last_success_timestamp_seconds") == first_success
    # Between verifications, every backlog round sets the gauges again (Ray drops gauges nobody sets).
    before = len(recording.samples)
    monitor.sample_reviews_once()
    republished = {name for name, _, _ in recording.samples[before:]}
    assert {"medserve_audit_verify_last_success_timestamp_seconds", "medserve_audit_verify_problems",
            "medserve_audit_verify_interval_seconds"} <= republished
    assert recording.last("medserve_audit_verify_problems") == 1
    monitor.verify_once()
    assert recording.total("medserve_audit_verify_failures_total", reason="problems") == 2

    _sql(audit_db_url, "UPDATE audit_records SET output_label = 'no_tumour' WHERE id = :id",
         id=_id_param(audit_db_url, target))
    assert monitor.verify_once().ok
    assert recording.last("medserve_audit_verify_last_success_timestamp_seconds") >= first_success
    assert monitor.status()["problems"] == [] and monitor.status()["verifications"] == 4


def test_a_verification_that_cannot_run_counts_as_an_error(tmp_path, recording):
    monitor = _monitor(f"sqlite:///{tmp_path / 'missing' / 'nowhere.db'}")
    assert monitor.verify_once() is None
    assert recording.total("medserve_audit_verify_failures_total", reason="error") == 1
    assert recording.last("medserve_audit_verify_last_success_timestamp_seconds") is None


def test_backlog_by_department_age_and_version(audit_db_url, recording):
    fresh = _imaging("radiology", timedelta(minutes=5))
    day_old = _imaging("radiology", timedelta(hours=30))
    week_old = _imaging("icu", timedelta(days=9), version="0.2.0")
    reviewed = _imaging("icu", timedelta(hours=2))
    refused = {**_imaging("icu", timedelta(hours=3)), "outcome": "denied", "http_status": 403}
    chat = {**_imaging("icu", timedelta(hours=4)), "operation": "chat.completions"}
    _write(audit_db_url, [week_old, day_old, refused, chat, reviewed, fresh])
    clinician = Principal(key_id="c1", name="Dr A", role=Role.CLINICIAN, department="icu")
    with session_scope(audit_db_url) as session:
        record_review(session, reviewed["id"], ReviewRequest(decision="reject", comment="wrong side"), clinician)

    monitor = _monitor(audit_db_url)
    backlog = monitor.sample_reviews_once()
    assert backlog.pending == {
        "radiology": {"under_1h": 1, "1h_to_24h": 0, "24h_to_7d": 1, "over_7d": 0},
        "icu": {"under_1h": 0, "1h_to_24h": 0, "24h_to_7d": 0, "over_7d": 1},
    }
    assert 30 * 3600 - 60 < backlog.oldest_s["radiology"] < 30 * 3600 + 120
    assert backlog.oldest_s["icu"] > 9 * 86400 - 60
    assert recording.last("medserve_review_pending_results", department="radiology", age="24h_to_7d") == 1
    assert recording.last("medserve_review_pending_results", department="icu", age="over_7d") == 1
    # Every reviewable version, every decision, zeros included: an override rate is 0/n, never absent.
    assert backlog.decisions == {
        ("brain-mri-tumour", "0.1.1", "accept"): 0, ("brain-mri-tumour", "0.1.1", "edit"): 0,
        ("brain-mri-tumour", "0.1.1", "reject"): 1, ("brain-mri-tumour", "0.2.0", "accept"): 0,
        ("brain-mri-tumour", "0.2.0", "edit"): 0, ("brain-mri-tumour", "0.2.0", "reject"): 0,
    }
    assert recording.last("medserve_review_decisions", model="brain-mri-tumour", version="0.1.1",
                          decision="reject") == 1

    # ICU signs off its last result: its series read 0 rather than keeping their last value.
    with session_scope(audit_db_url) as session:
        record_review(session, week_old["id"], ReviewRequest(decision="accept"), clinician)
    monitor.sample_reviews_once()
    assert recording.last("medserve_review_pending_results", department="icu", age="over_7d") == 0
    assert recording.last("medserve_review_pending_oldest_age_seconds", department="icu") == 0
    assert recording.last("medserve_review_decisions", model="brain-mri-tumour", version="0.2.0",
                          decision="accept") == 1


def test_the_schedule_runs_in_threads_of_its_own_until_stopped(audit_db_url, recording):
    _write(audit_db_url, [_imaging("radiology", timedelta(minutes=1))])
    monitor = _monitor(audit_db_url, verify=0.05, review=0.05).start()
    try:
        deadline = time.monotonic() + 20
        while monitor.verifications < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert monitor.verifications >= 3 and monitor.alive
        assert recording.last("medserve_review_pending_results", department="radiology", age="under_1h") == 1
    finally:
        monitor.stop()
    deadline = time.monotonic() + 5
    while monitor.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not monitor.alive


def test_one_monitor_per_cluster_whatever_the_gateway_replicas():
    settings = Settings(audit_verify_interval_s=120, review_metrics_interval_s=15)
    options = RenderOptions.from_settings(settings, gateway_replicas=3)
    config = render_serve_config([], options)
    [app] = [app for app in config["applications"] if app["name"] == COMPLIANCE_APP]
    assert app["route_prefix"] is None and app["import_path"] == "medserve.audit.monitor:build_app"
    assert [d["num_replicas"] for d in app["deployments"]] == [1]
    assert app["args"]["settings"] == {"audit_verify_interval_s": 120.0, "review_metrics_interval_s": 15.0}
    off = render_serve_config([], options.model_copy(update={"compliance_monitor": False}))
    assert COMPLIANCE_APP not in {app["name"] for app in off["applications"]}
