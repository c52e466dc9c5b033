"""A throwaway PostgreSQL server for tests and benchmarks, from the system's binaries.

``initdb`` refuses to run as root, so when the tests run as root the server
runs as the ``postgres`` user (``runuser``). It listens on a free loopback
port with its unix socket inside its own temporary directory, trusts local
connections, and is removed on stop. The application connects as a
non-superuser role (``medserve``) that owns its database, so tests can
``REVOKE`` its privileges and see the service refuse to pretend.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from medserve.bench.private import free_port

APP_ROLE = "medserve"


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    candidates = [Path(p).parent for p in (shutil.which("initdb"), shutil.which("pg_ctl")) if p]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


class TemporaryPostgres:
    """One PostgreSQL server in a temporary directory. Use as a context manager or start()/stop()."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bin_dir = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="medserve-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root
        self._as_postgres = os.geteuid() == 0
        self.superuser = "postgres" if self._as_postgres else os.environ.get("USER", "postgres")

    # --- process control -------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> "TemporaryPostgres":
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data_dir), "-U", self.superuser, "-A", "trust", "-E", "UTF8",
                  "--no-sync")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = on\nmax_connections = 100\nshared_buffers = 64MB\n"
            )
        self.resume()
        self.psql(f"CREATE ROLE {APP_ROLE} LOGIN")
        return self

    def resume(self) -> None:
        """Start (again) the server on the same data directory and port."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")

    def pause(self) -> None:
        """Stop the server (fast mode: open connections are cut), keeping its data."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "TemporaryPostgres":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- databases ---------------------------------------------------------------

    def url(self, database: str = "postgres", user: str | None = None) -> str:
        return f"postgresql+psycopg://{user or self.superuser}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser (autocommit)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.superuser, dbname=database,
                             autocommit=True) as connection:
            cursor = connection.execute(sql)
            return str(cursor.fetchall()) if cursor.description else ""

    def create_database(self, name: str | None = None) -> str:
        """A new empty database owned by the application role; returns the application's URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name} OWNER {APP_ROLE}")
        return self.url(name, APP_ROLE)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    """Poll predicate until it is true or the timeout passes (not a timing assertion: a bound on waiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
