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
from collections.abc import Sequence
from datetime import datetime, timezone
from json.encoder import c_make_encoder, encode_basestring_ascii
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
_RECORD_PREFIX = b"medserve-audit-record-v1:"
_UTC = timezone.utc
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
if c_make_encoder is not None:
    # The C encoder JSONEncoder.encode builds on every call, built once: the same bytes (same separators,
    # ASCII escapes, float repr, allow_nan) without the per-call set-up; markers=None only skips the
    # circular-reference check, which a flat list of scalars cannot need.
    _c_encoder = c_make_encoder(None, _json.default, encode_basestring_ascii, None, ":", ",", False, False, True)

    def _encode(values: list[Any]) -> str:
        return "".join(_c_encoder(values, 0))
else:  # pragma: no cover - CPython always has the C accelerator
    _encode = _json.encode


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
    return hmac.new(key, _RECORD_PREFIX + canonical_record(row), hashlib.sha256).hexdigest()


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


CHAIN_COLUMNS = ("chain_id", "seq", "prev_hash", "record_hash")


class RowLayout:
    """Records as value lists rather than dicts (the writer process's hot path): ``input_columns`` in
    that order, then :data:`CHAIN_COLUMNS`, which :meth:`Chain.link_values` fills in."""

    def __init__(self, input_columns: Sequence[str]) -> None:
        self.columns = (*input_columns, *CHAIN_COLUMNS)
        missing = set(HASHED_COLUMNS) - set(self.columns)
        if missing:
            raise ValueError(f"hashed columns missing from the row layout: {sorted(missing)}")
        at = self.columns.index
        self.hashed = operator.itemgetter(*(at(name) for name in HASHED_COLUMNS))
        self.created, self.shadow = at("created_at"), at("shadow")
        self.width = len(input_columns)


class Chain:
    """The running state of one writer's chain (used from the writer thread only)."""

    def __init__(self, key: bytes, chain_id: str | None = None) -> None:
        self.key = key
        self.chain_id = chain_id or str(uuid.uuid4())
        self.seq = 0
        self.last_hash = GENESIS
        self.since_checkpoint = 0
        # The key and the record prefix absorbed once; each record hash continues a copy of it.
        self._record_mac = hmac.new(key, _RECORD_PREFIX, hashlib.sha256)

    def link_values(self, values: list[Any], layout: RowLayout) -> list[Any]:
        """The record given as values in ``layout``'s input order, linked: a new list with the chain's
        columns appended. Gives exactly :func:`record_hash`'s hash of the same record as a dict; the
        stored row carries created_at as the UTC ISO text it was hashed as, and shadow as a bool. Raises
        (and leaves the chain as it was) for a record that cannot be hashed (no created_at, ...)."""
        if len(values) != layout.width:
            raise ValueError("a record with the wrong number of columns")
        seq = self.seq + 1
        row = [*values, self.chain_id, seq, self.last_hash, None]
        created = row[layout.created]
        row[layout.created] = (created.isoformat(timespec="microseconds") if created.tzinfo is _UTC
                               else _timestamp(created))
        row[layout.shadow] = bool(row[layout.shadow])
        hashed = list(layout.hashed(row))
        hashed[_ID] = str(hashed[_ID])
        if hashed[_LATENCY] is not None:
            hashed[_LATENCY] = float(hashed[_LATENCY])
        if hashed[_TTFT] is not None:
            hashed[_TTFT] = float(hashed[_TTFT])
        if hashed[_SHADOW_OF] is not None:
            hashed[_SHADOW_OF] = str(hashed[_SHADOW_OF])
        mac = self._record_mac.copy()
        mac.update(_encode(hashed).encode())
        row[-1] = self.last_hash = mac.hexdigest()
        self.seq = seq
        self.since_checkpoint += 1
        return row

    def checkpoint(self, kind: str, created_at: datetime) -> dict[str, Any]:
        self.since_checkpoint = 0
        return make_checkpoint(self.key, self.chain_id, self.seq, self.last_hash, kind, created_at)
