"""Engines with the real models, driven through ModelServer without Ray."""

import asyncio

import numpy as np
import pytest

from medserve.engines.serve_app import ModelServer
from medserve.errors import ArtifactIntegrityError
from medserve.specs import load_catalog


@pytest.fixture(scope="module")
def catalog(repo_root):
    return {spec.name: spec for spec in load_catalog(repo_root / "deployments")}


@pytest.fixture(scope="module")
def tumour(catalog):
    return ModelServer(catalog["brain-mri-tumour"].model_dump(mode="json"))


@pytest.fixture(scope="module")
def smol(catalog):
    return ModelServer(catalog["smollm2-demo"].model_dump(mode="json"))


def run(coroutine):
    return asyncio.run(coroutine)


def test_mr_instance_is_classified(tumour, mr_small_path):
    result = run(tumour.classify(mr_small_path.read_bytes(), "application/dicom"))
    labels = {finding["label"] for finding in result["findings"]}
    assert labels == {"glioma", "meningioma", "notumor", "pituitary"}
    assert sum(f["probability"] for f in result["findings"]) == pytest.approx(1.0, abs=1e-3)
    assert result["input"]["modality"] == "MR"
    assert len(result["output_sha256"]) == 64


def test_ct_to_mr_only_model_is_refused(tumour, ct_small_path):
    result = run(tumour.classify(ct_small_path.read_bytes(), "application/dicom"))
    assert result["error"]["code"] == "input_not_supported"
    assert result["error"]["details"]["accepted_modalities"] == ["MR"]


def test_corrupt_dicom_is_an_error_payload(tumour):
    assert run(tumour.classify(b"garbage", "application/dicom"))["error"]["code"] == "invalid_dicom"
    assert run(tumour.classify(b"x", "text/plain"))["error"]["code"] == "unsupported_media_type"


def test_oip_tensors_in_and_out(tumour):
    tensor = np.zeros((1, 240, 240, 3), dtype=np.float32)
    input_name = run(tumour.metadata())["inputs"][0]["name"]
    request = {"inputs": [{"name": input_name, "shape": [1, 240, 240, 3], "datatype": "FP32", "data": tensor.ravel().tolist()}]}
    result = run(tumour.infer(request))
    (output,) = result["outputs"]
    assert output["shape"] == [1, 4]
    assert sum(output["data"]) == pytest.approx(1.0, abs=1e-3)

    bad = {"inputs": [{"name": input_name, "shape": [1, 2], "datatype": "FP32", "data": [0.0, 1.0]}]}
    assert run(tumour.infer(bad))["error"]["code"] == "bad_request"


def _chat(content, **params):
    return {
        "kind": "chat",
        "messages": [{"role": "user", "content": content}],
        "params": {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 1, **params},
    }


async def _collect(stream):
    return [event async for event in stream]


def test_chat_generates_and_counts_tokens(smol):
    result = run(smol.generate(_chat("Say hello.")))
    assert 0 < result["completion_tokens"] <= 8
    assert result["prompt_tokens"] > 3
    assert result["finish_reason"] in {"stop", "length"}
    assert isinstance(result["content"], str) and result["reasoning"] == ""
    assert result["time_to_first_token_s"] > 0


def test_stream_matches_the_whole_answer(smol):
    request = _chat("Name a bone of the arm.", max_tokens=24)
    whole = run(smol.generate(request))
    events = run(_collect(smol.generate_stream(request)))
    assert events[0] == {"type": "start", "prompt_tokens": whole["prompt_tokens"]}
    deltas = [e for e in events if e["type"] == "delta"]
    assert "".join(e["content"] for e in deltas) == whole["content"]
    assert sum(e["tokens"] for e in deltas) == whole["completion_tokens"]
    assert events[-1]["type"] == "end" and events[-1]["finish_reason"] == whole["finish_reason"]


def test_max_tokens_ends_with_length(smol):
    result = run(smol.generate(_chat("Write a long story about a hospital.", max_tokens=5)))
    assert result["completion_tokens"] == 5 and result["finish_reason"] == "length"


def test_stop_sequence_ends_early_and_is_not_returned(smol):
    request = _chat("Write a long story about a hospital.", max_tokens=40)
    free = run(smol.generate(request))["content"]
    word = free.split()[3]
    stopped = run(smol.generate(_chat("Write a long story about a hospital.", max_tokens=40, stop=[word])))
    assert stopped["finish_reason"] == "stop"
    assert word not in stopped["content"] and free.startswith(stopped["content"])


def test_same_seed_same_sample(smol):
    request = _chat("Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=1234)
    assert run(smol.generate(request))["content"] == run(smol.generate(request))["content"]


def test_text_completion(smol):
    request = {"kind": "completion", "prompt": "The capital of France is",
               "params": {"max_tokens": 6, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": 1}}
    result = run(smol.generate(request))
    assert result["prompt_tokens"] >= 5 and 0 < result["completion_tokens"] <= 6


def test_closing_the_stream_stops_the_engine(smol):
    async def scenario():
        stream = smol.generate_stream(_chat("Write a long story about a hospital.", max_tokens=200))
        assert (await stream.__anext__())["type"] == "start"
        assert (await stream.__anext__())["type"] == "delta"
        await stream.aclose()
        # The engine thread notices the cancel flag at its next token and frees the model.
        for _ in range(200):
            if not smol.engine._lock.locked():
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(scenario())


def test_prompt_over_the_limit_is_refused(smol):
    result = run(smol.generate(_chat("word " * 3000)))
    assert result["error"]["code"] == "context_length_exceeded"
    (event,) = run(_collect(smol.generate_stream(_chat("word " * 3000))))
    assert event["error"]["code"] == "context_length_exceeded"


def test_tampered_artifact_pin_refuses_to_load(catalog):
    spec = catalog["brain-mri-tumour"]
    artifact = spec.model.artifact.model_copy(update={"sha256": "f" * 64})
    tampered = spec.model_copy(update={"model": spec.model.model_copy(update={"artifact": artifact})})
    with pytest.raises(ArtifactIntegrityError):
        ModelServer(tampered.model_dump(mode="json"))


def test_engine_table_names_every_engine_class():
    """Each row of the one engine table names a class of its task (or none: Ray Serve LLM runs it)."""
    import typing

    from medserve.engines.base import Engine
    from medserve.engines.loader import engine_available, engine_class
    from medserve.engines.registry import ENGINES, MODEL_SERVER_APP, SERVE_LLM_APP
    from medserve.specs import EngineName

    assert typing.get_args(EngineName) == tuple(ENGINES)
    for info in ENGINES.values():
        if info.engine_class is None:
            assert info.serve_llm and info.app_import_path == SERVE_LLM_APP
            continue
        assert info.app_import_path == MODEL_SERVER_APP
        if engine_available(info.name)[0]:
            assert issubclass(engine_class(info.engine_class), Engine), info.name
