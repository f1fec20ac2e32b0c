"""The official SDKs reading streams that were cut mid-answer and resumed
on another target (tests/resilience_resume.rs starts the gateway, whose
routes `chat` and `messages` cut after a few events and resume, and checks
at the mock what prefill the resuming target received).

Each SDK must see one ordinary answer: one message, one id, the text the
first target sent followed by the continuation, a normal ending.
"""

QUESTION = [{"role": "user", "content": "What is 4200 + 42?"}]

# tests/fixtures: the first target's partial text, then the second's answer.
MESSAGES_TEXT = "4200 + 42 =" + "4200 + 42 = 4242"
CHAT_TEXT = "4200 +" + "4200 + 42 equals 4242."


def test_anthropic_sdk_reads_a_resumed_stream_as_one_message(anthropic_client):
    with anthropic_client.messages.stream(
        model="messages", max_tokens=64, messages=QUESTION
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == MESSAGES_TEXT
    assert [b.type for b in final.content] == ["text"]
    assert final.content[0].text == MESSAGES_TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_openai_sdk_reads_a_resumed_stream_as_one_completion(client):
    stream = client.chat.completions.create(
        model="chat",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CHAT_TEXT
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0
