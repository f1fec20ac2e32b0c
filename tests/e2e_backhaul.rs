//! End to end over the QUIC backhaul: real `switchyard edge` and
//! `switchyard egress` processes on 127.0.0.1, mutual TLS from
//! `switchyard gen-certs`, and the fixture-replaying mock as the provider.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_testkit::cluster::{
    gen_scoped_certs, test_tenant_yaml, EdgeNode, EgressNode, NodeCerts,
};
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse::data as sse_data;

const PROVIDER_KEY: &str = "sk-test-BACKHAUL-9c8b7a6d5e4f";
const PROMPT: &str = "What is 4200 + 42? (prompt-marker-5519)";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

struct Fleet {
    dir: PathBuf,
    policy: PathBuf,
    edge_certs: NodeCerts,
    egress_certs: NodeCerts,
    mock: MockUpstream,
}

impl Fleet {
    /// A mock provider `openai` in region `eu`; `egress_in_policy` lists
    /// egress addresses in the policy itself (otherwise they come as flags).
    async fn new(egress_in_policy: &[String]) -> Fleet {
        Self::with_limits(
            egress_in_policy,
            "{ upstream_timeout_ms: 4000, stream_idle_timeout_ms: 3000 }",
        )
        .await
    }

    /// Like [`Fleet::new`], with the policy's `limits` given.
    async fn with_limits(egress_in_policy: &[String], limits: &str) -> Fleet {
        let mock = MockUpstream::start().await;
        let dir = temp_dir("backhaul");
        let edge_certs = gen_scoped_certs(binary(), &dir.join("pki"), "edge", "edge", "eu");
        let egress_certs = gen_scoped_certs(binary(), &dir.join("pki"), "egress", "egress", "eu");
        let egress_list = egress_in_policy
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let policy = format!(
            r#"
limits: {limits}
regions:
  eu: {{ jurisdiction: eu, egress: [{egress_list}] }}
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    region: eu
{}"#,
            mock.url(),
            test_tenant_yaml(binary()),
        );
        let path = dir.join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        Fleet {
            dir,
            policy: path,
            edge_certs,
            egress_certs,
            mock,
        }
    }

    fn egress_env() -> Vec<(String, String)> {
        vec![("OPENAI_API_KEY".into(), PROVIDER_KEY.into())]
    }

    fn egress(&self, addr: Option<std::net::SocketAddr>) -> EgressNode {
        EgressNode::start(
            binary(),
            "eu",
            addr,
            &self.policy,
            &self.egress_certs,
            &Self::egress_env(),
        )
    }

    fn edge(&self, egress: &[&EgressNode]) -> EdgeNode {
        self.edge_with(&self.edge_certs, egress)
    }

    fn edge_with(&self, certs: &NodeCerts, egress: &[&EgressNode]) -> EdgeNode {
        let flags: Vec<String> = egress.iter().map(|e| format!("eu={}", e.addr)).collect();
        EdgeNode::start(binary(), "eu", &self.policy, certs, &flags, &[])
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
}

async fn post(edge: &EdgeNode, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}/chat/completions", edge.base_url()))
        .bearer_auth(&edge.key)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn access_line(logs: &str, status: u16) -> Value {
    let line = logs
        .lines()
        .find(|l| l.contains("switchyard::access") && l.contains(&format!("\"status\":{status}")))
        .unwrap_or_else(|| panic!("no access line with status {status}: {logs}"));
    serde_json::from_str(line).unwrap()
}

fn count(haystack: &str, needles: &[&str]) -> usize {
    haystack
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

#[tokio::test]
async fn request_and_stream_cross_the_backhaul_and_the_edge_holds_no_keys() {
    let egress_addr = switchyard_testkit::cluster::free_udp_port();
    let fleet = Fleet::new(&[egress_addr.to_string()]).await;
    let egress = fleet.egress(Some(egress_addr));
    // The egress address comes from the policy here, not from a flag.
    let edge = EdgeNode::start(binary(), "eu", &fleet.policy, &fleet.edge_certs, &[], &[]);

    let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("4242"));
    let seen = fleet.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body["model"], "gpt-4o-mini");
    assert_eq!(seen[0].body["messages"][0]["content"], PROMPT);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    // Usage crossed back in the trailer and reached the edge's access log.
    assert!(edge
        .process
        .wait_for_logs(Duration::from_secs(5), |l| l.contains("\"status\":200")));
    let entry = access_line(&edge.process.logs(), 200);
    assert_eq!(entry["provider"], "openai");
    assert!(entry["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(entry["completion_tokens"].as_u64().unwrap() > 0);
    assert!(entry["ttft_ms"].as_f64().is_some());

    // A stream is forwarded event by event: the first event arrives while
    // the provider still holds the rest back.
    let resp = post(&edge, &chat("openai/gated", true)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("first event before the gate opened")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("w0"));
    fleet.mock.open_gate();
    let mut rest = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(c))) = tokio::time::timeout_at(deadline.into(), body.next()).await {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        rest.contains("w1") && rest.ends_with("data: [DONE]\n\n"),
        "{rest}"
    );

    // Provider errors come back in the caller's shape, key scrubbed.
    let resp = post(&edge, &chat("openai/echo-key-401", false)).await;
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("\"error\"") && !text.contains(PROVIDER_KEY),
        "{text}"
    );

    // The edge never had the provider key: not in its environment, not in
    // its snapshot (its banner lists keys per provider), not in its logs.
    assert!(
        edge.process
            .stdout()
            .contains("provider openai region=eu keys=0"),
        "{}",
        edge.process.stdout()
    );
    assert!(egress
        .process
        .stdout()
        .contains("provider openai region=eu keys=1"));
    assert!(!edge.process.logs().contains(PROVIDER_KEY));
    assert!(!edge.process.stdout().contains(PROVIDER_KEY));
    assert!(!egress.process.logs().contains(PROVIDER_KEY));
    assert!(!edge.process.logs().contains("prompt-marker-5519"));
    assert!(!egress.process.logs().contains("prompt-marker-5519"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_streams_share_one_connection() {
    let fleet = Fleet::new(&[]).await;
    let egress = fleet.egress(None);
    let edge = fleet.edge(&[&egress]);
    fleet.mock.set_event_gap(Duration::from_millis(5));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("{}/chat/completions", edge.base_url());
            let key = edge.key.clone();
            tokio::spawn(async move {
                let resp = client()
                    .post(url)
                    .bearer_auth(key)
                    .json(&chat("openai/gpt-4o-mini", true))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                sse_data(resp, Duration::from_secs(15)).await
            })
        })
        .collect();
    for t in tasks {
        let events = t.await.unwrap();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert!(
            events.iter().all(|e| !e.contains("\"error\"")),
            "{events:?}"
        );
    }
    assert_eq!(fleet.mock.requests().len(), 50);
    assert_eq!(
        count(&egress.process.logs(), &["edge connected"]),
        1,
        "all streams must ride one connection"
    );
}

#[tokio::test]
async fn client_disconnect_cancels_the_provider_call() {
    let fleet = Fleet::new(&[]).await;
    let egress = fleet.egress(None);
    let edge = fleet.edge(&[&egress]);
    let resp = post(&edge, &chat("openai/endless", true)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .unwrap();
    }
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.mock.cancellations() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fleet.mock.cancellations(),
        1,
        "the provider never saw the cancel"
    );
    assert!(egress.process.wait_for_logs(Duration::from_secs(2), |l| l
        .contains("cancelled by the edge")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_an_egress_fails_over_then_it_reconnects() {
    let fleet = Fleet::new(&[]).await;
    let mut a = fleet.egress(None);
    let b_addr = switchyard_testkit::cluster::free_udp_port();
    // B is not up yet, so the first stream can only go to A.
    let edge = EdgeNode::start(
        binary(),
        "eu",
        &fleet.policy,
        &fleet.edge_certs,
        &[format!("eu={}", a.addr), format!("eu={b_addr}")],
        &[],
    );
    let a_tag = format!("\"egress\":\"{}\"", a.addr);
    let b_tag = format!("\"egress\":\"{b_addr}\"");
    let in_flight = post(&edge, &chat("openai/endless", true)).await;
    assert_eq!(in_flight.status(), 200);
    let reader = tokio::spawn(sse_data(in_flight, Duration::from_secs(20)));

    let mut b = fleet.egress(Some(b_addr));
    assert!(
        edge.process
            .wait_for_logs(Duration::from_secs(10), |l| count(
                l,
                &["backhaul connected", &b_tag]
            ) == 1),
        "edge never connected to B: {}",
        edge.process.logs()
    );

    let killed_at = Instant::now();
    a.process.kill();
    // New requests go to B, including those sent while the edge has not yet
    // noticed A is gone (they are retried on B before A took them).
    for _ in 0..5 {
        let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    // The stream A was carrying ends with a clear error, not a hang.
    let events = reader.await.unwrap();
    let last = events.last().cloned().unwrap_or_default();
    assert!(last.contains("backhaul_lost"), "{events:?}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "loss detected too late"
    );

    // A comes back on the same port; the edge redials it on its own.
    a = fleet.egress(Some(a.addr));
    assert!(
        edge.process
            .wait_for_logs(Duration::from_secs(15), |l| count(
                l,
                &["backhaul connected", &a_tag]
            ) == 2),
        "edge never reconnected to A: {}",
        edge.process.logs()
    );
    b.process.kill();
    let resp = post(&edge, &chat("openai/gpt-4o-mini", true)).await;
    assert_eq!(resp.status(), 200);
    let events = sse_data(resp, Duration::from_secs(15)).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    drop(a);
}

#[tokio::test]
async fn mtls_rejects_nodes_from_another_ca() {
    let fleet = Fleet::new(&[]).await;
    // Scoped like ours, so only the CA tells them apart.
    let rogue = gen_scoped_certs(
        binary(),
        &fleet.dir.join("rogue-pki"),
        "rogue",
        "edge",
        "eu",
    );
    let rogue_egress_certs = gen_scoped_certs(
        binary(),
        &fleet.dir.join("rogue-pki"),
        "rogue-egress",
        "egress",
        "eu",
    );

    // An edge whose certificate is from another CA (it trusts ours, so only
    // the egress's check can stop it).
    let egress = fleet.egress(None);
    let sneaky = NodeCerts {
        ca: fleet.edge_certs.ca.clone(),
        ..rogue.clone()
    };
    let edge = fleet.edge_with(&sneaky, &[&egress]);
    let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
    assert!(
        resp.status() == 502 || resp.status() == 503,
        "{}",
        resp.status()
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "no_egress");
    assert!(egress
        .process
        .wait_for_logs(Duration::from_secs(5), |l| l.contains("handshake refused")));
    // Its TLS 1.3 handshake completes on its side before the egress judges
    // the certificate: the connection must not count as up until the
    // egress says READY, which it never does here.
    let logs = edge.process.logs();
    assert!(logs.contains("backhaul connect failed"), "{logs}");
    assert!(!logs.contains("backhaul connected"), "{logs}");
    assert!(fleet.mock.requests().is_empty());
    drop(edge);

    // An egress with a certificate from another CA: our edge refuses it.
    let rogue_egress = EgressNode::start(
        binary(),
        "eu",
        None,
        &fleet.policy,
        &rogue_egress_certs,
        &Fleet::egress_env(),
    );
    let edge = fleet.edge(&[&rogue_egress]);
    let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
    assert_eq!(resp.status(), 503);
    assert!(
        edge.process.logs().contains("backhaul connect failed"),
        "{}",
        edge.process.logs()
    );
    assert!(fleet.mock.requests().is_empty());
}

/// Waits (bounded) until the edge is connected to every egress in `tags`.
fn wait_connected(edge: &EdgeNode, tags: &[String]) {
    assert!(
        edge.process.wait_for_logs(Duration::from_secs(15), |l| tags
            .iter()
            .all(|t| count(l, &["backhaul connected", t]) >= 1)),
        "edge never connected to every egress: {}",
        edge.process.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_egress_is_bypassed_long_before_the_idle_timeout() {
    let fleet = Fleet::new(&[]).await;
    let a = fleet.egress(None);
    let b = fleet.egress(None);
    let edge = fleet.edge(&[&a, &b]);
    let a_tag = format!("\"egress\":\"{}\"", a.addr);
    let b_tag = format!("\"egress\":\"{}\"", b.addr);
    wait_connected(&edge, &[a_tag.clone(), b_tag]);
    for _ in 0..4 {
        let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
        assert_eq!(resp.status(), 200);
    }

    // A keeps its connection but answers nothing, like a frozen host.
    a.process.pause();
    let timed = |edge_url: String, key: String| async move {
        let started = Instant::now();
        let resp = client()
            .post(format!("{edge_url}/chat/completions"))
            .bearer_auth(key)
            .json(&chat("openai/gpt-4o-mini", false))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), started.elapsed())
    };
    // Concurrent requests spread over both nodes: the edge weighs RTT by
    // in-flight requests, and the provider's latency keeps them in flight,
    // so however noisy the RTTs, some are sent to the stopped node. Batches
    // until one was, all well inside the 3 s idle timeout.
    fleet.mock.set_latency(Duration::from_millis(100));
    let mut times = Vec::new();
    let suspect = |l: &str| count(l, &["did not acknowledge", &a_tag]) >= 1;
    for _ in 0..8 {
        let batch: Vec<_> = (0..8)
            .map(|_| tokio::spawn(timed(edge.base_url(), edge.key.clone())))
            .collect();
        for t in batch {
            let (status, took) = t.await.unwrap();
            assert_eq!(status, 200, "a request failed while A was stopped");
            times.push(took);
        }
        if suspect(&edge.process.logs()) {
            break;
        }
    }
    let first = times[0];
    let slowest = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "stopped egress: first request {first:?}, slowest {slowest:?}, {} requests",
        times.len()
    );
    assert!(
        suspect(&edge.process.logs()),
        "no request met the stopped egress: {}",
        edge.process.logs()
    );
    // A generous bound: the mechanism gives up after at most 300 ms; the
    // idle timeout it must beat is 3 s.
    assert!(slowest < Duration::from_secs(2), "{times:?}");
    // Once suspect, A is not tried again while it stays silent.
    let waits_before = count(&edge.process.logs(), &["no acknowledgement within"]);
    for _ in 0..3 {
        let (status, took) = timed(edge.base_url(), edge.key.clone()).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    assert_eq!(
        count(&edge.process.logs(), &["no acknowledgement within"]),
        waits_before,
        "a suspect egress was tried again"
    );
    // Nothing was sent twice: one provider call per request.
    assert_eq!(fleet.mock.requests().len(), 4 + times.len() + 3);
    a.process.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_egress_took_is_never_sent_again() {
    // A long deadline, so the egress losing the request is what ends it.
    let fleet = Fleet::with_limits(
        &[],
        "{ upstream_timeout_ms: 20000, stream_idle_timeout_ms: 3000 }",
    )
    .await;
    let mut a = fleet.egress(None);
    let b_addr = switchyard_testkit::cluster::free_udp_port();
    // B is not up yet, so the request can only go to A.
    let edge = EdgeNode::start(
        binary(),
        "eu",
        &fleet.policy,
        &fleet.edge_certs,
        &[format!("eu={}", a.addr), format!("eu={b_addr}")],
        &[],
    );
    let url = format!("{}/chat/completions", edge.base_url());
    let key = edge.key.clone();
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(key)
            .json(&chat("openai/hang", false))
            .send()
            .await
            .unwrap()
    });
    // A took it and called the provider, which never answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.mock.requests().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fleet.mock.requests().len(), 1);
    let b = fleet.egress(Some(b_addr));
    wait_connected(&edge, &[format!("\"egress\":\"{b_addr}\"")]);

    // A dies with the request; B is there, but the request is not resent.
    a.process.kill();
    let resp = pending.await.unwrap();
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "backhaul_failed", "{v}");
    assert_eq!(fleet.mock.requests().len(), 1, "the request was sent twice");
    assert!(edge.process.logs().contains("not sent again"));
    // B serves new requests.
    let resp = post(&edge, &chat("openai/gpt-4o-mini", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fleet.mock.requests().len(), 2);
    drop(b);
}

/// The Responses API, legacy completions and Gemini's own API cross the
/// backhaul as their own operations: the egress passes Responses and
/// completions through to OpenAI, translates Gemini calls to chat, counts
/// Gemini tokens itself, and errors keep the caller's shape.
#[tokio::test]
async fn every_inbound_protocol_crosses_the_backhaul() {
    let fleet = Fleet::new(&[]).await;
    let egress = fleet.egress(None);
    let edge = fleet.edge(&[&egress]);
    let call = |path: &str, body: Value| {
        client()
            .post(format!("{}{path}", edge.base_url().trim_end_matches("/v1")))
            .bearer_auth(&edge.key)
            .json(&body)
            .send()
    };

    let r = call(
        "/v1/responses",
        json!({"model": "openai/gpt-5.5", "input": PROMPT, "stream": true}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_data(r, Duration::from_secs(10)).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["type"], "response.completed");

    let r = call(
        "/v1/completions",
        json!({"model": "openai/gpt-3.5-turbo-instruct", "prompt": PROMPT}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");

    let contents = json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]});
    let r = call(
        "/v1beta/models/openai/gpt-4o-mini:generateContent",
        contents.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["candidates"][0]["content"]["parts"][0]["text"]
        .as_str()
        .unwrap()
        .contains("4242"));

    let r = call(
        "/v1beta/models/openai/gpt-4o-mini:countTokens",
        contents.clone(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["totalTokens"].as_u64().unwrap() > 3);

    // A provider error over the backhaul, in Google's shape.
    let r = call(
        "/v1beta/models/openai/echo-key-401:generateContent",
        contents,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["error"]["status"].is_string() && !text.contains(PROVIDER_KEY),
        "{text}"
    );

    let paths: Vec<String> = fleet
        .mock
        .requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/responses",
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/chat/completions"
        ]
    );
    assert!(edge
        .process
        .wait_for_logs(Duration::from_secs(5), |l| count(
            l,
            &["switchyard::access", "\"status\":200"]
        ) >= 4));
    assert!(!edge.process.logs().contains("prompt-marker-5519"));
}
