"""The door as ordinary clients meet it, under the shipped defaults: an oversized body is answered with a
readable 413 (not a reset connection), and one key's burst meets the default rate limit while other keys
keep being served."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import requests

from medserve.settings import DEFAULT_BURST_SECONDS, DEFAULT_KEY_RPS

from .conftest import Platform

TUMOUR = "brain-mri-tumour"
OVERSIZED = 64 * 1024 * 1024 + 1024  # over the default 64 MiB limit


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/dicom", "X-Patient-Id": "MRN-front-door"}


def _with_urllib(url: str, key: str, body: bytes) -> tuple[int, dict, str | None]:
    request = urllib.request.Request(url, data=body, headers=_headers(key), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read()), answer.headers.get("Connection")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers.get("Connection")


def _with_requests(url: str, key: str, body: bytes) -> tuple[int, dict, str | None]:
    answer = requests.post(url, data=body, headers=_headers(key), timeout=120)
    return answer.status_code, answer.json(), answer.headers.get("Connection")


def _with_httpx(url: str, key: str, body: bytes) -> tuple[int, dict, str | None]:
    answer = httpx.post(url, content=body, headers=_headers(key), timeout=120)
    return answer.status_code, answer.json(), answer.headers.get("Connection")


def test_a_64_mib_body_gets_a_readable_413_from_urllib_requests_and_httpx(platform: Platform):
    key = platform.key()
    url = f"{platform.base_url}/v1/imaging/{TUMOUR}"
    body = b"\0" * OVERSIZED
    for client in (_with_urllib, _with_requests, _with_httpx):
        status, payload, connection = client(url, key, body)
        assert status == 413, (client.__name__, status, payload)
        assert payload["error"]["code"] == "payload_too_large", (client.__name__, payload)
        assert connection == "close", client.__name__
        with platform.client(key) as follow_up:  # the gateway serves the next request
            assert follow_up.get("/v1/models").status_code == 200


def test_a_burst_from_one_fresh_key_meets_the_default_rate_limit_while_other_keys_are_served(platform: Platform):
    noisy, neighbour = platform.key(), platform.key()
    burst = int(DEFAULT_KEY_RPS * DEFAULT_BURST_SECONDS) * 3

    def one(_: int) -> httpx.Response:
        return client.get("/v1/models")

    with platform.client(noisy) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(burst)))
    refused = [a for a in answers if a.status_code == 429]
    assert refused, f"{burst} requests from one key, none refused"
    assert {a.status_code for a in answers} == {200, 429}
    assert all(a.json()["error"]["code"] == "rate_limited" and int(a.headers["Retry-After"]) >= 1 for a in refused)
    with platform.client(neighbour) as other:
        assert other.get("/v1/models").status_code == 200
