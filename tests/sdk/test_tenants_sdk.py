"""Tenant limits and budgets as the official SDKs see them: a 429 from the
gateway's limiter is a RateLimitError carrying retry-after and OpenAI's
rate-limit headers; a spent budget is `insufficient_quota`. Driven by
tests/tenants_limits.rs, which starts the edge and passes the keys."""

import os

import anthropic
import openai
import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run through `cargo test --test tenants_limits`")
    return value


def _openai(key):
    return openai.OpenAI(base_url=_env("SWITCHYARD_BASE_URL") + "/v1", api_key=key, max_retries=0)


def _ask(client):
    return client.chat.completions.create(
        model="sim/small", messages=[{"role": "user", "content": "hello there"}]
    )


def test_rpm_limit_raises_rate_limit_error_with_retry_after():
    client = _openai(_env("SWITCHYARD_RPM_KEY"))
    raw = client.chat.completions.with_raw_response.create(
        model="sim/small", messages=[{"role": "user", "content": "hello there"}]
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2"
    _ask(client)
    _ask(client)
    with pytest.raises(openai.RateLimitError) as err:
        _ask(client)
    e = err.value
    assert e.status_code == 429
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.code == "rate_limit_exceeded"


def test_anthropic_sdk_sees_its_own_rate_limit_error():
    client = anthropic.Anthropic(
        base_url=_env("SWITCHYARD_BASE_URL"), api_key=_env("SWITCHYARD_RPM_KEY"), max_retries=0
    )
    # The OpenAI test above spent this tenant's minute.
    with pytest.raises(anthropic.RateLimitError) as err:
        client.messages.create(
            model="sim/small", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.response.headers.get("retry-after")


def test_spent_budget_is_insufficient_quota():
    client = _openai(_env("SWITCHYARD_BUDGET_KEY"))
    seen_warning = False
    for _ in range(20):
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="sim/small", messages=[{"role": "user", "content": "hello there"}]
            )
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota"
            assert "budget" in e.message
            break
        seen_warning |= "x-switchyard-budget-warning" in raw.headers
    else:
        pytest.fail("the budget never ran out")
    assert seen_warning
