"""Joining an on-prem node: the `ray start` command, resource validation, the printed command (no token)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from medserve.cli.main import cli
from medserve.controlplane.cluster import (
    join_command,
    join_token,
    list_nodes,
    parse_join,
    parse_resources,
    replica_placements,
    shell_command,
    unshared_settings,
)
from medserve.controlplane.local_ray import (
    RAY_CLUSTER_SWITCH,
    RAY_DIRECT_INGRESS_DRAIN,
    RAY_WORKER_NICENESS,
    is_loopback,
    node_process_environment,
    ray_environment,
)
from medserve.errors import ConfigurationError
from medserve.settings import Settings

TOKEN = "f3a9c0ffee5ecret0123456789abcdef"


def test_command_joins_the_head_with_resources_and_blocks():
    join = parse_join(address="10.0.0.5:6379", resources={"radiology_gpu": 1}, num_cpus=8, num_gpus=2)
    assert join_command(join) == [
        "ray", "start", "--address=10.0.0.5:6379", '--resources={"radiology_gpu": 1}',
        "--num-cpus=8", "--num-gpus=2", "--disable-usage-stats", "--block",
    ]


def test_command_for_a_second_node_on_one_machine():
    join = parse_join(address="127.0.0.1:6380", resources={"b": 0.5, "a": 2.0}, node_ip_address="127.0.0.1",
                      temp_dir="/tmp/x", share_machine=True)
    command = join_command(join, "/venv/bin/ray")
    assert command[0] == "/venv/bin/ray"
    assert '--resources={"a": 2, "b": 0.5}' in command  # sorted; whole numbers as an administrator types them
    assert "--node-ip-address=127.0.0.1" in command and "--temp-dir=/tmp/x" in command
    # The head's dashboard agent holds Ray's fixed default port.
    assert "--dashboard-agent-listen-port=0" in command
    assert command[-1] == "--block"
    # Neither ray stop nor flags only a head may take.
    assert not {"stop", "--head", "--port"} & {part.split("=")[0] for part in command}


@pytest.mark.parametrize(
    ("resources", "problem"),
    [
        ({"radiology_gpu": -1}, "finite number >= 0"),
        ({"radiology_gpu": float("inf")}, "finite number >= 0"),
        ({"radiology_gpu": "1"}, "must be a number"),
        ({"radiology_gpu": True}, "must be a number"),
        ({"radiology gpu": 1}, "resource name 'radiology gpu'"),
        ({"node:10.0.0.5": 1}, "resource name"),
        ({"1gpu": 1}, "starting with a letter"),
        ({"GPU": 1}, "use --num-cpus/--num-gpus"),
        (["radiology_gpu"], "JSON object"),
    ],
)
def test_bad_resources_are_a_configuration_error_naming_the_field(resources, problem):
    with pytest.raises(ConfigurationError) as caught:
        parse_join(address="10.0.0.5:6379", resources=resources)
    assert caught.value.code == "configuration_error"
    assert "resources:" in caught.value.message and problem in caught.value.message
    assert caught.value.details["fields"] == ["resources"]


@pytest.mark.parametrize("address", ["10.0.0.5", "http://10.0.0.5:8265", "10.0.0.5:0", "10.0.0.5:http", ":6379"])
def test_bad_addresses_are_refused(address):
    with pytest.raises(ConfigurationError, match="address:"):
        parse_join(address=address)


def test_negative_cpus_and_unknown_fields_are_refused():
    with pytest.raises(ConfigurationError, match="num_cpus"):
        parse_join(address="h:6379", num_cpus=-1)
    with pytest.raises(ConfigurationError, match="colour: Extra inputs"):
        parse_join(address="h:6379", colour="blue")


def test_resources_must_be_json():
    with pytest.raises(ConfigurationError, match="must be JSON"):
        parse_resources("{radiology_gpu: 1}")
    assert parse_resources('{"radiology_gpu": 1}') == {"radiology_gpu": 1}


def test_printed_command_reads_the_token_and_runs_as_printed():
    join = parse_join(address="10.0.0.5:6379", resources={"radiology_gpu": 1})
    line = shell_command(join)
    words = shlex.split(line)
    assert words[0] == "RAY_AUTH_MODE=token" and words[1].startswith("RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:?")
    assert words[2] == "RAY_worker_niceness=${RAY_worker_niceness:-0}"
    assert words[3] == "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
    assert words[4:] == join_command(join)
    # A head in Serve's default mode (MEDSERVE_SERVE_THROUGHPUT_OPTIMIZED=false): its nodes leave it unset too.
    assert shlex.split(shell_command(join, throughput_optimized=False))[3:] == join_command(join)
    from_file = shell_command(join, Path("/etc/medserve/ray-auth.token"))
    assert 'RAY_AUTH_TOKEN="$(cat /etc/medserve/ray-auth.token)"' in from_file


def test_print_only_never_prints_the_token(tmp_path, monkeypatch):
    token_file = tmp_path / "ray-auth.token"
    token_file.write_text(TOKEN)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    runner = CliRunner()
    for extra in ([], ["--token-file", str(token_file)]):
        result = runner.invoke(cli, ["cluster", "join", "--address", "10.0.0.5:6379", "--resources",
                                     '{"radiology_gpu": 1}', "--num-cpus", "4", "--print-only", *extra])
        assert result.exit_code == 0, result.output
        assert TOKEN not in result.output
        assert "ray start --address=10.0.0.5:6379 '--resources={\"radiology_gpu\": 1}' --num-cpus=4" in result.output


def test_print_only_prints_the_serve_mode_of_this_machines_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    arguments = ["cluster", "join", "--address", "10.0.0.5:6379", "--print-only"]
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 ray start" in CliRunner().invoke(cli, arguments).output
    monkeypatch.setenv("MEDSERVE_SERVE_THROUGHPUT_OPTIMIZED", "false")
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in result.output
    assert "ray start --address=10.0.0.5:6379" in result.output


def test_cli_refuses_bad_resources_with_the_stable_code(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["cluster", "join", "--address", "h:6379", "--resources",
                                      '{"radiology_gpu": -1}', "--print-only"])
    assert isinstance(result.exception, ConfigurationError)
    assert result.exception.code == "configuration_error"


def test_token_comes_from_the_file_then_the_environment_then_medserve_home(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    settings = Settings(home=tmp_path)
    with pytest.raises(ConfigurationError, match="no Ray token"):
        join_token(settings)
    assert not (tmp_path / "ray-auth.token").exists()  # never generated: it would not be the head's
    (tmp_path / "ray-auth.token").write_text("from-home\n")
    assert join_token(settings) == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert join_token(settings) == "from-env"
    copy = tmp_path / "copy.token"
    copy.write_text("from-file\n")
    assert join_token(settings, copy) == "from-file"
    with pytest.raises(ConfigurationError, match="does not exist"):
        join_token(settings, tmp_path / "missing.token")


class _Answer:
    def __init__(self, rows):
        self.status_code = 200
        self._rows = rows

    def json(self):
        return {"result": True, "data": {"result": {"total": len(self._rows), "result": self._rows}}}


def test_nodes_and_replicas_come_from_the_state_api_with_the_token(monkeypatch):
    seen = []
    nodes = [
        {"node_id": "b" * 56, "node_ip": "10.0.0.7", "state": "ALIVE", "is_head_node": False,
         "resources_total": {"CPU": 8.0, "radiology_gpu": 1.0}},
        {"node_id": "a" * 56, "node_ip": "10.0.0.5", "state": "ALIVE", "is_head_node": True,
         "resources_total": {"CPU": 4.0}},
        {"node_id": "c" * 56, "node_ip": "10.0.0.9", "state": "DEAD", "is_head_node": False, "resources_total": {}},
    ]
    actors = [
        {"name": "SERVE_REPLICA::model-x-v1-0-0#ModelServer#abc", "node_id": "b" * 56, "state": "ALIVE"},
        {"name": "SERVE_REPLICA::gateway#Gateway#def", "node_id": "a" * 56, "state": "DEAD"},
        {"name": "SERVE_CONTROLLER_ACTOR", "node_id": "a" * 56, "state": "ALIVE"},
    ]

    def fake_get(url, params, headers, timeout):  # type: ignore[no-untyped-def]
        seen.append((url, headers))
        return _Answer(nodes if url.endswith("/nodes") else actors)

    monkeypatch.setattr("medserve.controlplane.cluster.httpx.get", fake_get)
    listed = list_nodes("http://127.0.0.1:8265/", TOKEN)
    assert [(n.address, n.is_head, n.alive) for n in listed] == [
        ("10.0.0.5", True, True), ("10.0.0.7", False, True), ("10.0.0.9", False, False)]
    assert listed[1].resources["radiology_gpu"] == 1.0
    placements = replica_placements("http://127.0.0.1:8265", TOKEN)
    assert [(p.app, p.deployment, p.node_id) for p in placements] == [("model-x-v1-0-0", "ModelServer", "b" * 56)]
    assert seen[0] == ("http://127.0.0.1:8265/api/v0/nodes", {"Authorization": f"Bearer {TOKEN}"})
    assert seen[1][0] == "http://127.0.0.1:8265/api/v0/actors"


def test_cluster_nodes_command_lists_id_address_state_and_resources(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    rows = [{"node_id": "b" * 56, "node_ip": "10.0.0.7", "state": "ALIVE", "is_head_node": False,
             "resources_total": {"CPU": 8.0, "radiology_gpu": 1.0, "node:10.0.0.7": 1.0}}]
    monkeypatch.setattr("medserve.controlplane.cluster.httpx.get", lambda *a, **k: _Answer(rows))
    result = CliRunner().invoke(cli, ["cluster", "nodes", "--dashboard", "http://10.0.0.5:8265"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["b" * 56, "10.0.0.7", "worker", "alive", "CPU=8,", "radiology_gpu=1"]


def test_cluster_nodes_without_a_known_cluster_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(cli, ["cluster", "nodes"])
    assert result.exit_code == 1 and "no Ray cluster known here" in result.output


def test_the_printed_resources_are_valid_json():
    join = parse_join(address="h:6379", resources={"radiology_gpu": 1, "pathology_gpu": 0.25})
    flag = next(part for part in join_command(join) if part.startswith("--resources="))
    assert json.loads(flag.removeprefix("--resources=")) == {"pathology_gpu": 0.25, "radiology_gpu": 1}


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("192.0.2.2", False), ("head.example", False),
])
def test_loopback_addresses_are_recognised(host, loopback):
    assert is_loopback(host) is loopback


def test_a_one_machine_head_holds_ray_to_loopback_and_a_cluster_head_does_not(tmp_path, monkeypatch):
    # Without Ray's one-machine switch, `ray start --node-ip-address=127.0.0.1` swaps in the machine's
    # network address and Ray listens there (tests/integration/test_local_binding.py measures the result).
    monkeypatch.setenv(RAY_CLUSTER_SWITCH, "1")
    local = ray_environment(Settings(home=tmp_path))
    assert local[RAY_CLUSTER_SWITCH] == "0" and local["RAY_AUTH_MODE"] == "token"
    head = ray_environment(Settings(home=tmp_path, ray_node_address="10.0.0.5"))
    assert RAY_CLUSTER_SWITCH not in head, "nodes join a head only with Ray's cluster mode on"


def test_replicas_run_at_normal_priority_unless_the_operator_chose_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv(RAY_WORKER_NICENESS, raising=False)
    assert ray_environment(Settings(home=tmp_path))[RAY_WORKER_NICENESS] == "0"
    assert node_process_environment(Settings(home=tmp_path), "token")[RAY_WORKER_NICENESS] == "0"
    monkeypatch.setenv(RAY_WORKER_NICENESS, "5")
    assert ray_environment(Settings(home=tmp_path))[RAY_WORKER_NICENESS] == "5"
    assert node_process_environment(Settings(home=tmp_path), "token")[RAY_WORKER_NICENESS] == "5"


def test_a_one_machine_gateway_drains_only_its_in_flight_requests(tmp_path, monkeypatch):
    # Ray holds a stopping direct-ingress replica open 30 s for a load balancer in front of its port;
    # only where something off the machine can reach that port.
    monkeypatch.delenv(RAY_DIRECT_INGRESS_DRAIN, raising=False)
    assert ray_environment(Settings(home=tmp_path))[RAY_DIRECT_INGRESS_DRAIN] == "0"
    opened = ray_environment(Settings(home=tmp_path, gateway_host="0.0.0.0"))
    cluster_head = ray_environment(Settings(home=tmp_path, ray_node_address="10.0.0.5"))
    joined = node_process_environment(Settings(home=tmp_path), "token")
    assert all(RAY_DIRECT_INGRESS_DRAIN not in env for env in (opened, cluster_head, joined))
    monkeypatch.setenv(RAY_DIRECT_INGRESS_DRAIN, "10")
    assert ray_environment(Settings(home=tmp_path))[RAY_DIRECT_INGRESS_DRAIN] == "10"


def test_join_warns_of_each_setting_the_nodes_replicas_would_not_share_with_the_head(tmp_path):
    alone = unshared_settings(Settings(home=tmp_path))
    assert [warning.split(" ", 1)[0] for warning in alone] == [
        "MEDSERVE_DATABASE_URL", "MEDSERVE_AUDIT_SIGNING_KEY", "MEDSERVE_PSEUDONYM_KEY"]
    assert "fail `medserve audit verify`" in alone[1]
    # The head's key files copied into this node's MEDSERVE_HOME serve as well as the variables.
    (tmp_path / "audit-signing.key").write_text("the head's key")
    shared = Settings(home=tmp_path, database_url="postgresql+psycopg://medserve@db/medserve", pseudonym_key="p")
    assert unshared_settings(shared) == []


def test_cli_join_prints_the_warnings_before_it_starts_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    for name in ("MEDSERVE_DATABASE_URL", "MEDSERVE_AUDIT_SIGNING_KEY", "MEDSERVE_PSEUDONYM_KEY"):
        monkeypatch.delenv(name, raising=False)

    class NotStartedHere(Exception):
        pass

    def start_node(*args, **kwargs):
        raise NotStartedHere  # no Ray here: the warnings must be out by now

    monkeypatch.setattr("medserve.controlplane.cluster.start_node", start_node)
    result = CliRunner().invoke(cli, ["cluster", "join", "--address", "10.0.0.5:6379"])
    assert isinstance(result.exception, NotStartedHere)
    assert result.output.count("warning: ") == 3 and "MEDSERVE_AUDIT_SIGNING_KEY is not set" in result.output


@pytest.mark.parametrize("throughput_optimized", [True, False])
def test_a_joined_node_runs_serve_in_the_heads_mode(tmp_path, monkeypatch, throughput_optimized):
    # Ray Serve reads its mode from each replica's environment: a node without it would run the gateway
    # without direct ingress beside a head with it (tests/integration/test_placement.py checks the replica).
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", raising=False)
    settings = Settings(home=tmp_path, serve_throughput_optimized=throughput_optimized)
    head, node = ray_environment(settings), node_process_environment(settings, "token")
    expected = "1" if throughput_optimized else None
    assert head.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == node.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == expected
    for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "MEDSERVE_HOME", "PYTHONPATH"):
        assert head[name] == node[name], name
    assert node["RAY_AUTH_TOKEN"] == "token" and "MEDSERVE_DATABASE_URL" in head


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_a_wildcard_is_no_node_address(tmp_path, wildcard):
    with pytest.raises(ValueError, match="never a wildcard"):
        Settings(home=tmp_path, ray_node_address=wildcard)
