"""`st run <gateway>/openapi.json --checks all` for one key, as the unit and integration tests run it.

Every check schemathesis has (status codes, content types, headers and
response schemas against the document, negative and positive data, missing
auth, undeclared methods and the Allow header, ...) on every operation; the
one narrowing lives in tests/schemathesis.toml with its reason. The
multipart/related serializer is in tests/schemathesis_hooks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "tests" / "schemathesis.toml"
HOOKS = REPO_ROOT / "tests" / "schemathesis_hooks.py"
ROLES = ("clinical-app", "auditor", "admin")


@dataclass
class Run:
    role: str
    returncode: int
    output: str

    @property
    def summary(self) -> str:
        """The lines a person reads: operations, failures, test cases, the final tally."""
        keep = []
        for line in self.output.splitlines():
            if re.match(r"\s*(Selected|Tested):|\s+\d+ generated|^=+ .* in [\d.]+s =+$|\s*(❌|🚫|⚠️)", line):
                keep.append(line.strip().strip("=").strip())
        return f"{self.role}: " + "; ".join(keep)

    @property
    def failure_report(self) -> str:
        start = self.output.find("= FAILURES =")
        return self.output[start if start >= 0 else 0:][-6000:]


def st_executable() -> str:
    return str(Path(sys.executable).parent / "st")


def run_schemathesis(base_url: str, key: str, role: str, *, max_examples: int, workdir: Path,
                     timeout_s: float = 300) -> Run:
    """One `st run` with every check, against the document the gateway serves, as ``key``."""
    command = [
        st_executable(), "--config-file", str(CONFIG), "run", f"{base_url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(max_examples),
        "--workers", "1",
        "--request-timeout", "60",
        "--wait-for-schema", "60",
        "-H", f"Authorization: Bearer {key}",
        "--no-color",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=workdir, env=env)
    return Run(role, result.returncode, result.stdout + result.stderr)
