"""Tamper evidence: a keyed hash chain over audit records, and signed checkpoints.

Each writer keeps one chain. Record ``seq`` of a chain stores ``prev_hash``
(the ``record_hash`` of seq - 1; :data:`GENESIS` for seq 1) and its own
``record_hash`` = HMAC-SHA256(key, canonical JSON of every column but
record_hash). A changed column breaks that record's hash; a removed record
leaves a gap in ``seq`` and a broken link; an inserted record cannot carry a
valid hash without the key. Signed checkpoints (a chain reached seq with
hash) reveal records removed from the tail and anchor a chain whose older
records were pruned.

The key is keyed (HMAC) rather than a bare SHA-256 so that someone with write
access to the database but not the key cannot recompute the chain after an
edit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from datetime import datetime, timezone
from typing import Any

from medserve.db.models import AuditCheckpoint, AuditRecord

GENESIS = "0" * 64
RECORD_COLUMNS = [column.name for column in AuditRecord.__table__.columns]
HASHED_COLUMNS = [name for name in RECORD_COLUMNS if name != "record_hash"]
CHECKPOINT_COLUMNS = [column.name for column in AuditCheckpoint.__table__.columns]
_FLOAT_COLUMNS = {"latency_ms"}


def _canonical_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if name in _FLOAT_COLUMNS:
        return float(value)
    return value


def canonical(row: dict[str, Any], columns: list[str]) -> bytes:
    """Sorted-key compact JSON of the given columns, with types normalised across databases."""
    content = {name: _canonical_value(name, row.get(name)) for name in columns}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(key: bytes, row: dict[str, Any]) -> str:
    return hmac.new(key, b"record:" + canonical(row, HASHED_COLUMNS), hashlib.sha256).hexdigest()


def checkpoint_signature(key: bytes, row: dict[str, Any]) -> str:
    columns = [name for name in CHECKPOINT_COLUMNS if name not in ("signature", "id")]
    return hmac.new(key, b"checkpoint:" + canonical(row, columns), hashlib.sha256).hexdigest()


def make_checkpoint(key: bytes, chain_id: str, seq: int, last_hash: str, kind: str,
                    created_at: datetime) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "chain_id": chain_id,
        "seq": seq,
        "record_hash": last_hash,
        "kind": kind,
        "created_at": created_at,
    }
    row["signature"] = checkpoint_signature(key, row)
    return row


class Chain:
    """The running state of one writer's chain (used from the writer thread only)."""

    def __init__(self, key: bytes, chain_id: str | None = None) -> None:
        self.key = key
        self.chain_id = chain_id or str(uuid.uuid4())
        self.seq = 0
        self.last_hash = GENESIS
        self.since_checkpoint = 0

    def link(self, record: dict[str, Any]) -> dict[str, Any]:
        """Give a record its place in the chain (mutates and returns it)."""
        self.seq += 1
        record["chain_id"] = self.chain_id
        record["seq"] = self.seq
        record["prev_hash"] = self.last_hash
        record["record_hash"] = record_hash(self.key, record)
        self.last_hash = record["record_hash"]
        self.since_checkpoint += 1
        return record

    def checkpoint(self, kind: str, created_at: datetime) -> dict[str, Any]:
        self.since_checkpoint = 0
        return make_checkpoint(self.key, self.chain_id, self.seq, self.last_hash, kind, created_at)
