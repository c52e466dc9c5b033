"""The compliance monitor: `audit verify` on a schedule, and the review backlog as metrics.

One monitor runs per cluster: the control plane renders it as a Serve
application of its own (``compliance``) with exactly one replica and no HTTP
route, so the trail is walked once per interval whatever the number of
gateway replicas, and Serve restarts the replica if it dies. Its work runs in
two daemon threads of that replica (the verification can take minutes on a
large trail; the backlog is a few grouped queries), never on an event loop
that answers requests.

What it exports (platform/medserve/metrics.py): the time of the last
verification that found every chain intact, a failure counter (``problems``:
a record changed, removed or inserted; ``error``: it could not run), the
problems the last run found, its interval; pending results per department
and age, the oldest pending result per department, and decisions per model
version. Problems are logged by kind, record id and chain only: never a
column's content.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from medserve import metrics
from medserve.audit.integrity import VerifyResult, verify
from medserve.db.engine import session_scope
from medserve.db.models import utcnow
from medserve.reviews.backlog import Backlog, backlog
from medserve.settings import Settings

logger = logging.getLogger("medserve.audit.monitor")

COMPLIANCE_APP = "compliance"
COMPLIANCE_DEPLOYMENT = "ComplianceMonitor"


class ComplianceMonitor:
    """Verifies the audit trail every ``verify_interval_s`` and samples the review backlog every
    ``review_interval_s``, each in a thread of its own; ``*_once`` run one round in the caller's thread."""

    def __init__(
        self, database_url: str, signing_key: bytes, *, verify_interval_s: float, review_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._database_url = database_url
        self._key = signing_key
        self.verify_interval_s = verify_interval_s
        self.review_interval_s = review_interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Every label set ever exported: one that empties is exported at 0, not left at its last value.
        self._departments: set[str] = set()
        self._decisions: set[tuple[str, str, str]] = set()
        self.last_result: VerifyResult | None = None
        self.last_verified_at: float | None = None
        self.last_success_at: float | None = None
        self.verifications = 0

    # --- one round ---------------------------------------------------------------

    def verify_once(self) -> VerifyResult | None:
        """One verification of the whole trail; None when it could not run (counted as an error)."""
        try:
            result = verify(self._database_url, self._key)
        except Exception as error:  # noqa: BLE001 - a database outage must not stop the schedule
            logger.warning("periodic audit verification could not run: %s", type(error).__name__)
            metrics.record_audit_verification_failure("error")
            self.verifications += 1
            return None
        finished = self._clock()
        self.last_result, self.last_verified_at = result, finished
        self.verifications += 1
        if result.ok:
            self.last_success_at = finished
        else:
            metrics.record_audit_verification_failure("problems")
            first = result.problems[0]
            logger.error(
                "periodic audit verification found %d problem(s) in %d records; first: %s of record %s "
                "(chain %s, seq %s); run `medserve audit verify` for all of them",
                len(result.problems), result.records, first.kind, first.record_id, first.chain_id, first.seq,
            )
        self._export_verify_state()
        return result

    def _export_verify_state(self) -> None:
        result = self.last_result
        metrics.set_audit_verify_state(interval_s=self.verify_interval_s, last_success=self.last_success_at,
                                       problems=None if result is None else len(result.problems))

    def sample_reviews_once(self) -> Backlog | None:
        """Export the review backlog as of now (and the last verification's gauges again); None when the
        database could not be read."""
        self._export_verify_state()
        try:
            with session_scope(self._database_url) as session:
                current = backlog(session, utcnow())
        except Exception as error:  # noqa: BLE001
            logger.warning("review backlog could not be read: %s", type(error).__name__)
            return None
        self._departments |= set(current.pending)
        self._decisions |= set(current.decisions)
        pending = {department: current.pending.get(department, {}) for department in self._departments}
        oldest = {department: current.oldest_s.get(department, 0.0) for department in self._departments}
        decisions = {labels: current.decisions.get(labels, 0) for labels in self._decisions}
        metrics.set_review_backlog(pending, oldest, decisions)
        return current

    # --- schedule -------------------------------------------------------------------

    def start(self) -> "ComplianceMonitor":
        metrics.init_audit_verify_metrics()
        self._export_verify_state()
        for name, work, interval in (
            ("medserve-audit-verify", self.verify_once, self.verify_interval_s),
            ("medserve-review-backlog", self.sample_reviews_once, self.review_interval_s),
        ):
            thread = threading.Thread(target=self._every, args=(work, interval), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _every(self, work: Callable[[], Any], interval_s: float) -> None:
        while not self._stop.is_set():
            try:
                work()
            except Exception:  # noqa: BLE001 - the schedule outlives any one round
                logger.exception("compliance monitor round failed")
            if self._stop.wait(interval_s):
                return

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        self._stop.set()
        metrics.flush()

    def status(self) -> dict[str, Any]:
        result = self.last_result
        return {
            "verify_interval_s": self.verify_interval_s,
            "review_interval_s": self.review_interval_s,
            "verifications": self.verifications,
            "last_verified_at": self.last_verified_at,
            "last_success_at": self.last_success_at,
            "records": None if result is None else result.records,
            "problems": None if result is None else [str(problem) for problem in result.problems[:20]],
        }


class ComplianceMonitorDeployment:
    """The Serve replica hosting the one monitor of the cluster (no route; reached by handle for status)."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        resolved = Settings(**(settings or {}))
        self.monitor = ComplianceMonitor(
            resolved.resolved_database_url, resolved.audit_signing_key_bytes(),
            verify_interval_s=resolved.audit_verify_interval_s,
            review_interval_s=resolved.review_metrics_interval_s,
        ).start()

    def status(self) -> dict[str, Any]:
        return self.monitor.status()

    def check_health(self) -> None:
        # Serve restarts a replica whose schedule died.
        if not self.monitor.alive:
            raise RuntimeError("the compliance monitor's threads stopped")

    def __del__(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.stop()


def build_app(args: dict[str, Any]) -> Any:
    """Application builder named by import_path in the rendered Serve config."""
    from ray import serve

    return serve.deployment(ComplianceMonitorDeployment, name=COMPLIANCE_DEPLOYMENT).bind(args.get("settings") or {})
