"""The official `openai` SDK (its own retries off) against a gateway whose
route `storm` has a primary answering 429 to everything and a fallback that
fails 6 % of requests, and whose provider `pooled` has a revoked key
(tests/resilience_pools.rs starts both and counts at the mock).

Every call must succeed: failover, key rotation and retries happen inside
the gateway, invisible to the client except for two headers.
"""

QUESTION = [{"role": "user", "content": "What is 4200 + 42?"}]


def test_storm_and_revoked_key_are_invisible_to_the_sdk(client):
    for i in range(60):
        raw = client.chat.completions.with_raw_response.create(model="storm", messages=QUESTION)
        assert raw.headers["x-switchyard-target"] == "steady/flaky-6"
        assert int(raw.headers["x-switchyard-attempts"]) >= 1
        assert raw.parse().choices[0].message.content

        stream = client.chat.completions.create(model="storm", messages=QUESTION, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text

        r = client.chat.completions.create(model="pooled/gpt-4o-mini", messages=QUESTION)
        assert r.choices[0].message.content
