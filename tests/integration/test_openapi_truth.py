"""The OpenAPI document tells the truth on a live gateway: `st run <gateway>/openapi.json --checks all`
passes for a clinical-app, an auditor and an admin key.

Every schemathesis check runs (status codes, content types, headers and response schemas against the
document; negative and positive data; missing auth; undeclared methods and Allow), bounded in examples
so the three runs take about two minutes. The configuration and its one narrowing, with its reason,
are tests/schemathesis.toml; the in-process twin is tests/unit/test_openapi_document.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ..schemathesis_run import ROLES, run_schemathesis
from .conftest import Platform


@pytest.mark.slow
def test_schemathesis_with_every_check_passes_against_the_live_gateway_for_three_roles(
    platform: Platform, tmp_path: Path
):
    document = httpx.get(f"{platform.base_url}/openapi.json", timeout=30).json()
    operations = sum(1 for item in document["paths"].values() for method in item if method != "parameters")
    runs = []
    for role in ROLES:
        # rate_limit_rps=0: the fuzzer's key is not throttled (429 is documented, but a run of only
        # 429s would test nothing else).
        key = platform.key(role, rate_limit_rps=0)
        runs.append(run_schemathesis(platform.base_url, key, role, max_examples=3, workdir=tmp_path))
    for run in runs:
        print(run.summary)
    failed = [run for run in runs if run.returncode != 0]
    assert not failed, "\n\n".join(f"{run.role}:\n{run.failure_report}" for run in failed)
    assert all(f"Tested: {operations}" in run.summary for run in runs), [run.summary for run in runs]
