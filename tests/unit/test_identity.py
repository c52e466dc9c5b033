"""Hospital identity (OIDC JWTs) and API key rotation and revocation."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from medserve.cli.main import cli
from medserve.db.engine import session_scope
from medserve.db.models import ApiKey, AuditRecord, utcnow
from medserve.errors import AuthenticationError, BadRequestError
from medserve.security.api_keys import (
    create_api_key, list_api_keys, revoke_api_key, rotate_api_key, verify_api_key,
)
from medserve.security.oidc import OIDCVerifier, caller_id
from medserve.security.roles import Role

from .fake_gateway import gateway_client

ISSUER = "https://idp.hospital.test/realms/clinical"
AUDIENCE = "medserve"
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def idp_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_file(tmp_path, idp_key):
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "test-idp-1", "use": "sig", "alg": "RS256"}]}))
    return path


def token(key, **overrides) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "staff-4711", "iat": now, "exp": now + 300,
              "roles": ["clinician"], "department": "icu", **overrides}
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test-idp-1"})


def oidc_settings(jwks_file) -> dict:
    return {"oidc_issuer": ISSUER, "oidc_audience": AUDIENCE, "oidc_jwks_file": str(jwks_file)}


def chat(client, bearer: str):
    return client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {bearer}"},
        json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )


def test_a_jwt_from_the_idp_is_accepted_and_audited_with_a_stable_caller_id(tmp_path, database_url, jwks_file, idp_key):
    with gateway_client(tmp_path, database_url, **oidc_settings(jwks_file)) as (client, _):
        first, second = chat(client, token(idp_key)), chat(client, token(idp_key, iat=int(time.time()) - 5))
    assert first.status_code == 200 and second.status_code == 200, first.text
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(AuditRecord)))
    assert {r.api_key_id for r in rows} == {caller_id(ISSUER, "staff-4711")}
    assert {(r.caller_role, r.department) for r in rows} == {("clinician", "icu")}
    assert all(r.api_key_id.startswith("oidc-") and "staff-4711" not in r.api_key_id for r in rows)


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "some-other-app"},
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"iss": "https://evil.test"},
        {"exp": None},
    ],
    ids=["wrong-audience", "expired", "wrong-issuer", "no-expiry"],
)
def test_a_bad_jwt_gets_401_and_an_audit_row(tmp_path, database_url, jwks_file, idp_key, overrides):
    with gateway_client(tmp_path, database_url, **oidc_settings(jwks_file)) as (client, _):
        response = chat(client, token(idp_key, **overrides))
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"
    with session_scope(database_url) as session:
        (row,) = session.scalars(select(AuditRecord))
    assert (row.http_status, row.error_code) == (401, "unauthenticated")


def test_a_jwt_signed_by_another_key_or_with_alg_none_gets_401(jwks_file, idp_key):
    verifier = OIDCVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=str(jwks_file))
    assert verifier.verify(token(idp_key)).role.value == "clinician"
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60,
                           "roles": ["admin"]}, None, algorithm="none")
    for bad in (token(stranger), unsigned, "a.b.c"):
        with pytest.raises(AuthenticationError):
            verifier.verify(bad)


def test_roles_and_department_come_from_configurable_claims(jwks_file, idp_key):
    verifier = OIDCVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=str(jwks_file),
                            roles_claim="realm_access.roles", department_claim="ward")
    principal = verifier.verify(token(idp_key, roles=None, department=None,
                                      realm_access={"roles": ["offline_access", "auditor"]}, ward="radiology"))
    assert (principal.role.value, principal.department) == ("auditor", "radiology")


def test_a_jwt_without_a_medserve_role_gets_403(tmp_path, database_url, jwks_file, idp_key):
    with gateway_client(tmp_path, database_url, **oidc_settings(jwks_file)) as (client, _):
        response = chat(client, token(idp_key, roles=["nurse"]))
    assert response.status_code == 403


def test_the_jwks_url_is_fetched_once_and_cached(monkeypatch, jwks_file, idp_key):
    fetched = []

    class FakeResponse:
        def raise_for_status(self):
            pass

        def json(self):
            return json.loads(jwks_file.read_text())

    def fake_get(url, timeout):
        fetched.append(url)
        return FakeResponse()

    monkeypatch.setattr("medserve.security.oidc.httpx.get", fake_get)
    verifier = OIDCVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url="https://idp.hospital.test/jwks")
    for _ in range(3):
        verifier.verify(token(idp_key))
    assert fetched == ["https://idp.hospital.test/jwks"]


def test_without_oidc_configured_a_jwt_is_just_an_invalid_key(tmp_path, database_url, idp_key):
    with gateway_client(tmp_path, database_url) as (client, _):
        assert chat(client, token(idp_key)).status_code == 401


# --- API keys ---------------------------------------------------------------------


def test_rotation_keeps_name_role_department_and_expires_the_old_key_after_the_grace(database_url):
    with session_scope(database_url) as session:
        old, old_plain = create_api_key(session, name="ward app", role="clinical-app", department="icu")
        new, new_plain = rotate_api_key(session, old.key_id, grace=timedelta(hours=2))
        assert (new.name, new.role, new.department) == ("ward app", "clinical-app", "icu")
        assert verify_api_key(session, old_plain).key_id == old.key_id  # still inside the grace
        assert verify_api_key(session, new_plain).key_id == new.key_id
        later = utcnow() + timedelta(hours=3)
        with pytest.raises(AuthenticationError):
            verify_api_key(session, old_plain, now=later)
        assert verify_api_key(session, new_plain, now=later).key_id == new.key_id
        revoke_api_key(session, new.key_id)
        with pytest.raises(AuthenticationError):
            verify_api_key(session, new_plain)
        with pytest.raises(BadRequestError):
            rotate_api_key(session, new.key_id)


def test_listed_keys_carry_role_and_state_never_secrets(database_url):
    with session_scope(database_url) as session:
        active, _ = create_api_key(session, name="ward app", role="clinical-app", department="icu")
        revoked, _ = create_api_key(session, name="old app", role="clinician")
        expired, _ = create_api_key(session, name="temp", role="auditor", expires_at=utcnow() - timedelta(minutes=1))
        revoke_api_key(session, revoked.key_id)
    with session_scope(database_url) as session:
        listed = {key.key_id: key for key in list_api_keys(session)}
    assert {key_id: key.state for key_id, key in listed.items()} == {
        active.key_id: "active", revoked.key_id: "revoked", expired.key_id: "expired"}
    assert listed[active.key_id].role is Role.CLINICAL_APP and listed[active.key_id].department == "icu"
    assert not any(hasattr(key, name) for key in listed.values() for name in ("secret_sha256", "secret"))


def test_keys_rotate_and_revoke_commands(database_url, monkeypatch):
    monkeypatch.setenv("MEDSERVE_DATABASE_URL", database_url)
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--name", "lab app", "--role", "clinical-app"])
    old_plain = created.stdout.strip().splitlines()[0]
    old_id = old_plain.split("_")[1]
    rotated = runner.invoke(cli, ["keys", "rotate", old_id, "--grace-hours", "0"])
    assert rotated.exit_code == 0, rotated.output
    new_plain = rotated.stdout.strip().splitlines()[0]
    revoked = runner.invoke(cli, ["keys", "revoke", new_plain.split("_")[1]])
    assert revoked.exit_code == 0 and "within 5 s" in revoked.output
    with session_scope(database_url) as session:
        for plain in (old_plain, new_plain):
            with pytest.raises(AuthenticationError):
                verify_api_key(session, plain)
        assert len(list(session.scalars(select(ApiKey)))) == 2
    listing = runner.invoke(cli, ["keys", "list"]).output
    assert "revoked" in listing and "expired" in listing
    assert runner.invoke(cli, ["keys", "revoke", "nosuchkey"]).exit_code != 0


def test_keys_show_tells_the_rate_a_key_is_held_to_and_set_rate_limit_changes_it(database_url, monkeypatch):
    monkeypatch.setenv("MEDSERVE_DATABASE_URL", database_url)
    monkeypatch.delenv("MEDSERVE_RATE_LIMIT_KEY_RPS", raising=False)
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--name", "ward app", "--role", "clinical-app"])
    key_id = created.stdout.strip().splitlines()[0].split("_")[1]
    shown = runner.invoke(cli, ["keys", "show", key_id])
    assert shown.exit_code == 0 and "rate limit:  50 requests/s, burst 2 s (the install's default" in shown.output
    assert runner.invoke(cli, ["keys", "set-rate-limit", key_id, "0"]).exit_code == 0
    assert "no limit (this key's own setting)" in runner.invoke(cli, ["keys", "show", key_id]).output
    assert runner.invoke(cli, ["keys", "set-rate-limit", key_id, "12.5"]).exit_code == 0
    assert "12.5 requests/s" in runner.invoke(cli, ["keys", "show", key_id]).output
    refused = runner.invoke(cli, ["keys", "set-rate-limit", key_id, "fast"])
    assert refused.exit_code != 0 and "'default'" in refused.output
    assert runner.invoke(cli, ["keys", "set-rate-limit", key_id, "-3"]).exit_code != 0
    assert runner.invoke(cli, ["keys", "set-rate-limit", key_id, "default"]).exit_code == 0
    assert "the install's default" in runner.invoke(cli, ["keys", "show", key_id]).output
    pacs = runner.invoke(cli, ["keys", "create", "--name", "pacs", "--role", "clinical-app", "--rate-limit-rps", "200"])
    pacs_id = pacs.stdout.strip().splitlines()[0].split("_")[1]
    assert "200 requests/s" in runner.invoke(cli, ["keys", "show", pacs_id]).output
    assert runner.invoke(cli, ["keys", "show", "nosuchkey"]).exit_code != 0
