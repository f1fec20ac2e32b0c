//! OpenTelemetry spans of the edge, built in `record` from what the
//! request already recorded: one server span for the request (a child of
//! the caller's `traceparent` when it sent one) and one client span per
//! attempt, whose context crossed the backhaul as the egress's parent.
//! Exported by [`switchyard_backhaul::otlp::Exporter`] when the node has
//! `--otlp-endpoint`.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_backhaul::otlp::{Exporter, Kind, Span};

use crate::ctx::RequestCtx;
use crate::hooks::{RecordHook, UsageRecord};

pub struct OtlpHook {
    exporter: Arc<Exporter>,
}

impl OtlpHook {
    pub fn new(exporter: Arc<Exporter>) -> Self {
        OtlpHook { exporter }
    }
}

impl RecordHook for OtlpHook {
    fn on_record(&self, ctx: &RequestCtx, record: &UsageRecord) {
        let now = SystemTime::now();
        let start = now.checked_sub(record.latency).unwrap_or(now);
        let parent = ctx.trace_parent.map(|p| p.span_id);
        let mut span = Span::new("edge.request", Kind::Server, &ctx.trace, parent, start)
            .str("switchyard.request_id", &ctx.request_id)
            .str("switchyard.endpoint", ctx.endpoint)
            .int("http.response.status_code", i64::from(record.status))
            .int("switchyard.attempts", record.attempts as i64)
            .float("switchyard.cost_usd", record.cost_usd);
        if let Some(t) = &ctx.tenant {
            span = span.str("switchyard.tenant", &t.id);
        }
        if let Some(m) = &ctx.model {
            span = span.str("gen_ai.request.model", m);
        }
        if let Some(s) = &ctx.served {
            span = span
                .str("switchyard.provider", &s.target.provider)
                .str("gen_ai.response.model", &s.target.model);
        }
        if let Some(u) = record.usage {
            span = span
                .int("gen_ai.usage.input_tokens", u.prompt_tokens as i64)
                .int("gen_ai.usage.output_tokens", u.completion_tokens as i64);
        }
        if ctx.cache_hit {
            span = span.str("switchyard.cache", "hit");
        }
        self.exporter.export(span.end(now, record.error));
        for a in &ctx.attempts {
            let Some(ctx_span) = &a.span else { continue };
            let begun = start + a.started_after;
            let attempt = Span::new(
                "edge.attempt",
                Kind::Client,
                ctx_span,
                Some(ctx.trace.span_id),
                begun,
            )
            .int("switchyard.attempt.target", a.target as i64);
            self.exporter
                .export(attempt.end(begun + a.elapsed, a.error));
        }
    }
}
