"""Which version answers a request: pure decisions, no I/O (unit-tested without Ray).

The gateway reads a :class:`RouteState` per model from the registry (cached
for ``MEDSERVE_ROLLOUT_CACHE_SECONDS``) and asks :func:`choose` for each
request. A canary split is sticky: the same patient pseudonym always lands
on the same side for the life of one rollout, so one patient's images are
not read by two different model versions mid-episode.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

BUCKETS = 10_000

PRIMARY = "primary"
CANARY = "canary"
SHADOW = "shadow"


@dataclass(frozen=True)
class VersionRef:
    """One deployed version as the gateway needs it."""

    version: str
    artifact_sha256: str | None
    status: str
    app_name: str


@dataclass(frozen=True)
class RouteState:
    """A model's alias target and its rollout, if any."""

    primary: VersionRef
    mode: str | None = None  # canary | shadow | None
    candidate: VersionRef | None = None
    percent: float = 0.0
    rollout_id: str = ""


@dataclass(frozen=True)
class Choice:
    """The version that answers, the arm it belongs to, and a shadow to mirror to."""

    version: VersionRef
    arm: str | None  # primary | canary | None (no rollout)
    shadow: VersionRef | None = None


def bucket(salt: str, key: str | None) -> int:
    """A bucket in [0, BUCKETS): stable per (rollout, patient); random without a patient."""
    if key is None:
        return secrets.randbelow(BUCKETS)
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_canary(percent: float, bucket_value: int) -> bool:
    """Buckets below the threshold go to the canary, so raising the percentage of one
    rollout only ever moves patients onto the canary, never back and forth."""
    return bucket_value < round(percent * BUCKETS / 100.0)


def choose(state: RouteState, patient_key: str | None, *, require_approved: bool) -> Choice:
    """Pick the answering version for one request.

    With ``require_approved``, a candidate that is not approved never answers
    (a canary of it degrades to the primary) and a shadow needs validated or
    approved; the caller refuses the request if the primary itself is not approved.
    """
    if state.mode is None or state.candidate is None:
        return Choice(state.primary, None)
    candidate = state.candidate
    if state.mode == SHADOW:
        fit = candidate.status in {"validated", "approved"} or not require_approved
        return Choice(state.primary, PRIMARY, candidate if fit and candidate.status != "retired" else None)
    if state.mode == CANARY:
        fit = candidate.status == "approved" or (not require_approved and candidate.status != "retired")
        if fit and in_canary(state.percent, bucket(state.rollout_id, patient_key)):
            return Choice(candidate, CANARY)
        return Choice(state.primary, PRIMARY)
    return Choice(state.primary, None)


def version_app_name(deployment: str, version: str) -> str:
    """The Serve application hosting one version of a deployment.

    Each version has its own application, so switching versions never
    redeploys a running one in place (which would mix versions while the
    replicas roll and make the audit's version wrong).
    """
    slug = "".join(ch if ch.isalnum() else "-" for ch in version.lower()).strip("-")
    return f"model-{deployment}-v{slug}"
