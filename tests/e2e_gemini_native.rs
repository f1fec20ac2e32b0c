//! Gemini's own API (`/v1beta/models/{model}:{method}`) through the real
//! binary, in front of a mock replaying recorded Gemini, OpenAI and
//! Anthropic payloads: passthrough to Gemini providers (model rewritten in
//! the URL, body and stream untouched), translation for the others, token
//! counts for every provider, embeddings, Google-shaped errors and the
//! `x-goog-api-key` / `?key=` credentials. Also stored Responses reads and
//! Anthropic `count_tokens` on a provider without that endpoint.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard_testkit::fixtures::Case;
use switchyard_testkit::gateway::{Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;

const GEMINI_KEY: &str = "gm-test-native-SECRET-4411";
const OPENAI_KEY: &str = "sk-test-native-SECRET-9922";
const ANTHROPIC_KEY: &str = "sk-ant-test-native-SECRET-7733";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
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
            .policy("limits: { upstream_timeout_ms: 5000, stream_idle_timeout_ms: 2000 }\n"),
    );
    (mock, gw)
}

fn ask() -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "What is 4200 + 42?"}]}]})
}

async fn call(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("http://{}{path}", gw.http_addr))
        .header("x-goog-api-key", &gw.key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn assert_clean(gw: &Gateway, text: &str) {
    for k in [GEMINI_KEY, OPENAI_KEY, ANTHROPIC_KEY] {
        assert!(!text.contains(k), "provider key in an answer: {text}");
        assert!(!gw.logs().contains(k), "provider key in the logs");
    }
}

#[tokio::test]
async fn gemini_providers_get_the_call_as_sent() {
    let (mock, gw) = setup().await;
    let r = call(
        &gw,
        "/v1beta/models/gemini/gemini-2.5-flash:generateContent",
        &ask(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let recorded = Case::load("gemini", "generate-basic").unwrap();
    assert_eq!(
        v,
        serde_json::from_slice::<Value>(&recorded.body_bytes()).unwrap()
    );
    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(sent.body, ask());
    assert_eq!(sent.header("x-goog-api-key"), Some(GEMINI_KEY));

    // Streamed with the key in the URL, as google-genai may send it; the
    // recorded stream arrives byte for byte.
    let r = client()
        .post(format!(
            "http://{}/v1beta/models/gemini%2Fgemini-2.5-flash:streamGenerateContent?alt=sse&key={}",
            gw.http_addr, gw.key
        ))
        .json(&ask())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let streamed = r.text().await.unwrap();
    let recorded = Case::load("gemini", "stream-sse-basic").unwrap();
    assert_eq!(streamed, recorded.sse().unwrap());
    assert_eq!(
        mock.requests()[1].path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert!(gw.wait_for_log("\"prompt_tokens\":", Duration::from_secs(5)));
    // A key sent in the URL is not written to the access log.
    assert!(!gw.logs().contains(&gw.key), "virtual key in the logs");
    assert_clean(&gw, &(body + &streamed));
}

#[tokio::test]
async fn other_providers_are_reached_by_translation() {
    let (mock, gw) = setup().await;
    let r = call(
        &gw,
        "/v1beta/models/openai/gpt-4o-mini:generateContent",
        &ask(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let cand = &v["candidates"][0];
    assert_eq!(cand["content"]["role"], "model");
    assert!(!cand["content"]["parts"][0]["text"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(cand["finishReason"], "STOP");
    assert!(v["usageMetadata"]["promptTokenCount"].as_u64().unwrap() > 0);
    let sent = &mock.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.body["model"], "gpt-4o-mini");
    assert_eq!(sent.body["messages"][0]["content"], "What is 4200 + 42?");

    // Streamed from Anthropic: text chunks, then the finish and usage.
    let r = call(
        &gw,
        "/v1/models/anthropic/claude-sonnet-4-5:streamGenerateContent?alt=sse",
        &ask(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    let all: String = chunks
        .iter()
        .filter_map(|c| c["candidates"][0]["content"]["parts"][0]["text"].as_str())
        .collect();
    assert!(all.contains("4242"), "{all}");
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(
        last["usageMetadata"]["candidatesTokenCount"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(mock.requests()[1].path, "/v1/messages");

    // A function call and its answer travel as Gemini parts.
    let tool = json!({"functionDeclarations": [{"name": "secret_retrieval_tool",
        "parameters": {"type": "OBJECT", "properties": {"password": {"type": "STRING"}}}}]});
    let mut body = ask();
    body["tools"] = json!([tool]);
    let r = call(
        &gw,
        "/v1beta/models/openai/gpt-4o-mini:generateContent",
        &body,
    )
    .await;
    let v: Value = r.json().await.unwrap();
    let fc = &v["candidates"][0]["content"]["parts"][0]["functionCall"];
    assert!(fc["name"].is_string() && fc["args"].is_object(), "{v}");
    let sent = mock.requests().last().unwrap().clone();
    assert_eq!(
        sent.body["tools"][0]["function"]["parameters"]["properties"]["password"]["type"],
        "string"
    );
}

#[tokio::test]
async fn tokens_are_counted_for_every_provider() {
    let (mock, gw) = setup().await;
    let r = call(
        &gw,
        "/v1beta/models/gemini/gemini-2.5-flash:countTokens",
        &ask(),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["totalTokens"].as_u64().unwrap() > 0);
    assert_eq!(
        mock.requests()[0].path,
        "/v1beta/models/gemini-2.5-flash:countTokens"
    );
    // No counting endpoint at OpenAI: counted locally, nothing sent.
    let r = call(&gw, "/v1beta/models/openai/gpt-4o-mini:countTokens", &ask()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // "What is 4200 + 42?" is 9 o200k tokens, plus 3 for the message.
    assert_eq!(v["totalTokens"], 12);
    // Anthropic's count_tokens for a Gemini model: counted locally too.
    let r = client()
        .post(format!("http://{}/v1/messages/count_tokens", gw.http_addr))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gemini/gemini-2.5-flash",
            "messages": [{"role": "user", "content": "What is 4200 + 42?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["input_tokens"], 12);
    assert_eq!(mock.requests().len(), 1, "local counts reach no provider");
}

#[tokio::test]
async fn embeddings_go_native_or_through_openai() {
    let (mock, gw) = setup().await;
    let batch = |model: &str| {
        json!({"requests": [
            {"model": format!("models/{model}"), "content": {"parts": [{"text": "hello"}]}},
            {"model": format!("models/{model}"), "content": {"parts": [{"text": "world"}]}},
        ]})
    };
    let r = call(
        &gw,
        "/v1beta/models/gemini/gemini-embedding-001:batchEmbedContents",
        &batch("gemini/gemini-embedding-001"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["embeddings"][0]["values"].as_array().unwrap().len() > 1);
    let sent = &mock.requests()[0];
    assert_eq!(
        sent.path,
        "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    );
    assert_eq!(
        sent.body["requests"][0]["model"],
        "models/gemini-embedding-001"
    );

    let r = call(
        &gw,
        "/v1beta/models/openai/text-embedding-3-small:batchEmbedContents",
        &batch("openai/text-embedding-3-small"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    // The mock replays a recorded three-input batch whatever it is sent;
    // each recorded vector comes back as one Gemini embedding.
    let recorded = Case::load("openai", "embeddings-batch").unwrap();
    let recorded: Value = serde_json::from_slice(&recorded.body_bytes()).unwrap();
    let n = recorded["data"].as_array().unwrap().len();
    assert_eq!(v["embeddings"].as_array().unwrap().len(), n);
    assert_eq!(
        v["embeddings"][0]["values"],
        recorded["data"][0]["embedding"]
    );
    let sent = &mock.requests()[1];
    assert_eq!(sent.path, "/v1/embeddings");
    assert_eq!(sent.body["input"], json!(["hello", "world"]));

    let r = call(
        &gw,
        "/v1beta/models/openai/text-embedding-3-small:embedContent",
        &json!({"content": {"parts": [{"text": "hello"}]}}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["embedding"]["values"].as_array().unwrap().len() > 1,
        "{v}"
    );
}

#[tokio::test]
async fn errors_come_in_googles_shape() {
    let (mock, gw) = setup().await;
    let r = call(&gw, "/v1beta/models/nope/unknown:generateContent", &ask()).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], 404);
    assert_eq!(v["error"]["status"], "NOT_FOUND");

    let r = client()
        .post(format!(
            "http://{}/v1beta/models/gemini/gemini-2.5-flash:generateContent",
            gw.http_addr
        ))
        .header("x-goog-api-key", "not-a-key")
        .json(&ask())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");

    let r = call(
        &gw,
        "/v1beta/models/openai/gpt-4o-mini:generateContent",
        &json!({"contents": []}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");

    // A Gemini built-in tool cannot be translated: refused by name.
    let mut body = ask();
    body["tools"] = json!([{"googleSearch": {}}]);
    let r = call(
        &gw,
        "/v1beta/models/openai/gpt-4o-mini:generateContent",
        &body,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("tools[0]"));

    // An upstream error on a passthrough route keeps Google's shape.
    let r = call(
        &gw,
        "/v1beta/models/gemini/case-error-404-model-not-found:generateContent",
        &ask(),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert!(mock.requests().len() <= 1);

    let r = client()
        .get(format!("http://{}/v1beta/models", gw.http_addr))
        .header("x-goog-api-key", &gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(
        names.contains(&"models/gemini/gemini-2.5-flash"),
        "{names:?}"
    );
    let one = |path: &'static str| {
        client()
            .get(format!("http://{}{path}", gw.http_addr))
            .header("x-goog-api-key", &gw.key)
            .send()
    };
    let r = one("/v1beta/models/gemini/gemini-2.5-flash").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["name"], "models/gemini/gemini-2.5-flash");
    let r = one("/v1beta/models/nope%2Fmissing").await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
}

#[tokio::test]
async fn stored_responses_are_read_from_the_openai_provider() {
    let (mock, gw) = setup().await;
    let r = client()
        .get(format!("http://{}/v1/responses/resp_abc123", gw.http_addr))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = &mock.requests()[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("GET", "/v1/responses/resp_abc123")
    );
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    let r = client()
        .post(format!("http://{}/v1/responses/resp_abc123", gw.http_addr))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}
