//! What the edge hands the egress, and what comes back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::BoxStream;
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_proto::RouteTarget;

#[derive(Debug, Clone)]
pub enum Operation {
    Chat(ChatRequest),
    Embeddings(EmbeddingsRequest),
}

impl Operation {
    pub fn is_stream(&self) -> bool {
        matches!(self, Operation::Chat(c) if c.stream)
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
}

pub enum ResponseBody {
    /// A complete JSON body.
    Json(Bytes),
    /// SSE frames, each ready to write. Errors after the first frame arrive
    /// as an error frame inside the stream, since the status is already sent.
    Sse(BoxStream<'static, Bytes>),
}

pub struct EgressResponse {
    pub status: u16,
    pub body: ResponseBody,
    pub stats: Arc<RequestStats>,
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
