"""The review console: server-rendered pages under /console, served by the gateway (same door).

Permissions come from ROUTE_PERMISSIONS like every other route; the console
authenticates with its own sign-in session (a cookie) instead of a bearer
header, and every decision goes through the review service's
``record_review`` with the session and the audit record of the decision.
Nothing here runs on the inference routes: the router is included after them
and adds no middleware.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import logging
import secrets
import uuid
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import ValidationError

from medserve.console.pages import AGES, QUEUE_LIMIT, chart, draft, older_than, parse_id, waited
from medserve.console.sessions import (
    COOKIE,
    ConsoleUser,
    SessionPolicy,
    admit,
    check_csrf,
    end_session,
    load_session,
    start_session,
)
from medserve.db.engine import session_scope
from medserve.digests import sha256_hex
from medserve.errors import (
    AuditUnavailableError,
    AuthenticationError,
    CsrfTokenError,
    InvalidReturnToError,
    MedserveError,
    NotFoundError,
    OIDCStateMismatchError,
    PermissionDeniedError,
    RequestValidationFailed,
)
from medserve.gateway.audit_scope import AuditScope, new_record_id
from medserve.gateway.routes.reviews import model_access
from medserve.gateway.state import GatewayState, get_gateway, route_path
from medserve.reviews.reports import report_view
from medserve.reviews.service import ReviewRequest, override_summary, pending_results, record_review
from medserve.security.api_keys import Principal
from medserve.security.oidc_login import CONSOLE_PREFIX, OIDCLogin, PendingLogin, checked_return_to
from medserve.security.roles import Permission, has_permission

logger = logging.getLogger("medserve.console")

router = APIRouter(include_in_schema=False)

LOGIN_COOKIE = "medserve_console_login"  # the sign-in form's double-submit nonce
STATIC_FILES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = {
    # Only the console's own files: no CDN, no inline script, no framing, forms post only here.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

templates = Environment(
    loader=PackageLoader("medserve.console", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


class SignInNeeded(Exception):
    """No live session: pages redirect to the sign-in form."""


# --- plumbing ------------------------------------------------------------------------


def _policy(gateway: GatewayState) -> SessionPolicy:
    settings = gateway.settings
    return SessionPolicy(idle=timedelta(minutes=settings.console_session_idle_minutes),
                         absolute=timedelta(hours=settings.console_session_max_hours))


def _secure(gateway: GatewayState, request: Request) -> bool:
    mode = gateway.settings.console_cookie_secure
    if mode != "auto":
        return mode == "always"
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _set_cookie(response: Response, gateway: GatewayState, request: Request, name: str, value: str, *,
                path: str, max_age: int | None, same_site: str = "strict") -> None:
    response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite=same_site,  # type: ignore[arg-type]
                        secure=_secure(gateway, request))


def _forget(response: Response, gateway: GatewayState, request: Request, name: str, *, path: str,
            same_site: str = "strict") -> None:
    """Delete a cookie with the attributes it was set with (a Secure cookie is removed by a Secure one)."""
    _set_cookie(response, gateway, request, name, "", path=path, max_age=0, same_site=same_site)


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status, headers=SECURITY_HEADERS)


async def _form(gateway: GatewayState, request: Request) -> dict[str, str]:
    body = await gateway.read_body(request)
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise RequestValidationFailed("the form could not be read") from None
    return {name: values[0] for name, values in fields.items()}


async def _user(gateway: GatewayState, request: Request) -> ConsoleUser:
    """The signed-in user, held to the route's permission from ROUTE_PERMISSIONS and to the rate limit."""
    token = request.cookies.get(COOKIE)

    def load() -> ConsoleUser | None:
        with session_scope(gateway.database_url) as session:
            return load_session(session, token, _policy(gateway))

    user = await asyncio.to_thread(load) if token else None
    if user is None:
        raise SignInNeeded()
    gateway.authorize_route(user.principal, request.method, route_path(request.scope))
    return user


async def audit(gateway: GatewayState, operation: str, principal: Principal | None, *, model: str | None = None,
                version: str | None = None, subject: uuid.UUID | str | None = None, status: int = 200,
                error: MedserveError | None = None, record_id: uuid.UUID | None = None) -> uuid.UUID:
    """One audit record for a console event (console.sign_in, console.view, review.decision).

    ``subject``: the result it concerns, kept as the sha256 of its id in input_sha256 (the record holds
    digests only; find the views of a result by the digest of its id). Not counted as an inference request.
    """
    scope = AuditScope(operation=operation, model_name=model, id=record_id)
    scope.principal = principal
    scope.input_sha256 = sha256_hex(str(subject)) if subject is not None else None
    record = scope.to_record(error.http_status if error else status, error.code if error else None,
                             "ok" if error is None else ("denied" if isinstance(error, (
                                 AuthenticationError, PermissionDeniedError, NotFoundError)) else "error"))
    record["model_version"] = version
    try:
        await gateway.recorder.write(record)
    except AuditUnavailableError:
        logger.error("audit record %s of a console event could not be written", record["id"])
        raise
    return scope.id


def _error_page(error: MedserveError, user: ConsoleUser | None) -> HTMLResponse:
    return render("error.html", status=error.http_status, user=user, code=error.code, message=error.message,
                  title=f"{error.http_status} {error.code}")


Handler = Callable[..., Awaitable[Response]]


async def guarded(request: Request, gateway: GatewayState, handler: Handler, **kwargs: Any) -> Response:
    """Runs a signed-in page: a missing session goes to sign-in (pages) or 401 (posts); errors as HTML pages."""
    user = None
    try:
        user = await _user(gateway, request)
        return await handler(request, gateway, user, **kwargs)
    except SignInNeeded:
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/console/login?next={quote(target, safe='')}", status_code=303,
                                    headers=SECURITY_HEADERS)
        return _error_page(AuthenticationError("sign in to the review console first"), None)
    except MedserveError as error:
        return _error_page(error, user)


def _context(user: ConsoleUser, **extra: Any) -> dict[str, Any]:
    principal = user.principal
    return {"user": user, "csrf": user.csrf, "can_review": has_permission(principal.role, Permission.REVIEW),
            **extra}


def _next_url(value: str | None) -> str:
    """Only a path inside the console (never another site) after sign-in; the console's front page otherwise."""
    try:
        return checked_return_to(value or "")
    except InvalidReturnToError:
        return CONSOLE_PREFIX


# --- sign-in ---------------------------------------------------------------------------


def _login_page(gateway: GatewayState, request: Request, *, status: int = 200, message: str | None = None,
                code: str | None = None) -> HTMLResponse:
    nonce = secrets.token_urlsafe(24)
    response = render("login.html", status=status, csrf=nonce, message=message, code=code,
                      next=_next_url(request.query_params.get("next")), oidc=oidc_configured(gateway),
                      title="Sign in")
    _set_cookie(response, gateway, request, LOGIN_COOKIE, nonce, path="/console/login", max_age=600)
    return response


@router.get("/console/login")
async def login_form(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    """The sign-in page: an API key form, and the identity provider's button when OIDC sign-in is configured."""
    return _login_page(gateway, request)


async def begin_session(gateway: GatewayState, request: Request, principal: Principal, method: str,
                        next_url: str, *, landing: bool = False) -> Response:
    """Admit the principal, start a fresh session (ending any the browser held) and set its cookie.

    ``landing``: answer a page that moves on to ``next_url`` itself instead of a redirect. After the identity
    provider's cross-site redirect, a redirect would still count as cross-site and the browser would hold
    back the SameSite=Strict cookie; a page of our own that moves on is a same-site navigation.
    """
    old = request.cookies.get(COOKIE)

    def start() -> tuple[str, uuid.UUID]:
        with session_scope(gateway.database_url) as session:
            end_session(session, old)  # no session fixation: a sign-in always gets a new secret
            token, row = start_session(session, principal, method, _policy(gateway))
            return token, row.id

    token, session_id = await asyncio.to_thread(start)
    await audit(gateway, "console.sign_in", principal, subject=session_id)
    response: Response
    if landing:
        response = render("signed_in.html", next=next_url, title="Signed in", user=None)
    else:
        response = RedirectResponse(next_url, status_code=303, headers=SECURITY_HEADERS)
    _set_cookie(response, gateway, request, COOKIE, token, path="/console",
                max_age=int(gateway.settings.console_session_max_hours * 3600))
    _forget(response, gateway, request, LOGIN_COOKIE, path="/console/login")
    return response


@router.post("/console/login")
async def login(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    """Sign in with an API key (form post): clinicians and auditors only."""
    form = await _form(gateway, request)
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or not secrets.compare_digest(nonce.encode(), form.get("csrf", "").encode()):
        error: MedserveError = CsrfTokenError()
        return _login_page(gateway, request, status=error.http_status, message=error.message, code=error.code)
    principal = None
    try:
        principal = await gateway.authenticator.authenticate(f"Bearer {form.get('api_key', '').strip()}")
        admit(principal)
    except (AuthenticationError, PermissionDeniedError) as refused:
        if principal is not None:
            await audit(gateway, "console.sign_in", principal, error=refused)
        message = ("This key was not accepted: check it and try again." if isinstance(refused, AuthenticationError)
                   else f"A {principal.role.value if principal else ''} key cannot sign in to the review console: "
                        "only clinician and auditor keys can. Clinical applications use the API.")
        return _login_page(gateway, request, status=refused.http_status, message=message, code=refused.code)
    return await begin_session(gateway, request, principal, "api_key", _next_url(form.get("next")))


@router.post("/console/logout")
async def logout_route(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await guarded(request, gateway, logout)


async def logout(request: Request, gateway: GatewayState, user: ConsoleUser) -> Response:
    """End the session server-side (the cookie is refused from now on) and forget it in the browser."""
    check_csrf(user, (await _form(gateway, request)).get("csrf"))

    def end() -> None:
        with session_scope(gateway.database_url) as session:
            end_session(session, user.token)

    await asyncio.to_thread(end)
    response = RedirectResponse("/console/login", status_code=303, headers=SECURITY_HEADERS)
    _forget(response, gateway, request, COOKIE, path="/console")
    return response


# --- sign-in with the hospital's identity provider (OIDC authorization code + PKCE) ----------------

PENDING_COOKIE = "medserve_console_oidc"  # the sign-in in flight, signed; only until the provider sends the user back
PENDING_PATH = "/console/login/oidc"
_logins: "weakref.WeakKeyDictionary[GatewayState, OIDCLogin]" = weakref.WeakKeyDictionary()


def oidc_login(gateway: GatewayState) -> OIDCLogin | None:
    """The gateway's OIDC sign-in when configured (issuer, client id and redirect URL), else None."""
    login = _logins.get(gateway)
    if login is None:
        login = _logins[gateway] = OIDCLogin(gateway.settings)
    return login if login.enabled else None


def oidc_configured(gateway: GatewayState) -> bool:
    """Whether the sign-in page offers the hospital's identity provider (OIDC sign-in is configured)."""
    return oidc_login(gateway) is not None


def _pending_key(gateway: GatewayState) -> bytes:
    # A key of its own, derived from the gateway's pseudonym key (never used as is for anything else here).
    return hmac.new(gateway.recorder.pseudonym_key, b"medserve-console-oidc-pending-v1", hashlib.sha256).digest()


def seal_pending(gateway: GatewayState, pending: PendingLogin) -> str:
    payload = base64.urlsafe_b64encode(pending.to_json().encode()).decode().rstrip("=")
    signature = hmac.new(_pending_key(gateway), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{signature}"


def open_pending(gateway: GatewayState, sealed: str | None) -> PendingLogin:
    """The PendingLogin of a sealed cookie; OIDCStateMismatchError when it is missing, altered or not ours."""
    payload, _, signature = (sealed or "").partition(".")
    expected = hmac.new(_pending_key(gateway), payload.encode(), hashlib.sha256).hexdigest()
    if not payload or not hmac.compare_digest(signature.encode(), expected.encode()):
        raise OIDCStateMismatchError()
    try:
        text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise OIDCStateMismatchError() from None
    return PendingLogin.from_json(text)


@router.get("/console/login/oidc")
async def oidc_begin(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    """Send the browser to the identity provider (PKCE); what to check on its return goes in a signed cookie."""
    login = oidc_login(gateway)
    if login is None:
        return _error_page(NotFoundError("sign-in with an identity provider is not configured"), None)
    try:
        url, pending = await asyncio.to_thread(login.begin, _next_url(request.query_params.get("next")))
    except MedserveError as error:
        return _login_page(gateway, request, status=error.http_status, message=error.message, code=error.code)
    response = RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)
    # Lax, not Strict: the provider sends the browser back with a cross-site navigation, which must carry it.
    _set_cookie(response, gateway, request, PENDING_COOKIE, seal_pending(gateway, pending), path=PENDING_PATH,
                max_age=600, same_site="lax")
    return response


@router.get("/console/login/oidc/callback")
async def oidc_callback(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    """The provider's redirect back: exchange the code (PKCE), verify the ID token, start the same session."""
    login = oidc_login(gateway)
    if login is None:
        return _error_page(NotFoundError("sign-in with an identity provider is not configured"), None)
    params = request.query_params
    principal = None
    try:
        if params.get("error"):
            raise AuthenticationError("the identity provider did not sign you in")
        pending = open_pending(gateway, request.cookies.get(PENDING_COOKIE))
        principal = await login.complete(code=params.get("code", ""), state=params.get("state", ""), pending=pending)
        admit(principal)
    except MedserveError as refused:
        if principal is not None:
            await audit(gateway, "console.sign_in", principal, error=refused)
        message = (f"A {principal.role.value} account cannot sign in to the review console: only clinicians and "
                   "auditors can." if principal is not None else refused.message)
        response = _login_page(gateway, request, status=refused.http_status, message=message, code=refused.code)
        _forget(response, gateway, request, PENDING_COOKIE, path=PENDING_PATH, same_site="lax")
        return response
    response = await begin_session(gateway, request, principal, "oidc", pending.return_to, landing=True)
    _forget(response, gateway, request, PENDING_COOKIE, path=PENDING_PATH, same_site="lax")
    return response


# --- pages -----------------------------------------------------------------------------


@router.get("/console")
async def queue_route(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await guarded(request, gateway, queue)


async def queue(request: Request, gateway: GatewayState, user: ConsoleUser) -> Response:
    """The pending queue, oldest first; filters: department (auditors and unbound keys), model, age."""
    params = request.query_params
    model = params.get("model") or None
    age = params.get("age") if params.get("age") in AGES else None
    bound = user.principal.department
    department = bound if bound is not None else (params.get("department") or None)

    def query() -> list[dict[str, Any]]:
        with session_scope(gateway.database_url) as session:
            return pending_results(session, model, QUEUE_LIMIT, department=department)

    items = older_than(await asyncio.to_thread(query), age)
    for item in items:
        item["waited"] = waited(item["created_at"])
    # The filter offers the models this gateway serves (no count over the whole trail for a drop-down).
    models = sorted({entry.model_name for entry in gateway.catalog.entries()} | ({model} if model else set()))
    return render("queue.html", **_context(
        user, items=items, title=f"({len(items)}) Review queue", model=model, age=age, ages=list(AGES),
        department=department, department_bound=bound is not None, models=models, limited=len(items) >= QUEUE_LIMIT))


@router.get("/console/results/{result_id}")
async def result_route(request: Request, result_id: str, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await guarded(request, gateway, result, result_id=result_id)


async def result(request: Request, gateway: GatewayState, user: ConsoleUser, result_id: str) -> Response:
    """One result: the AI draft, its provenance, and the decision form. Every view is audited."""
    parsed = parse_id(result_id)
    try:
        if parsed is None:
            raise NotFoundError("no stored report or reviewable result has this id")

        def query() -> tuple[dict[str, Any], dict[str, Any]]:
            with session_scope(gateway.database_url) as session:
                view = report_view(session, parsed, user.principal)
                return view, draft(session, view)

        view, shown = await asyncio.to_thread(query)
    except MedserveError as error:
        await audit(gateway, "console.view", user.principal, subject=result_id, error=error)
        raise
    await audit(gateway, "console.view", user.principal, model=view["model"], version=view["model_version"],
                subject=parsed)
    notice = request.query_params.get("done")
    return render("result.html", **_context(
        user, view=view, draft=shown, title=f"{view['model']} {view['model_version']} result",
        notice=notice if notice in ("accept", "edit", "reject") else None,
        pending=view.get("review") is None and view["operation"] != "pipeline.run"))


def decision_of(form: dict[str, str]) -> ReviewRequest:
    """The review request a decision form describes (validated by the same model as the API's body)."""
    decision = form.get("decision", "")
    body: dict[str, Any] = {"decision": decision, "comment": form.get("comment", "").strip() or None}
    if decision == "edit":
        if "edited_text" in form:
            body["edited_text"] = form["edited_text"]
        else:
            finding: dict[str, Any] = {}
            for name in ("code", "label", "unit", "interpretation"):
                if form.get(name, "").strip():
                    finding[name] = form[name].strip()
            if form.get("value", "").strip():
                try:
                    finding["value"] = float(form["value"])
                except ValueError:
                    raise RequestValidationFailed("the corrected value is not a number", fields=["value"]) from None
            if form.get("flag") in ("yes", "no"):
                finding["flag"] = form["flag"] == "yes"
            body["corrected_finding"] = finding
    try:
        return ReviewRequest.model_validate(body)
    except ValidationError as error:
        fields = [".".join(str(p) for p in item["loc"]) or "decision" for item in error.errors()]
        raise RequestValidationFailed(
            "edit needs a corrected finding or text and a reason; reject needs a reason", fields=fields[:20]
        ) from None


@router.post("/console/results/{result_id}/decision")
async def decide_route(request: Request, result_id: str, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await guarded(request, gateway, decide, result_id=result_id)


async def decide(request: Request, gateway: GatewayState, user: ConsoleUser, result_id: str) -> Response:
    """Accept, edit or reject through record_review, as the API does, with the session and an audit record.
    A refused attempt (no CSRF token, an invalid form, another department's result) is audited too."""
    parsed = parse_id(result_id)
    record_id = new_record_id()
    try:
        form = await _form(gateway, request)
        check_csrf(user, form.get("csrf"))
        if parsed is None:
            raise NotFoundError("no inference has this id")
        decision = decision_of(form)

        def store() -> dict[str, Any]:
            with session_scope(gateway.database_url) as session:
                return record_review(session, parsed, decision, user.principal, via="console",
                                     session_id=user.session_id, audit_id=record_id,
                                     authorize=model_access(gateway, user.principal))

        review = await asyncio.to_thread(store)
    except MedserveError as error:
        await audit(gateway, "review.decision", user.principal, subject=parsed or result_id, error=error)
        raise
    await audit(gateway, "review.decision", user.principal, model=review["model"], version=review["model_version"],
                subject=parsed, record_id=record_id)
    return RedirectResponse(f"/console/results/{parsed}?done={review['decision']}", status_code=303,
                            headers=SECURITY_HEADERS)


@router.get("/console/overrides")
async def overrides_route(request: Request, gateway: GatewayState = Depends(get_gateway)) -> Response:
    return await guarded(request, gateway, overrides)


async def overrides(request: Request, gateway: GatewayState, user: ConsoleUser) -> Response:
    """Override rate per model version (what a model owner reads before promoting a canary), with a chart."""
    model = request.query_params.get("model") or None

    def query() -> list[dict[str, Any]]:
        with session_scope(gateway.database_url) as session:
            return override_summary(session, model, department=user.principal.department)

    summary = await asyncio.to_thread(query)
    return render("overrides.html", **_context(user, summary=summary, chart=chart(summary), model=model,
                                               title="Override rates"))


@functools.cache
def _static_content(file_name: str) -> bytes:
    """A file of the package's static/ folder, read once (they do not change while the gateway runs)."""
    return resources.files("medserve.console").joinpath("static", file_name).read_bytes()


@router.get("/console/static/{file_name}")
async def static(file_name: str) -> Response:
    """The console's own stylesheet and script (shipped in the package; nothing from a CDN)."""
    media_type = STATIC_FILES.get(file_name)
    if media_type is None:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(_static_content(file_name), media_type=media_type,
                    headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})
