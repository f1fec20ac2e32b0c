//! The edge's usage-ledger hook: one record per request, with the numbers
//! and none of the text, handed to the node agent's bounded buffer, which
//! ships it to the control plane.

use prometheus::IntCounter;
use switchyard_control::ledger::Ledger;
use switchyard_control::pb;

use crate::ctx::RequestCtx;
use crate::hooks::{RecordHook, UsageRecord};

pub struct LedgerHook {
    ledger: Ledger,
    dropped: IntCounter,
}

impl LedgerHook {
    pub fn new(ledger: Ledger, registry: &prometheus::Registry) -> Self {
        let dropped = IntCounter::new(
            "ledger_records_dropped_total",
            "Usage records dropped because the buffer for the control plane was full",
        )
        .expect("metric");
        let _ = registry.register(Box::new(dropped.clone()));
        LedgerHook { ledger, dropped }
    }
}

impl RecordHook for LedgerHook {
    fn on_record(&self, ctx: &RequestCtx, record: &UsageRecord) {
        // Requests refused before a tenant was known are no one's usage.
        let Some(tenant) = &ctx.tenant else { return };
        let usage = record.usage.unwrap_or_default();
        let served = ctx.served.as_ref();
        let stats = ctx.stats.as_deref();
        let msg = pb::UsageRecordMsg {
            uid: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
            at_ms: crate::limits::now_ms() as i64,
            request_id: ctx.request_id.clone(),
            tenant: tenant.id.clone(),
            key_id: ctx.key.as_ref().map(|k| k.id.clone()).unwrap_or_default(),
            route: ctx.model.clone().unwrap_or_default(),
            model: served.map(|s| s.target.model.clone()).unwrap_or_default(),
            provider: served
                .map(|s| s.target.provider.clone())
                .unwrap_or_default(),
            region: served.and_then(|s| s.region.clone()).unwrap_or_default(),
            egress: stats
                .and_then(|s| s.egress_node())
                .unwrap_or_default()
                .to_string(),
            // `POOL/KEY_ID`: which of the provider's keys paid for it.
            key_pool: stats
                .and_then(|s| s.key())
                .map(|(pool, key)| format!("{pool}/{key}"))
                .unwrap_or_default(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost_usd: record.cost_usd,
            latency_ms: record.latency.as_millis() as u64,
            ttft_ms: record.ttft.map_or(0, |t| t.as_millis() as u64),
            status: u32::from(record.status),
            attempts: record.attempts as u32,
            cache_hit: ctx.cache_hit,
            node: String::new(),
            endpoint: ctx.endpoint.to_string(),
        };
        if !self.ledger.push(msg) {
            self.dropped.inc();
        }
    }
}
