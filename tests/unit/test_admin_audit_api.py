"""GET /admin/audit: auditors and admins only, filters, server-side patient pseudonyms, department scoping."""

import asyncio
import uuid

import httpx
import pytest

from medserve.db.engine import session_scope
from medserve.db.models import utcnow
from medserve.gateway.app import create_app
from medserve.gateway.state import GatewayState, set_gateway
from medserve.security.api_keys import create_api_key
from medserve.security.pseudonyms import pseudonymize

PSEUDONYM_KEY = "pseudonym-key-for-tests"


@pytest.fixture
def gateway(audit_db_url, tmp_path):  # type: ignore[no-untyped-def]
    state = GatewayState([], {"database_url": audit_db_url, "home": tmp_path, "pseudonym_key": PSEUDONYM_KEY,
                              "audit_signing_key": "k"})
    set_gateway(state)
    rows = [
        ("icu", "MRN-1", "smollm2", "1.0", "ok"),
        ("icu", "MRN-2", "smollm2", "1.0", "error"),
        ("radiology", "MRN-1", "brain-mri", "2.0", "ok"),
        ("radiology", None, "brain-mri", "2.0", "denied"),
    ]

    async def write() -> None:
        for department, patient, model, version, outcome in rows:
            await state.writer.write({
                "id": uuid.uuid4(), "created_at": utcnow(), "operation": "x", "outcome": outcome,
                "http_status": 200, "latency_ms": 1.0, "department": department, "model_name": model,
                "model_version": version,
                "patient_pseudonym": pseudonymize(PSEUDONYM_KEY.encode(), "patient", patient) if patient else None,
            }, durable=True)

    asyncio.run(write())
    yield state
    set_gateway(None)
    state.close()


def _key(url: str, role: str, department: str | None = None) -> str:
    with session_scope(url) as session:
        return create_api_key(session, name=f"t {role}", role=role, department=department)[1]


def _get(state: GatewayState, key: str, **params) -> httpx.Response:  # type: ignore[no-untyped-def]
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.get("/admin/audit", params=params, headers={"Authorization": f"Bearer {key}"})

    return asyncio.run(call())


def test_auditor_and_admin_read_with_filters(gateway):
    for role in ("auditor", "admin"):
        key = _key(gateway.database_url, role)
        everything = _get(gateway, key).json()
        assert len(everything["data"]) == 4 and everything["next_offset"] is None
        patient = _get(gateway, key, patient="MRN-1").json()["data"]
        assert {row["model_name"] for row in patient} == {"smollm2", "brain-mri"}
        assert "MRN-1" not in str(patient)
        filtered = _get(gateway, key, model="brain-mri", version="2.0", outcome="denied").json()["data"]
        assert len(filtered) == 1
        assert _get(gateway, key, until="2000-01-01T00:00:00Z").json()["data"] == []
        page = _get(gateway, key, limit=3).json()
        assert len(page["data"]) == 3 and page["next_offset"] == 3
        assert len(_get(gateway, key, limit=3, offset=3).json()["data"]) == 1


def test_department_bound_auditor_sees_only_its_department(gateway):
    key = _key(gateway.database_url, "auditor", department="icu")
    rows = _get(gateway, key).json()["data"]
    assert len(rows) == 2 and {row["department"] for row in rows} == {"icu"}


@pytest.mark.parametrize("role", ["clinical-app", "clinician", "ops"])
def test_other_roles_are_refused(gateway, role):
    response = _get(gateway, _key(gateway.database_url, role))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


def test_bad_queries_are_refused_without_echoing_them(gateway):
    key = _key(gateway.database_url, "auditor")
    assert _get(gateway, "msk_nope_nope").status_code == 401
    response = _get(gateway, key, since="2026-01-01T00:00:00")  # no zone
    assert response.status_code == 400
    response = _get(gateway, key, limit=0)
    assert response.status_code in (400, 422)
