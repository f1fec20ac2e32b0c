//! The control plane end to end, in-process on real sockets: a replica (or
//! two) on ephemeral ports, node agents for two edges and two egresses,
//! operators over gRPC and HTTP/JSON.
//!
//! PostgreSQL tests run when `SWITCHYARD_TEST_PG_URL` is set (see
//! `tests/pg.sh`) and say so when skipped.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use switchyard_control::client;
use switchyard_control::node_client::{AgentStatus, NodeAgent, NodeConfig, NodeTls, Role};
use switchyard_control::pb;
use switchyard_control::secrets::{MasterKey, MasterKeys, MASTER_KEY_ENV};
use switchyard_control::server::{self, RunningControlPlane, ServerConfig, TlsPem};
use switchyard_control::telemetry::RequestRecord;
use switchyard_control::tonic;
use switchyard_proto::{KeyHash, Secret, Snapshot};

const WAIT: Duration = Duration::from_secs(15);
const MASTER: &str = "3c1f9a0e7b52d4686e0b9c27f1a3d5e4902b7c6a18f4e3d25c9b0a7e6f1d2c38";
const SEALED_KEY: &str = "sk-inline-7f3a9c-never-printed";
const EU_ENV_KEY: &str = "sk-eu-env-41d2-never-printed";
const US_ENV_KEY: &str = "sk-us-env-88b1-never-printed";

/// Every log line of this test binary, to grep for key material.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,h2=info,hyper=info,tower=info,sqlx=warn")
            .with_writer(|| Capture)
            .try_init();
    });
}

fn master() -> MasterKeys {
    MasterKeys {
        current: Some(MasterKey::from_hex(MASTER, MASTER_KEY_ENV).unwrap()),
        previous: None,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sy-e2e-control-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(store_url: &str) -> ServerConfig {
    let mut c = ServerConfig::new("127.0.0.1:0".parse().unwrap(), store_url);
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    c.admin_token = Some(Secret::new("admin-token-e2e"));
    c.master_keys = master();
    c.poll_interval = Duration::from_millis(200);
    c.score_interval = Duration::from_millis(200);
    c
}

/// The multi-region policy, plus an EU provider whose key is given inline
/// (sealed by the control plane) and an EU-only tenant.
fn policy(upstream_timeout_ms: u64) -> String {
    format!(
        r#"
regions:
  eu-west: {{ jurisdiction: eu }}
  us-east: {{ jurisdiction: us }}
limits: {{ upstream_timeout_ms: {upstream_timeout_ms} }}
providers:
  openai-us:
    kind: openai
    region: us-east
    models: [gpt-4o]
    key_pools: [ {{ keys: [ {{ env: US_KEY }} ] }} ]
  mistral-eu:
    kind: openai-compatible
    base_url: http://127.0.0.1:9/v1
    region: eu-west
    models: [mistral-large]
    key_pools:
      - keys: [ {{ env: EU_KEY }}, {{ value: "{SEALED_KEY}" }} ]
routes:
  chat:
    targets:
      - {{ provider: mistral-eu, model: mistral-large }}
      - {{ provider: openai-us, model: gpt-4o }}
tenants:
  - id: eu-tenant
    key_sha256: "{}"
    allowed_models: [chat]
    residency: [eu]
"#,
        KeyHash::of("sy-eu-tenant").to_hex()
    )
}

async fn operator(cp: &RunningControlPlane) -> client::Operator {
    client::connect(
        &format!("http://{}", cp.grpc_addr),
        Some(&Secret::new("admin-token-e2e")),
        None,
    )
    .await
    .unwrap()
}

async fn apply(op: &mut client::Operator, yaml: &str) -> pb::ApplyPolicyResponse {
    op.apply_policy(pb::ApplyPolicyRequest {
        yaml: yaml.to_string(),
        dry_run: false,
        author: "e2e".into(),
        comment: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

struct TestNode {
    agent: NodeAgent,
    shared: Arc<ArcSwap<Snapshot>>,
}

fn node_config(addr: SocketAddr, id: &str, role: Role, region: &str) -> NodeConfig {
    let mut c = NodeConfig::new(format!("http://{addr}"), id, role, region);
    c.env = Arc::new(|k| match k {
        "EU_KEY" => Some(EU_ENV_KEY.to_string()),
        "US_KEY" => Some(US_ENV_KEY.to_string()),
        _ => None,
    });
    c.report_interval = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(300);
    c
}

fn start_node(config: NodeConfig) -> TestNode {
    let shared = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let agent = NodeAgent::start(config, shared.clone()).unwrap();
    TestNode { agent, shared }
}

// The binding drops the watch guard before `rx` (edition 2021 tail-expression order).
#[allow(clippy::let_and_return)]
async fn wait_for(node: &TestNode, what: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
    let mut rx = node.agent.watch_status();
    let r = tokio::time::timeout(WAIT, rx.wait_for(|s| what(s)))
        .await
        .expect("timed out waiting for the node");
    let status = r.unwrap().clone();
    status
}

fn fleet(addr: SocketAddr, dir: Option<&PathBuf>) -> Vec<TestNode> {
    [
        ("edge-eu", Role::Edge, "eu-west"),
        ("edge-us", Role::Edge, "us-east"),
        ("egress-eu", Role::Egress, "eu-west"),
        ("egress-us", Role::Egress, "us-east"),
    ]
    .into_iter()
    .map(|(id, role, region)| {
        let mut c = node_config(addr, id, role, region);
        if let Some(d) = dir {
            c.cache_path = Some(d.join(format!("{id}.pb")));
        }
        start_node(c)
    })
    .collect()
}

fn keys_of(s: &Snapshot) -> Vec<String> {
    let mut k: Vec<String> = s
        .providers()
        .values()
        .flat_map(|p| p.keys.iter().map(|k| k.expose().to_string()))
        .collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reaches_every_node_and_invalid_policy_changes_nothing() {
    init();
    let dir = temp_dir("apply");
    let cp = server::start(config(&format!("sqlite://{}/cp.db", dir.display())))
        .await
        .unwrap();
    let mut op = operator(&cp).await;
    let nodes = fleet(cp.grpc_addr, None);

    let r = apply(&mut op, &policy(60000)).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.applied);
    let v1 = r.version;
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v1).await;
    }

    // Tailoring: edges hold no key material, each egress only its region's.
    for edge in &nodes[..2] {
        let s = edge.shared.load();
        assert!(keys_of(&s).is_empty());
        assert!(s.providers().values().all(|p| p.key_pools.is_empty()));
    }
    assert_eq!(keys_of(&nodes[2].shared.load()), [EU_ENV_KEY, SEALED_KEY]);
    assert_eq!(keys_of(&nodes[3].shared.load()), [US_ENV_KEY]);

    // Residency on the node: the EU tenant's plan never contains the US target.
    let edge = nodes[0].shared.load();
    let tenant = edge.tenant_for_key("sy-eu-tenant").unwrap();
    let res = tenant.residency.clone();
    let plan = edge.plan("chat", res.as_deref()).unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].target.provider, "mistral-eu");
    assert!(edge.plan("openai-us/gpt-4o", res.as_deref()).is_err());

    // An invalid document: every error, nothing changed.
    let bad = policy(60000)
        .replace("provider: openai-us", "provider: antropic")
        .replace("residency: [eu]", "residency: [eu, mars]")
        .replace("region: us-east", "region: us-wast");
    let r = apply(&mut op, &bad).await;
    assert!(!r.applied);
    assert_eq!(r.version, v1);
    let paths: Vec<_> = r.errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "routes.chat.targets[1].provider",
        "tenants[0].residency[1]",
        "providers.openai-us.region",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    let got = op
        .get_policy(pb::GetPolicyRequest { version: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.policy.unwrap().version, v1);
    assert_eq!(got.history.len(), 1);

    // A residency violation is refused with its path.
    let leaving = policy(60000).replace(
        "      - { provider: mistral-eu, model: mistral-large }\n",
        "",
    );
    let r = apply(&mut op, &leaving).await;
    assert!(!r.applied);
    assert!(
        r.errors
            .iter()
            .any(|e| e.path == "tenants[0].allowed_models[0]" && e.message.contains("residency")),
        "{:?}",
        r.errors
    );

    // A dry run shows the diff and changes nothing; a real apply reaches everyone.
    let mut dry = pb::ApplyPolicyRequest {
        yaml: policy(30000),
        dry_run: true,
        author: "e2e".into(),
        comment: String::new(),
    };
    let r = op.apply_policy(dry.clone()).await.unwrap().into_inner();
    assert!(
        !r.applied && r.version == v1 && r.diff.contains("upstream_timeout=30s"),
        "{r:?}"
    );
    dry.dry_run = false;
    let mut acks = cp.state.subscribe_acks();
    let v2 = op.apply_policy(dry).await.unwrap().into_inner().version;
    assert_eq!(v2, v1 + 1);
    wait_acks(&mut acks, nodes.len(), v2).await;
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v2).await;
        assert_eq!(
            n.shared.load().limits().upstream_timeout,
            Duration::from_secs(30)
        );
    }

    // ctl nodes: everyone acknowledged the current version.
    let listed = nodes_until(&mut op, |r| r.nodes.iter().all(|n| n.acked_version == v2)).await;
    assert_eq!(listed.current_version, v2);
    assert_eq!(listed.nodes.len(), 4);
    for n in &listed.nodes {
        assert_eq!((n.acked_version, n.health.as_str()), (v2, "ok"), "{n:?}");
    }

    // Rollback makes v1's document current as v3.
    let r = op
        .rollback(pb::RollbackRequest {
            version: v1,
            author: "e2e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, v2 + 1);
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v2 + 1).await;
        assert_eq!(
            n.shared.load().limits().upstream_timeout,
            Duration::from_secs(60)
        );
    }

    // Operators must authenticate.
    let mut anon = client::connect(&format!("http://{}", cp.grpc_addr), None, None)
        .await
        .unwrap();
    let e = anon.list_nodes(pb::ListNodesRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic_code_unauthenticated());

    for n in nodes {
        n.agent.shutdown().await;
    }
    cp.shutdown().await;
}

/// Waits until `n` distinct nodes ACKed `version` at the control plane.
async fn wait_acks(
    acks: &mut tokio::sync::broadcast::Receiver<switchyard_control::server::AckEvent>,
    n: usize,
    version: u64,
) {
    let mut seen = std::collections::HashSet::new();
    tokio::time::timeout(WAIT, async {
        while seen.len() < n {
            let a = acks.recv().await.unwrap();
            if a.ok && a.version == version {
                seen.insert(a.node_id);
            }
        }
    })
    .await
    .expect("every node acknowledged");
}

/// The node registry is written just after an ACK is announced; reads
/// retry briefly until it shows what the test expects.
async fn nodes_until(
    op: &mut client::Operator,
    what: impl Fn(&pb::ListNodesResponse) -> bool,
) -> pb::ListNodesResponse {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = op
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        if what(&r) || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tonic_code_unauthenticated() -> tonic::Code {
    tonic::Code::Unauthenticated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_rejects_a_snapshot_keeps_the_old_one() {
    init();
    let dir = temp_dir("nack");
    let cp = server::start(config(&format!("sqlite://{}/cp.db", dir.display())))
        .await
        .unwrap();
    let mut op = operator(&cp).await;
    let mut acks = cp.state.subscribe_acks();
    let mut c = node_config(cp.grpc_addr, "egress-eu", Role::Egress, "eu-west");
    c.validate = Some(Arc::new(|s: &Snapshot| {
        if s.limits().upstream_timeout < Duration::from_secs(10) {
            Err("upstream timeout below 10 s is not supported here".into())
        } else {
            Ok(())
        }
    }));
    let node = start_node(c);
    let v1 = apply(&mut op, &policy(60000)).await.version;
    wait_for(&node, |s| s.applied_version == v1).await;

    let v2 = apply(&mut op, &policy(5000)).await.version;
    let st = wait_for(&node, |s| s.last_nack.is_some()).await;
    assert_eq!(st.applied_version, v1);
    let (nacked, reason) = st.last_nack.unwrap();
    assert_eq!(nacked, v2);
    assert!(reason.contains("below 10 s"), "{reason}");
    assert_eq!(
        node.shared.load().limits().upstream_timeout,
        Duration::from_secs(60)
    );
    // The control plane saw the NACK and reports it.
    loop {
        let a = tokio::time::timeout(WAIT, acks.recv())
            .await
            .unwrap()
            .unwrap();
        if a.version == v2 {
            assert!(!a.ok);
            break;
        }
    }
    let listed = nodes_until(&mut op, |r| r.nodes.iter().all(|n| n.nacked_version == v2)).await;
    let n = &listed.nodes[0];
    assert_eq!((n.acked_version, n.nacked_version), (v1, v2));
    assert_eq!(n.health, "rejected");
    assert!(n.nack_reason.contains("below 10 s"));

    // A key reference the egress cannot resolve is a NACK too.
    let v3 = apply(
        &mut op,
        &policy(60000).replace("env: EU_KEY", "env: EU_KEY_MISSING"),
    )
    .await
    .version;
    let st = wait_for(&node, |s| s.last_nack.as_ref().is_some_and(|n| n.0 == v3)).await;
    assert!(st
        .last_nack
        .unwrap()
        .1
        .contains("$EU_KEY_MISSING is not set"));
    assert_eq!(node.shared.load().version(), v1);

    node.agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_survive_the_control_plane_and_restart_from_disk() {
    init();
    let dir = temp_dir("static");
    let store = format!("sqlite://{}/cp.db", dir.display());
    let cp = server::start(config(&store)).await.unwrap();
    let addr = cp.grpc_addr;
    let mut op = operator(&cp).await;
    let nodes = fleet(addr, Some(&dir));
    let v1 = apply(&mut op, &policy(60000)).await.version;
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v1).await;
    }
    drop(op);
    cp.shutdown().await;
    for n in &nodes {
        wait_for(n, |s| !s.connected).await;
        assert_eq!(n.shared.load().version(), v1, "still serving");
    }
    for n in nodes {
        n.agent.shutdown().await;
    }

    // A node (re)started while the control plane is down serves from disk.
    let mut c = node_config(addr, "egress-eu", Role::Egress, "eu-west");
    c.cache_path = Some(dir.join("egress-eu.pb"));
    let node = start_node(c.clone());
    let st = node.agent.status();
    assert!(st.from_cache && st.applied_version == v1, "{st:?}");
    assert_eq!(keys_of(&node.shared.load()), [EU_ENV_KEY, SEALED_KEY]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("egress-eu.pb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // An edge's cache holds no key material at all.
    let edge_cache = std::fs::read(dir.join("edge-eu.pb")).unwrap();
    for secret in [SEALED_KEY, EU_ENV_KEY, US_ENV_KEY, "EU_KEY"] {
        assert!(!contains(&edge_cache, secret), "{secret} in edge cache");
    }

    // The control plane comes back on the same address and store: the node
    // reconnects on its own and acknowledges the (same) version.
    let mut cfg = config(&store);
    cfg.listen = addr;
    cfg.http_listen = None;
    let cp = server::start(cfg).await.unwrap();
    let mut acks = cp.state.subscribe_acks();
    wait_for(&node, |s| s.connected && !s.from_cache).await;
    wait_acks(&mut acks, 1, v1).await;
    let mut op = operator(&cp).await;
    let listed = nodes_until(&mut op, |r| {
        r.nodes
            .iter()
            .any(|n| n.id == "egress-eu" && n.connected_ok())
    })
    .await;
    let n = listed.nodes.iter().find(|n| n.id == "egress-eu").unwrap();
    assert_eq!(n.acked_version, v1);
    node.agent.shutdown().await;
    cp.shutdown().await;
}

trait Health {
    fn connected_ok(&self) -> bool;
}

impl Health for pb::NodeStatusMsg {
    fn connected_ok(&self) -> bool {
        self.health == "ok"
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_never_leaves_through_apis_or_logs() {
    init();
    let dir = temp_dir("secrets");
    let cp = server::start(config(&format!("sqlite://{}/cp.db", dir.display())))
        .await
        .unwrap();
    let mut op = operator(&cp).await;
    let nodes = fleet(cp.grpc_addr, Some(&dir));
    let r = apply(&mut op, &policy(60000)).await;
    let v = r.version;
    let mut answers = format!("{r:?}");
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v).await;
        answers.push_str(&format!("{:?}", n.shared.load()));
    }
    // Errors mentioning a key field do not echo the key either.
    let r = apply(
        &mut op,
        &policy(60000).replace(
            &format!("{{ value: \"{SEALED_KEY}\" }}"),
            &format!("{{ value: \"{SEALED_KEY}\", env: X }}"),
        ),
    )
    .await;
    assert!(!r.errors.is_empty());
    answers.push_str(&format!("{r:?}"));
    let dry = op
        .apply_policy(pb::ApplyPolicyRequest {
            yaml: policy(1000),
            dry_run: true,
            author: String::new(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    answers.push_str(&format!("{dry:?}"));
    for version in [0, v] {
        let got = op
            .get_policy(pb::GetPolicyRequest { version })
            .await
            .unwrap()
            .into_inner();
        answers.push_str(&format!("{got:?}"));
    }
    answers.push_str(&format!(
        "{:?}",
        op.list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
    ));
    let rotated = op
        .rotate_keys(pb::RotateKeysRequest {
            author: "e2e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    answers.push_str(&format!("{rotated:?}"));
    for n in &nodes {
        wait_for(n, |s| s.applied_version == rotated.version).await;
    }
    // HTTP/JSON answers.
    let http = reqwest::Client::new();
    let base = format!("http://{}", cp.http_addr.unwrap());
    for (method, path, body) in [
        ("GET", "/v1/policy", String::new()),
        ("GET", "/v1/nodes", String::new()),
        ("POST", "/v1/policy?dry_run=1", policy(2000)),
        (
            "POST",
            "/v1/policy",
            policy(60000).replace("routes:", "routez:"),
        ),
    ] {
        let req = match method {
            "GET" => http.get(format!("{base}{path}")),
            _ => http.post(format!("{base}{path}")).body(body),
        };
        let resp = req
            .header("authorization", "Bearer admin-token-e2e")
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        if path.contains("dry_run") || method == "GET" {
            assert!(status.is_success(), "{path}: {status} {text}");
        } else {
            assert_eq!(status.as_u16(), 422, "{text}");
            assert!(text.contains("routez"), "{text}");
        }
        answers.push_str(&text);
    }
    let unauth = http.get(format!("{base}/v1/nodes")).send().await.unwrap();
    assert_eq!(unauth.status().as_u16(), 401);

    for secret in [SEALED_KEY, EU_ENV_KEY, US_ENV_KEY] {
        assert!(!answers.contains(secret), "{secret} in an API answer");
        assert!(
            !contains(&logs().lock().unwrap(), secret),
            "{secret} in the logs"
        );
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("cp.db") {
                let bytes = std::fs::read(&f).unwrap();
                assert!(!contains(&bytes, secret), "{secret} stored in {name}");
            }
        }
    }
    assert!(!logs().lock().unwrap().is_empty(), "logs were captured");
    // The stored document holds the sealed form only.
    let stored = op
        .get_policy(pb::GetPolicyRequest { version: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.policy.unwrap().yaml.contains("encrypted: v1:"));
    for n in nodes {
        n.agent.shutdown().await;
    }
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_becomes_scores_on_every_node() {
    init();
    let dir = temp_dir("scores");
    let cp = server::start(config(&format!("sqlite://{}/cp.db", dir.display())))
        .await
        .unwrap();
    let mut op = operator(&cp).await;
    let nodes = fleet(cp.grpc_addr, None);
    let v = apply(&mut op, &policy(60000)).await.version;
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v).await;
    }
    let egress = nodes[2].agent.telemetry();
    for i in 0..50 {
        egress.record(RequestRecord {
            provider: "mistral-eu".into(),
            model: "mistral-large".into(),
            region: "eu-west".into(),
            ttft: Some(Duration::from_millis(if i < 45 { 80 } else { 1500 })),
            latency: Duration::from_millis(400),
            error_class: (i % 10 == 0).then(|| "upstream_5xx".to_string()),
            input_tokens: 100,
            output_tokens: 20,
            cost_usd: 0.0002,
        });
    }
    nodes[0]
        .agent
        .telemetry()
        .record_rtt("us-east", "10.0.0.9:7443", Duration::from_millis(70));
    for n in &nodes {
        wait_for(n, |s| s.scores_generation > 0).await;
        let mut rx = n.agent.watch_status();
        let s = tokio::time::timeout(WAIT, async {
            loop {
                let snap = n.shared.load_full();
                if snap.scores().targets.values().any(|t| t.requests == 50)
                    && !snap.scores().backhaul.is_empty()
                {
                    return snap;
                }
                let _ = rx.changed().await;
            }
        })
        .await
        .expect("scores reached the node");
        let t = s.scores().targets.values().next().unwrap();
        assert_eq!(t.ttft_p50_ms, 100.0);
        assert_eq!(t.ttft_p99_ms, 2000.0);
        assert!((t.error_rate - 0.1).abs() < 1e-9);
        let rtt = s.scores().backhaul[&("eu-west".to_string(), "us-east".to_string())];
        assert_eq!(rtt.p50_ms, 100.0);
        assert_eq!(
            s.version(),
            v,
            "a score refresh is not a new policy version"
        );
    }
    for n in nodes {
        n.agent.shutdown().await;
    }
    cp.shutdown().await;
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    node: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf(vec!["localhost".into()]),
        node: leaf(vec![server::node_scope_name("egress", "eu-west")]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_need_client_certificates_over_tls() {
    init();
    let dir = temp_dir("mtls");
    let pki = pki();
    let mut cfg = config(&format!("sqlite://{}/cp.db", dir.display()));
    cfg.tls = Some(TlsPem {
        cert: pki.server.0.clone().into_bytes(),
        key: Secret::new(pki.server.1.clone()),
        client_ca: Some(pki.ca_pem.clone().into_bytes()),
    });
    let cp = server::start(cfg).await.unwrap();
    let url = format!("https://localhost:{}", cp.grpc_addr.port());
    let tls = client::ClientTls {
        ca: Some(pki.ca_pem.clone().into_bytes()),
        identity: None,
        domain: None,
    };
    let mut op = client::connect(&url, Some(&Secret::new("admin-token-e2e")), Some(tls))
        .await
        .unwrap();
    let v = apply(&mut op, &policy(60000)).await.version;

    let node_tls = NodeTls {
        ca: pki.ca_pem.clone().into_bytes(),
        cert: pki.node.0.clone().into_bytes(),
        key: Secret::new(pki.node.1.clone()),
        domain: None,
    };
    let mut c = node_config(cp.grpc_addr, "egress-eu", Role::Egress, "eu-west");
    c.endpoint = url.clone();
    let good = start_node(c.tls(node_tls));
    wait_for(&good, |s| s.applied_version == v).await;
    assert_eq!(keys_of(&good.shared.load()), [EU_ENV_KEY, SEALED_KEY]);

    // Same CA trust, no client certificate: refused, nothing received.
    let no_cert = {
        let ep = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem)),
            )
            .unwrap();
        let mut client = pb::node_client::NodeClient::new(ep.connect().await.unwrap());
        client
            .watch(pb::Hello {
                id: "intruder".into(),
                role: pb::NodeRole::Egress as i32,
                region: "eu-west".into(),
                build: String::new(),
                have_version: 0,
            })
            .await
    };
    assert_eq!(no_cert.unwrap_err().code(), tonic::Code::Unauthenticated);
    good.agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_and_two_replicas() {
    init();
    let Ok(admin_url) = std::env::var("SWITCHYARD_TEST_PG_URL") else {
        eprintln!("skipped: SWITCHYARD_TEST_PG_URL is not set (start one with tests/pg.sh)");
        return;
    };
    let url = switchyard_control::store::Store::fresh_postgres_database_for_tests(&admin_url)
        .await
        .unwrap();
    let mut a_cfg = config(&url);
    a_cfg.replica_id = "cp-a".into();
    // Long poll interval: the change must travel by NOTIFY.
    a_cfg.poll_interval = Duration::from_secs(30);
    let mut b_cfg = config(&url);
    b_cfg.replica_id = "cp-b".into();
    b_cfg.poll_interval = Duration::from_secs(30);
    let (a, b) = tokio::join!(server::start(a_cfg), server::start(b_cfg));
    let (a, b) = (a.unwrap(), b.unwrap());
    let nodes = fleet(b.grpc_addr, None);
    let mut op_a = operator(&a).await;
    let v1 = apply(&mut op_a, &policy(60000)).await.version;
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v1).await;
    }
    // Operators see the fleet through either replica.
    let listed = nodes_until(&mut op_a, |r| {
        r.nodes.len() == 4 && r.nodes.iter().all(|n| n.acked_version == v1)
    })
    .await;
    assert_eq!(listed.nodes.len(), 4);
    assert!(listed
        .nodes
        .iter()
        .all(|n| n.replica == "cp-b" && n.acked_version == v1));
    // Versions stay one sequence across replicas.
    let mut op_b = operator(&b).await;
    let v2 = apply(&mut op_b, &policy(30000)).await.version;
    assert_eq!(v2, v1 + 1);
    for n in &nodes {
        wait_for(n, |s| s.applied_version == v2).await;
    }
    for n in nodes {
        n.agent.shutdown().await;
    }
    a.shutdown().await;
    b.shutdown().await;
}
