"""`medserve up`, `status` and `down` as a user runs them, against the shared cluster.

`up` is pointed at the running cluster (RAY_ADDRESS), the path hospital IT
uses for an on-prem Ray; the local-start path is what the session fixture runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from .conftest import Platform


def _medserve(platform: Platform, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **platform.env, "RAY_ADDRESS": platform.target.dashboard_url}
    env["MEDSERVE_DEPLOYMENTS_DIR"] = str(platform.repo_root / "deployments")
    return subprocess.run(
        [sys.executable, "-m", "medserve.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=platform.repo_root,
    )


def test_up_prints_url_and_a_working_demo_key_then_down_stops_it(platform: Platform):
    try:
        up = _medserve(platform, "up", "--detach")
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"medserve gateway: {platform.base_url}" in up.stdout
        assert "skipped  deepseek-r1-distill-qwen-32b: the cluster lacks resources" in up.stdout
        demo_key = up.stdout.split("demo API key (clinical-app): ")[1].split()[0]
        models = httpx.get(f"{platform.base_url}/v1/models", headers={"Authorization": f"Bearer {demo_key}"})
        assert models.status_code == 200
        assert {m["id"] for m in models.json()["data"]} == {
            "brain-mri-tumour", "smollm2-135m-instruct", "ct-trabecular-bone-hu", "ct-liver-attenuation-hu"}
        assert "pipeline ct-opportunistic-screen: bone, liver, pancreas" in up.stdout

        again = _medserve(platform, "up", "--detach")
        assert again.returncode == 0 and demo_key in again.stdout, "a second `up` keeps the demo key"

        status = _medserve(platform, "status")
        assert "gateway" in status.stdout and "RUNNING" in status.stdout
        # The gateway's own line: readiness, the audit spool's depth and the age of its known state.
        assert f"gateway {platform.base_url}: ready; database ok; audit spool 0 record(s)" in status.stdout
        assert "state age: keys" in status.stdout and "routes" in status.stdout

        down = _medserve(platform, "down")
        assert down.returncode == 0 and "medserve stopped" in down.stdout
        assert platform.target.application_status() == {}
    finally:
        platform.apply()  # later tests expect the catalog to be served
