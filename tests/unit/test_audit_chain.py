"""The writer process's fast chain (records as value lists, a prebuilt encoder, a pre-keyed HMAC) gives
exactly the hashes `medserve audit verify` recomputes from dicts, whatever the values look like."""

import hashlib
import hmac
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from medserve.audit.chain import GENESIS, HASHED_COLUMNS, Chain, RowLayout, canonical_record, record_hash
from medserve.audit.writer_process import INPUT_COLUMNS

KEY = b"chain-test-key"
_CET = timezone(timedelta(hours=1))


def _records() -> list[dict]:
    base = {name: None for name in INPUT_COLUMNS}
    first = uuid.uuid4()
    return [
        {**base, "id": first, "created_at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
         "operation": "chat.completions", "outcome": "ok", "http_status": 200, "latency_ms": 12.5,
         "caller_name": "ward app", "prompt_tokens": 42, "completion_tokens": 0, "shadow": False},
        # text ids (the wire), a whole-number latency, non-ASCII and JSON-special text, another zone
        {**base, "id": str(uuid.uuid4()), "created_at": datetime(2026, 7, 1, 23, 30, tzinfo=_CET),
         "operation": "imaging.analyze", "outcome": "error", "http_status": 500, "latency_ms": 3,
         "caller_name": 'Zoë "Ärztin" \\ \n\t\u2028 𝄞', "error_code": "internal_error",
         "time_to_first_token_ms": 1e-7, "shadow": True, "shadow_of": first, "rollout": "shadow"},
        # a naive timestamp (read as UTC), huge and negative numbers, no shadow at all
        {**base, "id": uuid.uuid4(), "created_at": datetime(2026, 12, 31, 23, 59, 59, 999999),
         "operation": "x", "outcome": "denied", "http_status": 403, "latency_ms": 1e16,
         "time_to_first_token_ms": -0.0, "prompt_tokens": 2**40, "shadow_of": str(first)},
    ]


def test_link_values_hashes_exactly_what_verify_recomputes():
    chain, layout = Chain(KEY, "chain-a"), RowLayout(INPUT_COLUMNS)
    previous = GENESIS
    for seq, record in enumerate(_records(), start=1):
        row = chain.link_values([record[name] for name in INPUT_COLUMNS], layout)
        stored = dict(zip(layout.columns, row))
        assert (stored["chain_id"], stored["seq"], stored["prev_hash"]) == ("chain-a", seq, previous)
        # What the database gives back for the dict form: the original values with the chain's columns.
        as_dict = {**record, "chain_id": "chain-a", "seq": seq, "prev_hash": previous}
        assert stored["record_hash"] == record_hash(KEY, as_dict)
        # The stored row (created_at as the UTC text it was hashed as) verifies as the database returns it.
        returned = {**stored, "created_at": datetime.fromisoformat(stored["created_at"])}
        assert returned["created_at"].tzinfo == timezone.utc
        assert stored["record_hash"] == record_hash(KEY, returned)
        # And the reference: the canonical form is the standard library's JSON of the hashed values.
        expected = json.dumps(json.loads(canonical_record(as_dict)), separators=(",", ":")).encode()
        assert canonical_record(as_dict) == expected
        assert stored["record_hash"] == hmac.new(KEY, b"medserve-audit-record-v1:" + expected,
                                                 hashlib.sha256).hexdigest()
        previous = stored["record_hash"]
    assert (chain.seq, chain.last_hash) == (3, previous)


@pytest.mark.parametrize("broken", [{"created_at": None}, {"created_at": "2026-01-01T00:00:00"}, "short"])
def test_a_record_that_cannot_be_hashed_leaves_the_chain_as_it_was(broken):
    chain, layout = Chain(KEY), RowLayout(INPUT_COLUMNS)
    good = _records()[0]
    chain.link_values([good[name] for name in INPUT_COLUMNS], layout)
    state = (chain.seq, chain.last_hash, chain.since_checkpoint)
    values = [{**good, **broken}[name] for name in INPUT_COLUMNS] if isinstance(broken, dict) else [1, 2]
    with pytest.raises((AttributeError, TypeError, ValueError)):
        chain.link_values(values, layout)
    assert (chain.seq, chain.last_hash, chain.since_checkpoint) == state


def test_the_row_layout_covers_every_hashed_column():
    layout = RowLayout(INPUT_COLUMNS)
    assert set(HASHED_COLUMNS) <= set(layout.columns)
    with pytest.raises(ValueError):
        RowLayout([name for name in INPUT_COLUMNS if name != "department"])
