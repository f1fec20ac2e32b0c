"""The official `openai` SDK against the gateway, changing only base URL and key.

Models named `openai/...` reach a mock OpenAI upstream that replays recorded
real responses ("What is 4200 + 42?" → "4242"); `simulated/...` models are
served by the built-in simulated provider.
"""

import json

import openai
import pytest

QUESTION = [{"role": "user", "content": "What is 4200 + 42?"}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_chat_non_stream(client):
    r = client.chat.completions.create(model="openai/gpt-4o", messages=QUESTION, temperature=0)
    assert r.object == "chat.completion"
    assert "4242" in r.choices[0].message.content.replace(",", "")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="openai/gpt-4o",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "4242" in text.replace(",", "")
    assert finish == "stop"
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="openai/gpt-4o", messages=QUESTION, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What's the weather in Paris and in London?"}]
    first = client.chat.completions.create(model="openai/gpt-4o", messages=messages, tools=[WEATHER_TOOL])
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls and all(c.function.name for c in msg.tool_calls)
    for call in msg.tool_calls:
        json.loads(call.function.arguments)
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    second = client.chat.completions.create(model="openai/gpt-4o", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content


def test_streamed_tool_call_assembles(client):
    stream = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    calls = {}
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
            entry["id"] = tc.id or entry["id"]
            if tc.function:
                entry["name"] += tc.function.name or ""
                entry["args"] += tc.function.arguments or ""
    assert calls
    for entry in calls.values():
        assert entry["id"] and entry["name"]
        json.loads(entry["args"])


def test_image_content_parts_pass(client):
    r = client.chat.completions.create(
        model="openai/gpt-4o",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            }
        ],
    )
    assert r.choices[0].message.content


def test_embeddings(client):
    r = client.embeddings.create(model="openai/text-embedding-3-small", input="hello world")
    assert len(r.data) == 1 and len(r.data[0].embedding) > 10
    r = client.embeddings.create(model="openai/text-embedding-3-small", input=["a", "b"])
    assert len(r.data) >= 1


def test_models_list(client):
    ids = {m.id for m in client.models.list()}
    assert {"openai/gpt-4o-mini", "simulated/sim-small"} <= ids
    assert client.models.retrieve("openai/gpt-4o-mini").id == "openai/gpt-4o-mini"


def test_errors_map_to_sdk_exceptions(client, gateway_url):
    bad = openai.OpenAI(base_url=gateway_url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="openai/gpt-4o", messages=QUESTION)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nowhere/model", messages=QUESTION)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="openai/case-error-429-rate-limit-exceeded", messages=QUESTION)
    assert e.value.response.headers.get("retry-after")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="openai/gpt-4o", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="openai/gpt-4o", messages=QUESTION, extra_body={"stream": "yes"})


def test_simulated_provider_without_any_keys(sim_client):
    ids = {m.id for m in sim_client.models.list()}
    assert "simulated/sim-small" in ids and not any(i.startswith("openai/") for i in ids)

    r = sim_client.chat.completions.create(model="simulated/sim-small", messages=QUESTION)
    assert r.choices[0].message.content and r.usage.completion_tokens == 24

    text, usage = "", None
    for chunk in sim_client.chat.completions.create(
        model="simulated/sim-small", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == r.choices[0].message.content  # deterministic
    assert usage.completion_tokens == 24

    first = sim_client.chat.completions.create(
        model="simulated/sim-small", messages=[{"role": "user", "content": "get_weather for Paris"}], tools=[WEATHER_TOOL]
    )
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    second = sim_client.chat.completions.create(
        model="simulated/sim-small",
        messages=[
            {"role": "user", "content": "get_weather for Paris"},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert "sunny" in second.choices[0].message.content

    r = sim_client.chat.completions.create(
        model="simulated/sim-small", messages=QUESTION, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    e = sim_client.embeddings.create(model="simulated/sim-embed", input=["a", "b"], dimensions=16)
    assert len(e.data) == 2 and len(e.data[0].embedding) == 16

    with pytest.raises(openai.RateLimitError):
        sim_client.chat.completions.create(
            model="simulated/sim-small", messages=QUESTION, extra_headers={"x-switchyard-simulate": "status=429"}
        )
    with pytest.raises(openai.InternalServerError):
        sim_client.chat.completions.create(
            model="simulated/sim-small", messages=QUESTION, extra_headers={"x-switchyard-simulate": "status=500"}
        )
