"""Reasoning split, SSE framing, OpenAI request shapes and the vllm rendering (no model, no Ray)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from medserve.controlplane.render import render_serve_config
from medserve.engines.loader import engine_available
from medserve.engines.reasoning import ReasoningSplitter, Split, split_reasoning
from medserve.engines.registry import SERVE_LLM_APP
from medserve.errors import SpecError
from medserve.gateway.sse import DONE, sse_event
from medserve.protocols.openai import ChatCompletionRequest, ChunkWriter, CompletionRequest
from medserve.specs import load_catalog, parse_spec

# --- reasoning split (vLLM deepseek_r1 semantics) ---------------------------


@pytest.mark.parametrize(
    ("output", "reasoning", "content"),
    [
        ("<think>Fever, low BP.</think>Sepsis.", "Fever, low BP.", "Sepsis."),
        ("Fever, low BP.</think>Sepsis.", "Fever, low BP.", "Sepsis."),  # template opened <think>
        ("\n<think>x</think>", "x", ""),
        ("still thinking <thi", "still thinking <thi", ""),  # no </think>: all reasoning
        ("a</think>b</think>c", "a", "b</think>c"),
        ("", "", ""),
    ],
)
def test_split_like_vllms_deepseek_r1_parser(output, reasoning, content):
    assert split_reasoning(output) == Split(reasoning=reasoning, content=content)


def _stream(pieces: list[str]) -> Split:
    splitter = ReasoningSplitter()
    parts = [splitter.feed(piece) for piece in pieces] + [splitter.finish()]
    return Split("".join(p.reasoning for p in parts), "".join(p.content for p in parts))


def test_tags_split_across_pieces_never_leak():
    pieces = ["<", "thi", "nk>", "Check lac", "tate.<", "/", "think", ">", "Give fluids."]
    assert _stream(pieces) == Split("Check lactate.", "Give fluids.")


@given(
    reasoning=st.text(alphabet="ab<>/think \n", max_size=30).filter(lambda t: "</think>" not in t),
    content=st.text(alphabet="ab<>/think \n", max_size=30),
    opened=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_any_chunking_gives_the_same_split_as_the_whole(reasoning, content, opened, cuts):
    output = ("<think>" if opened else "") + reasoning + "</think>" + content
    points = sorted({min(c, len(output)) for c in cuts} | {0, len(output)})
    pieces = [output[a:b] for a, b in zip(points, points[1:])]
    assert _stream(pieces) == split_reasoning(output)


# --- SSE and chunks ---------------------------------------------------------


def test_sse_frames():
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert DONE == b"data: [DONE]\n\n"


def test_chat_chunks_shape_and_usage():
    writer = ChunkWriter("chat", "m", "m@1", include_usage=True)
    first, second, last = writer.delta("Hi"), writer.delta(" there", "why"), writer.finish("stop")
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    assert second["choices"][0]["delta"] == {"content": " there", "reasoning_content": "why"}
    assert last["choices"][0] == {"index": 0, "logprobs": None, "delta": {}, "finish_reason": "stop"}
    usage = writer.usage(3, 2)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert len({first["id"], last["id"], usage["id"]}) == 1
    json.dumps(usage)


def test_completion_chunks():
    writer = ChunkWriter("completion", "m", "m@1", include_usage=False)
    chunk = writer.delta("Paris")
    assert chunk["object"] == "text_completion" and "usage" not in chunk
    assert chunk["choices"][0]["text"] == "Paris"


# --- request models ---------------------------------------------------------


def test_chat_request_params_cap_and_stream_options():
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 900,
        "stop": "END", "seed": 3, "stream": True, "stream_options": {"include_usage": True},
    })
    assert request.params(256) == {"max_tokens": 256, "temperature": 0.7, "top_p": 1.0, "stop": ["END"], "seed": 3}
    assert request.include_usage


@pytest.mark.parametrize("bad", [
    {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"n": 2}, {"temperature": 3}, {"logit_bias": {}},
    {"stream_options": {"include_usage": True, "other": 1}},
])
def test_chat_request_refuses_what_is_not_honoured(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **bad})


def test_completion_request_takes_one_prompt():
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a"]}).prompt_text() == "a"
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a"}).params(512)["max_tokens"] == 16
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


# --- vllm specs render without vLLM installed --------------------------------


@pytest.fixture(scope="module")
def vllm_apps(repo_root):
    config = render_serve_config(load_catalog(repo_root / "deployments"))
    # Keyed by deployment name (application names also carry the version).
    return {
        app["args"]["spec"]["name"]: app for app in config["applications"] if app["import_path"] == SERVE_LLM_APP
    }


def test_deepseek_renders_to_ray_serve_llm_with_tp_and_reasoning(vllm_apps):
    app = vllm_apps["deepseek-r1-distill-qwen-32b"]
    assert app["route_prefix"] is None
    assert [d["name"] for d in app["deployments"]] == ["ModelServer"]
    assert app["deployments"][0]["ray_actor_options"] == {"num_cpus": 0.25}  # the adapter holds no GPU
    llm = app["args"]["llm_config"]
    assert llm["accelerator_type"] == "A100"
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 2
    assert llm["engine_kwargs"]["reasoning_parser"] == "deepseek_r1"
    assert llm["engine_kwargs"]["max_model_len"] == 32768
    assert llm["placement_group_config"] == {"bundle_per_worker": {"GPU": 1.0}, "strategy": "PACK"}
    assert llm["model_loading_config"] == {
        "model_id": "deepseek-r1-distill-qwen-32b", "model_source": "/models/deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"}
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 2
    assert llm["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_qwen_renders_one_h100_and_no_reasoning_parser(vllm_apps):
    llm = vllm_apps["qwen2-5-32b-instruct"]["args"]["llm_config"]
    assert llm["accelerator_type"] == "H100"
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 1
    assert "reasoning_parser" not in llm["engine_kwargs"]
    assert llm["placement_group_config"]["bundle_per_worker"] == {"GPU": 1.0}


def test_gateway_catalog_knows_who_sees_reasoning(repo_root):
    config = render_serve_config(load_catalog(repo_root / "deployments"))
    catalog = {e["model_name"]: e for e in config["applications"][0]["args"]["catalog"]}
    assert catalog["deepseek-r1-distill-qwen-32b"]["reasoning_to_client"] is True
    assert catalog["smollm2-135m-instruct"]["reasoning_to_client"] is False


def test_fractional_gpu_share_is_per_worker(repo_root):
    import yaml

    data = yaml.safe_load((repo_root / "deployments/qwen2-5-32b-instruct.yaml").read_text())
    data["resources"]["num_gpus"] = 0.5
    from medserve.engines.vllm_app import llm_config_for

    assert llm_config_for(parse_spec(data))["placement_group_config"]["bundle_per_worker"]["GPU"] == 0.5
    data["resources"]["num_gpus"] = 2  # more GPUs than tensor-parallel workers
    with pytest.raises(SpecError, match="tensor_parallel_size"):
        parse_spec(data)


def test_reasoning_parser_lives_in_the_reasoning_section(repo_root):
    import yaml

    data = yaml.safe_load((repo_root / "deployments/deepseek-r1-distill-qwen-32b.yaml").read_text())
    data["model"]["parameters"]["reasoning_parser"] = "deepseek_r1"
    with pytest.raises(SpecError, match="reasoning.parser"):
        parse_spec(data)


def test_missing_gpu_extra_is_a_reason_not_a_traceback():
    available, reason = engine_available("vllm")
    if available:
        pytest.skip("vLLM is installed here")  # noqa: the CI image never has it
    assert "medserve[gpu]" in reason


def test_vllm_app_without_the_extra_raises_missing_extra(vllm_apps):
    from medserve.engines.vllm_app import build_app
    from medserve.errors import MissingExtraError

    app = vllm_apps["qwen2-5-32b-instruct"]
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match=r"medserve\[gpu\]"):
            build_app(app["args"])
    else:
        pytest.skip("ray[llm] is importable here")
