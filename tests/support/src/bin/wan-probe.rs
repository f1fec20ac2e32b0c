//! Benchmark client for `benches/wan/run.sh`.
//!
//! - `wan-probe ttft URL KEY MODEL N [CA.pem]`: N sequential streamed chat
//!   requests, each on a new client (new TCP + TLS connection, as a typical
//!   SDK user's first call); prints time to the first SSE event.
//! - `wan-probe load URL KEY MODEL N CONCURRENCY stream|full`: N requests
//!   over warm pooled connections; prints latency percentiles, requests/s
//!   and response MB/s.

use std::time::{Duration, Instant};

use futures::StreamExt;

fn usage() -> ! {
    eprintln!("usage: wan-probe ttft URL KEY MODEL N [CA.pem] | load URL KEY MODEL N CONCURRENCY stream|full");
    std::process::exit(2)
}

fn body(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "What is 4200 + 42?"}]})
    .to_string()
}

fn client(ca: Option<&reqwest::Certificate>, pooled: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        b = b.add_root_certificate(ca.clone());
    }
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().expect("client")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sends one request and returns (time to first SSE event or full body, bytes).
async fn one(
    c: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
    stream: bool,
) -> Option<(Duration, usize)> {
    let start = Instant::now();
    let resp = c
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body(model, stream))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        eprintln!("status {}", resp.status());
        return None;
    }
    let mut first = None;
    let mut bytes = 0;
    let mut s = resp.bytes_stream();
    while let Some(Ok(chunk)) = s.next().await {
        if first.is_none() && (!stream || chunk.windows(5).any(|w| w == b"data:")) {
            first = Some(start.elapsed());
        }
        bytes += chunk.len();
    }
    Some((first.unwrap_or_else(|| start.elapsed()), bytes))
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        usage();
    }
    let (url, key, model) = (a[2].clone(), a[3].clone(), a[4].clone());
    let n: usize = a[5].parse().unwrap_or_else(|_| usage());
    match a[1].as_str() {
        "ttft" => {
            let ca = a.get(6).map(|p| {
                reqwest::Certificate::from_pem(&std::fs::read(p).expect("read CA")).expect("CA")
            });
            let mut v = Vec::new();
            for _ in 0..n {
                let c = client(ca.as_ref(), false);
                if let Some((t, _)) = one(&c, &url, &key, &model, true).await {
                    v.push(t.as_secs_f64() * 1000.0);
                }
            }
            v.sort_by(f64::total_cmp);
            println!(
                "ttft_ms n={} p50={:.1} p90={:.1} min={:.1} max={:.1}",
                v.len(),
                pct(&v, 0.5),
                pct(&v, 0.9),
                pct(&v, 0.0),
                pct(&v, 1.0)
            );
        }
        "load" => {
            let conc: usize = a
                .get(6)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage());
            let stream = a.get(7).map(String::as_str) == Some("stream");
            let c = client(None, true);
            // Warm the pool so connection set-up is not measured.
            for _ in 0..conc {
                one(&c, &url, &key, &model, stream).await;
            }
            let start = Instant::now();
            let per = n / conc;
            let tasks: Vec<_> = (0..conc)
                .map(|_| {
                    let (c, url, key, model) = (c.clone(), url.clone(), key.clone(), model.clone());
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for _ in 0..per {
                            let t0 = Instant::now();
                            if let Some((_, b)) = one(&c, &url, &key, &model, stream).await {
                                out.push((t0.elapsed().as_secs_f64() * 1000.0, b));
                            }
                        }
                        out
                    })
                })
                .collect();
            let mut lat = Vec::new();
            let mut bytes = 0usize;
            for t in tasks {
                for (l, b) in t.await.expect("task") {
                    lat.push(l);
                    bytes += b;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            println!(
                "load n={} c={conc} stream={stream} rps={:.0} p50_ms={:.2} p99_ms={:.2} mb_s={:.2}",
                lat.len(),
                lat.len() as f64 / secs,
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                bytes as f64 / secs / 1e6
            );
        }
        _ => usage(),
    }
}
