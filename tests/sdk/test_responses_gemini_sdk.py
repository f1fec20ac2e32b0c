"""The Responses API, legacy completions and Gemini's own API through the
official SDKs: `openai` (`responses.create`, `responses.stream`, a
function-call round trip, `completions.create`) and `google-genai`
(generate, stream, function call, count tokens, an error), against models
backed by mock upstreams replaying recorded Anthropic, Gemini and OpenAI
payloads, and against the built-in simulated provider.
"""

import json

import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

TRANSLATED = ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"]

TOOL = {
    "type": "function",
    "name": "secret_retrieval_tool",
    "description": "Look up the secret for a password",
    "parameters": {"type": "object", "properties": {"password": {"type": "string"}}, "required": ["password"]},
}


@pytest.fixture
def genai_client(gateway_url, key):
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=gateway_url, timeout=30000))


@pytest.mark.parametrize("model", TRANSLATED + ["openai/gpt-5.5"])
def test_responses_create(client, model):
    r = client.responses.create(model=model, input="What is 4200 + 42?", instructions="Answer briefly.")
    assert r.status == "completed"
    assert r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0


def test_responses_create_simulated(sim_client):
    r = sim_client.responses.create(model="simulated/sim-small", input="hello")
    assert r.output_text and r.usage.output_tokens > 0


@pytest.mark.parametrize("model", TRANSLATED + ["openai/gpt-5.5"])
def test_responses_stream(client, model):
    deltas = []
    with client.responses.stream(model=model, input="What is 4200 + 42?") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text
    assert final.output_text
    assert final.usage.output_tokens > 0


def test_responses_stream_simulated(sim_client):
    with sim_client.responses.stream(model="simulated/sim-small", input="hello") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and text == final.output_text


@pytest.mark.parametrize("model", TRANSLATED)
def test_responses_function_call_round_trip(client, model):
    items = [{"role": "user", "content": "Get the secrets for 'mellon' and 'speak friend'."}]
    first = client.responses.create(model=model, input=items, tools=[TOOL])
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and calls[0].name == "secret_retrieval_tool"
    for c in calls:
        assert c.call_id
        assert "password" in json.loads(c.arguments)
    items += [o.model_dump(exclude_none=True) for o in first.output]
    for c in calls:
        items.append({"type": "function_call_output", "call_id": c.call_id, "output": "Welcome to Moria!"})
    second = client.responses.create(model=model, input=items, tools=[TOOL])
    assert second.output_text


def test_responses_stateful_parameter_is_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=TRANSLATED[0], input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(e.value)


@pytest.mark.parametrize("model", ["openai/gpt-3.5-turbo-instruct", "anthropic/claude-sonnet-4-5"])
def test_legacy_completions(client, model):
    r = client.completions.create(model=model, prompt="Say this is a test", max_tokens=7)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.total_tokens > 0
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=model, prompt="Say this is a test", max_tokens=7, stream=True)
        if c.choices
    )
    assert text


@pytest.mark.parametrize("model", ["gemini/gemini-2.5-flash", "openai/gpt-4o-mini"])
def test_genai_generate_and_stream(genai_client, model):
    r = genai_client.models.generate_content(model=model, contents="What is 4200 + 42?")
    assert r.text
    assert r.usage_metadata.prompt_token_count > 0
    chunks = list(genai_client.models.generate_content_stream(model=model, contents="What is 4200 + 42?"))
    assert "".join(c.text or "" for c in chunks)
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


@pytest.mark.parametrize("model", ["gemini/gemini-2.5-flash", "openai/gpt-4o-mini"])
def test_genai_function_call(genai_client, model):
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(
                name="secret_retrieval_tool",
                description="Look up the secret for a password",
                parameters={"type": "OBJECT", "properties": {"password": {"type": "STRING"}}},
            )
        ]
    )
    config = types.GenerateContentConfig(tools=[tool], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True))
    r = genai_client.models.generate_content(model=model, contents="secret for mellon", config=config)
    calls = r.function_calls
    assert calls and calls[0].name
    contents = [
        types.Content(role="user", parts=[types.Part(text="secret for mellon")]),
        r.candidates[0].content,
        types.Content(
            role="user",
            parts=[types.Part.from_function_response(name=c.name, response={"result": "Welcome"}) for c in calls],
        ),
    ]
    second = genai_client.models.generate_content(model=model, contents=contents, config=config)
    assert second.text


@pytest.mark.parametrize("model", ["gemini/gemini-2.5-flash", "openai/gpt-4o-mini"])
def test_genai_count_tokens(genai_client, model):
    r = genai_client.models.count_tokens(model=model, contents="What is 4200 + 42?")
    assert r.total_tokens > 0


def test_genai_error_is_in_googles_shape(genai_client):
    with pytest.raises(genai_errors.ClientError) as e:
        genai_client.models.generate_content(model="nope/unknown", contents="hi")
    assert e.value.code == 404
    assert e.value.status == "NOT_FOUND"


def test_genai_lists_models(genai_client):
    names = [m.name for m in genai_client.models.list()]
    assert "models/gemini/gemini-2.5-flash" in names
    assert genai_client.models.get(model="gemini/gemini-2.5-flash").name == "models/gemini/gemini-2.5-flash"
