//! The OpenAI Responses API and legacy completions through the whole
//! pipeline, in process: an `EdgeApp` on 127.0.0.1:0 in front of the real
//! egress and a mock provider replaying recorded payloads
//! (`tests/fixtures/openai/responses-*`, Anthropic and Gemini streams).
//! Shows passthrough to OpenAI with the model rewritten, translation for
//! every other provider (streams included), failover, and one usage record
//! per request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use serde_json::{json, Value};
use switchyard_backhaul::{Egress, SharedSnapshot};
use switchyard_control::{compile, parse_policy, CompileOptions};
use switchyard_edge::{EdgeApp, RecordHook, RequestCtx, UsageRecord};
use switchyard_proto::KeyHash;
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse;
use tokio::net::TcpListener;
use tokio::sync::watch;

const KEY: &str = "sy-test-responses-key";
const OPENAI_KEY: &str = "sk-test-responses-SECRET";
const WAIT: Duration = Duration::from_secs(10);

fn policy() -> String {
    format!(
        r#"
limits: {{ upstream_timeout_ms: 20000, stream_idle_timeout_ms: 5000 }}
providers:
  simulated:
    kind: simulated
    models: [sim-small]
routes:
  failing-first:
    targets:
      - {{ provider: openai, model: case-error-429-rate-limit-exceeded }}
      - {{ provider: anthropic, model: claude-sonnet-4-5 }}
  openai-last:
    targets:
      - {{ provider: anthropic, model: claude-sonnet-4-5 }}
      - {{ provider: openai, model: gpt-5.5 }}
tenants:
  - id: t1
    key_sha256: "{}"
"#,
        KeyHash::of(KEY).to_hex()
    )
}

/// A usage record, the endpoint label and each attempt's error label.
type Recorded = (UsageRecord, &'static str, Vec<Option<&'static str>>);

#[derive(Default)]
struct Records(Mutex<Vec<Recorded>>);

impl Records {
    /// Waits (bounded) for `n` usage records: `record` runs after the
    /// answer is written, so the client may be done first.
    async fn wait(&self, n: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + WAIT;
        while self.0.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.0.lock().unwrap().clone()
    }
}

struct Hook(Arc<Records>);

impl RecordHook for Hook {
    fn on_record(&self, ctx: &RequestCtx, record: &UsageRecord) {
        let attempts = ctx.attempts.iter().map(|a| a.error).collect();
        self.0
             .0
            .lock()
            .unwrap()
            .push((record.clone(), ctx.endpoint, attempts));
    }
}

struct Edge {
    addr: SocketAddr,
    mock: MockUpstream,
    records: Arc<Records>,
    _stop: watch::Sender<bool>,
}

async fn edge() -> Edge {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::start().await;
    let url = mock.url();
    let env = move |k: &str| match k {
        "OPENAI_API_KEY" => Some(OPENAI_KEY.to_string()),
        "OPENAI_BASE_URL" => Some(format!("{url}/v1")),
        "ANTHROPIC_API_KEY" => Some("sk-ant-test-responses".to_string()),
        "ANTHROPIC_BASE_URL" => Some(url.clone()),
        "GEMINI_API_KEY" => Some("gm-test-responses".to_string()),
        "GEMINI_BASE_URL" => Some(url.clone()),
        _ => None,
    };
    let doc = parse_policy(&policy()).unwrap();
    let compiled = compile(
        &doc,
        &CompileOptions {
            env: &env,
            include_simulated: false,
            version: 1,
        },
    )
    .unwrap();
    let snap: SharedSnapshot = Arc::new(ArcSwap::from_pointee(compiled.snapshot));
    let egress = Egress::new(snap.clone()).unwrap();
    let records = Arc::new(Records::default());
    let app = Arc::new(
        EdgeApp::new(snap, Arc::new(egress)).with_record_hook(Arc::new(Hook(records.clone()))),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
                _ = stopped.changed() => return,
            };
            let (app, shutdown) = (app.clone(), stopped.clone());
            tokio::spawn(async move {
                let _ = app
                    .process_new(Box::new(L4Stream::from(tcp)), &shutdown)
                    .await;
            });
        }
    });
    Edge {
        addr,
        mock,
        records,
        _stop: stop,
    }
}

impl Edge {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}{path}", self.addr))
            .bearer_auth(KEY)
            .json(&body)
            .timeout(WAIT)
            .send()
            .await
            .unwrap()
    }
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "input": "What is 4200 + 42?"})
}

/// SSE events as parsed JSON, checking each event name matches its `type`.
async fn typed_events(resp: reqwest::Response) -> Vec<Value> {
    sse::events(resp, WAIT)
        .await
        .into_iter()
        .map(|(name, data)| {
            let v: Value = serde_json::from_str(&data).unwrap();
            assert_eq!(name.as_deref(), v["type"].as_str(), "{data}");
            v
        })
        .collect()
}

#[tokio::test]
async fn responses_pass_through_to_openai_with_the_model_rewritten_and_usage_read() {
    let e = edge().await;
    let r = e.post("/v1/responses", ask("openai/gpt-5.5", false)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "pong");
    let sent = e.mock.requests();
    assert_eq!(sent[0].path, "/v1/responses");
    assert_eq!(sent[0].body["model"], "gpt-5.5");
    assert_eq!(sent[0].body["input"], "What is 4200 + 42?");

    let r = e.post("/v1/responses", ask("openai/gpt-5.5", true)).await;
    assert_eq!(r.status(), 200);
    let evs = typed_events(r).await;
    assert_eq!(evs.first().unwrap()["type"], "response.created");
    assert_eq!(evs.last().unwrap()["type"], "response.completed");
    // Passed through: the recorded provider's ids and obfuscation survive.
    assert!(evs.iter().any(|v| v.get("obfuscation").is_some()));

    let recs = e.records.wait(2).await;
    assert_eq!(recs.len(), 2);
    for (rec, endpoint, _) in &recs {
        assert_eq!(*endpoint, "responses");
        let u = rec.usage.expect("usage recorded");
        assert_eq!((u.prompt_tokens, u.completion_tokens), (11, 5));
    }
}

#[tokio::test]
async fn responses_are_translated_for_anthropic_gemini_and_simulated() {
    let e = edge().await;
    for model in [
        "anthropic/claude-sonnet-4-5",
        "gemini/gemini-2.5-flash",
        "simulated/sim-small",
    ] {
        let r = e.post("/v1/responses", ask(model, false)).await;
        assert_eq!(r.status(), 200, "{model}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "response", "{model}");
        assert_eq!(v["status"], "completed", "{model}");
        let msg = v["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "message")
            .unwrap_or_else(|| panic!("{model}: {v}"));
        assert!(
            !msg["content"][0]["text"].as_str().unwrap().is_empty(),
            "{model}"
        );
        assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0, "{model}");

        let r = e.post("/v1/responses", ask(model, true)).await;
        assert_eq!(r.status(), 200, "{model}");
        let evs = typed_events(r).await;
        let types: Vec<&str> = evs.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(
            types[..2],
            ["response.created", "response.in_progress"],
            "{model}"
        );
        assert!(
            types.contains(&"response.output_text.delta"),
            "{model}: {types:?}"
        );
        assert_eq!(*types.last().unwrap(), "response.completed", "{model}");
        for (i, v) in evs.iter().enumerate() {
            assert_eq!(v["sequence_number"], i as u64, "{model}");
        }
        let text: String = evs
            .iter()
            .filter(|v| v["type"] == "response.output_text.delta")
            .map(|v| v["delta"].as_str().unwrap())
            .collect();
        let done = &evs.last().unwrap()["response"];
        assert_eq!(
            done["output"][0]["content"][0]["text"],
            text.as_str(),
            "{model}"
        );
        assert!(
            done["usage"]["output_tokens"].as_u64().unwrap() > 0,
            "{model}"
        );
    }
    let recs = e.records.wait(6).await;
    assert!(recs
        .iter()
        .all(|(r, _, _)| r.usage.is_some_and(|u| u.completion_tokens > 0)));
}

#[tokio::test]
async fn translated_responses_stream_function_calls() {
    let e = edge().await;
    let body = json!({
        "model": "anthropic/claude-haiku-4-5",
        "stream": true,
        "input": [{"role": "user", "content": "secret for mellon"}],
        "tools": [{"type": "function", "name": "secret_retrieval_tool",
                   "parameters": {"type": "object", "properties": {"password": {"type": "string"}}}}],
    });
    let r = e.post("/v1/responses", body).await;
    assert_eq!(r.status(), 200);
    let evs = typed_events(r).await;
    let added = evs
        .iter()
        .find(|v| v["type"] == "response.output_item.added" && v["item"]["type"] == "function_call")
        .expect("a function call item");
    // The mock replays a recorded Anthropic tool-use stream: its call id
    // and tool name come back as a Responses function call.
    assert!(!added["item"]["name"].as_str().unwrap().is_empty());
    assert!(added["item"]["call_id"]
        .as_str()
        .unwrap()
        .starts_with("toolu_"));
    let done: Vec<&Value> = evs
        .iter()
        .filter(|v| {
            v["type"] == "response.output_item.done" && v["item"]["type"] == "function_call"
        })
        .collect();
    assert_eq!(done.len(), 2, "the recording holds two parallel calls");
    let completed = &evs.last().unwrap()["response"];
    for d in done {
        let item = &d["item"];
        let args: String = evs
            .iter()
            .filter(|v| {
                v["type"] == "response.function_call_arguments.delta" && v["item_id"] == item["id"]
            })
            .map(|v| v["delta"].as_str().unwrap())
            .collect();
        assert_eq!(item["arguments"], args.as_str());
        assert!(
            serde_json::from_str::<Value>(&args).unwrap().is_object(),
            "{args}"
        );
        assert!(completed["output"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["call_id"] == item["call_id"] && i["arguments"] == args.as_str()));
    }
    // The tools reached Anthropic in its own shape.
    let sent = e.mock.requests();
    assert_eq!(sent[0].path, "/v1/messages");
    assert_eq!(sent[0].body["tools"][0]["name"], "secret_retrieval_tool");
}

#[tokio::test]
async fn stateful_parameters_are_refused_by_name_where_only_openai_has_state() {
    let e = edge().await;
    for (extra, param) in [
        (
            json!({"previous_response_id": "resp_123"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store"),
    ] {
        let mut body = ask("anthropic/claude-sonnet-4-5", false);
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = e.post("/v1/responses", body).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(param));
    }
    assert!(e.mock.requests().is_empty(), "nothing reached a provider");
    // OpenAI keeps the state itself: passed through.
    let mut body = ask("openai/gpt-5.5", false);
    body["store"] = json!(true);
    assert_eq!(e.post("/v1/responses", body).await.status(), 200);
    assert_eq!(e.mock.requests()[0].body["store"], true);
    // A route with an OpenAI target further down serves them there,
    // without calling the provider that cannot.
    let mut body = ask("openai-last", false);
    body["previous_response_id"] = json!("resp_123");
    body["tools"] = json!([{"type": "web_search"}]);
    let r = e.post("/v1/responses", body).await;
    assert_eq!(r.status(), 200);
    let sent = e.mock.requests();
    assert_eq!(sent.len(), 2, "Anthropic was never called");
    assert_eq!(sent[1].path, "/v1/responses");
    assert_eq!(sent[1].body["previous_response_id"], "resp_123");
    // Bad input is refused in OpenAI's error shape before any provider.
    let r = e
        .post("/v1/responses", json!({"model": "openai/gpt-5.5"}))
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "input");
}

#[tokio::test]
async fn responses_fail_over_like_chat_and_record_once() {
    let e = edge().await;
    let r = e.post("/v1/responses", ask("failing-first", false)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "response");
    let r = e.post("/v1/responses", ask("failing-first", true)).await;
    assert_eq!(r.status(), 200);
    let evs = typed_events(r).await;
    assert_eq!(evs.last().unwrap()["type"], "response.completed");
    let recs = e.records.wait(2).await;
    assert_eq!(recs.len(), 2);
    for (rec, endpoint, attempts) in &recs {
        assert_eq!(*endpoint, "responses");
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert!(
            attempts[0].is_some() && attempts[1].is_none(),
            "{attempts:?}"
        );
        assert_eq!(rec.attempts, 2);
        assert!(rec.usage.is_some_and(|u| u.prompt_tokens > 0));
    }
    let paths: Vec<_> = e.mock.requests().iter().map(|r| r.path.clone()).collect();
    // The 429 cools OpenAI's only key down for its retry-after, so the
    // second request fails over without calling OpenAI again.
    assert_eq!(paths, ["/v1/responses", "/v1/messages", "/v1/messages"]);
}

#[tokio::test]
async fn legacy_completions_pass_through_to_openai_and_translate_elsewhere() {
    let e = edge().await;
    let prompt = |model: &str, stream: bool| {
        json!({"model": model, "prompt": "Say this is a test", "max_tokens": 7, "stream": stream,
               "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
    };
    let r = e
        .post(
            "/v1/completions",
            prompt("openai/gpt-3.5-turbo-instruct", false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(e.mock.requests()[0].path, "/v1/completions");
    assert_eq!(e.mock.requests()[0].body["model"], "gpt-3.5-turbo-instruct");

    for model in [
        "openai/gpt-3.5-turbo-instruct",
        "anthropic/claude-sonnet-4-5",
        "gemini/gemini-2.5-flash",
    ] {
        let r = e.post("/v1/completions", prompt(model, true)).await;
        assert_eq!(r.status(), 200, "{model}");
        let data = sse::data(r, WAIT).await;
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{model}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert!(
            chunks.iter().all(|c| c["object"] == "text_completion"),
            "{model}"
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert!(!text.is_empty(), "{model}");
        assert!(
            chunks.last().unwrap()["usage"]["total_tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "{model}"
        );
    }
    let r = e
        .post(
            "/v1/completions",
            prompt("anthropic/claude-sonnet-4-5", false),
        )
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("4242"),
        "{v}"
    );
    let sent = e.mock.requests().last().unwrap().clone();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.body["max_tokens"], 7);
    let recs = e.records.wait(5).await;
    assert!(recs
        .iter()
        .all(|(r, ep, _)| *ep == "completions" && r.usage.is_some()));

    // What chat cannot express is refused by name, not dropped.
    let mut body = prompt("anthropic/claude-sonnet-4-5", false);
    body["echo"] = json!(true);
    let r = e.post("/v1/completions", body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "echo");
}

#[tokio::test]
async fn the_model_list_includes_what_providers_list_themselves() {
    let e = edge().await;
    let list = |e: &Edge, path: &'static str| {
        let url = format!("http://{}{path}", e.addr);
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .bearer_auth(KEY)
                .timeout(WAIT)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let v = list(&e, "/v1/models").await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    // Configured, then discovered from each provider's own list.
    assert!(ids.contains(&"simulated/sim-small"), "{ids:?}");
    assert!(ids.contains(&"failing-first"), "{ids:?}");
    for discovered in [
        "openai/gpt-4.1-nano",
        "anthropic/claude-haiku-4-5-20251001",
        "gemini/gemini-2.5-flash",
    ] {
        assert!(ids.contains(&discovered), "{discovered} missing: {ids:?}");
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no duplicates");
    // Asked with the gateway's keys, each in its provider's own way.
    let asked: Vec<_> = e
        .mock
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(asked.len(), 3, "one fetch per provider");
    assert!(asked.iter().any(|r| r.path == "/v1/models"
        && r.header("authorization") == Some(&format!("Bearer {OPENAI_KEY}"))));
    assert!(asked
        .iter()
        .any(|r| r.path == "/v1beta/models" && r.header("x-goog-api-key").is_some()));
    // Served from the cache afterwards: no provider is asked again.
    let again = list(&e, "/v1/models").await;
    assert_eq!(again, v);
    assert_eq!(
        e.mock
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count(),
        3
    );
    // A discovered model is routable and has its own entry.
    let one = list(&e, "/v1/models/openai%2Fgpt-4.1-nano").await;
    assert_eq!(one["owned_by"], "openai");
    let r = e
        .post("/v1/responses", ask("openai/gpt-4.1-nano", false))
        .await;
    assert_eq!(r.status(), 200);
}
