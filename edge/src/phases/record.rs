//! `record`: exactly one usage record per request, whatever happened: the
//! access-log line, the metrics, the control plane's telemetry and every
//! [`crate::hooks::RecordHook`] (later the ledger) read the same record.

use std::time::Duration;

use pingora::protocols::http::ServerSession;
use switchyard_backhaul::RequestReport;
use switchyard_llm::openai::Usage;
use switchyard_proto::Snapshot;

use crate::access_log::{self, AccessLine};
use crate::app::EdgeApp;
use crate::ctx::RequestCtx;
use crate::hooks::UsageRecord;
use crate::metrics::Observation;

pub(crate) fn record(
    app: &EdgeApp,
    session: &ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
) {
    let stats = ctx.stats.as_deref();
    let usage = stats.and_then(|s| s.usage());
    let cost_usd = cost(snap, ctx, usage);
    let record = UsageRecord {
        status: ctx.final_status(),
        error: ctx.final_error(),
        latency: ctx.received_at.elapsed(),
        ttft: stats.and_then(|s| s.ttft_us()).map(Duration::from_micros),
        usage,
        stream_failed: stats.is_some_and(|s| s.stream_failed()),
        client_gone: ctx.client_gone,
        attempts: ctx.attempts.len(),
        cost_usd,
    };
    if let (Some(limiter), Some(ticket)) = (&app.limiter, ctx.ticket.take()) {
        limiter.settle(ticket, record.usage, cost_usd);
    }
    let ctx = &*ctx;
    log(session, ctx, &record);
    let usage = record.usage.unwrap_or_default();
    if let (Some(observer), Some(served)) = (&app.observer, &ctx.served) {
        if !ctx.client_gone && !served.target.model.is_empty() {
            observer.observe(RequestReport {
                provider: served.target.provider.clone(),
                model: served.target.model.clone(),
                region: served.region.clone().unwrap_or_default(),
                ttft: record.ttft,
                latency: record.latency,
                error_class: record.error,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            });
        }
    }
    app.metrics.observe(&Observation {
        endpoint: ctx.endpoint,
        provider: ctx
            .served
            .as_ref()
            .map_or("none", |s| s.target.provider.as_str()),
        model: ctx.model_label.as_deref().unwrap_or("other"),
        status: record.status,
        latency: record.latency,
        ttft: record.ttft,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        stream_failed: record.stream_failed,
        client_gone: record.client_gone,
    });
    for hook in &app.hooks.record {
        hook.on_record(ctx, &record);
    }
}

/// What the request cost at the served target's prices, cached input
/// tokens at their discounted price; 0 when the policy has no price.
pub(crate) fn cost(snap: &Snapshot, ctx: &RequestCtx, usage: Option<Usage>) -> f64 {
    let (Some(served), Some(u)) = (&ctx.served, usage) else {
        return 0.0;
    };
    snap.providers()
        .get(&served.target.provider)
        .and_then(|p| p.pricing.get(&served.target.model))
        .map_or(0.0, |price| {
            price.cost_with_cache(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
        })
}

/// One line per request. Prompt and completion text are never logged.
fn log(session: &ServerSession, ctx: &RequestCtx, record: &UsageRecord) {
    let req = session.req_header();
    access_log::emit(&AccessLine {
        request_id: &ctx.request_id,
        method: req.method.as_str(),
        path: req.uri.path(),
        tenant: ctx.tenant.as_ref().map_or("-", |t| t.id.as_str()),
        model: ctx.model.as_deref().unwrap_or("-"),
        provider: ctx
            .served
            .as_ref()
            .map_or("-", |s| s.target.provider.as_str()),
        status: record.status,
        stream: ctx.stream,
        latency_ms: record.latency.as_secs_f64() * 1000.0,
        ttft_ms: record.ttft.map(|d| d.as_secs_f64() * 1000.0),
        prompt_tokens: record.usage.map(|u| u.prompt_tokens),
        completion_tokens: record.usage.map(|u| u.completion_tokens),
        attempts: record.attempts,
        cost_usd: record.cost_usd,
        key: ctx.key.as_ref().map(|k| k.id.as_str()),
        error: record.error,
        client_gone: record.client_gone,
    });
}
