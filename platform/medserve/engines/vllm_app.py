"""The vllm engine: vLLM served by Ray Serve LLM (``ray.serve.llm``), behind the medserve interface.

A vllm spec becomes one Serve application with two deployments:

- ``LLMServer:<model>``: Ray Serve LLM's own deployment running vLLM, with a
  placement group of ``tensor_parallel_size`` bundles, each taking
  ``num_gpus / tensor_parallel_size`` GPUs of the spec's accelerator type;
  the reasoning split is vLLM's own parser (``reasoning.parser``);
- ``ModelServer``: a thin CPU adapter, the application's ingress, that speaks
  the same methods as the llama.cpp ModelServer (``generate``,
  ``generate_stream``), so the gateway reaches every engine the same way, by
  handle, and no model has a public route.

``llm_config_for`` is pure (it does not import Ray Serve LLM): the control
plane renders vllm specs on machines without the ``medserve[gpu]`` extra.
Only ``build_app`` needs it, and without it raises MissingExtraError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from medserve.engines.artifacts import verify_artifact
from medserve.engines.serve_app import _envelope_errors, _envelope_stream_errors, whole_answer
from medserve.errors import ContextLengthExceededError, InferenceError, MissingExtraError
from medserve.specs import DeploymentSpec

logger = logging.getLogger("medserve.engine.vllm")

GPU_EXTRA_HINT = "install the optional extra medserve[gpu] (ray[llm]: vLLM through Ray Serve LLM) on the GPU nodes"
LLM_DEPLOYMENT_PREFIX = "LLMServer:"
# Engine parameters that medserve sets itself from other spec fields.
RESERVED_ENGINE_KWARGS = {"tensor_parallel_size", "reasoning_parser", "model"}


def model_source(spec: DeploymentSpec) -> str:
    """A local path: vLLM loads staged weights, nothing is downloaded."""
    uri = spec.model.artifact.uri
    return uri.removeprefix("file://")


def llm_config_for(spec: DeploymentSpec) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMConfig`` fields for a vllm spec, as plain data."""
    tensor_parallel = spec.tensor_parallel_size
    engine_kwargs = {k: v for k, v in spec.model.parameters.items() if k not in RESERVED_ENGINE_KWARGS}
    engine_kwargs["tensor_parallel_size"] = tensor_parallel
    if spec.reasoning.parser:
        engine_kwargs["reasoning_parser"] = spec.reasoning.parser
    scaling = spec.autoscaling
    deployment_config: dict[str, Any] = {
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": spec.resources.num_cpus},
    }
    if scaling.is_fixed:
        deployment_config["num_replicas"] = scaling.min_replicas
    else:
        deployment_config["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            **({"initial_replicas": scaling.initial_replicas} if scaling.initial_replicas is not None else {}),
        }
    per_worker: dict[str, float] = {"GPU": spec.resources.num_gpus / tensor_parallel}
    per_worker.update(spec.resources.custom)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.model.name, "model_source": model_source(spec)},
        "engine_kwargs": engine_kwargs,
        # Ray Serve LLM repeats the bundle per tensor-parallel worker and adds
        # the accelerator_type resource to each; PACK keeps them on one node if it can.
        "placement_group_config": {"bundle_per_worker": per_worker, "strategy": "PACK"},
        "deployment_config": deployment_config,
        # Air-gapped hospitals: never reach a model hub.
        "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    }
    if spec.resources.accelerator_type:
        config["accelerator_type"] = spec.resources.accelerator_type
    return config


def _parse_sse(item: Any) -> list[dict[str, Any]]:
    """Ray Serve LLM streams batches of ``data: {...}\\n\\n`` strings (or one response object)."""
    items = item if isinstance(item, list) else [item]
    chunks = []
    for entry in items:
        if hasattr(entry, "model_dump"):
            chunks.append(entry.model_dump())
            continue
        for line in str(entry).splitlines():
            line = line.strip()
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    return chunks


def _raise_for_error(chunk: dict[str, Any]) -> None:
    error = chunk.get("error") if "choices" not in chunk else None
    if not error:
        return
    status = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    if status == 400 and ("context length" in message or "too long" in message):
        raise ContextLengthExceededError()
    raise InferenceError()


class VLLMModelServer:
    """The ingress of a vllm application: medserve's engine methods over Ray Serve LLM."""

    def __init__(self, spec: dict[str, Any], llm_server: Any, allow_unpinned: bool = False) -> None:
        self.spec = DeploymentSpec.model_validate(spec)
        # The same refusal as every engine: weights that differ from the pin are not served.
        _, self.artifact_sha256 = verify_artifact(
            self.spec.model.artifact.uri, self.spec.model.artifact.sha256, allow_unpinned=allow_unpinned
        )
        self._llm = llm_server.options(stream=True)

    def _openai_request(self, request: dict[str, Any]) -> Any:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

        params = request["params"]
        common = {
            "model": self.spec.model.name,
            "max_tokens": params["max_tokens"],
            "temperature": params["temperature"],
            "top_p": params["top_p"],
            "stop": params["stop"] or None,
            "seed": params["seed"],
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if request.get("kind", "chat") == "chat":
            return ChatCompletionRequest(messages=request["messages"], **common)
        return CompletionRequest(prompt=request["prompt"], **common)

    async def _events(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        limit = self.spec.inputs.max_prompt_tokens
        started, completion_tokens, prompt_tokens = False, 0, 0
        finish_reason = None
        stream = self._llm.chat if request.get("kind", "chat") == "chat" else self._llm.completions
        async for item in stream.remote(self._openai_request(request)):
            for chunk in _parse_sse(item):
                _raise_for_error(chunk)
                usage = chunk.get("usage") or {}
                prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                if not started:
                    if limit and prompt_tokens > limit:
                        raise ContextLengthExceededError(limit=limit, prompt_tokens=prompt_tokens)
                    started = True
                    yield {"type": "start", "prompt_tokens": prompt_tokens}
                tokens = usage.get("completion_tokens", completion_tokens) - completion_tokens
                completion_tokens += max(tokens, 0)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    content = delta.get("content") if "delta" in choice else choice.get("text")
                    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if content or reasoning or tokens:
                        yield {"type": "delta", "content": content or "", "reasoning": reasoning,
                               "tokens": max(tokens, 0)}
                        tokens = 0
                    finish_reason = choice.get("finish_reason") or finish_reason
        yield {"type": "end", "finish_reason": finish_reason or "stop", "prompt_tokens": prompt_tokens,
               "completion_tokens": completion_tokens, "time_to_first_token_s": None}

    @_envelope_stream_errors
    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for event in self._events(request):
            yield event

    @_envelope_errors
    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        return await whole_answer(self._events(request))

    async def check_health(self) -> None:
        return None


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named by import_path in the rendered Serve config."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError:
        raise MissingExtraError(f"the vllm engine is not installed: {GPU_EXTRA_HINT}", engine="vllm") from None
    llm_server = build_llm_deployment(LLMConfig(**args["llm_config"]), name_prefix=LLM_DEPLOYMENT_PREFIX)
    adapter = serve.deployment(VLLMModelServer, name="ModelServer")
    return adapter.bind(args["spec"], llm_server, bool(args.get("allow_unpinned", False)))
