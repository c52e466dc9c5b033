"""Who is calling: API keys from the gateway's last-known-good key table, JWTs from the hospital's IdP.

The key table (every key not revoked) is reloaded in the background every
``api_key_cache_seconds`` (gateway/known_state.py), so checking a key never
waits on the database and a database outage does not lock clinical apps
out. A revoked key stops working at the next successful reload: within
that interval of the revocation, or of the database's return when it was
down. A key created since the last reload is looked up on its own; if the
database cannot answer that, the caller gets 503 database_unavailable.
JWTs are verified on every request (no cache).
"""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import SQLAlchemyError

from medserve.db.engine import session_scope
from medserve.errors import AuthenticationError, DatabaseUnavailableError, PermissionDeniedError
from medserve.gateway.known_state import KnownState
from medserve.security.api_keys import KeyTable, Principal, load_key_table, verify_api_key
from medserve.security.oidc import OIDCVerifier, looks_like_jwt
from medserve.security.roles import Permission, has_permission


class Authenticator:
    """API keys (``msk_...``) from the key table; JWTs from the hospital IdP when OIDC is configured."""

    def __init__(self, database_url: str, refresh_seconds: float, oidc: OIDCVerifier | None = None) -> None:
        self._database_url = database_url
        self._oidc = oidc
        self.keys: KnownState[KeyTable] = KnownState("keys", self._load_table, refresh_seconds)

    def _load_table(self) -> KeyTable:
        with session_scope(self._database_url) as session:
            return load_key_table(session)

    def _lookup(self, presented: str) -> Principal:
        try:
            with session_scope(self._database_url) as session:
                return verify_api_key(session, presented)
        except SQLAlchemyError:
            raise DatabaseUnavailableError(state="keys") from None

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthenticationError()
        presented = authorization[7:].strip()
        if self._oidc is not None and looks_like_jwt(presented):
            # Not cached: verifying a signature is cheap and expiry must bite on time.
            return await asyncio.to_thread(self._oidc.verify, presented)
        table = await self.keys.get()
        principal = table.verify(presented)
        if principal is None:  # created since the table was loaded, or unknown
            principal = await asyncio.to_thread(self._lookup, presented)
        return principal


def require(principal: Principal, permission: Permission) -> None:
    if not has_permission(principal.role, permission):
        raise PermissionDeniedError(required=permission.value, role=principal.role.value)


def require_department(principal: Principal, allowed: list[str], model_name: str) -> None:
    """Object-level check: a department-bound key reaches only its department's models."""
    if allowed and principal.department not in allowed:
        raise PermissionDeniedError("this model is not open to your department", model=model_name)
