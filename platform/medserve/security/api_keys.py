"""Bearer API keys: created once, shown once, stored as a hash.

A key reads ``msk_<key_id>_<secret>``. The key id is public (it appears in
audit rows); the secret is 256 random bits, so a plain sha256 is enough to
store it safely: there is nothing to brute-force that a slow hash would
protect better, and the gateway checks keys on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from medserve.db.models import ApiKey, utcnow
from medserve.errors import AuthenticationError, BadRequestError
from medserve.security.roles import Role

KEY_PREFIX = "msk"

KeyState = Literal["active", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    key_id: str
    name: str
    role: Role
    department: str | None
    # This key's own request rate (requests per second); None: the install's default, 0: no limit.
    rate_limit_rps: float | None = None


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(presented: str) -> tuple[str, str]:
    """Key id and secret of a presented key; raises AuthenticationError if malformed."""
    parts = presented.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise AuthenticationError()
    return parts[1], parts[2]


def create_api_key(
    session: Session,
    *,
    name: str,
    role: Role | str,
    department: str | None = None,
    expires_at: datetime | None = None,
    rate_limit_rps: float | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its plaintext (the only time it exists).

    ``rate_limit_rps``: this key's own request rate; None keeps the install's
    default, 0 lifts the limit.
    """
    _check_rate_limit(rate_limit_rps)
    try:
        role = Role(role)
    except ValueError:
        raise BadRequestError(f"unknown role {role!r}", allowed=[r.value for r in Role]) from None
    if not name.strip():
        raise BadRequestError("a key needs a name")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32).replace("_", "-")  # '_' separates the parts
    row = ApiKey(
        key_id=key_id,
        secret_sha256=_hash_secret(secret),
        name=name.strip(),
        role=role.value,
        department=department,
        expires_at=expires_at,
        rate_limit_rps=rate_limit_rps,
    )
    session.add(row)
    session.flush()
    return row, f"{KEY_PREFIX}_{key_id}_{secret}"


def verify_api_key(session: Session, presented: str, now: datetime | None = None) -> Principal:
    """The principal of a presented key, or AuthenticationError (same error for every failure)."""
    key_id, secret = split_key(presented)
    row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    if row is None or not hmac.compare_digest(row.secret_sha256, _hash_secret(secret)):
        raise AuthenticationError()
    if _state(row, now or utcnow()) != "active":
        raise AuthenticationError()
    return Principal(key_id=row.key_id, name=row.name, role=Role(row.role), department=row.department,
                     rate_limit_rps=row.rate_limit_rps)


@dataclass(frozen=True, slots=True)
class KnownKey:
    """A usable key as a gateway holds it between refreshes: its hash, caller and expiry."""

    secret_sha256: str
    principal: Principal
    expires_at: datetime | None


class KeyTable:
    """Every key that is not revoked, loaded in one query: the gateway checks keys against this copy.

    A key revoked in the database is absent from the next copy, so revocation
    takes effect at the gateway's next successful refresh. A key created since
    the copy was loaded is not in it: :meth:`verify` says so (None) and the
    caller looks that one key up in the database.
    """

    _MAX_VERIFIED = 10_000  # bounds the memo under key-guessing floods

    def __init__(self, keys: dict[str, KnownKey]) -> None:
        self._keys = keys
        # Presented key -> its entry, once its hash matched: later requests skip the hash.
        self._verified: dict[str, KnownKey] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, presented: str, now: datetime | None = None) -> Principal | None:
        """The caller of a key in this copy, AuthenticationError for a bad or expired one, None if absent."""
        known = self._verified.get(presented)
        if known is None:
            key_id, secret = split_key(presented)
            known = self._keys.get(key_id)
            if known is None:
                return None
            if not hmac.compare_digest(known.secret_sha256, _hash_secret(secret)):
                raise AuthenticationError()
            if len(self._verified) < self._MAX_VERIFIED:
                self._verified[presented] = known
        if known.expires_at is not None and known.expires_at <= (now or utcnow()):
            raise AuthenticationError()
        return known.principal


def load_key_table(session: Session) -> KeyTable:
    rows = session.execute(
        select(ApiKey.key_id, ApiKey.secret_sha256, ApiKey.name, ApiKey.role, ApiKey.department, ApiKey.expires_at,
               ApiKey.rate_limit_rps)
        .where(ApiKey.revoked_at.is_(None))
    )
    return KeyTable({
        key_id: KnownKey(secret, Principal(key_id=key_id, name=name, role=Role(role), department=department,
                                           rate_limit_rps=rate), expires)
        for key_id, secret, name, role, department, expires, rate in rows
    })


def key_is_live(session: Session, key_id: str, now: datetime) -> bool:
    """True while the key exists, is not revoked and has not expired (a console session signed in with it lives on)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    return row is not None and _state(row, now) == "active"


def _find_key(session: Session, key_id: str) -> ApiKey:
    from medserve.errors import NotFoundError

    row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
    if row is None:
        raise NotFoundError("no API key has this id", key_id=key_id)
    return row


def _check_rate_limit(rate_limit_rps: float | None) -> None:
    if rate_limit_rps is not None and not (rate_limit_rps >= 0 and math.isfinite(rate_limit_rps)):
        raise BadRequestError("a key's rate limit is requests per second, 0 (no limit) or more",
                              rate_limit_rps=rate_limit_rps)


def set_key_rate_limit(session: Session, key_id: str, rate_limit_rps: float | None) -> ApiKey:
    """Give a key its own request rate (None: back to the install's default, 0: no limit).

    Gateways apply it at their next key refresh (MEDSERVE_API_KEY_CACHE_SECONDS).
    """
    _check_rate_limit(rate_limit_rps)
    row = _find_key(session, key_id)
    row.rate_limit_rps = rate_limit_rps
    return row


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One key as an operator lists it: who it is for and its state, never its secret or hash."""

    key_id: str
    name: str
    role: Role
    department: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    state: KeyState
    # Its own requests per second; None: the install's default, 0: no limit.
    rate_limit_rps: float | None = None


def _state(row: ApiKey, now: datetime) -> KeyState:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def _info(row: ApiKey, now: datetime) -> KeyInfo:
    return KeyInfo(key_id=row.key_id, name=row.name, role=Role(row.role), department=row.department,
                   created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at,
                   state=_state(row, now), rate_limit_rps=row.rate_limit_rps)


def show_api_key(session: Session, key_id: str, now: datetime | None = None) -> KeyInfo:
    """One key's details (NotFoundError for an unknown id)."""
    return _info(_find_key(session, key_id), now or utcnow())


def list_api_keys(session: Session, now: datetime | None = None) -> list[KeyInfo]:
    """Every key, revoked and expired ones too, oldest first."""
    now = now or utcnow()
    return [_info(row, now) for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]


def revoke_api_key(session: Session, key_id: str, now: datetime | None = None) -> ApiKey:
    """Revoke a key now. Gateways stop accepting it at their next key refresh (MEDSERVE_API_KEY_CACHE_SECONDS,
    default 5 s, once the database answers them)."""
    row = _find_key(session, key_id)
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
    return row


def rotate_api_key(
    session: Session, key_id: str, *, grace: timedelta = timedelta(hours=24), now: datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key with the old one's name, role and department; the old one expires after ``grace``.

    The grace period lets the application deploy the new key before the old one stops.
    """
    old = _find_key(session, key_id)
    now = now or utcnow()
    if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= now):
        raise BadRequestError("this key is revoked or expired; create a new one instead", key_id=key_id)
    new, plaintext = create_api_key(
        session, name=old.name, role=old.role, department=old.department, expires_at=old.expires_at,
        rate_limit_rps=old.rate_limit_rps,
    )
    grace_end = now + grace
    old.expires_at = grace_end if old.expires_at is None else min(old.expires_at, grace_end)
    return new, plaintext
