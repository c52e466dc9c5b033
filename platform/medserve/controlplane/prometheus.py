"""Where the metrics are, and a local Prometheus scraping them (`medserve up --with-prometheus`).

Every Ray node exports its metrics (Ray's, Ray Serve's and medserve's, which
travel through Ray's pipeline) on its own metrics export port. The dashboard's
node list names each node's address and port, for this cluster only, unlike
Ray's service-discovery file under /tmp/ray, which every Ray on a machine
overwrites.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from medserve.errors import ClusterError

STATE_FILE = "prometheus.json"


def metrics_targets(dashboard_url: str, token: str | None) -> list[str]:
    """host:port of the metrics export port of every alive node of this Ray cluster."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{dashboard_url}/nodes", params={"view": "summary"}, headers=headers, timeout=10.0)
        response.raise_for_status()
        nodes = response.json()["data"]["summary"]
    except (httpx.HTTPError, KeyError, ValueError) as error:
        raise ClusterError(f"could not list the Ray nodes: {type(error).__name__}") from None
    targets = []
    for node in nodes:
        raylet = node.get("raylet", {})
        port = raylet.get("metricsExportPort")
        if raylet.get("state") == "ALIVE" and port:
            targets.append(f"{raylet['nodeManagerAddress']}:{port}")
    return sorted(set(targets))


def prometheus_config(targets_file: Path, rule_files: list[Path], *, interval: str = "15s") -> dict[str, Any]:
    """A Prometheus config scraping the Ray nodes listed in targets_file (file-based discovery)."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
            }
        ],
    }


def write_targets(targets_file: Path, targets: list[str]) -> None:
    """Prometheus file_sd format; rewritten atomically (Prometheus re-reads it)."""
    temporary = targets_file.with_suffix(".tmp")
    temporary.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    temporary.replace(targets_file)


def default_rule_files(root: Path) -> list[Path]:
    return sorted((root / "monitoring" / "prometheus").glob("*rules*.yaml"))


@dataclass(frozen=True)
class LocalPrometheus:
    pid: int
    url: str
    directory: Path


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start_prometheus(
    directory: Path, targets: list[str], *, port: int, rule_files: list[Path], interval: str = "15s",
    timeout_s: float = 60.0,
) -> LocalPrometheus:
    """Start `prometheus` on loopback with its own data directory; ClusterError if it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ClusterError("prometheus is not installed (Debian: apt-get install prometheus)")
    directory.mkdir(parents=True, exist_ok=True)
    targets_file = directory / "targets.json"
    write_targets(targets_file, targets)
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(prometheus_config(targets_file, rule_files, interval=interval)))
    url = f"http://127.0.0.1:{port}"
    log = (directory / "prometheus.log").open("ab")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (directory / STATE_FILE).write_text(json.dumps({"pid": process.pid, "url": url}))
    deadline = time.monotonic() + timeout_s
    while not _ready(url):
        if process.poll() is not None:
            raise ClusterError(f"prometheus exited with {process.returncode}; see {directory / 'prometheus.log'}")
        if time.monotonic() > deadline:
            process.terminate()
            raise ClusterError(f"prometheus was not ready in {timeout_s:.0f}s")
        time.sleep(0.3)
    return LocalPrometheus(process.pid, url, directory)


def stop_prometheus(directory: Path, timeout_s: float = 20.0) -> bool:
    """Stop the Prometheus that start_prometheus started in directory; False when none."""
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return False
    pid = int(json.loads(state_path.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:  # not our child: poll for its exit
                os.kill(pid, 0)
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    state_path.unlink(missing_ok=True)
    return True
