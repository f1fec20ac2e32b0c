//! What the edge hands the egress, and what comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde_json::{Map, Value};
use switchyard_llm::completions::CompletionsRequest;
use switchyard_llm::gemini_native::{EmbedRequest, GenerateRequest};
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_llm::responses::ResponsesRequest;
use switchyard_llm::GatewayError;
use switchyard_proto::RouteTarget;

/// The API the caller speaks: answers and errors go back in its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Anthropic,
    Gemini,
}

#[derive(Debug, Clone)]
pub enum Operation {
    Chat(ChatRequest),
    Embeddings(EmbeddingsRequest),
    /// An Anthropic Messages request as the caller sent it; `chat` is its
    /// translation to the hub shape, used when the provider is not Anthropic.
    Messages {
        body: Map<String, Value>,
        chat: ChatRequest,
    },
    /// Anthropic `count_tokens`, proxied to Anthropic providers.
    CountTokens {
        body: Map<String, Value>,
    },
    /// An OpenAI Responses request: passed through to OpenAI providers,
    /// translated through the hub for the others.
    Responses(ResponsesRequest),
    /// Legacy completions: passed through to OpenAI providers, translated
    /// to chat for the others.
    Completions(CompletionsRequest),
    /// Gemini `generateContent` / `streamGenerateContent`: passed through to
    /// Gemini providers, translated through the hub for the others.
    Generate(GenerateRequest),
    /// Gemini `countTokens`: passed through to Gemini providers, counted
    /// locally for the others.
    GeminiCountTokens {
        /// The model named in the URL.
        model: String,
        body: Map<String, Value>,
    },
    /// Gemini `embedContent` / `batchEmbedContents`: passed through to
    /// Gemini providers, sent as OpenAI embeddings to the others.
    GeminiEmbed(EmbedRequest),
    /// Forwarded to the provider untouched (raw passthrough).
    Raw(RawRequest),
}

#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    /// Path (and query) below the provider's base URL, without leading `/`.
    pub path: String,
    /// Client headers worth forwarding (content type, API version/beta flags).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// A raw passthrough path split into decoded segments and a query, refused
/// when it could leave the provider's `base_url` prefix: `.`/`..` segments
/// (plain or percent-encoded), encoded slashes or backslashes, a literal `%`
/// after decoding (a second decoding upstream could still make `..`), and
/// control characters. The edge checks this to answer early; the egress
/// checks again because it builds the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPath<'a> {
    pub segments: Vec<String>,
    pub query: Option<&'a str>,
}

impl<'a> RawPath<'a> {
    pub fn parse(path_and_query: &'a str) -> Result<Self, GatewayError> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let bad = |why: &str| {
            GatewayError::invalid(format!("The passthrough path is not allowed: {why}."))
                .with_code("invalid_path")
        };
        if query.is_some_and(|q| q.bytes().any(|b| b == b'#' || b.is_ascii_control())) {
            return Err(bad("the query holds a fragment or control characters"));
        }
        let mut segments = Vec::new();
        for raw in path.trim_start_matches('/').split('/') {
            if raw.contains('\\') {
                return Err(bad("backslashes are not allowed"));
            }
            let decoded = percent_decode_strict(raw)
                .ok_or_else(|| bad("a segment is not valid percent-encoded UTF-8"))?;
            if decoded == "." || decoded == ".." {
                return Err(bad("`.` and `..` segments are not allowed"));
            }
            if decoded.contains(['/', '\\']) {
                return Err(bad("encoded slashes are not allowed"));
            }
            if decoded.contains('%') {
                return Err(bad("double percent-encoding is not allowed"));
            }
            if decoded.chars().any(char::is_control) {
                return Err(bad("control characters are not allowed"));
            }
            segments.push(decoded);
        }
        Ok(RawPath { segments, query })
    }
}

/// Percent-decoding that refuses malformed escapes instead of guessing.
fn percent_decode_strict(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A model name that is safe to put in a URL path segment (Gemini puts it
/// there): no separators, no `.`/`..`, nothing a URL parser or a provider's
/// path normaliser would read as structure.
pub fn check_path_model(model: &str) -> Result<(), GatewayError> {
    let bad = model.is_empty()
        || model == "."
        || model == ".."
        || model.starts_with("..")
        || model
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '?' | '#' | '%') || c.is_control() || c == ' ');
    if bad {
        return Err(GatewayError::invalid(format!(
            "The model name {model:?} cannot be sent to this provider: it must not contain `/`, `\\`, `?`, `#`, `%`, spaces or control characters."
        ))
        .with_code("invalid_model")
        .with_param("model"));
    }
    Ok(())
}

/// A model name from a client, before any provider sees it: the checks every
/// provider needs (a model name is never a path, a query or a control sequence).
pub fn check_model_name(model: &str) -> Result<(), GatewayError> {
    let bad = model
        .chars()
        .any(|c| matches!(c, '\\' | '?' | '#' | '%') || c.is_control())
        || model.split('/').any(|s| s == "." || s == "..");
    if bad {
        return Err(GatewayError::invalid(format!(
            "The model name {model:?} is not valid: it must not contain `..` segments, `\\`, `?`, `#`, `%` or control characters."
        ))
        .with_code("invalid_model")
        .with_param("model"));
    }
    Ok(())
}

impl Operation {
    pub fn is_stream(&self) -> bool {
        match self {
            Operation::Chat(c) => c.stream,
            Operation::Messages { chat, .. } => chat.stream,
            Operation::Responses(r) => r.stream,
            Operation::Completions(c) => c.stream,
            Operation::Generate(g) => g.stream,
            _ => false,
        }
    }

    /// A rough prompt size in tokens (about four characters of text per
    /// token, plus a few per message), for key quotas and policy rules:
    /// cheap, tokenizer-free, and the same on edge and egress. Images count
    /// as a flat 1,000 tokens each rather than by their encoded size.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        fn walk(v: &Value, chars: &mut u64, images: &mut u64) {
            match v {
                Value::String(s) => *chars += s.len() as u64,
                Value::Array(a) => a.iter().for_each(|x| walk(x, chars, images)),
                Value::Object(o) => {
                    for (k, x) in o {
                        if matches!(
                            k.as_str(),
                            "image_url" | "source" | "inline_data" | "inlineData"
                        ) {
                            *images += 1;
                        } else {
                            walk(x, chars, images);
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(n) = match self {
            // Worked out while the body was read, without its tree.
            Operation::Chat(c) => c.prompt_estimate(),
            _ => None,
        } {
            return n;
        }
        let (body, fields): (&Map<String, Value>, &[&str]) = match self {
            Operation::Chat(c) => (c.body(), &["messages", "tools"]),
            Operation::Messages { body, .. } | Operation::CountTokens { body } => {
                (body, &["messages", "system", "tools"])
            }
            Operation::Embeddings(e) => (&e.body, &["input"]),
            Operation::Responses(r) => (&r.body, &["input", "instructions", "tools"]),
            Operation::Completions(c) => (&c.body, &["prompt"]),
            Operation::Generate(g) => (&g.body, &["contents", "systemInstruction", "tools"]),
            Operation::GeminiCountTokens { body, .. } => (body, &["contents"]),
            Operation::GeminiEmbed(e) => (&e.body, &["content", "requests"]),
            Operation::Raw(r) => return (r.body.len() as u64).div_ceil(4),
        };
        let (mut chars, mut images) = (0, 0);
        let mut messages = 0;
        for field in fields {
            if let Some(v) = body.get(*field) {
                messages += v.as_array().map_or(1, |a| a.len() as u64);
                walk(v, &mut chars, &mut images);
            }
        }
        chars.div_ceil(4) + 4 * messages + 1000 * images
    }

    /// The `max_tokens` (or `max_completion_tokens`) the caller asked for.
    pub fn requested_max_tokens(&self) -> Option<u64> {
        let body = match self {
            Operation::Chat(c) => c.body(),
            Operation::Messages { body, .. } => body,
            Operation::Responses(r) => &r.body,
            Operation::Completions(c) => &c.body,
            Operation::Generate(g) => {
                return g
                    .body
                    .get("generationConfig")
                    .and_then(|c| c.get("maxOutputTokens"))
                    .and_then(Value::as_u64)
            }
            _ => return None,
        };
        ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
    }

    /// Whether the request carries images (OpenAI `image_url` parts,
    /// Anthropic `image` blocks).
    pub fn has_images(&self) -> bool {
        fn any_image(v: &Value) -> bool {
            match v {
                Value::Array(a) => a.iter().any(any_image),
                Value::Object(o) => {
                    o.contains_key("image_url")
                        || o.contains_key("inline_data")
                        || o.contains_key("inlineData")
                        || matches!(
                            o.get("type").and_then(Value::as_str),
                            Some("image" | "input_image")
                        )
                        || o.values().any(any_image)
                }
                _ => false,
            }
        }
        match self {
            Operation::Chat(c) => c.body().get("messages").is_some_and(any_image),
            Operation::Messages { body, .. } => body.get("messages").is_some_and(any_image),
            Operation::Responses(r) => r.body.get("input").is_some_and(any_image),
            Operation::Generate(g) => g.body.get("contents").is_some_and(any_image),
            _ => false,
        }
    }

    /// Whether the request declares tools.
    pub fn has_tools(&self) -> bool {
        match self {
            Operation::Chat(c) => c.body().get("tools").is_some_and(|t| !t.is_null()),
            Operation::Messages { body, .. } => body.get("tools").is_some_and(|t| !t.is_null()),
            Operation::Responses(r) => r.body.get("tools").is_some_and(|t| !t.is_null()),
            Operation::Generate(g) => g.body.get("tools").is_some_and(|t| !t.is_null()),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EgressRequest {
    pub request_id: String,
    pub tenant: String,
    pub target: RouteTarget,
    pub op: Operation,
    /// `x-switchyard-simulate` from the client: per-request behaviour of the
    /// simulated provider (ignored by every other provider).
    pub simulate: Option<String>,
    pub received_at: Instant,
    pub inbound: Protocol,
    /// Caller headers a same-protocol provider should see
    /// (`anthropic-version`, `anthropic-beta`).
    pub forward_headers: Vec<(String, String)>,
    /// Jurisdictions the request may be processed in; empty = unrestricted.
    /// The egress re-checks it against the provider (defence in depth).
    pub residency: Vec<String>,
    /// The span this request belongs to (W3C trace context): on the edge
    /// the attempt's, on the egress the provider call's.
    pub trace: Option<crate::trace::TraceContext>,
}

pub enum ResponseBody {
    /// A complete body.
    Full(Bytes),
    /// Chunks, each ready to write (SSE frames, or raw bytes in passthrough).
    /// Errors after the first chunk arrive as an error frame inside the
    /// stream, since the status is already sent.
    Stream(BoxStream<'static, Bytes>),
}

pub struct EgressResponse {
    pub status: u16,
    pub content_type: String,
    /// `retry-after` from the provider, kept for the caller.
    pub retry_after: Option<String>,
    pub body: ResponseBody,
    pub stats: Arc<RequestStats>,
}

pub const JSON: &str = "application/json";
pub const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";

/// One finished request as a node saw it, for whoever aggregates telemetry
/// (the control plane's reporter in multi-node mode).
#[derive(Debug, Clone)]
pub struct RequestReport {
    pub provider: String,
    pub model: String,
    pub region: String,
    pub ttft: Option<std::time::Duration>,
    pub latency: std::time::Duration,
    /// Low-cardinality error class, e.g. `rate_limit_error`.
    pub error_class: Option<&'static str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Receives a [`RequestReport`] per finished request; must not block.
pub trait RequestObserver: Send + Sync + 'static {
    fn observe(&self, report: RequestReport);
}

/// Filled in while a response flows, read by the edge for its log line.
#[derive(Debug, Default)]
pub struct RequestStats {
    ttft_us: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    /// How long the provider took to its first byte, from the moment the
    /// egress sent the call that answered: what the gateway did not add.
    upstream_us: AtomicU64,
    /// The key pool and key id the answer was served with (never the key).
    key: std::sync::OnceLock<(Arc<str>, Arc<str>)>,
    /// The egress node that served it.
    egress_node: std::sync::OnceLock<Arc<str>>,
    /// The stream ended with an error frame (stall, upstream cut, ...).
    stream_failed: AtomicBool,
    has_usage: AtomicBool,
    /// Why the stream failed when it did so before its first frame.
    failed_before_first_frame: std::sync::OnceLock<GatewayError>,
}

impl RequestStats {
    pub fn mark_first_byte(&self, since: Instant) {
        let us = since.elapsed().as_micros().max(1) as u64;
        let _ = self
            .ttft_us
            .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Overrides the first-token time: a resumed stream's first token is
    /// the one its first attempt sent.
    pub fn set_ttft_us(&self, us: u64) {
        self.ttft_us.store(us.max(1), Ordering::Relaxed);
    }

    pub fn ttft_us(&self) -> Option<u64> {
        match self.ttft_us.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    pub fn set_usage(&self, usage: Usage) {
        self.prompt_tokens
            .store(usage.prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .store(usage.completion_tokens, Ordering::Relaxed);
        self.cached_tokens
            .store(usage.cached_tokens, Ordering::Relaxed);
        self.reasoning_tokens
            .store(usage.reasoning_tokens, Ordering::Relaxed);
        self.has_usage.store(true, Ordering::Relaxed);
    }

    /// The provider's wait before its first byte, as the egress saw it.
    pub fn set_upstream_wait(&self, wait: std::time::Duration) {
        self.upstream_us
            .store(wait.as_micros().max(1) as u64, Ordering::Relaxed);
    }

    pub fn upstream_us(&self) -> Option<u64> {
        match self.upstream_us.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// The key that served the answer; the first one set wins.
    pub fn set_key(&self, pool: Arc<str>, id: Arc<str>) {
        let _ = self.key.set((pool, id));
    }

    /// (pool, key id) of the key that served the answer.
    pub fn key(&self) -> Option<(&str, &str)> {
        self.key.get().map(|(p, k)| (&**p, &**k))
    }

    pub fn set_egress_node(&self, name: Arc<str>) {
        let _ = self.egress_node.set(name);
    }

    pub fn egress_node(&self) -> Option<&str> {
        self.egress_node.get().map(|n| &**n)
    }

    pub fn usage(&self) -> Option<Usage> {
        if !self.has_usage.load(Ordering::Relaxed) {
            return None;
        }
        Some(Usage {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            cached_tokens: self.cached_tokens.load(Ordering::Relaxed),
            reasoning_tokens: self.reasoning_tokens.load(Ordering::Relaxed),
        })
    }

    pub fn mark_stream_failed(&self) {
        self.stream_failed.store(true, Ordering::Relaxed);
    }

    pub fn stream_failed(&self) -> bool {
        self.stream_failed.load(Ordering::Relaxed)
    }

    /// Records that the stream failed before it produced any frame, so
    /// whoever waits for the first frame can report the error itself.
    pub fn mark_failed_before_first_frame(&self, error: &GatewayError) {
        self.mark_stream_failed();
        let _ = self.failed_before_first_frame.set(error.clone());
    }

    pub fn failed_before_first_frame(&self) -> Option<&GatewayError> {
        self.failed_before_first_frame.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both_ways(
        body: &str,
    ) -> (
        Result<ChatRequest, GatewayError>,
        Result<ChatRequest, GatewayError>,
    ) {
        let bytes = bytes::Bytes::copy_from_slice(body.as_bytes());
        (
            ChatRequest::parse_bytes(&bytes),
            ChatRequest::parse(body.as_bytes()),
        )
    }

    /// A chat body read quickly (no tree) says what its tree says: model,
    /// streaming, usage flag and the prompt estimate; the recorded OpenAI
    /// requests all take the quick path.
    #[test]
    fn quick_chat_reading_agrees_with_the_tree() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openai");
        let mut bodies: Vec<String> = Vec::new();
        for dir in std::fs::read_dir(&fixtures).unwrap() {
            let dir = dir.unwrap().path();
            if !dir
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("chat-")
            {
                continue;
            }
            let request: Value =
                serde_json::from_slice(&std::fs::read(dir.join("request.json")).unwrap()).unwrap();
            if request["path"] == "/v1/chat/completions" {
                bodies.push(request["body"].to_string());
            }
        }
        assert!(bodies.len() > 10, "{} fixture bodies", bodies.len());
        bodies.extend(
            [
                r#"{"model":"m","messages":[{"role":"user","content":"h\u00e9 \"x\"\n"}]}"#,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"tools":null}"#,
                r#"{"model":"m","messages":[{"role":"user","content":"q"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"stream":true,"stream_options":{"include_usage":true}}"#,
                r#"{"model":"m","messages":[{"role":"user","content":"q","source":{"data":"abc"}}],"tools":"x","stream":null,"stream_options":{"include_usage":"yes"}}"#,
                r#"{"model":"m","messages":[{"role":"user","content":{"nested":{"\u0069mage_url":1,"t":"abc"}}}],"tools":{"a":"b"}}"#,
                r#" { "model" : "m" , "messages" : [ { "role" : "system" , "content" : "" } ] , "n" : 1.5e3 } "#,
            ]
            .map(String::from),
        );
        for body in &bodies {
            let (quick, tree) = both_ways(body);
            let (quick, tree) = (quick.unwrap(), tree.unwrap());
            assert!(quick.raw().is_some(), "not read quickly: {body}");
            assert_eq!(quick.model, tree.model, "{body}");
            assert_eq!(
                (quick.stream, quick.include_usage),
                (tree.stream, tree.include_usage),
                "{body}"
            );
            let (quick_op, tree_op) = (Operation::Chat(quick), Operation::Chat(tree));
            assert_eq!(
                quick_op.estimated_prompt_tokens(),
                tree_op.estimated_prompt_tokens(),
                "{body}"
            );
            let Operation::Chat(quick) = quick_op else {
                unreachable!()
            };
            // Asked for, the tree is made from the caller's bytes.
            assert_eq!(
                quick.body(),
                &serde_json::from_str::<Map<String, Value>>(body).unwrap()
            );
        }
    }

    /// What the quick reading refuses goes through the tree: the same error,
    /// or the same request without the caller's bytes.
    #[test]
    fn what_the_quick_reading_refuses_the_tree_reads() {
        for body in [
            "",
            "[]",
            r#"{"model":"m","messages":[{"role":"user","content":"q"}]"#,
            r#"{"messages":[{"role":"user","content":"q"}]}"#,
            r#"{"model":"","messages":[{"role":"user","content":"q"}]}"#,
            r#"{"model":3,"messages":[{"role":"user","content":"q"}]}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","messages":{}}"#,
            r#"{"model":"m","messages":[{"content":"q"}]}"#,
            r#"{"model":"m","messages":[{"role":1,"content":"q"}]}"#,
            r#"{"model":"m","messages":["q"]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"q"}],"stream":"yes"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"\x"}]}"#,
        ] {
            let (quick, tree) = both_ways(body);
            assert_eq!(
                quick.unwrap_err().message,
                tree.unwrap_err().message,
                "{body}"
            );
        }
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"q"}],"model":"n"}"#,
            r#"{"model":"m","messages":[{"role":1,"role":"user","content":"q"}]}"#,
            r#"{"m\u006fdel":"m","messages":[{"role":"user","content":"q"}]}"#,
            r#"{"model":"m\u00e9","messages":[{"role":"user","content":"q"}]}"#,
        ] {
            let (quick, tree) = both_ways(body);
            let (quick, tree) = (quick.unwrap(), tree.unwrap());
            assert!(quick.raw().is_none(), "{body}");
            assert_eq!(quick.model, tree.model);
            assert_eq!(quick.body(), tree.body());
        }
    }

    #[test]
    fn raw_paths_stay_below_the_base() {
        let p = RawPath::parse("v1beta/models/gemini-pro:generateContent?alt=sse").unwrap();
        assert_eq!(
            p.segments,
            ["v1beta", "models", "gemini-pro:generateContent"]
        );
        assert_eq!(p.query, Some("alt=sse"));
        assert_eq!(
            RawPath::parse("v1/files/a%20b").unwrap().segments,
            ["v1", "files", "a b"]
        );
        for evil in [
            "../admin/x",
            "v1/../../admin",
            "v1/./x",
            "%2e%2e/admin",
            "%2E%2e/admin",
            ".%2e/admin",
            "v1%2f..%2fadmin",
            "v1%2F..",
            "v1%5c..%5cadmin",
            "v1\\..\\admin",
            "v1/%252e%252e/admin",
            "v1/%00",
            "v1/%0d%0aHost:x",
            "v1/%zz",
            "v1/%c3",
            "v1?a#b",
        ] {
            assert!(RawPath::parse(evil).is_err(), "{evil} accepted");
        }
    }

    #[test]
    fn model_names_that_would_be_paths_are_refused() {
        check_path_model("gemini-1.5-pro").unwrap();
        check_model_name("meta-llama/Llama-3-8b").unwrap();
        check_model_name("ft:gpt-4o-mini:org::id").unwrap();
        for evil in ["../../admin/x?", "a/b", "a?b", "a#b", "..", "a%2fb", "a\nb"] {
            assert!(check_path_model(evil).is_err(), "{evil}");
        }
        for evil in ["../../admin/x", "m/..", "a?b", "a#b", "a%2e", "a\r"] {
            assert!(check_model_name(evil).is_err(), "{evil}");
        }
    }
}
