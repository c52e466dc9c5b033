"""Every medserve metric, defined in this one module.

Metrics travel through Ray's own pipeline (``ray.util.metrics``): each replica
hands its samples to the metrics agent on its node, which Prometheus scrapes
on that node's metrics export port, beside Ray's and Ray Serve's own metrics.
Nothing here opens a port, so a replica count or placement change needs no
new scrape target. Ray prefixes every name with ``ray_`` (the names below are
exported as ``ray_medserve_...``; see ``exported_name``) and counters end in
``_total``.

Label names are fixed per metric and label values are bounded: model, version
and engine come from the catalog (never from the request), operation from
code, department from the API key (set by an administrator), status is an
HTTP status code. ``bounded`` folds anything else into ``other``. No patient
identifier, key secret or free text ever becomes a label.

Where no Ray worker is running (the CLI, unit tests) recording is a no-op, or
goes to the backend installed with ``use_backend``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

logger = logging.getLogger("medserve.metrics")

RAY_PREFIX = "ray_"

# Request latency spans a 50 ms imaging call to a two-minute LLM answer.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token and between tokens are shorter.
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
AUDIT_COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Kind = Literal["counter", "gauge", "histogram"]


# eq=False: compared and hashed by identity. Each definition is made once (_define refuses a second of
# the same name), and the aggregate keys every request's samples by it: a generated __hash__ would hash
# all five fields on every lookup.
@dataclass(frozen=True, eq=False)
class MetricDef:
    name: str  # as defined; Prometheus sees exported_name
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    # The labels as a set, made once: every record is checked against it.
    label_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_set", frozenset(self.labels))

    @property
    def exported_name(self) -> str:
        """The name Prometheus stores (counters already end in _total)."""
        return RAY_PREFIX + self.name


_REGISTRY: dict[str, MetricDef] = {}


def _define(name: str, kind: Kind, description: str, labels: tuple[str, ...] = (), buckets=None) -> MetricDef:
    definition = MetricDef(name, kind, description, labels, buckets)
    assert name not in _REGISTRY, name
    _REGISTRY[name] = definition
    return definition


def all_metrics() -> list[MetricDef]:
    return list(_REGISTRY.values())


# --- gateway: one sample per inference request (recorded by the audit scope) ---
REQUESTS = _define(
    "medserve_requests_total", "counter",
    "Inference requests that reached the gateway, answered or refused.",
    ("model", "version", "operation", "status", "department"),
)
REQUEST_DURATION = _define(
    "medserve_request_duration_seconds", "histogram",
    "Gateway time per inference request, from receipt to the audited answer.",
    ("model", "version", "operation", "status"), LATENCY_BUCKETS_S,
)
LLM_TOKENS = _define(
    "medserve_llm_tokens_total", "counter",
    "LLM tokens processed: direction prompt (read) or completion (generated).",
    ("model", "version", "direction"),
)
LLM_TTFT = _define(
    "medserve_llm_time_to_first_token_seconds", "histogram",
    "Time from receipt to the first generated token the caller can see (stream=false: the whole answer).",
    ("model", "version", "stream"), TOKEN_LATENCY_BUCKETS_S,
)
LLM_INTER_TOKEN = _define(
    "medserve_llm_inter_token_latency_seconds", "histogram",
    "Time between consecutive streamed tokens.",
    ("model", "version"), TOKEN_LATENCY_BUCKETS_S,
)
# --- audit trail -----------------------------------------------------------------
AUDIT_QUEUE_DEPTH = _define(
    "medserve_audit_queue_depth", "gauge",
    "Audit records one gateway replica has handed to its audit writer process and not yet seen acknowledged.",
    ("replica",),
)
AUDIT_SPOOL_RECORDS = _define(
    "medserve_audit_spool_records", "gauge",
    "Audit records held in one gateway replica's local spool, not yet in the database.",
    ("replica",),
)
AUDIT_RECORDS_WRITTEN = _define(
    "medserve_audit_records_written_total", "counter",
    "Audit records committed to the database.",
)
AUDIT_WRITE_FAILURES = _define(
    "medserve_audit_write_failures_total", "counter",
    "Audit records whose database commit failed.",
)
AUDIT_COMMIT_DURATION = _define(
    "medserve_audit_commit_duration_seconds", "histogram",
    "Time of one audit batch commit.",
    (), AUDIT_COMMIT_BUCKETS_S,
)
# --- compliance: periodic audit verification and the review backlog (one monitor per cluster) ----
AUDIT_VERIFY_LAST_SUCCESS = _define(
    "medserve_audit_verify_last_success_timestamp_seconds", "gauge",
    "Unix time at which the last periodic audit verification found every hash chain intact.",
)
AUDIT_VERIFY_FAILURES = _define(
    "medserve_audit_verify_failures_total", "counter",
    "Periodic audit verifications that failed: reason problems (a record changed, removed or inserted) "
    "or error (the verification could not run, e.g. the database was unreachable).",
    ("reason",),
)
AUDIT_VERIFY_PROBLEMS = _define(
    "medserve_audit_verify_problems", "gauge",
    "Problems (changed, removed, inserted records, bad checkpoints) the last completed verification found.",
)
AUDIT_VERIFY_INTERVAL = _define(
    "medserve_audit_verify_interval_seconds", "gauge",
    "How often the compliance monitor verifies the audit trail (MEDSERVE_AUDIT_VERIFY_INTERVAL_S).",
)
REVIEW_PENDING = _define(
    "medserve_review_pending_results", "gauge",
    "AI results awaiting a clinician's decision, by the department that asked and how long they have waited "
    "(age: under_1h, 1h_to_24h, 24h_to_7d, over_7d).",
    ("department", "age"),
)
REVIEW_PENDING_OLDEST = _define(
    "medserve_review_pending_oldest_age_seconds", "gauge",
    "Age of the oldest AI result of a department still awaiting a clinician's decision (0: none pending).",
    ("department",),
)
REVIEW_DECISIONS = _define(
    "medserve_review_decisions", "gauge",
    "Clinician decisions on AI results recorded so far, by model version and decision (accept, edit, reject); "
    "read from the reviews table, so (edit + reject) / all is the version's override rate.",
    ("model", "version", "decision"),
)
# --- gateway state and failures ------------------------------------------------------
STATE_REFRESH_FAILURES = _define(
    "medserve_gateway_state_refresh_failures_total", "counter",
    "Reloads of a gateway's last-known-good state (keys, routes, token_usage) from the database that failed.",
    ("state",),
)
STATE_AGE = _define(
    "medserve_gateway_state_age_seconds", "gauge",
    "Seconds since a gateway replica last loaded this state from the database (it answers from that copy).",
    ("state", "replica"),
)
UNHANDLED_ERRORS = _define(
    "medserve_gateway_unhandled_errors_total", "counter",
    "Requests answered 500 internal_error: a failure no typed error covers, which is a bug.",
)
# --- engine replicas ---------------------------------------------------------------
MODEL_INFO = _define(
    "medserve_model_info", "gauge",
    "1 for each model version an engine replica is serving.",
    ("model", "version", "sha256", "engine", "replica"),
)
GPU_MEMORY_USED = _define(
    "medserve_gpu_memory_used_bytes", "gauge",
    "GPU memory in use on a GPU an engine replica sees (NVML).",
    ("model", "replica", "gpu"),
)
GPU_MEMORY_TOTAL = _define(
    "medserve_gpu_memory_total_bytes", "gauge",
    "GPU memory size of a GPU an engine replica sees (NVML).",
    ("model", "replica", "gpu"),
)
GPU_UTILIZATION = _define(
    "medserve_gpu_utilization_ratio", "gauge",
    "GPU busy fraction (0-1) of a GPU an engine replica sees (NVML).",
    ("model", "replica", "gpu"),
)

# --- bounded label values --------------------------------------------------------

NONE = "none"
OTHER = "other"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,63}$")
_DIRECTIONS = frozenset({"prompt", "completion"})


def bounded(value: object) -> str:
    """A label value safe to export: short identifier-like text, else 'other'."""
    if value is None or value == "":
        return NONE
    text = str(value)
    known = _bounded_seen.get(text)
    if known is None:
        known = text if _SAFE.match(text) else OTHER
        if len(_bounded_seen) < 4096:  # label values are few (catalog names, departments, codes)
            _bounded_seen[text] = known
    return known


_bounded_seen: dict[str, str] = {}


def status_label(status: int) -> str:
    return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER


# --- backends --------------------------------------------------------------------


class Backend(Protocol):
    def record(self, definition: MetricDef, value: float, labels: dict[str, str]) -> None: ...


class NullBackend:
    def record(self, definition: MetricDef, value: float, labels: dict[str, str]) -> None:
        return None


class RayBackend:
    """ray.util.metrics objects, created in the worker on first use."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _object(self, definition: MetricDef) -> Any:
        existing = self._objects.get(definition.name)
        if existing is not None:
            return existing
        from ray.util import metrics as ray_metrics

        with self._lock:
            if definition.name not in self._objects:
                if definition.kind == "counter":
                    made = ray_metrics.Counter(definition.name, definition.description, definition.labels)
                elif definition.kind == "gauge":
                    made = ray_metrics.Gauge(definition.name, definition.description, definition.labels)
                else:
                    made = ray_metrics.Histogram(
                        definition.name, definition.description, list(definition.buckets or ()), definition.labels
                    )
                self._objects[definition.name] = made
            return self._objects[definition.name]

    def record(self, definition: MetricDef, value: float, labels: dict[str, str]) -> None:
        metric = self._object(definition)
        tags = labels or None
        if definition.kind == "counter":
            if value > 0:
                metric.inc(value, tags=tags)
            else:
                # Create the series at zero, so rate() and alerts see "no
                # failures" instead of "no data" (Counter.inc refuses 0).
                metric._record(0.0, tags=tags)
        elif definition.kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)


class AggregatingBackend:
    """Requests add to plain per-label-set state; a daemon thread hands the totals to Ray every interval.

    Each ``ray.util.metrics`` call costs several microseconds of the replica's
    CPU (tag validation, the exporter's bookkeeping), and a request records
    two to six samples: paid per request, that is a measurable share of the
    gateway's cost. Here a request only adds to a dict under a lock; counters
    reach Ray as one increment per label set per interval, histogram
    observations as the same values recorded off the request path, and
    gauges (set by the samplers' own threads) pass straight through. Ray's
    agent exports on its own interval of seconds, so a 1 s flush adds no
    visible delay.
    """

    def __init__(self, inner: Backend, interval_s: float = 1.0) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._counters: dict[tuple[MetricDef, tuple[tuple[str, str], ...]], float] = {}
        self._observations: dict[tuple[MetricDef, tuple[tuple[str, str], ...]], list[float]] = {}
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="medserve-metrics-flush", daemon=True)
        self._thread.start()

    def record(self, definition: MetricDef, value: float, labels: dict[str, str]) -> None:
        if definition.kind == "gauge":
            self._inner.record(definition, value, labels)
            return
        self.add(definition, value, tuple(labels.items()))

    def add(self, definition: MetricDef, value: float, items: tuple[tuple[str, str], ...]) -> None:
        """A counter or histogram sample whose labels are already (name, value) pairs in order."""
        key = (definition, items)
        with self._lock:
            if definition.kind == "counter":
                self._count(key, value)
            else:
                self._observe(key, value)

    def add_request(self, labels: "_RequestLabels", duration_s: float) -> None:
        """One request's count and duration, under one lock, with keys built once per label set."""
        with self._lock:
            self._count(labels.count_slot, 1.0)
            self._observe(labels.duration_slot, duration_s)

    def _count(self, key: tuple[MetricDef, tuple[tuple[str, str], ...]], value: float) -> None:
        self._counters[key] = self._counters.get(key, 0.0) + value  # with the lock held

    def _observe(self, key: tuple[MetricDef, tuple[tuple[str, str], ...]], value: float) -> None:
        observed = self._observations.get(key)  # with the lock held
        if observed is None:
            self._observations[key] = [value]
        else:
            observed.append(value)

    def flush(self) -> None:
        with self._lock:
            counters, self._counters = self._counters, {}
            observations, self._observations = self._observations, {}
        for (definition, labels), total in counters.items():
            self._inner.record(definition, total, dict(labels))  # a total of 0 creates the series at zero
        for (definition, labels), values in observations.items():
            tags = dict(labels)
            for value in values:
                self._inner.record(definition, value, tags)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval_s)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a metrics failure must never stop the flushing
                logger.debug("flushing metrics failed", exc_info=True)


_backend: Backend | None = None


def use_backend(backend: Backend | None) -> None:
    """Install a backend (tests); None returns to automatic choice."""
    global _backend
    _backend = backend


def _current_backend() -> Backend:
    global _backend
    if _backend is None:
        try:
            import ray

            _backend = AggregatingBackend(RayBackend()) if ray.is_initialized() else NullBackend()
        except Exception:  # noqa: BLE001 - metrics never break a request
            _backend = NullBackend()
    return _backend


def flush() -> None:
    """Hand what this process aggregated to Ray now (replica shutdown: nothing counted is lost)."""
    backend = _backend
    if isinstance(backend, AggregatingBackend):
        backend.flush()


def _check_labels(definition: MetricDef, labels: dict[str, str]) -> None:
    if labels.keys() != definition.label_set:
        raise ValueError(f"{definition.name} takes labels {definition.labels}, got {tuple(labels)}")


def _record(definition: MetricDef, value: float, **labels: str) -> None:
    _check_labels(definition, labels)
    try:
        _current_backend().record(definition, float(value), labels)
    except Exception:  # noqa: BLE001 - a metrics failure must never fail a request
        logger.debug("recording %s failed", definition.name, exc_info=True)


# --- what the platform calls -----------------------------------------------------


def replica_id() -> str:
    """This Serve replica's id (bounded by the replica count), else the process id."""
    try:
        from ray import serve

        return bounded(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica
        return bounded(f"pid-{os.getpid()}")


class _RequestLabels(NamedTuple):
    """The label sets one kind of request records, as dicts and as the aggregate's ready keys."""

    count: dict[str, str]
    duration: dict[str, str]
    # The AggregatingBackend's keys: (definition, label pairs).
    count_slot: tuple[MetricDef, tuple[tuple[str, str], ...]]
    duration_slot: tuple[MetricDef, tuple[tuple[str, str], ...]]


# (model, version, operation, status, department) -> its label sets, bounded and checked once: every
# request of the gateway records them, and its label values are few.
_request_labels: dict[tuple[Any, ...], _RequestLabels] = {}


def _labels_for_request(
    model: str | None, version: str | None, operation: str, status: int, department: str | None
) -> _RequestLabels:
    cache_key = (model, version, operation, status, department)
    labels = _request_labels.get(cache_key)
    if labels is None:
        duration = {"model": bounded(model), "version": bounded(version), "operation": bounded(operation),
                    "status": status_label(status)}
        count = {**duration, "department": bounded(department)}
        _check_labels(REQUESTS, count)
        _check_labels(REQUEST_DURATION, duration)
        labels = _RequestLabels(count, duration, (REQUESTS, tuple(count.items())),
                                (REQUEST_DURATION, tuple(duration.items())))
        if len(_request_labels) < 4096:
            _request_labels[cache_key] = labels
    return labels


def record_request(
    *, model: str | None, version: str | None, operation: str, status: int, department: str | None,
    duration_s: float,
) -> None:
    """One inference request, answered or refused; model and version come from the catalog entry."""
    labels = _labels_for_request(model, version, operation, status, department)
    duration_s = duration_s if duration_s > 0.0 else 0.0
    try:
        backend = _current_backend()
        if isinstance(backend, AggregatingBackend):  # the replica's case: no dict to tuple per request
            backend.add_request(labels, duration_s)
        else:
            backend.record(REQUESTS, 1.0, labels.count)
            backend.record(REQUEST_DURATION, duration_s, labels.duration)
    except Exception:  # noqa: BLE001 - a metrics failure must never fail a request
        logger.debug("recording a request failed", exc_info=True)


def record_tokens(*, model: str, version: str, prompt: int | None, completion: int | None) -> None:
    for direction, count in (("prompt", prompt), ("completion", completion)):
        if count:
            _record(LLM_TOKENS, count, model=bounded(model), version=bounded(version), direction=direction)


def observe_time_to_first_token(model: str, version: str, seconds: float, *, streamed: bool) -> None:
    """Receipt to first generated token (streams: at the gateway; whole answers: in the replica)."""
    _record(LLM_TTFT, max(seconds, 0.0), model=bounded(model), version=bounded(version),
            stream="true" if streamed else "false")


def observe_inter_token_latency(model: str, version: str, seconds: float) -> None:
    """Gap between two consecutive streamed tokens (or chunks) sent to the caller."""
    _record(LLM_INTER_TOKEN, max(seconds, 0.0), model=bounded(model), version=bounded(version))


def record_audit_commit(*, records: int, failed: bool, duration_s: float) -> None:
    _record(AUDIT_WRITE_FAILURES if failed else AUDIT_RECORDS_WRITTEN, records)
    _record(AUDIT_COMMIT_DURATION, max(duration_s, 0.0))


def init_gateway_counters(states: tuple[str, ...] = ()) -> None:
    """Export the gateway's failure counters at zero from the start: 'no failures' is data, not absence."""
    _record(AUDIT_RECORDS_WRITTEN, 0)
    _record(AUDIT_WRITE_FAILURES, 0)
    _record(UNHANDLED_ERRORS, 0)
    for state in states:
        _record(STATE_REFRESH_FAILURES, 0, state=bounded(state))


def record_state_refresh_failure(state: str) -> None:
    _record(STATE_REFRESH_FAILURES, 1, state=bounded(state))


def set_state_age(state: str, age_s: float) -> None:
    _record(STATE_AGE, max(age_s, 0.0), state=bounded(state), replica=replica_id())


def record_unhandled_error() -> None:
    _record(UNHANDLED_ERRORS, 1)


VERIFY_FAILURE_REASONS = ("problems", "error")
PENDING_AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("under_1h", 3600.0), ("1h_to_24h", 86400.0), ("24h_to_7d", 7 * 86400.0), ("over_7d", float("inf")),
)
REVIEW_DECISION_VALUES = ("accept", "edit", "reject")


def init_audit_verify_metrics() -> None:
    """The monitor's failure counters at zero, from its start."""
    for reason in VERIFY_FAILURE_REASONS:
        _record(AUDIT_VERIFY_FAILURES, 0, reason=reason)


def record_audit_verification_failure(reason: Literal["problems", "error"]) -> None:
    """One periodic verification that found problems, or could not run."""
    _record(AUDIT_VERIFY_FAILURES, 1, reason=reason)


def set_audit_verify_state(*, interval_s: float, last_success: float | None, problems: int | None) -> None:
    """The monitor's gauges. Set again on every export round, not only when a verification ends: Ray's
    agent stops exporting a gauge nobody sets for a while, and a verification runs only every interval."""
    _record(AUDIT_VERIFY_INTERVAL, interval_s)
    if last_success is not None:
        _record(AUDIT_VERIFY_LAST_SUCCESS, last_success)
    if problems is not None:
        _record(AUDIT_VERIFY_PROBLEMS, problems)


def set_review_backlog(
    pending: dict[str, dict[str, int]], oldest_s: dict[str, float], decisions: dict[tuple[str, str, str], int]
) -> None:
    """The review backlog as read from the database: counts per department and age bucket, the oldest
    pending age per department, and decisions per (model, version, decision). The caller passes every
    label set it ever exported, at zero when it no longer has any, so a cleared backlog reads 0."""
    for department, by_age in pending.items():
        for age, _upper in PENDING_AGE_BUCKETS:
            _record(REVIEW_PENDING, by_age.get(age, 0), department=bounded(department), age=age)
    for department, age_s in oldest_s.items():
        _record(REVIEW_PENDING_OLDEST, max(age_s, 0.0), department=bounded(department))
    for (model, version, decision), count in decisions.items():
        _record(REVIEW_DECISIONS, count, model=bounded(model), version=bounded(version), decision=bounded(decision))


def set_audit_spool_records(count: int) -> None:
    """Records now in this process's local audit spool (the sampler exports it per replica)."""
    _record(AUDIT_SPOOL_RECORDS, max(int(count), 0), replica=replica_id())


def set_audit_queue_depth(depth: int) -> None:
    _record(AUDIT_QUEUE_DEPTH, depth, replica=replica_id())


def set_model_info(*, model: str, version: str, sha256: str | None, engine: str) -> None:
    _record(MODEL_INFO, 1, model=bounded(model), version=bounded(version), sha256=bounded(sha256),
            engine=bounded(engine), replica=replica_id())


_nvml: Any = None
_nvml_tried = False


def _nvml_module() -> Any:
    """pynvml, initialised once; None without pynvml or an NVIDIA driver (GPU metrics are optional)."""
    global _nvml, _nvml_tried
    if not _nvml_tried:
        _nvml_tried = True
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # noqa: BLE001
            _nvml = None
    return _nvml


def sample_gpus(model: str) -> int:
    """Export NVML memory and utilisation for the GPUs this process sees; 0 when none (or no pynvml)."""
    pynvml = _nvml_module()
    if pynvml is None:
        return 0
    replica = replica_id()
    indices = _visible_gpus(pynvml.nvmlDeviceGetCount())
    for index in indices:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
        labels = {"model": bounded(model), "replica": replica, "gpu": str(index)}
        _record(GPU_MEMORY_USED, memory.used, **labels)
        _record(GPU_MEMORY_TOTAL, memory.total, **labels)
        _record(GPU_UTILIZATION, utilization.gpu / 100.0, **labels)
    return len(indices)


def _visible_gpus(count: int) -> list[int]:
    """The GPUs Ray assigned to this replica (CUDA_VISIBLE_DEVICES); NVML itself sees the whole node."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    return [int(item) for item in visible.split(",") if item.strip().isdigit() and int(item) < count]


class Sampler:
    """A daemon thread that refreshes gauges every few seconds (queue depth, spool, model info, GPU)."""

    def __init__(self, sample: Callable[[], None], interval_s: float = 5.0) -> None:
        self._sample = sample
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medserve-metrics-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            try:
                self._sample()
            except Exception:  # noqa: BLE001
                logger.debug("metrics sample failed", exc_info=True)
            if self._stop.wait(self._interval_s):
                return


def gateway_sampler(
    queue_depth: Callable[[], int], spool_records: Callable[[], int],
    state_ages: Callable[[], dict[str, float]] = dict, interval_s: float = 5.0,
) -> Sampler:
    """Gateway replica gauges: audit queue depth and spool size (read from the audit writer), and the
    age of each last-known-good state."""

    def sample() -> None:
        set_audit_queue_depth(queue_depth())
        set_audit_spool_records(spool_records())
        for state, age in state_ages().items():
            set_state_age(state, age)

    return Sampler(sample, interval_s)


def engine_sampler(*, model: str, version: str, sha256: str | None, engine: str, interval_s: float = 5.0) -> Sampler:
    """Engine replica gauges: what it serves, and its GPUs when NVML is there."""

    def sample() -> None:
        set_model_info(model=model, version=version, sha256=sha256, engine=engine)
        sample_gpus(model)

    return Sampler(sample, interval_s)
