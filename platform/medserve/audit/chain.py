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
import operator
import uuid
from datetime import datetime, timezone
from typing import Any


GENESIS = "0" * 64
# The columns a record hash covers, in this fixed order (format version 1). Fixed
# here, not derived from the model: a column added later must not change the
# hash of records written before it.
HASHED_COLUMNS = (
    "api_key_id", "artifact_sha256", "caller_name", "caller_role", "chain_id", "clinician_pseudonym",
    "completion_tokens", "created_at", "department", "encounter_pseudonym", "error_code", "finish_reason",
    "http_status", "id", "input_sha256", "latency_ms", "model_name", "model_version", "operation", "outcome",
    "output_label", "output_sha256", "patient_pseudonym", "prev_hash", "prompt_tokens", "purpose_pseudonym",
    "reasoning_sha256", "rollout", "seq", "shadow", "shadow_of", "time_to_first_token_ms",
)
CHECKPOINT_COLUMNS = ("chain_id", "created_at", "kind", "record_hash", "seq")
_ID, _CREATED, _LATENCY, _TTFT, _SHADOW, _SHADOW_OF = (
    HASHED_COLUMNS.index(name)
    for name in ("id", "created_at", "latency_ms", "time_to_first_token_ms", "shadow", "shadow_of")
)
_hashed_values = operator.itemgetter(*HASHED_COLUMNS)
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _timestamp(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def canonical_record(row: dict[str, Any]) -> bytes:
    """A JSON array of the hashed columns' values, types normalised so both databases give the same bytes."""
    try:
        values = list(_hashed_values(row))
    except KeyError:  # a partial row (tests, hand-made records): absent columns are NULL
        values = [row.get(name) for name in HASHED_COLUMNS]
    values[_ID] = str(values[_ID])
    values[_CREATED] = _timestamp(values[_CREATED])
    for index in (_LATENCY, _TTFT):  # floats: one JSON form whatever the driver returned
        if values[index] is not None:
            values[index] = float(values[index])
    # shadow defaults to false in the database: a record written without it reads back false.
    values[_SHADOW] = bool(values[_SHADOW])
    if values[_SHADOW_OF] is not None:
        values[_SHADOW_OF] = str(values[_SHADOW_OF])
    return _encode(values).encode()


def canonical_checkpoint(row: dict[str, Any]) -> bytes:
    values = [row[name] for name in CHECKPOINT_COLUMNS]
    values[1] = _timestamp(values[1])
    return _encode(values).encode()


def record_hash(key: bytes, row: dict[str, Any]) -> str:
    return hmac.new(key, b"medserve-audit-record-v1:" + canonical_record(row), hashlib.sha256).hexdigest()


def checkpoint_signature(key: bytes, row: dict[str, Any]) -> str:
    return hmac.new(key, b"medserve-audit-checkpoint-v1:" + canonical_checkpoint(row), hashlib.sha256).hexdigest()


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
        # Stored exactly as hashed (the column is NOT NULL, default false).
        record["shadow"] = bool(record.get("shadow"))
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
