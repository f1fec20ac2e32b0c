//! Where later features attach to the request pipeline.
//!
//! Each trait belongs to one phase and every method has a no-op default, so
//! a limiter, a response cache or a usage ledger implements only what it
//! needs and is registered on [`crate::EdgeApp`] with a builder method;
//! `dispatch`, the one place that makes attempts, never changes for them.
//! Hooks run on the request path: they must not block.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchyard_llm::openai::Usage;
use switchyard_llm::GatewayError;
use switchyard_proto::PlannedTarget;

use crate::ctx::RequestCtx;

/// `admit`: after authentication, once the request is known (tenant,
/// model, stream) and before anything is planned or sent. An error refuses
/// the request in the caller's protocol (e.g. a 429 from a rate limiter).
pub trait AdmitHook: Send + Sync + 'static {
    fn on_admit(&self, _ctx: &RequestCtx) -> Result<(), GatewayError> {
        Ok(())
    }
}

/// `plan`: the ordered targets the request may go to.
pub trait PlanHook: Send + Sync + 'static {
    fn on_plan(&self, _ctx: &RequestCtx, _targets: &[PlannedTarget]) {}
}

/// `respond`: sees an answer from a target as it is written, without
/// buffering it (usage, a cache tee). Answers the edge gives itself
/// (errors, the model list) are not observed.
pub trait ResponseObserver: Send + Sync + 'static {
    /// The answer is committed: its status line is about to be written.
    fn on_commit(&self, _ctx: &RequestCtx, _status: u16) {}
    /// One piece of the body as written: each streamed frame, or a
    /// complete body once.
    fn on_body(&self, _ctx: &RequestCtx, _chunk: &Bytes) {}
    /// The body is over (`ctx.client_gone` tells whether it was cut short).
    fn on_end(&self, _ctx: &RequestCtx) {}
}

/// `record`: the one usage record of a request, whatever happened to it.
pub trait RecordHook: Send + Sync + 'static {
    fn on_record(&self, _ctx: &RequestCtx, _record: &UsageRecord) {}
}

/// What `record` writes once per request: the access log, metrics, the
/// control plane's telemetry and every [`RecordHook`] read this.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    /// 499 when the client went away.
    pub status: u16,
    /// Low-cardinality label; `stream_failed` for a stream that ended with
    /// an error frame.
    pub error: Option<&'static str>,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub usage: Option<Usage>,
    pub stream_failed: bool,
    pub client_gone: bool,
    pub attempts: usize,
    /// USD at the served target's prices (cached input at its discount);
    /// 0 when the policy has no price for it.
    pub cost_usd: f64,
}

#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub admit: Vec<Arc<dyn AdmitHook>>,
    pub plan: Vec<Arc<dyn PlanHook>>,
    pub response: Vec<Arc<dyn ResponseObserver>>,
    pub record: Vec<Arc<dyn RecordHook>>,
}
