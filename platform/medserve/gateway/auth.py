"""Bearer-key authentication with a short per-replica cache.

Looking a key up costs a database round trip; the gateway does it at most
once per key per ``api_key_cache_seconds`` (a revoked key stops working
within that window). Failures are never cached as successes. JWTs from the
hospital's identity provider are verified on every request (no cache).
"""

from __future__ import annotations

import asyncio
import time

from medserve.db.engine import session_scope
from medserve.errors import AuthenticationError, PermissionDeniedError
from medserve.security.api_keys import Principal, verify_api_key
from medserve.security.oidc import OIDCVerifier, looks_like_jwt
from medserve.security.roles import Permission, has_permission


class Authenticator:
    """API keys (``msk_...``) from the database; JWTs from the hospital IdP when OIDC is configured."""

    def __init__(self, database_url: str, cache_seconds: float, oidc: OIDCVerifier | None = None) -> None:
        self._database_url = database_url
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._oidc = oidc

    def _lookup(self, presented: str) -> Principal:
        with session_scope(self._database_url) as session:
            return verify_api_key(session, presented)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthenticationError()
        presented = authorization[7:].strip()
        if self._oidc is not None and looks_like_jwt(presented):
            # Not cached: verifying a signature is cheap and expiry must bite on time.
            return await asyncio.to_thread(self._oidc.verify, presented)
        cached = self._cache.get(presented)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        principal = await asyncio.to_thread(self._lookup, presented)
        if self._cache_seconds > 0:
            if len(self._cache) > 10_000:  # bound memory under key-guessing floods
                self._cache.clear()
            self._cache[presented] = (now, principal)
        return principal


def require(principal: Principal, permission: Permission) -> None:
    if not has_permission(principal.role, permission):
        raise PermissionDeniedError(required=permission.value, role=principal.role.value)


def require_department(principal: Principal, allowed: list[str], model_name: str) -> None:
    """Object-level check: a department-bound key reaches only its department's models."""
    if allowed and principal.department not in allowed:
        raise PermissionDeniedError("this model is not open to your department", model=model_name)
