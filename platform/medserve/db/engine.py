"""Engines, sessions and schema upgrades.

Migrations run from an explicit step (`medserve db upgrade`, `medserve up`,
the Helm hook), never on import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if _is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
            # WAL lets the CLI read while a gateway replica writes; foreign
            # keys are off in SQLite unless asked for.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # A bounded connect: an unreachable host (not merely a refused port) must not hold a
    # gateway's background refresh or an admin request for the OS's TCP timeout.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args={"connect_timeout": 5})


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrations_dir() -> Path:
    """The Alembic scripts: the repository's migrations/ in a checkout."""
    package_root = Path(str(resources.files("medserve"))).resolve()
    candidate = package_root.parent.parent / "migrations"
    if not (candidate / "env.py").exists():
        raise FileNotFoundError(f"Alembic migrations not found at {candidate}")
    return candidate


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def database_error_name(error: BaseException) -> str:
    """The database's own error class (OperationalError, InsufficientPrivilege, ...) for a log line,
    without its message: a driver's message can hold connection details or row values."""
    orig = getattr(error, "orig", None)
    return type(orig).__name__ if orig is not None else type(error).__name__
