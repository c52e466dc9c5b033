"""`medserve bench`: fixed-concurrency load against raw Ray Serve and the gateway, side by side.

One run starts a private Ray (Ray Serve's fastest configuration by default:
RAY_SERVE_THROUGHPUT_OPTIMIZED=1, direct ingress), deploys the raw no-op
baseline beside medserve, and measures in alternating rounds, so a
neighbour's load on the machine falls on every path alike:

- raw Ray Serve on a no-op deployment (no authentication, no audit);
- the gateway on the noop engine loaded in the gateway (placement gateway);
- the gateway on the noop engine in replicas of its own (one DeploymentHandle hop);
- the same gateway paths with audit durability ``batched`` (one redeploy of the gateway);
- the brain-MRI classifier on a real DICOM instance, and the SmolLM2 demo's tokens per second;
- with ``--autoscale``: a load step against a noop model with a delay, and when
  its replicas scale up, serve, and come back down.

Every gateway request authenticates, is audited (one row each) and metered.
Ratios, not absolute numbers, are what carry from this machine to another.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medserve.bench.cpu import cpu_meter
from medserve.bench.loadgen import Answer, LoadResult, Request, json_request, measure
from medserve.bench.profile import Profile
from medserve.bench.private import PrivatePlatform, start_private_platform, wait_for_answer
from medserve.bench.raw_app import RAW_APP, RAW_ROUTE, raw_application
from medserve.bench.scaling import ReplicaWatch, ScalingTimes, scaling_times
from medserve.controlplane.render import GATEWAY_APP, app_name_for
from medserve.specs import DeploymentSpec, PipelineSpec, load_catalog, parse_spec

NOOP_BODY = b"\x89PNG-bench-" + bytes(53)  # 64 bytes; the noop engine never reads it
IMAGING_MODEL = "brain-mri-tumour"
LLM_MODEL = "smollm2-demo"


def noop_spec(name: str, placement: str, *, delay_ms: float = 0.0, max_ongoing_requests: int = 256,
              autoscaling: dict[str, Any] | None = None, num_cpus: float = 0.25) -> DeploymentSpec:
    """A no-op model deployment (built-in engine noop), its parameter digest pinned here."""
    from medserve.engines.builtin import parameter_sha256

    document: dict[str, Any] = {
        "name": name,
        "description": "Benchmark stand-in: answers without reading the input.",
        "model": {
            "name": name, "version": "1", "task": "imaging", "engine": "noop",
            "artifact": {"uri": "builtin://noop"}, "parameters": {"delay_ms": delay_ms},
        },
        "resources": {"num_cpus": num_cpus},
        "autoscaling": {"max_ongoing_requests": max_ongoing_requests, **(autoscaling or {})},
        "placement": placement,
        "alias": None,
        "model_card": {"intended_use": "Platform benchmarks and capacity checks only.",
                       "regulatory_status": "not a medical device"},
    }
    unpinned = parse_spec(document)
    assert isinstance(unpinned, DeploymentSpec)
    document["model"]["artifact"]["sha256"] = parameter_sha256(unpinned)
    spec = parse_spec(document)
    assert isinstance(spec, DeploymentSpec)
    return spec


@dataclass
class Scenario:
    label: str
    url: str | list[str]
    request: Request
    concurrency: int
    count_units: Callable[[Answer], int] | None = None
    # CPU seconds of the processes this path runs in (see bench/cpu.py), read at the window's edges.
    cpu_of: Callable[[], float] | None = None
    # A py-spy recording of this path's processes during its first measured round.
    profile: Profile | None = None
    top_frames: list[tuple[str, float]] = field(default_factory=list)
    results: list[LoadResult] = field(default_factory=list)

    def run(self, duration_s: float, warmup_s: float) -> None:
        profiling = self.profile is not None and not self.results
        if profiling:
            self.profile.start_after(warmup_s, duration_s)  # type: ignore[union-attr]
        self.results.append(measure(self.url, self.request, concurrency=self.concurrency, duration_s=duration_s,
                                    warmup_s=warmup_s, label=self.label, count_units=self.count_units,
                                    cpu_of=self.cpu_of))
        if profiling:
            self.top_frames = self.profile.finish()  # type: ignore[union-attr]

    def combined(self) -> LoadResult:
        """All rounds as one measurement."""
        first = self.results[0]
        statuses: dict[int, int] = {}
        for result in self.results:
            for status, count in result.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        return LoadResult(
            label=self.label, concurrency=first.concurrency,
            duration_s=sum(r.duration_s for r in self.results), requests=sum(r.requests for r in self.results),
            errors=sum(r.errors for r in self.results), statuses=statuses,
            latencies_s=[latency for r in self.results for latency in r.latencies_s],
            units=sum(r.units for r in self.results),
            cpu_s=_total(r.cpu_s for r in self.results),
            machine_cpu_s=_total(r.machine_cpu_s for r in self.results),
            client_cpu_s=_total(r.client_cpu_s for r in self.results),
        )


def _total(values: Iterable[float | None]) -> float | None:
    """The sum, or None when any round did not measure it."""
    found = list(values)
    return None if any(value is None for value in found) else sum(value or 0.0 for value in found)


def _alternate(scenarios: list[Scenario], rounds: int, duration_s: float, warmup_s: float) -> list[LoadResult]:
    for _ in range(rounds):
        for scenario in scenarios:
            scenario.run(duration_s, warmup_s)
    return [scenario.combined() for scenario in scenarios]


def _completion_tokens(answer: Answer) -> int:
    return int(json.loads(answer.body)["usage"]["completion_tokens"])


@dataclass
class BenchOptions:
    concurrency: int = 32
    duration_s: float = 10.0
    rounds: int = 2
    warmup_s: float = 2.0
    throughput_optimized: bool = True
    imaging: bool = True
    llm: bool = True
    autoscale: bool = False
    replicas: int = 1
    raw_access_log: bool = True  # Ray Serve's access log in the baseline's replica, as Serve ships it
    deployments_dir: Path = Path("deployments")
    profile_dir: Path | None = None  # py-spy recordings of raw's and the gateway's replicas


@dataclass
class BenchReport:
    options: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    scaling: dict[str, Any] | None = None
    # Path label -> its replica's top frames by self time, as [frame, share of samples].
    profiles: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def add_ratio(self, name: str, path: LoadResult, baseline: LoadResult) -> None:
        self.ratios.append({
            "comparison": name,
            "throughput_ratio": round(path.throughput / baseline.throughput, 3) if baseline.throughput else None,
            "median_added_ms": round(path.median_ms - baseline.median_ms, 3),
        })

    def markdown(self) -> str:
        lines = [
            f"concurrency {self.options['concurrency']}, {self.options['rounds']} x {self.options['duration_s']:g} s "
            f"per path, {self.options['replicas']} replica(s) of the raw baseline and of the gateway, "
            f"Ray Serve {'throughput-optimized (direct ingress)' if self.options['throughput_optimized'] else 'default (HTTP proxy)'}",
            "",
            "| path | conc. | requests | errors | req/s | p50 ms | p95 ms | p99 ms | tokens/s | CPU µs/req "
            "| machine µs/req | client µs/req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def us(value: float | None) -> str:
            return "" if value is None else f"{value:.0f}"

        for r in self.results:
            tokens = f"{r['units_per_s']:.1f}" if r["units"] else ""
            lines.append(f"| {r['label']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                         f"{r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{tokens} | {us(r.get('cpu_us_per_request'))} | {us(r.get('machine_cpu_us_per_request'))} | "
                         f"{us(r.get('client_cpu_us_per_request'))} |")
        lines += ["", "| comparison | throughput ratio | median added (ms) |", "|---|---:|---:|"]
        for ratio in self.ratios:
            lines.append(f"| {ratio['comparison']} | {ratio['throughput_ratio']} | {ratio['median_added_ms']:+.2f} |")
        for label, frames in self.profiles.items():
            lines += ["", f"py-spy, {label}: top frames by self time (share of the replica's samples)", "",
                      "| self | frame |", "|---:|---|"]
            lines += [f"| {share:.1%} | `{frame}` |" for frame, share in frames]
        if self.scaling:
            s = self.scaling
            lines += ["", f"autoscaling (load step of {s['load_concurrency']} against {s['model']}, "
                          f"min {s['min_replicas']}, max {s['max_replicas']}, upscale_delay_s {s['upscale_delay_s']}, "
                          f"downscale_delay_s {s['downscale_delay_s']}): scale-up decided after "
                          f"{s['scale_up_decided_s']} s, new replicas serving after {s['new_replicas_serving_s']} s, "
                          f"peak {s['peak_running']} replicas; back to {s['min_replicas']} "
                          f"{s['back_to_min_s']} s after the load stopped; "
                          f"{s['requests']} requests, {s['errors']} errors"]
        return "\n".join(lines)


def _replica_pids(platform: PrivatePlatform, *app_names: str) -> list[int]:
    """Process ids of the running replicas of these Serve applications."""
    applications = platform.target.serve_details().get("applications") or {}
    return [
        replica["pid"]
        for name in app_names
        for deployment in (applications.get(name) or {}).get("deployments", {}).values()
        for replica in deployment.get("replicas", [])
        if replica.get("state") == "RUNNING" and replica.get("pid")
    ]


def _ready(platform: PrivatePlatform, headers: dict[str, str],
           replicas: int) -> tuple[list[str], list[str], list[str]]:
    """The base URLs of the raw baseline's replicas, of the gateway's own port (what `up` ships: one port
    its replicas share) and of the gateway replicas' Serve ports (direct ingress, or the proxy), once all answer."""
    deadline = time.monotonic() + 120
    while True:
        urls = platform.ingress_urls()
        raw_urls = urls.get(RAW_APP) or [platform.proxy_url]
        serve_urls = urls.get(GATEWAY_APP) or [platform.proxy_url]
        on_proxy = raw_urls == [platform.proxy_url]
        if on_proxy or (len(raw_urls) >= replicas and len(serve_urls) >= replicas) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    # Direct ingress or proxy, the baseline answers under its route prefix.
    for url in raw_urls:
        wait_for_answer(url, RAW_ROUTE, {}, NOOP_BODY)
    for url in [platform.gateway_url, *serve_urls]:
        wait_for_answer(url, "/v1/imaging/bench-noop", headers, NOOP_BODY)
    return raw_urls, [platform.gateway_url], serve_urls


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> BenchReport:
    catalog = {spec.name: spec for spec in load_catalog(options.deployments_dir) if isinstance(spec, DeploymentSpec)}
    imaging = catalog[IMAGING_MODEL] if options.imaging else None
    llm = catalog[LLM_MODEL] if options.llm else None
    extra: list[DeploymentSpec | PipelineSpec] = [spec for spec in (imaging, llm) if spec is not None]
    in_gateway = noop_spec("bench-noop", "gateway")
    by_handle = noop_spec("bench-noop-replica", "replicas")
    specs: list[DeploymentSpec | PipelineSpec] = [in_gateway, by_handle, *extra]
    report = BenchReport(options={
        "concurrency": options.concurrency, "duration_s": options.duration_s, "rounds": options.rounds,
        "throughput_optimized": options.throughput_optimized, "replicas": options.replicas,
        "raw_access_log": options.raw_access_log,
    })
    log("starting a private Ray" + (" (RAY_SERVE_THROUGHPUT_OPTIMIZED=1)" if options.throughput_optimized else ""))
    # Logical CPUs (Ray's scheduling budget, not cores): the demo models, the
    # baseline and the gateway reserve 2.5 of them between them.
    platform = start_private_platform(
        throughput_optimized=options.throughput_optimized, ray_num_cpus=max(4, 2 * options.replicas + 2),
        extra_apps=[raw_application(max_ongoing_requests=256, num_cpus=0.25, replicas=options.replicas,
                                    access_log=options.raw_access_log)],
        gateway_replicas=options.replicas,
    )
    headers = {"Authorization": f"Bearer {platform.key}", "Content-Type": "image/png"}
    noop_request = Request("POST", "/v1/imaging/bench-noop", NOOP_BODY, headers)
    handle_request = Request("POST", "/v1/imaging/bench-noop-replica", NOOP_BODY, headers)
    raw_request = Request("POST", RAW_ROUTE, NOOP_BODY, {"Content-Type": "image/png"})
    c = options.concurrency
    # The strict phase also sends the gateway's load through Serve's own port and request layer.
    via = "Serve's direct ingress" if options.throughput_optimized else "Serve's proxy"
    try:
        for durability in ("strict", "batched"):
            log(f"deploying (audit durability {durability})")
            platform.apply(specs, audit_durability=durability)
            raw_url, gateway_url, serve_url = _ready(platform, headers, options.replicas)
            log(f"raw Ray Serve at {raw_url} {RAW_ROUTE}, gateway at {gateway_url} (its own port) and "
                f"{serve_url} (Serve's); measuring")
            # CPU per request: raw's replicas; every gateway process (writer included); by handle, the
            # noop model's replicas too.
            raw_cpu = cpu_meter(lambda: _replica_pids(platform, RAW_APP))
            gateway_cpu = cpu_meter(lambda: _replica_pids(platform, GATEWAY_APP))
            hop_cpu = cpu_meter(lambda: _replica_pids(platform, GATEWAY_APP, app_name_for(by_handle)))
            scenarios = [
                Scenario(f"raw Ray Serve no-op ({durability} phase)", raw_url, raw_request, c, cpu_of=raw_cpu),
                Scenario(f"gateway, noop in gateway, audit {durability}", gateway_url, noop_request, c,
                         cpu_of=gateway_cpu),
                Scenario(f"gateway, noop by handle, audit {durability}", gateway_url, handle_request, c,
                         cpu_of=hop_cpu),
            ]
            if durability == "strict":
                # The same gateway through Ray Serve's own port and request layer: what the gateway's own
                # port saves (gateway/listener.py), in the same run.
                scenarios.append(Scenario(f"gateway via {via}, noop in gateway, audit strict", serve_url,
                                          noop_request, c, cpu_of=gateway_cpu))
            if options.profile_dir is not None and durability == "strict":
                for scenario, app in zip(scenarios[:2], (RAW_APP, GATEWAY_APP)):
                    scenario.profile = Profile(lambda app=app: _replica_pids(platform, app),  # type: ignore[misc]
                                               options.profile_dir / f"{app}-{durability}.txt")
                # By handle: the gateway's replica and the model's (one recording each, then together).
                scenarios[2].profile = Profile(
                    lambda: _replica_pids(platform, GATEWAY_APP, app_name_for(by_handle)),
                    options.profile_dir / f"by-handle-{durability}.txt")
            raw, local, hop, *through_serve = _alternate(scenarios, options.rounds, options.duration_s,
                                                         options.warmup_s)
            report.profiles.update({s.label: s.top_frames for s in scenarios if s.top_frames})
            report.results += [r.summary() for r in (raw, local, hop, *through_serve)]
            report.add_ratio(f"gateway (noop in gateway, {durability}) / raw", local, raw)
            report.add_ratio(f"gateway (noop by handle, {durability}) / raw", hop, raw)
            for result in through_serve:
                report.add_ratio(f"gateway via {via} (noop in gateway, strict) / raw", result, raw)
            if durability == "strict":
                _measure_models(options, imaging, llm, platform, gateway_url, report, log)
        if options.autoscale:
            report.scaling = _measure_autoscaling(options, platform, log)
    finally:
        platform.stop()
    return report


def _measure_models(options: BenchOptions, imaging: DeploymentSpec | None, llm: DeploymentSpec | None,
                    platform: PrivatePlatform, gateway_url: list[str], report: BenchReport,
                    log: Callable[[str], None]) -> None:
    auth = {"Authorization": f"Bearer {platform.key}"}
    if imaging is not None:
        from pydicom.data import get_testdata_file

        dicom = Path(str(get_testdata_file("MR_small.dcm"))).read_bytes()
        request = Request("POST", f"/v1/imaging/{imaging.model.name}", dicom, {**auth, "Content-Type": "application/dicom"})
        log("measuring the imaging model")
        result = Scenario(f"gateway, {IMAGING_MODEL} (MR_small.dcm)", gateway_url, request,
                          min(4, options.concurrency))
        result.run(options.duration_s, options.warmup_s)
        report.results.append(result.combined().summary())
    if llm is not None:
        body = {"model": llm.model.name, "messages": [{"role": "user", "content": "Describe how to take a blood pressure reading."}],
                "max_tokens": 64, "temperature": 0, "seed": 1}
        request = json_request("/v1/chat/completions", body, auth)
        log("measuring LLM tokens per second")
        scenario = Scenario(f"gateway, {llm.model.name} chat (64 tokens)", gateway_url, request, 1, _completion_tokens)
        scenario.run(max(options.duration_s, 15.0), options.warmup_s)
        report.results.append(scenario.combined().summary())


def _measure_autoscaling(options: BenchOptions, platform: PrivatePlatform, log: Callable[[str], None]) -> dict[str, Any]:
    """A load step against a noop model whose requests hold a slot for 200 ms."""
    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 2,
               "downscale_delay_s": 5}
    spec = noop_spec("bench-scaling", "replicas", delay_ms=200, max_ongoing_requests=4, autoscaling=scaling,
                     num_cpus=0.1)
    log("deploying the autoscaling model")
    platform.apply([spec], audit_durability="batched")
    headers = {"Authorization": f"Bearer {platform.key}", "Content-Type": "image/png"}
    gateway_url = platform.gateway_url
    wait_for_answer(gateway_url, "/v1/imaging/bench-scaling", headers, NOOP_BODY)
    watch = ReplicaWatch(platform.target, app_name_for(spec)).start()
    load_concurrency = 16
    log(f"load step: {load_concurrency} connections for 40 s")
    started = watch.now_s()
    result = measure(gateway_url, Request("POST", "/v1/imaging/bench-scaling", NOOP_BODY, headers),
                     concurrency=load_concurrency, duration_s=40.0, warmup_s=0.0, label="scaling step")
    ended = watch.now_s()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and watch.first(lambda s: s.target == 1 and s.running == 1, ended) is None:
        time.sleep(1.0)
    watch.stop()
    times: ScalingTimes = scaling_times(watch, scaling["min_replicas"], started, ended)
    return {"model": spec.name, "load_concurrency": load_concurrency, **scaling, **times.summary(),
            "requests": result.requests, "errors": result.errors}
