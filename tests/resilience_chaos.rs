//! A bounded, seeded chaos run through a real edge and two egress nodes of
//! one region joined by the QUIC backhaul (in-process builders, real
//! sockets), the fixture-replaying mock as every provider:
//!
//! - `storm`: the primary answers 429 (`retry-after: 1`) to everything, the
//!   fallback fails 6 % of requests at random;
//! - `pooled/...`: one provider, two keys, one of them revoked (401);
//! - `random`: three targets each failing 6 % at random;
//! - `hanging`: the primary never answers; the route's per-attempt
//!   deadline moves on to the fallback;
//! - half-way through, one egress node is shut down.
//!
//! The assertions are counts (requests served, calls the mock saw), never
//! durations. A second test holds residency under the same kind of faults.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    backhaul_edge, header, http_client, install_crypto, is_whole_answer, post_chat,
    start_backhaul_edge, start_egress, write_policy_file, BackhaulCerts,
};
use futures::StreamExt;
use switchyard_backhaul::node::{EgressNode, PolicySource};
use switchyard_backhaul::tunnel::NodeTls;
use switchyard_edge::node::EdgeNode;
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::metrics::scrape as metrics;
use switchyard_testkit::mock::MockUpstream;

const EU_KEY: &str = "sy-test-eu-tenant-key-42";

fn client() -> reqwest::Client {
    http_client(Duration::from_secs(30))
}

fn chaos_policy(dir: &Path, mock: &MockUpstream) -> PathBuf {
    let url = mock.url();
    let provider = |key: &str| {
        format!(
            "    kind: openai\n    base_url: \"{url}/v1\"\n    region: eu\n    key_pools: [ {{ keys: [ {{ value: \"{key}\" }} ] }} ]\n"
        )
    };
    let mut providers = String::new();
    for (name, key) in [
        ("storm", "sk-chaos-storm"),
        ("steady", "sk-chaos-steady"),
        ("a", "sk-chaos-a"),
        ("b", "sk-chaos-b"),
        ("c", "sk-chaos-c"),
        ("slow", "sk-chaos-slow"),
    ] {
        providers.push_str(&format!("  {name}:\n{}", provider(key)));
    }
    let policy = format!(
        r#"
limits: {{ upstream_timeout_ms: 10000, stream_idle_timeout_ms: 5000 }}
regions:
  eu: {{ jurisdiction: eu }}
providers:
{providers}  pooled:
    kind: openai
    base_url: "{url}/v1"
    region: eu
    key_pools:
      - keys:
          - {{ id: good, value: "sk-chaos-good" }}
          - {{ id: revoked, value: "sk-chaos-revoked" }}
routes:
  # Four retries rather than the default three: with 6 % random faults a
  # request then fails with odds under one in a million, so this test does
  # not flake; the benchmark measures the defaults.
  storm:
    retry: {{ attempts: 4 }}
    targets:
      - {{ provider: storm, model: storm-429 }}
      - {{ provider: steady, model: flaky-6 }}
  random:
    retry: {{ attempts: 4 }}
    targets:
      - {{ provider: a, model: flaky-6 }}
      - {{ provider: b, model: flaky-6 }}
      - {{ provider: c, model: flaky-6 }}
  hanging:
    attempt_timeout_ms: 300
    targets:
      - {{ provider: slow, model: hang }}
      - {{ provider: steady, model: gpt-4o-mini }}
tenants:
  - id: test
    key_sha256: "{}"
"#,
        KeyHash::of(TEST_KEY).to_hex()
    );
    write_policy_file(dir, &policy)
}

/// `Err` with what the client saw when the request was not served whole.
async fn served(
    http: &reqwest::Client,
    addr: SocketAddr,
    model: &str,
    stream: bool,
) -> Result<(), String> {
    let resp = post_chat(http, addr, TEST_KEY, model, stream)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let attempts = header(&resp, "x-switchyard-attempts").unwrap_or_else(|| "-".into());
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if is_whole_answer(status, &body, stream) {
        Ok(())
    } else {
        Err(format!("{status} after {attempts} attempt(s): {body}"))
    }
}

/// One round: `per_model` requests to each scenario, eight at a time,
/// streamed and not in turn. Returns the requests that failed, with why.
async fn round(
    http: &reqwest::Client,
    addr: SocketAddr,
    per_model: usize,
) -> Vec<(String, String)> {
    let models = ["storm", "pooled/gpt-4o-mini", "random", "hanging"];
    let jobs: Vec<(String, bool)> = (0..per_model)
        .flat_map(|i| models.iter().map(move |m| (m.to_string(), i % 2 == 1)))
        .collect();
    let results: Vec<(String, Result<(), String>)> = futures::stream::iter(jobs)
        .map(|(model, stream)| async move {
            let r = served(http, addr, &model, stream).await;
            (model, r)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    results
        .into_iter()
        .filter_map(|(m, r)| r.err().map(|e| (m, e)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_storm_revoked_key_random_faults_hanging_target_and_a_killed_egress() {
    install_crypto();
    let mock = MockUpstream::start().await;
    mock.seed(20261129);
    let dir = temp_dir("res-chaos");
    let policy = chaos_policy(&dir, &mock);
    mock.revoke_key("sk-chaos-revoked");
    let certs = BackhaulCerts::generate(&dir, "eu");
    let first = start_egress("eu", certs.egress_tls(), &policy).await;
    let second = start_egress("eu", certs.egress_tls(), &policy).await;
    let edge = start_backhaul_edge(
        "eu",
        certs.edge_tls(),
        &policy,
        &[first.local_addr(), second.local_addr()],
    )
    .await;
    let addr = edge.local_addr().unwrap();
    let http = client();

    const PER_MODEL: usize = 100;
    let failed = round(&http, addr, PER_MODEL).await;
    assert!(failed.is_empty(), "round 1 failures: {failed:?}");

    // One egress goes away between rounds; the edge carries on with the other.
    first.shutdown().await;
    let failed = round(&http, addr, PER_MODEL).await;
    assert!(
        failed.is_empty(),
        "round 2 (one egress down) failures: {failed:?}"
    );

    let requests = 2 * PER_MODEL;
    let storm = mock.count(Some("storm-429"), None);
    assert!(
        storm * 10 <= requests,
        "the storming upstream saw {storm} of {requests} requests"
    );
    // Each egress keeps its own key board: the revoked key is met at most
    // once per egress node.
    let revoked = mock.count(None, Some("sk-chaos-revoked"));
    assert!(revoked <= 2, "the revoked key was used {revoked} times");
    assert_eq!(mock.count(None, Some("sk-chaos-good")), requests);
    // Breakers cut the hanging target off after a few timeouts.
    let hung = mock.count(Some("hang"), None);
    assert!(
        hung * 10 <= requests,
        "the hanging target saw {hung} requests"
    );

    edge.shutdown().await;
    second.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_holds_while_every_permitted_target_fails() {
    install_crypto();
    let mock = MockUpstream::start().await;
    mock.seed(7);
    let dir = temp_dir("res-residency");
    let url = mock.url();
    let policy = format!(
        r#"
regions:
  eu-west: {{ jurisdiction: eu }}
  us-east: {{ jurisdiction: us }}
providers:
  eu-storm:
    kind: openai
    base_url: "{url}/v1"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-res-eu1" }} ] }} ]
  eu-flaky:
    kind: openai
    base_url: "{url}/v1"
    region: eu-west
    key_pools: [ {{ keys: [ {{ value: "sk-res-eu2" }} ] }} ]
  us-steady:
    kind: openai
    base_url: "{url}/v1"
    region: us-east
    key_pools: [ {{ keys: [ {{ value: "sk-res-us" }} ] }} ]
routes:
  chat:
    retry: {{ attempts: 3, budget_percent: 100 }}
    targets:
      - {{ provider: eu-storm, model: storm-429 }}
      - {{ provider: us-steady, model: us-model }}
      - {{ provider: eu-flaky, model: flaky-50 }}
tenants:
  - id: eu-tenant
    key_sha256: "{}"
    residency: [eu]
  - id: anywhere
    key_sha256: "{}"
"#,
        KeyHash::of(EU_KEY).to_hex(),
        KeyHash::of(TEST_KEY).to_hex(),
    );
    let policy = write_policy_file(&dir, &policy);
    let edge = EdgeNode::single_node()
        .policy(PolicySource::File(policy))
        .listen("127.0.0.1:0")
        .start()
        .await
        .expect("edge starts");
    let addr = edge.local_addr().unwrap();
    let http = client();
    let send = |key: &'static str, stream: bool| {
        let http = http.clone();
        async move {
            let resp = post_chat(&http, addr, key, "chat", stream)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let jurisdiction = header(&resp, "x-switchyard-jurisdiction");
            let target = header(&resp, "x-switchyard-target");
            let body = resp.text().await.unwrap();
            (status, jurisdiction, target, body)
        }
    };
    let mut served = 0;
    let mut refused = 0;
    for i in 0..120 {
        let (status, jurisdiction, target, body) = send(EU_KEY, i % 2 == 1).await;
        match status {
            200 => {
                served += 1;
                assert_eq!(jurisdiction.as_deref(), Some("eu"), "{body}");
                assert_eq!(target.as_deref(), Some("eu-flaky/flaky-50"));
            }
            // Every EU target failed: refused naming the rule, or cut off.
            403 => {
                refused += 1;
                assert!(body.contains("residency_blocked"), "{body}");
            }
            503 => assert!(body.contains("circuit_open"), "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(served > 0 && refused + served <= 120);
    assert_eq!(
        mock.count(Some("us-model"), None),
        0,
        "no retry, failover or probe left the EU"
    );
    // The same route does fail over to the US for a tenant allowed there.
    for _ in 0..20 {
        let (status, _, _, body) = send(TEST_KEY, false).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(mock.count(Some("us-model"), None) > 0);
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_egress_shows_its_key_pools_on_its_admin_metrics() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-egress-metrics");
    let policy = chaos_policy(&dir, &mock);
    mock.revoke_key("sk-chaos-revoked");
    let certs = BackhaulCerts::generate(&dir, "eu");
    let egress = EgressNode::new("eu", certs.egress_tls())
        .policy(PolicySource::File(policy.clone()))
        .admin("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("egress starts");
    let admin = egress.admin_addr().expect("admin listener");
    let edge = start_backhaul_edge("eu", certs.edge_tls(), &policy, &[egress.local_addr()]).await;
    let addr = edge.local_addr().unwrap();
    let http = client();
    for i in 0..6 {
        served(&http, addr, "pooled/gpt-4o-mini", i % 2 == 1)
            .await
            .unwrap();
    }
    // The storming target: its key is cooled down by the 429s.
    for _ in 0..3 {
        let _ = served(&http, addr, "storm/storm-429", false).await;
    }
    let page = metrics(&http, admin).await;
    let value = |fragments: &[&str]| -> f64 {
        page.lines()
            .filter(|l| !l.starts_with('#'))
            .find(|l| fragments.iter().all(|f| l.contains(f)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(
        value(&["switchyard_key_events_total", "event=\"disabled\""]),
        1.0,
        "{page}"
    );
    assert!(value(&["switchyard_key_events_total", "event=\"cooldown\""]) >= 1.0);
    assert_eq!(
        value(&[
            "switchyard_key_state",
            "key=\"revoked\"",
            "state=\"disabled\""
        ]),
        1.0
    );
    assert_eq!(
        value(&["switchyard_key_state", "key=\"good\"", "state=\"ok\""]),
        1.0
    );
    assert_eq!(value(&["switchyard_key_in_flight", "key=\"good\""]), 0.0);
    assert_eq!(value(&["switchyard_key_error_rate", "key=\"good\""]), 0.0);
    assert!(value(&["switchyard_key_error_rate", "key=\"revoked\""]) > 0.0);
    assert!(!page.contains("sk-chaos"), "a key value leaked: {page}");
    edge.shutdown().await;
    egress.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An egress that takes every request and then resets its stream: a
/// transport failure on every request, never a provider error. Returns
/// its address and how many streams it took.
async fn stream_resetting_egress(
    tls: NodeTls,
) -> (
    quinn::Endpoint,
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let config = tls
        .server_config(std::sync::Arc::new(|| vec!["eu".to_string()]), 64)
        .unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (ep, count) = (endpoint.clone(), taken.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // It speaks the protocol up to READY, so the edge uses it.
                let Ok(mut control) = conn.open_uni().await else {
                    return;
                };
                if control
                    .write_all(&switchyard_backhaul::tunnel::frame::READY)
                    .await
                    .is_err()
                {
                    return;
                }
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = recv.read_to_end(1 << 20).await;
                        let _ = send.reset(0u32.into());
                    });
                }
            });
        }
    });
    (endpoint, addr, taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_whose_streams_keep_failing_is_ejected_for_the_regions_other_egress() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-egress-breaker");
    let policy = chaos_policy(&dir, &mock);
    let certs = BackhaulCerts::generate(&dir, "eu");
    let good = start_egress("eu", certs.egress_tls(), &policy).await;
    let (bad, bad_addr, taken) = stream_resetting_egress(certs.egress_tls()).await;
    let edge = backhaul_edge(
        "eu",
        certs.edge_tls(),
        &policy,
        &[good.local_addr(), bad_addr],
    )
    .metrics("127.0.0.1:0")
    .start()
    .await
    .expect("edge starts");
    let addr = edge.local_addr().unwrap();
    let metrics_addr = edge.metrics_addr().unwrap();
    let http = client();
    const N: usize = 200;
    let results: Vec<Result<(), String>> = futures::stream::iter(0..N)
        .map(|i| {
            let http = http.clone();
            async move { served(&http, addr, "steady/gpt-4o-mini", i % 2 == 1).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let taken = taken.load(std::sync::atomic::Ordering::SeqCst);
    println!("{failed} of {N} failed; the resetting egress took {taken} streams");
    assert!(
        taken >= switchyard_proto::health::EJECT_CONSECUTIVE as usize,
        "the failing egress was tried ({taken})"
    );
    // Without a breaker about half would fail; with it, the failures that
    // open it, the requests already on their way and a few probes.
    assert!(failed <= 25, "{failed} of {N} failed");
    assert_eq!(mock.count(Some("gpt-4o-mini"), None), N - failed);
    let page = metrics(&http, metrics_addr).await;
    let line = page.lines().find(|l| {
        l.starts_with("switchyard_backhaul_ejected") && l.contains(&bad_addr.to_string())
    });
    assert!(line.is_some_and(|l| l.ends_with(" 1")), "{page}");
    assert!(!page
        .lines()
        .any(|l| l.starts_with("switchyard_backhaul_ejected")
            && l.contains(&good.local_addr().to_string())));
    edge.shutdown().await;
    good.shutdown().await;
    bad.close(0u32.into(), b"done");
    let _ = std::fs::remove_dir_all(&dir);
}
