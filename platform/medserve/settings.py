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
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


# The shipped request-rate default: generous for a clinical app, a wall for a runaway loop.
DEFAULT_KEY_RPS = 50.0
DEFAULT_BURST_SECONDS = 2.0
GATEWAY_MARKER = "medserve_gateway"


def GatewayField(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (reads like pydantic's Field)
    """A setting that travels to the gateway in its Serve application args:
    non-secret, per-deployment policy. The control plane copies every field made
    with it (GATEWAY_SETTING_NAMES), so a new gateway setting cannot be left out."""
    return Field(*args, json_schema_extra={GATEWAY_MARKER: True}, **kwargs)


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
    gateway_host: str = Field(
        default="127.0.0.1",
        description="Address the gateway listens on (Ray Serve's proxy port and the gateway's direct-ingress ports). "
        "Default loopback: only this machine reaches it. 0.0.0.0 (or one interface's address) opens the gateway, "
        "and only the gateway, to the network; Ray's own ports follow MEDSERVE_RAY_NODE_ADDRESS.",
    )
    gateway_port: int = Field(
        default=8000, ge=1, le=65535,
        description="Ray Serve's HTTP proxy port, in front of the gateway on every Ray node (Serve's own request "
        "layer: routing, its request metrics and backpressure). Every gateway route answers here.",
    )
    gateway_listen_port: int = Field(
        default=8100, ge=0, le=65535,
        description="The gateway's own port, on MEDSERVE_GATEWAY_HOST: every gateway replica answers it itself, "
        "without Ray Serve's per-request layer (the fastest door, docs/speed.md); the replicas on one node share "
        "it (SO_REUSEPORT). Same routes, authentication, audit and metering as the proxy port. Only nodes that "
        "host a gateway replica answer on it (one machine: always). `up` prints it as the gateway's address. "
        "0: off (the Helm chart's default, see its values).",
    )
    gateway_serve_access_log: bool = Field(
        default=False,
        description="Ray Serve's own access-log line for each gateway request (the replica's log file). Off by "
        "default: every inference already has its audit record (who, which model version, outcome, latency), and "
        "the line costs the gateway's one Python thread about 18 µs per request (docs/speed.md). Off, Serve's logger "
        "in the gateway replica keeps warnings and errors only: Serve's 'off' merely filters the line after building "
        "it, and its other INFO lines there are the replica's own start and stop, which Serve's controller logs too.",
    )
    ray_dashboard_port: int = Field(
        default=8265, ge=1, le=65535, description="Dashboard (Serve REST API) port of a Ray that `up` starts."
    )
    ray_head_port: int = Field(default=6379, ge=1, le=65535, description="GCS port of a Ray that `up` starts.")
    ray_node_address: str = Field(
        default="127.0.0.1",
        description="Address a Ray that `up` starts advertises and listens on. Default 127.0.0.1: one machine, "
        "every port of that Ray (GCS, raylet, workers, agents, metrics export, Ray Client) on loopback but the "
        "one per Serve replica that Ray binds to every interface itself (docs/security.md). "
        "A head that other nodes join (docs/on-prem.md): this machine's address on the cluster network, which "
        "the nodes give as `--address ADDRESS:MEDSERVE_RAY_HEAD_PORT`; Ray then listens on every interface.",
    )
    prometheus_port: int = Field(
        default=9090, ge=1, le=65535,
        description="Loopback port of the Prometheus that `up --with-prometheus` starts.",
    )
    serve_throughput_optimized: bool = Field(
        default=True,
        description="Start the local Ray, and the nodes `cluster join` starts, with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
        "(Ray Serve's fastest mode): each gateway replica also listens on a port of its own (direct ingress, "
        "30000-31000) that clients or a load balancer reach without the proxy hop, and deployments talk over "
        "gRPC. The proxy port keeps working. false: Ray Serve's default proxy only. Every node needs the head's value.",
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
    audit_durability: Literal["strict", "batched"] = GatewayField(
        default="strict",
        description="strict: an audit record is committed before its response is sent. "
        "batched: responses do not wait for the commit (faster; a crash can lose the last batch).",
    )
    audit_batch_max: int = GatewayField(
        default=500, ge=1, description="Most audit records one database commit carries."
    )
    audit_queue_max: int = GatewayField(
        default=20_000, ge=1, description="Bound on audit records waiting for the writer; beyond it requests wait."
    )
    audit_signing_key: SecretStr | None = Field(
        default=None,
        description="HMAC key of the audit hash chain and its signed checkpoints. Unset: generated once into "
        "$MEDSERVE_HOME/audit-signing.key. `medserve audit verify` needs the same key.",
    )
    audit_checkpoint_every: int = GatewayField(
        default=1000, ge=1, description="A signed audit checkpoint at least every this many records of a chain."
    )
    audit_spool_dir: Path | None = Field(
        default=None,
        description="Local durable spool for audit records the database cannot take right now "
        "(unset: $MEDSERVE_HOME/audit-spool). Put it on persistent storage.",
    )
    audit_retry_s: float = GatewayField(
        default=1.0, gt=0, description="How often a writer that is spooling tries the database again."
    )
    audit_db_timeout_s: float = GatewayField(
        default=5.0,
        gt=0,
        description="Longest one audit database write (or connection attempt) may take before the "
        "records go to the spool instead.",
    )
    audit_verify_interval_s: float = Field(
        default=900.0,
        ge=1,
        description="How often the compliance monitor (one per cluster) runs `audit verify` over the whole trail "
        "and exports the result (ray_medserve_audit_verify_*). Each run reads every record: on a trail of "
        "millions of rows keep it at minutes or more. The staleness alert fires after three missed intervals.",
    )
    review_metrics_interval_s: float = Field(
        default=30.0,
        ge=1,
        description="How often the compliance monitor reads the review backlog (pending results by department "
        "and age, decisions by model version) into metrics.",
    )
    api_key_cache_seconds: float = GatewayField(
        default=5.0,
        ge=0,
        description="How often a gateway replica reloads its table of API keys in the background (it answers from "
        "the last one it loaded, so a database outage locks nobody out); a revoked key stops within this window "
        "once the database answers. 0: read the database on every request.",
    )
    max_body_bytes: int = GatewayField(
        default=64 * 1024 * 1024, ge=1024, description="Largest request body the gateway accepts (413 above)."
    )
    request_timeout_s: float = GatewayField(
        default=120.0, gt=0, description="Longest the gateway waits for an engine before answering 504."
    )
    # --- hospital identity (OIDC) ------------------------------------------------
    oidc_issuer: str | None = GatewayField(
        default=None,
        description="Issuer (iss) of the hospital identity provider's JWTs. Unset: only API keys are accepted.",
    )
    oidc_audience: str | None = GatewayField(
        default=None, description="Audience (aud) a JWT must carry to be accepted, e.g. medserve."
    )
    oidc_jwks_file: str | None = GatewayField(
        default=None, description="Path of a JWKS file with the provider's signing keys (works offline)."
    )
    oidc_jwks_url: str | None = GatewayField(
        default=None, description="URL of the provider's JWKS, fetched by the gateway and cached (used when no file)."
    )
    oidc_jwks_cache_seconds: float = GatewayField(
        default=300.0, ge=0, description="How long a gateway replica keeps a fetched JWKS before fetching it again."
    )
    oidc_algorithms: list[str] = GatewayField(
        default_factory=lambda: ["RS256"], description="JWT signature algorithms accepted (never 'none')."
    )
    oidc_roles_claim: str = GatewayField(
        default="roles",
        description="Claim holding the caller's medserve role(s); dots reach into objects (realm_access.roles). "
        "The first value that names a medserve role wins.",
    )
    oidc_department_claim: str = GatewayField(
        default="department", description="Claim holding the caller's department (absent: not department-bound)."
    )
    oidc_leeway_s: float = GatewayField(
        default=30.0, ge=0, description="Clock skew tolerated on exp/nbf/iat, in seconds."
    )
    # --- browser sign-in with the hospital identity provider (console) ------------
    oidc_client_id: str | None = GatewayField(
        default=None,
        description="Client id of the review console at the identity provider (authorization-code flow with "
        "PKCE). Sign-in with the identity provider is on when this, MEDSERVE_OIDC_ISSUER and "
        "MEDSERVE_OIDC_REDIRECT_URL are set; the ID token's audience must be this id.",
    )
    oidc_client_secret: SecretStr | None = Field(
        default=None,
        description="Secret of a confidential console client, sent to the token endpoint as HTTP Basic "
        "(client_secret_basic). Unset: a public client (PKCE only). Environment only, never in a Serve config.",
    )
    oidc_redirect_url: str | None = GatewayField(
        default=None,
        description="The console's sign-in callback as the identity provider sees it, registered there exactly: "
        "https://<gateway>/console/login/oidc/callback.",
    )
    oidc_scopes: str = GatewayField(
        default="openid profile",
        description="Space-separated scopes the console asks for at sign-in; must include openid.",
    )
    oidc_authorization_endpoint: str | None = GatewayField(
        default=None,
        description="The identity provider's authorization endpoint. Unset: read from "
        "<issuer>/.well-known/openid-configuration (set both endpoints where the gateway cannot fetch it).",
    )
    oidc_token_endpoint: str | None = GatewayField(
        default=None,
        description="The identity provider's token endpoint. Unset: read from the discovery document.",
    )

    # --- quotas and fairness ------------------------------------------------------
    gateway_replicas: int = Field(
        default=1,
        ge=1,
        description="Gateway replicas sharing the limits below (set by the control plane); "
        "each replica enforces its share of every rate limit.",
    )
    # On by default (OWASP API4): one misbehaving app must not take every model's capacity.
    rate_limit_key_rps: float | None = GatewayField(
        default=DEFAULT_KEY_RPS,
        ge=0,
        description="Requests per second one API key or identity may make, unless the key has its own limit "
        "(`medserve keys create/set-rate-limit --rate-limit-rps`; 0 there lifts it). 0: no default limit.",
    )
    rate_limit_department_rps: float | None = GatewayField(
        default=None, gt=0, description="Requests per second one department's callers may make together (unset: no limit)."
    )
    rate_limit_departments: dict[str, float] = GatewayField(
        default_factory=dict,
        description="Per-department request rates that replace rate_limit_department_rps for those departments, "
        'as JSON, e.g. {"radiology": 200, "research": 5}.',
    )
    rate_limit_burst_seconds: float = GatewayField(
        default=DEFAULT_BURST_SECONDS, gt=0,
        description="Burst allowance: a bucket holds this many seconds' worth of requests.",
    )
    token_budget_key_per_day: int | None = GatewayField(
        default=None, gt=0, description="LLM tokens (prompt + completion) one key may use per UTC day (unset: no limit)."
    )
    token_budget_department_per_day: int | None = GatewayField(
        default=None, gt=0, description="LLM tokens one department may use per UTC day (unset: no limit)."
    )
    token_budget_cache_seconds: float = GatewayField(
        default=10.0, ge=0, description="How long a gateway replica trusts its sum of today's tokens from the audit table."
    )
    department_priority: dict[str, Literal["emergency", "standard", "research"]] = GatewayField(
        default_factory=dict,
        description='Priority class per department as JSON, e.g. {"icu": "emergency", "oncology-research": '
        '"research"}; others are standard. When a model is saturated, emergency goes first, research last.',
    )

    # --- hardened inputs and transport -------------------------------------------
    max_image_pixels: int = Field(
        default=8192 * 8192, ge=1, description="Most pixels (rows x columns) a decoded image may have (413 above)."
    )
    max_image_side: int = Field(default=16384, ge=1, description="Most rows or columns a decoded image may have.")
    tls_cert_file: str | None = Field(
        default=None, description="PEM certificate chain for HTTPS on the gateway (with MEDSERVE_TLS_KEY_FILE)."
    )
    tls_key_file: str | None = Field(default=None, description="PEM private key for HTTPS on the gateway.")
    ray_temp_dir: str | None = Field(
        default=None,
        description="Ray's temp/session directory for a Ray that `up` starts (keep it short: socket paths "
        "are limited to about 107 characters). Unset: Ray's default.",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("MEDSERVE_TLS_CERT_FILE and MEDSERVE_TLS_KEY_FILE must be set together")
        if self.oidc_issuer and not (self.oidc_jwks_file or self.oidc_jwks_url):
            raise ValueError("MEDSERVE_OIDC_ISSUER needs MEDSERVE_OIDC_JWKS_FILE or MEDSERVE_OIDC_JWKS_URL")
        login = (self.oidc_client_id, self.oidc_redirect_url, self.oidc_client_secret,
                 self.oidc_authorization_endpoint, self.oidc_token_endpoint)
        if any(value is not None for value in login) and not (
            self.oidc_issuer and self.oidc_client_id and self.oidc_redirect_url
        ):
            raise ValueError("OIDC sign-in needs MEDSERVE_OIDC_ISSUER, MEDSERVE_OIDC_CLIENT_ID and "
                             "MEDSERVE_OIDC_REDIRECT_URL together")
        if (self.oidc_authorization_endpoint is None) != (self.oidc_token_endpoint is None):
            raise ValueError("MEDSERVE_OIDC_AUTHORIZATION_ENDPOINT and MEDSERVE_OIDC_TOKEN_ENDPOINT "
                             "must be set together")
        for name in ("oidc_redirect_url", "oidc_authorization_endpoint", "oidc_token_endpoint"):
            if getattr(self, name) is not None and not _https_or_loopback(getattr(self, name)):
                raise ValueError(f"MEDSERVE_{name.upper()} must be an https:// URL (http:// only on loopback)")
        if "openid" not in self.oidc_scopes.split():
            raise ValueError("MEDSERVE_OIDC_SCOPES must include openid")
        if "none" in [a.lower() for a in self.oidc_algorithms]:
            raise ValueError("the 'none' JWT algorithm is never accepted")
        if self.ray_node_address in ("0.0.0.0", "::", ""):
            raise ValueError("MEDSERVE_RAY_NODE_ADDRESS is an address Ray advertises: 127.0.0.1 (one machine) "
                             "or this machine's address on the cluster network, never a wildcard")
        return self

    # --- model versions and rollouts ----------------------------------------------
    require_approved_versions: bool = GatewayField(
        default=True,
        description="Only versions whose status is approved take clinical traffic (primary or canary); "
        "a shadow candidate, whose answers are never returned, needs validated. "
        "Set false in test and development environments only.",
    )
    rollout_cache_seconds: float = GatewayField(
        default=1.0,
        ge=0,
        description="How often a gateway replica reloads aliases and rollouts from the registry in the background; "
        "a canary, promote or rollback reaches every replica within this window. 0: read on every request.",
    )

    # --- review console ---------------------------------------------------------------
    console_session_idle_minutes: float = GatewayField(
        default=30.0, gt=0,
        description="A review console session ends after this many minutes without a request (sign in again).",
    )
    console_session_max_hours: float = GatewayField(
        default=12.0, gt=0,
        description="A review console session ends this many hours after sign-in, however active (one shift).",
    )
    console_cookie_secure: Literal["auto", "always", "never"] = GatewayField(
        default="auto",
        description="The console's session cookie carries Secure: auto when the request came over https "
        "(or X-Forwarded-Proto says so from a TLS-terminating proxy), always, or never (plain-http test setups).",
    )

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_home / 'medserve.db'}"

    @property
    def gateway_url(self) -> str:
        """Where clinical apps call the gateway: its own port, else Ray Serve's proxy port."""
        return self._gateway_url_on(self.gateway_listen_port or self.gateway_port)

    @property
    def serve_proxy_url(self) -> str:
        """Ray Serve's proxy in front of the gateway (every Ray node)."""
        return self._gateway_url_on(self.gateway_port)

    def _gateway_url_on(self, port: int) -> str:
        # Both gateway ports speak HTTPS when the gateway has TLS files.
        return f"{'https' if self.tls_cert_file else 'http'}://{self.gateway_host}:{port}"

    def pseudonym_key_bytes(self) -> bytes:
        """The HMAC key, generating and persisting one on first use when unset."""
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        return _read_or_create_secret(self.pseudonym_key_file).encode()

    def audit_signing_key_bytes(self) -> bytes:
        """The audit chain/checkpoint HMAC key, generating and persisting one on first use when unset."""
        if self.audit_signing_key is not None:
            return self.audit_signing_key.get_secret_value().encode()
        return _read_or_create_secret(self.audit_signing_key_file).encode()

    @property
    def pseudonym_key_file(self) -> Path:
        """Where the pseudonym key is generated and kept when MEDSERVE_PSEUDONYM_KEY is unset."""
        return self.resolved_home / "pseudonym.key"

    @property
    def audit_signing_key_file(self) -> Path:
        """Where the audit signing key is generated and kept when MEDSERVE_AUDIT_SIGNING_KEY is unset."""
        return self.resolved_home / "audit-signing.key"

    @property
    def resolved_audit_spool_dir(self) -> Path:
        return (self.audit_spool_dir or self.resolved_home / "audit-spool").expanduser().resolve()


# Settings the control plane passes to the gateway, in the order Settings declares them.
GATEWAY_SETTING_NAMES: tuple[str, ...] = tuple(
    name
    for name, field in Settings.model_fields.items()
    if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(GATEWAY_MARKER)
)


def _https_or_loopback(url: str) -> bool:
    """An absolute https URL, or http to this machine (a test or development identity provider)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


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
