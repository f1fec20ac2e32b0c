//! Provider calls over HTTPS: the egress's client (hyper with rustls and
//! the platform's roots) talks to a provider behind TLS, over HTTP/2 when
//! the provider offers it (as the real ones do) and HTTP/1.1 otherwise,
//! and refuses one whose certificate it cannot trust before any request is
//! sent.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard_testkit::cluster::gen_certs;
use switchyard_testkit::gateway::{temp_dir, Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;

const PROVIDER_KEY: &str = "sk-test-TLS-9c1d2e3f4a5b";

struct TlsProvider {
    mock: MockUpstream,
    addr: SocketAddr,
    front: tokio::task::JoinHandle<()>,
    ca: std::path::PathBuf,
}

impl Drop for TlsProvider {
    fn drop(&mut self) {
        self.front.abort();
    }
}

async fn tls_provider(tag: &str, h2: bool) -> TlsProvider {
    let mock = MockUpstream::start().await;
    let target: SocketAddr = mock
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("mock address");
    let certs = gen_certs(
        env!("CARGO_BIN_EXE_switchyard").as_ref(),
        &temp_dir(tag),
        "provider",
    );
    let (addr, front) =
        switchyard_testkit::tls_front::start(target, &certs.cert, &certs.key, h2).await;
    TlsProvider {
        mock,
        addr,
        front,
        ca: certs.ca,
    }
}

fn gateway(provider: &TlsProvider, trust_ca: bool) -> Gateway {
    let mut opts = GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
        .env("OPENAI_API_KEY", PROVIDER_KEY)
        .env("OPENAI_BASE_URL", format!("https://{}/v1", provider.addr));
    if trust_ca {
        // Read by the platform verifier on Linux, as by OpenSSL.
        opts = opts.env("SSL_CERT_FILE", provider.ca.to_string_lossy().to_string());
    }
    Gateway::start(opts)
}

async fn chat(gw: &Gateway, stream: bool) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "openai/gpt-4o-mini", "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("gateway answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// A chat and a stream through a trusted provider; returns the HTTP
/// versions the provider saw.
async fn reach(h2: bool) -> Vec<String> {
    let provider = tls_provider(
        if h2 {
            "provider-tls-h2"
        } else {
            "provider-tls-h1"
        },
        h2,
    )
    .await;
    let gw = gateway(&provider, true);
    let (status, body) = chat(&gw, false).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    let (status, body) = chat(&gw, true).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    // Every event made it through, in order.
    let events = body.matches("data: {").count();
    assert!(events >= 3, "{body}");
    assert_eq!(provider.mock.count(None, Some(PROVIDER_KEY)), 2);
    provider
        .mock
        .requests()
        .iter()
        .map(|r| r.version.clone())
        .collect()
}

#[tokio::test]
async fn a_provider_behind_tls_is_reached_over_http2_with_its_certificate_checked() {
    assert_eq!(reach(true).await, ["HTTP/2.0", "HTTP/2.0"]);
}

#[tokio::test]
async fn a_provider_offering_only_http1_is_reached_over_it() {
    assert_eq!(reach(false).await, ["HTTP/1.1", "HTTP/1.1"]);
}

/// Token streams are many small DATA frames. h2 counts the small frames a
/// connection holds unread against a budget derived from its window and
/// closes the whole connection (every stream on it) when it runs out; a
/// burst of them (one fast stream, or many streams' tokens at once) must
/// reach the client whole.
#[tokio::test]
async fn a_burst_of_small_frames_over_http2_reaches_the_client_whole() {
    let provider = tls_provider("provider-tls-flood", true).await;
    let gw = gateway(&provider, true);
    let _ = rustls::crypto::ring::default_provider().install_default();
    const N: usize = 3000;
    let resp = reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(&gw.key)
        .json(
            &json!({"model": format!("openai/flood-{N}"), "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(
        !body.contains("\"error\""),
        "{}",
        &body[body.len().saturating_sub(400)..]
    );
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "{}",
        &body[body.len().saturating_sub(400)..]
    );
    for i in [0, N / 2, N - 1] {
        assert!(body.contains(&format!("w{i} ")), "chunk {i} is missing");
    }
    let versions: Vec<String> = provider
        .mock
        .requests()
        .iter()
        .map(|r| r.version.clone())
        .collect();
    assert_eq!(versions, ["HTTP/2.0"]);
}

/// A provider caps the streams of one HTTP/2 connection (100 to a few
/// hundred); long streams hold their slots for minutes. A request beyond
/// the cap must go out on another connection, not queue behind them.
#[tokio::test]
async fn streams_beyond_a_providers_http2_cap_open_another_connection() {
    let provider = tls_provider("provider-tls-cap", true).await;
    provider.mock.set_h2_max_streams(4);
    let gw = Gateway::start(
        GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("OPENAI_BASE_URL", format!("https://{}/v1", provider.addr))
            .env("SSL_CERT_FILE", provider.ca.to_string_lossy().to_string())
            // The mock's cap, as an operator would set it for a provider
            // that announces fewer streams than the default 64.
            .env("SWITCHYARD_UPSTREAM_REQUESTS_PER_CONNECTION", "4"),
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    // Six endless streams (more than one connection's cap), each held
    // after its first event.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut resp = http
            .post(format!("{}/chat/completions", gw.base_url()))
            .bearer_auth(&gw.key)
            .json(&json!({"model": "openai/endless", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("a stream starts");
        assert_eq!(resp.status(), 200);
        let first = resp.chunk().await.expect("first event").expect("a chunk");
        assert!(!first.is_empty());
        held.push(resp);
    }
    // And a plain request still answers at once.
    let (status, body) = chat(&gw, false).await;
    assert_eq!(status, 200, "{body}");
    drop(held);
}

/// A burst of requests to an HTTP/2 provider takes one connection per
/// pool, not one per request: each connection is a TLS handshake for both
/// sides and tens of KB held in the egress for as long as it stays open.
#[tokio::test]
async fn a_burst_to_an_http2_provider_opens_one_connection_per_pool() {
    const PER_POOL: usize = 4;
    const BURST: usize = 24;
    let provider = tls_provider("provider-tls-burst", true).await;
    let gw = Gateway::start(
        GatewayOptions::new(env!("CARGO_BIN_EXE_switchyard"))
            .env("OPENAI_API_KEY", PROVIDER_KEY)
            .env("OPENAI_BASE_URL", format!("https://{}/v1", provider.addr))
            .env("SSL_CERT_FILE", provider.ca.to_string_lossy().to_string())
            .env(
                "SWITCHYARD_UPSTREAM_REQUESTS_PER_CONNECTION",
                PER_POOL.to_string(),
            ),
    );
    let (status, body) = chat(&gw, false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(provider.mock.connections(), 1);
    // Every request of the burst is in flight at once, so the egress
    // spreads them over BURST / PER_POOL pools, all but the first new.
    provider.mock.set_latency(Duration::from_millis(600));
    let burst = futures::future::join_all((0..BURST).map(|_| chat(&gw, false))).await;
    for (status, body) in burst {
        assert_eq!(status, 200, "{body}");
    }
    // One per pool, and the first request's, made before the egress knew
    // the provider speaks HTTP/2 (it stays in its pool until idle).
    let connections = provider.mock.connections();
    assert!(
        connections <= BURST / PER_POOL + 1,
        "{connections} connections for {BURST} requests at {PER_POOL} per connection"
    );
}

#[tokio::test]
async fn an_untrusted_provider_certificate_is_refused_before_any_request() {
    let provider = tls_provider("provider-tls-untrusted", true).await;
    let gw = gateway(&provider, false);
    let (status, body) = chat(&gw, false).await;
    assert!(status >= 500, "{status} {body}");
    assert!(!body.contains(PROVIDER_KEY), "{body}");
    assert_eq!(
        provider.mock.count(None, None),
        0,
        "nothing reached the provider"
    );
    assert!(!gw.logs().contains(PROVIDER_KEY));
}
