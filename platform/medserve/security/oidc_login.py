"""Browser sign-in with the hospital identity provider: OAuth 2.0 authorization code with PKCE.

The review console calls :class:`OIDCLogin`: ``begin`` gives the URL to send the
browser to and a :class:`PendingLogin` the console keeps (server-side, or in a
short-lived signed cookie); the provider sends the browser back to the console's
callback with a code and the state, and ``complete`` exchanges the code (with the
PKCE verifier, and the client secret for a confidential client), verifies the ID
token against the same JWKS the gateway uses for bearer JWTs, and maps it to a
:class:`Principal` exactly as a bearer JWT would be (same role and department
claims, same caller id). What that principal may do is the console's decision.

Endpoints come from ``<issuer>/.well-known/openid-configuration`` (cached; its
``issuer`` must be the configured one) unless both are set explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from urllib.parse import quote, unquote, urlencode, urlsplit

import httpx

from medserve.errors import (
    AuthenticationError, ConfigurationError, InvalidReturnToError, OIDCDiscoveryError, OIDCIdTokenInvalidError,
    OIDCLoginExpiredError, OIDCStateMismatchError, OIDCTokenExchangeError,
)
from medserve.security.api_keys import Principal
from medserve.security.oidc import OIDCVerifier, verifier_from_settings
from medserve.settings import Settings

PENDING_LOGIN_MAX_AGE_S = 600.0
DISCOVERY_CACHE_S = 3600.0
HTTP_TIMEOUT_S = 10.0
CONSOLE_PREFIX = "/console"
# OAuth error codes are ASCII words (RFC 6749 5.2); anything else from the provider is not repeated.
_OAUTH_ERROR = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class PendingLogin:
    """One sign-in in flight: what the console keeps between ``begin`` and ``complete``."""

    state: str
    nonce: str
    code_verifier: str
    return_to: str
    created_at: float  # time.time() of begin

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PendingLogin":
        try:
            data = json.loads(text)
            fields = {name: data[name] for name in ("state", "nonce", "code_verifier", "return_to")}
            created_at = data["created_at"]
        except (ValueError, TypeError, KeyError):
            raise OIDCStateMismatchError() from None
        if (set(data) != {*fields, "created_at"} or not all(isinstance(v, str) and v for v in fields.values())
                or isinstance(created_at, bool) or not isinstance(created_at, (int, float))):
            raise OIDCStateMismatchError()
        return cls(created_at=float(created_at), **fields)


def checked_return_to(return_to: str) -> str:
    """``return_to`` when it is a path of the console on this gateway; InvalidReturnToError otherwise."""
    parts = urlsplit(return_to)
    path = unquote(parts.path)
    if (
        len(return_to) > 2000
        or parts.scheme or parts.netloc or parts.fragment
        or (return_to != CONSOLE_PREFIX and not return_to.startswith((CONSOLE_PREFIX + "/", CONSOLE_PREFIX + "?")))
        or any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in return_to + path)
        or any(segment in (".", "..") for segment in path.split("/"))
    ):
        raise InvalidReturnToError()
    return return_to


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode("ascii")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class OIDCLogin:
    """The console's sign-in with the configured issuer (one per gateway replica; thread-safe)."""

    def __init__(self, settings: Settings, verifier: OIDCVerifier | None = None) -> None:
        self._settings = settings
        self._issuer = settings.oidc_issuer
        self._client_id = settings.oidc_client_id
        self._secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
        self._redirect_url = settings.oidc_redirect_url
        self._verifier = verifier
        if self.enabled and verifier is None:
            self._verifier = verifier_from_settings(settings)
        if self._verifier is not None and self.enabled and self._verifier.issuer != self._issuer:
            raise ConfigurationError("the OIDC verifier belongs to another issuer")
        self._endpoints: tuple[str, str] | None = None
        if settings.oidc_authorization_endpoint and settings.oidc_token_endpoint:
            self._endpoints = (settings.oidc_authorization_endpoint, settings.oidc_token_endpoint)
        self._discovered_at = float("-inf")
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._issuer and self._client_id and self._redirect_url)

    def _require_enabled(self) -> None:
        if not self.enabled:
            missing = [f"MEDSERVE_OIDC_{name.upper()}" for name, value in
                       (("issuer", self._issuer), ("client_id", self._client_id), ("redirect_url", self._redirect_url))
                       if not value]
            raise ConfigurationError("sign-in with the identity provider is not configured", missing=missing)

    # --- provider metadata ---------------------------------------------------------

    def _discover(self) -> tuple[str, str]:
        """(authorization endpoint, token endpoint): explicit settings, or the cached discovery document."""
        if self._settings.oidc_authorization_endpoint and self._endpoints is not None:
            return self._endpoints
        with self._lock:
            if self._endpoints is not None and time.monotonic() - self._discovered_at < DISCOVERY_CACHE_S:
                return self._endpoints
            url = (self._issuer or "").rstrip("/") + "/.well-known/openid-configuration"
            try:
                response = httpx.get(url, timeout=HTTP_TIMEOUT_S)
                response.raise_for_status()
                document = response.json()
                endpoints = (document["authorization_endpoint"], document["token_endpoint"])
                issuer = document["issuer"]
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                if self._endpoints is not None:  # provider briefly away: keep the last good document
                    return self._endpoints
                raise OIDCDiscoveryError(reason="unavailable") from None
            if issuer != self._issuer:
                raise OIDCDiscoveryError("the discovery document names another issuer", reason="issuer_mismatch")
            if not all(isinstance(e, str) and e.startswith(("https://", "http://")) for e in endpoints):
                raise OIDCDiscoveryError(reason="invalid_endpoint")
            self._endpoints, self._discovered_at = endpoints, time.monotonic()
            return endpoints

    # --- the flow --------------------------------------------------------------------

    def begin(self, return_to: str) -> tuple[str, PendingLogin]:
        """The provider's authorization URL to redirect the browser to, and what to keep until it comes back.

        The first call (and one an hour after) may fetch the discovery document: from an
        async route, call it as ``await asyncio.to_thread(login.begin, return_to)``.
        """
        self._require_enabled()
        pending = PendingLogin(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(64),  # 86 characters: within RFC 7636's 43..128
            return_to=checked_return_to(return_to),
            created_at=time.time(),
        )
        authorization_endpoint, _ = self._discover()
        query = urlencode({
            "response_type": "code",
            "client_id": self._client_id,
            "redirect_uri": self._redirect_url,
            "scope": self._settings.oidc_scopes,
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": _s256(pending.code_verifier),
            "code_challenge_method": "S256",
        })
        separator = "&" if urlsplit(authorization_endpoint).query else "?"
        return f"{authorization_endpoint}{separator}{query}", pending

    async def complete(self, *, code: str, state: str, pending: PendingLogin) -> Principal:
        """The signed-in principal, from the code and state the provider sent the browser back with."""
        self._require_enabled()
        if not _same(state, pending.state):
            raise OIDCStateMismatchError()
        age = time.time() - pending.created_at
        if not -60.0 <= age <= PENDING_LOGIN_MAX_AGE_S:
            raise OIDCLoginExpiredError(max_age_s=PENDING_LOGIN_MAX_AGE_S)
        checked_return_to(pending.return_to)
        if not code:
            raise OIDCTokenExchangeError(idp_error="invalid_request")
        _, token_endpoint = await asyncio.to_thread(self._discover)
        id_token = await self._exchange(token_endpoint, code, pending.code_verifier)
        return await asyncio.to_thread(self._principal, id_token, pending.nonce)

    async def _exchange(self, token_endpoint: str, code: str, code_verifier: str) -> str:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self._redirect_url,
                "code_verifier": code_verifier}
        headers = {"Accept": "application/json"}
        if self._secret is None:
            form["client_id"] = self._client_id or ""
        else:  # client_secret_basic: both parts form-encoded first (RFC 6749 2.3.1)
            pair = f"{quote(self._client_id or '', safe='')}:{quote(self._secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
                response = await client.post(token_endpoint, data=form, headers=headers)
        except httpx.HTTPError:
            raise OIDCTokenExchangeError(reason="unreachable") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("id_token"), str):
            error = body.get("error") if isinstance(body, dict) else None
            # Only the provider's OAuth error code goes on; its description can name the user or the client.
            if isinstance(error, str) and _OAUTH_ERROR.fullmatch(error):
                raise OIDCTokenExchangeError(idp_error=error)
            raise OIDCTokenExchangeError(status=response.status_code)
        return body["id_token"]

    def _principal(self, id_token: str, nonce: str) -> Principal:
        assert self._verifier is not None
        try:
            claims = self._verifier.decode(id_token, audience=self._client_id, require=("iat", "nonce"))
        except AuthenticationError:
            raise OIDCIdTokenInvalidError() from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        # OIDC Core 3.1.3.7: with more than one audience, the authorized party must be this client.
        if len(audiences) > 1 and claims.get("azp") != self._client_id:
            raise OIDCIdTokenInvalidError(claim="azp")
        if not isinstance(claims["nonce"], str) or not _same(claims["nonce"], nonce):
            raise OIDCIdTokenInvalidError(claim="nonce")
        return self._verifier.principal_from_claims(claims)
