//! Hedged requests through a whole in-process gateway in front of the
//! mock upstream, whose `slow-<ms>` directive makes a primary slow and
//! counts the requests the gateway cut while they waited:
//!
//! - a slow primary is beaten by the hedge on the next target, plain and
//!   streamed, and the loser is cancelled at the provider — in one process
//!   and across the QUIC backhaul (the egress drops the provider call when
//!   the edge drops the stream);
//! - a route without `hedge` makes no second attempt;
//! - a spent tenant hedge budget (or a zero one) starts no hedge;
//! - a hedge stays inside the request's jurisdictions.
//!
//! Assertions are counts at the mock and in the answers, never durations;
//! waits for the far end to notice a cancellation are bounded polls.

mod common;

use std::net::SocketAddr;
use std::time::Duration;
use switchyard_testkit::metrics::{sample, scrape as metrics};

use common::{
    header, http_client, install_crypto, is_whole_answer, post_chat, start_backhaul_edge,
    start_egress, start_single_node_edge, write_policy_for_test_tenant, BackhaulCerts,
};
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

const EU_KEY: &str = "sy-test-eu-hedge-tenant-key";

fn client() -> reqwest::Client {
    http_client(Duration::from_secs(60))
}

fn providers(mock: &MockUpstream, names: &[(&str, Option<&str>)]) -> String {
    let mut out = String::from("providers:\n");
    for (name, region) in names {
        out.push_str(&format!(
            "  {name}:\n    kind: openai\n    base_url: \"{}/v1\"\n{}    key_pools: [ {{ keys: [ {{ value: \"sk-hedge-{name}\" }} ] }} ]\n",
            mock.url(),
            region.map_or(String::new(), |r| format!("    region: {r}\n")),
        ));
    }
    out
}

struct Reply {
    status: u16,
    attempts: String,
    target: String,
    body: String,
}

impl Reply {
    fn complete(&self, stream: bool) -> bool {
        is_whole_answer(self.status, &self.body, stream)
    }
}

async fn chat(
    http: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    model: &str,
    stream: bool,
) -> Reply {
    let resp = post_chat(http, addr, key, model, stream)
        .send()
        .await
        .unwrap();
    // "-" for an absent header, so the assertions compare plain strings.
    let shown = |n: &str| header(&resp, n).unwrap_or_else(|| "-".into());
    let (status, attempts, target) = (
        resp.status().as_u16(),
        shown("x-switchyard-attempts"),
        shown("x-switchyard-target"),
    );
    let body = resp.text().await.unwrap();
    Reply {
        status,
        attempts,
        target,
        body,
    }
}

/// Polls (bounded) until the mock has counted `n` cancellations.
async fn cancellations_reach(mock: &MockUpstream, n: usize) -> usize {
    for _ in 0..400 {
        if mock.cancellations() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    mock.cancellations()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_primary_is_beaten_by_the_hedge_and_the_loser_is_cancelled() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-hedge-win");
    let body = format!(
        "{}routes:\n  chat:\n    hedge: {{ delay_ms: 100 }}\n    targets:\n      - {{ provider: slow, model: slow-60000 }}\n      - {{ provider: fast, model: gpt-4o-mini }}\n",
        providers(&mock, &[("slow", None), ("fast", None)])
    );
    let (edge, addr, metrics_addr) = start_single_node_edge(write_policy_for_test_tenant(
        &dir,
        &body,
        "    hedge_budget_percent: 100\n",
        "",
    ))
    .await;
    let http = client();
    for (n, stream) in [false, true].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let r = chat(&http, addr, TEST_KEY, "chat", stream).await;
        println!(
            "hedged {} answer in {:?}",
            if stream { "streamed" } else { "plain" },
            started.elapsed()
        );
        assert!(r.complete(stream), "{} {}", r.status, r.body);
        assert_eq!(r.target, "fast/gpt-4o-mini", "the hedge won");
        assert_eq!(r.attempts, "2", "both attempts are counted");
        // The primary's call is cut, not left running for a minute.
        assert_eq!(cancellations_reach(&mock, n + 1).await, n + 1);
    }
    assert_eq!(mock.count(Some("slow-60000"), None), 2);
    assert_eq!(mock.count(Some("gpt-4o-mini"), None), 2);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(&m, &["switchyard_hedges_total", "started"]),
        2.0,
        "{m}"
    );
    assert_eq!(sample(&m, &["switchyard_hedges_total", "won_hedge"]), 2.0);
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_primary_and_a_route_without_hedge_make_no_second_attempt() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-hedge-off");
    let body = format!(
        "{}routes:\n  plain:\n    targets:\n      - {{ provider: slow, model: slow-400 }}\n      - {{ provider: fast, model: gpt-4o-mini }}\n  quick:\n    hedge: {{ delay_ms: 5000 }}\n    targets:\n      - {{ provider: slow, model: slow-1 }}\n      - {{ provider: fast, model: gpt-4o-mini }}\n",
        providers(&mock, &[("slow", None), ("fast", None)])
    );
    let (edge, addr, metrics_addr) =
        start_single_node_edge(write_policy_for_test_tenant(&dir, &body, "", "")).await;
    let http = client();
    for stream in [false, true] {
        for route in ["plain", "quick"] {
            let r = chat(&http, addr, TEST_KEY, route, stream).await;
            assert!(r.complete(stream), "{} {}", r.status, r.body);
            assert!(r.target.starts_with("slow/"), "{}", r.target);
            assert_eq!(r.attempts, "1");
        }
    }
    assert_eq!(mock.count(Some("gpt-4o-mini"), None), 0, "never hedged");
    assert_eq!(mock.cancellations(), 0);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(sample(&m, &["switchyard_hedges_total", "started"]), 0.0);
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_hedge_budget_starts_no_hedge() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-hedge-budget");
    let body = format!(
        "{}routes:\n  chat:\n    hedge: {{ delay_ms: 30 }}\n    targets:\n      - {{ provider: slow, model: slow-300 }}\n      - {{ provider: fast, model: gpt-4o-mini }}\n",
        providers(&mock, &[("slow", None), ("fast", None)])
    );
    // 10 % of a handful of requests rounds to nothing: only the floor of
    // one hedge per window is left.
    let (edge, addr, metrics_addr) = start_single_node_edge(write_policy_for_test_tenant(
        &dir,
        &body,
        "    hedge_budget_percent: 10\n",
        &format!(
            "  - id: frugal\n    key_sha256: \"{}\"\n    hedge_budget_percent: 0\n",
            KeyHash::of(EU_KEY).to_hex()
        ),
    ))
    .await;
    let http = client();
    const N: usize = 5;
    let mut hedged = 0;
    for i in 0..N {
        let r = chat(&http, addr, TEST_KEY, "chat", i % 2 == 1).await;
        assert!(r.complete(i % 2 == 1), "{} {}", r.status, r.body);
        hedged += usize::from(r.attempts == "2");
    }
    assert_eq!(hedged, 1, "one hedge, then the budget is spent");
    assert_eq!(mock.count(Some("gpt-4o-mini"), None), 1);
    // A tenant whose budget is zero never hedges.
    for _ in 0..3 {
        let r = chat(&http, addr, EU_KEY, "chat", false).await;
        assert!(r.complete(false), "{} {}", r.status, r.body);
        assert_eq!(
            (r.attempts.as_str(), r.target.as_str()),
            ("1", "slow/slow-300")
        );
    }
    assert_eq!(mock.count(Some("gpt-4o-mini"), None), 1);
    let m = metrics(&http, metrics_addr).await;
    assert_eq!(
        sample(&m, &["switchyard_hedges_total", "started"]),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, &["switchyard_hedges_total", "budget_refused"]),
        (N - 1) as f64
    );
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_stays_inside_the_requests_jurisdictions() {
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-hedge-residency");
    let body = format!(
        "regions:\n  eu-west: {{ jurisdiction: eu }}\n  us-east: {{ jurisdiction: us }}\n{}routes:\n  chat:\n    hedge: {{ delay_ms: 50 }}\n    targets:\n      - {{ provider: eu-slow, model: slow-1500 }}\n      - {{ provider: us-fast, model: us-model }}\n      - {{ provider: eu-fast, model: gpt-4o-mini }}\n",
        providers(
            &mock,
            &[("eu-slow", Some("eu-west")), ("us-fast", Some("us-east")), ("eu-fast", Some("eu-west"))]
        )
    );
    let policy = write_policy_for_test_tenant(
        &dir,
        &body,
        "    hedge_budget_percent: 100\n",
        &format!(
            "  - id: eu-tenant\n    key_sha256: \"{}\"\n    residency: [eu]\n    hedge_budget_percent: 100\n",
            KeyHash::of(EU_KEY).to_hex()
        ),
    );
    let (edge, addr, _) = start_single_node_edge(policy).await;
    let http = client();
    for i in 0..4 {
        let r = chat(&http, addr, EU_KEY, "chat", i % 2 == 1).await;
        assert!(r.complete(i % 2 == 1), "{} {}", r.status, r.body);
        assert_eq!(r.target, "eu-fast/gpt-4o-mini", "hedged inside the EU");
        assert_eq!(r.attempts, "2");
    }
    assert_eq!(
        mock.count(Some("us-model"), None),
        0,
        "no hedge left the EU"
    );
    // The same route hedges to the US for a tenant allowed there.
    let r = chat(&http, addr, TEST_KEY, "chat", false).await;
    assert!(r.complete(false));
    assert_eq!(r.target, "us-fast/us-model");
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_the_backhaul_the_egress_cancels_the_losing_provider_call() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-hedge-backhaul");
    let body = format!(
        "regions:\n  eu: {{ jurisdiction: eu }}\n{}routes:\n  chat:\n    hedge: {{ delay_ms: 100 }}\n    targets:\n      - {{ provider: slow, model: slow-60000 }}\n      - {{ provider: fast, model: gpt-4o-mini }}\n",
        providers(&mock, &[("slow", Some("eu")), ("fast", Some("eu"))])
    );
    let policy = write_policy_for_test_tenant(&dir, &body, "    hedge_budget_percent: 100\n", "");
    let certs = BackhaulCerts::generate(&dir, "eu");
    let egress = start_egress("eu", certs.egress_tls(), &policy).await;
    let edge = start_backhaul_edge("eu", certs.edge_tls(), &policy, &[egress.local_addr()]).await;
    let addr = edge.local_addr().unwrap();
    let http = client();
    for (n, stream) in [false, true].into_iter().enumerate() {
        let r = chat(&http, addr, TEST_KEY, "chat", stream).await;
        assert!(r.complete(stream), "{} {}", r.status, r.body);
        assert_eq!(
            (r.attempts.as_str(), r.target.as_str()),
            ("2", "fast/gpt-4o-mini")
        );
        assert_eq!(
            cancellations_reach(&mock, n + 1).await,
            n + 1,
            "the egress cut the losing provider call"
        );
    }
    edge.shutdown().await;
    egress.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
