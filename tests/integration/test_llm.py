"""LLM serving end to end on the shared Ray cluster: the openai SDK, streaming, limits, cancellation."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from .conftest import Platform, new_patient_id

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def sdk(platform: Platform) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key=platform.key("clinical-app"), max_retries=0)


def _rows_when_written(platform: Platform, patient: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        rows = platform.audit_rows_for_patient(patient)
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_models_list_shows_the_llm_with_its_version(sdk: openai.OpenAI):
    models = {model.id: model for model in sdk.models.list()}
    assert models[SMOL].version == "0.1.2-q4_1"


def test_sdk_whole_and_streamed_chat_with_usage(platform: Platform, sdk: openai.OpenAI):
    messages = [{"role": "user", "content": "Name one symptom of anaemia."}]
    whole = sdk.chat.completions.create(model=SMOL, messages=messages, max_tokens=12, temperature=0, seed=5)
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    assert whole.choices[0].finish_reason in {"stop", "length"}

    patient = new_patient_id()
    stream = sdk.chat.completions.create(
        model=SMOL, messages=messages, max_tokens=12, temperature=0, seed=5, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Patient-Id": patient},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    (row,) = _rows_when_written(platform, patient)
    assert row.outcome == "ok" and row.operation == "chat.completions"
    assert row.completion_tokens == whole.usage.completion_tokens
    assert row.finish_reason == whole.choices[0].finish_reason and row.time_to_first_token_ms > 0


def test_sdk_text_completion(sdk: openai.OpenAI):
    completion = sdk.completions.create(model=SMOL, prompt="The heart has four", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens <= 5 and completion.choices[0].text


def test_prompt_over_the_limit_is_400_streamed_or_not(sdk: openai.OpenAI):
    messages = [{"role": "user", "content": "word " * 2000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model=SMOL, messages=messages, max_tokens=4, stream=stream)
        assert caught.value.body["code"] == "context_length_exceeded"


def test_stream_closed_after_the_first_chunk_is_audited_once_as_cancelled(platform: Platform):
    patient = new_patient_id()
    body = {"model": SMOL, "stream": True, "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a hospital."}]}
    key = platform.key("clinical-app")
    with httpx.Client(base_url=platform.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {key}", "X-Patient-Id": patient}) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
        # Leaving the block closes the connection mid-stream.
    rows = _rows_when_written(platform, patient)
    assert len(rows) == 1
    (row,) = rows
    assert row.outcome == "cancelled" and row.finish_reason == "cancelled"
    assert row.completion_tokens is not None and row.completion_tokens < 200
    time.sleep(1.0)
    assert len(platform.audit_rows_for_patient(patient)) == 1
