//! End to end: the real `switchyard` binary in front of a mock OpenAI
//! upstream that replays recorded payloads, over real loopback sockets.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_testkit::gateway::{Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse::data as sse_data;

const PROVIDER_KEY: &str = "sk-test-SECRET-4f9a8b7c6d5e";
const PROMPT: &str = "What is 4200 + 42? (prompt-marker-7731)";

const POLICY: &str = r#"
limits: { max_body_bytes: 4096, upstream_timeout_ms: 1500, stream_idle_timeout_ms: 400 }
aliases:
  fast: openai/gpt-4o-mini
"#;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

async fn setup() -> (MockUpstream, Gateway) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("OPENAI_BASE_URL", format!("{}/v1", mock.url()))
            .policy(POLICY),
    );
    (mock, gw)
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", gw.base_url()))
        .bearer_auth(&gw.key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn assert_no_secrets(gw: &Gateway, text: &str) {
    assert!(!text.contains(PROVIDER_KEY), "provider key leaked: {text}");
    assert!(!gw.logs().contains(PROVIDER_KEY), "provider key in logs");
    assert!(
        !gw.logs().contains("prompt-marker-7731"),
        "prompt text in logs"
    );
}

#[tokio::test]
async fn chat_passthrough_rewrites_only_the_model() {
    let (mock, gw) = setup().await;
    let mut body = chat("fast", false);
    body["x_vendor_field"] = json!({"keep": true});
    body["temperature"] = json!(0.25);
    let resp = post(&gw, "/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert!(headers.get("x-request-id").is_some());
    for h in headers.keys() {
        let name = h.as_str();
        assert!(
            !name.starts_with("openai-") && !name.starts_with("x-ratelimit"),
            "leaked header {name}"
        );
    }
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("4242"));

    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.path, "/v1/chat/completions");
    assert_eq!(up.body["model"], "gpt-4o-mini");
    assert_eq!(up.body["x_vendor_field"], json!({"keep": true}));
    assert_eq!(up.body["temperature"], json!(0.25));
    assert_eq!(up.body["messages"], body["messages"]);
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );

    assert!(gw.wait_for_log("\"status\":200", Duration::from_secs(5)));
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("switchyard::access") && l.contains("\"status\":200"))
        .unwrap();
    let entry: Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["tenant"], "dev");
    assert_eq!(entry["model"], "fast");
    assert_eq!(entry["provider"], "openai");
    assert!(entry["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(entry["completion_tokens"].as_u64().unwrap() > 0);
    assert!(entry["latency_ms"].as_f64().is_some() && entry["ttft_ms"].as_f64().is_some());
    assert_no_secrets(&gw, &v.to_string());

    let metrics = client()
        .get(format!("http://{}/metrics", gw.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("switchyard_requests_total{")
                && [
                    r#"class="2xx""#,
                    r#"endpoint="chat""#,
                    r#"provider="openai""#,
                    r#"route="fast""#,
                    r#"status="200""#
                ]
                .iter()
                .all(|label| l.contains(label))
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(metrics
        .contains(r#"switchyard_tokens_total{kind="prompt",model="fast",provider="openai"}"#));
    assert!(!metrics.contains(PROVIDER_KEY));
}

#[tokio::test]
async fn stream_forwards_each_event_before_the_upstream_finishes() {
    let (mock, gw) = setup().await;
    let resp = post(&gw, "/chat/completions", &chat("openai/gated", true)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    // The upstream holds everything after its first event until the gate
    // opens, so seeing that event proves nothing waits for the whole body.
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("w0"));
    mock.open_gate();
    let mut rest = String::new();
    while let Ok(Some(Ok(c))) = tokio::time::timeout(Duration::from_secs(5), body.next()).await {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        rest.contains("w1") && rest.ends_with("data: [DONE]\n\n"),
        "{rest}"
    );
    // We always ask the upstream for usage, so the request is accounted.
    assert_eq!(
        mock.requests()[0].body["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn stream_usage_chunk_only_when_asked() {
    let (_mock, gw) = setup().await;
    let events = sse_data(
        post(&gw, "/chat/completions", &chat("openai/gpt-4o", true)).await,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !events.iter().any(|e| e.contains("\"usage\":{")),
        "usage chunk sent unasked"
    );
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(text.contains("4242"), "{text}");

    let mut body = chat("openai/gpt-4o", true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_data(
        post(&gw, "/chat/completions", &body).await,
        Duration::from_secs(10),
    )
    .await;
    let usage: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["usage"].is_object())
        .collect();
    assert_eq!(usage.len(), 1);
    assert!(usage[0]["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream() {
    let (mock, gw) = setup().await;
    let resp = post(&gw, "/chat/completions", &chat("openai/endless", true)).await;
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .unwrap();
    assert!(first.is_some());
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.cancellations() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mock.cancellations(), 1, "upstream never saw the cancel");
    assert!(gw.wait_for_log("\"client_gone\":true", Duration::from_secs(5)));
}

#[tokio::test]
async fn stalled_or_cut_streams_end_with_an_error_event() {
    let (mock, gw) = setup().await;
    let events = sse_data(
        post(&gw, "/chat/completions", &chat("openai/stall", true)).await,
        Duration::from_secs(10),
    )
    .await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stalled", "{events:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.cancellations() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        mock.cancellations(),
        1,
        "stalled upstream request was not closed"
    );

    let events = sse_data(
        post(&gw, "/chat/completions", &chat("openai/cut", true)).await,
        Duration::from_secs(10),
    )
    .await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{events:?}");
}

#[tokio::test]
async fn errors_have_openai_shape_and_honest_status() {
    let (_mock, gw) = setup().await;
    let c = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let ok_body = chat("fast", false).to_string();

    let r = c.post(&url).body(ok_body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(&url)
        .bearer_auth("wrong")
        .body(ok_body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");

    let r = c
        .post(&url)
        .bearer_auth(&gw.key)
        .body("{\"model\": \"fast\",\n \"messages\": [}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let msg = r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("line 2") && msg.contains("column"), "{msg}");

    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": "fast"}), "messages"),
    ] {
        let r = post(&gw, "/chat/completions", &body).await;
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], param);
    }

    let r = post(&gw, "/chat/completions", &chat("nope/model", false)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );

    let big = json!({"model": "fast", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let r = post(&gw, "/chat/completions", &big).await;
    assert_eq!(r.status(), 413);

    let r = c.get(&url).bearer_auth(&gw.key).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");

    let r = c
        .post(format!("{}/nothing-here", gw.base_url()))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = post(
        &gw,
        "/chat/completions",
        &chat("openai/case-error-429-rate-limit-exceeded", false),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "rate_limit_error"
    );

    let r = post(
        &gw,
        "/chat/completions",
        &chat("openai/case-error-400-unsupported-parameter", false),
    )
    .await;
    assert_eq!(r.status(), 400);

    let r = post(
        &gw,
        "/chat/completions",
        &chat("openai/case-error-503-upstream-reset-text-plain", false),
    )
    .await;
    assert!(r.status() == 503 || r.status() == 502);

    let r = post(&gw, "/chat/completions", &chat("openai/hang", false)).await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "timeout_error"
    );

    let r = post(
        &gw,
        "/chat/completions",
        &chat("openai/echo-key-401", false),
    )
    .await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert_no_secrets(&gw, &text);
}

#[tokio::test]
async fn upstream_unreachable_is_a_502() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::start(
        GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("OPENAI_BASE_URL", format!("http://{dead}/v1")),
    );
    let r = post(&gw, "/chat/completions", &chat("openai/gpt-4o", false)).await;
    assert_eq!(r.status(), 502);
    assert_no_secrets(&gw, &r.text().await.unwrap());
}

#[tokio::test]
async fn embeddings_and_models() {
    let (mock, gw) = setup().await;
    let r = post(
        &gw,
        "/embeddings",
        &json!({"model": "openai/text-embedding-3-small", "input": "hello"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["data"][0]["embedding"].as_array().unwrap().len() > 10);
    assert_eq!(mock.requests()[0].path, "/v1/embeddings");
    assert_eq!(mock.requests()[0].body["model"], "text-embedding-3-small");

    let r = client()
        .get(format!("{}/models", gw.base_url()))
        .bearer_auth(&gw.key)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"openai/gpt-4o-mini")
            && ids.contains(&"fast")
            && ids.contains(&"simulated/sim-small"),
        "{ids:?}"
    );
}

#[tokio::test]
async fn tls_listener_speaks_h2_and_http1() {
    let (_mock, gw) = setup().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(gw.cert_path()).unwrap();
    let cert = reqwest::Certificate::from_pem(&pem).unwrap();
    for http2 in [true, false] {
        let mut b = reqwest::Client::builder().add_root_certificate(cert.clone());
        if !http2 {
            b = b.http1_only();
        }
        let c = b.build().unwrap();
        let url = format!(
            "https://localhost:{}/v1/chat/completions",
            gw.https_addr.port()
        );
        let r = c
            .post(&url)
            .bearer_auth(&gw.key)
            .json(&chat("fast", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let expected = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        assert_eq!(r.version(), expected);
        let events = sse_data(
            c.post(&url)
                .bearer_auth(&gw.key)
                .json(&chat("simulated/sim-small", true))
                .send()
                .await
                .unwrap(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    }
}

#[tokio::test]
async fn simulated_provider_faults_by_header() {
    let gw = Gateway::start(GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard")));
    // The banner is read from the child's stdout by a thread: give it time.
    let banner = (0..250).any(|_| {
        gw.stdout().contains("simulated") || {
            std::thread::sleep(Duration::from_millis(20));
            false
        }
    });
    assert!(banner, "the start-up banner names the simulated provider");
    let c = client();
    let url = format!("{}/chat/completions", gw.base_url());
    let r = c
        .post(&url)
        .bearer_auth(&gw.key)
        .header("x-switchyard-simulate", "status=429,retry_after=3")
        .json(&chat("simulated/sim-small", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");

    let r = c
        .post(&url)
        .bearer_auth(&gw.key)
        .header("x-switchyard-simulate", "drop_after=2")
        .json(&chat("simulated/sim-small", true))
        .send()
        .await
        .unwrap();
    let events = sse_data(r, Duration::from_secs(10)).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["error"].is_object(), "{events:?}");

    let r = c
        .post(&url)
        .bearer_auth(&gw.key)
        .header("x-switchyard-simulate", "bogus")
        .json(&chat("simulated/sim-small", true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = post(
        &gw,
        "/chat/completions",
        &chat("simulated/sim-small", false),
    )
    .await;
    let a: Value = r.json().await.unwrap();
    let r = post(
        &gw,
        "/chat/completions",
        &chat("simulated/sim-small", false),
    )
    .await;
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    assert_eq!(a["usage"]["completion_tokens"], 24);
}
