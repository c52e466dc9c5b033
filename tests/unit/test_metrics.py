"""Metric names follow Prometheus conventions and label values stay bounded."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

import pytest

from medserve.db.models import utcnow
from hypothesis import given
from hypothesis import strategies as st

from medserve import metrics
from medserve.gateway.audit_scope import AuditRecorder
from medserve.catalog import CatalogEntry
from medserve.errors import AuditUnavailableError, ModelNotFoundError, PermissionDeniedError
from medserve.security.api_keys import Principal
from medserve.security.roles import Role

SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")


class Recording:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, dict[str, str]]] = []

    def record(self, definition, value, labels):  # type: ignore[no-untyped-def]
        self.samples.append((definition.name, value, dict(labels)))

    def named(self, name: str) -> list[tuple[float, dict[str, str]]]:
        return [(value, labels) for metric, value, labels in self.samples if metric == name]


@pytest.fixture
def recording():  # type: ignore[no-untyped-def]
    backend = Recording()
    metrics.use_backend(backend)
    yield backend
    metrics.use_backend(None)


def test_names_follow_prometheus_conventions():
    names = [m.name for m in metrics.all_metrics()]
    assert len(names) == len(set(names))
    for metric in metrics.all_metrics():
        assert re.fullmatch(r"medserve_[a-z0-9_]+", metric.name)
        assert metric.exported_name == "ray_" + metric.name
        assert metric.description
        if metric.kind == "counter":
            assert metric.name.endswith("_total")
        else:
            assert not metric.name.endswith("_total")
        if metric.kind == "histogram":
            assert metric.name.endswith("_seconds") and list(metric.buckets) == sorted(metric.buckets)
        for label in metric.labels:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", label)


def test_request_latency_buckets_cover_imaging_and_llm_calls():
    buckets = metrics.REQUEST_DURATION.buckets
    assert buckets[0] <= 0.05 and buckets[-1] >= 120


def test_no_label_can_carry_patient_or_key_data():
    forbidden = {"patient", "encounter", "clinician", "api_key", "key", "caller", "input", "prompt_text", "message"}
    for metric in metrics.all_metrics():
        assert forbidden.isdisjoint(metric.labels), metric.name


@given(st.text(max_size=300))
def test_bounded_label_values_are_short_identifiers(value):
    label = metrics.bounded(value)
    assert label in {metrics.NONE, metrics.OTHER} or (label == value and SAFE_VALUE.match(label))


def test_bounded_folds_free_text():
    assert metrics.bounded("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert metrics.bounded("0.1.2-q4_1") == "0.1.2-q4_1"
    assert metrics.bounded(None) == "none"
    assert metrics.bounded("What is sepsis? Patient MRN-0042") == "other"
    assert metrics.bounded("x" * 65) == "other"
    assert metrics.status_label(503) == "503" and metrics.status_label(42) == "other"


def test_wrong_label_names_are_a_programming_error():
    with pytest.raises(ValueError):
        metrics._record(metrics.REQUESTS, 1, model="m")


def test_without_ray_recording_is_a_no_op():
    metrics.use_backend(None)
    metrics.record_request(model="m", version="1", operation="chat.completions", status=200,
                           department=None, duration_s=0.1)
    assert isinstance(metrics._current_backend(), metrics.NullBackend)
    metrics.use_backend(None)


def test_spool_records_function_sets_the_gauge(recording):
    metrics.set_audit_spool_records(7)
    ((value, labels),) = recording.named("medserve_audit_spool_records")
    assert value == 7 and set(labels) == {"replica"}


def test_gpu_sampling_is_optional(recording):
    # pynvml absent (or no driver): nothing recorded, nothing raised.
    try:
        import pynvml  # type: ignore[import-not-found] # noqa: F401
    except ImportError:
        assert metrics.sample_gpus("m") == 0
        assert recording.named("medserve_gpu_memory_used_bytes") == []
    else:
        assert metrics.sample_gpus("m") >= 0


# --- the audit scope records one request sample, labels from the catalog only -----

ENTRY = CatalogEntry(model_name="smollm2-135m-instruct", model_version="0.1.2-q4_1", artifact_sha256="ab" * 32,
                     task="llm", engine="llama_cpp", app_name="model-smollm2-demo", deployment="smollm2-demo")
PRINCIPAL = Principal(key_id="k1", name="ward app", role=Role.CLINICAL_APP, department="cardiology")


class FakeWriter:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.records: list[dict] = []

    async def write(self, record, *, durable):  # type: ignore[no-untyped-def]
        self.records.append(record)
        if self.fail:
            raise AuditUnavailableError()


def _recorder(writer: FakeWriter) -> AuditRecorder:
    return AuditRecorder(writer, b"k" * 32, durable=True)  # type: ignore[arg-type]


def test_answered_llm_request_records_request_tokens_and_ttft(recording):
    async def run() -> None:
        async with _recorder(FakeWriter()).scope("chat.completions", None, {"x-patient-id": "MRN-1"}) as audit:
            audit.principal, audit.entry = PRINCIPAL, ENTRY
            audit.prompt_tokens, audit.completion_tokens = 12, 5
            audit.time_to_first_token_s = 0.25  # a whole answer: measured by the replica
        ((_, labels),) = recording.named("medserve_requests_total")
        assert labels == {"model": ENTRY.model_name, "version": ENTRY.model_version, "operation": "chat.completions",
                          "status": "200", "department": "cardiology"}
        assert sorted((v, l["direction"]) for v, l in recording.named("medserve_llm_tokens_total")) == [
            (5, "completion"), (12, "prompt")]
        ((seconds, ttft),) = recording.named("medserve_llm_time_to_first_token_seconds")
        assert ttft["stream"] == "false" and seconds == 0.25
        assert recording.named("medserve_llm_inter_token_latency_seconds") == []
        for _, _, labels in recording.samples:
            assert "MRN-1" not in labels.values()

    asyncio.run(run())


def test_streamed_llm_request_records_ttft_and_inter_token_gaps(recording):
    async def run() -> None:
        async with _recorder(FakeWriter()).scope("chat.completions", None, {}) as audit:
            audit.principal, audit.entry, audit.streamed = PRINCIPAL, ENTRY, True
            start = audit.started
            audit.observe_tokens(1, now=start + 0.5)
            audit.observe_tokens(2, now=start + 0.7)
        ((seconds, ttft),) = recording.named("medserve_llm_time_to_first_token_seconds")
        assert ttft["stream"] == "true" and seconds == pytest.approx(0.5)
        gaps = [value for value, _ in recording.named("medserve_llm_inter_token_latency_seconds")]
        assert gaps == [pytest.approx(0.1), pytest.approx(0.1)]

    asyncio.run(run())


def test_unknown_model_is_never_a_label(recording):
    async def run() -> None:
        with pytest.raises(ModelNotFoundError):
            async with _recorder(FakeWriter()).scope("chat.completions", None, {}) as audit:
                audit.principal = PRINCIPAL
                audit.model_name = f"free text {uuid.uuid4()}"
                raise ModelNotFoundError()
        ((_, labels),) = recording.named("medserve_requests_total")
        assert labels["model"] == "none" and labels["version"] == "none" and labels["status"] == "404"

    asyncio.run(run())


def test_refused_request_counts_with_its_status(recording):
    async def run() -> None:
        with pytest.raises(PermissionDeniedError):
            async with _recorder(FakeWriter()).scope("imaging.analyze", "brain", {}):
                raise PermissionDeniedError()
        ((_, labels),) = recording.named("medserve_requests_total")
        assert labels["status"] == "403" and labels["department"] == "none"
        assert recording.named("medserve_llm_time_to_first_token_seconds") == []

    asyncio.run(run())


def test_failed_audit_write_counts_as_503(recording):
    async def run() -> None:
        with pytest.raises(AuditUnavailableError):
            async with _recorder(FakeWriter(fail=True)).scope("chat.completions", None, {}) as audit:
                audit.principal, audit.entry = PRINCIPAL, ENTRY
        ((_, labels),) = recording.named("medserve_requests_total")
        assert labels["status"] == "503"

    asyncio.run(run())


def test_audit_writer_counts_commits_and_failures(recording, database_url: str, tmp_path: Path):
    from medserve.audit.writer import AuditWriter

    def record() -> dict:
        return {"id": uuid.uuid4(), "created_at": utcnow(), "operation": "x", "outcome": "ok",
                "http_status": 200, "latency_ms": 1.0}

    ok = AuditWriter(database_url, signing_key=b"test-signing-key")
    asyncio.run(ok.write(record(), durable=True))
    ok.close()
    assert sum(value for value, _ in recording.named("medserve_audit_records_written_total")) == 1
    # No spool directory: a record neither the database nor a spool takes is refused.
    broken = AuditWriter(f"sqlite:///{tmp_path / 'missing' / 'no.db'}", signing_key=b"test-signing-key")
    with pytest.raises(AuditUnavailableError):
        asyncio.run(broken.write(record(), durable=True))
    broken.close()
    failures = recording.named("medserve_audit_write_failures_total")
    assert sum(value for value, _ in failures) >= 1 and all(labels == {} for _, labels in failures)


def test_gpu_metrics_cover_only_the_replicas_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert metrics._visible_gpus(8) == [2, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert metrics._visible_gpus(8) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert metrics._visible_gpus(2) == [0, 1]


def test_aggregating_backend_sums_counters_and_keeps_every_observation_until_flushed():
    inner = Recording()
    backend = metrics.AggregatingBackend(inner, interval_s=3600)  # flushed by hand here
    metrics.use_backend(backend)
    try:
        for status in (200, 200, 200, 503):
            metrics.record_request(model="m", version="1", operation="oip.infer", status=status, department="icu",
                                   duration_s=0.01 * status / 100)
        metrics.init_gateway_counters(("keys",))
        metrics.set_audit_queue_depth(7)  # gauges pass straight through
        assert [name for name, *_ in inner.samples] == ["medserve_audit_queue_depth"]
        backend.flush()
    finally:
        metrics.use_backend(None)
    requests = {labels["status"]: value for value, labels in inner.named("medserve_requests_total")}
    assert requests == {"200": 3.0, "503": 1.0}  # one increment per label set, not one per request
    durations = sorted(value for value, _ in inner.named("medserve_request_duration_seconds"))
    assert durations == pytest.approx([0.02, 0.02, 0.02, 0.0503])
    # Counters initialised at zero still reach the exporter (a series at 0, not an absent one).
    assert inner.named("medserve_gateway_unhandled_errors_total") == [(0.0, {})]
    assert inner.named("medserve_gateway_state_refresh_failures_total") == [(0.0, {"state": "keys"})]
    backend.flush()
    assert len(inner.samples) == 1 + 2 + 4 + 4  # nothing recorded twice
