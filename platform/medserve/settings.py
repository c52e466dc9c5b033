"""Process settings, read from ``MEDSERVE_*`` environment variables.

Secrets (the pseudonym key, the database password) come from the environment
or from files under ``MEDSERVE_HOME`` that ``medserve up`` creates with mode
0600; they never travel inside a rendered Ray Serve config.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything an operator can set for one medserve process."""

    model_config = SettingsConfigDict(env_prefix="MEDSERVE_", extra="forbid", validate_default=True)

    home: Path = Field(
        default=Path(".medserve"),
        description="State directory: the embedded SQLite database, generated secrets, Ray state files.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry and audit database. "
        "Unset: a SQLite file at $MEDSERVE_HOME/medserve.db (the embedded default). "
        "Production: postgresql+psycopg://user:pass@host/db.",
    )
    deployments_dir: Path = Field(
        default=Path("deployments"),
        description="Directory of deployment spec YAML files that `medserve up` applies.",
    )
    gateway_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    gateway_port: int = Field(default=8000, ge=1, le=65535, description="Port the gateway listens on.")
    ray_dashboard_port: int = Field(
        default=8265, ge=1, le=65535, description="Dashboard (Serve REST API) port of a Ray that `up` starts."
    )
    ray_head_port: int = Field(default=6379, ge=1, le=65535, description="GCS port of a Ray that `up` starts.")
    prometheus_port: int = Field(
        default=9090, ge=1, le=65535,
        description="Loopback port of the Prometheus that `up --with-prometheus` starts.",
    )
    ray_num_cpus: int | None = Field(
        default=None,
        gt=0,
        description="Logical CPUs a local Ray that `up` starts advertises (default: the machine's cores).",
    )
    pseudonym_key: SecretStr | None = Field(
        default=None,
        description="HMAC key for clinical-context pseudonyms. Unset: generated once into "
        "$MEDSERVE_HOME/pseudonym.key. Changing it breaks linkage of old pseudonyms.",
    )
    audit_durability: Literal["strict", "batched"] = Field(
        default="strict",
        description="strict: an audit record is committed before its response is sent. "
        "batched: responses do not wait for the commit (faster; a crash can lose the last batch).",
    )
    audit_batch_max: int = Field(default=500, ge=1, description="Most audit records one database commit carries.")
    audit_queue_max: int = Field(
        default=20_000, ge=1, description="Bound on audit records waiting for the writer; beyond it requests wait."
    )
    api_key_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a gateway replica trusts a looked-up API key before asking the database again.",
    )
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest request body the gateway accepts (413 above)."
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest the gateway waits for an engine before answering 504."
    )
    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'medserve.db'}"

    def pseudonym_key_bytes(self) -> bytes:
        """The HMAC key, generating and persisting one on first use when unset."""
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        return _read_or_create_secret(self.resolved_home / "pseudonym.key").encode()


def _read_or_create_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    # O_EXCL: two processes racing on first start agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
