//! Attacks on the control plane, run against the real `switchyard
//! control-plane` binary over real sockets: an open operator API, inline
//! keys that dodge sealing, YAML alias bombs, degenerate master keys, node
//! certificates claiming another role or another node's id, and clients
//! that trickle a request head.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_control::pb;
use switchyard_control::pb::node_client::NodeClient;
use switchyard_control::tonic;
use switchyard_testkit::cluster::{
    free_tcp_port, gen_certs, gen_scoped_certs, ControlPlaneNode, NodeCerts,
};
use switchyard_testkit::gateway::temp_dir;

const TOKEN: &str = "admin-token-security-5e1f";
const MASTER_KEY: &str = "3c1f9a0e7b52d4686e0b9c27f1a3d5e4902b7c6a18f4e3d25c9b0a7e6f1d2c38";
const NUMERIC_KEY: &str = "12345678901234";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn env() -> Vec<(String, String)> {
    vec![
        ("SY_ADMIN".to_string(), TOKEN.to_string()),
        ("SWITCHYARD_MASTER_KEY".to_string(), MASTER_KEY.to_string()),
    ]
}

struct Fleet {
    dir: PathBuf,
    cp: ControlPlaneNode,
}

fn start(tag: &str, extra: &[&str]) -> Fleet {
    let dir = temp_dir(tag);
    let cp_certs = gen_certs(binary(), &dir, "control-plane");
    let store = format!("sqlite://{}/cp.db", dir.display());
    let cp = ControlPlaneNode::start_with_flags(
        binary(),
        &store,
        &cp_certs,
        "SY_ADMIN",
        None,
        &env(),
        extra,
    );
    Fleet { dir, cp }
}

/// A policy with a US provider whose inline key is a YAML number.
fn policy() -> String {
    format!(
        r#"
regions:
  eu: {{ jurisdiction: eu }}
  us: {{ jurisdiction: us }}
providers:
  us-openai:
    kind: openai
    region: us
    base_url: http://127.0.0.1:9/v1
    models: [gpt-4o]
    key_pools:
      - keys: [ {{ value: {NUMERIC_KEY} }} ]
"#
    )
}

/// One HTTP/1.1 request on a fresh connection; (status, body).
fn http(fleet: &Fleet, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(fleet.cp.http_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: cp\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

async fn node_client(fleet: &Fleet, certs: &NodeCerts) -> NodeClient<tonic::transport::Channel> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&certs.ca).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&certs.cert).unwrap(),
            std::fs::read(&certs.key).unwrap(),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(fleet.cp.url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    NodeClient::new(channel)
}

fn hello(id: &str, role: pb::NodeRole, region: &str) -> pb::Hello {
    pb::Hello {
        id: id.into(),
        role: role as i32,
        region: region.into(),
        build: String::new(),
        have_version: 0,
    }
}

fn run_control_plane(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = temp_dir("cp-refuse");
    let mut cmd = Command::new(binary());
    cmd.arg("control-plane")
        .args(["--listen", &free_tcp_port().to_string()])
        .arg("--store")
        .arg(format!("sqlite://{}/cp.db", dir.display()))
        .args(args)
        .env_remove("SWITCHYARD_MASTER_KEY")
        .env_remove("SWITCHYARD_MASTER_KEY_PREVIOUS")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Each of these configurations must be refused before anything is
    // served, so the process exits on its own; one that keeps running is
    // killed after a generous bound and reported as started.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn operator_api_refuses_to_start_open_or_with_a_plaintext_token() {
    let open = run_control_plane(&[], &[]);
    assert!(!open.status.success(), "started with an open operator API");
    let err = String::from_utf8_lossy(&open.stderr);
    assert!(err.contains("--admin-token-env"), "{err}");

    let token = [("SY_ADMIN", TOKEN)];
    let exposed = run_control_plane(
        &[
            "--admin-token-env",
            "SY_ADMIN",
            "--http-listen",
            "0.0.0.0:0",
        ],
        &token,
    );
    assert!(
        !exposed.status.success(),
        "token over plaintext off loopback"
    );
    let err = String::from_utf8_lossy(&exposed.stderr);
    assert!(err.contains("plaintext"), "{err}");
}

#[test]
fn degenerate_master_key_is_refused() {
    for key in ["00".repeat(32), "ab".repeat(32)] {
        let out = run_control_plane(
            &["--admin-token-env", "SY_ADMIN"],
            &[("SY_ADMIN", TOKEN), ("SWITCHYARD_MASTER_KEY", &key)],
        );
        assert!(!out.status.success(), "accepted master key {key}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a random key"), "{err}");
    }
}

#[test]
fn numeric_inline_key_is_sealed_and_the_author_is_the_principal() {
    let fleet = start("sec-sealed", &[]);
    let (status, body) = http(&fleet, "POST", "/v1/policy?author=mallory", &policy());
    assert_eq!(status, 200, "{body}");

    let (status, body) = http(&fleet, "GET", "/v1/policy", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.contains(NUMERIC_KEY),
        "inline key stored plain: {body}"
    );
    assert!(body.contains("encrypted: v1:"), "{body}");
    assert!(
        body.contains("admin-token (claims mallory)"),
        "the claimed author replaced the principal: {body}"
    );

    let ctl = Command::new(binary())
        .args(["ctl", "--server", &fleet.cp.url(), "--ca"])
        .arg(fleet.dir.join("ca.pem"))
        .args(["get", "policy"])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(ctl.status.success(), "{ctl:?}");
    let shown = String::from_utf8_lossy(&ctl.stdout);
    assert!(shown.contains("encrypted: v1:"), "{shown}");
    assert!(!shown.contains(NUMERIC_KEY), "{shown}");
    assert!(!fleet.cp.process.logs().contains(NUMERIC_KEY));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["cp.db", "cp.db-wal", "cp.db-shm"] {
            let path = fleet.dir.join(file);
            if let Ok(meta) = std::fs::metadata(&path) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
            } else {
                assert_ne!(file, "cp.db", "the store was not created");
            }
        }
    }
}

#[test]
fn alias_bomb_is_refused() {
    let fleet = start("sec-alias", &[]);
    let scalar = "x".repeat(100_000);
    let mut bomb = format!("aliases:\n  a0: &big \"{scalar}\"\n");
    for i in 1..50 {
        bomb.push_str(&format!("  a{i}: *big\n"));
    }
    let (status, body) = http(&fleet, "POST", "/v1/policy?dry_run=1", &bomb);
    assert_eq!(status, 422, "{}", &body[..body.len().min(300)]);
    assert!(body.contains("not allowed"), "{body}");
    assert!(body.len() < 10_000, "the answer echoed the expansion");
    let (status, _) = http(&fleet, "GET", "/v1/policy", "");
    assert_eq!(status, 404, "something was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_scope_is_enforced_by_default() {
    let fleet = start("sec-scope", &[]);
    let (status, body) = http(&fleet, "POST", "/v1/policy", &policy());
    assert_eq!(status, 200, "{body}");
    let edge = gen_scoped_certs(binary(), &fleet.dir, "edge-eu", "edge", "eu");
    let mut c = node_client(&fleet, &edge).await;

    // The edge certificate claiming to be the US egress gets nothing.
    let r = c
        .watch(hello("egress-us", pb::NodeRole::Egress, "us"))
        .await;
    assert_eq!(r.err().unwrap().code(), tonic::Code::PermissionDenied);

    // Claiming what it is, it is served, without key material.
    let mut stream = c
        .watch(hello("edge-eu", pb::NodeRole::Edge, "eu"))
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(snap.providers.values().all(|p| p.key_pools.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_certificate_cannot_take_a_node_id() {
    let fleet = start("sec-spoof", &[]);
    let (status, body) = http(&fleet, "POST", "/v1/policy", &policy());
    assert_eq!(status, 200, "{body}");
    let owner_certs = gen_scoped_certs(binary(), &fleet.dir, "egress-us-1", "egress", "us");
    let rogue_certs = gen_scoped_certs(binary(), &fleet.dir, "egress-us-2", "egress", "us");
    let mut owner = node_client(&fleet, &owner_certs).await;
    let mut rogue = node_client(&fleet, &rogue_certs).await;

    let mut stream = owner
        .watch(hello("egress-us", pb::NodeRole::Egress, "us"))
        .await
        .unwrap()
        .into_inner();
    let snap = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let taken = rogue
        .watch(hello("egress-us", pb::NodeRole::Egress, "us"))
        .await;
    assert_eq!(taken.err().unwrap().code(), tonic::Code::AlreadyExists);

    let ack = |ok| pb::AckRequest {
        node_id: "egress-us".into(),
        version: snap.version,
        ok,
        reason: if ok { String::new() } else { "forged".into() },
    };
    let forged = rogue.ack(ack(false)).await;
    assert_eq!(forged.err().unwrap().code(), tonic::Code::PermissionDenied);
    owner.ack(ack(true)).await.unwrap();

    let batch = pb::TelemetryBatch {
        node_id: "egress-us".into(),
        region: "us".into(),
        role: pb::NodeRole::Egress as i32,
        ..Default::default()
    };
    let report = rogue.report(futures::stream::iter(vec![batch])).await;
    assert_eq!(report.err().unwrap().code(), tonic::Code::PermissionDenied);

    let (_, nodes) = http(&fleet, "GET", "/v1/nodes", "");
    assert!(!nodes.contains("forged"), "{nodes}");
    assert_eq!(nodes.matches("\"egress-us\"").count(), 1, "{nodes}");
}

#[test]
fn a_trickled_request_head_is_cut_at_the_deadline() {
    let fleet = start("sec-trickle", &["--header-timeout-seconds", "1"]);
    let mut s = TcpStream::connect(fleet.cp.http_addr).unwrap();
    // The read timeout paces the trickle: one byte, then wait for the
    // server for a while, and again.
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let head = b"GET /v1/nodes HTTP/1.1\r\nhost: cp\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let started = Instant::now();
    let mut cut = false;
    let mut buf = [0u8; 1024];
    'trickle: for byte in head.iter().cycle().take(200) {
        if s.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    cut = true;
                    break 'trickle;
                }
                // A 408 may come before the close.
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(_) => {
                    cut = true;
                    break 'trickle;
                }
            }
        }
    }
    assert!(cut, "a trickling client kept its connection");
    // Generous: the deadline is 1 s; the trickle would last 50 s.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn connections_over_the_per_ip_limit_are_closed() {
    let fleet = start("sec-connlimit", &["--max-connections-per-ip", "2"]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(fleet.cp.http_addr).unwrap())
        .collect();
    // Bounded poll: a connection the launcher made may not be closed yet.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut extra = TcpStream::connect(fleet.cp.http_addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 16];
        let closed = match extra.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        if closed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the third connection was kept open"
        );
    }
    drop(held);
}
