//! Resilience benchmark: success rates while upstreams fail, the latency a
//! failover adds, and the throughput cost of the resilience machinery, each
//! measured against the plain path in the same run.
//!
//! ```sh
//! cargo bench --bench resilience            # N=2000 requests per scenario
//! N=500 DURATION=3 cargo bench --bench resilience
//! ```
//!
//! Everything runs in this process on loopback: the fixture-replaying mock
//! provider (`switchyard-testkit`) and a single-node gateway (`EdgeNode`,
//! default retry policy and breakers) with the policy below. Scenarios
//! (the issue's, measured as a new user would meet them):
//!
//! - `storm`: primary answers 429 (`retry-after: 1`) to everything, the
//!   fallback fails 6 % at random; plain and streamed requests;
//! - `revoked`: one provider, two keys, one revoked (401);
//! - `random`: three targets each failing 6 % at random;
//! - `failover`: 200 routes whose primary always fails at once (HTTP 500)
//!   before a healthy fallback, each asked 4 times (its breaker opens on
//!   the 5th failure): first-token time of answers after a failover
//!   (`x-switchyard-attempts: 2`) against the same fallback asked directly;
//! - `hedge`: a primary that takes 300 ms to answer before a fast
//!   fallback, sequential, without hedging and with `hedge: { delay_ms:
//!   50 }`: time to the first byte and the extra attempts hedging cost;
//! - throughput at 16 concurrent requests: one plain target versus a
//!   weighted route over a two-key pool with two policy rules (key choice,
//!   breakers, retry budget, rules and strategy all on the path).
//!
//! Results are printed as a markdown table and written to
//! `benches/results/resilience-latest.md`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use switchyard_backhaul::node::PolicySource;
use switchyard_edge::node::EdgeNode;
use switchyard_proto::KeyHash;
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Routes whose primary always fails (fast, HTTP 500) before a healthy
/// fallback: each is fresh, so its first few requests fail over before its
/// breaker opens — the failover cost, measured many times.
const FAILOVER_ROUTES: usize = 200;
const PER_FAILOVER_ROUTE: usize = 4;

fn policy(url: &str) -> String {
    let provider = |key: &str| {
        format!("    kind: openai\n    base_url: \"{url}/v1\"\n    key_pools: [ {{ keys: [ {{ value: \"{key}\" }} ] }} ]\n")
    };
    let mut providers = String::new();
    for (name, key) in [
        ("plain", "sk-b-plain"),
        ("storm", "sk-b-storm"),
        ("steady", "sk-b-steady"),
        ("a", "sk-b-a"),
        ("b", "sk-b-b"),
        ("c", "sk-b-c"),
        ("backup", "sk-b-backup"),
    ] {
        providers.push_str(&format!("  {name}:\n{}", provider(key)));
    }
    let mut failover_routes = String::new();
    for k in 0..FAILOVER_ROUTES {
        providers.push_str(&format!(
            "  down{k}:\n{}",
            provider(&format!("sk-b-down{k}"))
        ));
        failover_routes.push_str(&format!(
            "  failover{k}:\n    targets:\n      - {{ provider: down{k}, model: fail-500 }}\n      - {{ provider: backup, model: gpt-4o-mini }}\n"
        ));
    }
    format!(
        r#"
providers:
{providers}  pooled:
    kind: openai
    base_url: "{url}/v1"
    key_pools:
      - keys:
          - {{ id: good, value: "sk-b-good" }}
          - {{ id: revoked, value: "sk-b-revoked" }}
  pool2:
    kind: openai
    base_url: "{url}/v1"
    key_pools:
      - keys:
          - {{ id: one, value: "sk-b-one" }}
          - {{ id: two, value: "sk-b-two" }}
routes:
  plain:
    targets: [ {{ provider: plain, model: gpt-4o-mini }} ]
  storm:
    targets:
      - {{ provider: storm, model: storm-429 }}
      - {{ provider: steady, model: flaky-6 }}
  random:
    targets:
      - {{ provider: a, model: flaky-6 }}
      - {{ provider: b, model: flaky-6 }}
      - {{ provider: c, model: flaky-6 }}
  fallback-alone:
    targets: [ {{ provider: backup, model: gpt-4o-mini }} ]
  slow-unhedged:
    targets:
      - {{ provider: a, model: slow-300 }}
      - {{ provider: backup, model: gpt-4o-mini }}
  slow-hedged:
    hedge: {{ delay_ms: 50 }}
    targets:
      - {{ provider: a, model: slow-300 }}
      - {{ provider: backup, model: gpt-4o-mini }}
{failover_routes}
  machinery:
    strategy: weighted
    rules:
      - when: {{ prompt_tokens_over: 8000 }}
        route: plain
      - when: {{ header: {{ x-switchyard-priority: low }} }}
        route: plain
    targets:
      - {{ provider: pool2, model: gpt-4o-mini, weight: 1 }}
      - {{ provider: pool2, model: gpt-4o-mini-2, weight: 1 }}
tenants:
  - id: bench
    key_sha256: "{}"
    hedge_budget_percent: 100
"#,
        KeyHash::of(TEST_KEY).to_hex()
    )
}

struct Outcome {
    ok: bool,
    attempts: u32,
    /// Time to the first body byte (a stream's first event).
    ttfb: Duration,
}

async fn request(http: &reqwest::Client, addr: SocketAddr, model: &str, stream: bool) -> Outcome {
    let started = Instant::now();
    let resp = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(TEST_KEY)
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await;
    let Ok(resp) = resp else {
        return Outcome {
            ok: false,
            attempts: 0,
            ttfb: started.elapsed(),
        };
    };
    let status = resp.status().as_u16();
    let attempts = resp
        .headers()
        .get("x-switchyard-attempts")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = resp.bytes_stream();
    let mut text = Vec::new();
    let mut ttfb = None;
    while let Some(Ok(chunk)) = body.next().await {
        ttfb.get_or_insert_with(|| started.elapsed());
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    let ok = status == 200
        && if stream {
            text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\"")
        } else {
            text.contains("\"choices\"")
        };
    Outcome {
        ok,
        attempts,
        ttfb: ttfb.unwrap_or_else(|| started.elapsed()),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `n` requests, `concurrency` at a time.
async fn run(
    http: &reqwest::Client,
    addr: SocketAddr,
    model: &str,
    stream: bool,
    n: usize,
    concurrency: usize,
) -> Vec<Outcome> {
    futures::stream::iter(0..n)
        .map(|_| request(http, addr, model, stream))
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Completed requests per second over `duration` at `concurrency`.
async fn throughput(
    http: &reqwest::Client,
    addr: SocketAddr,
    model: &str,
    duration: Duration,
) -> f64 {
    let until = Instant::now() + duration;
    let workers = (0..16).map(|_| async {
        let mut done = 0u64;
        while Instant::now() < until {
            if request(http, addr, model, false).await.ok {
                done += 1;
            }
        }
        done
    });
    let total: u64 = futures::future::join_all(workers).await.into_iter().sum();
    total as f64 / duration.as_secs_f64()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let n = env_num("N", 2000) as usize;
    let duration = Duration::from_secs(env_num("DURATION", 5));
    let mock = MockUpstream::start().await;
    mock.set_recording(true);
    mock.seed(env_num("SEED", 1));
    mock.revoke_key("sk-b-revoked");
    let dir = temp_dir("bench-resilience");
    std::fs::write(dir.join("policy.yaml"), policy(&mock.url())).unwrap();
    let edge = EdgeNode::single_node()
        .policy(PolicySource::File(dir.join("policy.yaml")))
        .listen("127.0.0.1:0")
        .threads(2)
        .start()
        .await
        .expect("edge starts");
    let addr = edge.local_addr().unwrap();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    let mut rows = Vec::new();
    let rate = |o: &[Outcome]| o.iter().filter(|x| x.ok).count() as f64 * 100.0 / o.len() as f64;

    // Warm-up: connections and the mock's fixture cache.
    run(&http, addr, "plain", false, 200, 8).await;

    for (label, model, stream) in [
        ("storm, plain", "storm", false),
        ("storm, streamed", "storm", true),
        ("revoked key", "pooled/gpt-4o-mini", false),
        ("random 6 % on 3 targets", "random", false),
    ] {
        let before_storm = mock.count(Some("storm-429"), None);
        let before_revoked = mock.count(None, Some("sk-b-revoked"));
        let out = run(&http, addr, model, stream, n, 8).await;
        let note = match model {
            "storm" => format!(
                "storming upstream called for {:.2} % of requests",
                (mock.count(Some("storm-429"), None) - before_storm) as f64 * 100.0 / n as f64
            ),
            "pooled/gpt-4o-mini" => format!(
                "revoked key used {} time(s)",
                mock.count(None, Some("sk-b-revoked")) - before_revoked
            ),
            _ => String::new(),
        };
        rows.push(format!("| {label} | {n} | {:.2} % | {note} |", rate(&out)));
    }

    // Failover cost: sequential, so queueing does not blur it; the
    // fallback alone and the failover routes in turn.
    let plain: Vec<Outcome> = run(&http, addr, "plain", true, n, 1).await;
    let mut alone = Vec::new();
    let mut failover = Vec::new();
    for round in 0..PER_FAILOVER_ROUTE {
        for k in 0..FAILOVER_ROUTES {
            alone.push(request(&http, addr, "fallback-alone", true).await);
            failover.push(request(&http, addr, &format!("failover{k}"), true).await);
        }
        let _ = round;
    }
    let mut direct: Vec<Duration> = plain.iter().filter(|o| o.ok).map(|o| o.ttfb).collect();
    let mut at_once: Vec<Duration> = alone.iter().filter(|o| o.ok).map(|o| o.ttfb).collect();
    let mut after: Vec<Duration> = failover
        .iter()
        .filter(|o| o.ok && o.attempts == 2)
        .map(|o| o.ttfb)
        .collect();
    for v in [&mut direct, &mut at_once, &mut after] {
        v.sort();
    }
    rows.push(format!(
        "| failover routes (streamed, primary always failing) | {} | {:.2} % | {} answered after a failover |",
        failover.len(),
        rate(&failover),
        after.len()
    ));

    // Hedging: sequential, a slow primary, without and with a hedge.
    let hedge_n = env_num("HEDGE_N", 100) as usize;
    let mut hedge_rows = Vec::new();
    for (label, model) in [
        ("slow primary (300 ms), no hedge", "slow-unhedged"),
        ("slow primary (300 ms), hedge after 50 ms", "slow-hedged"),
    ] {
        let out = run(&http, addr, model, true, hedge_n, 1).await;
        let mut t: Vec<Duration> = out.iter().filter(|o| o.ok).map(|o| o.ttfb).collect();
        t.sort();
        let extra = out
            .iter()
            .map(|o| o.attempts.saturating_sub(1))
            .sum::<u32>();
        hedge_rows.push(format!(
            "| {label} | {} | {:.2} % | {} | {} | {:.0} % |",
            out.len(),
            rate(&out),
            ms(percentile(&t, 0.5)),
            ms(percentile(&t, 0.95)),
            extra as f64 * 100.0 / out.len() as f64
        ));
    }

    let plain_tput = throughput(&http, addr, "plain", duration).await;
    let machinery_tput = throughput(&http, addr, "machinery", duration).await;
    let plain_tput_2 = throughput(&http, addr, "plain", duration).await;
    let plain_avg = (plain_tput + plain_tput_2) / 2.0;

    let mut out = String::new();
    out.push_str("# Resilience benchmark\n\n");
    out.push_str(&format!(
        "In-process single-node gateway, mock provider on loopback, N={n} per scenario, 8 concurrent (first-token rows: sequential).\n\n"
    ));
    out.push_str("| scenario | requests | success | notes |\n|---|---|---|---|\n");
    for r in &rows {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str(
        "\n| first-token time (streamed) | p50 ms | p95 ms | p99 ms | n |\n|---|---|---|---|---|\n",
    );
    for (label, v) in [
        ("plain route (one healthy target)", &direct),
        ("the fallback asked directly (interleaved)", &at_once),
        (
            "failover routes, answered by the fallback after a failover",
            &after,
        ),
    ] {
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} |\n",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.95)),
            ms(percentile(v, 0.99)),
            v.len()
        ));
    }
    out.push_str(&format!(
        "\nAdded by a failover (p50, after a failover minus the fallback asked directly): {} ms; p95: {} ms\n",
        ms(percentile(&after, 0.5).saturating_sub(percentile(&at_once, 0.5))),
        ms(percentile(&after, 0.95).saturating_sub(percentile(&at_once, 0.95)))
    ));
    out.push_str("\n| hedging (streamed, sequential) | requests | success | first byte p50 ms | p95 ms | extra attempts |\n|---|---|---|---|---|---|\n");
    for r in &hedge_rows {
        out.push_str(r);
        out.push('\n');
    }
    out.push_str(&format!(
        "\n| throughput, 16 concurrent, {} s | req/s |\n|---|---|\n| plain route (mean of a run before and after) | {:.0} |\n| weighted route, two-key pool, two rules (key choice, breakers, budget, rules, strategy) | {:.0} |\n| ratio | {:.3} |\n",
        duration.as_secs(),
        plain_avg,
        machinery_tput,
        machinery_tput / plain_avg
    ));
    println!("{out}");
    let results = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&results);
    let _ = std::fs::write(results.join("resilience-latest.md"), &out);
    edge.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
