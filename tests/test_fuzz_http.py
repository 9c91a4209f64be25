"""Schema-driven fuzzing (schemathesis) of the live Serve app over HTTP on loopback: requests
generated from the app's own OpenAPI document (``GET /openapi.json``) for every route, with a
fixed seed and budget. No response may be a 5xx; generations are capped small so the run stays
short (``max_tokens`` beyond the cap gets a 400, which is part of what is checked)."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from tests.serve_harness import serve_on_loopback

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(900), pytest.mark.filterwarnings(r"ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def live_app():
    args = {"model": "models/expertmap-moe-tiny", "gpus": 1, "policy": "on-demand", "link": "instant",
            "max_queue": 16, "max_tokens_limit": 8}  # fmt: skip
    with serve_on_loopback({"fuzz": ("/", args)}, gpus=1) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(live_app):
    return schemathesis.openapi.from_url(f"{live_app}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_no_route_answers_5xx(case, live_app):
    response = case.call(base_url=live_app, timeout=120)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text[:300])
    if response.status_code >= 400:  # every error is an OpenAI-style body
        body = response.json()
        assert "error" in body, (case.path, case.body, response.status_code, body)
        err = body["error"]
        assert err["message"] and err["type"]


def test_oversized_body_is_413_and_the_app_still_answers(live_app):
    big = b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}'
    r = requests.post(f"{live_app}/v1/completions", data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.post(f"{live_app}/v1/completions", json={"model": "expertmap-moe-tiny", "prompt": "hi", "max_tokens": 9},
                      timeout=60)  # fmt: skip
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]  # over max_tokens_limit
    r = requests.post(f"{live_app}/v1/completions", json={"model": "expertmap-moe-tiny", "prompt": "hi", "max_tokens": 3},
                      timeout=60)  # fmt: skip
    assert r.status_code == 200
