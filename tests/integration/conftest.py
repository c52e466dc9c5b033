"""One Ray cluster for the whole integration session, started the way `medserve up` starts it.

Tests isolate by what they apply (Serve replaces the whole config on each
apply) and by the data they send (a unique patient id per test, whose
pseudonym finds that test's audit rows).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from medserve.bench.private import free_port
from medserve.controlplane.local_ray import start_local_ray, stop_local_ray
from medserve.controlplane.reconcile import ApplyResult, apply_catalog
from medserve.controlplane.render import RenderOptions
from medserve.controlplane.targets import RayClusterTarget
from medserve.db.engine import session_scope, upgrade
from medserve.db.models import AuditRecord
from medserve.security.api_keys import create_api_key
from medserve.security.pseudonyms import pseudonymize
from medserve.settings import Settings
from medserve.specs import DeploymentSpec, load_catalog



# Modules that break things on purpose run after all others: the failures they cause (audit writes and
# state reloads failing while a database is down, a periodic verification finding an altered row) stay in
# the exported counters and keep alerts firing for minutes, and test_metrics_prometheus.py checks that a
# healthy platform fires no alert.
RUN_LAST = ("test_compliance.py", "test_database_outage.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    integration = [item for item in items if here in Path(str(item.fspath)).parents]
    for item in integration:
        item.add_marker(pytest.mark.integration)
    last = [item for item in integration if Path(str(item.fspath)).name in RUN_LAST]
    if last:
        rest = [item for item in items if item not in last]
        positions = [index for index, item in enumerate(rest) if item in integration]
        after = positions[-1] + 1 if positions else 0  # right after the other integration tests
        items[:] = rest[:after] + last + rest[after:]


@dataclass
class Platform:
    settings: Settings
    target: RayClusterTarget
    base_url: str
    repo_root: Path
    env: dict[str, str]
    ray_temp_dir: Path | None = None  # this session's Ray temp dir: its logs are under session_latest/logs

    @property
    def database_url(self) -> str:
        return self.settings.resolved_database_url

    def render_options(self, **gateway_settings: Any) -> RenderOptions:
        """The options `up` would use, with some gateway settings overridden."""
        options = RenderOptions.from_settings(self.settings)
        return options.model_copy(update={"gateway_settings": {**options.gateway_settings, **gateway_settings}})

    def catalog(self) -> list[DeploymentSpec]:
        return load_catalog(self.repo_root / "deployments")

    def apply(self, specs: list[DeploymentSpec] | None = None) -> ApplyResult:
        return apply_catalog(self.database_url, specs if specs is not None else self.catalog(), self.target,
                             self.render_options(), registered_by="integration tests",
                             require_approved=self.settings.require_approved_versions)

    def key(self, role: str = "clinical-app", department: str | None = None, rate_limit_rps: float | None = None) -> str:
        """A new key; rate_limit_rps=0 for a load test's key (no limit, as a hospital gives its benchmark key)."""
        with session_scope(self.database_url) as session:
            _, plaintext = create_api_key(session, name=f"test {role}", role=role, department=department,
                                          rate_limit_rps=rate_limit_rps)
        return plaintext

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def patient_pseudonym(self, patient_id: str) -> str:
        return pseudonymize(self.settings.pseudonym_key_bytes(), "patient", patient_id)

    def audit_rows_for_patient(self, patient_id: str) -> list[AuditRecord]:
        with session_scope(self.database_url) as session:
            query = select(AuditRecord).where(AuditRecord.patient_pseudonym == self.patient_pseudonym(patient_id))
            return list(session.scalars(query.order_by(AuditRecord.created_at)))


def new_patient_id() -> str:
    return f"MRN-{uuid.uuid4().hex[:10]}"


@contextmanager
def running_platform(home: Path, repo_root: Path, specs: list[DeploymentSpec] | None = None,
                     **settings_env: str) -> Iterator[Platform]:
    """A Ray head started the way `medserve up` starts one, with `specs` applied (default: the catalog).

    settings_env: more variables for the head and its replicas, e.g. MEDSERVE_RAY_NODE_ADDRESS for a head
    that nodes join, or one of Ray's own.
    """
    # This head's own Ray temp dir (short: unix socket paths are limited to
    # ~107 characters), so tests can read exactly this run's logs.
    ray_temp = tempfile.mkdtemp(prefix="msr-", dir="/tmp")
    overrides = {
        "MEDSERVE_RAY_TEMP_DIR": ray_temp,
        "MEDSERVE_HOME": str(home),
        "MEDSERVE_GATEWAY_PORT": str(free_port()),
        "MEDSERVE_GATEWAY_LISTEN_PORT": str(free_port()),
        "MEDSERVE_RAY_DASHBOARD_PORT": str(free_port()),
        "MEDSERVE_RAY_HEAD_PORT": str(free_port()),
        # Logical CPUs, not cores: leaves room for extra replicas in tests.
        "MEDSERVE_RAY_NUM_CPUS": "4",
        "RAY_AUTH_MODE": "token",
        # A test environment: the demo models are never approved for clinical use.
        "MEDSERVE_REQUIRE_APPROVED_VERSIONS": "false",
        **settings_env,
    }
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    settings = Settings()
    try:
        upgrade(settings.resolved_database_url)
        settings.pseudonym_key_bytes()
        settings.audit_signing_key_bytes()
        connection = start_local_ray(settings)
        try:
            target = RayClusterTarget(connection.dashboard_url, connection.auth_token)
            result = Platform(
                settings=settings,
                target=target,
                # The gateway's own port, as clinical apps call it (`up` prints it first).
                base_url=f"http://127.0.0.1:{settings.gateway_listen_port}",
                repo_root=repo_root,
                env={**overrides, "RAY_AUTH_TOKEN": connection.auth_token or ""},
                ray_temp_dir=Path(ray_temp),
            )
            result.apply(specs)
            yield result
        finally:
            stop_local_ray(settings)
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Iterator[Platform]:
    """The shared platform: one machine, so every Ray port on loopback (test_local_binding.py)."""
    with running_platform(tmp_path_factory.mktemp("medserve-home"), repo_root) as result:
        yield result


def json_of(response: httpx.Response) -> Any:
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:200]
    return response.json()
