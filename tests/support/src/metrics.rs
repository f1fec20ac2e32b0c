//! Reading a node's Prometheus page in tests.

use std::net::SocketAddr;

/// `GET http://{addr}/metrics` as text.
pub async fn scrape(http: &reqwest::Client, addr: SocketAddr) -> String {
    http.get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("metrics page")
        .text()
        .await
        .expect("metrics text")
}

/// The value of the first sample whose line contains every fragment (0
/// when none does: a counter not yet touched).
pub fn sample(text: &str, fragments: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| fragments.iter().all(|f| l.contains(f)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
