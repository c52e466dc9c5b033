"""Browser sign-in with the hospital identity provider, against a real local OIDC provider over HTTP."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from medserve.errors import (
    ConfigurationError, InvalidReturnToError, OIDCDiscoveryError, OIDCIdTokenInvalidError, OIDCLoginExpiredError,
    OIDCStateMismatchError, OIDCTokenExchangeError, PermissionDeniedError,
)
from medserve.security.oidc import caller_id, verifier_from_settings
from medserve.security.oidc_login import PENDING_LOGIN_MAX_AGE_S, OIDCLogin, PendingLogin
from medserve.security.roles import Role
from medserve.settings import Settings

from ..oidc_provider import Client, OIDCProvider

REDIRECT = "https://gateway.hospital.test/console/login/oidc/callback"
PUBLIC, CONFIDENTIAL, SECRET = "medserve-console", "medserve-console-confidential", "s3cret:with/odd+chars"
RADIOLOGIST = {"sub": "staff-4711", "roles": ["clinician"], "department": "radiology"}


@pytest.fixture
def idp():
    clients = {PUBLIC: Client(REDIRECT), CONFIDENTIAL: Client(REDIRECT, secret=SECRET)}
    with OIDCProvider(clients=clients, user=dict(RADIOLOGIST)) as provider:
        yield provider


def settings(idp: OIDCProvider, **overrides) -> Settings:
    values = {"oidc_issuer": idp.issuer, "oidc_audience": "medserve", "oidc_jwks_url": f"{idp.issuer}/jwks",
              "oidc_client_id": PUBLIC, "oidc_redirect_url": REDIRECT, **overrides}
    return Settings(_env_file=None, **values)


def authorize(url: str) -> dict[str, str]:
    """What a browser does with the authorization URL: the provider redirects it to the console's callback."""
    response = httpx.get(url, follow_redirects=False)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def sign_in(login: OIDCLogin, return_to: str = "/console/reviews", **pending_changes):
    url, pending = login.begin(return_to)
    back = authorize(url)
    # The console keeps the pending login between the two requests, e.g. in a signed cookie.
    kept = PendingLogin.from_json(pending.to_json())
    assert kept == pending
    kept = dataclasses.replace(kept, **pending_changes)
    return asyncio.run(login.complete(code=back["code"], state=back["state"], pending=kept))


def test_a_radiologist_signs_in_and_gets_the_same_principal_as_a_bearer_jwt(idp):
    login = OIDCLogin(settings(idp))
    assert login.enabled
    url, pending = login.begin("/console/reviews?department=radiology")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(f"{idp.issuer}/authorize?")
    assert query == {
        "response_type": "code", "client_id": PUBLIC, "redirect_uri": REDIRECT, "scope": "openid profile",
        "state": pending.state, "nonce": pending.nonce, "code_challenge_method": "S256",
        "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(pending.code_verifier.encode()).digest())
        .rstrip(b"=").decode(),
    }
    assert 43 <= len(pending.code_verifier) <= 128 and pending.return_to == "/console/reviews?department=radiology"
    back = authorize(url)
    assert back["state"] == pending.state and idp.challenges == [query["code_challenge"]]

    principal = asyncio.run(login.complete(code=back["code"], state=back["state"], pending=pending))

    assert (principal.role, principal.department) == (Role.CLINICIAN, "radiology")
    assert principal.key_id == caller_id(idp.issuer, "staff-4711")
    # The same person's bearer JWT maps to the same caller, so their audit rows line up.
    bearer = verifier_from_settings(settings(idp)).principal_from_claims({**RADIOLOGIST})
    assert principal == bearer
    # A public client proves itself with the PKCE verifier alone.
    assert idp.token_requests[0]["code_verifier"] == pending.code_verifier
    assert idp.token_requests[0]["client_id"] == PUBLIC


def test_a_confidential_client_authenticates_with_its_secret_and_a_wrong_secret_is_refused(idp):
    principal = sign_in(OIDCLogin(settings(idp, oidc_client_id=CONFIDENTIAL, oidc_client_secret=SECRET)))
    assert principal.key_id == caller_id(idp.issuer, "staff-4711")
    assert "client_id" not in idp.token_requests[0]  # sent as client_secret_basic, not in the form

    with pytest.raises(OIDCTokenExchangeError) as refused:
        sign_in(OIDCLogin(settings(idp, oidc_client_id=CONFIDENTIAL, oidc_client_secret="guess")))
    assert refused.value.details == {"idp_error": "invalid_client"}
    assert CONFIDENTIAL not in json.dumps(refused.value.to_payload())  # the provider's description stays out


def test_the_provider_refuses_a_wrong_pkce_verifier_and_its_description_does_not_leak(idp):
    with pytest.raises(OIDCTokenExchangeError) as refused:
        sign_in(OIDCLogin(settings(idp)), code_verifier="x" * 64)
    assert refused.value.code == "oidc_token_exchange_failed" and refused.value.http_status == 401
    assert refused.value.details == {"idp_error": "invalid_grant"}
    payload = json.dumps(refused.value.to_payload())
    assert "PKCE" not in payload and "staff-4711" not in payload


def test_a_code_works_once(idp):
    login = OIDCLogin(settings(idp))
    url, pending = login.begin("/console/")
    back = authorize(url)
    asyncio.run(login.complete(code=back["code"], state=back["state"], pending=pending))
    with pytest.raises(OIDCTokenExchangeError) as replayed:
        asyncio.run(login.complete(code=back["code"], state=back["state"], pending=pending))
    assert replayed.value.details == {"idp_error": "invalid_grant"}


def test_a_state_that_this_login_did_not_send_is_refused_before_the_provider_is_asked(idp):
    login = OIDCLogin(settings(idp))
    url, pending = login.begin("/console/")
    back = authorize(url)
    _, other = login.begin("/console/")
    with pytest.raises(OIDCStateMismatchError):
        asyncio.run(login.complete(code=back["code"], state=back["state"], pending=other))
    with pytest.raises(OIDCStateMismatchError):
        asyncio.run(login.complete(code=back["code"], state="", pending=pending))
    assert idp.token_requests == []


def test_a_login_older_than_ten_minutes_is_refused(idp):
    assert PENDING_LOGIN_MAX_AGE_S == 600
    with pytest.raises(OIDCLoginExpiredError) as expired:
        sign_in(OIDCLogin(settings(idp)), created_at=time.time() - 601)
    assert expired.value.code == "oidc_login_expired"
    assert idp.token_requests == []
    # Just inside the window still works.
    assert sign_in(OIDCLogin(settings(idp)), created_at=time.time() - 590).role is Role.CLINICIAN


def test_an_id_token_with_another_nonce_is_refused(idp):
    with pytest.raises(OIDCIdTokenInvalidError) as refused:
        sign_in(OIDCLogin(settings(idp)), nonce="a-nonce-from-another-login")
    assert refused.value.details == {"claim": "nonce"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "medserve"},  # the gateway's bearer audience is not the console's client id
        {"aud": "some-other-app"},
        {"aud": [PUBLIC, "some-other-app"]},  # several audiences and no azp naming this client
        {"aud": [PUBLIC, "some-other-app"], "azp": "some-other-app"},
        {"iss": "https://idp.elsewhere.test"},
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200},
        {"iat": None},
        {"nonce": None},
        {"sub": None},
    ],
    ids=["bearer-audience", "other-audience", "multi-audience-no-azp", "multi-audience-other-azp", "other-issuer",
         "expired", "issued-in-the-future", "no-iat", "no-nonce", "no-sub"],
)
def test_an_id_token_that_fails_verification_is_refused(idp, overrides):
    idp.id_token_overrides = overrides
    with pytest.raises(OIDCIdTokenInvalidError):
        sign_in(OIDCLogin(settings(idp)))


def test_an_id_token_signed_with_a_key_the_provider_does_not_publish_is_refused(idp):
    idp.sign_with = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(OIDCIdTokenInvalidError):
        sign_in(OIDCLogin(settings(idp)))


def test_several_audiences_are_accepted_when_this_client_is_the_authorized_party(idp):
    idp.id_token_overrides = {"aud": [PUBLIC, "medserve"], "azp": PUBLIC}
    assert sign_in(OIDCLogin(settings(idp))).department == "radiology"


@pytest.mark.parametrize("return_to", [
    "https://evil.test/console/", "//evil.test/console/", "/\\evil.test", "/console/../admin/keys",
    "/console/%2e%2e/v1/admin", "/v1/reviews", "/consoleevil", "console/reviews", "", "/console/\r\nSet-Cookie:x",
    "/console/%0d%0aSet-Cookie:x", "/console/reviews#frag", "javascript:alert(1)", "/console/" + "a" * 2001,
])
def test_return_to_must_be_a_console_path(idp, return_to):
    with pytest.raises(InvalidReturnToError) as refused:
        OIDCLogin(settings(idp)).begin(return_to)
    assert refused.value.code == "invalid_return_to" and refused.value.http_status == 400


@pytest.mark.parametrize("return_to", ["/console", "/console/", "/console/reviews/7f3a?tab=findings", "/console?x=1"])
def test_console_paths_are_accepted_as_return_to(idp, return_to):
    assert OIDCLogin(settings(idp)).begin(return_to)[1].return_to == return_to


def test_a_tampered_pending_login_is_refused(idp):
    _, pending = OIDCLogin(settings(idp)).begin("/console/")
    for text in ["not json", "[]", json.dumps({**dataclasses.asdict(pending), "created_at": "now"}),
                 json.dumps({**dataclasses.asdict(pending), "admin": True}),
                 json.dumps({k: v for k, v in dataclasses.asdict(pending).items() if k != "nonce"})]:
        with pytest.raises(OIDCStateMismatchError):
            PendingLogin.from_json(text)
    login = OIDCLogin(settings(idp))
    url, pending = login.begin("/console/")
    back = authorize(url)
    with pytest.raises(InvalidReturnToError):  # a return_to changed after begin is checked again
        asyncio.run(login.complete(code=back["code"], state=back["state"],
                                   pending=dataclasses.replace(pending, return_to="https://evil.test/")))


def test_a_discovery_document_naming_another_issuer_is_refused(idp):
    idp.advertised_issuer = "https://idp.attacker.test"
    with pytest.raises(OIDCDiscoveryError) as refused:
        OIDCLogin(settings(idp)).begin("/console/")
    assert refused.value.details == {"reason": "issuer_mismatch"} and refused.value.http_status == 503


def test_explicit_endpoints_need_no_discovery(idp, tmp_path):
    idp.advertised_issuer = "https://unused.test"  # discovery would be refused: it is never read
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))  # an offline hospital ships the keys as a file
    login = OIDCLogin(settings(idp, oidc_jwks_url=None, oidc_jwks_file=str(jwks),
                               oidc_authorization_endpoint=f"{idp.issuer}/authorize",
                               oidc_token_endpoint=f"{idp.issuer}/token", oidc_scopes="openid profile email"))
    url, _ = login.begin("/console/")
    assert parse_qs(urlsplit(url).query)["scope"] == ["openid profile email"]
    assert sign_in(login).key_id == caller_id(idp.issuer, "staff-4711")


def test_a_clinical_app_role_from_the_provider_is_returned_as_such_for_the_console_to_refuse(idp):
    idp.user = {"sub": "svc-ris", "roles": ["clinical-app"], "department": "radiology"}
    assert sign_in(OIDCLogin(settings(idp))).role is Role.CLINICAL_APP


def test_a_user_without_a_medserve_role_is_denied(idp):
    idp.user = {"sub": "visitor", "roles": ["wiki-editor"]}
    with pytest.raises(PermissionDeniedError):
        sign_in(OIDCLogin(settings(idp)))


def test_sign_in_is_off_until_issuer_client_and_redirect_are_set(idp):
    login = OIDCLogin(Settings(_env_file=None))
    assert not login.enabled
    with pytest.raises(ConfigurationError) as off:
        login.begin("/console/")
    assert off.value.details["missing"] == [
        "MEDSERVE_OIDC_ISSUER", "MEDSERVE_OIDC_CLIENT_ID", "MEDSERVE_OIDC_REDIRECT_URL"
    ]
    bearer_only = OIDCLogin(settings(idp, oidc_client_id=None, oidc_redirect_url=None))
    assert not bearer_only.enabled


@pytest.mark.parametrize("overrides", [
    {"oidc_redirect_url": None},
    {"oidc_issuer": None, "oidc_jwks_url": None},
    {"oidc_redirect_url": "http://gateway.hospital.test/console/login/oidc/callback"},  # plain http off loopback
    {"oidc_authorization_endpoint": "https://idp.hospital.test/authorize"},  # without the token endpoint
    {"oidc_scopes": "profile email"},
])
def test_an_incomplete_or_unsafe_sign_in_configuration_is_refused_at_start(idp, overrides):
    with pytest.raises(pydantic.ValidationError):
        settings(idp, **overrides)
