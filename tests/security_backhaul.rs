//! Attacks on the QUIC backhaul with the project's own binaries on
//! 127.0.0.1 (issue 14, points 1 and 10): node certificates of the fleet CA
//! used in the wrong role or region, an edge that lies in its request
//! frames, and the dev key on a client-facing edge. The mock provider counts
//! every request it gets: an attack must not produce one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::{json, Value};
use switchyard_backhaul::tunnel::{NodeTls, StaticDirectory, TunnelConfig, TunnelRouter};
use switchyard_backhaul::{EgressRequest, Operation, Protocol, RawRequest, Upstream};
use switchyard_proto::{RouteTarget, Snapshot};
use switchyard_testkit::cluster::{
    gen_certs, gen_scoped_certs, test_tenant_yaml, EdgeNode, EgressNode, NodeCerts,
};
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

const PROVIDER_KEY: &str = "sk-test-SECURITY-BACKHAUL-5f4e3d";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// An EU egress of a two-region fleet in front of a mock provider, and one
/// certificate of each kind from the fleet's CA.
struct Fleet {
    dir: PathBuf,
    policy: PathBuf,
    mock: MockUpstream,
    edge_eu: NodeCerts,
    egress_eu: NodeCerts,
    egress_us: NodeCerts,
    unscoped: NodeCerts,
}

impl Fleet {
    async fn new() -> Fleet {
        let mock = MockUpstream::start().await;
        let dir = temp_dir("security-backhaul");
        let pki = dir.join("pki");
        let scoped = |name: &str, role: &str, region: &str| {
            gen_scoped_certs(binary(), &pki, name, role, region)
        };
        let (edge_eu, egress_eu, egress_us) = (
            scoped("edge-eu", "edge", "eu"),
            scoped("egress-eu", "egress", "eu"),
            scoped("egress-us", "egress", "us"),
        );
        // What the control plane and operators hold.
        let unscoped = gen_certs(binary(), &pki, "control-plane");
        // `us-only` may never be served in the EU; the edge plans so, and a
        // lying edge must not get around it.
        let policy = format!(
            r#"
limits: {{ upstream_timeout_ms: 4000 }}
regions:
  eu: {{ jurisdiction: eu }}
  us: {{ jurisdiction: us }}
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    region: eu
{}  - id: us-only
    key_sha256: "{}"
    residency: [us]
"#,
            mock.url(),
            test_tenant_yaml(binary()),
            "ab".repeat(32),
        );
        let path = dir.join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        Fleet {
            dir,
            policy: path,
            mock,
            edge_eu,
            egress_eu,
            egress_us,
            unscoped,
        }
    }

    /// `switchyard egress --region eu` holding the provider key, with `certs`.
    fn egress(&self, certs: &NodeCerts) -> EgressNode {
        EgressNode::start(
            binary(),
            "eu",
            None,
            &self.policy,
            certs,
            &[("OPENAI_API_KEY".into(), PROVIDER_KEY.into())],
        )
    }

    /// The real tunnel client with the EU edge's identity, connected to
    /// `egress`.
    async fn router(&self, egress: &EgressNode) -> Arc<TunnelRouter> {
        let tls =
            NodeTls::from_files(&self.edge_eu.cert, &self.edge_eu.key, &self.edge_eu.ca).unwrap();
        let mut directory = StaticDirectory::default();
        directory.add("eu", &egress.addr.to_string());
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let router = TunnelRouter::start(
            TunnelConfig {
                region: "eu".into(),
                tls,
            },
            &directory,
            snapshot,
        )
        .unwrap();
        assert_eq!(router.wait_connected(Duration::from_secs(10)).await, (1, 1));
        router
    }

    fn edge(&self, certs: &NodeCerts, egress: &EgressNode, env: &[(String, String)]) -> EdgeNode {
        let flag = format!("eu={}", egress.addr);
        EdgeNode::start(binary(), "eu", &self.policy, certs, &[flag], env)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn chat(edge: &EdgeNode, key: &str) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", edge.base_url()))
        .bearer_auth(key)
        .json(&json!({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Waits (bounded) until `logs()` holds `needle` at least `n` times.
fn wait_count(logs: impl Fn() -> String, needle: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if logs().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test]
async fn a_rogue_edge_with_a_certificate_of_another_role_is_refused_at_the_handshake() {
    let fleet = Fleet::new().await;
    let egress = fleet.egress(&fleet.egress_eu);
    // The reviewed attack: `switchyard edge` run with another region's
    // egress certificate; then with the EU egress's own, and with the
    // control plane's. All chain to the fleet CA.
    for (i, (what, certs)) in [
        ("the US egress certificate", &fleet.egress_us),
        ("the EU egress certificate", &fleet.egress_eu),
        ("an unscoped certificate", &fleet.unscoped),
    ]
    .into_iter()
    .enumerate()
    {
        let rogue = fleet.edge(certs, &egress, &[]);
        let (status, body) = chat(&rogue, TEST_KEY).await;
        assert!(status == 502 || status == 503, "{what}: {status} {body}");
        assert_eq!(body["error"]["code"], "no_egress", "{what}: {body}");
        assert!(
            wait_count(|| egress.process.logs(), "handshake refused", i + 1),
            "{what}: the egress did not refuse the handshake: {}",
            egress.process.logs()
        );
        assert!(
            egress
                .process
                .logs()
                .contains("not scoped to edge.<eu|us>.node.switchyard"),
            "{}",
            egress.process.logs()
        );
        assert!(
            !egress.process.logs().contains("edge connected"),
            "{what}: {}",
            egress.process.logs()
        );
    }
    assert_eq!(
        fleet.mock.requests().len(),
        0,
        "a rogue edge reached the provider"
    );

    // The same egress serves a genuine edge.
    let edge = fleet.edge(&fleet.edge_eu, &egress, &[]);
    let (status, body) = chat(&edge, TEST_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fleet.mock.requests().len(), 1);
}

#[tokio::test]
async fn an_edge_refuses_an_egress_that_is_not_one_of_the_dialled_region() {
    let fleet = Fleet::new().await;
    // An edge certificate cannot serve (client usage only, edge scope), and
    // the US egress's certificate cannot pass for the EU egress.
    for (what, certs, why) in [
        (
            "an edge certificate",
            &fleet.edge_eu,
            "server authentication",
        ),
        (
            "the US egress certificate",
            &fleet.egress_us,
            "not scoped to egress.eu.node.switchyard",
        ),
    ] {
        let impostor = fleet.egress(certs);
        let edge = fleet.edge(&fleet.edge_eu, &impostor, &[]);
        let (status, body) = chat(&edge, TEST_KEY).await;
        assert_eq!(status, 503, "{what}: {body}");
        assert_eq!(body["error"]["code"], "no_egress", "{what}: {body}");
        assert!(
            edge.process.wait_for_logs(Duration::from_secs(10), |l| l
                .contains("backhaul connect failed")
                && l.contains(why)),
            "{what}: {}",
            edge.process.logs()
        );
        assert!(!edge.process.logs().contains("backhaul connected"));
    }
    assert_eq!(fleet.mock.requests().len(), 0);
}

/// A raw request as a compromised edge would send it.
fn raw_request(tenant: &str, residency: &[&str], method: &str, path: &str) -> EgressRequest {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    EgressRequest {
        request_id: "req_attack".into(),
        tenant: tenant.into(),
        target: RouteTarget {
            provider: "openai".into(),
            model: String::new(),
        },
        op: Operation::Raw(RawRequest {
            method: method.into(),
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }),
        simulate: None,
        received_at: std::time::Instant::now(),
        inbound: Protocol::OpenAi,
        forward_headers: Vec::new(),
        residency: residency.iter().map(|j| j.to_string()).collect(),
        trace: None,
    }
}

#[tokio::test]
async fn an_edge_that_lies_in_its_frames_is_held_to_the_tenant_policy() {
    let fleet = Fleet::new().await;
    let egress = fleet.egress(&fleet.egress_eu);
    // A genuine edge identity driving the real tunnel client, with frames
    // no honest edge would send.
    let router = fleet.router(&egress).await;

    let refused = |req: EgressRequest| {
        let router = router.clone();
        async move {
            match router.execute(req).await {
                Ok(r) => panic!("served with status {}", r.status),
                Err(e) => (e.code.unwrap_or_default().to_string(), e.kind),
            }
        }
    };
    // Residency: a US-only tenant whose frame claims no restriction, or the
    // EU, is still refused by the EU egress.
    for claimed in [&[][..], &["eu"][..], &["eu", "us"][..]] {
        let (code, _) = refused(raw_request("us-only", claimed, "POST", "chat/completions")).await;
        assert_eq!(code, "residency_violation", "claimed {claimed:?}");
    }
    // A tenant the egress does not know has no residency it could check.
    let (code, _) = refused(raw_request("made-up", &[], "POST", "chat/completions")).await;
    assert_eq!(code, "unknown_tenant");
    // Raw passthrough is held to what a client passthrough may send.
    let (code, _) = refused(raw_request("test", &[], "GET", "../../admin/x")).await;
    assert_eq!(code, "invalid_passthrough_path");
    let (code, _) = refused(raw_request(
        "test",
        &[],
        "DELETE",
        "files/%2e%2e/%2E%2E/admin",
    ))
    .await;
    assert_eq!(code, "invalid_passthrough_path");
    let (_, kind) = refused(raw_request("test", &[], "TRACE", "chat/completions")).await;
    assert_eq!(format!("{kind:?}"), "MethodNotAllowed");
    let mut smuggled = raw_request("test", &[], "POST", "chat/completions");
    if let Operation::Raw(raw) = &mut smuggled.op {
        raw.headers
            .push(("authorization".into(), "Bearer sk-attacker".into()));
    }
    refused(smuggled).await;
    assert_eq!(
        fleet.mock.requests().len(),
        0,
        "a lying frame reached the provider"
    );

    // The same tunnel serves an honest frame.
    let ok = router
        .execute(raw_request("test", &[], "POST", "chat/completions"))
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(fleet.mock.requests().len(), 1);
    assert!(egress
        .process
        .wait_for_logs(Duration::from_secs(5), |l| l.contains("residency block")));
}

#[tokio::test]
async fn the_dev_key_is_no_tenant_on_an_edge() {
    const DEV_KEY: &str = "sy-dev-key-on-an-edge-0001";
    let fleet = Fleet::new().await;
    let egress = fleet.egress(&fleet.egress_eu);
    let edge = fleet.edge(
        &fleet.edge_eu,
        &egress,
        &[("SWITCHYARD_DEV_KEY".into(), DEV_KEY.into())],
    );
    let (status, body) = chat(&edge, DEV_KEY).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(fleet.mock.requests().len(), 0);
    assert!(edge
        .process
        .logs()
        .contains("SWITCHYARD_DEV_KEY is ignored"));
    // Policy tenants work as ever.
    let (status, body) = chat(&edge, TEST_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fleet.mock.requests().len(), 1);
}

/// Each answer's stream is read to its end (the egress's FIN, right after
/// the trailer), so the edge never stops one it has finished with: that
/// STOP_SENDING was a packet per request, both ways through the kernel
/// and an AEAD seal, telling the egress nothing.
#[tokio::test]
async fn finished_answers_cost_no_stop_sending() {
    let fleet = Fleet::new().await;
    let egress = fleet.egress(&fleet.egress_eu);
    let router = fleet.router(&egress).await;
    const N: usize = 20;
    for _ in 0..N {
        let answer = router
            .execute(raw_request("test", &[], "POST", "chat/completions"))
            .await
            .expect("an answer");
        assert_eq!(answer.status, 200);
        // Raw passthrough answers as a stream of the provider's bytes.
        let body = match answer.body {
            switchyard_backhaul::ResponseBody::Full(body) => body.to_vec(),
            switchyard_backhaul::ResponseBody::Stream(chunks) => {
                let chunks: Vec<Bytes> = futures::StreamExt::collect(chunks).await;
                chunks.concat()
            }
        };
        assert!(String::from_utf8_lossy(&body).contains("chat.completion"));
    }
    assert_eq!(fleet.mock.count(None, None), N);
    let stats = router.connection_stats();
    assert_eq!(stats.len(), 1);
    let sent = &stats[0].1.frame_tx;
    assert!(sent.stream >= N as u64, "{sent:?}");
    assert_eq!(sent.stop_sending, 0, "{sent:?}");
}
