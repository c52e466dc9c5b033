"""On-prem nodes without Kubernetes: join this machine to a medserve Ray head, list the nodes.

A hospital without Kubernetes runs `medserve up` (a Ray head) on one machine
and joins each other machine as a Ray worker node that announces what it has,
e.g. ``{"radiology_gpu": 1}`` for the radiology GPU pool. Deployment specs
then place replicas there with ``resources.custom`` (rendered into
``ray_actor_options.resources``), and Ray schedules them only on nodes that
announce that resource.

The node is `ray start --address=HEAD --block` run as our child in its own
session, like the head in :mod:`medserve.controlplane.local_ray`: stopping
that child stops exactly this node, never every Ray on the machine the way
`ray stop` would.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medserve.controlplane.local_ray import RAY_WORKER_NICENESS, _ray_executable, node_process_environment
from medserve.errors import ClusterError, ConfigurationError
from medserve.settings import Settings

# Ray's own resources: set with --num-cpus/--num-gpus (or detected), and
# refused by `ray start` in --resources; say which flag to use instead.
RAY_RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
# Plain names only: Ray's own markers use ':' (node:IP, accelerator_type:A100),
# and a name has to survive JSON, YAML specs and shell quoting unchanged.
RESOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
RESOURCE_NAME_CHARACTERS = "letters, digits, '_' and '-', starting with a letter, at most 64 characters"
# What `ray start` prints once the node has registered with the head's GCS
# (before that it retries the connection, or exits non-zero on failure).
RAY_STARTED_LINE = b"Ray runtime started"
TOKEN_FILE = "ray-auth.token"


class NodeJoin(BaseModel):
    """What an administrator asks for when joining a node (`medserve cluster join`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(
        description="GCS address of the medserve Ray head, HOST:PORT (the head's MEDSERVE_RAY_HEAD_PORT, default 6379)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources this node announces, e.g. {radiology_gpu: 1}; specs request them with "
        "resources.custom.",
    )
    num_cpus: int | None = Field(default=None, ge=0, description="Logical CPUs to announce (default: Ray detects).")
    num_gpus: int | None = Field(default=None, ge=0, description="GPUs to announce (default: Ray detects).")
    node_ip_address: str | None = Field(
        default=None, description="Address the head and other nodes reach this node on (default: Ray picks one)."
    )
    temp_dir: Path | None = Field(
        default=None, description="Ray's temp/session directory on this node (default: the head's setting)."
    )
    share_machine: bool = Field(
        default=False,
        description="Another Ray node runs on this machine (the head, in tests): let the OS pick "
        "this node's dashboard-agent port instead of Ray's fixed default, which the other node already holds.",
    )

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        value = value.strip()
        if "://" in value:
            raise ValueError(
                "give the head's GCS address HOST:PORT (default port 6379), not a URL such as the dashboard's"
            )
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 10.0.0.5:6379")
        return value

    @field_validator("resources", mode="before")
    @classmethod
    def _resources(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object of resource name to number, e.g. {"radiology_gpu": 1}')
        for name, amount in value.items():
            if not isinstance(name, str) or not RESOURCE_NAME.fullmatch(name):
                raise ValueError(f"resource name {name!r}: use {RESOURCE_NAME_CHARACTERS}")
            if name in RAY_RESERVED_RESOURCES:
                raise ValueError(f"{name} is Ray's own resource: use --num-cpus/--num-gpus, not --resources")
            # bool is an int in Python; a JSON true is a typo, not a quantity.
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise ValueError(f"resource {name}: the amount must be a number")
            if not math.isfinite(amount) or amount < 0:
                raise ValueError(f"resource {name}: the amount must be a finite number >= 0")
        return value


def parse_join(**values: Any) -> NodeJoin:
    """A validated NodeJoin, or a ConfigurationError naming each bad field."""
    try:
        return NodeJoin(**values)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "node"
            problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError(
            "cannot join the node: " + "; ".join(problems),
            fields=sorted({".".join(str(p) for p in item["loc"]) for item in error.errors()}),
        ) from None


def parse_resources(text: str) -> Any:
    """The --resources JSON (validated later, with the other fields)."""
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigurationError(
            'cannot join the node: resources must be JSON, e.g. \'{"radiology_gpu": 1}\'', fields=["resources"]
        ) from None


def _quantity(amount: float) -> float | int:
    # 1 rather than 1.0 in the printed command: what an administrator would type.
    return int(amount) if float(amount).is_integer() else amount


def join_command(join: NodeJoin, ray_executable: str = "ray") -> list[str]:
    """The `ray start` argv that joins this machine to the head (the token travels in the environment)."""
    resources = {name: _quantity(amount) for name, amount in sorted(join.resources.items())}
    command = [ray_executable, "start", f"--address={join.address}", f"--resources={json.dumps(resources)}"]
    if join.num_cpus is not None:
        command.append(f"--num-cpus={join.num_cpus}")
    if join.num_gpus is not None:
        command.append(f"--num-gpus={join.num_gpus}")
    if join.node_ip_address:
        command.append(f"--node-ip-address={join.node_ip_address}")
    if join.temp_dir is not None:
        command.append(f"--temp-dir={join.temp_dir}")
    if join.share_machine:
        # Ray's default 52365 is fixed; every other port of a worker node is
        # chosen free already, and worker ports are checked before use.
        command.append("--dashboard-agent-listen-port=0")
    command += ["--disable-usage-stats", "--block"]
    return command


def shell_command(join: NodeJoin, token_file: Path | None = None, *, throughput_optimized: bool = True) -> str:
    """The command an administrator runs on the node, for `cluster join --print-only`.

    The token is never printed: it is read from RAY_AUTH_TOKEN (or the token
    file) when the command runs, so it stays out of shell history, terminal
    scrollback and `ps` output. ``throughput_optimized`` is the head's Serve
    mode (MEDSERVE_SERVE_THROUGHPUT_OPTIMIZED), which the node's replicas must share.
    """
    if token_file is not None:
        token = f'"$(cat {shlex.quote(str(token_file))})"'
    else:
        token = '"${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN to the head token (MEDSERVE_HOME/ray-auth.token on the head)}"'
    # The node's replicas at Ray's daemons' priority unless the administrator set one, as `cluster join`
    # starts them (node_process_environment).
    niceness = f'{RAY_WORKER_NICENESS}="${{{RAY_WORKER_NICENESS}:-0}}"'
    serve_mode = "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 " if throughput_optimized else ""
    return f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token} {niceness} {serve_mode}{shlex.join(join_command(join))}"


def unshared_settings(settings: Settings) -> list[str]:
    """Warnings for what this node's replicas would not share with the head's (docs/on-prem.md).

    Ray may place any replica on the node, the gateway included, and a replica reads medserve's
    settings from the node's environment: without the head's database it writes its audit records to a
    SQLite file of this machine, and without the head's keys it generates its own into this machine's
    MEDSERVE_HOME, so its records' chain fails `audit verify` on the head and its pseudonyms link to
    nothing there.
    """
    warnings = []
    if not settings.database_url:
        warnings.append("MEDSERVE_DATABASE_URL is not set: replicas placed here that write audit records would "
                        "use a SQLite file on this machine, not the head's database")
    for variable, configured, key_file, why in (
        ("MEDSERVE_AUDIT_SIGNING_KEY", settings.audit_signing_key, settings.audit_signing_key_file,
         "the audit records they wrote would fail `medserve audit verify` with the head's key"),
        ("MEDSERVE_PSEUDONYM_KEY", settings.pseudonym_key, settings.pseudonym_key_file,
         "their pseudonyms would not match the head's for the same patient"),
    ):
        if configured is None and not key_file.is_file():
            warnings.append(f"{variable} is not set and {key_file} does not exist: replicas placed here "
                            f"would generate a key of their own, and {why}")
    return warnings


def join_token(settings: Settings, token_file: Path | None = None) -> str:
    """The head's Ray token: --token-file, else RAY_AUTH_TOKEN, else MEDSERVE_HOME/ray-auth.token.

    Never generated here (unlike on the head): a new token would not be the
    head's, and the join would fail with an unhelpful authentication error.
    """
    if token_file is not None:
        path = token_file.expanduser()
        if not path.is_file():
            raise ConfigurationError(f"token file {path} does not exist", fields=["token_file"])
        token = path.read_text().strip()
    else:
        token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
        default = settings.resolved_home / TOKEN_FILE
        if not token and default.is_file():
            token = default.read_text().strip()
    if not token:
        raise ConfigurationError(
            "no Ray token: copy the head's MEDSERVE_HOME/ray-auth.token to this node and pass --token-file, "
            "or set RAY_AUTH_TOKEN",
            fields=["token_file"],
        )
    return token


@dataclass
class JoinedNode:
    """A worker node started here; ``stop_node`` stops exactly it."""

    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]

    @property
    def pid(self) -> int:
        return self.process.pid


def _log_tail(path: Path, since: int, lines: int = 8) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(since)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def start_node(
    join: NodeJoin, token: str, settings: Settings, *, log_path: Path, timeout_s: float = 120.0
) -> JoinedNode:
    """Start the worker node and return once it has registered with the head.

    ClusterError when `ray start` exits first (wrong address, wrong token, a
    head of another Ray version) or does not register within timeout_s.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = join_command(join, _ray_executable())
    with log_path.open("ab") as log:
        start_offset = log.tell()  # the log is appended to: read only this run's lines
        process = subprocess.Popen(
            command,
            env=node_process_environment(settings, token),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = JoinedNode(process=process, log_path=log_path, command=command)
    deadline = time.monotonic() + timeout_s
    while True:
        with log_path.open("rb") as handle:
            handle.seek(start_offset)
            if RAY_STARTED_LINE in handle.read():
                return node
        if process.poll() is not None:
            raise ClusterError(
                f"`ray start` exited with {process.returncode} before joining {join.address}; "
                f"see {log_path}:\n{_log_tail(log_path, start_offset)}",
                address=join.address,
            )
        if time.monotonic() > deadline:
            stop_node(node)
            raise ClusterError(f"the node did not join {join.address} in {timeout_s:.0f}s; see {log_path}",
                               address=join.address)
        time.sleep(0.5)


def stop_node(node: JoinedNode, timeout_s: float = 60.0) -> None:
    """Stop exactly this node: SIGTERM lets `ray start --block` drain and stop its own processes."""
    if node.process.poll() is not None:
        return
    node.process.send_signal(signal.SIGTERM)
    try:
        node.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Its own session: the group is this node's processes and no one else's.
        os.killpg(node.pid, signal.SIGKILL)
        node.process.wait(timeout=10.0)


# --- what the cluster has ------------------------------------------------------


@dataclass(frozen=True)
class ClusterNode:
    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources: dict[str, float]


@dataclass(frozen=True)
class ReplicaPlacement:
    app: str
    deployment: str
    node_id: str
    state: str
    pid: int | None = None  # the replica's worker process on its node, when Ray reports it


def _state_api(dashboard_url: str, token: str | None, path: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{dashboard_url.rstrip('/')}{path}"
    try:
        response = httpx.get(url, params={"detail": "1", "limit": "10000"}, headers=headers, timeout=30.0)
    except httpx.HTTPError as error:
        raise ClusterError(f"cannot reach the Ray dashboard at {dashboard_url}: {type(error).__name__}") from None
    if response.status_code >= 400:
        raise ClusterError(f"the Ray dashboard refused GET {path} with HTTP {response.status_code}")
    try:
        return list(response.json()["data"]["result"]["result"])
    except (KeyError, TypeError, ValueError):
        raise ClusterError(f"unexpected answer from the Ray dashboard's GET {path}") from None


def list_nodes(dashboard_url: str, token: str | None) -> list[ClusterNode]:
    """Every node the head's GCS knows (dead ones too, until Ray forgets them), head first."""
    nodes = [
        ClusterNode(
            node_id=row["node_id"],
            address=row.get("node_ip") or "",
            alive=row.get("state") == "ALIVE",
            is_head=bool(row.get("is_head_node")),
            resources={name: float(amount) for name, amount in (row.get("resources_total") or {}).items()},
        )
        for row in _state_api(dashboard_url, token, "/api/v0/nodes")
    ]
    return sorted(nodes, key=lambda node: (not node.is_head, not node.alive, node.address, node.node_id))


def replica_placements(dashboard_url: str, token: str | None) -> list[ReplicaPlacement]:
    """Which node each alive Serve replica runs on (Ray names a replica's actor SERVE_REPLICA::app#deployment#id)."""
    placements = []
    for row in _state_api(dashboard_url, token, "/api/v0/actors"):
        name = row.get("name") or ""
        if not name.startswith("SERVE_REPLICA::") or row.get("state") != "ALIVE":
            continue
        parts = name.removeprefix("SERVE_REPLICA::").split("#")
        if len(parts) != 3:
            continue
        placements.append(ReplicaPlacement(parts[0], parts[1], row.get("node_id") or "", row["state"], row.get("pid")))
    return placements


def wait_for_node(
    dashboard_url: str, token: str | None, *, resources: dict[str, float], exclude: set[str], timeout_s: float = 60.0
) -> ClusterNode:
    """The first alive node, not in ``exclude``, announcing at least these resources."""
    deadline = time.monotonic() + timeout_s
    while True:
        for node in list_nodes(dashboard_url, token):
            if node.alive and node.node_id not in exclude and all(
                node.resources.get(name, 0.0) >= amount for name, amount in resources.items()
            ):
                return node
        if time.monotonic() > deadline:
            raise ClusterError(f"no new node announcing {sorted(resources)} joined in {timeout_s:.0f}s")
        time.sleep(0.5)
