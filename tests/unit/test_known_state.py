"""The gateway answers from last-known-good state when the database goes away (issue: database outage).

The outage is real, not mocked: the authenticator and route table are pointed
at a PostgreSQL address where nothing listens, so every reload fails the way
it does when the server is stopped (connection refused).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from medserve.db.engine import session_scope
from medserve.errors import AuthenticationError, DatabaseUnavailableError
from medserve.gateway.auth import Authenticator
from medserve.gateway.errors import response_for
from medserve.gateway.known_state import KnownState, StateRefresher
from medserve.security.api_keys import create_api_key, revoke_api_key
from tests.unit.test_metrics import recording  # noqa: F401 - the recording metrics backend fixture

UNREACHABLE = "postgresql+psycopg://medserve@127.0.0.1:1/medserve"


def _key(database_url: str, **kwargs) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with session_scope(database_url) as session:
        row, plaintext = create_api_key(session, name="ward app", role=kwargs.pop("role", "clinical-app"), **kwargs)
        return row.key_id, plaintext


def _bearer(plaintext: str) -> str:
    return f"Bearer {plaintext}"


def test_a_failed_reload_keeps_the_last_copy_counts_and_logs_once(recording, caplog):
    answers: list[object] = [{"v": 1}, RuntimeError("gone"), RuntimeError("gone"), {"v": 2}]

    def load() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    state = KnownState("routes", load, refresh_s=1.0)
    caplog.set_level(logging.WARNING, logger="medserve.gateway.state")
    assert state.age_s is None and state.refresh() and state.value == {"v": 1}
    assert not state.refresh() and not state.refresh()
    assert state.value == {"v": 1} and state.failures == 2
    assert [labels for _, labels in recording.named("medserve_gateway_state_refresh_failures_total")] == [
        {"state": "routes"}, {"state": "routes"}]
    assert caplog.text.count("could not refresh routes") == 1  # once per outage, not per attempt
    assert state.refresh() and state.value == {"v": 2}
    assert "routes refreshed from the database again" in caplog.text


def test_never_loaded_answers_database_unavailable():
    def load() -> object:
        raise OperationalError("SELECT 1", {}, Exception("refused"))

    state = KnownState("keys", load, refresh_s=5.0)
    with pytest.raises(DatabaseUnavailableError) as raised:
        asyncio.run(state.get())
    assert raised.value.http_status == 503 and raised.value.details == {"state": "keys"}
    assert state.staleness_s >= 0 and state.age_s is None


def test_refresher_thread_reloads_what_is_due():
    loads: list[int] = []
    state = KnownState("keys", lambda: loads.append(1) or len(loads), refresh_s=0.05)
    refresher = StateRefresher([state]).start()
    try:
        reloaded = asyncio.run(_wait_for(lambda: len(loads) >= 3))
    finally:
        refresher.stop()
    assert reloaded and state.value is not None and state.value >= 3


async def _wait_for(condition, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def test_keys_keep_working_while_the_database_is_down(database_url):
    _, before = _key(database_url, department="icu")
    auth = Authenticator(database_url, refresh_seconds=5.0)
    assert auth.keys.refresh()
    auth._database_url = UNREACHABLE  # the database goes away
    assert not auth.keys.refresh()
    principal = asyncio.run(auth.authenticate(_bearer(before)))
    assert principal.department == "icu"
    # Wrong secret for a known key id: refused from the copy, no database needed.
    key_id = before.split("_")[1]
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(_bearer(f"msk_{key_id}_{'x' * 43}")))
    # A key the copy has never seen cannot be checked: 503 with Retry-After, not 401 and not 500.
    with pytest.raises(DatabaseUnavailableError):
        asyncio.run(auth.authenticate(_bearer(f"msk_{uuid.uuid4().hex[:12]}_{'y' * 43}")))


def test_a_key_created_after_the_copy_is_looked_up_and_a_revoked_one_stops_at_the_next_reload(database_url):
    key_id, plaintext = _key(database_url)
    auth = Authenticator(database_url, refresh_seconds=5.0)
    _, newer = _key(database_url, role="auditor")
    assert asyncio.run(auth.authenticate(_bearer(newer))).role.value == "auditor"  # not in the copy: looked up
    assert asyncio.run(auth.authenticate(_bearer(plaintext))).key_id == key_id
    with session_scope(database_url) as session:
        revoke_api_key(session, key_id)
    # Honoured from the copy until the next reload (the documented bound) ...
    assert asyncio.run(auth.authenticate(_bearer(plaintext))).key_id == key_id
    assert auth.keys.refresh()
    # ... then refused: a revoked key is absent from the copy and the database says revoked.
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(_bearer(plaintext)))


def test_an_expired_key_is_refused_from_the_copy(database_url):
    from datetime import timedelta

    from medserve.db.models import utcnow

    _, plaintext = _key(database_url, expires_at=utcnow() + timedelta(milliseconds=200))
    auth = Authenticator(database_url, refresh_seconds=60.0)
    asyncio.run(auth.authenticate(_bearer(plaintext)))
    auth._database_url = UNREACHABLE
    asyncio.run(asyncio.sleep(0.3))
    with pytest.raises(AuthenticationError):
        asyncio.run(auth.authenticate(_bearer(plaintext)))


def test_database_errors_map_to_503_and_bugs_to_a_counted_500(recording):
    refused = response_for(OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert b'"database_unavailable"' in refused.body
    assert recording.named("medserve_gateway_unhandled_errors_total") == []
    bug = response_for(KeyError("a bug"))
    assert bug.status_code == 500 and b'"internal_error"' in bug.body
    assert recording.named("medserve_gateway_unhandled_errors_total") == [(1.0, {})]


def test_gateway_serves_and_stays_ready_when_its_database_goes_away(database_url, tmp_path):
    """The whole gateway app, SQLite database moved away under it: known keys answer, /readyz says degraded."""
    from medserve.gateway.app import create_app
    from medserve.gateway.state import GatewayState, set_gateway

    _, plaintext = _key(database_url, role="auditor")
    state = GatewayState([], {"database_url": database_url, "home": str(tmp_path)})
    set_gateway(state)
    try:
        client = TestClient(create_app())
        assert client.get("/readyz").json()["status"] == "ready"
        state.authenticator._database_url = UNREACHABLE
        state.database_url = UNREACHABLE
        assert not state.authenticator.keys.refresh()
        listing = client.get("/v1/models", headers={"Authorization": _bearer(plaintext)})
        assert listing.status_code == 200
        ready = client.get("/readyz")
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "degraded" and body["database"] == "unreachable"
        assert body["state_age_s"]["keys"] is not None and body["audit"]["spooled"] == 0
    finally:
        set_gateway(None)
        state.close()
