//! The edge's request pipeline, in process: an `EdgeApp` served on
//! 127.0.0.1:0 in front of the real in-process egress and a mock provider
//! (or a fake upstream where the test needs an answer no provider gives).
//! Proves the phase hooks, commit-after-the-first-event failover, the
//! retry grammar at the edge, and the two panics turned into errors.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use serde_json::{json, Value};
use switchyard_backhaul::{
    Egress, EgressRequest, EgressResponse, RequestStats, ResponseBody, SharedSnapshot, Upstream,
};
use switchyard_control::{compile, parse_policy, CompileOptions};
use switchyard_edge::{
    AdmitHook, EdgeApp, PlanHook, RecordHook, RequestCtx, ResponseObserver, UsageRecord,
};
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::{KeyHash, PlannedTarget, Snapshot, TenantSnapshot};
use switchyard_testkit::mock::MockUpstream;
use switchyard_testkit::sse::data as sse_data;
use tokio::net::TcpListener;
use tokio::sync::watch;

const KEY: &str = "sy-test-pipeline-key";
const WAIT: Duration = Duration::from_secs(10);

/// Large idle timeout: a stall in these tests ends by the first-token
/// deadline or not at all.
const POLICY: &str = r#"
limits: { upstream_timeout_ms: 20000, stream_idle_timeout_ms: 30000 }
routes:
  early-cut:
    targets:
      - { provider: openai, model: cut-before-first }
      - { provider: openai, model: gpt-4o-mini }
  early-stall:
    first_token_timeout_ms: 300
    targets:
      - { provider: openai, model: stall-before-first }
      - { provider: openai, model: gpt-4o-mini }
  two:
    targets:
      - { provider: openai, model: first }
      - { provider: openai, model: second }
"#;

fn snapshot(mock_url: &str) -> Snapshot {
    let doc = parse_policy(POLICY).unwrap();
    let base = format!("{mock_url}/v1");
    let env = move |k: &str| match k {
        "OPENAI_API_KEY" => Some("sk-test-pipeline".to_string()),
        "OPENAI_BASE_URL" => Some(base.clone()),
        _ => None,
    };
    let compiled = compile(
        &doc,
        &CompileOptions {
            env: &env,
            include_simulated: false,
            version: 1,
        },
    )
    .unwrap();
    let mut snap = compiled.snapshot.into_builder();
    snap.tenants.insert(
        KeyHash::of(KEY),
        Arc::new(TenantSnapshot {
            id: "t1".into(),
            allowed_models: None,
        }),
    );
    snap.build()
}

/// An `EdgeApp` accepting on 127.0.0.1:0; stops when dropped.
struct Edge {
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

async fn serve(app: EdgeApp) -> Edge {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Arc::new(app);
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
    Edge { addr, _stop: stop }
}

fn shared(snap: Snapshot) -> SharedSnapshot {
    Arc::new(ArcSwap::from_pointee(snap))
}

async fn post(edge: &Edge, body: Value) -> reqwest::Response {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", edge.addr))
        .bearer_auth(KEY)
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .unwrap()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// A usage record with the error label of each attempt.
type Recorded = (UsageRecord, Vec<Option<&'static str>>);

/// Records every phase hook call, and each request's attempts.
#[derive(Default)]
struct Trace {
    calls: Mutex<Vec<String>>,
    records: Mutex<Vec<Recorded>>,
}

impl Trace {
    fn push(&self, s: impl Into<String>) {
        self.calls.lock().unwrap().push(s.into());
    }

    /// Waits (bounded) for `n` usage records: `record` runs after the
    /// answer is written, so the client may be done first.
    async fn records(&self, n: usize) -> Vec<Recorded> {
        let deadline = Instant::now() + WAIT;
        while self.records.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.records.lock().unwrap().clone()
    }
}

struct Hook(Arc<Trace>);

impl AdmitHook for Hook {
    fn on_admit(&self, ctx: &RequestCtx) -> Result<(), GatewayError> {
        assert!(ctx.tenant.is_some(), "admit runs after authentication");
        self.0.push("admit");
        Ok(())
    }
}

impl PlanHook for Hook {
    fn on_plan(&self, _ctx: &RequestCtx, targets: &[PlannedTarget]) {
        self.0.push(format!("plan:{}", targets.len()));
    }
}

impl ResponseObserver for Hook {
    fn on_commit(&self, _ctx: &RequestCtx, status: u16) {
        self.0.push(format!("commit:{status}"));
    }
    fn on_body(&self, _ctx: &RequestCtx, _chunk: &Bytes) {
        self.0.push("body");
    }
    fn on_end(&self, _ctx: &RequestCtx) {
        self.0.push("end");
    }
}

impl RecordHook for Hook {
    fn on_record(&self, ctx: &RequestCtx, record: &UsageRecord) {
        self.0.push(format!("record:{}", record.status));
        let attempts = ctx.attempts.iter().map(|a| a.error).collect();
        self.0
            .records
            .lock()
            .unwrap()
            .push((record.clone(), attempts));
    }
}

fn traced(app: EdgeApp, trace: &Arc<Trace>) -> EdgeApp {
    app.with_admit_hook(Arc::new(Hook(trace.clone())))
        .with_plan_hook(Arc::new(Hook(trace.clone())))
        .with_response_observer(Arc::new(Hook(trace.clone())))
        .with_record_hook(Arc::new(Hook(trace.clone())))
}

async fn real_edge(mock: &MockUpstream, trace: &Arc<Trace>) -> Edge {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let snap = shared(snapshot(&mock.url()));
    let egress = Egress::new(snap.clone()).unwrap();
    serve(traced(EdgeApp::new(snap, Arc::new(egress)), trace)).await
}

#[tokio::test]
async fn each_phase_hook_runs_once_per_request_in_order() {
    let mock = MockUpstream::start().await;
    let trace = Arc::new(Trace::default());
    let edge = real_edge(&mock, &trace).await;

    let resp = post(&edge, chat("openai/gpt-4o-mini", true)).await;
    assert_eq!(resp.status(), 200);
    let events = sse_data(resp, WAIT).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let records = trace.records(1).await;

    let calls = trace.calls.lock().unwrap().clone();
    let bodies = calls.iter().filter(|c| *c == "body").count();
    assert_eq!(bodies, events.len(), "every frame observed: {calls:?}");
    let mut phases = calls.clone();
    phases.dedup();
    assert_eq!(
        phases,
        ["admit", "plan:1", "commit:200", "body", "end", "record:200"],
        "{calls:?}"
    );
    let (record, attempts) = &records[0];
    assert_eq!(attempts, &[None]);
    assert!(record.usage.is_some_and(|u| u.prompt_tokens > 0));
    assert!(!record.stream_failed && !record.client_gone);

    // A request refused before planning still gets its one record, and
    // no other hook sees it.
    trace.calls.lock().unwrap().clear();
    let resp = post(&edge, chat("nope/unknown", false)).await;
    assert_eq!(resp.status(), 404);
    trace.records(2).await;
    assert_eq!(trace.calls.lock().unwrap().clone(), ["admit", "record:404"]);
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_event_fails_over() {
    let mock = MockUpstream::start().await;
    let trace = Arc::new(Trace::default());
    let edge = real_edge(&mock, &trace).await;

    let resp = post(&edge, chat("early-cut", true)).await;
    assert_eq!(resp.status(), 200);
    let events = sse_data(resp, WAIT).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"error\"")),
        "{events:?}"
    );
    let models: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(models, ["cut-before-first", "gpt-4o-mini"]);
    let records = trace.records(1).await;
    let (record, attempts) = &records[0];
    assert_eq!(attempts.len(), 2);
    assert!(
        attempts[0].is_some() && attempts[1].is_none(),
        "{attempts:?}"
    );
    assert!(!record.stream_failed);
    // Committed once, to the second target's stream.
    let commits = trace
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("commit"))
        .count();
    assert_eq!(commits, 1);
}

#[tokio::test]
async fn a_stream_stalled_past_its_first_token_deadline_fails_over() {
    let mock = MockUpstream::start().await;
    let trace = Arc::new(Trace::default());
    let edge = real_edge(&mock, &trace).await;

    let resp = post(&edge, chat("early-stall", true)).await;
    assert_eq!(resp.status(), 200);
    let events = sse_data(resp, WAIT).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let models: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(models, ["stall-before-first", "gpt-4o-mini"]);
    let records = trace.records(1).await;
    assert_eq!(records[0].1, [Some("first_token_timeout"), None]);
    // The abandoned attempt's provider request was closed, not left open.
    let deadline = Instant::now() + WAIT;
    while mock.cancellations() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mock.cancellations(), 1);
}

/// Answers by target model; counts calls per model.
struct Fake {
    calls: Mutex<Vec<String>>,
    answer: fn(&str) -> Result<EgressResponse, GatewayError>,
}

#[async_trait::async_trait]
impl Upstream for Fake {
    async fn execute(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        self.calls.lock().unwrap().push(req.target.model.clone());
        (self.answer)(&req.target.model)
    }
}

fn ok_json(status: u16) -> Result<EgressResponse, GatewayError> {
    Ok(EgressResponse {
        status,
        content_type: "application/json".into(),
        retry_after: None,
        body: ResponseBody::Full(Bytes::from_static(b"{\"ok\":true}")),
        stats: Arc::new(RequestStats::default()),
    })
}

async fn fake_edge(answer: fn(&str) -> Result<EgressResponse, GatewayError>) -> (Edge, Arc<Fake>) {
    let fake = Arc::new(Fake {
        calls: Mutex::new(Vec::new()),
        answer,
    });
    let snap = shared(snapshot("http://127.0.0.1:9"));
    (serve(EdgeApp::new(snap, fake.clone())).await, fake)
}

#[tokio::test]
async fn failover_follows_the_errors_retry_class() {
    // Accepted by an egress, then lost: it may have run, so never again.
    let (edge, fake) = fake_edge(|model| match model {
        "first" => Err(
            GatewayError::new(ErrorKind::Upstream, "lost after acceptance")
                .with_code("backhaul_failed")
                .with_source(Source::Backhaul)
                .with_retry(Retry::Never),
        ),
        _ => ok_json(200),
    })
    .await;
    let resp = post(&edge, chat("two", false)).await;
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "backhaul_failed");
    assert_eq!(fake.calls.lock().unwrap().clone(), ["first"]);

    // A provider failure that says another target may do: it goes on.
    let (edge, fake) = fake_edge(|model| match model {
        "first" => Err(GatewayError::new(ErrorKind::Upstream, "provider 500")),
        _ => ok_json(200),
    })
    .await;
    let resp = post(&edge, chat("two", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.calls.lock().unwrap().clone(), ["first", "second"]);
}

#[tokio::test]
async fn a_status_from_the_wire_that_is_no_http_status_is_a_502() {
    for status in [0u16, 42, 1000] {
        let (edge, fake) = fake_edge(match status {
            0 => |_: &str| ok_json(0),
            42 => |_: &str| ok_json(42),
            _ => |_: &str| ok_json(1000),
        })
        .await;
        let resp = post(&edge, chat("two", false)).await;
        assert_eq!(resp.status(), 502, "{status}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_upstream_status", "{status}");
        // The egress answered, so the request may have run: not resent.
        assert_eq!(fake.calls.lock().unwrap().len(), 1, "{status}");
    }
}

#[tokio::test]
async fn a_route_left_without_targets_is_a_clear_error() {
    let mut snap = snapshot("http://127.0.0.1:9").into_builder();
    // The route's only provider is gone (e.g. pruned for want of keys).
    snap.providers.remove("openai");
    let snap = snap.build();
    let fake = Arc::new(Fake {
        calls: Mutex::new(Vec::new()),
        answer: |_| ok_json(200),
    });
    let edge = serve(EdgeApp::new(shared(snap), fake.clone())).await;
    let resp = post(&edge, chat("two", true)).await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_route_target");
    assert!(fake.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_target_that_keeps_failing_is_tried_after_the_healthy_one() {
    let (edge, fake) = fake_edge(|model| match model {
        "first" => Err(GatewayError::new(ErrorKind::Upstream, "provider 500")),
        _ => ok_json(200),
    })
    .await;
    // Every request succeeds through failover while the board learns.
    for _ in 0..12 {
        let resp = post(&edge, chat("two", false)).await;
        assert_eq!(resp.status(), 200);
    }
    let calls = fake.calls.lock().unwrap().clone();
    let first_calls = calls.iter().filter(|m| *m == "first").count();
    // The failing target is demoted once the board has seen enough of it:
    // later requests go to the healthy target first and never reach it.
    assert!(
        first_calls < 12,
        "the failing target was tried first by every request: {calls:?}"
    );
    assert_eq!(calls.last().map(String::as_str), Some("second"));
    assert_eq!(calls.iter().filter(|m| *m == "second").count(), 12);
}
