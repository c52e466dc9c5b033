"""The review console in process: the real gateway app and its SQLite database, engines canned, no Ray.

Results to review are produced the way the API produces them (an imaging call through the gateway), and
every decision is checked where it lands: the reviews table and the audit trail.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from medserve.console.pages import chart
from medserve.console.sessions import COOKIE, SessionPolicy, csrf_token, load_session, start_session
from medserve.digests import sha256_hex
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord, ConsoleSession, Review, utcnow
from medserve.security.api_keys import Principal, revoke_api_key
from medserve.security.roles import ROUTE_PERMISSIONS, Role, has_permission

from .fake_gateway import gateway_client, make_key

TUMOUR = "brain-mri-tumour"
POLICY = SessionPolicy(idle=timedelta(minutes=30), absolute=timedelta(hours=12))
CONSOLE_ROUTES = sorted(route for route in ROUTE_PERMISSIONS if route[1].startswith("/console"))


def _result(client, database_url: str, department: str | None) -> str:
    """An answered imaging result of a caller of ``department``: pending in the review queue."""
    key = make_key(database_url, "clinical-app", department)
    response = client.post(f"/v1/imaging/{TUMOUR}", content=b"DICM",
                           headers={"Authorization": f"Bearer {key}", "Content-Type": "application/dicom"})
    assert response.status_code == 200, response.text
    return response.headers["x-medserve-inference-id"]


def _sign_in(client, key: str, follow: bool = False):
    form = client.get("/console/login")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    return client.post("/console/login", data={"api_key": key, "csrf": nonce, "next": "/console"},
                       follow_redirects=follow)


def _csrf(page_html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page_html).group(1)


def _title(page_html: str) -> str:
    return re.search(r"<title>(.*?)</title>", page_html).group(1)


def _rows(database_url: str, operation: str) -> list[AuditRecord]:
    with session_scope(database_url) as session:
        return list(session.scalars(select(AuditRecord).where(AuditRecord.operation == operation)
                                    .order_by(AuditRecord.created_at)))


def test_api_key_sign_in_keeps_only_a_hash_and_sets_a_strict_http_only_cookie(tmp_path, database_url):
    key = make_key(database_url, "clinician", "radiology")
    with gateway_client(tmp_path, database_url) as (client, _):
        page = client.get("/console/login")
        assert page.status_code == 200 and 'id="oidc-sign-in"' not in page.text  # no identity provider configured
        assert 'for="api_key"' in page.text
        signed = _sign_in(client, key)
        assert signed.status_code == 303 and signed.headers["location"] == "/console"
        cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes and "secure" not in attributes
        assert "samesite=strict" in cookie.lower() and "path=/console" in cookie.lower()
        token = cookie.split(";")[0].split("=", 1)[1]
        queue = client.get("/console")
        assert queue.status_code == 200 and "test clinician" in queue.text
        assert queue.headers["content-security-policy"].startswith("default-src 'none'")
    with session_scope(database_url) as session:
        (row,) = session.scalars(select(ConsoleSession))
        assert row.token_sha256 == sha256_hex(token) != token
        assert (row.method, row.role, row.department) == ("api_key", "clinician", "radiology")
    (audit,) = _rows(database_url, "console.sign_in")
    assert audit.outcome == "ok" and audit.input_sha256 == hashlib.sha256(str(row.id).encode()).hexdigest()


def test_cookie_is_secure_over_https(tmp_path, database_url):
    key = make_key(database_url, "auditor")
    with gateway_client(tmp_path, database_url) as (client, _):
        client.base_url = "https://testserver"
        signed = _sign_in(client, key)
        assert signed.status_code == 303
        assert "secure" in next(c for c in signed.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}=")).lower()


@pytest.mark.parametrize("role", ["clinical-app", "admin", "ops"])
def test_keys_of_other_roles_cannot_sign_in(tmp_path, database_url, role):
    key = make_key(database_url, role)
    with gateway_client(tmp_path, database_url) as (client, _):
        refused = _sign_in(client, key)
        assert refused.status_code == 403 and 'data-code="console_sign_in_refused"' in refused.text
        assert f"A {role} key cannot sign in" in refused.text
        assert not any(c.startswith(f"{COOKIE}=") for c in refused.headers.get_list("set-cookie"))
        assert client.get("/console", follow_redirects=False).status_code == 303  # still not signed in
        wrong = _sign_in(client, "msk_nothing_here")
        assert wrong.status_code == 401 and "was not accepted" in wrong.text
    with session_scope(database_url) as session:
        assert list(session.scalars(select(ConsoleSession))) == []
    (audit,) = _rows(database_url, "console.sign_in")
    assert (audit.caller_role, audit.outcome, audit.error_code) == (role, "denied", "console_sign_in_refused")


def test_sign_in_form_without_its_nonce_is_refused(tmp_path, database_url):
    key = make_key(database_url, "clinician")
    with gateway_client(tmp_path, database_url) as (client, _):
        refused = client.post("/console/login", data={"api_key": key}, follow_redirects=False)
    assert refused.status_code == 403 and 'data-code="csrf_token_invalid"' in refused.text


def test_queue_edit_and_accept_land_in_the_review_records_with_session_and_audit(tmp_path, database_url):
    radiologist = make_key(database_url, "clinician", "radiology")
    with gateway_client(tmp_path, database_url) as (client, _):
        first, second = _result(client, database_url, "radiology"), _result(client, database_url, "radiology")
        _result(client, database_url, "cardiology")
        assert _sign_in(client, radiologist).status_code == 303
        queue = client.get("/console")
        assert _title(queue.text).startswith("(2) Review queue")
        assert queue.text.index(first) < queue.text.index(second)  # oldest first
        page = client.get(f"/console/results/{first}")
        assert page.status_code == 200 and 'id="decision-form"' in page.text and first in page.text
        csrf = _csrf(page.text)

        no_token = client.post(f"/console/results/{first}/decision", data={"decision": "accept"},
                               follow_redirects=False)
        assert no_token.status_code == 403 and 'data-code="csrf_token_invalid"' in no_token.text
        other_token = client.post(f"/console/results/{first}/decision",
                                  data={"decision": "accept", "csrf": csrf_token("another session")})
        assert other_token.status_code == 403
        no_reason = client.post(f"/console/results/{first}/decision",
                                data={"decision": "edit", "csrf": csrf, "label": "glioma"})
        assert no_reason.status_code == 400 and 'data-code="invalid_request"' in no_reason.text

        edited = client.post(f"/console/results/{first}/decision", follow_redirects=False, data={
            "decision": "edit", "csrf": csrf, "code": "", "label": "meningioma", "value": "", "flag": "yes",
            "comment": "dural tail"})
        assert edited.status_code == 303 and edited.headers["location"].endswith("?done=edit")
        accepted = client.post(f"/console/results/{second}/decision", data={"decision": "accept", "csrf": csrf})
        assert accepted.status_code == 200 and "Signed off: accept" in accepted.text
        again = client.post(f"/console/results/{second}/decision", data={"decision": "reject", "csrf": csrf,
                                                                         "comment": "x"})
        assert again.status_code == 409 and 'data-code="already_reviewed"' in again.text
        assert _title(client.get("/console").text).startswith("(0) Review queue")
        api = client.get(f"/v1/reports/{first}", headers={"Authorization": f"Bearer {radiologist}"}).json()
        assert api["status"] == "amended" and api["review"]["corrected_finding"] == {"label": "meningioma", "flag": True}
    with session_scope(database_url) as session:
        (signed_in,) = session.scalars(select(ConsoleSession))
        reviews = {str(r.inference_id): r for r in session.scalars(select(Review))}
    assert {k: r.decision for k, r in reviews.items()} == {first: "edit", second: "accept"}
    decisions = {row.id: row for row in _rows(database_url, "review.decision")}
    for inference_id, review in reviews.items():
        assert (review.via, review.session_id, review.reviewer_role) == ("console", signed_in.id, "clinician")
        record = decisions[review.audit_id]  # the audit link of the decision
        assert record.outcome == "ok" and record.api_key_id == review.reviewer_key_id
        assert record.input_sha256 == hashlib.sha256(inference_id.encode()).hexdigest()
        assert (record.model_name, record.department) == (TUMOUR, "radiology")
    assert sorted(r.error_code for r in decisions.values() if r.outcome != "ok") == [
        "already_reviewed", "csrf_token_invalid", "csrf_token_invalid", "invalid_request"]


def test_another_department_cannot_see_or_open_a_result_and_the_refusal_is_audited(tmp_path, database_url):
    cardiologist = make_key(database_url, "clinician", "cardiology")
    with gateway_client(tmp_path, database_url) as (client, _):
        result = _result(client, database_url, "radiology")
        _sign_in(client, cardiologist)
        queue = client.get("/console")
        assert result not in queue.text and _title(queue.text).startswith("(0)")
        assert 'id="department"' not in queue.text  # a department-bound reader cannot widen the filter
        assert result not in client.get("/console", params={"department": "radiology"}).text
        opened = client.get(f"/console/results/{result}")
        assert opened.status_code == 403 and 'data-code="permission_denied"' in opened.text
        decided = client.post(f"/console/results/{result}/decision",
                              data={"decision": "accept", "csrf": _csrf(queue.text)})
        assert decided.status_code == 403
        assert client.get(f"/console/results/{uuid.uuid4()}").status_code == 404
    digest = hashlib.sha256(result.encode()).hexdigest()
    views = [r for r in _rows(database_url, "console.view") if r.input_sha256 == digest]
    assert [(r.outcome, r.http_status, r.department) for r in views] == [("denied", 403, "cardiology")]
    with session_scope(database_url) as session:
        assert list(session.scalars(select(Review))) == []


def test_auditor_reads_every_department_filters_and_cannot_decide(tmp_path, database_url):
    auditor = make_key(database_url, "auditor")
    with gateway_client(tmp_path, database_url) as (client, _):
        radiology, cardiology = _result(client, database_url, "radiology"), _result(client, database_url, "cardiology")
        _sign_in(client, auditor)
        everything = client.get("/console")
        assert radiology in everything.text and cardiology in everything.text
        filtered = client.get("/console", params={"department": "cardiology", "model": TUMOUR})
        assert cardiology in filtered.text and radiology not in filtered.text
        assert "(0)" in _title(client.get("/console", params={"age": "24h"}).text)
        page = client.get(f"/console/results/{radiology}")
        assert page.status_code == 200 and 'id="decision-form"' not in page.text
        refused = client.post(f"/console/results/{radiology}/decision",
                              data={"decision": "accept", "csrf": _csrf(page.text)})
        assert refused.status_code == 403 and 'data-code="permission_denied"' in refused.text
        overrides = client.get("/console/overrides")
        assert overrides.status_code == 200 and "<svg" in overrides.text and TUMOUR in overrides.text
    views = _rows(database_url, "console.view")
    assert [(v.caller_role, v.outcome, v.model_name) for v in views] == [("auditor", "ok", TUMOUR)]


def test_logout_ends_the_session_server_side(tmp_path, database_url):
    key = make_key(database_url, "clinician")
    with gateway_client(tmp_path, database_url) as (client, _):
        _sign_in(client, key)
        token = client.cookies.get(COOKIE)
        page = client.get("/console")
        no_token = client.post("/console/logout", follow_redirects=False)
        assert no_token.status_code == 403  # logout is a form post too
        out = client.post("/console/logout", data={"csrf": _csrf(page.text)}, follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        client.cookies.set(COOKIE, token, path="/console")  # a copy of the old cookie
        again = client.get("/console", follow_redirects=False)
        assert again.status_code == 303 and again.headers["location"].startswith("/console/login?next=")
    with session_scope(database_url) as session:
        assert list(session.scalars(select(ConsoleSession))) == []


def test_sessions_end_when_idle_at_their_absolute_expiry_and_when_their_key_is_revoked(database_url):
    key = make_key(database_url, "clinician")
    key_id = key.split("_")[1]
    principal = Principal(key_id=key_id, name="test clinician", role=Role.CLINICIAN, department=None)
    now = utcnow()
    with session_scope(database_url) as session:
        idle, _ = start_session(session, principal, "api_key", POLICY, now=now)
        busy, _ = start_session(session, principal, "api_key", POLICY, now=now)
        revoked, _ = start_session(session, principal, "api_key", POLICY, now=now)
    with session_scope(database_url) as session:
        for minutes in (20, 40, 60):  # busy keeps being used; idle is not
            user = load_session(session, busy, POLICY, now=now + timedelta(minutes=minutes))
            assert user is not None and busy not in repr(user)  # the secret never shows in a log line
        assert load_session(session, idle, POLICY, now=now + timedelta(minutes=31)) is None
        assert load_session(session, busy, POLICY, now=now + timedelta(hours=12, seconds=1)) is None
    with session_scope(database_url) as session:
        assert load_session(session, revoked, POLICY, now=now) is not None
        revoke_api_key(session, key_id)
    with session_scope(database_url) as session:
        assert load_session(session, revoked, POLICY) is None
        assert list(session.scalars(select(ConsoleSession))) == []  # each ended session was deleted


def _session_cookie(database_url: str, role: Role) -> str:
    """A live session of any role, written directly: the door admits only clinicians and auditors, and the
    route table must still hold if a session of another role existed."""
    token = uuid.uuid4().hex
    now = utcnow()
    with session_scope(database_url) as session:
        session.add(ConsoleSession(token_sha256=sha256_hex(token), created_at=now, last_seen_at=now,
                                   expires_at=now + timedelta(hours=1), method="oidc", key_id=f"k-{role.value}",
                                   name=f"test {role.value}", role=role.value, department=None))
    return token


def test_console_role_by_route_matrix(tmp_path, database_url):
    failures = []
    with gateway_client(tmp_path, database_url) as (client, _):
        result = _result(client, database_url, None)
        for method, path in CONSOLE_ROUTES:
            url = path.replace("{result_id}", result).replace("{file_name}", "console.css")
            permission = ROUTE_PERMISSIONS[(method, path)]
            client.cookies.clear()
            anonymous = client.request(method, url, follow_redirects=False)
            if permission is None:
                if (method, path) == ("POST", "/console/login"):  # public, yet a form post: its nonce decides
                    if 'data-code="csrf_token_invalid"' not in anonymous.text:
                        failures.append("POST /console/login without its nonce was not refused")
                elif anonymous.status_code in (401, 403):
                    failures.append(f"{method} {path}: public route refused anonymous")
                continue
            expected = 303 if method == "GET" else 401
            if anonymous.status_code != expected:
                failures.append(f"{method} {path}: anonymous got {anonymous.status_code}, not {expected}")
            for role in Role:
                client.cookies.clear()
                client.cookies.set(COOKIE, _session_cookie(database_url, role), path="/console")
                # A post carries its session's CSRF token, so the permission is what decides.
                token = client.cookies.get(COOKIE)
                response = client.request(method, url, follow_redirects=False,
                                          data={"csrf": csrf_token(token), "decision": "reject", "comment": "matrix"}
                                          if method == "POST" else None)
                allowed = has_permission(role, permission)
                if allowed and response.status_code in (401, 403):
                    failures.append(f"{method} {path} as {role.value}: refused ({response.status_code})")
                if not allowed and (response.status_code != 403 or 'data-code="permission_denied"' not in response.text):
                    failures.append(f"{method} {path} as {role.value}: {response.status_code}, expected 403")
    assert failures == []


def test_static_files_and_templates_need_nothing_from_outside(tmp_path, database_url):
    console = Path(__file__).resolve().parents[2] / "platform" / "medserve" / "console"
    for path in [*console.glob("templates/*.html"), *console.glob("static/*")]:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name  # no CDN, no external fonts
        for control in re.findall(r'<(?:input|select|textarea)\b[^>]*\bid="([^"]+)"', text):
            assert f'for="{control}"' in text, f"{path.name}: control {control} has no label"
    with gateway_client(tmp_path, database_url) as (client, _):
        css = client.get("/console/static/console.css")
        script = client.get("/console/static/console.js")
        assert css.headers["content-type"].startswith("text/css") and "--ink" in css.text
        assert script.headers["content-type"].startswith("text/javascript") and "keydown" in script.text
        assert client.get("/console/static/..%2Fpages.py").status_code == 404


def test_override_chart_bars_follow_the_rates():
    drawn = chart([
        {"model": "m", "model_version": "1", "override_rate": 0.5, "reviewed": 4},
        {"model": "m", "model_version": "2", "override_rate": None, "reviewed": 0},
    ])
    first, second = drawn["bars"]
    assert first["width"] == round(drawn["scale"] * 0.5, 1) and first["text"] == "50% of 4"
    assert second["width"] == 0 and second["text"] == "no reviews yet"
    assert drawn["height"] == 10 + 2 * 32


def test_an_llm_answer_is_shown_and_edited_as_text(database_url, tmp_path, repo_root):
    from .test_review_queue import ANSWER, MODEL, _chat, _key, _llm_spec
    from .test_llm_gateway import Gateway, _scripted_server

    spec = _llm_spec(repo_root / "deployments", required=True, departments=["icu"], store_output=True)
    gateway = Gateway(database_url, tmp_path, {MODEL: (spec, _scripted_server(spec, ANSWER))})
    try:
        inference_id = _chat(gateway, _key(database_url, "clinical-app", "icu"))
        client = gateway.client
        _sign_in(client, make_key(database_url, "clinician", "icu"))
        page = client.get(f"/console/results/{inference_id}")
        assert page.status_code == 200 and 'id="answer"' in page.text and "".join(ANSWER) in page.text
        assert 'id="edited_text"' in page.text and 'id="label"' not in page.text
        edited = "Start norepinephrine at 0.1 mcg/kg/min."
        done = client.post(f"/console/results/{inference_id}/decision", data={
            "decision": "edit", "csrf": _csrf(page.text), "edited_text": edited, "comment": "local protocol"})
        assert done.status_code == 200 and "Signed off: edit" in done.text and edited in done.text
        rates = client.get("/console/overrides")
        assert "100% of 1" in rates.text and MODEL in rates.text
    finally:
        gateway.close()
    with session_scope(database_url) as session:
        (review,) = session.scalars(select(Review))
    assert (review.decision, review.edited_text, review.via) == ("edit", edited, "console")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'console.db'}"
    return request.getfixturevalue("postgres_server").create_database()


def test_the_console_migration_runs_up_and_down_on_sqlite_and_postgresql(any_database):
    from alembic import command

    from medserve.db.engine import alembic_config, upgrade

    upgrade(any_database)
    principal = Principal(key_id="oidc-sub", name="dr a", role=Role.AUDITOR, department=None)
    with session_scope(any_database) as session:
        token, row = start_session(session, principal, "oidc", POLICY)
    with session_scope(any_database) as session:
        user = load_session(session, token, POLICY)
        assert user is not None and user.session_id == row.id and user.principal == principal
    command.downgrade(alembic_config(any_database), "8b3e5f7a9c21")
    upgrade(any_database)
    with session_scope(any_database) as session:
        assert load_session(session, token, POLICY) is None  # the table came back empty


CALLBACK = "https://testserver/console/login/oidc/callback"  # https: the callback is never plain http


@pytest.fixture
def identity_provider():
    """The local OpenID Connect provider the test starts (tests/oidc_provider.py), over real HTTP."""
    from tests.oidc_provider import Client, OIDCProvider

    with OIDCProvider(clients={"medserve-console": Client(redirect_uri=CALLBACK)}) as provider:
        yield provider


def _oidc_settings(provider) -> dict[str, str]:
    return {"oidc_issuer": provider.issuer, "oidc_jwks_url": f"{provider.issuer}/jwks",
            "oidc_client_id": "medserve-console", "oidc_redirect_url": CALLBACK}


def _through_the_provider(client, next_path: str = "/console"):
    """The browser's trip: the console's redirect, the provider's approval, the callback. Returns the answers."""
    import httpx

    client.base_url = "https://testserver"
    away = client.get("/console/login/oidc", params={"next": next_path}, follow_redirects=False)
    assert away.status_code == 303, away.text
    back = httpx.get(away.headers["location"], follow_redirects=False)  # the provider approves its user at once
    assert back.status_code == 302 and back.headers["location"].startswith(CALLBACK)
    return away, back, client.get(back.headers["location"].removeprefix("https://testserver"), follow_redirects=False)


def test_oidc_sign_in_through_a_local_identity_provider_starts_the_same_session(
        tmp_path, database_url, identity_provider):
    identity_provider.user = {"sub": "dr-rad-7", "roles": ["clinician"], "department": "radiology"}
    with gateway_client(tmp_path, database_url, **_oidc_settings(identity_provider)) as (client, _):
        assert 'id="oidc-sign-in"' in client.get("/console/login").text  # offered once configured
        away, back, landed = _through_the_provider(client, "/console/overrides")
        assert away.headers["location"].startswith(f"{identity_provider.issuer}/authorize?")
        assert "code_challenge_method=S256" in away.headers["location"]
        pending = next(c for c in away.headers.get_list("set-cookie") if c.startswith("medserve_console_oidc="))
        assert {"httponly", "samesite=lax", "path=/console/login/oidc"} <= {
            part.strip().lower() for part in pending.split(";")}
        assert landed.status_code == 200 and 'content="0; url=/console/overrides"' in landed.text
        session_cookie = next(c for c in landed.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
        assert {"samesite=strict", "httponly", "secure"} <= {p.strip() for p in session_cookie.lower().split(";")}
        page = client.get("/console/overrides")
        assert page.status_code == 200 and "clinician · radiology" in page.text
        replayed = client.get(back.headers["location"].removeprefix("https://testserver"), follow_redirects=False)
        assert replayed.status_code == 401 and 'data-code="oidc_state_mismatch"' in replayed.text
    with session_scope(database_url) as session:
        (row,) = session.scalars(select(ConsoleSession))
    assert (row.method, row.role, row.department, row.name) == ("oidc", "clinician", "radiology", "oidc dr-rad-7")
    assert [r.outcome for r in _rows(database_url, "console.sign_in")] == ["ok"]


def test_oidc_sign_in_refuses_other_roles_and_is_hidden_when_not_configured(
        tmp_path, database_url, identity_provider):
    identity_provider.user = {"sub": "ward-app", "roles": ["clinical-app"]}
    with gateway_client(tmp_path, database_url, **_oidc_settings(identity_provider)) as (client, _):
        _, _, refused = _through_the_provider(client)
        assert refused.status_code == 403 and 'data-code="console_sign_in_refused"' in refused.text
        assert "A clinical-app account cannot sign in" in refused.text
        assert client.get("/console", follow_redirects=False).status_code == 303
        forgotten = next(c for c in refused.headers.get_list("set-cookie") if c.startswith("medserve_console_oidc="))
        assert {"max-age=0", "secure", "httponly"} <= {part.strip() for part in forgotten.lower().split(";")}
    with gateway_client(tmp_path, database_url) as (client, _):
        assert 'id="oidc-sign-in"' not in client.get("/console/login").text
        assert client.get("/console/login/oidc", follow_redirects=False).status_code == 404
    with session_scope(database_url) as session:
        assert list(session.scalars(select(ConsoleSession))) == []
    (audit,) = _rows(database_url, "console.sign_in")
    assert (audit.caller_role, audit.outcome) == ("clinical-app", "denied")


def test_templates_and_static_files_ship_in_the_package(repo_root):
    """A non-editable install (the container image) gets every template and static file: pyproject's
    package-data names them all."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medserve"]
    package = repo_root / "platform" / "medserve"
    shipped = [p.relative_to(package).as_posix() for p in package.glob("console/*/*") if p.is_file()]
    assert shipped and [f for f in shipped if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)] == []
