//! What the edge hands the egress, and what comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde_json::{Map, Value};
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_proto::RouteTarget;

/// The API the caller speaks: answers and errors go back in its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    Anthropic,
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

impl Operation {
    pub fn is_stream(&self) -> bool {
        match self {
            Operation::Chat(c) => c.stream,
            Operation::Messages { chat, .. } => chat.stream,
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
    /// The stream ended with an error frame (stall, upstream cut, ...).
    stream_failed: AtomicBool,
    has_usage: AtomicBool,
}

impl RequestStats {
    pub fn mark_first_byte(&self, since: Instant) {
        let us = since.elapsed().as_micros().max(1) as u64;
        let _ = self
            .ttft_us
            .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
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
        self.has_usage.store(true, Ordering::Relaxed);
    }

    pub fn usage(&self) -> Option<Usage> {
        if !self.has_usage.load(Ordering::Relaxed) {
            return None;
        }
        Some(Usage {
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            cached_tokens: self.cached_tokens.load(Ordering::Relaxed),
        })
    }

    pub fn mark_stream_failed(&self) {
        self.stream_failed.store(true, Ordering::Relaxed);
    }

    pub fn stream_failed(&self) -> bool {
        self.stream_failed.load(Ordering::Relaxed)
    }
}
