//! Deploys that drop nothing: real `switchyard edge` and `switchyard egress`
//! processes get SIGTERM while a stream is running through them. The
//! stream is held open by the mock provider (`gated`) until the test has
//! seen the drain happen, so nothing here depends on timing.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use switchyard_testkit::cluster::{
    free_tcp_port, gen_certs, gen_scoped_certs, test_tenant_yaml, ControlPlaneNode, EdgeNode,
    EgressNode, NodeCerts,
};
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::mock::MockUpstream;

const PROVIDER_KEY: &str = "sk-test-DRAIN-5f4e3d2c1b0a";

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

struct Fleet {
    dir: PathBuf,
    policy: PathBuf,
    edge_certs: NodeCerts,
    egress_certs: NodeCerts,
    mock: MockUpstream,
}

impl Fleet {
    async fn new() -> Fleet {
        let mock = MockUpstream::start().await;
        let dir = temp_dir("ops-drain");
        let edge_certs = gen_scoped_certs(binary(), &dir.join("pki"), "edge", "edge", "eu");
        let egress_certs = gen_scoped_certs(binary(), &dir.join("pki"), "egress", "egress", "eu");
        let policy = format!(
            r#"
limits: {{ upstream_timeout_ms: 60000, stream_idle_timeout_ms: 60000 }}
regions:
  eu: {{ jurisdiction: eu }}
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    region: eu
{}"#,
            mock.url(),
            test_tenant_yaml(binary()),
        );
        let path = dir.join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        Fleet {
            dir,
            policy: path,
            edge_certs,
            egress_certs,
            mock,
        }
    }

    /// An egress with an admin listener; `(node, admin address)`.
    fn egress(&self) -> (EgressNode, SocketAddr) {
        let admin = free_tcp_port();
        let flags = vec![
            "--config".to_string(),
            self.policy.display().to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--shutdown-grace-seconds".into(),
            "120".into(),
        ];
        let node = EgressNode::start_with(
            binary(),
            "eu",
            None,
            &flags,
            &self.egress_certs,
            &[("OPENAI_API_KEY".into(), PROVIDER_KEY.into())],
        );
        (node, admin)
    }

    /// An edge dialling `egress`, with an admin listener.
    fn edge(&self, egress: &[&EgressNode]) -> (EdgeNode, SocketAddr) {
        let admin = free_tcp_port();
        let flags = vec![
            "--config".to_string(),
            self.policy.display().to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--shutdown-grace-seconds".into(),
            "120".into(),
        ];
        let egress: Vec<String> = egress.iter().map(|e| format!("eu={}", e.addr)).collect();
        let node = EdgeNode::start_with(binary(), "eu", &flags, &self.edge_certs, &egress, &[]);
        (node, admin)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits (bounded) until `path` on the admin listener answers `status`.
async fn wait_admin_status(admin: SocketAddr, path: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = admin_get(admin, path).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {got} ({body}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of an unlabelled gauge on the admin `/metrics` page.
async fn gauge(admin: SocketAddr, name: &str) -> i64 {
    let (_, page) = admin_get(admin, "/metrics").await;
    page.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {page}"))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_gauge(admin: SocketAddr, name: &str, value: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = gauge(admin, name).await;
        if got == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {got}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A streaming chat request, returned once its first event has arrived.
struct OpenStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    text: String,
}

impl OpenStream {
    async fn start(edge: &EdgeNode, model: &str) -> OpenStream {
        let resp = client()
            .post(format!("{}/chat/completions", edge.base_url()))
            .bearer_auth(&edge.key)
            .json(&json!({"model": model, "stream": true,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut s = OpenStream {
            body: resp.bytes_stream().boxed(),
            text: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.text.contains("data: ") {
            let next = tokio::time::timeout_at(deadline.into(), s.body.next())
                .await
                .expect("first event in time");
            s.text
                .push_str(&String::from_utf8_lossy(&next.unwrap().unwrap()));
        }
        s
    }

    /// Reads to the end (bounded); the whole text received.
    async fn finish(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline.into(), self.body.next()).await
        {
            match chunk {
                Ok(c) => self.text.push_str(&String::from_utf8_lossy(&c)),
                Err(_) => break,
            }
        }
        self.text
    }
}

fn data_events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_sigterm_of_its_edge_and_new_connections_are_refused() {
    let fleet = Fleet::new().await;
    let (egress, _) = fleet.egress();
    let (mut edge, admin) = fleet.edge(&[&egress]);
    wait_admin_status(admin, "/readyz", 200).await;
    assert_eq!(admin_get(admin, "/healthz").await.0, 200);

    let stream = OpenStream::start(&edge, "openai/gated").await;
    edge.process.terminate();
    // Readiness goes false first, the listener closes, the stream goes on.
    wait_admin_status(admin, "/readyz", 503).await;
    assert_eq!(
        admin_get(admin, "/healthz").await.0,
        200,
        "alive while draining"
    );
    assert_eq!(gauge(admin, "switchyard_draining").await, 1);
    assert_eq!(gauge(admin, "switchyard_in_flight").await, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(edge.http_addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the edge kept accepting while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        edge.process.wait_exit(Duration::ZERO).is_none(),
        "the edge exited with a stream in flight: {}",
        edge.process.logs()
    );

    fleet.mock.open_gate();
    let text = stream.finish().await;
    let events = data_events(&text);
    assert_eq!(events.last(), Some(&"[DONE]"), "stream cut: {text}");
    assert!(
        events
            .iter()
            .any(|e| e.contains("\"finish_reason\":\"stop\"")),
        "{text}"
    );
    let status = edge
        .process
        .wait_exit(Duration::from_secs(30))
        .expect("the edge exits once drained");
    assert!(status.success(), "{status}: {}", edge.process.logs());
    let logs = edge.process.logs();
    assert!(logs.contains("drained: every request finished"), "{logs}");
    assert!(!logs.contains("cutting the requests left"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_sigterm_of_its_egress_and_new_requests_go_to_another() {
    let fleet = Fleet::new().await;
    let (egress_a, admin_a) = fleet.egress();
    let (egress_b, admin_b) = fleet.egress();
    let (edge, _) = fleet.edge(&[&egress_a, &egress_b]);
    wait_admin_status(admin_a, "/readyz", 200).await;
    wait_admin_status(admin_b, "/readyz", 200).await;

    let first = OpenStream::start(&edge, "openai/gated").await;
    // Whichever egress carries it is the one restarted.
    let mut nodes = vec![(egress_a, admin_a), (egress_b, admin_b)];
    if gauge(admin_a, "switchyard_in_flight").await != 1 {
        nodes.swap(0, 1);
    }
    let (_staying, staying_admin) = nodes.pop().unwrap();
    let (mut draining, draining_admin) = nodes.pop().unwrap();
    draining.process.terminate();
    wait_admin_status(draining_admin, "/readyz", 503).await;
    assert!(
        edge.process.wait_for_logs(Duration::from_secs(20), |l| l
            .contains("egress is draining; new requests go to other egress nodes")),
        "the edge never heard GOAWAY: {}",
        edge.process.logs()
    );

    // New work during the drain: short requests succeed, and a second
    // stream is carried by the egress that stays.
    for _ in 0..5 {
        let r = client()
            .post(format!("{}/chat/completions", edge.base_url()))
            .bearer_auth(&edge.key)
            .json(
                &json!({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 200, "{}", r.text().await.unwrap());
    }
    let second = OpenStream::start(&edge, "openai/gated").await;
    assert_eq!(gauge(staying_admin, "switchyard_in_flight").await, 1);
    assert_eq!(gauge(draining_admin, "switchyard_in_flight").await, 1);
    assert!(
        draining.process.wait_exit(Duration::ZERO).is_none(),
        "the egress exited with a stream in flight"
    );

    fleet.mock.open_gate();
    for stream in [first, second] {
        let text = stream.finish().await;
        assert_eq!(
            data_events(&text).last(),
            Some(&"[DONE]"),
            "stream cut: {text}"
        );
    }
    let status = draining
        .process
        .wait_exit(Duration::from_secs(30))
        .expect("the egress exits once drained");
    assert!(status.success(), "{status}: {}", draining.process.logs());
    assert!(
        draining
            .process
            .logs()
            .contains("drained: every stream finished"),
        "{}",
        draining.process.logs()
    );
    wait_gauge(staying_admin, "switchyard_in_flight", 0).await;
    // The edge lost nothing: every answer it gave was a 200.
    let edge_logs = edge.process.logs();
    let failed = edge_logs
        .lines()
        .filter(|l| l.contains("switchyard::access") && !l.contains("\"status\":200"))
        .count();
    assert_eq!(failed, 0, "{edge_logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let fleet = Fleet::new().await;
    let (egress, _) = fleet.egress();
    let (mut edge, admin) = fleet.edge(&[&egress]);
    let stream = OpenStream::start(&edge, "openai/gated").await;
    edge.process.terminate();
    wait_admin_status(admin, "/readyz", 503).await;
    edge.process.terminate();
    let status = edge
        .process
        .wait_exit(Duration::from_secs(30))
        .expect("the second signal ends the process");
    assert_eq!(status.code(), Some(130), "{}", edge.process.logs());
    assert!(edge.process.logs().contains("second stop signal"));
    // The gate never opened: the stream was cut, not finished.
    let text = stream.finish().await;
    assert_ne!(data_events(&text).last(), Some(&"[DONE]"), "{text}");
    fleet.mock.open_gate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_drains_on_sigterm() {
    let dir = temp_dir("ops-cp-drain");
    let certs = gen_certs(binary(), &dir, "control-plane");
    let admin = free_tcp_port();
    let store = format!("sqlite://{}", dir.join("cp.db").display());
    let env = vec![
        (
            "SY_TOKEN".to_string(),
            "token-for-the-drain-test".to_string(),
        ),
        (
            "SWITCHYARD_MASTER_KEY".to_string(),
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".to_string(),
        ),
    ];
    let admin_flag = admin.to_string();
    let mut cp = ControlPlaneNode::start_with_flags(
        binary(),
        &store,
        &certs,
        "SY_TOKEN",
        None,
        &env,
        &["--admin-listen", &admin_flag],
    );
    wait_admin_status(admin, "/readyz", 200).await;
    let (_, page) = admin_get(admin, "/metrics").await;
    assert!(page.contains("switchyard_control_store_up 1"), "{page}");
    assert!(
        page.contains("switchyard_control_nodes{role=\"edge\",state=\"ok\"} 0"),
        "{page}"
    );
    cp.process.terminate();
    let status = cp
        .process
        .wait_exit(Duration::from_secs(30))
        .expect("the control plane exits");
    assert!(status.success(), "{status}: {}", cp.process.logs());
    assert!(
        cp.process.logs().contains("draining: readiness is false"),
        "{}",
        cp.process.logs()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
