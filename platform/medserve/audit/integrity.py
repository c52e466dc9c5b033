"""Checking the audit trail's hash chains, and pruning old records without breaking them.

:func:`verify` walks every chain in ``seq`` order and reports, for each chain,
the first record that was changed (its keyed hash no longer matches its
content), removed (a gap in ``seq``, a broken link, or a signed checkpoint
beyond the last record) or inserted (a record outside any signed chain, or one
whose hash could not have been made without the key).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from itertools import groupby
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, not_, select

from medserve.audit.chain import GENESIS, checkpoint_signature, make_checkpoint, record_hash
from medserve.db.engine import session_scope
from medserve.db.models import AuditCheckpoint, AuditRecord, utcnow


@dataclass
class Problem:
    record_id: str | None
    chain_id: str | None
    seq: int | None
    kind: str  # changed | removed | inserted | checkpoint
    message: str

    def __str__(self) -> str:
        where = f"record {self.record_id}" if self.record_id else "chain"
        return f"{self.kind}: {where} (chain {self.chain_id}, seq {self.seq}): {self.message}"


@dataclass
class VerifyResult:
    records: int = 0
    chains: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(session: Any, model: type) -> list[dict[str, Any]]:
    table = model.__table__  # type: ignore[attr-defined]
    return [dict(row._mapping) for row in session.execute(select(table))]


def verify(database_url: str, key: bytes) -> VerifyResult:
    """Walk every chain, streaming records in (chain, seq) order: memory stays flat however large the trail."""
    result = VerifyResult()
    table = AuditRecord.__table__
    chained = and_(AuditRecord.chain_id.is_not(None), AuditRecord.seq.is_not(None),
                   AuditRecord.record_hash.is_not(None))
    with session_scope(database_url) as session:
        checkpoints = _rows(session, AuditCheckpoint)
        result.checkpoints = len(checkpoints)
        result.records = session.scalar(select(func.count()).select_from(table)) or 0
        for row in session.execute(select(table.c.id).where(not_(chained))):
            result.problems.append(Problem(str(row.id), None, None, "inserted", "the record is in no hash chain"))

        signed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for cp in checkpoints:
            if checkpoint_signature(key, cp) != cp["signature"]:
                result.problems.append(Problem(None, cp["chain_id"], cp["seq"], "checkpoint",
                                               f"checkpoint {cp['id']} has an invalid signature"))
            else:
                signed[cp["chain_id"]].append(cp)

        stream = session.execute(
            select(table).where(chained).order_by(AuditRecord.chain_id, AuditRecord.seq),
            execution_options={"yield_per": 5000},
        )
        seen: set[str] = set()
        for chain_id, group in groupby((dict(row._mapping) for row in stream), key=lambda r: r["chain_id"]):
            seen.add(chain_id)
            problem = _verify_chain(key, chain_id, group, signed.get(chain_id, []))
            if problem is not None:
                result.problems.append(problem)
        for chain_id in sorted(set(signed) - seen):
            problem = _verify_chain(key, chain_id, iter(()), signed[chain_id])
            if problem is not None:
                result.problems.append(problem)
        result.chains = len(seen | set(signed))
    return result


def _verify_chain(
    key: bytes, chain_id: str, rows: Iterator[dict[str, Any]], checkpoints: list[dict[str, Any]]
) -> Problem | None:
    """The first problem in one chain (rows in seq order), or None."""
    if not checkpoints:
        first = next(rows)
        return Problem(str(first["id"]), chain_id, first["seq"], "inserted",
                       "the chain has no signed checkpoint: its records were not written by medserve")
    anchors = [cp for cp in checkpoints if cp["kind"] in ("open", "anchor")]
    if not anchors:
        first = next(rows, None)
        return Problem(str(first["id"]) if first else None, chain_id, first["seq"] if first else None, "removed",
                       "the chain's start is missing: no signed open or prune anchor")
    start = max(anchors, key=lambda cp: cp["seq"])
    expected_seq, expected_prev = start["seq"] + 1, start["record_hash"]
    by_seq = {cp["seq"]: cp for cp in checkpoints}
    previous: dict[str, Any] | None = None
    for row in rows:
        if row["seq"] <= start["seq"]:
            return Problem(str(row["id"]), chain_id, row["seq"], "inserted",
                           f"the record lies before the chain's signed start (seq {start['seq']})")
        if record_hash(key, row) != row["record_hash"]:
            return Problem(str(row["id"]), chain_id, row["seq"], "changed",
                           "its content no longer matches its hash (changed, or inserted without the key)")
        if row["seq"] > expected_seq:
            after = f"after record {previous['id']}" if previous else "at the chain's start"
            return Problem(str(row["id"]), chain_id, row["seq"], "removed",
                           f"{row['seq'] - expected_seq} record(s) (seq {expected_seq}..{row['seq'] - 1}) "
                           f"missing before it, {after}")
        if row["prev_hash"] != expected_prev:
            return Problem(str(row["id"]), chain_id, row["seq"], "removed",
                           "its link to the previous record is broken")
        cp = by_seq.get(row["seq"])
        if cp is not None and cp["record_hash"] != row["record_hash"]:
            return Problem(str(row["id"]), chain_id, row["seq"], "changed",
                           "it differs from the record a signed checkpoint vouches for")
        expected_seq, expected_prev, previous = row["seq"] + 1, row["record_hash"], row
    last_signed = max(cp["seq"] for cp in checkpoints)
    if last_signed >= expected_seq:
        after = f"after record {previous['id']}" if previous else "after the chain's start"
        return Problem(None, chain_id, expected_seq, "removed",
                       f"records seq {expected_seq}..{last_signed} vouched for by a signed checkpoint are missing, "
                       f"{after}")
    return None


def prune(database_url: str, key: bytes, older_than: timedelta) -> int:
    """Delete records older than the cut-off from the start of each chain; returns how many.

    Each chain keeps a contiguous tail: its prefix up to the last record before
    the first one to keep is deleted, and a signed ``anchor`` checkpoint (seq,
    hash of the last deleted record) in the same transaction lets the remaining
    chain verify from its new start.
    """
    cutoff = utcnow() - older_than
    deleted = 0
    with session_scope(database_url) as session:
        chains = session.scalars(select(AuditRecord.chain_id).where(AuditRecord.chain_id.is_not(None)).distinct())
        for chain_id in list(chains):
            deleted += _prune_chain(session, key, chain_id, cutoff)
    return deleted


def _prune_chain(session: Any, key: bytes, chain_id: str, cutoff: datetime) -> int:
    first_kept = session.scalar(
        select(AuditRecord.seq).where(AuditRecord.chain_id == chain_id, AuditRecord.created_at >= cutoff)
        .order_by(AuditRecord.seq).limit(1)
    )
    last_seq_query = select(AuditRecord.seq).where(AuditRecord.chain_id == chain_id)
    if first_kept is not None:
        last_seq_query = last_seq_query.where(AuditRecord.seq < first_kept)
    last_pruned = session.scalar(last_seq_query.order_by(AuditRecord.seq.desc()).limit(1))
    if last_pruned is None:
        return 0
    last_hash = session.scalar(
        select(AuditRecord.record_hash).where(AuditRecord.chain_id == chain_id, AuditRecord.seq == last_pruned)
    ) or GENESIS
    session.execute(AuditCheckpoint.__table__.insert(), [make_checkpoint(key, chain_id, last_pruned, last_hash, "anchor",
                                                                         utcnow())])
    removed = session.execute(
        delete(AuditRecord).where(AuditRecord.chain_id == chain_id, AuditRecord.seq <= last_pruned)
    ).rowcount
    session.execute(
        delete(AuditCheckpoint).where(AuditCheckpoint.chain_id == chain_id, AuditCheckpoint.seq < last_pruned)
    )
    return int(removed or 0)
