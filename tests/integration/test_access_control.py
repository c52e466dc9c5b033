"""Access control on a real Ray cluster: departments, rate limits, no patient data in logs.

The module applies a copy of the catalog once (the tumour model open to
radiology only, SmolLM2 capped at a few output tokens, a
per-key rate limit on the gateway) and restores the catalog afterwards.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medserve.controlplane.reconcile import apply_catalog

from .conftest import Platform, new_patient_id

TUMOUR = "brain-mri-tumour"
SMOL = "smollm2-135m-instruct"
RATE_LIMIT_RPS = 10.0


@pytest.fixture(scope="module")
def restricted(platform: Platform):
    specs = []
    for spec in platform.catalog():
        if spec.kind == "pipeline":
            pass
        elif spec.model.name == TUMOUR:
            spec = spec.model_copy(update={"access": spec.access.model_copy(update={"departments": ["radiology"]})})
        elif spec.model.name == SMOL:
            spec = spec.model_copy(update={"inputs": spec.inputs.model_copy(update={"max_output_tokens": 4})})
        specs.append(spec)
    options = platform.render_options(rate_limit_key_rps=RATE_LIMIT_RPS)
    apply_catalog(platform.database_url, specs, platform.target, options, registered_by="access control tests",
                  require_approved=platform.settings.require_approved_versions)
    icu_key = platform.key("clinical-app", department="icu")
    # Serve may report RUNNING for a moment before the new gateway takes over.
    deadline = time.monotonic() + 120
    with platform.client(icu_key) as client:
        while client.get("/v1/models").json().get("data") and TUMOUR in {
            m["id"] for m in client.get("/v1/models").json()["data"]
        }:
            if time.monotonic() > deadline:
                pytest.fail("the restricted catalog did not take effect")
            time.sleep(1)
    yield platform
    platform.apply()


def test_a_department_bound_key_gets_403_on_another_departments_model(restricted: Platform, mr_small_path):
    patient = new_patient_id()
    body = mr_small_path.read_bytes()
    headers = {"Content-Type": "application/dicom", "X-Patient-Id": patient}
    with restricted.client(restricted.key("clinical-app", department="icu")) as client:
        refused = client.post(f"/v1/imaging/{TUMOUR}", content=body, headers=headers)
    with restricted.client(restricted.key("clinical-app", department="radiology")) as client:
        answered = client.post(f"/v1/imaging/{TUMOUR}", content=body, headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    assert answered.status_code == 200, answered.text[:200]
    rows = restricted.audit_rows_for_patient(patient)
    assert [(r.department, r.http_status) for r in rows] == [("icu", 403), ("radiology", 200)]


def test_a_burst_over_the_rate_limit_gets_429_with_retry_after_and_is_audited(restricted: Platform):
    key = restricted.key("clinical-app")
    patient = new_patient_id()
    with restricted.client(key) as client:
        def one(_: int):
            return client.post("/v2/models/brain-mri-tumour/infer", content=b"{}",
                               headers={"Content-Type": "application/json", "X-Patient-Id": patient})

        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(one, range(int(RATE_LIMIT_RPS) * 3)))
    limited = [r for r in responses if r.status_code == 429]
    assert limited, sorted({r.status_code for r in responses})
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limited" for r in limited)
    codes = [row.error_code for row in restricted.audit_rows_for_patient(patient)]
    assert len(codes) == len(responses) and codes.count("rate_limited") == len(limited)


def test_no_patient_identifier_reaches_the_logs(restricted: Platform, mr_small_path):
    patient, encounter, clinician = new_patient_id(), f"ENC-{new_patient_id()}", f"DR-{new_patient_id()}"
    headers = {"X-Patient-Id": patient, "X-Encounter-Id": encounter, "X-Clinician-Id": clinician}
    with restricted.client(restricted.key("clinical-app", department="radiology")) as client:
        client.post("/v1/chat/completions", headers=headers, json={
            "model": SMOL, "max_tokens": 2, "messages": [{"role": "user", "content": f"Summarise {patient}"}]})
        client.post("/v1/chat/completions", headers=headers, content=f'{{"model": "{patient}"'.encode())
        client.post(f"/v1/imaging/{TUMOUR}", headers={**headers, "Content-Type": "application/dicom"},
                    content=b"DICM" + patient.encode())
        client.post(f"/v1/imaging/{TUMOUR}", headers={**headers, "Content-Type": "application/dicom"},
                    content=mr_small_path.read_bytes())
    with restricted.client("msk_bad_" + patient) as client:
        client.get("/v1/models", headers=headers)
    assert len(restricted.audit_rows_for_patient(patient)) == 4
    time.sleep(2)  # log lines are flushed by the replicas' handlers, not by the response
    logs = Path(restricted.ray_temp_dir or "") / "session_latest" / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files, f"no Ray logs found under {logs}"
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path.name}: {value}" for value in (patient, encounter, clinician) if value.encode() in data]
    assert leaks == []
