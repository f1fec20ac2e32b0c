//! Tenant and virtual-key limits through real edges (`EdgeNode`, in
//! process, on port 0) and the simulated provider: rpm, tpm, concurrency
//! and budgets answered with 429s in the caller's protocol and OpenAI's
//! rate-limit headers; counters shared by two edges through a real Redis,
//! and what each tenant's fail-open/fail-closed choice does when it stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_backhaul::node::PolicySource;
use switchyard_edge::node::{EdgeNode, RunningEdge};
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::redis::RedisServer;

pub const RPM_KEY: &str = "sy-test-rpm-tenant-key";
pub const TPM_KEY: &str = "sy-test-tpm-tenant-key";
pub const CONC_KEY: &str = "sy-test-concurrency-key";
pub const BUDGET_KEY: &str = "sy-test-budget-tenant-key";
pub const OPEN_KEY: &str = "sy-test-fail-open-key";
pub const CLOSED_KEY: &str = "sy-test-fail-closed-key";

fn policy() -> String {
    let h = |k: &str| KeyHash::of(k).to_hex();
    format!(
        r#"
providers:
  sim:
    kind: simulated
    models: [small]
    pricing:
      small: {{ input: 1000, output: 1000 }}
    simulated: {{ ttft_ms: 0, tokens_per_second: 100000, output_tokens: 24 }}
tenants:
  - id: rpm
    key_sha256: "{}"
    limits: {{ rpm: 3 }}
  - id: tpm
    key_sha256: "{}"
    limits: {{ tpm: 100 }}
  - id: conc
    key_sha256: "{}"
    limits: {{ concurrency: 1 }}
  - id: budget
    key_sha256: "{}"
    budget: {{ daily_usd: 0.05, warn_at: 0.5 }}
  - id: open
    key_sha256: "{}"
    limits: {{ rpm: 1000 }}
  - id: closed
    key_sha256: "{}"
    limits: {{ rpm: 1000, on_counter_error: closed }}
"#,
        h(RPM_KEY),
        h(TPM_KEY),
        h(CONC_KEY),
        h(BUDGET_KEY),
        h(OPEN_KEY),
        h(CLOSED_KEY),
    )
}

pub fn write_policy(text: &str) -> PathBuf {
    let dir = temp_dir("tenants");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn edge(policy: &Path, redis: Option<&str>) -> RunningEdge {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut node = EdgeNode::single_node()
        .policy(PolicySource::File(policy.to_path_buf()))
        .listen("127.0.0.1:0")
        .metrics("127.0.0.1:0")
        .simulate_header(true);
    if let Some(url) = redis {
        node = node.redis(url);
    }
    node.start().await.expect("edge starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub async fn chat(addr: SocketAddr, key: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "sim/small", "messages": [{"role": "user", "content": "hello there"}]}));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Limits count per UTC minute: a sequence that must fall in one minute
/// starts early in one (waits at most 15 s).
pub async fn fresh_minute() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let into = now % 60_000;
    if into > 45_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into + 50)).await;
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn rpm_refuses_the_fourth_request_with_openai_headers_in_each_protocol() {
    let policy = write_policy(&policy());
    fresh_minute().await;
    let edge = edge(&policy, None).await;
    let addr = edge.local_addr().unwrap();
    for left in ["2", "1", "0"] {
        let r = chat(addr, RPM_KEY, &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests").as_deref(),
            Some(left)
        );
        assert!(header(&r, "x-ratelimit-reset-requests").is_some());
    }
    let r = chat(addr, RPM_KEY, &[]).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(
        header(&r, "x-ratelimit-limit-requests").as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 requests per minute"));

    // The Anthropic endpoint is refused in Anthropic's shape.
    let r = client()
        .post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", RPM_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "sim/small", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let metrics = client()
        .get(format!("http://{}/metrics", edge.metrics_addr().unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_limit_rejections_total{limit=\"requests\"} 2"),
        "{metrics}"
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn tpm_counts_the_real_usage_after_the_estimate() {
    let policy = write_policy(&policy());
    fresh_minute().await;
    let edge = edge(&policy, None).await;
    let addr = edge.local_addr().unwrap();
    // The estimate (a few tokens for this body) leaves most of the 100
    // tokens; the real usage (prompt + 24 completion tokens) is counted
    // once the request is recorded, so the minute runs out after a few.
    let first = chat(addr, TPM_KEY, &[]).await;
    assert_eq!(first.status(), 200);
    let estimate_left: i64 = header(&first, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        estimate_left > 80,
        "only the estimate is taken up front: {estimate_left}"
    );
    let mut refused = None;
    let mut served = 1;
    for _ in 0..20 {
        let r = chat(addr, TPM_KEY, &[]).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        served += 1;
    }
    let refused = refused.expect("the token limit is reached");
    // Each answer has 24 completion tokens: 100 tokens allow at most 4.
    assert!(served <= 4, "{served} requests fit in 100 tokens");
    assert_eq!(
        header(&refused, "x-ratelimit-limit-tokens").as_deref(),
        Some("100")
    );
    assert!(header(&refused, "x-ratelimit-reset-tokens").is_some());
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("100 tokens per minute"));
    edge.shutdown().await;
}

#[tokio::test]
async fn concurrency_limit_holds_while_a_request_is_in_flight() {
    let policy = write_policy(&policy());
    let edge = edge(&policy, None).await;
    let addr = edge.local_addr().unwrap();
    // A slow request holds the tenant's only slot...
    let slow_request = move || {
        tokio::spawn(chat(
            addr,
            CONC_KEY,
            &[("x-switchyard-simulate", "ttft_ms=3000")],
        ))
    };
    let mut slow = slow_request();
    let mut refused = false;
    for _ in 0..200 {
        if slow.is_finished() {
            // On a loaded machine a probe below can take the slot before
            // the slow request is admitted: then the slow one was the
            // refused one, and it is sent again.
            let r = (&mut slow).await.unwrap();
            if r.status() != 429 {
                break;
            }
            slow = slow_request();
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let r = chat(addr, CONC_KEY, &[]).await;
        if r.status() == 429 {
            let body: Value = r.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("at most 1 at once"),
                "{body}"
            );
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "a second request is refused while the first is in flight"
    );
    assert_eq!(slow.await.unwrap().status(), 200);
    // ...and gives it back when it ends (record runs after the answer).
    let mut ok = false;
    for _ in 0..100 {
        if chat(addr, CONC_KEY, &[]).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "the slot came back");
    edge.shutdown().await;
}

#[tokio::test]
async fn budget_warns_past_its_soft_threshold_then_refuses_with_insufficient_quota() {
    let policy = write_policy(&policy());
    let edge = edge(&policy, None).await;
    let addr = edge.local_addr().unwrap();
    // Each answer costs (prompt + 24 tokens) × $1000/M ≈ $0.03; the daily
    // budget is $0.05 with a warning from half of it.
    let mut warned = false;
    let mut refused = None;
    for _ in 0..20 {
        let r = chat(addr, BUDGET_KEY, &[]).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        warned |= header(&r, "x-switchyard-budget-warning").is_some_and(|w| w.contains("daily"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(warned, "a warning header before the budget is spent");
    let r = refused.expect("the budget runs out");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("$0.05"),
        "{body}"
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn two_edges_share_counters_through_redis_and_each_tenant_chooses_what_an_outage_does() {
    if !switchyard_testkit::require::redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let policy = write_policy(&policy());
    let a = edge(&policy, Some(&redis.url())).await;
    let b = edge(&policy, Some(&redis.url())).await;
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    fresh_minute().await;
    // rpm 3 across both edges: alternating, exactly 3 of 8 get through.
    let mut ok = 0;
    for i in 0..8 {
        let addr = if i % 2 == 0 { a_addr } else { b_addr };
        let r = chat(addr, RPM_KEY, &[]).await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    assert_eq!(ok, 3, "the limit holds across edges");

    // Redis goes away: `open` tenants are served (counted locally),
    // `closed` ones refused with a 503 that says why.
    redis.stop();
    let r = chat(a_addr, OPEN_KEY, &[]).await;
    assert_eq!(r.status(), 200);
    let r = chat(b_addr, CLOSED_KEY, &[]).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn official_sdks_raise_rate_limit_errors() {
    let Some(python) = switchyard_testkit::require::sdk_python() else {
        return;
    };
    let policy = write_policy(&policy());
    let edge = edge(&policy, None).await;
    let addr = edge.local_addr().unwrap();
    fresh_minute().await;
    switchyard_testkit::require::pytest(
        python,
        "test_tenants_sdk.py",
        &[
            ("SWITCHYARD_BASE_URL", format!("http://{addr}")),
            ("SWITCHYARD_RPM_KEY", RPM_KEY.to_string()),
            ("SWITCHYARD_BUDGET_KEY", BUDGET_KEY.to_string()),
        ],
    )
    .await;
    edge.shutdown().await;
}

/// The sliding minute in the Redis script: 30 requests in the last second
/// of a minute and 30 in the first second of the next admit 31, not 60, as
/// the in-memory counters do; the refusal says when the next one fits.
#[tokio::test]
async fn with_redis_a_burst_across_a_minute_boundary_cannot_reach_twice_the_rpm() {
    use switchyard_edge::limits::{checks_at, Decision, RedisLink, SharedCounters};
    if !switchyard_testkit::require::redis() {
        return;
    }
    let mut redis = RedisServer::start();
    let shared = SharedCounters::new(RedisLink::new(&redis.url(), Duration::from_secs(5)).unwrap());
    let limits = switchyard_proto::LimitSet {
        rpm: Some(30),
        ..Default::default()
    };
    // Counters are keyed by minute number; their lifetime runs on Redis's
    // clock, so any boundary works.
    let boundary = 29_932_500 * 60_000u64;
    let owner = format!("t:burst-{}", std::process::id());
    let mut admitted = [0, 0];
    let mut retry = None;
    for (i, at) in [boundary - 1000, boundary + 1000].into_iter().enumerate() {
        for _ in 0..30 {
            match shared
                .acquire(&checks_at(&owner, &limits, at))
                .await
                .unwrap()
            {
                Decision::Admitted { .. } => admitted[i] += 1,
                Decision::Refused { retry_ms, .. } => retry = Some(retry_ms),
            }
        }
    }
    println!("rpm 30 across a minute boundary through Redis: admitted {admitted:?}");
    assert_eq!(admitted, [30, 1], "fixed windows admitted [30, 30]");
    assert_eq!(retry, Some(1000));
    let later = boundary + 2000;
    assert!(matches!(
        shared
            .acquire(&checks_at(&owner, &limits, later))
            .await
            .unwrap(),
        Decision::Admitted { .. }
    ));
    redis.stop();
}
