//! The whole fleet as real processes: a control plane (TLS, node mTLS,
//! SQLite store), two edges and two egress nodes in two jurisdictions, all
//! following pushed snapshots, with fixture-replaying mock providers whose
//! call logs prove where each request went.
//!
//! The second test runs the one-command local fleet (`switchyard fleet`):
//! both regional ports, a policy change reaching both regions, an egress
//! restart survived, everything stopped with the fleet.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_testkit::cluster::{
    free_udp_port, gen_certs, gen_scoped_certs, ControlPlaneNode, EdgeNode, EgressNode, LocalFleet,
    NodeCerts,
};
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::mock::MockUpstream;

const ADMIN_TOKEN: &str = "admin-token-for-tests-1234";
const EU_KEY: &str = "sk-eu-SECRET-11aa22bb33cc";
const US_INLINE_KEY: &str = "sk-us-INLINE-SECRET-44dd55ee";
const MASTER_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const EU_TENANT_KEY: &str = "sy-eu-tenant-key-0001";
const GLOBAL_TENANT_KEY: &str = "sy-global-tenant-key-0002";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn hash(key: &str) -> String {
    let out = Command::new(binary())
        .args(["hash-key", key])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `eu_model` is the model the EU target asks its provider for; a
/// `case-error-...` name makes that provider fail.
fn policy(
    eu_addr: &str,
    us_addr: &str,
    eu: &MockUpstream,
    us: &MockUpstream,
    order: &str,
    eu_model: &str,
) -> String {
    let (first, second) = if order == "eu-first" {
        (
            format!("eu-openai, model: {eu_model}"),
            "us-openai, model: gpt-4o".to_string(),
        )
    } else {
        (
            "us-openai, model: gpt-4o".to_string(),
            format!("eu-openai, model: {eu_model}"),
        )
    };
    format!(
        r#"
regions:
  eu: {{ jurisdiction: eu, egress: ["{eu_addr}"] }}
  us: {{ jurisdiction: us, egress: ["{us_addr}"] }}
limits: {{ upstream_timeout_ms: 5000 }}
providers:
  eu-openai:
    kind: openai-compatible
    base_url: {eu_url}/v1
    region: eu
    models: [gpt-4o]
    key_pools:
      - keys: [{{ env: EU_KEY }}]
  us-openai:
    kind: openai-compatible
    base_url: {us_url}/v1
    region: us
    models: [gpt-4o]
    key_pools:
      - keys: [{{ value: "{US_INLINE_KEY}" }}]
routes:
  chat:
    targets:
      - {{ provider: {first} }}
      - {{ provider: {second} }}
tenants:
  - id: eu-tenant
    key_sha256: "{eu_hash}"
    allowed_models: [chat]
    residency: [eu]
    # Served through the US edge too (read there, sent to the EU): this
    # test is about routing; the strict default refuses it at that edge
    # (tests/tenants_fleet.rs).
    edge_residency: relaxed
  - id: global
    key_sha256: "{global_hash}"
"#,
        eu_url = eu.url(),
        us_url = us.url(),
        eu_hash = hash(EU_TENANT_KEY),
        global_hash = hash(GLOBAL_TENANT_KEY),
    )
}

struct ControlApi {
    http: String,
}

impl ControlApi {
    async fn apply(&self, yaml: &str) -> (u16, Value) {
        let r = client()
            .post(format!("{}/v1/policy?author=test", self.http))
            .bearer_auth(ADMIN_TOKEN)
            .body(yaml.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn nodes(&self) -> Value {
        client()
            .get(format!("{}/v1/nodes", self.http))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits (bounded) until `count` nodes acknowledged `version`.
    async fn wait_acked(&self, version: u64, count: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let nodes = self.nodes().await;
            let acked = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["acked_version"].as_u64() == Some(version))
                .count();
            if acked >= count {
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "only {acked} of {count} nodes acked v{version}: {nodes}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn chat(
    edge: &EdgeNode,
    key: &str,
    residency: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client()
        .post(format!("{}/chat/completions", edge.base_url()))
        .bearer_auth(key)
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "What is 4200 + 42?"}]}));
    if let Some(r) = residency {
        req = req.header("x-switchyard-residency", r);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

fn cp_flags(cp_url: &str, state: &Path) -> Vec<String> {
    vec![
        "--control-plane".into(),
        cp_url.into(),
        "--state-dir".into(),
        state.display().to_string(),
    ]
}

#[tokio::test]
async fn control_plane_drives_a_two_jurisdiction_fleet() {
    let dir = temp_dir("fleet");
    let certs = |name: &str| gen_certs(binary(), &dir, name);
    let cp_certs: NodeCerts = certs("control-plane");
    // Node certificates are scoped: each may claim only its role and region.
    let scoped =
        |name: &str, role: &str, region: &str| gen_scoped_certs(binary(), &dir, name, role, region);
    let (edge_eu_certs, edge_us_certs) = (
        scoped("edge-eu", "edge", "eu"),
        scoped("edge-us", "edge", "us"),
    );
    let (egress_eu_certs, egress_us_certs) = (
        scoped("egress-eu", "egress", "eu"),
        scoped("egress-us", "egress", "us"),
    );
    let eu_mock = MockUpstream::start().await;
    let us_mock = MockUpstream::start().await;
    let (eu_addr, us_addr) = (free_udp_port(), free_udp_port());

    let cp_env = vec![
        ("SY_ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("SWITCHYARD_MASTER_KEY".to_string(), MASTER_KEY.to_string()),
    ];
    let store = format!("sqlite://{}", dir.join("cp.db").display());
    let mut cp =
        ControlPlaneNode::start(binary(), &store, &cp_certs, "SY_ADMIN_TOKEN", None, &cp_env);
    let api = ControlApi {
        http: format!("http://{}", cp.http_addr),
    };

    // An invalid policy is refused with every error and its path; nothing changes.
    let (status, body) = api
        .apply("providers:\n  x: { kind: openai-compatible }\nroutes:\n  r: { targets: [{ provider: antropic, model: m }] }\n")
        .await;
    assert_eq!(status, 422, "{body}");
    let paths: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"providers.x.base_url"), "{paths:?}");
    assert!(
        paths.iter().any(|p| p.starts_with("routes.r.targets[0]")),
        "{paths:?}"
    );

    let v1 = policy(
        &eu_addr.to_string(),
        &us_addr.to_string(),
        &eu_mock,
        &us_mock,
        "eu-first",
        "gpt-4o",
    );
    let (status, body) = api.apply(&v1).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);

    let cp_url = cp.url();
    let state = |name: &str| dir.join("state").join(name);
    let egress_eu = EgressNode::start_with(
        binary(),
        "eu",
        Some(eu_addr),
        &cp_flags(&cp_url, &state("egress-eu")),
        &egress_eu_certs,
        &[("EU_KEY".into(), EU_KEY.into())],
    );
    let egress_us = EgressNode::start_with(
        binary(),
        "us",
        Some(us_addr),
        &cp_flags(&cp_url, &state("egress-us")),
        &egress_us_certs,
        &[],
    );
    let edge_eu = EdgeNode::start_with(
        binary(),
        "eu",
        &cp_flags(&cp_url, &state("edge-eu")),
        &edge_eu_certs,
        &[],
        &[],
    );
    let edge_us = EdgeNode::start_with(
        binary(),
        "us",
        &cp_flags(&cp_url, &state("edge-us")),
        &edge_us_certs,
        &[],
        &[],
    );
    let nodes = api.wait_acked(1, 4).await;
    let roles: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == "edge").count(), 2, "{nodes}");

    // v1 routes EU first.
    let (status, headers, body) = chat(&edge_us, GLOBAL_TENANT_KEY, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-switchyard-region"], "eu");
    assert_eq!(headers["x-switchyard-jurisdiction"], "eu");
    assert_eq!(eu_mock.requests().len(), 1);
    assert_eq!(
        eu_mock.requests()[0].header("authorization"),
        Some(format!("Bearer {EU_KEY}").as_str())
    );

    // v2 puts the US target first: every node acks it and routes by it.
    let v2 = policy(
        &eu_addr.to_string(),
        &us_addr.to_string(),
        &eu_mock,
        &us_mock,
        "us-first",
        "gpt-4o",
    );
    let (status, body) = api.apply(&v2).await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)), "{body}");
    api.wait_acked(2, 4).await;
    let (status, headers, _) = chat(&edge_eu, GLOBAL_TENANT_KEY, None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-switchyard-jurisdiction"], "us");
    assert_eq!(us_mock.requests().len(), 1);
    // The inline key reached the US egress, sealed at rest, never elsewhere.
    assert_eq!(
        us_mock.requests()[0].header("authorization"),
        Some(format!("Bearer {US_INLINE_KEY}").as_str())
    );
    // The EU tenant stays in the EU even when the US target is first.
    let (status, headers, _) = chat(&edge_us, EU_TENANT_KEY, None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-switchyard-jurisdiction"], "eu");
    assert_eq!(
        us_mock.requests().len(),
        1,
        "an EU request reached the US provider"
    );
    // The header narrows a tenant's residency, never widens it.
    let (status, _, body) = chat(&edge_us, GLOBAL_TENANT_KEY, Some("eu")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(us_mock.requests().len(), 1);
    let (status, _, body) = chat(&edge_us, EU_TENANT_KEY, Some("us")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "residency_blocked");

    // v3: the EU provider fails. Global traffic fails over to the US; EU
    // traffic gets the residency error and the US provider never sees it.
    let v3 = policy(
        &eu_addr.to_string(),
        &us_addr.to_string(),
        &eu_mock,
        &us_mock,
        "eu-first",
        "case-error-503-upstream-reset-text-plain",
    );
    assert_eq!(api.apply(&v3).await.0, 200);
    api.wait_acked(3, 4).await;
    let us_before = us_mock.requests().len();
    let (status, _, body) = chat(&edge_eu, EU_TENANT_KEY, None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "residency_blocked");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Residency rule"),
        "{body}"
    );
    assert_eq!(
        us_mock.requests().len(),
        us_before,
        "an EU request reached the US provider"
    );
    let (status, headers, body) = chat(&edge_eu, GLOBAL_TENANT_KEY, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-switchyard-jurisdiction"], "us");
    assert_eq!(us_mock.requests().len(), us_before + 1);

    // A fleet certificate scoped to the US egress cannot claim the EU
    // region (and so never receives EU keys); an unscoped one is refused too.
    for (name, rogue) in [
        ("us-claims-eu", egress_us_certs.clone()),
        ("unscoped", certs("unscoped")),
    ] {
        let mut p = std::process::Command::new(binary())
            .args([
                "egress",
                "--region",
                "eu",
                "--listen",
                &free_udp_port().to_string(),
            ])
            .args(cp_flags(&cp_url, &state(name)))
            .arg("--cert")
            .arg(&rogue.cert)
            .arg("--key")
            .arg(&rogue.key)
            .arg("--ca")
            .arg(&rogue.ca)
            .env("EU_KEY", EU_KEY)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let refusals = |logs: &str| logs.matches("node refused").count();
        let before = refusals(&cp.process.logs());
        while refusals(&cp.process.logs()) == before {
            assert!(
                Instant::now() < deadline,
                "{name}: the control plane did not refuse it"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = p.kill();
        let _ = p.wait();
        let cache = state(name).join("egress-eu.snapshot");
        assert!(!cache.exists(), "{name}: received a snapshot");
    }

    // Key material is in no edge, no API answer, no log line, no edge cache.
    let policy_answer = client()
        .get(format!("{}/v1/policy", api.http))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let nodes_answer = api.nodes().await.to_string();
    for secret in [EU_KEY, US_INLINE_KEY] {
        assert!(!policy_answer.contains(secret), "key in GET /v1/policy");
        assert!(!nodes_answer.contains(secret), "key in GET /v1/nodes");
        for (name, logs) in [
            ("control plane", cp.process.logs() + &cp.process.stdout()),
            (
                "edge eu",
                edge_eu.process.logs() + &edge_eu.process.stdout(),
            ),
            (
                "edge us",
                edge_us.process.logs() + &edge_us.process.stdout(),
            ),
            ("egress eu", egress_eu.process.logs()),
            ("egress us", egress_us.process.logs()),
        ] {
            assert!(!logs.contains(secret), "key in the {name} output");
        }
        for cache in ["edge-eu/edge-eu.snapshot", "edge-us/edge-us.snapshot"] {
            let bytes = std::fs::read(dir.join("state").join(cache)).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(secret),
                "key in {cache}"
            );
        }
    }
    let eu_egress_cache = std::fs::read(state("egress-eu").join("egress-eu.snapshot")).unwrap();
    assert!(
        !String::from_utf8_lossy(&eu_egress_cache).contains(US_INLINE_KEY),
        "US key on the EU egress"
    );

    // Control plane gone: traffic continues, and a restarted edge serves
    // from its on-disk snapshot.
    cp.process.kill();
    let (status, _, body) = chat(&edge_eu, GLOBAL_TENANT_KEY, None).await;
    assert_eq!(status, 200, "{body}");
    let mut edge_eu = edge_eu;
    edge_eu.process.kill();
    let edge_eu = EdgeNode::start_with(
        binary(),
        "eu",
        &cp_flags(&cp_url, &state("edge-eu")),
        &edge_eu_certs,
        &[],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, body) = chat(&edge_eu, GLOBAL_TENANT_KEY, None).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted edge never served: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((edge_eu, edge_us, egress_eu, egress_us));
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// Several threads: the test blocks on process waits while nodes answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_fleet_serves_both_regions_follows_policy_and_survives_an_egress_restart() {
    let mut fleet = LocalFleet::start(binary());
    let (global, eu_only) = (fleet.secret("tenant-key"), fleet.secret("tenant-key-eu"));

    // Both regional ports answer; the route prefers eu-west.
    for base in [&fleet.eu, &fleet.us] {
        let (status, region, body) = fleet.chat(base, &global).await;
        assert_eq!(
            (status, region.as_str()),
            (200, "eu-west"),
            "{base}: {body}"
        );
    }
    let (status, region, body) = fleet.chat(&fleet.us, &eu_only).await;
    assert_eq!((status, region.as_str()), (200, "eu-west"), "{body}");

    // The EU egress restarts (SIGTERM: it drains, the fleet starts it
    // again). Traffic that may leave the EU never fails meanwhile; EU-bound
    // traffic is served again once it is back.
    let old_pid = fleet.pid("egress-eu").expect("egress-eu pid");
    assert!(Command::new("kill")
        .args(["-TERM", &old_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut during = 0;
    loop {
        let (status, _, body) = fleet.chat(&fleet.eu, &global).await;
        assert_eq!(
            status, 200,
            "a request failed during the egress restart: {body}"
        );
        during += 1;
        let restarted = fleet.pid("egress-eu").is_some_and(|p| p != old_pid);
        if restarted && fleet.chat(&fleet.eu, &eu_only).await.0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the EU egress never came back: {}",
            fleet.process.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(old_pid), "the old egress process is still running");
    println!("egress restart: {during} requests during it, none failed");

    // A policy change reaches both regions: the route now prefers us-east.
    let policy = std::fs::read_to_string(fleet.dir.join("policy.yaml")).unwrap();
    let swapped = policy
        .replace(
            "      - { provider: sim-eu, model: sim-small }\n      - { provider: sim-us, model: sim-small }",
            "      - { provider: sim-us, model: sim-small }\n      - { provider: sim-eu, model: sim-small }",
        );
    assert_ne!(swapped, policy);
    let r = client()
        .post(format!("{}/v1/policy?author=test", fleet.operator_api))
        .bearer_auth(fleet.secret("admin-token"))
        .body(swapped)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for base in [fleet.eu.clone(), fleet.us.clone()] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, region, body) = fleet.chat(&base, &global).await;
            assert_eq!(status, 200, "{body}");
            if region == "us-east" {
                break;
            }
            assert!(Instant::now() < deadline, "{base} kept the old policy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The EU-bound tenant still stays in the EU.
    let (status, region, body) = fleet.chat(&fleet.us, &eu_only).await;
    assert_eq!((status, region.as_str()), (200, "eu-west"), "{body}");

    // Stopping the fleet stops everything it started.
    let pids: Vec<u32> = [
        "control-plane",
        "egress-eu",
        "egress-us",
        "edge-eu",
        "edge-us",
    ]
    .iter()
    .map(|n| fleet.pid(n).unwrap())
    .collect();
    fleet.process.terminate();
    let status = fleet
        .process
        .wait_exit(Duration::from_secs(60))
        .expect("the fleet stops");
    assert!(status.success(), "{status}: {}", fleet.process.logs());
    for pid in pids {
        assert!(!alive(pid), "node {pid} outlived the fleet");
    }
}
