//! The exact-match response cache through a real edge (`EdgeNode`, in
//! process) in front of the fixture-replaying mock provider: a second
//! identical request is answered without reaching the provider, a stream
//! replays as the same SSE frames, tenants never share entries, and a
//! request that did not opt in never touches the cache.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard_backhaul::node::PolicySource;
use switchyard_edge::node::{EdgeNode, RunningEdge};
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::mock::MockUpstream;

const A: &str = "sy-test-cache-tenant-a";
const B: &str = "sy-test-cache-tenant-b";

async fn edge(mock: &MockUpstream) -> RunningEdge {
    edge_with(mock, None).await
}

async fn edge_with(mock: &MockUpstream, redis: Option<&str>) -> RunningEdge {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("cache");
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    models: [gpt-4o-mini]
    key_pools:
      - keys: [ {{ value: "sk-test-cache" }} ]
tenants:
  - id: a
    key_sha256: "{}"
  - id: b
    key_sha256: "{}"
"#,
            mock.url(),
            KeyHash::of(A).to_hex(),
            KeyHash::of(B).to_hex()
        ),
    )
    .unwrap();
    let mut node = EdgeNode::single_node()
        .policy(PolicySource::File(path))
        .listen("127.0.0.1:0")
        .metrics("127.0.0.1:0");
    if let Some(url) = redis {
        node = node.redis(url);
    }
    node.start().await.expect("edge starts")
}

async fn ask(
    edge: &RunningEdge,
    key: &str,
    stream: bool,
    cache: bool,
) -> (u16, Option<String>, String) {
    let mut req = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/chat/completions",
            edge.local_addr().unwrap()
        ))
        .bearer_auth(key)
        .timeout(Duration::from_secs(20))
        .json(
            &json!({"model": "openai/gpt-4o-mini", "stream": stream, "temperature": 0,
                      "messages": [{"role": "user", "content": "hi"}]}),
        );
    if cache {
        req = req.header("x-switchyard-cache", "use");
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let header = r
        .headers()
        .get("x-switchyard-cache")
        .map(|v| v.to_str().unwrap().to_string());
    (status, header, r.text().await.unwrap())
}

/// Waits (bounded) until the edge holds `n` answers: the tee stores an
/// answer once it is written, which may be after the client has it.
async fn cached(edge: &RunningEdge, n: u64) {
    for _ in 0..500 {
        if edge.cached_answers() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the cache never held {n} answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_are_served_from_the_cache_per_tenant() {
    let mock = MockUpstream::start().await;
    let edge = edge(&mock).await;

    let (s, h, first) = ask(&edge, A, false, true).await;
    assert_eq!((s, h.as_deref()), (200, Some("miss")));
    cached(&edge, 1).await;
    let (s, h, second) = ask(&edge, A, false, true).await;
    assert_eq!((s, h.as_deref()), (200, Some("hit")));
    assert_eq!(first, second);
    assert_eq!(
        mock.requests().len(),
        1,
        "the hit never reached the provider"
    );
    let v: Value = serde_json::from_str(&second).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");

    // Another tenant with the same request: its own miss.
    let (_, h, _) = ask(&edge, B, false, true).await;
    assert_eq!(h.as_deref(), Some("miss"));
    assert_eq!(mock.requests().len(), 2);
    // Without opting in: no cache at all.
    let (s, h, _) = ask(&edge, A, false, false).await;
    assert_eq!((s, h), (200, None));
    assert_eq!(mock.requests().len(), 3);

    // A stream replays as the same SSE frames, ending with [DONE].
    let (_, h, first) = ask(&edge, A, true, true).await;
    assert_eq!(h.as_deref(), Some("miss"));
    cached(&edge, 3).await;
    let (s, h, replay) = ask(&edge, A, true, true).await;
    assert_eq!((s, h.as_deref()), (200, Some("hit")));
    assert_eq!(first, replay);
    assert!(replay.trim_end().ends_with("data: [DONE]"), "{replay}");
    assert_eq!(mock.requests().len(), 4);
    let metrics = reqwest::get(format!("http://{}/metrics", edge.metrics_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_cache_lookups_total{result=\"hit\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_cache_lookups_total{result=\"miss\"} 3"),
        "{metrics}"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_sharing_a_redis_share_the_cache() {
    if !switchyard_testkit::require::redis() {
        return;
    }
    let redis = switchyard_testkit::redis::RedisServer::start();
    let mock = MockUpstream::start().await;
    let a = edge_with(&mock, Some(&redis.url())).await;
    let b = edge_with(&mock, Some(&redis.url())).await;
    let (_, h, first) = ask(&a, A, false, true).await;
    assert_eq!(h.as_deref(), Some("miss"));
    // Stored in Redis off the request path: wait (bounded) until it is.
    for _ in 0..500 {
        if redis.dbsize().unwrap_or(0) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, h, second) = ask(&b, A, false, true).await;
    assert_eq!(
        (s, h.as_deref()),
        (200, Some("hit")),
        "the other edge serves it"
    );
    assert_eq!(first, second);
    assert_eq!(mock.requests().len(), 1);
    // Another tenant still misses, even across edges.
    let (_, h, _) = ask(&b, B, false, true).await;
    assert_eq!(h.as_deref(), Some("miss"));
    a.shutdown().await;
    b.shutdown().await;
}
