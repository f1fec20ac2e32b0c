//! Setup shared by the in-process edge/egress tests (`inprocess`,
//! `resilience_*`). It lives here rather than in `switchyard_testkit`
//! because the testkit cannot depend on the backhaul and edge crates (they
//! depend on it): each test binary includes it with `mod common;`.

// Every test binary compiles its own copy and uses only some of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_backhaul::node::{EgressNode, PolicySource, RunningEgress};
use switchyard_backhaul::tunnel::tls::GeneratedNode;
use switchyard_backhaul::tunnel::{generate_node_cert, CertScope, NodeTls};
use switchyard_edge::node::{EdgeNode, RunningEdge};
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::TEST_KEY;

/// rustls needs one process-wide crypto provider before any TLS (QUIC or
/// HTTPS) is set up; a second install in the same process is a no-op.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn http_client(timeout: Duration) -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder().timeout(timeout).build().unwrap()
}

/// Writes `yaml` to `dir/policy.yaml` and returns that path.
pub fn write_policy_file(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// [`write_policy_file`] with `body` followed by a `tenants:` list whose
/// first entry is the tenant of [`TEST_KEY`]: `tenant_extra` is appended to
/// that entry, then `more_tenants` to the list.
pub fn write_policy_for_test_tenant(
    dir: &Path,
    body: &str,
    tenant_extra: &str,
    more_tenants: &str,
) -> PathBuf {
    let policy = format!(
        "{body}\ntenants:\n  - id: test\n    key_sha256: \"{}\"\n{tenant_extra}{more_tenants}",
        KeyHash::of(TEST_KEY).to_hex()
    );
    write_policy_file(dir, &policy)
}

/// A single-node edge (edge and egress in one) on port 0 with a metrics
/// listener: the edge, its HTTP address and its metrics address.
pub async fn start_single_node_edge(policy: PathBuf) -> (RunningEdge, SocketAddr, SocketAddr) {
    install_crypto();
    let edge = EdgeNode::single_node()
        .policy(PolicySource::File(policy))
        .listen("127.0.0.1:0")
        .metrics("127.0.0.1:0")
        .start()
        .await
        .expect("edge starts");
    let addr = edge.local_addr().unwrap();
    let metrics = edge.metrics_addr().unwrap();
    (edge, addr, metrics)
}

/// An edge's and an egress's certificates for one region, signed by the
/// one CA generated under `dir/pki`: the backhaul admits a peer only with a
/// certificate from the same CA scoped to the region.
pub struct BackhaulCerts {
    edge: GeneratedNode,
    egress: GeneratedNode,
}

impl BackhaulCerts {
    pub fn generate(dir: &Path, region: &str) -> Self {
        let pki = dir.join("pki");
        let edge = generate_node_cert(&pki, "edge", &[], &CertScope::Edge(region.into())).unwrap();
        let egress =
            generate_node_cert(&pki, "egress", &[], &CertScope::Egress(region.into())).unwrap();
        BackhaulCerts { edge, egress }
    }

    pub fn edge_tls(&self) -> NodeTls {
        node_tls(&self.edge)
    }

    /// Every call loads the files again, so several egress nodes can share
    /// the one certificate.
    pub fn egress_tls(&self) -> NodeTls {
        node_tls(&self.egress)
    }
}

fn node_tls(g: &GeneratedNode) -> NodeTls {
    NodeTls::from_files(&g.cert, &g.key, &g.ca_cert).unwrap()
}

/// An egress node of `region` on port 0 with its policy from a file.
pub async fn start_egress(region: &str, tls: NodeTls, policy: &Path) -> RunningEgress {
    EgressNode::new(region, tls)
        .policy(PolicySource::File(policy.to_path_buf()))
        .start()
        .await
        .expect("egress starts")
}

/// An edge of `region` joined to `egresses` over the backhaul, listening on
/// port 0; not started, so a test can add listeners before
/// [`EdgeNode::start`].
pub fn backhaul_edge(
    region: &str,
    tls: NodeTls,
    policy: &Path,
    egresses: &[SocketAddr],
) -> EdgeNode {
    let mut edge = EdgeNode::backhaul(region, tls).policy(PolicySource::File(policy.to_path_buf()));
    for egress in egresses {
        edge = edge.egress(region, egress.to_string());
    }
    edge.listen("127.0.0.1:0")
}

/// [`backhaul_edge`], started.
pub async fn start_backhaul_edge(
    region: &str,
    tls: NodeTls,
    policy: &Path,
    egresses: &[SocketAddr],
) -> RunningEdge {
    backhaul_edge(region, tls, policy, egresses)
        .start()
        .await
        .expect("edge starts")
}

/// A one-message ("hi") chat completion request, not yet sent.
pub fn post_chat(
    http: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    model: &str,
    stream: bool,
) -> reqwest::RequestBuilder {
    http.post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
}

/// A response header as text, `None` when absent or not ASCII.
pub fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The client got a whole answer: a 200 with a message, or a stream that
/// reached `[DONE]` without an error event on the way (a failure after the
/// first byte still comes with a 200).
pub fn is_whole_answer(status: u16, body: &str, stream: bool) -> bool {
    status == 200
        && if stream {
            body.ends_with("data: [DONE]\n\n") && !body.contains("\"error\"")
        } else {
            serde_json::from_str::<Value>(body)
                .is_ok_and(|v| v["choices"][0]["message"]["content"].is_string())
        }
}
