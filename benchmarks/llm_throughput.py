"""Completion tokens per second through the gateway vs straight from the llama.cpp engine.

    python benchmarks/llm_throughput.py                      # starts its own local Ray on free ports
    python benchmarks/llm_throughput.py --url http://127.0.0.1:8100 --key msk_...   # a running gateway

Same prompts, same parameters (greedy, fixed seed), in one run. The paths
alternate request by request, so a neighbour's load on the machine falls on
all alike: the engine in this process (the same LlamaCppEngine class, built
from the same spec, that a replica runs), the gateway reaching the model's own
replica by DeploymentHandle, and the gateway with the engine loaded in its own
replica (placement: gateway), each whole and streamed; the paths take turns at
going first. Prints a table and the ratio of each to the engine (target >= 0.95),
from the totals and, robust to a burst of background load on a few requests,
the median of the paired ratios (the engine's seconds over the path's for the
same prompt in the same turn: greedy decoding makes the tokens the same).

A control row, "engine, second process", runs the same engine in a plain
process of its own (no Ray, no HTTP, no gateway): nothing but the engine
differs from the reference, so its ratio is the ruler's own spread in this
run, against which the paths' ratios are read. A benchmark, not a test: it
asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
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
CONTROL = "engine, second process (control)"


def in_gateway_variant(spec):  # type: ignore[no-untyped-def]
    """The same model and artifact, loaded inside the gateway's replica (placement gateway)."""
    model = spec.model.model_copy(update={"name": spec.model.name + "-in-gateway"})
    return spec.model_copy(update={"name": spec.name + "-in-gateway", "model": model, "placement": "gateway",
                                   "alias": None})


def demo_spec():  # type: ignore[no-untyped-def]
    from medserve.specs import load_catalog

    return next(s for s in load_catalog(REPO / "deployments") if s.name == SPEC_NAME)


def answer_in_process(engine, prompt: str, max_tokens: int) -> int:  # type: ignore[no-untyped-def]
    """One greedy answer from an engine in this process; its completion tokens."""
    from medserve.engines.base import GenerationParams

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)
    tokens = engine.chat_prompt([{"role": "user", "content": prompt}])
    return sum(p.tokens for p in engine.generate(tokens, params, threading.Event()))


def _control_engine(connection: Connection) -> None:
    """The control: the same engine in a plain process of its own; a prompt in, its completion tokens out.

    Spawned: the child imports this module again, which puts platform/ on its path."""
    from medserve.engines.loader import load_engine

    engine, _ = load_engine(demo_spec())
    connection.send("ready")
    while (request := connection.recv()) is not None:
        connection.send(answer_in_process(engine, *request))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="gateway URL of a running medserve (default: start a private one)")
    parser.add_argument("--key", help="API key for --url")
    # Four passes (24 answers, 2,800 tokens per path, about 3.5 minutes here): with two, a single
    # burst of Ray's daemons on two cores moved a ratio by 0.03.
    parser.add_argument("--rounds", type=int, default=4, help="passes over the prompts")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument("--serve-mode", choices=["throughput", "default"], default="throughput",
                        help="throughput: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress); default: Serve's proxy")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    from medserve.engines.loader import load_engine

    spec = demo_spec()
    here = in_gateway_variant(spec)
    stop = None
    url, key = args.url, args.key
    models = {"gateway": spec.model.name}
    if url is None:
        from medserve.bench.private import start_private_platform

        print("starting a private Ray with the gateway and", spec.model.name, "in both placements ...", flush=True)
        # Logical CPUs (a scheduling budget, not cores): the model's replica and the
        # gateway carrying the same engine each reserve theirs.
        platform = start_private_platform(throughput_optimized=args.serve_mode == "throughput", ray_num_cpus=4)
        stop = platform.stop
        try:
            platform.apply([spec, here])
        except BaseException:
            stop()  # never leave the private Ray running
            raise
        # The gateway's own port, as `up` ships it (gateway/listener.py).
        url, key = platform.gateway_url, platform.key
        models["gateway, engine in gateway"] = here.model.name
    # Spawned, not forked: a process forked from one whose OpenMP pool (llama.cpp's threads) ran can hang.
    spawn = multiprocessing.get_context("spawn")
    control_end, control_child_end = spawn.Pipe()
    control = spawn.Process(target=_control_engine, args=(control_child_end,), daemon=True)
    try:
        engine, _ = load_engine(spec)
        control.start()
        control_end.recv()
    except BaseException:
        if stop is not None:
            stop()  # never leave the private Ray running
        raise
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def direct(prompt: str) -> int:
        return answer_in_process(engine, prompt, args.max_tokens)

    def second_process(prompt: str) -> int:
        control_end.send((prompt, args.max_tokens))
        return control_end.recv()

    def gateway(prompt: str, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    def gateway_stream(prompt: str, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens, "temperature": 0, "seed": 1}
        import json

        # Like a thin client (and like the no-op load generator), only the event that carries the
        # usage is parsed: a JSON parse of every chunk in this process would take its CPU from the
        # engine on a small machine and count against the gateway.
        tokens = 0
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        return tokens

    runs = [("engine", direct), (CONTROL, second_process)]
    for label, model in models.items():
        runs.append((label, lambda prompt, model=model: gateway(prompt, model)))
        runs.append((label + " (stream)", lambda prompt, model=model: gateway_stream(prompt, model)))
    totals: dict[str, list[float]] = {name: [0, 0.0] for name, _ in runs}  # completion tokens, seconds
    # Per prompt and pass: each path's seconds, to pair with the engine's for the same prompt moments apart.
    seconds_of: list[dict[str, float]] = []
    try:
        for _, run in runs:  # warm every path
            run(PROMPTS[0])
        for turn in range(args.rounds * len(PROMPTS)):
            prompt = PROMPTS[turn % len(PROMPTS)]
            # The paths take turns at going first: no path always runs right after the same neighbour.
            shift = turn % len(runs)
            seconds_of.append({})
            for name, run in runs[shift:] + runs[:shift]:
                started = time.perf_counter()
                tokens = run(prompt)
                elapsed = time.perf_counter() - started
                totals[name][0] += tokens
                totals[name][1] += elapsed
                seconds_of[-1][name] = elapsed
    finally:
        client.close()
        control_end.send(None)  # the control's loop ends; daemon=True covers a control that hangs
        control.join(timeout=30)
        if stop is not None:
            stop()

    engine_rate = totals["engine"][0] / totals["engine"][1]
    print(f"\n{args.rounds} x {len(PROMPTS)} prompts, max_tokens {args.max_tokens}, greedy, {spec.model.name}\n")
    print("| path | completion tokens | seconds | tokens/s | ratio to engine | paired: median (quartiles) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (tokens, seconds) in totals.items():
        rate = tokens / seconds
        # Greedy decoding with one seed: every path generates the same tokens for a prompt, so the engine's
        # seconds over the path's, for the same prompt in the same turn, is the ratio of their speeds; the
        # median of those pairs is not moved by a burst of background load that hit a few requests.
        paired = [turn["engine"] / turn[name] for turn in seconds_of]  # rounds x prompts: always 6 or more
        quartiles = statistics.quantiles(paired, n=4)
        print(f"| {name} | {tokens} | {seconds:.2f} | {rate:.1f} | {rate / engine_rate:.3f} | "
              f"{statistics.median(paired):.3f} ({quartiles[0]:.3f}-{quartiles[2]:.3f}) |")


if __name__ == "__main__":
    main()
