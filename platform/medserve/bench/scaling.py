"""Watch a deployment's replicas through the Ray dashboard while load changes.

Used by `medserve bench --autoscale` (which reports the timings) and by the
autoscaling integration test (which checks the direction, not the speed).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from medserve.controlplane.render import ENGINE_DEPLOYMENT


@dataclass(frozen=True)
class ReplicaSample:
    at_s: float  # seconds since the watch started
    target: int  # replicas the autoscaler wants
    running: int  # replicas in state RUNNING


def replica_counts(target: Any, app_name: str, deployment: str = ENGINE_DEPLOYMENT) -> tuple[int, int]:
    """(target_num_replicas, replicas RUNNING) of one deployment, from GET /api/serve/applications/."""
    body = target.serve_details()
    details = (body.get("applications") or {}).get(app_name, {}).get("deployments", {}).get(deployment)
    if not details:
        return 0, 0
    running = sum(1 for replica in details.get("replicas") or [] if replica.get("state") == "RUNNING")
    return int(details.get("target_num_replicas") or 0), running


@dataclass
class ReplicaWatch:
    """Samples replica counts every ``interval_s`` in a background thread."""

    target: Any
    app_name: str
    interval_s: float = 0.5
    samples: list[ReplicaSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="replica-watch", daemon=True)

    def start(self) -> "ReplicaWatch":
        self._thread.start()
        return self

    def stop(self) -> list[ReplicaSample]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.samples

    def now_s(self) -> float:
        return time.monotonic() - self._started

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wanted, running = replica_counts(self.target, self.app_name)
            except Exception:  # noqa: BLE001 - a dashboard hiccup costs one sample, not the watch
                wanted = running = -1
            if wanted >= 0:
                self.samples.append(ReplicaSample(self.now_s(), wanted, running))
            self._stop.wait(self.interval_s)

    def first(self, predicate: Any, after_s: float = 0.0) -> float | None:
        """When (seconds since the watch started) a sample first met the predicate, after ``after_s``."""
        for sample in list(self.samples):
            if sample.at_s >= after_s and predicate(sample):
                return sample.at_s
        return None


@dataclass(frozen=True)
class ScalingTimes:
    """What one load step showed, in seconds from the load's start (up) or end (down)."""

    min_replicas: int
    peak_running: int
    scale_up_decided_s: float | None
    new_replicas_serving_s: float | None
    back_to_min_s: float | None

    def summary(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "peak_running": self.peak_running,
            "scale_up_decided_s": _round(self.scale_up_decided_s),
            "new_replicas_serving_s": _round(self.new_replicas_serving_s),
            "back_to_min_s": _round(self.back_to_min_s),
        }


def scaling_times(watch: ReplicaWatch, min_replicas: int, load_started_s: float, load_ended_s: float) -> ScalingTimes:
    decided = watch.first(lambda s: s.target > min_replicas, load_started_s)
    serving = watch.first(lambda s: s.running > min_replicas, load_started_s)
    back = watch.first(lambda s: s.target == min_replicas and s.running == min_replicas, load_ended_s)
    peak = max((s.running for s in watch.samples), default=0)
    return ScalingTimes(
        min_replicas=min_replicas,
        peak_running=peak,
        scale_up_decided_s=None if decided is None else decided - load_started_s,
        new_replicas_serving_s=None if serving is None else serving - load_started_s,
        back_to_min_s=None if back is None else back - load_ended_s,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
