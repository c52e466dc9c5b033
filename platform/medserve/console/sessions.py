"""Review console sign-in sessions, kept server-side in the database.

The browser holds a random secret (the session cookie); the table holds only
its sha256, so neither a database copy nor a log line lets anyone act as the
user. A session ends at its absolute expiry (one shift), after an idle
period, at logout (the row is deleted), and for an API-key sign-in as soon as
the key is revoked or expires.

The CSRF token of a session is an HMAC of its secret: bound to that session,
never stored, and useless without the cookie that only the signed-in browser
holds (the cookie is HttpOnly, so a script cannot read it either).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from medserve.db.models import ConsoleSession, utcnow
from medserve.digests import sha256_hex
from medserve.errors import ConsoleSignInRefusedError, CsrfTokenError
from medserve.security.api_keys import Principal, key_is_live
from medserve.security.roles import Role

COOKIE = "medserve_console"
# Roles that may sign in: clinicians review, auditors read. Every other role is refused at the door.
CONSOLE_ROLES = frozenset({Role.CLINICIAN, Role.AUDITOR})
# A session's last_seen_at is written at most this often (a page load need not always write).
TOUCH_EVERY = timedelta(seconds=30)
_CSRF_CONTEXT = b"medserve-console-csrf-v1"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    idle: timedelta
    absolute: timedelta


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """The signed-in user of one console request."""

    session_id: uuid.UUID
    principal: Principal
    method: str
    token: str = field(repr=False)  # the cookie's secret, to derive the CSRF token; never stored, logged or shown

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def check_csrf(user: ConsoleUser, presented: str | None) -> None:
    """Raises CsrfTokenError unless ``presented`` is this session's CSRF token."""
    if not presented or not hmac.compare_digest(presented.encode(), user.csrf.encode()):
        raise CsrfTokenError()


def admit(principal: Principal) -> None:
    """Only clinician and auditor credentials sign in; a clinical-app, admin or ops key is refused."""
    if principal.role not in CONSOLE_ROLES:
        raise ConsoleSignInRefusedError(role=principal.role.value)


def start_session(
    session: Session, principal: Principal, method: str, policy: SessionPolicy, now: datetime | None = None
) -> tuple[str, ConsoleSession]:
    """A new session for an admitted principal; returns the cookie's secret (shown once) and the row."""
    admit(principal)
    now = now or utcnow()
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))  # ended ones go on the way
    token = secrets.token_urlsafe(32)
    row = ConsoleSession(
        token_sha256=sha256_hex(token), created_at=now, last_seen_at=now, expires_at=now + policy.absolute,
        method=method, key_id=principal.key_id, name=principal.name, role=principal.role.value,
        department=principal.department,
    )
    session.add(row)
    session.flush()
    return token, row


def load_session(
    session: Session, token: str | None, policy: SessionPolicy, now: datetime | None = None
) -> ConsoleUser | None:
    """The user of a session cookie, or None when it names no live session (an ended one is deleted)."""
    if not token or len(token) > 128:
        return None
    now = now or utcnow()
    row = session.scalar(select(ConsoleSession).where(ConsoleSession.token_sha256 == sha256_hex(token)))
    if row is None:
        return None
    ended = row.expires_at <= now or row.last_seen_at + policy.idle <= now
    if not ended and row.method == "api_key":
        ended = not key_is_live(session, row.key_id, now)
    if ended:
        session.delete(row)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        row.last_seen_at = now
    principal = Principal(key_id=row.key_id, name=row.name, role=Role(row.role), department=row.department)
    return ConsoleUser(session_id=row.id, principal=principal, method=row.method, token=token)


def end_session(session: Session, token: str | None) -> bool:
    """Logout: delete the session server-side (the old cookie is refused from now on)."""
    if not token:
        return False
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.token_sha256 == sha256_hex(token)))
    return bool(result.rowcount)  # type: ignore[attr-defined]
