//! Reading a gateway's SSE answer in tests, bounded in time.

use std::time::{Duration, Instant};

use futures::StreamExt;

/// Every event as `(event name, data)` until the body ends or `limit` passes.
pub async fn events(resp: reqwest::Response, limit: Duration) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    let deadline = Instant::now() + limit;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline.into(), body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find("\n\n") {
            let raw: String = buf.drain(..i + 2).collect();
            let mut name = None;
            let mut data = String::new();
            for line in raw.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            out.push((name, data));
        }
    }
    out
}

/// Only the `data:` payloads.
pub async fn data(resp: reqwest::Response, limit: Duration) -> Vec<String> {
    events(resp, limit)
        .await
        .into_iter()
        .map(|(_, d)| d)
        .collect()
}
