//! End to end across protocols: OpenAI callers reaching Anthropic and Gemini
//! providers, Anthropic callers (`/v1/messages`) reaching every kind, and raw
//! passthrough — the real binary in front of mocks replaying recorded payloads.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard_testkit::fixtures::Case;
use switchyard_testkit::gateway::{Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse;

const ANTHROPIC_KEY: &str = "sk-ant-test-SECRET-91b2c3";
const GEMINI_KEY: &str = "gm-test-SECRET-77aa11";
const OPENAI_KEY: &str = "sk-test-SECRET-0a0b0c";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn setup() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
            .env("OPENAI_API_KEY", OPENAI_KEY)
            .env("OPENAI_BASE_URL", format!("{}/v1", mock.url()))
            .env("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
            .env("ANTHROPIC_BASE_URL", mock.url())
            .env("GEMINI_API_KEY", GEMINI_KEY)
            .env("GEMINI_BASE_URL", mock.url())
            .policy("limits: { upstream_timeout_ms: 3000, stream_idle_timeout_ms: 1000 }\n"),
    );
    (mock, gw)
}

fn question(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "What is 4200 + 42?"}]})
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("http://{}{path}", gw.http_addr))
        .bearer_auth(&gw.key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// SSE events as (event name, data), bounded in time.
async fn events(resp: reqwest::Response) -> Vec<(Option<String>, String)> {
    sse::events(resp, Duration::from_secs(10)).await
}

fn openai_text(evs: &[(Option<String>, String)]) -> String {
    evs.iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn assert_clean(gw: &Gateway, text: &str) {
    for k in [ANTHROPIC_KEY, GEMINI_KEY, OPENAI_KEY] {
        assert!(!text.contains(k), "key in response: {text}");
        assert!(!gw.logs().contains(k), "key in logs");
    }
}

#[tokio::test]
async fn openai_caller_to_anthropic() {
    let (mock, gw) = setup().await;
    let r = post(
        &gw,
        "/v1/chat/completions",
        &question("anthropic/claude-sonnet-4-5", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("4242"));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let up = &mock.requests()[0];
    assert_eq!(up.path, "/v1/messages");
    assert_eq!(up.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert!(up.header("anthropic-version").is_some());
    assert_eq!(up.body["model"], "claude-sonnet-4-5");
    assert!(up.body["max_tokens"].as_u64().unwrap() > 0);

    let mut body = question("anthropic/claude-sonnet-4-5", true);
    body["stream_options"] = json!({"include_usage": true});
    let evs = events(post(&gw, "/v1/chat/completions", &body).await).await;
    assert!(openai_text(&evs).contains("4242"));
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    let first: Value = serde_json::from_str(&evs[0].1).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(evs
        .iter()
        .any(|(_, d)| d.contains("\"finish_reason\":\"stop\"")));
    assert!(evs.iter().any(|(_, d)| d.contains("\"usage\":{")));

    let r = post(&gw, "/v1/chat/completions", &json!({"model": "anthropic/claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "secrets for mellon and speak friend"}],
        "tools": [{"type": "function", "function": {"name": "secret_retrieval_tool", "parameters": {"type": "object", "properties": {"password": {"type": "string"}}}}}]})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(calls.len() >= 2, "parallel tool calls: {v}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("toolu_"));
    assert_clean(&gw, &v.to_string());
}

#[tokio::test]
async fn openai_caller_to_gemini() {
    let (mock, gw) = setup().await;
    let r = post(
        &gw,
        "/v1/chat/completions",
        &question("gemini/gemini-2.5-flash", false),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("4242"));
    let up = &mock.requests()[0];
    assert_eq!(up.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(up.header("x-goog-api-key"), Some(GEMINI_KEY));
    assert_eq!(up.body["contents"][0]["role"], "user");

    let evs = events(
        post(
            &gw,
            "/v1/chat/completions",
            &question("gemini/gemini-2.5-flash", true),
        )
        .await,
    )
    .await;
    assert!(openai_text(&evs).contains("4242"));
    assert_eq!(evs.last().unwrap().1, "[DONE]");
    assert!(mock.requests()[1].path.ends_with(":streamGenerateContent"));

    let r = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "gemini/gemini-embedding-001", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["data"][0]["embedding"].as_array().unwrap().len() > 10);
    assert_clean(&gw, &v.to_string());
}

#[tokio::test]
async fn provider_errors_map_to_openai_errors() {
    let (_mock, gw) = setup().await;
    let cases = [
        (
            "anthropic/case-error-429-rate-limit",
            429,
            "rate_limit_error",
        ),
        ("anthropic/case-error-500-api-error", 502, "upstream_error"),
        (
            "anthropic/case-error-404-model-not-found",
            404,
            "not_found_error",
        ),
        (
            "anthropic/case-error-401-invalid-api-key",
            502,
            "upstream_error",
        ),
        (
            "gemini/case-error-404-model-not-found",
            404,
            "not_found_error",
        ),
        (
            "gemini/case-error-400-api-key-invalid",
            502,
            "upstream_error",
        ),
    ];
    for (model, status, kind) in cases {
        let r = post(&gw, "/v1/chat/completions", &question(model, false)).await;
        assert_eq!(r.status(), status, "{model}");
        if status == 429 {
            assert!(
                r.headers().get("retry-after").is_some(),
                "{model} lost retry-after"
            );
        }
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], kind, "{model}: {v}");
        assert_clean(&gw, &v.to_string());
    }
    // A mid-stream `overloaded_error` becomes an OpenAI-shaped error event.
    let evs = events(
        post(
            &gw,
            "/v1/chat/completions",
            &question("anthropic/midstream-overloaded", true),
        )
        .await,
    )
    .await;
    assert!(openai_text(&evs).contains("Partial"));
    let last: Value = serde_json::from_str(&evs.last().unwrap().1).unwrap();
    assert_eq!(last["error"]["type"], "overloaded_error", "{evs:?}");
}

#[tokio::test]
async fn anthropic_caller_to_anthropic_is_untouched() {
    let (mock, gw) = setup().await;
    let case = Case::load("anthropic", "messages-basic").unwrap();
    let mut body = case.request["body"].clone();
    body["model"] = json!("anthropic/claude-sonnet-4-5");
    body["x_unknown_field"] = json!([1, 2]);
    let r = client()
        .post(format!("http://{}/v1/messages", gw.http_addr))
        .header("x-api-key", &gw.key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v, case.response["body"],
        "response must pass through untouched"
    );
    let up = &mock.requests()[0];
    let mut expected = body.clone();
    expected["model"] = json!("claude-sonnet-4-5");
    assert_eq!(
        up.body, expected,
        "request must pass through with only the model changed"
    );

    let mut body = case.request["body"].clone();
    body["model"] = json!("anthropic/claude-sonnet-4-5");
    body["stream"] = json!(true);
    let r = post(&gw, "/v1/messages", &body).await;
    let evs = events(r).await;
    let names: Vec<_> = evs.iter().filter_map(|(n, _)| n.clone()).collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));

    let r = post(&gw, "/v1/messages/count_tokens", &json!({"model": "anthropic/claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().await.unwrap()["input_tokens"]
        .as_u64()
        .is_some());
    assert_eq!(
        mock.requests().last().unwrap().path,
        "/v1/messages/count_tokens"
    );
}

#[tokio::test]
async fn anthropic_caller_to_openai_and_simulated() {
    let (mock, gw) = setup().await;
    let body = json!({"model": "openai/gpt-4o", "max_tokens": 100, "system": "Be brief.",
        "messages": [{"role": "user", "content": "What is 4200 + 42?"}]});
    let r = post(&gw, "/v1/messages", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["content"][0]["text"].as_str().unwrap().contains("4242"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let up = &mock.requests()[0];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(up.body["messages"][0]["role"], "system");

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    for model in [
        "openai/gpt-4o",
        "simulated/sim-small",
        "gemini/gemini-2.5-flash",
    ] {
        stream_body["model"] = json!(model);
        let evs = events(post(&gw, "/v1/messages", &stream_body).await).await;
        let names: Vec<_> = evs.iter().filter_map(|(n, _)| n.clone()).collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("message_start"),
            "{model}: {names:?}"
        );
        assert_eq!(
            names.last().map(String::as_str),
            Some("message_stop"),
            "{model}: {names:?}"
        );
        assert!(names.iter().any(|n| n == "content_block_delta"), "{model}");
        let delta = evs
            .iter()
            .find(|(n, _)| n.as_deref() == Some("message_delta"))
            .unwrap();
        let d: Value = serde_json::from_str(&delta.1).unwrap();
        assert!(
            d["usage"]["output_tokens"].as_u64().unwrap() > 0,
            "{model}: {d}"
        );
    }

    // Errors on /v1/messages come in Anthropic's shape.
    let r = client()
        .post(format!("http://{}/v1/messages", gw.http_addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    let r = post(&gw, "/v1/messages", &json!({"model": "nope/x", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "not_found_error"
    );
    let r = post(
        &gw,
        "/v1/messages",
        &json!({"model": "openai/gpt-4o", "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "error");
}

#[tokio::test]
async fn raw_passthrough() {
    let (mock, gw) = setup().await;
    let case = Case::load("gemini", "generate-basic").unwrap();
    let body = case.request["body"].clone();
    let r = client()
        .post(format!(
            "http://{}/passthrough/gemini/v1beta/models/gemini-2.5-flash:generateContent",
            gw.http_addr
        ))
        .bearer_auth(&gw.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, case.response["body"], "raw answer is the provider's own");
    let up = &mock.requests()[0];
    assert_eq!(up.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(up.body, body);
    assert_eq!(up.header("x-goog-api-key"), Some(GEMINI_KEY));
    assert!(
        up.header("authorization").is_none(),
        "the virtual key must not reach the provider"
    );

    // x-switchyard-raw on a normal route: body untouched except the model.
    let mut chat = question("openai/gpt-4o", false);
    chat["some_vendor_flag"] = json!(true);
    let r = client()
        .post(format!("http://{}/v1/chat/completions", gw.http_addr))
        .bearer_auth(&gw.key)
        .header("x-switchyard-raw", "1")
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let up = mock.requests().pop().unwrap();
    assert_eq!(up.body["some_vendor_flag"], true);
    assert_eq!(up.body["model"], "gpt-4o");
    assert!(up.body.get("stream_options").is_none());

    // OpenAI's Responses API is not normalised; it is reachable raw.
    let case = Case::load("openai", "responses-basic").unwrap();
    let mut body = case.request["body"].clone();
    body["model"] = json!("case-responses-basic");
    let r = client()
        .post(format!(
            "http://{}/passthrough/openai/responses",
            gw.http_addr
        ))
        .bearer_auth(&gw.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), case.response["body"]);
    let up = mock.requests().pop().unwrap();
    assert_eq!(up.path, "/v1/responses");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );

    let r = client()
        .post(format!("http://{}/passthrough/nobody/x", gw.http_addr))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .post(format!(
            "http://{}/passthrough/gemini/v1beta/x",
            gw.http_addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
