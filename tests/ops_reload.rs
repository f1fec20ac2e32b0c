//! Hot reload: a policy file edited under a running gateway (and SIGHUP)
//! is prepared, then swapped in or refused with the old policy kept; the
//! listener certificate and the backhaul node certificate are swapped for
//! new connections while open ones carry on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_testkit::cluster::{
    gen_scoped_certs, test_tenant_yaml, EdgeNode, EgressNode, NodeProcess,
};
use switchyard_testkit::gateway::{temp_dir, Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn chat_status(base_url: &str, key: &str, model: &str) -> (u16, String) {
    let r = client()
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn count(logs: &str, needle: &str) -> usize {
    logs.matches(needle).count()
}

/// Waits (bounded) until `needle` occurs more than `before` times in `logs()`.
fn wait_for_more(logs: impl Fn() -> String, needle: &str, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&logs(), needle) <= before {
        assert!(
            Instant::now() < deadline,
            "no new {needle:?} in the logs: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const POLICY_V1: &str = "aliases:\n  first: simulated/sim-small\n";
const POLICY_V2: &str = "aliases:\n  first: simulated/sim-small\n  second: simulated/sim-large\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_reloads_its_policy_on_change_and_on_sighup_and_keeps_it_when_broken() {
    let gw = Gateway::start(GatewayOptions::new(binary()).policy(POLICY_V1));
    let base = gw.base_url();
    assert_eq!(chat_status(&base, &gw.key, "first").await.0, 200);
    assert_eq!(chat_status(&base, &gw.key, "second").await.0, 404);

    // An edit is picked up without a signal.
    let reloaded = count(&gw.logs(), "policy reloaded");
    std::fs::write(gw.policy_path(), POLICY_V2).unwrap();
    wait_for_more(|| gw.logs(), "policy reloaded", reloaded);
    let (status, body) = chat_status(&base, &gw.key, "second").await;
    assert_eq!(status, 200, "{body}");
    // What changed is said.
    let line = gw
        .logs()
        .lines()
        .rev()
        .find(|l| l.contains("policy reloaded"))
        .unwrap()
        .to_string();
    assert!(line.contains("second"), "{line}");
    assert!(line.contains("\"version\":2"), "{line}");

    // A broken file is refused with its errors; the running policy stays.
    let refused = count(&gw.logs(), "policy reload refused");
    std::fs::write(
        gw.policy_path(),
        "aliases:\n  second: nowhere/model\nlimits: { no_such_limit: 1 }\n",
    )
    .unwrap();
    wait_for_more(|| gw.logs(), "policy reload refused", refused);
    assert!(gw.logs().contains("no_such_limit"), "{}", gw.logs());
    assert_eq!(chat_status(&base, &gw.key, "second").await.0, 200);
    assert_eq!(chat_status(&base, &gw.key, "first").await.0, 200);

    // SIGHUP reloads even an unchanged file (here: still broken, refused again).
    let refused = count(&gw.logs(), "policy reload refused");
    gw.hangup();
    wait_for_more(|| gw.logs(), "policy reload refused", refused);
    assert!(gw.logs().contains("SIGHUP: reloading"));

    // Fixed again: back to a valid version, one more than the last swapped.
    let reloaded = count(&gw.logs(), "policy reloaded");
    std::fs::write(gw.policy_path(), POLICY_V1).unwrap();
    wait_for_more(|| gw.logs(), "policy reloaded", reloaded);
    assert_eq!(chat_status(&base, &gw.key, "second").await.0, 404);
    assert!(gw.logs().contains("\"version\":3"), "{}", gw.logs());
}

/// A self-signed certificate for localhost: (certificate PEM, key PEM, DER).
fn self_signed() -> (String, String, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().to_vec(),
    )
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection trusting only `der`, or the handshake error.
fn connect_tls(addr: SocketAddr, der: &[u8]) -> Result<TlsStream, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// One keep-alive `GET /health` on an open connection; the status code.
fn get_health(tls: &mut TlsStream) -> u16 {
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        tls.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tls.read_exact(&mut body).unwrap();
    head[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_certificate_reloads_without_dropping_connections() {
    let dir = temp_dir("ops-cert");
    let (cert_a, key_a, der_a) = self_signed();
    let (cert_b, key_b, der_b) = self_signed();
    let (cert_path, key_path) = (dir.join("tls.pem"), dir.join("tls-key.pem"));
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let gw = Gateway::start(
        GatewayOptions::new(binary())
            .arg("--tls-cert")
            .arg(cert_path.display().to_string())
            .arg("--tls-key")
            .arg(key_path.display().to_string())
            .arg("--header-timeout-ms")
            .arg("60000"),
    );
    let mut old = connect_tls(gw.https_addr, &der_a).expect("certificate A is served");
    assert_eq!(get_health(&mut old), 200);
    assert!(connect_tls(gw.https_addr, &der_b).is_err());

    // A half-written pair (new certificate, old key) is refused: A stays.
    let refused = count(&gw.logs(), "listener certificate reload refused");
    std::fs::write(&cert_path, &cert_b).unwrap();
    wait_for_more(|| gw.logs(), "listener certificate reload refused", refused);
    connect_tls(gw.https_addr, &der_a).expect("A still served");

    let reloaded = count(&gw.logs(), "listener certificate reloaded");
    std::fs::write(&key_path, &key_b).unwrap();
    wait_for_more(|| gw.logs(), "listener certificate reloaded", reloaded);
    let mut new = connect_tls(gw.https_addr, &der_b).expect("certificate B is served");
    assert_eq!(get_health(&mut new), 200);
    assert!(
        connect_tls(gw.https_addr, &der_a).is_err(),
        "A is no longer served"
    );
    // The connection opened before the swap still serves.
    assert_eq!(get_health(&mut old), 200);
    let _ = std::fs::remove_dir_all(&dir);
}

fn static_policy(mock: &MockUpstream, egress: &str) -> String {
    format!(
        r#"
limits: {{ upstream_timeout_ms: 10000 }}
regions:
  eu: {{ jurisdiction: eu, egress: ["{egress}"] }}
providers:
  openai:
    kind: openai
    base_url: "{}/v1"
    region: eu
{}"#,
        mock.url(),
        test_tenant_yaml(binary()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_fleet_reloads_policy_and_node_certificates() {
    let dir = temp_dir("ops-fleet-reload");
    let pki = dir.join("pki");
    let edge_certs = gen_scoped_certs(binary(), &pki, "edge", "edge", "eu");
    let egress_certs = gen_scoped_certs(binary(), &pki, "egress", "egress", "eu");
    let (first, second) = (MockUpstream::start().await, MockUpstream::start().await);
    let egress_addr = switchyard_testkit::cluster::free_udp_port();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, static_policy(&first, &egress_addr.to_string())).unwrap();
    let env = [("OPENAI_API_KEY".to_string(), "sk-test-RELOAD-1".to_string())];
    let egress = EgressNode::start(
        binary(),
        "eu",
        Some(egress_addr),
        &policy,
        &egress_certs,
        &env,
    );
    let edge = EdgeNode::start(binary(), "eu", &policy, &edge_certs, &[], &[]);
    let (status, body) = chat_status(&edge.base_url(), &edge.key, "openai/gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((first.requests().len(), second.requests().len()), (1, 0));

    // Both roles reload the edited file: the provider moved.
    std::fs::write(&policy, static_policy(&second, &egress_addr.to_string())).unwrap();
    let reloaded = |p: &NodeProcess| count(&p.logs(), "policy reloaded");
    wait_for_more(|| edge.process.logs(), "policy reloaded", 0);
    wait_for_more(|| egress.process.logs(), "policy reloaded", 0);
    assert_eq!((reloaded(&edge.process), reloaded(&egress.process)), (1, 1));
    let (status, body) = chat_status(&edge.base_url(), &edge.key, "openai/gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((first.requests().len(), second.requests().len()), (1, 1));

    // New node certificates from the same CA: both nodes swap them for
    // new connections; the open backhaul connection is not dropped.
    gen_scoped_certs(binary(), &pki, "egress", "egress", "eu");
    gen_scoped_certs(binary(), &pki, "edge", "edge", "eu");
    wait_for_more(|| egress.process.logs(), "node certificate reloaded", 0);
    wait_for_more(|| edge.process.logs(), "node certificate reloaded", 0);
    let (status, body) = chat_status(&edge.base_url(), &edge.key, "openai/gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !edge.process.logs().contains("backhaul connection lost"),
        "{}",
        edge.process.logs()
    );
    // A second edge dials with the new certificates and is accepted.
    let newcomer = EdgeNode::start(binary(), "eu", &policy, &edge_certs, &[], &[]);
    let (status, body) = chat_status(&newcomer.base_url(), &newcomer.key, "openai/gpt-4o").await;
    assert_eq!(status, 200, "{body}");
    drop((edge, newcomer, egress));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The leaf certificate a TLS server at `addr` presents to a client
/// trusting `ca_pem` (the fleet CA), as DER.
fn served_leaf(addr: SocketAddr, ca_pem: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls.conn.peer_certificates().unwrap()[0].to_vec())
}

fn leaf_der(pem_file: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem_file)
        .unwrap()
        .to_vec()
}

fn regenerate(pki: &Path, name: &str, scope: &[&str]) {
    let out = std::process::Command::new(binary())
        .args(["gen-certs", "--out"])
        .arg(pki)
        .args(["--name", name])
        .args(scope)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Renewed certificates on the control plane's side of node sessions: the
/// control plane's own gRPC certificate (new handshakes get the new one,
/// the nodes' open Watch streams are not dropped) and the client
/// certificate an edge presents to it (its session moves to the new
/// certificate; it keeps following policy and serving).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_node_client_certificates_reload_and_nodes_stay_connected() {
    let fleet = switchyard_testkit::cluster::LocalFleet::start(binary());
    let pki = fleet.dir.join("pki");
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let grpc: SocketAddr = {
        let out = fleet.process.stdout();
        let line = out.lines().find(|l| l.contains("(gRPC)")).unwrap();
        let port = line
            .split("https://localhost:")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        format!("127.0.0.1:{port}").parse().unwrap()
    };
    let cp_log = || std::fs::read_to_string(fleet.dir.join("logs/control-plane.log")).unwrap();
    let global = fleet.secret("tenant-key");
    let before = served_leaf(grpc, &ca).unwrap();
    assert_eq!(before, leaf_der(&pki.join("control-plane.pem")));
    let disconnects = count(&cp_log(), "node disconnected");

    // 1. The control plane's certificate.
    let started = Instant::now();
    regenerate(&pki, "control-plane", &[]);
    let renewed = leaf_der(&pki.join("control-plane.pem"));
    assert_ne!(renewed, before);
    loop {
        if served_leaf(grpc, &ca).ok().as_ref() == Some(&renewed) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the control plane still serves its old certificate: {}",
            cp_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "control-plane certificate served {:?} after the files changed",
        started.elapsed()
    );
    assert_eq!(
        count(&cp_log(), "node disconnected"),
        disconnects,
        "a node session was dropped: {}",
        cp_log()
    );

    // 2. The client certificate the EU edge presents to the control plane.
    let started = Instant::now();
    regenerate(&pki, "edge-eu", &["--role", "edge", "--region", "eu-west"]);
    let edge_leaf = leaf_der(&pki.join("edge-eu.pem"));
    let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, &edge_leaf).as_ref());
    // The control plane logs the first 16 hex digits of the certificate
    // holding each node session.
    let needle = fingerprint[..16].to_string();
    loop {
        let log = cp_log();
        let moved = log
            .lines()
            .any(|l| l.contains("node connected") && l.contains("edge-eu") && l.contains(&needle));
        if moved {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the edge never presented its renewed certificate: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "edge session on its renewed certificate {:?} after the files changed",
        started.elapsed()
    );

    // Both regions still serve, and a new policy version reaches every
    // node, the renewed edge included: ACKed under its new certificate.
    let (status, _, body) = fleet.chat(&fleet.eu, &global).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = fleet.chat(&fleet.us, &global).await;
    assert_eq!(status, 200, "{body}");
    let policy = std::fs::read_to_string(fleet.dir.join("policy.yaml")).unwrap();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/policy?author=test", fleet.operator_api))
        .bearer_auth(fleet.secret("admin-token"))
        .body(format!("{policy}\n# renewed certificates\n"))
        .send()
        .await
        .unwrap();
    let applied: serde_json::Value = r.json().await.unwrap();
    let version = applied["version"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes: serde_json::Value = client
            .get(format!("{}/v1/nodes", fleet.operator_api))
            .bearer_auth(fleet.secret("admin-token"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = nodes["nodes"].as_array().cloned().unwrap_or_default();
        let all_ok = list.len() == 4
            && list
                .iter()
                .all(|n| n["health"] == "ok" && n["acked_version"].as_u64() == Some(version));
        if all_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every node acknowledged version {version}: {nodes:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
