//! What the edge knows about one request, filled in phase by phase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_backhaul::trace::TraceContext;
use switchyard_backhaul::{Protocol, RequestStats};
use switchyard_proto::{PlannedTarget, Tenant, VirtualKey};

/// Per-request state every phase reads and fills, in the spirit of
/// pingora's `ProxyHttp::CTX`. Hooks see it read-only.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: String,
    pub received_at: Instant,
    /// The edge's span of this request: a child of the caller's
    /// `traceparent` when it sent one, else the root of a new trace.
    pub trace: TraceContext,
    /// The caller's span, when it sent a valid `traceparent`.
    pub trace_parent: Option<TraceContext>,
    /// The caller's protocol: errors and streams are shaped in it.
    pub protocol: Protocol,
    /// Bounded endpoint label (`chat`, `messages`, `models`, ...).
    pub endpoint: &'static str,
    /// Set by `admit` once the virtual key is known.
    pub tenant: Option<Arc<Tenant>>,
    /// The virtual key used, when it is one (`ctl vkeys`), not the
    /// policy's key of the tenant.
    pub key: Option<Arc<VirtualKey>>,
    /// Prompt tokens estimated from the body at admission (for `tpm`).
    pub estimated_tokens: u64,
    /// The request's hold on its tenant's counters, settled in `record`.
    pub(crate) ticket: Option<crate::limits::Ticket>,
    /// Headers every answer to this request carries (rate-limit state,
    /// budget warnings), success or error.
    pub answer_headers: crate::respond::Extra,
    /// Set when the request opted into the response cache and missed: its
    /// answer is teed into the cache under this key.
    pub cache_key: Option<crate::cache::CacheKey>,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// Jurisdictions the request may be served in: the tenant's, narrowed
    /// by `x-switchyard-residency`; `None` = anywhere.
    pub residency: Option<Vec<String>>,
    /// The model the caller named (`provider/*` for raw passthrough).
    pub model: Option<String>,
    /// The requested model when the policy knows it (bounded metric label).
    pub model_label: Option<String>,
    pub stream: bool,
    /// Every attempt `dispatch` made, in order.
    pub attempts: Vec<Attempt>,
    /// The target that answered (or failed last).
    pub served: Option<PlannedTarget>,
    /// When the answer was committed (its status line written).
    pub committed_at: Option<Instant>,
    /// The status the client was given (0 until then).
    pub status: u16,
    /// Low-cardinality error label of a failed request.
    pub error: Option<&'static str>,
    /// Usage and first-token time of the answer, filled while it flows.
    pub stats: Option<Arc<RequestStats>>,
    pub client_gone: bool,
}

/// One try of one target of the plan.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Index into the plan's targets.
    pub target: usize,
    pub elapsed: Duration,
    /// This attempt's span (a child of the request's), sent over the
    /// backhaul as the egress's parent.
    pub span: Option<TraceContext>,
    /// When it started, after the request was received.
    pub started_after: Duration,
    /// Error label when it failed; `None` when it produced the answer.
    pub error: Option<&'static str>,
}

impl RequestCtx {
    pub fn new(request_id: String, received_at: Instant) -> Self {
        RequestCtx {
            request_id,
            received_at,
            trace: TraceContext::start(),
            trace_parent: None,
            protocol: Protocol::OpenAi,
            endpoint: "other",
            tenant: None,
            key: None,
            estimated_tokens: 0,
            ticket: None,
            answer_headers: Vec::new(),
            cache_key: None,
            cache_hit: false,
            residency: None,
            model: None,
            model_label: None,
            stream: false,
            attempts: Vec::new(),
            served: None,
            committed_at: None,
            status: 0,
            error: None,
            stats: None,
            client_gone: false,
        }
    }

    /// The status as recorded: 499 for a client that went away.
    pub fn final_status(&self) -> u16 {
        if self.client_gone {
            499
        } else {
            self.status
        }
    }

    /// The error as recorded: a stream that ended with an error frame
    /// counts as failed even though its status was 200.
    pub fn final_error(&self) -> Option<&'static str> {
        if self.stats.as_ref().is_some_and(|s| s.stream_failed()) {
            Some("stream_failed")
        } else {
            self.error
        }
    }
}
