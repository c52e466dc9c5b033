"""Autoscaling and backpressure on the real cluster, with the built-in noop engine.

The noop model holds each request for ``delay_ms`` (an asyncio sleep, no CPU),
so replicas fill up without loading the two shared cores. These tests check
the direction (more replicas under load, back to the minimum after it; a full
queue refused at once with 503 + Retry-After), never the speed: the measured
scaling times are printed, and `medserve bench --autoscale` is where speed is
reported. Bounds are only generous enough to catch "never happened".

Each test deploys its noop model beside the default catalog (the catalog's
own applications are left untouched, so restoring it is cheap) and restores
the default catalog afterwards.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from medserve.bench.loadgen import Request, measure
from medserve.bench.private import wait_for_answer
from medserve.bench.runner import noop_spec
from medserve.bench.scaling import ReplicaWatch, replica_counts, scaling_times
from medserve.controlplane.render import app_name_for
from medserve.specs import DeploymentSpec

from .conftest import Platform, json_of, new_patient_id

pytestmark = pytest.mark.slow

BODY = b"x" * 64  # the noop engine never reads it


def _wait_for_200(platform: Platform, path: str, key: str, timeout_s: float = 120.0) -> None:
    """Until the model answers (no patient id: these rows belong to no test's count)."""
    wait_for_answer(platform.base_url, path, {"Authorization": f"Bearer {key}", "Content-Type": "image/png"},
                    BODY, timeout_s=timeout_s)


def _deploy(platform: Platform, spec: DeploymentSpec) -> None:
    result = platform.apply([*platform.catalog(), spec])
    planned = {item.spec.name: item for item in result.plan}
    assert planned[spec.name].deploy, planned[spec.name].reason


# --- autoscaling ------------------------------------------------------------------

SCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 1,
           "downscale_delay_s": 3}
LOAD_S = 25.0
LOAD_CONCURRENCY = 12
# The spec's delays are not what bounds the timings: Ray Serve (2.60) averages the
# ongoing requests its handles push every 10 s (metrics_interval_s) over 30 s
# (look_back_period_s), neither set by the spec. Scale-up is seen ~10 s into the
# load and the minimum ~30 s after it; the bound leaves room for a slow machine.
BACK_TO_MIN_BOUND_S = 90.0


def test_load_scales_replicas_up_and_they_come_back_to_the_minimum_after_it(platform: Platform):
    spec = noop_spec("scaling-noop", "replicas", delay_ms=200, max_ongoing_requests=2, autoscaling=SCALING,
                     num_cpus=0.1)
    app = app_name_for(spec)
    path = f"/v1/imaging/{spec.name}"
    patient = new_patient_id()
    try:
        _deploy(platform, spec)
        key = platform.key(rate_limit_rps=0)  # a load test
        _wait_for_200(platform, path, key)
        assert replica_counts(platform.target, app) == (1, 1)

        watch = ReplicaWatch(platform.target, app).start()
        try:
            request = Request("POST", path, BODY, {
                "Authorization": f"Bearer {key}", "Content-Type": "image/png", "X-Patient-Id": patient})
            started = watch.now_s()
            clock = time.monotonic()
            result = measure(platform.base_url, request, concurrency=LOAD_CONCURRENCY, duration_s=LOAD_S,
                             warmup_s=0.0, label="scaling step")
            load_took_s = time.monotonic() - clock
            ended = watch.now_s()
            deadline = time.monotonic() + BACK_TO_MIN_BOUND_S
            while watch.first(lambda s: s.target == 1 and s.running == 1, ended) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(1.0)
        finally:
            samples = watch.stop()
        times = scaling_times(watch, SCALING["min_replicas"], started, ended)

        summary = result.summary()
        print(f"\nautoscaling: {LOAD_CONCURRENCY} connections for {LOAD_S:g} s against {spec.name} "
              f"(min 1, max 3, target_ongoing_requests 1, upscale_delay_s 1, downscale_delay_s 3): "
              f"scale-up decided after {times.scale_up_decided_s and round(times.scale_up_decided_s, 1)} s, "
              f"new replicas serving after {times.new_replicas_serving_s and round(times.new_replicas_serving_s, 1)} s, "
              f"peak {times.peak_running} running, back to 1 target / 1 running "
              f"{times.back_to_min_s and round(times.back_to_min_s, 1)} s after the load stopped; "
              f"{result.requests} requests ({summary['throughput_rps']} req/s, p50 {summary['p50_ms']} ms, "
              f"p99 {summary['p99_ms']} ms), statuses {summary['statuses']}, load call took {load_took_s:.1f} s")
        print("replica samples (s, target, running):",
              [(round(s.at_s, 1), s.target, s.running) for s in samples if s.at_s >= started][::4])

        # Every answer in the window was a 200 or a 503 model_overloaded; no connection failed.
        assert result.requests > 0 and result.statuses.get(200, 0) > 0, summary
        assert set(result.statuses) <= {200, 503}, summary
        refused = sum(count for status, count in result.statuses.items() if status >= 400)
        assert result.errors == refused, f"{result.errors - refused} connection errors: {summary}"
        # Nothing hung: the closed loop ends with the slowest request in flight at the end of the window.
        assert load_took_s < LOAD_S + 15, f"a request was still unanswered {load_took_s - LOAD_S:.0f} s after the load"
        # Every request (also those answered outside the window) left one row: 200, or 503 model_overloaded.
        rows = platform.audit_rows_for_patient(patient)
        assert len(rows) >= result.requests
        outcomes = Counter((row.http_status, row.error_code) for row in rows)
        assert set(outcomes) <= {(200, None), (503, "model_overloaded")}, outcomes

        # Direction, not speed: more replicas ran during the load, and the minimum after it.
        assert times.scale_up_decided_s is not None, "the autoscaler never asked for more than 1 replica"
        assert times.new_replicas_serving_s is not None, "no second replica ever ran"
        assert started + times.new_replicas_serving_s <= ended, "more replicas ran only after the load stopped"
        assert times.peak_running > 1
        assert times.back_to_min_s is not None, f"not back to 1 target / 1 running replica {BACK_TO_MIN_BOUND_S:g} s after the load"
        assert replica_counts(platform.target, app) == (1, 1)
    finally:
        platform.apply()


# --- backpressure -------------------------------------------------------------------

BURST = 10


def test_a_full_queue_answers_503_model_overloaded_at_once_and_each_request_is_audited(platform: Platform):
    # One replica working on one request at a time, two more may wait: 3 at most in the system.
    spec = noop_spec("backpressure-noop", "replicas", delay_ms=2000, max_ongoing_requests=1,
                     autoscaling={"min_replicas": 1, "max_replicas": 1, "max_queued_requests": 2})
    path = f"/v1/imaging/{spec.name}"
    patient = new_patient_id()
    try:
        _deploy(platform, spec)
        key = platform.key(rate_limit_rps=0)  # a load test
        _wait_for_200(platform, path, key)  # also authenticates the key once (cached after)

        barrier = threading.Barrier(BURST)
        headers = {"Content-Type": "image/png", "X-Patient-Id": patient}

        def one(_: int) -> tuple[httpx.Response | None, float, str | None]:
            with platform.client(key, timeout=30.0) as client:
                barrier.wait()
                clock = time.perf_counter()
                try:
                    response = client.post(path, content=BODY, headers=headers)
                except httpx.HTTPError as error:
                    return None, time.perf_counter() - clock, type(error).__name__
                response.read()
                return response, time.perf_counter() - clock, None

        with ThreadPoolExecutor(max_workers=BURST) as pool:
            answers = list(pool.map(one, range(BURST)))

        print("\nbackpressure: " + ", ".join(
            f"{response.status_code if response is not None else failure} in {took:.2f} s"
            for response, took, failure in sorted(answers, key=lambda a: a[1])))
        failures = [failure for response, _, failure in answers if response is None]
        assert not failures, f"requests got no answer: {failures}"
        ok = [(r, took) for r, took, _ in answers if r is not None and r.status_code == 200]
        overloaded = [(r, took) for r, took, _ in answers if r is not None and r.status_code == 503]
        assert len(ok) + len(overloaded) == BURST, [r.status_code for r, _, _ in answers if r is not None]
        assert ok, "nothing was served"
        # One in flight and two waiting: the queue is bounded, the rest are refused.
        assert len(ok) <= 3, f"{len(ok)} answered 200: the queue was not bounded"
        for response, _ in ok:
            assert json_of(response)["model"] == spec.name
        first_answer_s = min(took for _, took in ok)  # held its slot for the engine's 2 s
        for response, took in overloaded:
            body = json_of(response)
            assert body["error"]["code"] == "model_overloaded", body
            retry_after = response.headers.get("retry-after", "")
            assert retry_after.isdigit() and int(retry_after) > 0, retry_after
            # Refused at admission: before even the first admitted request had its answer.
            assert took < first_answer_s, f"a 503 took {took:.2f} s, the first 200 {first_answer_s:.2f} s"

        # Each request left exactly one row, with the code the caller saw.
        rows = platform.audit_rows_for_patient(patient)
        assert len(rows) == BURST, [(r.http_status, r.error_code) for r in rows]
        assert Counter((row.http_status, row.error_code) for row in rows) == Counter(
            {(200, None): len(ok), (503, "model_overloaded"): len(overloaded)})
        assert all(row.outcome == "ok" for row in rows if row.http_status == 200)

        # The model was only busy, never broken: it serves the next request.
        with platform.client(key, timeout=30.0) as client:
            after = client.post(path, content=BODY, headers=headers)
        assert after.status_code == 200, after.text[:200]
        assert len(platform.audit_rows_for_patient(patient)) == BURST + 1
    finally:
        platform.apply()
