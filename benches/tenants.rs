//! Overhead of tenant limits and the usage ledger versus the plain path,
//! measured in one run against identical in-process edges:
//!
//! - `plain`: a tenant without limits (the limiter only looks);
//! - `local`: a tenant with rpm, tpm, concurrency and a daily budget, counted
//!   in the edge's memory (the leased mode);
//! - `redis`: the same tenant, counters in a real Redis (one Lua call at
//!   admission, one at the end), when `redis-server` is installed;
//! - `ledger`: the plain tenant with the usage-ledger hook (the record built
//!   and buffered; shipping runs off the request path);
//! - `cache hit`: the plain tenant asking for the response cache
//!   (`x-switchyard-cache: use`), every request after the first a hit.
//!
//! Every edge serves the built-in simulated provider (no delay, 16 tokens)
//! so the provider costs the same in every row. Latency is measured with one
//! request at a time, the variants interleaved request by request so they
//! share the machine's noise; throughput with 16 concurrent clients for
//! `SECONDS` each. Prints a markdown table (ratios to `plain`) and writes it
//! to `benches/results/tenants.md`.
//!
//! `N` (default 2000) requests per variant for latency, `SECONDS` (3) per
//! throughput run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_backhaul::node::PolicySource;
use switchyard_control::ledger::Ledger;
use switchyard_edge::ledger::LedgerHook;
use switchyard_edge::node::{EdgeNode, RunningEdge};
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::temp_dir;
use switchyard_testkit::redis::{self, RedisServer};

const PLAIN_KEY: &str = "sy-bench-plain";
const LIMITED_KEY: &str = "sy-bench-limited";

fn policy() -> String {
    format!(
        r#"
providers:
  sim:
    kind: simulated
    models: [small]
    pricing:
      small: {{ input: 1, output: 2 }}
    simulated: {{ ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 16 }}
tenants:
  - id: plain
    key_sha256: "{}"
  - id: limited
    key_sha256: "{}"
    limits: {{ rpm: 1000000000, tpm: 1000000000000, concurrency: 1000000 }}
    budget: {{ daily_usd: 1000000 }}
"#,
        KeyHash::of(PLAIN_KEY).to_hex(),
        KeyHash::of(LIMITED_KEY).to_hex()
    )
}

struct Variant {
    name: &'static str,
    key: &'static str,
    cache: bool,
    edge: RunningEdge,
    url: String,
    latencies: Vec<Duration>,
    rps: f64,
}

async fn start(policy: &Path, redis: Option<&str>, ledger: bool) -> RunningEdge {
    let mut node = EdgeNode::single_node()
        .policy(PolicySource::File(policy.to_path_buf()))
        .listen("127.0.0.1:0");
    if let Some(url) = redis {
        node = node.redis(url);
    }
    if ledger {
        let registry = prometheus::Registry::new();
        node = node.record_hook(Arc::new(LedgerHook::new(
            Ledger::new(10_000_000),
            &registry,
        )));
    }
    node.start().await.expect("edge starts")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn one(client: &reqwest::Client, url: &str, key: &str, cache: bool) {
    let mut r = client.post(url).bearer_auth(key);
    if cache {
        r = r.header("x-switchyard-cache", "use");
    }
    let r = r
        .json(&json!({"model": "sim/small", "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200, "every benchmark request must succeed");
    r.bytes().await.expect("body");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = temp_dir("bench-tenants");
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy()).unwrap();
    let redis_server = redis::available().then(RedisServer::start);

    let mut variants = Vec::new();
    let mut add = |name, key, cache, edge: RunningEdge| {
        let url = format!("http://{}/v1/chat/completions", edge.local_addr().unwrap());
        variants.push(Variant {
            name,
            key,
            cache,
            edge,
            url,
            latencies: Vec::with_capacity(n),
            rps: 0.0,
        });
    };
    add("plain", PLAIN_KEY, false, start(&path, None, false).await);
    add(
        "local limits",
        LIMITED_KEY,
        false,
        start(&path, None, false).await,
    );
    if let Some(r) = &redis_server {
        add(
            "redis limits",
            LIMITED_KEY,
            false,
            start(&path, Some(&r.url()), false).await,
        );
    } else {
        eprintln!("redis-server not installed: no Redis row");
    }
    add("ledger", PLAIN_KEY, false, start(&path, None, true).await);
    add(
        "cache hit",
        PLAIN_KEY,
        true,
        start(&path, None, false).await,
    );

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    // Warm-up: connections, Redis script cache, allocator.
    for v in &variants {
        for _ in 0..50 {
            one(&client, &v.url, v.key, v.cache).await;
        }
    }
    for _ in 0..n {
        for v in variants.iter_mut() {
            let t = Instant::now();
            one(&client, &v.url, v.key, v.cache).await;
            v.latencies.push(t.elapsed());
        }
    }
    // Throughput in one-second slices, the variants taking turns, so a
    // burst of load from elsewhere on the machine hits every row alike.
    let mut counts = vec![0u64; variants.len()];
    for _ in 0..seconds {
        for (i, v) in variants.iter().enumerate() {
            let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let until = Instant::now() + Duration::from_secs(1);
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let (client, url, key, cache, done) =
                    (client.clone(), v.url.clone(), v.key, v.cache, done.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < until {
                        one(&client, &url, key, cache).await;
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            counts[i] += done.load(std::sync::atomic::Ordering::Relaxed);
        }
    }
    for (v, c) in variants.iter_mut().zip(counts) {
        v.rps = c as f64 / seconds as f64;
    }

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut table = format!(
        "Tenant limits and ledger overhead ({profile} build; in-process edges, simulated provider, N={n} interleaved requests per row at c=1, {seconds} one-second turns per row at c=16)\n\n\
         | path | p50 µs | p99 µs | p50 vs plain | p99 vs plain | req/s c=16 | req/s vs plain |\n|---|---|---|---|---|---|---|\n"
    );
    let mut base = None;
    for v in variants.iter_mut() {
        v.latencies.sort();
        let (p50, p99) = (
            percentile(&v.latencies, 0.5),
            percentile(&v.latencies, 0.99),
        );
        let (b50, b99, brps) = *base.get_or_insert((p50, p99, v.rps));
        table.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.0} | {:.2}× |\n",
            v.name,
            p50,
            p99,
            p50 / b50,
            p99 / b99,
            v.rps,
            v.rps / brps
        ));
    }
    print!("{table}");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/tenants.md");
    let _ = std::fs::write(&out, &table);
    for v in variants {
        v.edge.shutdown().await;
    }
    drop(redis_server);
    let _ = std::fs::remove_dir_all(&dir);
}
