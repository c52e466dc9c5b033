"""The compliance monitor on the real cluster: a row altered in the database makes the periodic
verification's failure counter rise in what Ray exports, and the review backlog reaches the export too.

This module runs after the others (conftest.RUN_LAST): the failures it causes stay in the exported
counter and keep MedserveAuditVerificationFailed firing for an hour, and test_metrics_prometheus.py
checks that a healthy platform fires no alert. The row is put back before the module ends, so the trail
verifies again for every later reader.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from medserve.controlplane.prometheus import metrics_targets
from medserve.controlplane.reconcile import apply_catalog
from medserve.db.engine import get_engine

from .conftest import Platform, new_patient_id

pytestmark = pytest.mark.slow

TUMOUR = "brain-mri-tumour"
VERIFY_INTERVAL_S = 3.0
DEADLINE_S = 120.0


def _apply(platform: Platform, **compliance: float) -> None:
    options = platform.render_options()
    options = options.model_copy(update={"compliance_settings": {**options.compliance_settings, **compliance}})
    apply_catalog(platform.database_url, platform.catalog(), platform.target, options,
                  registered_by="integration tests", require_approved=platform.settings.require_approved_versions)


@pytest.fixture(scope="module")
def fast_monitor(platform: Platform) -> Iterator[None]:
    """The catalog, with the monitor verifying every few seconds (only its application changes)."""
    _apply(platform, audit_verify_interval_s=VERIFY_INTERVAL_S, review_metrics_interval_s=2.0)
    yield
    _apply(platform)


def _scrape(platform: Platform) -> str:
    token = platform.env.get("RAY_AUTH_TOKEN") or None
    return "\n".join(httpx.get(f"http://{target}/metrics", timeout=10.0).text
                     for target in metrics_targets(platform.target.dashboard_url, token))


def _samples(exported: str, name: str, **labels: str) -> list[float]:
    """Every sample of a metric whose labels include ``labels``."""
    values = []
    for line in exported.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line) or re.match(rf"^{name} (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match.lastindex == 2 else {}
        if all(found.get(key) == value for key, value in labels.items()):
            values.append(float(match.group(match.lastindex)))
    return values


def _sample(exported: str, name: str, **labels: str) -> float | None:
    """The largest of a metric's samples whose labels include ``labels``; None when there is none.

    The largest, not the sum: for a while after a redeploy the replaced monitor's last samples are
    still exported beside the new one's (each worker's series carry its own Ray labels)."""
    values = _samples(exported, name, **labels)
    return max(values) if values else None


def _wait_for(platform: Platform, check, what: str) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        exported = _scrape(platform)
        if check(exported):
            return exported
        assert time.monotonic() < deadline, (
            f"{what}: not seen in Ray's metrics export within {DEADLINE_S:.0f}s"
        )
        time.sleep(2.0)


def _set_label(platform: Platform, record_id: uuid.UUID, label: str | None) -> None:
    url = platform.database_url
    with get_engine(url).begin() as connection:
        connection.execute(text("UPDATE audit_records SET output_label = :label WHERE id = :id"),
                           {"label": label, "id": record_id.hex if url.startswith("sqlite") else record_id})


def test_an_altered_row_raises_the_periodic_verification_failure_metric(
    platform: Platform, fast_monitor: None, mr_small_path: Path
):
    key = platform.key("clinical-app", department="radiology")
    patient = new_patient_id()
    with platform.client(key) as client:
        response = client.post(f"/v1/imaging/{TUMOUR}", content=mr_small_path.read_bytes(),
                               headers={"Content-Type": "application/dicom", "X-Patient-Id": patient})
    assert response.status_code == 200, response.text[:300]
    record_id = uuid.UUID(response.headers["x-medserve-inference-id"])
    [row] = [r for r in platform.audit_rows_for_patient(patient) if r.id == record_id]

    # The monitor has verified the trail intact, and its failure counters exist at zero or more.
    def verified_after_the_answer(exported: str) -> bool:
        last = _sample(exported, "ray_medserve_audit_verify_last_success_timestamp_seconds")
        return last is not None and last >= row.created_at.timestamp()

    exported = _wait_for(platform, verified_after_the_answer, "a successful verification after the answer")
    before = _sample(exported, "ray_medserve_audit_verify_failures_total", reason="problems") or 0.0
    assert VERIFY_INTERVAL_S in _samples(exported, "ray_medserve_audit_verify_interval_seconds")
    # The backlog export sees this department's unsigned result.
    _wait_for(platform, lambda e: (_sample(e, "ray_medserve_review_pending_results", department="radiology") or 0) >= 1,
              "radiology's pending result")

    original = row.output_label
    _set_label(platform, record_id, "glioma" if original != "glioma" else "meningioma")
    try:
        exported = _wait_for(
            platform,
            lambda e: (_sample(e, "ray_medserve_audit_verify_failures_total", reason="problems") or 0.0) > before,
            "the verification failure counter rising after the row was altered",
        )
        assert (_sample(exported, "ray_medserve_audit_verify_problems") or 0) >= 1
    finally:
        _set_label(platform, record_id, original)
    # Put back, the trail verifies again: the last-success time moves on.
    altered_at = time.time()
    _wait_for(platform,
              lambda e: (_sample(e, "ray_medserve_audit_verify_last_success_timestamp_seconds") or 0) > altered_at,
              "a successful verification after the row was put back")
