"""Suite-wide rules.

MEDSERVE_REQUIRE_ALL=1 (set by .ci/run) turns every skip into a failure: in CI
a missing PostgreSQL, Prometheus or helm binary is a broken install, not a
reason to pass quietly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOT = REPO_ROOT / "platform"
if str(SOURCE_ROOT) not in sys.path:
    sys.path.insert(0, str(SOURCE_ROOT))

REQUIRE_ALL = os.environ.get("MEDSERVE_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped, but MEDSERVE_REQUIRE_ALL=1 forbids skips: {reason}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mr_small_path() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm"))


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


# --- databases: SQLite (embedded default) and a throwaway PostgreSQL (production) ---


@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """One PostgreSQL server for the session, from the system's binaries (skipped only where they are missing)."""
    from tests.postgres import TemporaryPostgres, find_bin_dir

    if find_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql-15")
    server = TemporaryPostgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:  # type: ignore[no-untyped-def]
    """A fresh, migrated database on the session's PostgreSQL, as the non-superuser application role."""
    from medserve.db.engine import upgrade

    url = postgres_server.create_database()
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same audit test against both supported databases."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    from medserve.db.engine import upgrade

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    return url
