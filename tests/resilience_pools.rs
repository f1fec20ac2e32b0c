//! Resilience through a whole in-process gateway (`EdgeNode`, single node:
//! the edge and the egress on one health board) in front of the
//! fixture-replaying mock: key pools that learn (a revoked key, a storming
//! key), retries under a budget, circuit breakers that cut a failing target
//! off, and what answers and metrics say about it. Everything is counted at
//! the mock; nothing here depends on timing.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use switchyard_testkit::metrics::{sample, scrape as metrics};

use common::{
    header, http_client, is_whole_answer, post_chat, start_single_node_edge,
    write_policy_for_test_tenant,
};
use serde_json::json;
use switchyard_edge::node::RunningEdge;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

fn client() -> reqwest::Client {
    http_client(Duration::from_secs(30))
}

async fn start(dir: &Path, policy: &str) -> (RunningEdge, SocketAddr, SocketAddr) {
    start_single_node_edge(write_policy_for_test_tenant(dir, policy, "", "")).await
}

struct Reply {
    status: u16,
    attempts: Option<String>,
    target: Option<String>,
    retry_after: Option<String>,
    body: String,
}

impl Reply {
    async fn read(resp: reqwest::Response) -> Reply {
        Reply {
            status: resp.status().as_u16(),
            attempts: header(&resp, "x-switchyard-attempts"),
            target: header(&resp, "x-switchyard-target"),
            retry_after: header(&resp, "retry-after"),
            body: resp.text().await.unwrap(),
        }
    }
}

async fn chat(http: &reqwest::Client, addr: SocketAddr, model: &str, stream: bool) -> Reply {
    let resp = post_chat(http, addr, TEST_KEY, model, stream)
        .send()
        .await
        .unwrap();
    Reply::read(resp).await
}

fn is_complete(r: &Reply, stream: bool) -> bool {
    is_whole_answer(r.status, &r.body, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_disabled_at_once_and_its_requests_retry_on_the_other_key() {
    let mock = MockUpstream::start().await;
    mock.revoke_key("sk-pool-revoked");
    let dir = temp_dir("res-revoked");
    let (edge, addr, metrics_addr) = start(
        &dir,
        &format!(
            r#"
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    key_pools:
      - name: main
        keys:
          - {{ id: good, value: "sk-pool-good" }}
          - {{ id: revoked, value: "sk-pool-revoked" }}
"#,
            mock.url()
        ),
    )
    .await;
    let http = client();
    const N: usize = 200;
    let mut ok = 0;
    for i in 0..N {
        let stream = i % 2 == 1;
        let r = chat(&http, addr, "openai/gpt-4o-mini", stream).await;
        ok += usize::from(is_complete(&r, stream));
        assert!(!r.body.contains("sk-pool"), "a key leaked: {}", r.body);
    }
    assert_eq!(ok, N, "every request is served by the good key");
    let revoked = mock.count(None, Some("sk-pool-revoked"));
    assert_eq!(revoked, 1, "the revoked key is tried once, then disabled");
    assert_eq!(mock.count(None, Some("sk-pool-good")), N);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(&m, &["switchyard_key_events_total", "disabled"]),
        1.0,
        "{m}"
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storming_primary_is_cut_off_and_the_flaky_fallback_serves_every_request() {
    let mock = MockUpstream::start().await;
    mock.seed(9);
    let dir = temp_dir("res-storm");
    let (edge, addr, metrics_addr) = start(
        &dir,
        &format!(
            r#"
providers:
  storm:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-storm" }} ] }} ]
  steady:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-steady" }} ] }} ]
routes:
  chat:
    targets:
      - {{ provider: storm, model: storm-429 }}
      - {{ provider: steady, model: flaky-6 }}
"#,
            url = mock.url()
        ),
    )
    .await;
    let http = client();
    const N: usize = 400;
    let mut ok = 0;
    let mut served_by_fallback = 0;
    for i in 0..N {
        let stream = i % 2 == 1;
        let r = chat(&http, addr, "chat", stream).await;
        ok += usize::from(is_complete(&r, stream));
        served_by_fallback += usize::from(r.target.as_deref() == Some("steady/flaky-6"));
        assert!(r.attempts.is_some());
    }
    assert_eq!(ok, N, "retries on the fallback absorb its 6 % of failures");
    assert_eq!(served_by_fallback, N);
    let storm_calls = mock.count(Some("storm-429"), None);
    assert!(
        storm_calls * 10 <= N,
        "the storming upstream was called {storm_calls} times for {N} requests"
    );
    let m = metrics(&http, metrics_addr).await;
    assert!(
        sample(
            &m,
            &[
                "switchyard_breaker_transitions_total",
                "provider=\"storm\"",
                "state=\"open\""
            ]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, &["switchyard_retries_total", "provider=\"steady\""]) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, &["switchyard_key_events_total", "cooldown"]) >= 1.0,
        "{m}"
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_never_retried_and_server_errors_only_within_the_budget() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-budget");
    let (edge, addr, metrics_addr) = start(
        &dir,
        &format!(
            r#"
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-budget" }} ] }} ]
routes:
  bad:
    targets: [ {{ provider: openai, model: fail-400 }} ]
  broken:
    targets: [ {{ provider: openai, model: fail-500 }} ]
    retry: {{ attempts: 2, budget_percent: 0, min_retries: 3, backoff_ms: 1 }}
"#,
            mock.url()
        ),
    )
    .await;
    let http = client();
    for _ in 0..10 {
        let r = chat(&http, addr, "bad", false).await;
        assert_eq!(
            (r.status, r.attempts.as_deref()),
            (400, Some("1")),
            "{}",
            r.body
        );
    }
    assert_eq!(
        mock.count(Some("fail-400"), None),
        10,
        "a 400 is never retried"
    );

    // Request 1: one attempt and two retries; request 2: one attempt and
    // the budget's last retry (its second is refused) — five failures in a
    // row eject the target; the rest are answered at once, never sent.
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let r = chat(&http, addr, "broken", false).await;
        attempts.push(r.attempts.clone().unwrap_or_default());
        if attempts.len() > 2 {
            assert_eq!(r.status, 503, "{}", r.body);
            assert!(r.body.contains("circuit_open"), "{}", r.body);
            assert!(r.retry_after.is_some());
        } else {
            assert_eq!(r.status, 502, "{}", r.body);
        }
    }
    assert_eq!(&attempts[..2], ["3", "2"]);
    assert!(attempts[2..].iter().all(|a| a.is_empty()), "{attempts:?}");
    assert_eq!(mock.count(Some("fail-500"), None), 5);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(&m, &["switchyard_retry_budget_exhausted_total"]),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, &["switchyard_retries_total", "provider=\"openai\""]),
        3.0,
        "{m}"
    );
    assert_eq!(sample(&m, &["switchyard_ejected_skips_total"]), 8.0, "{m}");
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn chat_as(
    http: &reqwest::Client,
    addr: SocketAddr,
    model: &str,
    content: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": content}]}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Reply::read(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_send_long_prompts_to_the_long_context_route_and_low_priority_requests_downgrade() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-rules");
    let (edge, addr, metrics_addr) = start(
        &dir,
        &format!(
            r#"
providers:
  storm:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-rules-storm" }} ] }} ]
  openai:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-rules" }} ] }} ]
routes:
  chat:
    rules:
      - when: {{ prompt_tokens_over: 8000 }}
        route: long-context
      - when: {{ tag: batch }}
        route: cheap
    downgrade: {{ route: cheap }}
    targets:
      - {{ provider: storm, model: storm-429 }}
      - {{ provider: openai, model: gpt-4o }}
  long-context:
    targets: [ {{ provider: openai, model: long-model }} ]
  cheap:
    targets: [ {{ provider: openai, model: cheap-model }} ]
"#,
            url = mock.url()
        ),
    )
    .await;
    let http = client();
    let target = |r: &Reply| r.target.clone().unwrap_or_default();
    let low = [("x-switchyard-priority", "low")];

    let r = chat_as(&http, addr, "chat", "hi", &[]).await;
    assert_eq!(
        (r.status, target(&r).as_str()),
        (200, "openai/gpt-4o"),
        "{}",
        r.body
    );
    // ≈ 10,000 estimated tokens: the long-context route; ≈ 5,000: not.
    let long = "lorem ipsum ".repeat(3_400);
    let r = chat_as(&http, addr, "chat", &long, &[]).await;
    assert_eq!(target(&r), "openai/long-model", "{}", r.body);
    let r = chat_as(&http, addr, "chat", &long[..20_000], &[]).await;
    assert_eq!(target(&r), "openai/gpt-4o");
    let r = chat_as(
        &http,
        addr,
        "chat",
        "hi",
        &[("x-switchyard-tags", "a, batch")],
    )
    .await;
    assert_eq!(target(&r), "openai/cheap-model");

    // Primary healthy enough: a non-critical request keeps the chain.
    let r = chat_as(&http, addr, "chat", "hi", &low).await;
    assert_eq!(target(&r), "openai/gpt-4o");
    // The storming primary fails until its breaker opens...
    for _ in 0..6 {
        chat_as(&http, addr, "chat", "hi", &[]).await;
    }
    // ...then non-critical requests are downgraded, critical ones are not.
    let r = chat_as(&http, addr, "chat", "hi", &low).await;
    assert_eq!(target(&r), "openai/cheap-model");
    let r = chat_as(&http, addr, "chat", "hi", &[]).await;
    assert_eq!(target(&r), "openai/gpt-4o");
    assert_eq!(mock.count(Some("long-model"), None), 1);
    assert_eq!(mock.count(Some("cheap-model"), None), 2);

    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(
            &m,
            &["switchyard_rules_matched_total", "to=\"long-context\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, &["switchyard_downgrades_total", "to=\"cheap\""]),
        1.0,
        "{m}"
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_never_sees_a_storming_primary_or_a_revoked_key() {
    let Some(python) = switchyard_testkit::require::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.seed(11);
    mock.revoke_key("sk-sdk-revoked");
    let dir = temp_dir("res-sdk");
    let (edge, addr, _) = start(
        &dir,
        &format!(
            r#"
providers:
  storm:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-sdk-storm" }} ] }} ]
  steady:
    kind: openai
    base_url: "{url}/v1"
    key_pools: [ {{ keys: [ {{ value: "sk-sdk-steady" }} ] }} ]
  pooled:
    kind: openai
    base_url: "{url}/v1"
    key_pools:
      - keys: [ {{ id: revoked, value: "sk-sdk-revoked" }}, {{ id: good, value: "sk-sdk-good" }} ]
routes:
  storm:
    retry: {{ attempts: 4 }}
    targets:
      - {{ provider: storm, model: storm-429 }}
      - {{ provider: steady, model: flaky-6 }}
"#,
            url = mock.url()
        ),
    )
    .await;
    switchyard_testkit::require::pytest(
        python,
        "test_resilience_sdk.py",
        &[
            ("SWITCHYARD_BASE_URL", format!("http://{addr}")),
            ("SWITCHYARD_KEY", TEST_KEY.to_string()),
        ],
    )
    .await;
    assert!(mock.count(None, Some("sk-sdk-revoked")) <= 1);
    assert!(mock.count(Some("storm-429"), None) * 10 <= 120);
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_filter_the_targets_a_request_may_use() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-filter");
    let (edge, addr, metrics_addr) = start(
        &dir,
        &format!(
            r#"
regions:
  eu-west: {{ jurisdiction: eu }}
  us-east: {{ jurisdiction: us }}
providers:
  us:
    kind: openai
    base_url: "{url}/v1"
    region: us-east
    key_pools: [ {{ keys: [ {{ value: "sk-filter-us" }} ] }} ]
  eu:
    kind: openai
    base_url: "{url}/v1"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-filter-eu" }} ] }} ]
routes:
  chat:
    rules:
      - when: {{ tag: eu-only }}
        filter: {{ keep: [ {{ region: eu-west }} ] }}
      - when: {{ tools: true }}
        filter: {{ drop: [ {{ model: no-tools }} ] }}
      - when: {{ tag: nothing }}
        filter: {{ keep: [ {{ provider: eu, model: absent }} ] }}
      - when: {{ prompt_tokens_over: 8000 }}
        route: long-context
    targets:
      - {{ provider: us, model: no-tools }}
      - {{ provider: eu, model: eu-model }}
      - {{ provider: us, model: us-model }}
  long-context:
    targets: [ {{ provider: us, model: long-model }} ]
"#,
            url = mock.url()
        ),
    )
    .await;
    let http = client();
    let target = |r: &Reply| r.target.clone().unwrap_or_default();
    let r = chat_as(&http, addr, "chat", "hi", &[]).await;
    assert_eq!(target(&r), "us/no-tools", "{}", r.body);
    // Only the EU target is left: it serves, though it is second.
    let r = chat_as(
        &http,
        addr,
        "chat",
        "hi",
        &[("x-switchyard-tags", "eu-only")],
    )
    .await;
    assert_eq!(
        (r.status, target(&r).as_str()),
        (200, "eu/eu-model"),
        "{}",
        r.body
    );
    // A request with tools skips the model that cannot call them.
    let resp = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["x-switchyard-target"].to_str().unwrap(),
        "eu/eu-model"
    );
    // A filter that leaves nothing is refused, never widened.
    let r = chat_as(
        &http,
        addr,
        "chat",
        "hi",
        &[("x-switchyard-tags", "nothing")],
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("rule_filtered_all"), "{}", r.body);
    // The issue's example: prompts over 8,000 tokens go to the long-context route.
    let long = "lorem ipsum ".repeat(3_400);
    let r = chat_as(&http, addr, "chat", &long, &[]).await;
    assert_eq!(target(&r), "us/long-model", "{}", r.body);
    assert_eq!(mock.count(Some("absent"), None), 0);
    assert_eq!(mock.count(Some("eu-model"), None), 2);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(&m, &["switchyard_rules_matched_total", "to=\"chat\""]),
        3.0,
        "{m}"
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
