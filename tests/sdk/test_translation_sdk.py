"""Protocol translation through the official SDKs.

- the `openai` SDK against Anthropic- and Gemini-backed models (mock upstreams
  replaying those providers' recorded wire formats);
- the `anthropic` SDK against `/v1/messages`, backed by an Anthropic-format
  upstream (passed through) and by an OpenAI-format upstream (translated).
"""

import json

import anthropic
import openai
import pytest

QUESTION = [{"role": "user", "content": "What is 4200 + 42?"}]

SECRET_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "secret_retrieval_tool",
        "description": "Look up the secret for a password",
        "parameters": {"type": "object", "properties": {"password": {"type": "string"}}, "required": ["password"]},
    },
}
SECRET_TOOL_ANTHROPIC = {
    "name": "secret_retrieval_tool",
    "description": "Look up the secret for a password",
    "input_schema": SECRET_TOOL_OPENAI["function"]["parameters"],
}


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"])
def test_openai_sdk_chat_and_stream(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION)
    assert "4242" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0

    text, usage, finish = "", None, None
    for chunk in client.chat.completions.create(
        model=model, messages=QUESTION, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "4242" in text
    assert finish == "stop"
    assert usage and usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"])
def test_openai_sdk_tool_round_trip(client, model):
    messages = [{"role": "user", "content": "Get the secrets for 'mellon' and 'speak friend'."}]
    first = client.chat.completions.create(model=model, messages=messages, tools=[SECRET_TOOL_OPENAI])
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls and msg.tool_calls[0].function.name == "secret_retrieval_tool"
    for call in msg.tool_calls:
        assert call.id
        assert "password" in json.loads(call.function.arguments)
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "Welcome to Moria!"})
    second = client.chat.completions.create(model=model, messages=messages, tools=[SECRET_TOOL_OPENAI])
    assert second.choices[0].message.content


def test_openai_sdk_streamed_tool_calls_from_anthropic(client):
    calls = {}
    for chunk in client.chat.completions.create(
        model="anthropic/claude-haiku-4-5",
        messages=[{"role": "user", "content": "secret for mellon"}],
        tools=[SECRET_TOOL_OPENAI],
        stream=True,
    ):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function:
                entry["name"] += tc.function.name or ""
                entry["args"] += tc.function.arguments or ""
    assert calls
    for entry in calls.values():
        assert entry["id"].startswith("toolu_") and entry["name"]
        json.loads(entry["args"])


def test_openai_sdk_provider_errors(client):
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="anthropic/case-error-429-rate-limit", messages=QUESTION)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gemini/case-error-404-model-not-found", messages=QUESTION)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="anthropic/case-error-500-api-error", messages=QUESTION)
    with pytest.raises(openai.APIError):
        # An `overloaded_error` after the stream started surfaces as an error.
        for _ in client.chat.completions.create(
            model="anthropic/midstream-overloaded", messages=QUESTION, stream=True
        ):
            pass


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "openai/gpt-4o"])
def test_anthropic_sdk_messages(anthropic_client, model):
    m = anthropic_client.messages.create(model=model, max_tokens=256, messages=QUESTION)
    assert m.type == "message" and m.role == "assistant"
    assert "4242" in m.content[0].text
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0

    with anthropic_client.messages.stream(model=model, max_tokens=256, messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "4242" in text
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "openai/gpt-4o"])
def test_anthropic_sdk_tools(anthropic_client, model):
    messages = [{"role": "user", "content": "Get the secrets for 'mellon' and 'speak friend'."}]
    first = anthropic_client.messages.create(model=model, max_tokens=512, messages=messages, tools=[SECRET_TOOL_ANTHROPIC])
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and all(u.id and u.name for u in uses)
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "Welcome to Moria!"} for u in uses],
        }
    )
    second = anthropic_client.messages.create(model=model, max_tokens=512, messages=messages, tools=[SECRET_TOOL_ANTHROPIC])
    assert any(b.type == "text" and b.text for b in second.content)


def test_anthropic_sdk_errors(anthropic_client, gateway_url):
    bad = anthropic.Anthropic(base_url=gateway_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="openai/gpt-4o", max_tokens=10, messages=QUESTION)
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client.messages.create(model="nobody/x", max_tokens=10, messages=QUESTION)
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client.messages.create(model="anthropic/case-error-429-rate-limit", max_tokens=10, messages=QUESTION)
