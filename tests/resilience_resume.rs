//! Mid-stream resume (`routes.R.resume`) through a whole in-process gateway
//! (`EdgeNode`, single node) in front of the fixture-replaying mock, whose
//! `cut-after-N` models cut a recorded stream after N events.
//!
//! A cut text stream continues on a prefill-capable target: the client's
//! text is exactly the first target's partial text followed by the second
//! target's answer, in one well-formed stream (one preamble, one id, one
//! terminal), and the second target received that partial text as its
//! assistant prefill. Otherwise (resume off, a tool call in flight, the
//! only prefill target outside the tenant's jurisdictions) the stream ends
//! with its error event, as without resume, and nothing else is called.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use switchyard_testkit::metrics::{sample, scrape as metrics};

use common::{
    http_client, install_crypto, start_backhaul_edge, start_egress, start_single_node_edge,
    write_policy_file, BackhaulCerts,
};
use serde_json::{json, Value};
use switchyard_edge::node::RunningEdge;
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse;

const EU_KEY: &str = "sy-eu-tenant-key-0123456789";

/// The OpenAI fixture's text (`chat-stream-include-usage`), and what its
/// first four events carry (role chunk, "420", "0", " +").
const OPENAI_TEXT: &str = "4200 + 42 equals 4242.";
const OPENAI_FIRST_4: &str = "4200 +";
/// The Anthropic fixture's text (`messages-stream`), and what its first
/// three events carry (message_start, content_block_start, one delta).
const ANTHROPIC_TEXT: &str = "4200 + 42 = 4242";
const ANTHROPIC_FIRST_3: &str = "4200 + 42 =";

fn client() -> reqwest::Client {
    http_client(Duration::from_secs(30))
}

fn policy(url: &str) -> String {
    format!(
        r#"
limits: {{ stream_idle_timeout_ms: 1500 }}
regions:
  eu-west: {{ jurisdiction: eu }}
  us-east: {{ jurisdiction: us }}
providers:
  cutter:
    kind: openai-compatible
    base_url: "{url}/v1"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-cut" }} ] }} ]
  prefixer:
    kind: openai-compatible
    base_url: "{url}/v1"
    region: eu-west
    prefill: prefix
    key_pools: [ {{ keys: [ {{ value: "sk-prefix" }} ] }} ]
  plain:
    kind: openai-compatible
    base_url: "{url}/v1"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-plain" }} ] }} ]
  claude-eu:
    kind: anthropic
    base_url: "{url}"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-ant-eu" }} ] }} ]
  claude-us:
    kind: anthropic
    base_url: "{url}"
    region: us-east
    key_pools: [ {{ keys: [ {{ value: "sk-ant-us" }} ] }} ]
routes:
  chat:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: plain, model: no-prefill }}
      - {{ provider: prefixer, model: cont-prefix }}
  chat-to-claude:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: claude-eu, model: cont-claude }}
  chat-off:
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: prefixer, model: cont-off }}
  tools:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: prefixer, model: cont-tools }}
  messages:
    resume: true
    targets:
      - {{ provider: claude-eu, model: cut-after-3 }}
      - {{ provider: claude-eu, model: cont-messages }}
  messages-twice:
    resume: true
    targets:
      - {{ provider: claude-eu, model: cut-after-3 }}
      - {{ provider: claude-eu, model: cut-after-4 }}
      - {{ provider: prefixer, model: cont-twice }}
  always-cut:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: prefixer, model: cut-after-2 }}
      - {{ provider: prefixer, model: cut-after-3 }}
      - {{ provider: prefixer, model: never-reached }}
  resume-fails:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: prefixer, model: fail-500 }}
  whole-on:
    resume: true
    targets: [ {{ provider: prefixer, model: whole-on }} ]
  whole-off:
    targets: [ {{ provider: prefixer, model: whole-off }} ]
  stalled:
    resume: true
    targets:
      - {{ provider: cutter, model: stall }}
      - {{ provider: prefixer, model: cont-stall }}
  resident:
    resume: true
    targets:
      - {{ provider: cutter, model: cut-after-4 }}
      - {{ provider: claude-us, model: cont-us }}
tenants:
  - id: test
    key_sha256: "{}"
  - id: eu-tenant
    key_sha256: "{}"
    residency: [eu]
"#,
        KeyHash::of(TEST_KEY).to_hex(),
        KeyHash::of(EU_KEY).to_hex(),
    )
}

async fn start(dir: &Path, mock: &MockUpstream) -> (RunningEdge, SocketAddr, SocketAddr) {
    start_single_node_edge(write_policy_file(dir, &policy(&mock.url()))).await
}

fn resumes(text: &str, provider: &str, outcome: &str) -> f64 {
    sample(
        text,
        &[
            "switchyard_stream_resumes_total",
            &format!("provider=\"{provider}\""),
            &format!("outcome=\"{outcome}\""),
        ],
    )
}

/// A streamed chat completion: every `data:` payload.
async fn chat_stream(
    http: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    model: &str,
    tools: bool,
) -> Vec<String> {
    let mut body = json!({"model": model, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "What is 4200 + 42?"}]});
    if tools {
        body["tools"] = json!([{"type": "function", "function": {"name": "multiply",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]);
    }
    let resp = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sse::data(resp, Duration::from_secs(20)).await
}

/// What a client makes of a chat stream: its text, and the checks every
/// well-formed stream passes (one role chunk, one id, usage, `[DONE]`).
fn chat_text(events: &[String]) -> String {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:#?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{events:#?}"
    );
    let roles = chunks
        .iter()
        .filter(|c| !c["choices"][0]["delta"]["role"].is_null())
        .count();
    assert_eq!(roles, 1, "one role chunk: {events:#?}");
    let ids: std::collections::HashSet<&str> =
        chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one id: {events:#?}");
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1, "{events:#?}");
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"].is_u64(),
        "usage last: {events:#?}"
    );
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The last message the mock received for `model`.
fn prefill_sent(mock: &MockUpstream, model: &str) -> Value {
    let reqs: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.body["model"] == model)
        .collect();
    assert_eq!(reqs.len(), 1, "one call to {model}");
    reqs[0].body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_openai_chat_stream_resumes_on_a_prefill_target_without_losing_or_repeating_text() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("resume-chat");
    let (edge, addr, maddr) = start(&dir, &mock).await;
    let http = client();

    // OpenAI-compatible target declaring `prefill: prefix`; the target
    // between them has no prefill and is skipped.
    let events = chat_stream(&http, addr, TEST_KEY, "chat", false).await;
    let text = chat_text(&events);
    println!("spliced OpenAI text: {text:?}");
    assert_eq!(text, format!("{OPENAI_FIRST_4}{OPENAI_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-prefix"),
        json!({"role": "assistant", "content": OPENAI_FIRST_4, "prefix": true})
    );
    assert_eq!(mock.count(Some("no-prefill"), None), 0);

    // Anthropic target (prefill by default), translated back into chunks.
    let events = chat_stream(&http, addr, TEST_KEY, "chat-to-claude", false).await;
    let text = chat_text(&events);
    assert_eq!(text, format!("{OPENAI_FIRST_4}{ANTHROPIC_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-claude"),
        json!({"role": "assistant", "content": [{"type": "text", "text": OPENAI_FIRST_4}]})
    );

    let m = metrics(&http, maddr).await;
    assert_eq!(resumes(&m, "cutter", "resumed"), 2.0, "{m}");
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every Anthropic event as `(name, data)`.
async fn messages_stream(
    http: &reqwest::Client,
    addr: SocketAddr,
    model: &str,
) -> Vec<(String, Value)> {
    let resp = http
        .post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", TEST_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": model, "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "What is 4200 + 42?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sse::events(resp, Duration::from_secs(20))
        .await
        .into_iter()
        .map(|(name, data)| {
            (
                name.unwrap_or_default(),
                serde_json::from_str(&data).unwrap(),
            )
        })
        .collect()
}

/// A client's view of a Messages stream: its text, after checking it is
/// one message (one start, one text block at index 0, one stop).
fn messages_text(events: &[(String, Value)]) -> String {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let count = |n: &str| names.iter().filter(|x| **x == n).count();
    assert_eq!(count("message_start"), 1, "{names:?}");
    assert_eq!(count("content_block_start"), 1, "{names:?}");
    assert_eq!(count("content_block_stop"), 1, "{names:?}");
    assert_eq!(count("message_delta"), 1, "{names:?}");
    assert_eq!(count("error"), 0, "{events:?}");
    assert_eq!(names.last(), Some(&"message_stop"), "{names:?}");
    assert!(
        events
            .iter()
            .filter_map(|(_, d)| d.get("index"))
            .all(|i| i == 0),
        "{events:?}"
    );
    events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_anthropic_messages_stream_resumes_in_the_same_message_and_block() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("resume-messages");
    let (edge, addr, maddr) = start(&dir, &mock).await;
    let http = client();

    let events = messages_stream(&http, addr, "messages").await;
    let text = messages_text(&events);
    println!("spliced Anthropic text: {text:?}");
    assert_eq!(text, format!("{ANTHROPIC_FIRST_3}{ANTHROPIC_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-messages"),
        json!({"role": "assistant", "content": [{"type": "text", "text": ANTHROPIC_FIRST_3}]})
    );

    // Cut twice: the second resume carries everything the client has,
    // through the hub to an OpenAI-compatible target.
    let events = messages_stream(&http, addr, "messages-twice").await;
    let text = messages_text(&events);
    // The second cut target sent its first 4 events: the first delta again.
    let twice = format!("{ANTHROPIC_FIRST_3}{ANTHROPIC_FIRST_3}");
    assert_eq!(text, format!("{twice}{OPENAI_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-twice"),
        json!({"role": "assistant", "content": twice, "prefix": true})
    );

    let m = metrics(&http, maddr).await;
    assert_eq!(resumes(&m, "claude-eu", "resumed"), 3.0, "{m}");
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stream ends with OpenAI's error chunk after the partial text.
fn ends_with_error(events: &[String]) {
    let last: Value = serde_json::from_str(events.last().expect("some events")).unwrap();
    assert!(last["error"]["message"].is_string(), "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_resume_with_a_tool_call_in_flight_or_outside_the_residency_the_stream_ends_with_its_error(
) {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("resume-refused");
    let (edge, addr, maddr) = start(&dir, &mock).await;
    let http = client();

    let events = chat_stream(&http, addr, TEST_KEY, "chat-off", false).await;
    ends_with_error(&events);
    assert_eq!(mock.count(Some("cont-off"), None), 0);

    let events = chat_stream(&http, addr, TEST_KEY, "tools", true).await;
    ends_with_error(&events);
    assert!(
        events.iter().any(|e| e.contains("tool_calls")),
        "{events:#?}"
    );
    assert_eq!(mock.count(Some("cont-tools"), None), 0);

    // The tenant may only be served in the EU; the only prefill target is
    // in the US.
    let events = chat_stream(&http, addr, EU_KEY, "resident", false).await;
    ends_with_error(&events);
    assert_eq!(mock.count(Some("cont-us"), None), 0);
    // Anyone else is resumed there.
    let events = chat_stream(&http, addr, TEST_KEY, "resident", false).await;
    assert_eq!(
        chat_text(&events),
        format!("{OPENAI_FIRST_4}{ANTHROPIC_TEXT}")
    );

    // Bounded: cut, resumed, cut, resumed, cut: two resumes are spent.
    let events = chat_stream(&http, addr, TEST_KEY, "always-cut", false).await;
    ends_with_error(&events);
    assert_eq!(mock.count(Some("never-reached"), None), 0);
    // The only resume target fails.
    let events = chat_stream(&http, addr, TEST_KEY, "resume-fails", false).await;
    ends_with_error(&events);
    assert_eq!(mock.count(Some("fail-500"), None), 1);

    let m = metrics(&http, maddr).await;
    assert_eq!(resumes(&m, "cutter", "tool_call"), 1.0, "{m}");
    assert_eq!(resumes(&m, "cutter", "no_prefill_target"), 1.0, "{m}");
    assert_eq!(resumes(&m, "cutter", "resumed"), 2.0, "{m}");
    assert_eq!(resumes(&m, "prefixer", "resumed"), 1.0, "{m}");
    assert_eq!(resumes(&m, "prefixer", "resumes_exhausted"), 1.0, "{m}");
    assert_eq!(resumes(&m, "prefixer", "attempt_failed"), 1.0, "{m}");
    assert_eq!(resumes(&m, "cutter", "every_resume_failed"), 1.0, "{m}");
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_read_a_resumed_stream_as_one_answer() {
    let Some(python) = switchyard_testkit::require::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let dir = temp_dir("resume-sdk");
    let (edge, addr, _) = start(&dir, &mock).await;
    switchyard_testkit::require::pytest(
        python,
        "test_resume_sdk.py",
        &[
            ("SWITCHYARD_BASE_URL", format!("http://{addr}")),
            ("SWITCHYARD_KEY", TEST_KEY.to_string()),
        ],
    )
    .await;
    assert_eq!(
        prefill_sent(&mock, "cont-messages"),
        json!({"role": "assistant", "content": [{"type": "text", "text": ANTHROPIC_FIRST_3}]})
    );
    assert_eq!(
        prefill_sent(&mock, "cont-prefix"),
        json!({"role": "assistant", "content": OPENAI_FIRST_4, "prefix": true})
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Over the real QUIC backhaul (edge and egress in-process): the cut
/// reaches the edge as an error frame in a data frame, then a trailer; a
/// provider that goes silent is ended by the egress's idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_resume_across_the_quic_backhaul_after_a_cut_or_a_stall() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("resume-backhaul");
    let path = write_policy_file(&dir, &policy(&mock.url()));
    let certs = BackhaulCerts::generate(&dir, "eu-west");
    let egress = start_egress("eu-west", certs.egress_tls(), &path).await;
    let edge =
        start_backhaul_edge("eu-west", certs.edge_tls(), &path, &[egress.local_addr()]).await;
    let addr = edge.local_addr().unwrap();
    let http = client();

    let started = std::time::Instant::now();
    let events = chat_stream(&http, addr, TEST_KEY, "chat", false).await;
    println!("resumed chat stream over QUIC: {:?}", started.elapsed());
    assert_eq!(chat_text(&events), format!("{OPENAI_FIRST_4}{OPENAI_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-prefix"),
        json!({"role": "assistant", "content": OPENAI_FIRST_4, "prefix": true})
    );

    let events = messages_stream(&http, addr, "messages").await;
    assert_eq!(
        messages_text(&events),
        format!("{ANTHROPIC_FIRST_3}{ANTHROPIC_TEXT}")
    );

    // `stall`: one chunk ("w0 ", no role chunk), then silence.
    let events = chat_stream(&http, addr, TEST_KEY, "stalled", false).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:#?}"
    );
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, format!("w0 {OPENAI_TEXT}"));
    assert_eq!(
        prefill_sent(&mock, "cont-stall"),
        json!({"role": "assistant", "content": "w0 ", "prefix": true})
    );

    // Figures, not thresholds: what watching a stream costs (resume on,
    // nothing cut, versus off) and what a resume adds (a cut stream
    // versus a whole one), over the backhaul on this machine.
    const N: u32 = 20;
    let mean = |route: &'static str| {
        let http = http.clone();
        async move {
            let started = std::time::Instant::now();
            for _ in 0..N {
                let events = chat_stream(&http, addr, TEST_KEY, route, false).await;
                assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            }
            started.elapsed() / N
        }
    };
    let off = mean("whole-off").await;
    let on = mean("whole-on").await;
    let resumed = mean("chat").await;
    println!(
        "mean stream over QUIC (n={N}): resume off {off:?}, resume on {on:?}, cut and resumed {resumed:?}"
    );

    edge.shutdown().await;
    egress.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
