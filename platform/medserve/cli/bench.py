"""`medserve bench`: raw Ray Serve against the gateway, side by side, in a private Ray."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import click

from medserve.cli.common import load_settings


@click.command()
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="Connections held open, each sending its next request as soon as it has an answer.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds measured per path and round (after a warm-up).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Rounds; the paths alternate within each, so background load falls on all alike.")
@click.option("--serve-mode", type=click.Choice(["throughput", "default"]), default="throughput", show_default=True,
              help="throughput: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress); default: through Serve's proxy.")
@click.option("--imaging/--no-imaging", default=True, show_default=True, help="Also measure the brain-MRI model.")
@click.option("--llm/--no-llm", default=True, show_default=True, help="Also measure SmolLM2 tokens per second.")
@click.option("--autoscale", is_flag=True, help="Also time a load step's scale-up and the way back down.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replicas of the raw baseline and of the gateway alike (direct ingress: one port each).")
@click.option("--raw-access-log/--no-raw-access-log", default=True, show_default=True,
              help="Ray Serve's access log in the baseline's replica: on as Serve ships it; off to compare with a "
                   "baseline that drops it too (the gateway's is off: its audit trail records each request).")
@click.option("--deployments", "deployments_dir", type=click.Path(path_type=Path), default=None,
              help="Catalog holding the imaging and LLM demo specs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON here.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Record raw's and the gateway's replicas (by handle, the model's replica too) with py-spy "
                   "during the first strict round (collapsed stacks here) and print their top frames by self time.")
def bench(concurrency: int, duration_s: float, rounds: int, serve_mode: str, imaging: bool, llm: bool,
          autoscale: bool, replicas: int, raw_access_log: bool, deployments_dir: Path | None,
          json_path: Path | None, profile_dir: Path | None) -> None:
    """Load raw Ray Serve and the gateway side by side in a private Ray; print throughput, p50/p95/p99, ratios.

    Starts its own Ray on free ports with its own SQLite (a running medserve is
    not touched) and stops it at the end.
    """
    from medserve.bench.runner import BenchOptions, run_bench

    def _terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)  # unwinds through run_bench's finally, which stops the private Ray

    signal.signal(signal.SIGTERM, _terminate)
    settings = load_settings()
    catalog_dir = deployments_dir or settings.deployments_dir
    options = BenchOptions(
        concurrency=concurrency, duration_s=duration_s, rounds=rounds, throughput_optimized=serve_mode == "throughput",
        imaging=imaging, llm=llm, autoscale=autoscale, replicas=replicas, raw_access_log=raw_access_log,
        deployments_dir=Path(catalog_dir),
        profile_dir=profile_dir,
    )
    report = run_bench(options, log=lambda line: click.echo(line, err=True))
    click.echo(report.markdown())
    if json_path is not None:
        json_path.write_text(json.dumps(report.__dict__, indent=2))
