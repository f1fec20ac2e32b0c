//! Telemetry on every role (issue 10, point 6).
//!
//! - every role's `/metrics` (control plane, egress and edge of the local
//!   fleet, and `switchyard dev`) after traffic: `promtool check metrics`
//!   finds no problem in any page, and each role has its families;
//! - W3C `traceparent`: the caller's trace id reaches the provider through
//!   edge → QUIC → egress (and through `switchyard dev`, whose access log
//!   line carries it too);
//! - the usage ledger's `egress`, `key_pool` and `reasoning_tokens` come
//!   back over the backhaul from recorded OpenAI and Gemini payloads;
//! - OTLP: edge and egress export their spans to a small OTLP/HTTP
//!   receiver in this test, which decodes them and finds the request, the
//!   attempt and the provider call linked under the caller's trace.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use switchyard_proto::otlp::{ExportTraceServiceRequest, Span};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use serde_json::{json, Value};
use switchyard_backhaul::node::{ControlLink, EgressNode};
use switchyard_backhaul::trace::TraceContext;
use switchyard_backhaul::tunnel::{generate_node_cert, CertScope, NodeTls};
use switchyard_control::server::{self, ServerConfig};
use switchyard_edge::node::EdgeNode;
use switchyard_proto::{KeyHash, Secret};
use switchyard_testkit::cluster::LocalFleet;
use switchyard_testkit::gateway::{temp_dir, Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;

const ADMIN: &str = "admin-token-telemetry";
const TENANT_KEY: &str = "sy-test-telemetry-tenant";
const PROVIDER_KEY: &str = "sk-telemetry-SECRET-9f8e7d";
/// The W3C specification's own example.
const CALLER_TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CALLER_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.exists())
    });
    if found.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_OPS").as_deref() == Ok("1") {
            panic!("promtool is not installed: run scripts/test.sh");
        }
        eprintln!(
            "SKIPPED: promtool is not installed (scripts/test.sh installs Debian's prometheus)"
        );
    }
    found
}

/// `promtool check metrics` on one page: (success, what it said).
fn promtool_check(promtool: &Path, page: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The metric families a page declares (`# TYPE name kind`).
fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

async fn scrape(admin: SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn chat(base: &str, key: &str, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn dev_policy(mock: &MockUpstream) -> String {
    format!(
        r#"
providers:
  oai:
    kind: openai
    base_url: {url}/v1
    models: [gpt-4o-mini]
    pricing:
      gpt-4o-mini: {{ input: 150, output: 600 }}
    key_pools:
      - name: main
        keys: [{{ env: TELEMETRY_KEY, id: k-main }}]
tenants:
  - id: budgeted
    key_sha256: "{hash}"
    budget: {{ monthly_usd: 10, daily_usd: 1 }}
    limits: {{ rpm: 1000 }}
"#,
        url = mock.url(),
        hash = KeyHash::of(TENANT_KEY).to_hex(),
    )
}

const FLEET_PAGES: [&str; 5] = [
    "control plane",
    "egress eu-west",
    "egress us-east",
    "edge eu-west",
    "edge us-east",
];

/// The families each role must export (beyond the lifecycle's).
fn required(role: &str) -> &'static [&'static str] {
    match role {
        "control plane" => &[
            "switchyard_control_policy_version",
            "switchyard_control_nodes",
            "switchyard_control_snapshot_acks_total",
        ],
        r if r.starts_with("egress") => &[
            "switchyard_snapshot_version",
            "switchyard_snapshot_updates_total",
            "switchyard_egress_connections",
            "switchyard_egress_requests_total",
            "switchyard_upstream_wait_seconds",
            "switchyard_egress_tokens_total",
            "switchyard_key_events_total",
            "switchyard_in_flight",
        ],
        r if r.starts_with("edge") => &[
            "switchyard_requests_total",
            "switchyard_request_duration_seconds",
            "switchyard_time_to_first_token_seconds",
            "switchyard_gateway_overhead_seconds",
            "switchyard_tokens_total",
            "switchyard_tenant_tokens_total",
            "switchyard_budget_used_ratio",
            "switchyard_limit_rejections_total",
            "switchyard_cache_lookups_total",
            "switchyard_key_events_total",
            "switchyard_backhaul_connected",
            "switchyard_backhaul_rtt_seconds",
            "switchyard_backhaul_streams_open",
            "switchyard_snapshot_version",
            "switchyard_snapshot_updates_total",
        ],
        // `switchyard dev`: the edge and its in-process egress.
        _ => &[
            "switchyard_requests_total",
            "switchyard_request_duration_seconds",
            "switchyard_time_to_first_token_seconds",
            "switchyard_gateway_overhead_seconds",
            "switchyard_tokens_total",
            "switchyard_tenant_tokens_total",
            "switchyard_tenant_cost_usd_total",
            "switchyard_budget_used_ratio",
            "switchyard_limit_rejections_total",
            "switchyard_cache_lookups_total",
            "switchyard_key_events_total",
            "switchyard_key_pool_keys",
            "switchyard_snapshot_version",
        ],
    }
}

// Several threads: the fleet's start-up wait blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_exports_its_metrics_and_promtool_finds_no_problem() {
    let Some(promtool) = promtool() else { return };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::start().await;
    let dev = Gateway::start(
        GatewayOptions::new(binary())
            .policy(dev_policy(&mock))
            .env("TELEMETRY_KEY", PROVIDER_KEY),
    );
    let fleet = LocalFleet::start(binary());
    let key = fleet.secret("tenant-key");
    assert_eq!(fleet.admin.len(), 5, "{:?}", fleet.admin);

    // Traffic on every edge: answers, a stream, a cache miss then hit.
    let hi = |model: &str, stream: bool| json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    // The `chat` route prefers the EU: each region's provider is also
    // asked by name, so both egress nodes serve.
    for base in [&fleet.eu, &fleet.us] {
        for (model, stream) in [("chat", false), ("chat", true), ("sim-us/sim-small", true)] {
            let r = chat(base, &key, hi(model, stream), &[]).await;
            assert_eq!(r.status(), 200, "{model}");
            let _ = r.bytes().await;
        }
    }
    let dev_base = dev.base_url();
    for stream in [false, true, false] {
        let r = chat(
            &dev_base,
            TENANT_KEY,
            hi("oai/gpt-4o-mini", stream),
            &[
                ("traceparent", CALLER_TRACEPARENT),
                ("x-switchyard-cache", "use"),
            ],
        )
        .await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }

    // The caller's trace reached the provider through `switchyard dev`,
    // as a child span, and its access log line names it.
    let up = mock.requests();
    let sent = up
        .iter()
        .filter_map(|r| r.header("traceparent"))
        .collect::<Vec<_>>();
    assert!(!sent.is_empty(), "no traceparent reached the provider");
    for t in &sent {
        let t = TraceContext::parse(t).expect("a valid traceparent");
        assert_eq!(t.trace_id_hex(), CALLER_TRACE_ID);
        assert_ne!(t.span_id_hex(), "00f067aa0ba902b7", "a child span");
    }
    assert!(
        dev.wait_for_log(CALLER_TRACE_ID, Duration::from_secs(5)),
        "the access log does not name the trace: {}",
        dev.logs()
    );

    let mut pages: Vec<(&str, String)> = Vec::new();
    for (role, admin) in FLEET_PAGES.iter().zip(&fleet.admin) {
        pages.push((role, scrape(*admin).await));
    }
    pages.push(("switchyard dev", scrape(dev.metrics_addr).await));
    let mut problems = Vec::new();
    for (role, page) in &pages {
        let found = families(page);
        let (ok, said) = promtool_check(&promtool, page);
        println!(
            "{role}: {} families, {} bytes, promtool: {}",
            found.len(),
            page.len(),
            if said.trim().is_empty() {
                "no problems"
            } else {
                said.trim()
            }
        );
        if !ok || !said.trim().is_empty() {
            problems.push(format!("{role}: {said}"));
        }
        let missing: Vec<_> = required(role)
            .iter()
            .filter(|f| !found.contains(**f))
            .collect();
        assert!(missing.is_empty(), "{role} lacks {missing:?}:\n{page}");
        for f in [
            "switchyard_ready",
            "switchyard_draining",
            "switchyard_in_flight",
        ] {
            assert!(found.contains(f), "{role} lacks {f}");
        }
    }
    assert!(problems.is_empty(), "promtool: {problems:?}");
    // What the gateway added before the first byte, per page (figures only).
    for (role, page) in &pages {
        let count: f64 = sum_series(page, "switchyard_gateway_overhead_seconds_count");
        if count > 0.0 {
            let sum = sum_series(page, "switchyard_gateway_overhead_seconds_sum");
            println!(
                "{role}: gateway overhead before the first byte, mean of {count} requests: {:.2} ms",
                1000.0 * sum / count
            );
        }
    }

    // A few values that prove the families are fed, not only declared.
    let dev_page = &pages.last().unwrap().1;
    for needle in [
        "switchyard_cache_lookups_total{result=\"hit\"} 1",
        "switchyard_key_pool_keys{pool=\"main\",provider=\"oai\",state=\"ok\"} 1",
        "switchyard_budget_used_ratio{period=\"month\",tenant=\"budgeted\"}",
        "switchyard_tenant_tokens_total{kind=\"completion\",tenant=\"budgeted\"}",
    ] {
        assert!(dev_page.contains(needle), "{needle} not in\n{dev_page}");
    }
    // Four nodes acknowledged at least the fleet's policy.
    let cp = &pages[0].1;
    let acks = value(cp, "switchyard_control_snapshot_acks_total{result=\"ack\"}");
    assert!(acks >= 4.0, "{cp}");
    for (role, page) in &pages[1..5] {
        let acked = value(page, "switchyard_snapshot_updates_total{result=\"ack\"}");
        assert!(acked >= 1.0, "{role}: {page}");
        assert!(value(page, "switchyard_snapshot_version") >= 1.0, "{role}");
    }
}

/// The sum of every series of a family (any labels).
fn sum_series(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of one series of a page (0 when absent).
fn value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An OTLP/HTTP trace receiver: answers `POST /v1/traces` with 200 and
/// keeps every span it decodes. Plain HTTP/1.1, as collectors speak it.
struct OtlpReceiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    async fn start() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut conn = BufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        let mut length = 0usize;
                        let mut path = String::new();
                        loop {
                            let mut line = String::new();
                            if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if head.is_empty() {
                                path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    length = v.trim().parse().unwrap_or(0);
                                }
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0u8; length.min(16 << 20)];
                        if conn.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let ok = path == "/v1/traces"
                            && head.to_ascii_lowercase().contains("application/x-protobuf");
                        if ok {
                            let req = ExportTraceServiceRequest::decode(body.as_slice())
                                .expect("an OTLP export request");
                            let mut kept = kept.lock().unwrap();
                            for rs in req.resource_spans {
                                for ss in rs.scope_spans {
                                    kept.extend(ss.spans);
                                }
                            }
                        }
                        let status = if ok { "200 OK" } else { "400 Bad Request" };
                        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if conn.get_mut().write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        OtlpReceiver { url, spans, task }
    }

    /// Waits (bounded) until `n` spans of `trace_id` arrived.
    async fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn backhaul_policy(mock: &MockUpstream, key_file: &Path) -> String {
    format!(
        r#"
regions:
  eu: {{ jurisdiction: eu }}
providers:
  oai:
    kind: openai
    base_url: {url}/v1
    region: eu
    models: [case-chat-stream-reasoning-tokens]
    key_pools:
      - name: main
        keys: [{{ file: "{key}", id: k-main }}]
  gem:
    kind: gemini
    base_url: {url}
    region: eu
    models: [case-thinking-nonstream]
    key_pools:
      - name: thinking
        keys: [{{ file: "{key}", id: g1 }}]
tenants:
  - id: traced
    key_sha256: "{hash}"
"#,
        url = mock.url(),
        key = key_file.display(),
        hash = KeyHash::of(TENANT_KEY).to_hex(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_and_the_ledgers_egress_fields_cross_the_backhaul() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("telemetry");
    let key_file = dir.join("provider.key");
    std::fs::write(&key_file, PROVIDER_KEY).unwrap();
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("sqlite://{}/cp.db", dir.display()),
    );
    config.http_listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = Some(Secret::new(ADMIN));
    config.poll_interval = Duration::from_millis(200);
    let cp = server::start(config).await.expect("control plane starts");
    let (grpc, http) = (cp.grpc_addr, cp.http_addr.unwrap());
    let r = client()
        .post(format!("http://{http}/v1/policy"))
        .bearer_auth(ADMIN)
        .body(backhaul_policy(&mock, &key_file))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let link = |id: &str| ControlLink {
        url: format!("http://{grpc}"),
        node_id: Some(id.to_string()),
        state_dir: dir.join(id),
        tls: None,
    };
    let pki = dir.join("pki");
    let tls = |name: &str, scope: CertScope| {
        let g = generate_node_cert(&pki, name, &[], &scope).unwrap();
        NodeTls::from_files(&g.cert, &g.key, &g.ca_cert).unwrap()
    };
    let otlp = OtlpReceiver::start().await;
    let egress = EgressNode::new("eu", tls("egress-eu-7", CertScope::Egress("eu".into())))
        .control_plane(link("egress-eu-7"))
        .otlp(otlp.url.clone())
        .admin("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("egress starts");
    let edge = EdgeNode::backhaul("eu", tls("edge-eu", CertScope::Edge("eu".into())))
        .control_plane(link("edge-eu"))
        .egress("eu", egress.local_addr().to_string())
        .listen("127.0.0.1:0")
        .admin("127.0.0.1:0")
        .otlp(otlp.url.clone())
        .start()
        .await
        .expect("edge starts");
    let base = format!("http://{}/v1", edge.local_addr().unwrap());

    // OpenAI's recorded stream with 100 reasoning tokens, traced by the caller.
    let started = Instant::now();
    let r = chat(
        &base,
        TENANT_KEY,
        json!({"model": "oai/case-chat-stream-reasoning-tokens", "stream": true,
               "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "think"}]}),
        &[("traceparent", CALLER_TRACEPARENT)],
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    println!(
        "traced stream through edge → QUIC → egress: {:?}",
        started.elapsed()
    );
    // Gemini's recorded thinking answer (1754 thoughts tokens), through the hub.
    let r = chat(
        &base,
        TENANT_KEY,
        json!({"model": "gem/case-thinking-nonstream",
               "messages": [{"role": "user", "content": "think"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();

    let up = mock.requests();
    let traced: Vec<_> = up
        .iter()
        .filter_map(|r| r.header("traceparent"))
        .filter_map(TraceContext::parse)
        .collect();
    assert_eq!(traced.len(), 2, "each provider call carries a traceparent");
    assert_eq!(
        traced[0].trace_id_hex(),
        CALLER_TRACE_ID,
        "the caller's trace"
    );
    assert_ne!(traced[0].span_id_hex(), "00f067aa0ba902b7");
    // Without a caller's trace the edge starts one.
    assert_ne!(traced[1].trace_id_hex(), CALLER_TRACE_ID);

    // Both requests in the ledger, with the egress's name, the key that
    // paid and the reasoning tokens the providers reported.
    let rows = |group: &'static str| async move {
        let v: Value = client()
            .get(format!(
                "http://{http}/v1/usage?tenant=traced&since=1h&group_by={group}"
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["rows"].as_array().cloned().unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let by_egress = loop {
        let r = rows("egress").await;
        let n: u64 = r.iter().filter_map(|x| x["requests"].as_u64()).sum();
        if n >= 2 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(by_egress.len(), 1, "{by_egress:?}");
    assert_eq!(by_egress[0]["group"], "egress-eu-7");
    assert_eq!(by_egress[0]["requests"], 2);
    assert_eq!(
        by_egress[0]["reasoning_tokens"],
        100 + 1754,
        "{by_egress:?}"
    );
    let by_pool = rows("key_pool").await;
    let pools: BTreeSet<String> = by_pool
        .iter()
        .filter_map(|r| r["group"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        pools,
        BTreeSet::from(["main/k-main".to_string(), "thinking/g1".to_string()]),
        "{by_pool:?}"
    );

    // The caller's trace as the two nodes exported it: the edge's request
    // span under the caller's span, its attempt under the request, the
    // egress's provider call under the attempt, and the provider got the
    // provider call's own id as its parent.
    let caller = TraceContext::parse(CALLER_TRACEPARENT).unwrap();
    let spans = otlp.trace(&caller.trace_id, 3).await;
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
    };
    let request = named("edge.request");
    let attempt = named("edge.attempt");
    let call = named("egress.provider_call");
    assert_eq!(request.parent_span_id, caller.span_id.to_vec());
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(call.parent_span_id, attempt.span_id);
    assert_eq!(
        call.span_id,
        traced[0].span_id.to_vec(),
        "the provider's parent"
    );
    for s in [request, attempt, call] {
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
        assert_eq!(s.status.as_ref().map(|st| st.code), Some(1), "{s:?}");
    }
    let attr = |s: &Span, key: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
    };
    assert!(matches!(
        attr(call, "switchyard.key_pool"),
        Some(switchyard_proto::otlp::any_value::Value::StringValue(p)) if p == "main"
    ));
    assert!(matches!(
        attr(request, "switchyard.tenant"),
        Some(switchyard_proto::otlp::any_value::Value::StringValue(t)) if t == "traced"
    ));
    println!(
        "spans of the caller's trace: {:?}",
        spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
    );

    // The same two answers on the egress's and the edge's pages: the key
    // pools' health, the reasoning tokens, the provider's wait, the
    // gateway's overhead and the backhaul's round trip.
    let egress_page = scrape(egress.admin_addr().unwrap()).await;
    for needle in [
        "switchyard_key_pool_keys{pool=\"main\",provider=\"oai\",state=\"ok\"} 1",
        "switchyard_key_pool_keys{pool=\"thinking\",provider=\"gem\",state=\"ok\"} 1",
        "switchyard_egress_tokens_total{kind=\"reasoning\",provider=\"oai\"} 100",
        "switchyard_egress_tokens_total{kind=\"reasoning\",provider=\"gem\"} 1754",
        "switchyard_egress_requests_total{class=\"2xx\",model=\"case-thinking-nonstream\",provider=\"gem\"} 1",
    ] {
        assert!(egress_page.contains(needle), "{needle} not in\n{egress_page}");
    }
    assert_eq!(
        sum_series(&egress_page, "switchyard_upstream_wait_seconds_count"),
        2.0
    );
    let edge_page = scrape(edge.admin_addr().unwrap()).await;
    assert_eq!(
        sum_series(&edge_page, "switchyard_gateway_overhead_seconds_count"),
        2.0
    );
    let rtt = sum_series(&edge_page, "switchyard_backhaul_rtt_seconds");
    assert!(rtt > 0.0, "{edge_page}");
    assert!(
        edge_page.contains("switchyard_backhaul_streams_open{"),
        "{edge_page}"
    );
    println!(
        "backhaul RTT {:.3} ms; gateway overhead mean {:.2} ms over edge → QUIC → egress",
        rtt * 1000.0,
        1000.0 * sum_series(&edge_page, "switchyard_gateway_overhead_seconds_sum") / 2.0
    );

    edge.shutdown().await;
    egress.shutdown().await;
    cp.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
