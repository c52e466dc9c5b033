"""Rate limits, daily token budgets and priority classes."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from medserve.controlplane.render import RenderOptions, render_serve_config
from medserve.db.engine import session_scope
from medserve.db.models import AuditRecord
from medserve.errors import RateLimitedError
from medserve.gateway.quotas import PriorityGate, RateLimiter, TokenBucket
from medserve.security.api_keys import Principal
from medserve.security.roles import Role

from .fake_gateway import REPO_ROOT, gateway_client, make_key

SMOL = "smollm2-135m-instruct"
BODY = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def principal(key_id: str = "k1", department: str | None = None) -> Principal:
    return Principal(key_id=key_id, name="t", role=Role.CLINICAL_APP, department=department)


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, capacity=2.0, updated=0.0)
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0]
    assert bucket.take(0.0) == 0.5  # one token comes back in half a second
    assert bucket.take(0.5) == 0.0


def test_each_gateway_replica_enforces_its_share_of_the_rate():
    limiter = RateLimiter(key_rps=4.0, department_rps=None, replicas=4)
    limiter.check(principal(), now=100.0)
    try:
        limiter.check(principal(), now=100.0)
    except Exception as error:  # noqa: BLE001
        assert error.code == "rate_limited" and error.details["retry_after_s"] == 1.0
    else:
        raise AssertionError("the second request in the same instant should be refused")
    limiter.check(principal("k2"), now=100.0)  # another key has its own bucket


def test_the_control_plane_tells_the_gateway_how_many_replicas_share_the_limits():
    from medserve.specs import load_catalog

    config = render_serve_config(load_catalog(REPO_ROOT / "deployments"), RenderOptions(gateway_replicas=3))
    gateway = config["applications"][0]
    assert gateway["args"]["settings"]["gateway_replicas"] == 3
    smol = next(e for e in gateway["args"]["catalog"] if e["model_name"] == SMOL)
    assert smol["max_in_flight"] == 4  # max_ongoing_requests x max_replicas


def test_a_burst_over_the_key_limit_gets_429_with_retry_after_and_is_audited(tmp_path, database_url):
    key = make_key(database_url, "clinical-app")
    with gateway_client(tmp_path, database_url, rate_limit_key_rps=1.0, rate_limit_burst_seconds=2.0) as (client, _):
        statuses = [chat.status_code for chat in
                    (client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
                     for _ in range(4))]
        refused = client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limited"
    with session_scope(database_url) as session:
        codes = [r.error_code for r in session.scalars(select(AuditRecord))]
    assert codes.count("rate_limited") == 5 - statuses.count(200) and len(codes) == 5


def test_a_department_shares_one_bucket_across_its_keys(tmp_path, database_url):
    keys = [make_key(database_url, "clinical-app", "research-lab") for _ in range(3)]
    with gateway_client(tmp_path, database_url, rate_limit_department_rps=1.0) as (client, _):
        statuses = [client.get("/v1/models", headers={"Authorization": f"Bearer {k}"}).status_code for k in keys]
    assert statuses[0] == 200 and 429 in statuses[1:]


def test_the_daily_token_budget_counts_audited_tokens_and_refuses_with_429(tmp_path, database_url):
    key = make_key(database_url, "clinical-app", "oncology")
    headers = {"Authorization": f"Bearer {key}"}
    # Each canned chat costs 5 + 2 tokens; a budget of 10 allows two calls.
    with gateway_client(tmp_path, database_url, token_budget_key_per_day=10) as (client, state):
        statuses = [client.post("/v1/chat/completions", json=BODY, headers=headers).status_code for _ in range(3)]
        refused = client.post("/v1/chat/completions", json=BODY, headers=headers)
        assert state.calls.count("generate") == 2  # refused requests never reach the engine
        imaging = client.get("/v1/models", headers=headers)  # budgets apply to LLM tokens only
    assert statuses == [200, 200, 429] and imaging.status_code == 200
    assert refused.json()["error"]["code"] == "token_budget_exceeded" and int(refused.headers["Retry-After"]) >= 1
    # A fresh replica (no local counts) reads the same usage from the audit table.
    with gateway_client(tmp_path, database_url, token_budget_department_per_day=14) as (client, _):
        assert client.post("/v1/chat/completions", json=BODY, headers=headers).status_code == 429
    with session_scope(database_url) as session:
        codes = [r.error_code for r in session.scalars(select(AuditRecord))]
    assert codes.count("token_budget_exceeded") == 3


def test_when_saturated_emergency_goes_before_standard_before_research():
    async def scenario() -> list[str]:
        gate = PriorityGate(capacity=1)
        order: list[str] = []
        release = asyncio.Event()

        async def request(name: str, klass: str) -> None:
            async with gate.slot(klass):
                order.append(name)
                if name == "first":
                    await release.wait()

        first = asyncio.create_task(request("first", "standard"))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(request(n, c)) for n, c in
                   [("research", "research"), ("routine", "standard"), ("icu", "emergency"), ("ed", "emergency")]]
        await asyncio.sleep(0.01)
        assert gate.in_flight == 1 and gate.waiting == 4
        release.set()
        await asyncio.gather(first, *waiters)
        assert gate.in_flight == 0
        return order

    assert asyncio.run(scenario()) == ["first", "icu", "ed", "routine", "research"]


def test_a_cancelled_waiter_does_not_leak_a_slot():
    async def scenario() -> int:
        gate = PriorityGate(capacity=1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with gate.slot("standard"):
                await hold.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(gate.slot("research").__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        hold.set()
        await task
        return gate.in_flight

    assert asyncio.run(scenario()) == 0


def test_the_gateway_routes_engine_calls_through_the_priority_gate(tmp_path, database_url):
    key = make_key(database_url, "clinical-app", "icu")
    with gateway_client(tmp_path, database_url, department_priority={"icu": "emergency"}) as (client, state):
        assert client.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        entry = state.catalog.get(SMOL)
        assert state.gate(entry).capacity == 4 and state.gate(entry).in_flight == 0
        assert state.priority_class(principal(department="icu")) == "emergency"
        assert state.priority_class(principal(department="lab")) == "standard"


def test_a_key_with_its_own_rate_replaces_the_default_and_zero_lifts_it():
    limiter = RateLimiter(key_rps=1.0, department_rps=None, burst_seconds=1.0)
    fast = Principal(key_id="pacs", name="t", role=Role.CLINICAL_APP, department=None, rate_limit_rps=100.0)
    unlimited = Principal(key_id="bench", name="t", role=Role.CLINICAL_APP, department=None, rate_limit_rps=0.0)
    for _ in range(100):
        limiter.check(fast, now=5.0)
    for _ in range(1000):
        limiter.check(unlimited, now=5.0)
    limiter.check(principal("ward"), now=5.0)
    with pytest.raises(RateLimitedError):
        limiter.check(principal("ward"), now=5.0)  # the default still holds for every other key


def test_a_department_override_replaces_the_department_default():
    limiter = RateLimiter(key_rps=None, department_rps=1.0, departments={"radiology": 3.0})
    for key in ("a", "b", "c"):
        limiter.check(principal(key, "radiology"), now=1.0)
    with pytest.raises(RateLimitedError):
        limiter.check(principal("d", "radiology"), now=1.0)
    limiter.check(principal("e", "icu"), now=1.0)
    with pytest.raises(RateLimitedError):
        limiter.check(principal("f", "icu"), now=1.0)


def test_a_fresh_install_limits_every_key_and_the_chart_ships_the_same_default():
    import yaml

    from medserve.settings import DEFAULT_BURST_SECONDS, DEFAULT_KEY_RPS, Settings

    fresh = Settings(_env_file=None)
    assert (fresh.rate_limit_key_rps, fresh.rate_limit_burst_seconds) == (DEFAULT_KEY_RPS, DEFAULT_BURST_SECONDS)
    chart_config = yaml.safe_load((REPO_ROOT / "helm/medserve/files/serve-config.yaml").read_text())
    shipped = chart_config["applications"][0]["args"]["settings"]
    assert shipped["rate_limit_key_rps"] == DEFAULT_KEY_RPS and shipped["rate_limit_burst_seconds"] == DEFAULT_BURST_SECONDS


def test_a_keys_own_rate_is_stored_loaded_by_gateways_and_kept_across_rotation(database_url):
    from medserve.errors import BadRequestError
    from medserve.security.api_keys import create_api_key, load_key_table, rotate_api_key, set_key_rate_limit

    with session_scope(database_url) as session:
        row, plaintext = create_api_key(session, name="pacs bridge", role="clinical-app", rate_limit_rps=200.0)
        key_id = row.key_id
    with session_scope(database_url) as session:
        assert load_key_table(session).verify(plaintext).rate_limit_rps == 200.0
        set_key_rate_limit(session, key_id, 0)
    with session_scope(database_url) as session:
        assert load_key_table(session).verify(plaintext).rate_limit_rps == 0
        _, rotated = rotate_api_key(session, key_id)
    with session_scope(database_url) as session:
        assert load_key_table(session).verify(rotated).rate_limit_rps == 0
        with pytest.raises(BadRequestError):
            set_key_rate_limit(session, key_id, -1)
