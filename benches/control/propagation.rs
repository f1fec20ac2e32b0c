//! Propagation time: from an operator's apply to the last of N node agents
//! acknowledging the new version. In-process control plane (SQLite store)
//! and N in-process agents on real loopback gRPC connections.
//!
//!     CARGO_TARGET_DIR=/tmp/cp-target cargo bench -p switchyard-control --bench propagation
//!
//! `SY_BENCH_ROUNDS` (default 30) applies per fleet size; `SY_BENCH_NODES`
//! (default "2,10,50") the fleet sizes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use switchyard_control::node_client::{NodeAgent, NodeConfig, Role};
use switchyard_control::server::{self, ServerConfig};
use switchyard_proto::Snapshot;

fn policy(round: u32) -> String {
    format!(
        r#"
regions:
  eu-west: {{ jurisdiction: eu }}
  us-east: {{ jurisdiction: us }}
limits: {{ upstream_timeout_ms: {} }}
providers:
  sim:
    kind: simulated
    region: eu-west
    models: [a, b]
  openai:
    kind: openai
    region: us-east
    key_pools: [ {{ keys: [ {{ env: BENCH_KEY }} ] }} ]
aliases:
  fast: sim/a
"#,
        60_000 + round
    )
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// (apply → last ACK, store commit returned → last ACK) per round.
async fn run(nodes: usize, rounds: u32) -> (Vec<Duration>, Vec<Duration>) {
    let dir = std::env::temp_dir().join(format!("sy-bench-{}-{nodes}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("sqlite://{}/cp.db", dir.display()),
    );
    cfg.score_interval = Duration::from_secs(10);
    // Applies go through `cp.state` directly; nobody uses the operator API.
    cfg.insecure_open_operator_api = true;
    let cp = server::start(cfg).await.expect("control plane");
    let mut agents = Vec::new();
    for i in 0..nodes {
        let (role, region) = if i % 2 == 0 {
            (Role::Edge, "eu-west")
        } else {
            (Role::Egress, "us-east")
        };
        let mut c = NodeConfig::new(
            format!("http://{}", cp.grpc_addr),
            format!("node-{i}"),
            role,
            region,
        );
        c.env = Arc::new(|_| Some("sk-bench".into()));
        c.report_interval = Duration::from_secs(60);
        let shared = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        agents.push(NodeAgent::start(c, shared).expect("agent"));
    }
    let mut samples = Vec::new();
    let mut fanout = Vec::new();
    for round in 0..=rounds {
        let mut acks = cp.state.subscribe_acks();
        let start = Instant::now();
        let out = cp
            .state
            .apply(&policy(round), false, "bench", "")
            .await
            .expect("apply");
        assert!(out.applied, "{:?}", out.errors);
        let stored = Instant::now();
        let mut seen = HashSet::new();
        while seen.len() < nodes {
            let a = tokio::time::timeout(Duration::from_secs(30), acks.recv())
                .await
                .expect("acks within 30 s")
                .expect("ack channel");
            if a.version == out.version && a.ok {
                seen.insert(a.node_id);
            }
        }
        // Round 0 includes every agent's first connection; not a propagation.
        if round > 0 {
            samples.push(start.elapsed());
            fanout.push(stored.elapsed());
        }
    }
    for a in agents {
        a.shutdown().await;
    }
    cp.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    (samples, fanout)
}

fn main() {
    let rounds: u32 = std::env::var("SY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let sizes: Vec<usize> = std::env::var("SY_BENCH_NODES")
        .unwrap_or_else(|_| "2,10,50".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("propagation: apply → last ACK ({rounds} applies per fleet size)");
    println!("(fan-out = from the store commit returning to the last ACK)");
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "nodes", "p50", "p99", "max", "fan-out p50", "fan-out p99"
    );
    for n in sizes {
        let (mut s, mut f) = rt.block_on(run(n, rounds));
        s.sort();
        f.sort();
        println!(
            "{:>6} {:>10.2?} {:>10.2?} {:>10.2?} {:>12.2?} {:>12.2?}",
            n,
            pct(&s, 0.5),
            pct(&s, 0.99),
            s[s.len() - 1],
            pct(&f, 0.5),
            pct(&f, 0.99)
        );
    }
}
