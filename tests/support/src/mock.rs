//! A mock provider upstream that replays recorded real payloads.
//!
//! Behaviour is chosen by the model name the gateway sends upstream:
//! - `case-<name>`: replay `tests/fixtures/<provider>/<name>` verbatim
//!   (status, content type, `retry-after`, body or SSE events).
//! - `hang`: never answer. `stall`: stream one event, then go silent.
//! - `gated`: stream one event, wait for [`MockUpstream::open_gate`], then
//!   the rest (proves the gateway forwards events before the stream ends).
//! - `endless`: stream an event every 10 ms until the client goes away,
//!   which is counted in [`MockUpstream::cancellations`].
//! - `cut`: stream two events, then drop the connection mid-stream.
//! - `cut-before-first` / `stall-before-first`: answer 200 with an event
//!   stream, then drop the connection / go silent before its first event
//!   (a silence the gateway ends is counted as a cancellation).
//! - `echo-key-401`: a 401 whose message quotes the bearer key it received.
//! - `storm-429`: OpenAI's recorded 429 (`rate_limit_exceeded`, with its
//!   `x-ratelimit-*` headers) but `retry-after: 1`, to every request.
//! - `flaky-<N>`: fails N % of requests at random (the mock's seeded
//!   generator, [`MockUpstream::seed`]) with a 500 in OpenAI's shape;
//!   answers the rest as the default case.
//! - `fail-<status>`: that status, in OpenAI's error shape, every time.
//! - `slow-<ms>`: waits that long, then answers as the default case; a
//!   request the gateway drops during the wait is counted in
//!   [`MockUpstream::cancellations`] (how hedging's loser is seen cut).
//! - `flood-<N>`: a chat stream of N small content chunks sent back to
//!   back, each its own write (its own DATA frame over HTTP/2), then the
//!   finish chunk and `[DONE]`: many small frames arriving at once.
//! - `cut-after-<N>`: the default streamed case for the request (text, or
//!   a tool call when it declares tools), cut (connection reset) after its
//!   first N events: a provider failing mid-answer.
//!
//! A bearer key passed to [`MockUpstream::revoke_key`] is answered with
//! OpenAI's recorded 401 (`invalid_api_key`) whatever the model.
//! - anything else: a realistic default case for the endpoint.
//!
//! The provider is told by the path: OpenAI (`/v1/chat/completions`,
//! `/v1/embeddings`, `/v1/responses`, `/v1/completions`), Anthropic
//! (`/v1/messages`), Gemini (`/v1beta/models/..`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use crate::fixtures::{split_events, Case};

#[derive(Debug, Clone)]
pub struct Recorded {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    /// Off for benchmarks, where millions of requests would pile up here.
    not_recording: std::sync::atomic::AtomicBool,
    /// Parsed fixtures, so a replay does not re-read files per request.
    cases: Mutex<std::collections::HashMap<String, Arc<Case>>>,
    requests: Mutex<Vec<Recorded>>,
    cancellations: AtomicUsize,
    /// TCP connections accepted (behind a TLS front: TLS connections made).
    connections: AtomicUsize,
    gate: Notify,
    /// Delay between replayed SSE events.
    event_gap: Mutex<Duration>,
    /// Extra latency before every answer.
    latency: Mutex<Duration>,
    /// Bearer keys answered with 401.
    revoked: Mutex<Vec<String>>,
    /// HTTP/2 streams a connection may have open at once (unlimited when
    /// unset); the real providers announce a few hundred.
    h2_max_streams: Mutex<Option<u32>>,
    rng: Mutex<Option<fastrand::Rng>>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> MockUpstream {
        let listener = TcpListener::bind(addr).await.expect("bind mock upstream");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State {
            event_gap: Mutex::new(Duration::from_millis(1)),
            ..Default::default()
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = &mut stopped => return,
                };
                let Ok((tcp, _)) = conn else { continue };
                let _ = tcp.set_nodelay(true);
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let h2_max_streams = *st.h2_max_streams.lock().unwrap();
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    // HTTP/1.1, or HTTP/2 when a TLS front negotiated it
                    // (as the real providers do); told apart by the preface.
                    let mut server = auto::Builder::new(TokioExecutor::new());
                    // Unlimited unless a test sets a provider's cap: the
                    // benchmarks hold thousands of streams at once.
                    server.http2().max_concurrent_streams(h2_max_streams);
                    let _ = server.serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        MockUpstream {
            addr,
            state,
            stop: Some(stop),
        }
    }

    /// `http://127.0.0.1:port`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn cancellations(&self) -> usize {
        self.state.cancellations.load(Ordering::SeqCst)
    }

    pub fn open_gate(&self) {
        self.state.gate.notify_waiters();
        self.state.gate.notify_one();
    }

    pub fn set_event_gap(&self, gap: Duration) {
        *self.state.event_gap.lock().unwrap() = gap;
    }

    /// Stop keeping a log of requests (benchmarks).
    pub fn set_recording(&self, on: bool) {
        self.state.not_recording.store(!on, Ordering::Relaxed);
    }

    /// Announce at most `n` concurrent HTTP/2 streams per connection (to
    /// connections made after the call).
    pub fn set_h2_max_streams(&self, n: u32) {
        *self.state.h2_max_streams.lock().unwrap() = Some(n);
    }

    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// Every later request with `Authorization: Bearer <key>` gets a 401.
    pub fn revoke_key(&self, key: &str) {
        self.state.revoked.lock().unwrap().push(key.to_string());
    }

    /// Seeds the generator behind `flaky-<N>` (unseeded: random).
    pub fn seed(&self, seed: u64) {
        *self.state.rng.lock().unwrap() = Some(fastrand::Rng::with_seed(seed));
    }

    /// Requests seen for `model`, and with `Authorization: Bearer <key>`.
    pub fn count(&self, model: Option<&str>, key: Option<&str>) -> usize {
        let bearer = key.map(|k| format!("Bearer {k}"));
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| model.is_none_or(|m| r.body["model"] == m))
            .filter(|r| {
                bearer
                    .as_deref()
                    .is_none_or(|b| r.header("authorization") == Some(b))
            })
            .count()
    }
}

fn openai_error(status: u16, message: &str, code: &str) -> Response<BoxBody> {
    let body =
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
    full(status, "application/json", body.to_string())
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    fn dir(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

fn sse_response(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> Response<BoxBody> {
    let stream = tokio_stream_from(rx).map(|r| r.map(Frame::data));
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let rec = Recorded {
        version,
        method,
        path: path.clone(),
        headers,
        body: body.clone(),
    };
    if !state.not_recording.load(Ordering::Relaxed) {
        state.requests.lock().unwrap().push(rec.clone());
    }
    let latency = *state.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    if rec.method == "GET" && path.ends_with("/models") {
        return Ok(model_list(&state, &path, rec.header("x-api-key").is_some()).await);
    }
    let (provider, model, stream) = if path.starts_with("/v1beta/") {
        let model = path
            .split("/models/")
            .nth(1)
            .and_then(|m| m.split(':').next())
            .unwrap_or("")
            .to_string();
        (
            Provider::Gemini,
            model,
            path.contains(":streamGenerateContent"),
        )
    } else if path.ends_with("/messages") || path.ends_with("/messages/count_tokens") {
        (
            Provider::Anthropic,
            body["model"].as_str().unwrap_or("").to_string(),
            body["stream"].as_bool().unwrap_or(false),
        )
    } else {
        (
            Provider::OpenAi,
            body["model"].as_str().unwrap_or("").to_string(),
            body["stream"].as_bool().unwrap_or(false),
        )
    };
    let _ = query;

    if path.ends_with("/messages/count_tokens") {
        // No recording of this endpoint exists in the fixtures; its answer
        // is the documented `{"input_tokens": N}`.
        let n = body["messages"].to_string().len() / 4 + 1;
        return Ok(full(
            200,
            "application/json",
            json!({ "input_tokens": n }).to_string(),
        ));
    }
    let bearer = rec
        .header("authorization")
        .unwrap_or("")
        .trim_start_matches("Bearer ");
    if state.revoked.lock().unwrap().iter().any(|k| k == bearer) {
        return Ok(replay(&state, provider, "error-401-invalid-api-key").await);
    }
    if provider == Provider::OpenAi
        && path.ends_with("/completions")
        && !path.ends_with("/chat/completions")
    {
        return Ok(legacy_completion(&model, stream));
    }
    if let Some(case) = model.strip_prefix("case-") {
        return Ok(replay(&state, provider, case).await);
    }
    if model == "storm-429" {
        let mut resp = replay(&state, Provider::OpenAi, "error-429-rate-limit-exceeded").await;
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
        return Ok(resp);
    }
    if let Some(status) = model
        .strip_prefix("fail-")
        .and_then(|s| s.parse::<u16>().ok())
    {
        return Ok(openai_error(status, "mock failure", "mock_failure"));
    }
    if let Some(pct) = model
        .strip_prefix("flaky-")
        .and_then(|p| p.parse::<u32>().ok())
    {
        let roll = match state.rng.lock().unwrap().as_mut() {
            Some(rng) => rng.u32(0..100),
            None => fastrand::u32(0..100),
        };
        if roll < pct {
            return Ok(openai_error(
                500,
                "The server had an error while processing your request.",
                "server_error",
            ));
        }
    }
    if let Some(ms) = model
        .strip_prefix("slow-")
        .and_then(|m| m.parse::<u64>().ok())
    {
        // Counts the wait as cancelled unless it runs to its end: hyper
        // drops this future when the gateway closes the connection.
        struct Waiting(Arc<State>, bool);
        impl Drop for Waiting {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.cancellations.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        let mut waiting = Waiting(state.clone(), false);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        waiting.1 = true;
    }
    if let Some(n) = model
        .strip_prefix("cut-after-")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let case = default_case(provider, &path, &body, stream);
        return Ok(replay_cut(&state, provider, case, Some(n)).await);
    }
    if let Some(n) = model
        .strip_prefix("flood-")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return Ok(flood(n));
    }
    let gap = *state.event_gap.lock().unwrap();
    match model.as_str() {
        "hang" => {
            // Ends when the gateway gives up and closes the connection.
            futures::future::pending::<()>().await;
            unreachable!()
        }
        "echo-key-401" => {
            let key = rec
                .header("authorization")
                .unwrap_or("")
                .replace("Bearer ", "");
            let body = json!({"error": {"message": format!("Incorrect API key provided: {key}."), "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
            return Ok(full(401, "application/json", body.to_string()));
        }
        "midstream-overloaded" if provider == Provider::Anthropic => {
            return Ok(anthropic_overloaded_midstream());
        }
        "stall" | "gated" | "endless" | "cut" | "cut-before-first" | "stall-before-first" => {
            return Ok(special_stream(state.clone(), &model, gap));
        }
        _ => {}
    }
    let default_case = default_case(provider, &path, &body, stream);
    Ok(replay(&state, provider, default_case).await)
}

fn default_case(provider: Provider, path: &str, body: &Value, stream: bool) -> &'static str {
    let has_tools = body.get("tools").is_some();
    let last_is_tool_result = body["messages"]
        .as_array()
        .or_else(|| body["contents"].as_array())
        .and_then(|m| m.last())
        .map(|m| {
            m["role"] == "tool"
                || m["content"].to_string().contains("tool_result")
                || m["parts"].to_string().contains("functionResponse")
        })
        .unwrap_or(false);
    match provider {
        Provider::OpenAi if path.ends_with("/embeddings") => {
            if body["input"].is_array() {
                "embeddings-batch"
            } else {
                "embeddings-float"
            }
        }
        Provider::OpenAi if path.ends_with("/responses") => match (stream, has_tools) {
            (true, true) => "responses-tool-use-stream",
            (true, false) => "responses-stream",
            (false, _) => "responses-basic",
        },
        Provider::OpenAi => match (stream, has_tools, last_is_tool_result) {
            (true, _, true) => "chat-tools-parallel-stream-2-result",
            (true, true, false) => "chat-tools-stream-single",
            (true, false, _) => "chat-stream-include-usage",
            (false, _, true) => "chat-tools-parallel-2-result",
            (false, true, false) => "chat-tools-parallel-1-call",
            (false, false, _) => "chat-basic",
        },
        Provider::Anthropic => match (stream, has_tools, last_is_tool_result) {
            (true, _, true) => "tools-parallel-stream-2-tool-result",
            (true, true, false) => "tools-stream-haiku-1-tool-use",
            (true, false, _) => "messages-stream",
            (false, _, true) => "tools-parallel-2-tool-result",
            (false, true, false) => "tools-parallel-1-tool-use",
            (false, false, _) => "messages-basic",
        },
        Provider::Gemini if path.ends_with(":countTokens") => "count-tokens",
        Provider::Gemini
            if path.contains("embedContent") || path.contains("batchEmbedContents") =>
        {
            "embeddings-batch-multi"
        }
        Provider::Gemini => match (stream, has_tools, last_is_tool_result) {
            (true, _, true) => "tools-parallel-stream-2-function-response",
            (true, true, false) => "tools-parallel-stream-1-function-call",
            (true, false, _) => "stream-sse-basic",
            (false, _, true) => "tools-parallel-2-function-response",
            (false, true, false) => "tools-parallel-1-function-call",
            (false, false, _) => "generate-basic",
        },
    }
}

fn cached_case(state: &State, provider: Provider, case_name: &str) -> Option<Arc<Case>> {
    let key = format!("{}/{case_name}", provider.dir());
    if let Some(c) = state.cases.lock().unwrap().get(&key) {
        return Some(c.clone());
    }
    let case = Arc::new(Case::load(provider.dir(), case_name)?);
    state.cases.lock().unwrap().insert(key, case.clone());
    Some(case)
}

async fn replay(state: &Arc<State>, provider: Provider, case_name: &str) -> Response<BoxBody> {
    replay_cut(state, provider, case_name, None).await
}

/// [`replay`], a stream cut after its first `cut_after` events.
async fn replay_cut(
    state: &Arc<State>,
    provider: Provider,
    case_name: &str,
    cut_after: Option<usize>,
) -> Response<BoxBody> {
    let Some(case) = cached_case(state, provider, case_name) else {
        let body = json!({"error": {"message": format!("mock: no fixture {}/{case_name}", provider.dir())}});
        return full(500, "application/json", body.to_string());
    };
    let status = case.status();
    if let (Some(sse), 200) = (case.sse(), status) {
        let events = split_events(sse);
        let gap = *state.event_gap.lock().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let st = state.clone();
        tokio::spawn(async move {
            for (i, e) in events.into_iter().enumerate() {
                if cut_after == Some(i) {
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "mock cut mid-stream",
                        )))
                        .await;
                    return;
                }
                if tx.send(Ok(Bytes::from(e))).await.is_err() {
                    st.cancellations.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                // A zero sleep still waits for the next timer tick (~1 ms).
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
            }
        });
        return sse_response(rx);
    }
    let mut resp = full(status, &case.content_type(), case.body_bytes());
    for h in [
        "retry-after",
        "x-request-id",
        "openai-organization",
        "anthropic-organization-id",
        "request-id",
    ] {
        if let Some(v) = case.header(h) {
            if let Ok(v) = v.parse() {
                resp.headers_mut().insert(h, v);
            }
        }
    }
    // Rate-limit headers as recorded (the gateway steers keys by them).
    for (name, value) in case.headers_with_prefixes(&["x-ratelimit-", "anthropic-ratelimit-"]) {
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            value.parse(),
        ) {
            resp.headers_mut().insert(n, v);
        }
    }
    if status == 429 && !resp.headers().contains_key("retry-after") {
        resp.headers_mut()
            .insert("retry-after", "7".parse().unwrap());
    }
    resp
}

fn chunk(i: usize) -> Bytes {
    let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "mock",
        "choices": [{"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": null}]});
    Bytes::from(format!("data: {v}\n\n"))
}

fn flood(n: usize) -> Response<BoxBody> {
    let fin = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "mock",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let events = (0..n)
        .map(chunk)
        .chain([
            Bytes::from(format!("data: {fin}\n\n")),
            Bytes::from_static(b"data: [DONE]\n\n"),
        ])
        .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
            events,
        ))))
        .unwrap()
}

fn special_stream(state: Arc<State>, mode: &str, gap: Duration) -> Response<BoxBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mode = mode.to_string();
    tokio::spawn(async move {
        match mode.as_str() {
            "cut-before-first" => {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "mock cut before the first event",
                    )))
                    .await;
                return;
            }
            "stall-before-first" => {
                tx.closed().await;
                state.cancellations.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ => {}
        }
        let _ = tx.send(Ok(chunk(0))).await;
        match mode.as_str() {
            "stall" => {
                // Silent until the gateway closes the stream.
                tx.closed().await;
                state.cancellations.fetch_add(1, Ordering::SeqCst);
            }
            "gated" => {
                tokio::select! {
                    _ = state.gate.notified() => {}
                    _ = tx.closed() => { state.cancellations.fetch_add(1, Ordering::SeqCst); return; }
                }
                let _ = tx.send(Ok(chunk(1))).await;
                let fin = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": "mock",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                let _ = tx.send(Ok(Bytes::from(format!("data: {fin}\n\n")))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            }
            "endless" => {
                for i in 1..10_000 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if tx.send(Ok(chunk(i))).await.is_err() {
                        state.cancellations.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            "cut" => {
                let _ = tx.send(Ok(chunk(1))).await;
                tokio::time::sleep(gap).await;
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "mock cut",
                    )))
                    .await;
            }
            _ => {}
        }
    });
    sse_response(rx)
}

/// `GET .../models`: Gemini's is the recorded list; OpenAI's and
/// Anthropic's follow the shapes of their API references (no recording of
/// them exists in the fixtures).
async fn model_list(state: &Arc<State>, path: &str, anthropic: bool) -> Response<BoxBody> {
    if path.starts_with("/v1beta/") {
        return replay(state, Provider::Gemini, "models-list").await;
    }
    let body = if anthropic {
        json!({"data": [
            {"type": "model", "id": "claude-opus-4-1-20250805", "display_name": "Claude Opus 4.1", "created_at": "2025-08-05T00:00:00Z"},
            {"type": "model", "id": "claude-haiku-4-5-20251001", "display_name": "Claude Haiku 4.5", "created_at": "2025-10-15T00:00:00Z"},
        ], "has_more": false, "first_id": "claude-opus-4-1-20250805", "last_id": "claude-haiku-4-5-20251001"})
    } else {
        json!({"object": "list", "data": [
            {"id": "gpt-4.1-nano", "object": "model", "created": 1744321025, "owned_by": "system"},
            {"id": "text-embedding-3-large", "object": "model", "created": 1705953180, "owned_by": "system"},
        ]})
    };
    full(200, "application/json", body.to_string())
}

/// Legacy `/v1/completions`: no recording of it exists in the fixtures, so
/// the answer follows the shape of the example in OpenAI's API reference
/// (`text_completion` object; chunks with `choices[].text`, `[DONE]` last).
fn legacy_completion(model: &str, stream: bool) -> Response<BoxBody> {
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12});
    if !stream {
        let body = json!({"id": "cmpl-mock", "object": "text_completion", "created": 1589478378,
            "model": model, "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": null, "finish_reason": "length"}],
            "usage": usage});
        return full(200, "application/json", body.to_string());
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut frames: Vec<String> = ["\n\n", "This is", " indeed a test"]
        .iter()
        .map(|t| {
            let c = json!({"id": "cmpl-mock", "object": "text_completion", "created": 1589478378, "model": model,
                "choices": [{"text": t, "index": 0, "logprobs": null, "finish_reason": null}]});
            format!("data: {c}\n\n")
        })
        .collect();
    let fin = json!({"id": "cmpl-mock", "object": "text_completion", "created": 1589478378, "model": model,
        "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "length"}]});
    frames.push(format!("data: {fin}\n\n"));
    let u = json!({"id": "cmpl-mock", "object": "text_completion", "created": 1589478378, "model": model,
        "choices": [], "usage": usage});
    frames.push(format!("data: {u}\n\n"));
    frames.push("data: [DONE]\n\n".to_string());
    tokio::spawn(async move {
        for f in frames {
            if tx.send(Ok(Bytes::from(f))).await.is_err() {
                return;
            }
        }
    });
    sse_response(rx)
}

/// Anthropic's documented mid-stream failure: an `error` event after content
/// has started (HTTP status already 200).
fn anthropic_overloaded_midstream() -> Response<BoxBody> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let events = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_mock\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-mock\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Partial\"}}\n\n",
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    ];
    tokio::spawn(async move {
        for e in events {
            if tx.send(Ok(Bytes::from_static(e.as_bytes()))).await.is_err() {
                return;
            }
        }
    });
    sse_response(rx)
}
