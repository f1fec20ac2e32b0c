"""Shared fixtures: the gateway URLs and key come from tests/sdk.rs, which
starts the real gateway (and mock providers) before running pytest."""

import os

import anthropic
import openai
import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set; run these tests through `cargo test --test sdk`")
    return value


@pytest.fixture
def gateway_url():
    return _env("SWITCHYARD_BASE_URL")


@pytest.fixture
def key():
    return _env("SWITCHYARD_KEY")


@pytest.fixture
def client(gateway_url, key):
    # max_retries=0: a retry would hide the status we are checking.
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def sim_client(key):
    """A gateway started with no provider keys at all: only `simulated`."""
    return openai.OpenAI(
        base_url=_env("SWITCHYARD_SIM_BASE_URL") + "/v1", api_key=key, max_retries=0, timeout=30
    )


@pytest.fixture
def anthropic_client(gateway_url, key):
    return anthropic.Anthropic(base_url=gateway_url, api_key=key, max_retries=0, timeout=30)
