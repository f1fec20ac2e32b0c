//! End to end through the library builders, in this process: `EdgeNode`
//! and `EgressNode` on port 0 (their handles report the real ports), the
//! fixture-replaying mock as the provider, a real QUIC backhaul with
//! generated certificates, and `shutdown()` that frees every port.

mod common;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    http_client, install_crypto, post_chat, start_backhaul_edge, start_egress, write_policy_file,
    BackhaulCerts,
};
use futures::StreamExt;
use serde_json::Value;
use switchyard_backhaul::node::{NodeError, PolicySource};
use switchyard_edge::node::EdgeNode;
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

/// Only ever in the policy file given to the egress side.
const PROVIDER_KEY: &str = "sk-test-INPROCESS-3f2e1d0c";

fn client() -> reqwest::Client {
    http_client(Duration::from_secs(20))
}

/// Provider `openai` (the mock) in region `eu`, its key inline, and the
/// tenant of [`TEST_KEY`].
fn write_policy(dir: &Path, mock: &MockUpstream) -> PathBuf {
    let policy = format!(
        r#"
limits: {{ upstream_timeout_ms: 4000, stream_idle_timeout_ms: 3000 }}
regions:
  eu: {{ jurisdiction: eu }}
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    region: eu
    key_pools:
      - keys: [ {{ value: "{PROVIDER_KEY}" }} ]
tenants:
  - id: test
    key_sha256: "{}"
"#,
        mock.url(),
        KeyHash::of(TEST_KEY).to_hex(),
    );
    write_policy_file(dir, &policy)
}

async fn chat(addr: SocketAddr, model: &str, stream: bool) -> reqwest::Response {
    post_chat(&client(), addr, TEST_KEY, model, stream)
        .send()
        .await
        .unwrap()
}

async fn assert_completion(addr: SocketAddr) {
    let resp = chat(addr, "openai/gpt-4o-mini", false).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["choices"][0]["message"]["content"].as_str().is_some(),
        "{v}"
    );
}

async fn assert_stream(addr: SocketAddr) {
    let resp = chat(addr, "openai/gpt-4o-mini", true).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline.into(), body.next()).await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("\"choices\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

fn tcp_port_is_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

fn udp_port_is_free(addr: SocketAddr) -> bool {
    UdpSocket::bind(addr).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_edge_on_port_zero_serves_and_shuts_down() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("inproc-single");
    let policy = write_policy(&dir, &mock);

    let edge = EdgeNode::single_node()
        .policy(PolicySource::File(policy))
        .listen("127.0.0.1:0")
        .metrics("127.0.0.1:0")
        .start()
        .await
        .expect("edge starts");
    let addr = edge.local_addr().expect("plain listener");
    let metrics = edge.metrics_addr().expect("metrics listener");
    assert_ne!(addr.port(), 0);
    assert_ne!(metrics.port(), 0);
    assert_ne!(addr, metrics);

    assert_completion(addr).await;
    assert_stream(addr).await;
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    let scrape = client()
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), 200);

    edge.shutdown().await;
    assert!(tcp_port_is_free(addr), "HTTP port still taken");
    assert!(tcp_port_is_free(metrics), "metrics port still taken");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_egress_joined_by_quic_serve_and_shut_down() {
    install_crypto();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("inproc-pair");
    let policy = write_policy(&dir, &mock);
    let certs = BackhaulCerts::generate(&dir, "eu");

    let egress = start_egress("eu", certs.egress_tls(), &policy).await;
    let egress_addr = egress.local_addr();
    assert_ne!(egress_addr.port(), 0);

    let edge = start_backhaul_edge("eu", certs.edge_tls(), &policy, &[egress_addr]).await;
    let addr = edge.local_addr().expect("plain listener");
    assert_ne!(addr.port(), 0);

    // The edge compiled the same policy without reading or keeping a key;
    // the egress holds it.
    let edge_openai = edge.snapshot().providers()["openai"].clone();
    assert!(edge_openai.keys.is_empty() && edge_openai.key_pools.is_empty());
    assert_eq!(egress.snapshot().providers()["openai"].keys.len(), 1);

    assert_completion(addr).await;
    assert_stream(addr).await;
    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );

    edge.shutdown().await;
    egress.shutdown().await;
    assert!(tcp_port_is_free(addr), "edge port still taken");
    assert!(udp_port_is_free(egress_addr), "egress port still taken");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_an_error_from_start() {
    install_crypto();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let result = EdgeNode::single_node()
        .listen(addr.to_string())
        .start()
        .await;
    match result {
        Err(NodeError::Bind { addr: a, .. }) => assert_eq!(a, addr.to_string()),
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(edge) => {
            edge.shutdown().await;
            panic!("started on a taken port");
        }
    }
}
