"""Completion tokens per second through the gateway vs straight from the llama.cpp engine.

    python benchmarks/llm_throughput.py                      # starts its own local Ray on free ports
    python benchmarks/llm_throughput.py --url http://127.0.0.1:8000 --key msk_...   # a running gateway

Same prompts, same parameters (greedy, fixed seed), in one run. The two paths
alternate request by request, so a neighbour's load on the machine falls on
both alike. The in-process engine is the same LlamaCppEngine class, built
from the same spec, that the Serve replica runs. Prints a table and the
ratio gateway / engine (target >= 0.95). A benchmark, not a test: it asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))

PROMPTS = [
    "Explain what sepsis is to a new nurse.",
    "List the steps of hand hygiene before a sterile procedure.",
    "Describe how to take a blood pressure reading.",
    "What should a discharge summary contain?",
    "Explain the difference between a virus and a bacterium.",
    "How is dehydration recognised in children?",
]
SPEC_NAME = "smollm2-demo"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_platform(spec) -> tuple[str, str, object]:  # type: ignore[no-untyped-def]
    """A private local Ray with the gateway and this one model, as `medserve up` starts it."""
    home = tempfile.mkdtemp(prefix="medserve-bench-")
    os.environ.update({
        "MEDSERVE_HOME": home,
        "MEDSERVE_GATEWAY_PORT": str(_free_port()),
        "MEDSERVE_RAY_DASHBOARD_PORT": str(_free_port()),
        "MEDSERVE_RAY_HEAD_PORT": str(_free_port()),
        "RAY_AUTH_MODE": "token",
        # The demo model is a research-use version nobody has approved.
        "MEDSERVE_REQUIRE_APPROVED_VERSIONS": "false",
    })
    from medserve.controlplane.local_ray import start_local_ray, stop_local_ray
    from medserve.controlplane.reconcile import apply_catalog
    from medserve.controlplane.render import RenderOptions
    from medserve.controlplane.targets import RayClusterTarget
    from medserve.db.engine import session_scope, upgrade
    from medserve.security.api_keys import create_api_key
    from medserve.settings import Settings

    settings = Settings()
    upgrade(settings.resolved_database_url)
    settings.pseudonym_key_bytes()  # the keys exist before replicas race for them, as in `up`
    settings.audit_signing_key_bytes()
    connection = start_local_ray(settings)
    apply_catalog(settings.resolved_database_url, [spec], RayClusterTarget(connection.dashboard_url,
                  connection.auth_token), RenderOptions.from_settings(settings), registered_by="benchmark",
                  require_approved=settings.require_approved_versions)
    with session_scope(settings.resolved_database_url) as session:
        _, key = create_api_key(session, name="benchmark", role="clinical-app")
    return f"http://127.0.0.1:{settings.gateway_port}", key, lambda: stop_local_ray(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="gateway URL of a running medserve (default: start a private one)")
    parser.add_argument("--key", help="API key for --url")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    args = parser.parse_args()

    from medserve.engines.base import GenerationParams
    from medserve.engines.loader import load_engine
    from medserve.specs import load_catalog

    spec = next(s for s in load_catalog(REPO / "deployments") if s.name == SPEC_NAME)
    stop = None
    url, key = args.url, args.key
    if url is None:
        print("starting a private Ray with the gateway and", spec.model.name, "...", flush=True)
        url, key, stop = _start_platform(spec)
    engine, _ = load_engine(spec)
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, seed=1)
    totals = {"engine": [0, 0.0], "gateway": [0, 0.0], "gateway (stream)": [0, 0.0]}
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def direct(prompt: str) -> int:
        tokens = engine.chat_prompt([{"role": "user", "content": prompt}])
        return sum(p.tokens for p in engine.generate(tokens, params, threading.Event()))

    def gateway(prompt: str) -> int:
        body = {"model": spec.model.name, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    def gateway_stream(prompt: str) -> int:
        body = {"model": spec.model.name, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
        import json

        tokens = 0
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    try:
        gateway(PROMPTS[0]), direct(PROMPTS[0])  # warm both paths
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                for name, run in (("engine", direct), ("gateway", gateway), ("gateway (stream)", gateway_stream)):
                    started = time.perf_counter()
                    tokens = run(prompt)
                    totals[name][0] += tokens
                    totals[name][1] += time.perf_counter() - started
    finally:
        client.close()
        if stop is not None:
            stop()

    engine_rate = totals["engine"][0] / totals["engine"][1]
    print(f"\n{args.rounds} x {len(PROMPTS)} prompts, max_tokens {args.max_tokens}, greedy, {spec.model.name}\n")
    print("| path | completion tokens | seconds | tokens/s | ratio to engine |")
    print("|---|---:|---:|---:|---:|")
    for name, (tokens, seconds) in totals.items():
        rate = tokens / seconds
        print(f"| {name} | {tokens} | {seconds:.2f} | {rate:.1f} | {rate / engine_rate:.3f} |")


if __name__ == "__main__":
    main()
