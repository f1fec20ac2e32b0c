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
    // What the provider did not spend of the time to the first byte was
    // spent by the gateway (edge, backhaul, egress).
    let overhead = match (record.ttft, stats.and_then(|s| s.upstream_us())) {
        (Some(ttft), Some(upstream)) => Some(ttft.saturating_sub(Duration::from_micros(upstream))),
        _ => None,
    };
    app.metrics.observe(&Observation {
        endpoint: ctx.endpoint,
        provider: ctx
            .served
            .as_ref()
            .map_or("none", |s| s.target.provider.as_str()),
        model: ctx.model_label.as_deref().unwrap_or("other"),
        served_model: served_model_label(snap, ctx),
        tenant: ctx.tenant.as_ref().map(|t| t.id.as_str()),
        cost_usd: record.cost_usd,
        overhead,
        status: record.status,
        latency: record.latency,
        ttft: record.ttft,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: usage.cached_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        stream_failed: record.stream_failed,
        client_gone: record.client_gone,
    });
    for hook in &app.hooks.record {
        hook.on_record(ctx, &record);
    }
}

/// The served model as a label: only models the policy lists for the
/// provider (a caller may name others where a provider takes any), so the
/// label set stays the policy's.
fn served_model_label<'a>(snap: &Snapshot, ctx: &'a RequestCtx) -> &'a str {
    let Some(s) = ctx.served.as_ref().filter(|s| !s.target.model.is_empty()) else {
        return "none";
    };
    let listed = snap
        .providers()
        .get(&s.target.provider)
        .is_some_and(|p| p.models.contains(&s.target.model));
    if listed {
        &s.target.model
    } else {
        "other"
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
    let trace_id = ctx.trace.trace_id_hex();
    access_log::emit(&AccessLine {
        request_id: &ctx.request_id,
        trace_id: &trace_id,
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
        egress: ctx.stats.as_deref().and_then(|s| s.egress_node()),
        cost_usd: record.cost_usd,
        key: ctx.key.as_ref().map(|k| k.id.as_str()),
        error: record.error,
        client_gone: record.client_gone,
    });
}
