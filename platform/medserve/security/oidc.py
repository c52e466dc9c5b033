"""Hospital identity: OIDC JWT bearer tokens from the hospital's identity provider.

The gateway verifies the signature against the provider's JWKS (a file, which
works offline, or a URL it fetches and caches), then issuer, audience and
expiry. The role and department come from configurable claims. A JWT caller
gets a stable, non-secret caller id derived from (issuer, subject), so audit
rows of one person line up across tokens without storing the token.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt

from medserve.errors import AuthenticationError, ConfigurationError, PermissionDeniedError
from medserve.security.api_keys import Principal
from medserve.security.roles import Role
from medserve.settings import Settings

CALLER_ID_PREFIX = "oidc-"
MIN_REFETCH_S = 30.0


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("msk_")


def caller_id(issuer: str, subject: str) -> str:
    """Stable id for audit rows (fits the 32-character api_key_id column); not reversible to the subject."""
    return CALLER_ID_PREFIX + hashlib.sha256(f"{issuer}\x00{subject}".encode()).hexdigest()[:24]


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class OIDCVerifier:
    """Verifies JWTs for one issuer; thread-safe JWKS cache."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | None,
        jwks_file: str | None = None,
        jwks_url: str | None = None,
        jwks_cache_seconds: float = 300.0,
        algorithms: list[str] | None = None,
        roles_claim: str = "roles",
        department_claim: str = "department",
        leeway_s: float = 30.0,
    ) -> None:
        if not (jwks_file or jwks_url):
            raise ConfigurationError("OIDC needs a JWKS file or URL")
        self.issuer = issuer
        self.audience = audience
        self._jwks_file = jwks_file
        self._jwks_url = jwks_url
        self._cache_seconds = jwks_cache_seconds
        self._algorithms = algorithms or ["RS256"]
        self._roles_claim = roles_claim
        self._department_claim = department_claim
        self._leeway = leeway_s
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")

    # --- keys ----------------------------------------------------------------

    def _load_jwks(self) -> dict[str, Any]:
        if self._jwks_file:
            return json.loads(Path(self._jwks_file).read_text())
        response = httpx.get(self._jwks_url or "", timeout=5.0)
        response.raise_for_status()
        return response.json()

    def _refresh(self) -> None:
        try:
            jwk_set = jwt.PyJWKSet.from_dict(self._load_jwks())
        except Exception:  # noqa: BLE001 - unreachable IdP, malformed JWKS: keep the old keys
            if not self._keys:
                raise AuthenticationError("the identity provider's keys are unavailable") from None
            return
        self._keys = {key.key_id or "": key for key in jwk_set.keys}
        self._fetched_at = time.monotonic()

    def _signing_key(self, kid: str | None) -> Any:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            unknown_kid = (kid or "") not in self._keys and not (kid is None and len(self._keys) == 1)
            # A new kid may mean the provider rotated keys: refetch, but at most
            # every MIN_REFETCH_S so tokens with made-up kids cannot flood the IdP.
            if age > self._cache_seconds or (unknown_kid and age > MIN_REFETCH_S):
                self._refresh()
            key = self._keys.get(kid or "")
            if key is None and kid is None and len(self._keys) == 1:
                key = next(iter(self._keys.values()))
        if key is None:
            raise AuthenticationError()
        return key.key

    # --- tokens ----------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; AuthenticationError (401) for any invalid one."""
        return self.principal_from_claims(self.decode(token, audience=self.audience))

    def decode(self, token: str, *, audience: str | None, require: tuple[str, ...] = ()) -> dict[str, Any]:
        """The claims of a token signed by this issuer's keys, for this audience and not expired.

        Bearer tokens use the gateway's audience; the console's ID tokens use its
        client id (security/oidc_login.py). AuthenticationError for any invalid one.
        """
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self._algorithms:
                raise AuthenticationError()
            return jwt.decode(
                token,
                self._signing_key(header.get("kid")),
                algorithms=self._algorithms,
                audience=audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "sub", *(["aud"] if audience else []), *require]},
            )
        except jwt.PyJWTError:
            raise AuthenticationError() from None

    def principal_from_claims(self, claims: dict[str, Any]) -> Principal:
        raw_roles = _claim(claims, self._roles_claim)
        if isinstance(raw_roles, str):
            raw_roles = raw_roles.split()
        known = {role.value for role in Role}
        roles = [r for r in (raw_roles or []) if isinstance(r, str) and r in known]
        if not roles:
            # Authenticated, but the hospital granted no medserve role.
            raise PermissionDeniedError("the token carries no medserve role", claim=self._roles_claim)
        department = _claim(claims, self._department_claim)
        department = str(department)[:100] if isinstance(department, (str, int)) and department != "" else None
        subject = str(claims["sub"])
        return Principal(
            key_id=caller_id(self.issuer, subject),
            name=f"oidc {subject}"[:200],
            role=Role(roles[0]),
            department=department,
        )


def verifier_from_settings(settings: Settings) -> OIDCVerifier | None:
    """The verifier the MEDSERVE_OIDC_* settings describe; None when no issuer is set."""
    if not settings.oidc_issuer:
        return None
    return OIDCVerifier(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        jwks_file=settings.oidc_jwks_file,
        jwks_url=settings.oidc_jwks_url,
        jwks_cache_seconds=settings.oidc_jwks_cache_seconds,
        algorithms=settings.oidc_algorithms,
        roles_claim=settings.oidc_roles_claim,
        department_claim=settings.oidc_department_claim,
        leeway_s=settings.oidc_leeway_s,
    )
