//! Attacks on the edge from a client's side, against the real binary over
//! real sockets (issue 14, points 5, 6 and 7): path traversal towards the
//! provider, the simulate header, and clients that trickle or hoard
//! connections.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_testkit::cluster::{gen_scoped_certs, EdgeNode, EgressNode};
use switchyard_testkit::gateway::{temp_dir, Gateway, GatewayOptions, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const OPENAI_KEY: &str = "sk-test-SECRET-traversal";
const GEMINI_KEY: &str = "gm-test-SECRET-traversal";

/// Upper bound for anything a deadline of about a second should end; far
/// above it so a loaded machine does not fail the test, far below the
/// minute the edge used to wait.
const BOUND: Duration = Duration::from_secs(20);

/// Status and body of one answer to a request written byte for byte (no
/// client library that would normalise `..` away).
async fn raw_request(addr: std::net::SocketAddr, request: String) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    parse_response(&buf).unwrap_or_else(|| panic!("no HTTP answer: {buf:?}"))
}

fn parse_response(buf: &[u8]) -> Option<(u16, Value)> {
    let text = String::from_utf8_lossy(buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Some((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_traversal_is_refused_before_the_provider() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        GatewayOptions::new(BIN)
            .env("OPENAI_API_KEY", OPENAI_KEY)
            .env("OPENAI_BASE_URL", format!("{}/v1", mock.url()))
            .env("GEMINI_API_KEY", GEMINI_KEY)
            .env("GEMINI_BASE_URL", mock.url()),
    );
    for path in [
        "/passthrough/openai/../../admin/x",
        "/passthrough/openai/../admin",
        "/passthrough/openai/./../admin",
        "/passthrough/openai/%2e%2e/%2e%2e/admin/x",
        "/passthrough/openai/%2E%2E/admin",
        "/passthrough/openai/.%2e/admin",
        "/passthrough/openai/files%2f..%2f..%2fadmin",
        "/passthrough/openai/files%2F..%2F..%2Fadmin",
        "/passthrough/openai/..%5c..%5cadmin",
        "/passthrough/openai/%252e%252e/admin",
        "/passthrough/gemini/v1beta/../../admin/x?key=1",
    ] {
        let (status, body) = raw_request(gw.http_addr, post(path, "", "{}")).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_path", "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}");
    }
    // The Gemini adapter puts the model in the URL path.
    let chat =
        json!({"model": "gemini/../../admin/x?", "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let (status, body) = raw_request(gw.http_addr, post("/v1/chat/completions", "", &chat)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_model")),
        "{body}"
    );
    for model in ["gemini/..%2f..%2fadmin", "gemini/a#b", "gemini/%2e%2e"] {
        let chat = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let (status, body) = raw_request(
            gw.http_addr,
            post("/v1/chat/completions", "", &chat.to_string()),
        )
        .await;
        assert_eq!(status, 400, "{model}: {body}");
    }
    // Anthropic callers get Anthropic's error shape.
    let msg = json!({"model": "gemini/../../admin/x?", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let (status, body) = raw_request(gw.http_addr, post("/v1/messages", "", &msg)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    assert_eq!(
        mock.requests().len(),
        0,
        "a refused path reached the provider: {:?}",
        mock.requests()
    );
    // The mock does count: a clean passthrough path reaches it, below the base.
    let (status, _) = raw_request(
        gw.http_addr,
        post("/passthrough/openai/responses", "", "{}"),
    )
    .await;
    assert!(status < 500, "{status}");
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/responses");
    assert!(!gw.logs().contains(OPENAI_KEY) && !gw.logs().contains(GEMINI_KEY));
}

fn chat_body(tokens_hint: &str) -> String {
    json!({"model": "simulated/sim-small", "messages": [{"role": "user", "content": tokens_hint}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_header_values_are_finite_and_bounded() {
    let gw = Gateway::start(GatewayOptions::new(BIN));
    for directive in [
        "tps=NaN",
        "tps=inf",
        "tps=-1",
        "tps=0",
        "tokens=20000000",
        "ttft_ms=1e300",
        "retry_after=-1",
        "drop_after=NaN",
        "rate=NaN",
    ] {
        for stream in [false, true] {
            let mut body: Value = serde_json::from_str(&chat_body("hi")).unwrap();
            body["stream"] = json!(stream);
            let req = post(
                "/v1/chat/completions",
                &format!("x-switchyard-simulate: {directive}\r\n"),
                &body.to_string(),
            );
            let (status, body) = raw_request(gw.http_addr, req).await;
            assert_eq!(status, 400, "{directive}: {body}");
            assert_eq!(
                body["error"]["code"], "invalid_simulate_header",
                "{directive}"
            );
        }
    }
    // Nothing panicked and the gateway still answers, with bounded values too.
    let req = post(
        "/v1/chat/completions",
        "x-switchyard-simulate: tokens=3,tps=100000\r\n",
        &chat_body("hi"),
    );
    let (status, body) = raw_request(gw.http_addr, req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert!(!gw.logs().contains("panicked"), "{}", gw.logs());
}

fn hash_key(key: &str) -> String {
    let out = Command::new(BIN).args(["hash-key", key]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn write_policy(dir: &Path, name: &str, allow: bool) -> std::path::PathBuf {
    let yaml = format!(
        "providers:\n  simulated:\n    kind: simulated\n    simulated:\n      allow_header: {allow}\n\
tenants:\n  - id: t\n    key_sha256: \"{}\"\n",
        hash_key(TEST_KEY)
    );
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_header_is_refused_on_an_edge_unless_the_policy_allows_it() {
    let dir = temp_dir("sec-sim");
    let edge_certs = gen_scoped_certs(Path::new(BIN), &dir, "edge", "edge", "eu");
    let egress_certs = gen_scoped_certs(Path::new(BIN), &dir, "egress", "egress", "eu");
    let closed = write_policy(&dir, "closed.yaml", false);
    let open = write_policy(&dir, "open.yaml", true);
    let egress = EgressNode::start(Path::new(BIN), "eu", None, &open, &egress_certs, &[]);
    let to_egress = [format!("eu={}", egress.addr)];

    let edge = EdgeNode::start(Path::new(BIN), "eu", &closed, &edge_certs, &to_egress, &[]);
    let req = post(
        "/v1/chat/completions",
        "x-switchyard-simulate: tokens=20000000\r\n",
        &chat_body("hi"),
    );
    let (status, body) = raw_request(edge.http_addr, req).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "simulate_not_allowed");
    // Without the header the same edge serves the request.
    let (status, body) = raw_request(
        edge.http_addr,
        post("/v1/chat/completions", "", &chat_body("hi")),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let edge = EdgeNode::start(Path::new(BIN), "eu", &open, &edge_certs, &to_egress, &[]);
    let req = post(
        "/v1/chat/completions",
        "x-switchyard-simulate: tokens=3\r\n",
        &chat_body("hi"),
    );
    let (status, body) = raw_request(edge.http_addr, req).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let req = post(
        "/v1/chat/completions",
        "x-switchyard-simulate: tps=NaN\r\n",
        &chat_body("hi"),
    );
    let (status, _) = raw_request(edge.http_addr, req).await;
    assert_eq!(status, 400);
    assert!(!egress.process.logs().contains("panicked"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `bytes` one at a time every 500 ms until the server closes the
/// connection (or `BOUND` passes); returns what it answered and how long the
/// connection lived.
async fn trickle(mut s: TcpStream, prefix: &[u8], bytes: &[u8]) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    s.write_all(prefix).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = rd.read_to_end(&mut buf).await;
        buf
    });
    for b in bytes.iter().cycle() {
        if reader.is_finished() || started.elapsed() > BOUND {
            break;
        }
        if wr.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let answer = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    (answer, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn trickling_clients_are_cut_at_the_deadlines() {
    let gw = Gateway::start(
        GatewayOptions::new(BIN)
            .arg("--header-timeout-ms")
            .arg("1500")
            .arg("--body-timeout-ms")
            .arg("1500")
            .arg("--tls-handshake-timeout-ms")
            .arg("1500"),
    );
    // A header that never ends.
    let s = TcpStream::connect(gw.http_addr).await.unwrap();
    let (_, lived) = trickle(s, b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ", b"a").await;
    assert!(
        lived < BOUND,
        "header trickle held the connection {lived:?}"
    );

    // A complete header, then a body that never ends: 408 in OpenAI's shape.
    let s = TcpStream::connect(gw.http_addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{"
    );
    let (answer, lived) = trickle(s, head.as_bytes(), b" ").await;
    assert!(lived < BOUND, "body trickle held the connection {lived:?}");
    let (status, body) = parse_response(&answer).expect("an answer before closing");
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["error"]["code"], "request_timeout");

    // A TLS port that never sees a ClientHello.
    let s = TcpStream::connect(gw.https_addr).await.unwrap();
    let (_, lived) = trickle(s, b"", b"").await;
    assert!(lived < BOUND, "TLS handshake held the connection {lived:?}");
    // ... nor a whole one, a byte at a time.
    let s = TcpStream::connect(gw.https_addr).await.unwrap();
    let (_, lived) = trickle(s, b"\x16\x03\x01\x02\x00", b"\x01").await;
    assert!(lived < BOUND, "TLS trickle held the connection {lived:?}");

    // Honest clients are unaffected.
    let (status, _) = raw_request(
        gw.http_addr,
        post("/v1/chat/completions", "", &chat_body("hi")),
    )
    .await;
    assert_eq!(status, 200);
}

/// A keep-alive connection that was served `GET /health`, so it holds a slot.
async fn held_connection(addr: std::net::SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(BOUND, s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf[..n].starts_with(b"HTTP/1.1 200").then_some(s)
}

/// Whether the edge closes a new connection without answering.
async fn refused(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    let _ = s
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    match tokio::time::timeout(BOUND, s.read_to_end(&mut buf)).await {
        Ok(_) => buf.is_empty(),
        Err(_) => false,
    }
}

async fn hold(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    // The launcher's readiness probes may still hold a slot for a moment.
    for _ in 0..100 {
        if held.len() == n {
            break;
        }
        match held_connection(addr).await {
            Some(s) => held.push(s),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(held.len(), n, "could not open {n} connections");
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limits_refuse_the_next_connection() {
    for flag in ["--max-connections-per-ip", "--max-connections"] {
        let gw = Gateway::start(GatewayOptions::new(BIN).arg(flag).arg("2"));
        let mut held = hold(gw.http_addr, 2).await;
        assert!(
            refused(gw.http_addr).await,
            "{flag}: third connection served"
        );
        // The TLS port shares the count and refuses before any handshake.
        assert!(
            refused(gw.https_addr).await,
            "{flag}: TLS connection served"
        );
        // A closed connection gives its slot back.
        drop(held.pop());
        let again = hold(gw.http_addr, 1).await;
        assert_eq!(again.len(), 1);
    }
}
