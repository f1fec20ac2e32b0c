//! Prometheus metrics of the edge, served on their own listener
//! (`--metrics-listen`) so they are never exposed where clients connect.
//!
//! Label values are bounded: endpoints are a fixed set, providers and models
//! come from the policy (a model the policy does not advertise is `other`),
//! statuses are HTTP codes, and tenants are capped ([`TenantLabels`]): the
//! first [`DEFAULT_TENANT_LABELS`] tenants seen get their own series, the
//! rest share `other`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use switchyard_backhaul::metrics::{status_class, KeyPoolMetrics};
use switchyard_control::admin::{answer, Lifecycle, MetricsFn};

/// Tenants with series of their own per edge; a fleet with more tenants
/// than that sees the rest summed under `other` (the ledger has them all).
pub const DEFAULT_TENANT_LABELS: usize = 200;

/// The tenant label of a request: its id while fewer than the cap have
/// been seen, `other` afterwards. Each id is kept once; the lock is read
/// on the hot path and written only the first time a tenant is seen.
pub struct TenantLabels {
    cap: usize,
    known: RwLock<HashSet<String, switchyard_proto::FastHash>>,
}

impl TenantLabels {
    pub fn new(cap: usize) -> Self {
        TenantLabels {
            cap,
            known: RwLock::new(HashSet::default()),
        }
    }

    pub fn label<'a>(&self, tenant: &'a str) -> &'a str {
        if self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant)
        {
            return tenant;
        }
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if known.contains(tenant) {
            return tenant;
        }
        if known.len() < self.cap && tenant != "other" {
            known.insert(tenant.to_string());
            return tenant;
        }
        "other"
    }
}

/// Seconds the gateway adds: from a fraction of a millisecond (in process)
/// to a cross-region backhaul.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Seconds; LLM latencies span milliseconds (cache, errors) to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct EdgeMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    stream_failures: IntCounterVec,
    client_disconnects: IntCounterVec,
    retries: IntCounterVec,
    failovers: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    breaker_transitions: IntCounterVec,
    ejected_skips: IntCounterVec,
    keys: KeyPoolMetrics,
    rules: IntCounterVec,
    downgrades: IntCounterVec,
    hedges: IntCounterVec,
    fleet_ejections: prometheus::IntCounter,
    overhead: HistogramVec,
    tenant_tokens: IntCounterVec,
    tenant_cost: CounterVec,
    tenants: TenantLabels,
    resumes: IntCounterVec,
    /// The board whose key and pool events are rendered (shared with the
    /// in-process egress in `switchyard dev`).
    health: Mutex<Option<Arc<switchyard_proto::Health>>>,
}

/// One finished request, as the access log sees it.
pub struct Observation<'a> {
    pub endpoint: &'static str,
    pub provider: &'a str,
    /// The model the caller asked for, when the policy knows it (`other`).
    pub model: &'a str,
    /// The provider's model that served it (from the policy; `none`).
    pub served_model: &'a str,
    /// The tenant, when the key was known.
    pub tenant: Option<&'a str>,
    pub cost_usd: f64,
    /// What the gateway added before the first byte: the edge's first-byte
    /// time minus the provider's own wait.
    pub overhead: Option<Duration>,
    pub status: u16,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub stream_failed: bool,
    pub client_gone: bool,
}

impl EdgeMetrics {
    pub fn new() -> Self {
        Self::with_tenant_labels(DEFAULT_TENANT_LABELS)
    }

    /// Metrics whose tenant label set holds at most `cap` tenants.
    pub fn with_tenant_labels(cap: usize) -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by endpoint, route (the model asked for), provider, served model, HTTP status and status class",
            ),
            &["endpoint", "route", "provider", "model", "status", "class"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time from request to last byte")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint", "provider"],
        )
        .expect("metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time from request to the first byte of the answer body",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["provider", "model"],
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "tokens_total",
                "Tokens accounted, by provider, model and kind (prompt|completion)",
            ),
            &["provider", "model", "kind"],
        )
        .expect("metric");
        let stream_failures = IntCounterVec::new(
            Opts::new(
                "stream_failures_total",
                "Streams that ended with an error event (stall, cut, provider error)",
            ),
            &["provider"],
        )
        .expect("metric");
        let client_disconnects = IntCounterVec::new(
            Opts::new(
                "client_disconnects_total",
                "Requests abandoned by the client before the answer ended",
            ),
            &["endpoint"],
        )
        .expect("metric");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("metric")
        };
        let retries = counter(
            "retries_total",
            "Attempts made again on a target that had failed this request, by provider and the error that caused it",
            &["provider", "error"],
        );
        let failovers = counter(
            "failovers_total",
            "Moves to the next target of a plan after a failure, by the provider left and the one tried next",
            &["from", "to"],
        );
        let retry_budget_exhausted = counter(
            "retry_budget_exhausted_total",
            "Retries not made because the route's retry budget was spent",
            &["model"],
        );
        let breaker_transitions = counter(
            "breaker_transitions_total",
            "Circuit breaker state changes (open, half_open, closed), by scope (target) and provider",
            &["scope", "provider", "state"],
        );
        let ejected_skips = counter(
            "ejected_skips_total",
            "Attempts not made on a target whose breaker was open with no probe slot free",
            &["provider"],
        );
        let rules = counter(
            "rules_matched_total",
            "Requests a policy rule sent to another route, by route and chosen route",
            &["route", "to"],
        );
        let downgrades = counter(
            "downgrades_total",
            "Non-critical requests downgraded while the route's primary was degraded",
            &["route", "to"],
        );
        let hedges = counter(
            "hedges_total",
            "Hedged requests by route and outcome: started, won_hedge, won_primary, both_failed, budget_refused, no_target",
            &["route", "outcome"],
        );
        let fleet_ejections = prometheus::IntCounter::new(
            "fleet_ejections_total",
            "Target breakers this node opened because the fleet-wide error rate was over the ejection threshold",
        )
        .expect("valid metric");
        registry
            .register(Box::new(fleet_ejections.clone()))
            .expect("register");
        let tenant_tokens = counter(
            "tenant_tokens_total",
            "Tokens used by tenant and kind (prompt|completion|cached|reasoning); tenants past the label cap are `other`",
            &["tenant", "kind"],
        );
        let tenant_cost = CounterVec::new(
            Opts::new(
                "tenant_cost_usd_total",
                "USD spent by tenant at the policy's prices (cached input discounted); tenants past the label cap are `other`",
            ),
            &["tenant"],
        )
        .expect("metric");
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                "gateway_overhead_seconds",
                "Time the gateway added before the first byte: the edge's first-byte time minus the provider's own wait",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("metric");
        let resumes = counter(
            "stream_resumes_total",
            "Streams cut mid-answer: resumed on another target, or why not, by the provider cut (or the resume target that failed)",
            &["provider", "outcome"],
        );
        for c in [
            &resumes,
            &hedges,
            &rules,
            &downgrades,
            &requests,
            &tokens,
            &stream_failures,
            &client_disconnects,
            &retries,
            &failovers,
            &retry_budget_exhausted,
            &breaker_transitions,
            &ejected_skips,
            &tenant_tokens,
        ] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        for h in [&latency, &ttft, &overhead] {
            registry.register(Box::new(h.clone())).expect("register");
        }
        registry
            .register(Box::new(tenant_cost.clone()))
            .expect("register");
        let keys = KeyPoolMetrics::new();
        keys.register(&registry);
        EdgeMetrics {
            registry,
            requests,
            latency,
            ttft,
            tokens,
            stream_failures,
            client_disconnects,
            retries,
            failovers,
            retry_budget_exhausted,
            breaker_transitions,
            ejected_skips,
            keys,
            rules,
            downgrades,
            hedges,
            fleet_ejections,
            overhead,
            tenant_tokens,
            tenant_cost,
            tenants: TenantLabels::new(cap),
            resumes,
            health: Mutex::new(None),
        }
    }

    /// Renders the key and pool events this board counts.
    pub fn watch_health(&self, health: Arc<switchyard_proto::Health>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(health);
    }

    pub fn hedge(&self, route: &str, outcome: &str) {
        self.hedges.with_label_values(&[route, outcome]).inc();
    }

    pub fn rule_matched(&self, route: &str, to: &str) {
        self.rules.with_label_values(&[route, to]).inc();
    }

    pub fn resume(&self, provider: &str, outcome: &str) {
        self.resumes.with_label_values(&[provider, outcome]).inc();
    }

    pub fn downgrade(&self, route: &str, to: &str) {
        self.downgrades.with_label_values(&[route, to]).inc();
    }

    pub fn retry(&self, provider: &str, error: &str) {
        self.retries.with_label_values(&[provider, error]).inc();
    }

    pub fn failover(&self, from: &str, to: &str) {
        self.failovers.with_label_values(&[from, to]).inc();
    }

    pub fn retry_budget_exhausted(&self, model: &str) {
        self.retry_budget_exhausted
            .with_label_values(&[model])
            .inc();
    }

    pub fn breaker(&self, scope: &str, provider: &str, state: &str) {
        self.breaker_transitions
            .with_label_values(&[scope, provider, state])
            .inc();
    }

    /// Makes a policy provider's target-breaker series exist at 0, so
    /// alerts and dashboards see them before the first ejection.
    pub fn init_provider(&self, provider: &str) {
        for state in ["open", "half_open", "closed"] {
            self.breaker_transitions
                .with_label_values(&["target", provider, state]);
        }
        self.ejected_skips.with_label_values(&[provider]);
    }

    pub fn ejected_skip(&self, provider: &str) {
        self.ejected_skips.with_label_values(&[provider]).inc();
    }

    /// Brings the key-pool series up to the watched board (events since the
    /// last scrape, key states of `snap`'s pools: in `switchyard dev` the
    /// egress is this process and its keys are in the snapshot).
    pub fn update_keys(&self, snap: &switchyard_proto::Snapshot) {
        let health = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = health {
            self.keys.update(snap, &h);
            let now = h
                .events()
                .fleet_ejections
                .load(std::sync::atomic::Ordering::Relaxed);
            if now > self.fleet_ejections.get() {
                self.fleet_ejections
                    .inc_by(now - self.fleet_ejections.get());
            }
        }
    }

    pub fn observe(&self, o: &Observation<'_>) {
        let code = itoa_status(o.status);
        let status = std::str::from_utf8(&code).unwrap_or("0");
        self.requests
            .with_label_values(&[
                o.endpoint,
                o.model,
                o.provider,
                o.served_model,
                status,
                status_class(o.status),
            ])
            .inc();
        if let Some(t) = o.overhead {
            self.overhead
                .with_label_values(&[o.endpoint])
                .observe(t.as_secs_f64());
        }
        if let Some(tenant) = o.tenant {
            let tenant = self.tenants.label(tenant);
            for (kind, n) in [
                ("prompt", o.prompt_tokens),
                ("completion", o.completion_tokens),
                ("cached", o.cached_tokens),
                ("reasoning", o.reasoning_tokens),
            ] {
                if n > 0 {
                    self.tenant_tokens
                        .with_label_values(&[tenant, kind])
                        .inc_by(n);
                }
            }
            if o.cost_usd > 0.0 {
                self.tenant_cost
                    .with_label_values(&[tenant])
                    .inc_by(o.cost_usd);
            }
        }
        self.latency
            .with_label_values(&[o.endpoint, o.provider])
            .observe(o.latency.as_secs_f64());
        if let Some(t) = o.ttft {
            self.ttft
                .with_label_values(&[o.provider, o.model])
                .observe(t.as_secs_f64());
        }
        if o.prompt_tokens > 0 {
            self.tokens
                .with_label_values(&[o.provider, o.model, "prompt"])
                .inc_by(o.prompt_tokens);
        }
        if o.completion_tokens > 0 {
            self.tokens
                .with_label_values(&[o.provider, o.model, "completion"])
                .inc_by(o.completion_tokens);
        }
        if o.stream_failed {
            self.stream_failures.with_label_values(&[o.provider]).inc();
        }
        if o.client_gone {
            self.client_disconnects
                .with_label_values(&[o.endpoint])
                .inc();
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry().gather(), &mut out);
        out
    }

    /// The registry, for pages that render several (the admin listener).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// A status code as three ASCII digits, without allocating.
fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`; see
/// [`switchyard_control::admin`]). A Pingora service like the client
/// listeners, so its socket is handed over with theirs on an upgrade.
pub struct AdminApp {
    pub lifecycle: std::sync::Arc<Lifecycle>,
    pub metrics: MetricsFn,
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = answer(&path, &self.lifecycle, &self.metrics).await;
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .expect("valid response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_observations() {
        let m = EdgeMetrics::with_tenant_labels(2);
        for tenant in ["acme", "beta", "gamma", "delta"] {
            m.observe(&Observation {
                endpoint: "chat",
                provider: "openai",
                model: "fast",
                served_model: "gpt-4o-mini",
                tenant: Some(tenant),
                cost_usd: 0.5,
                overhead: Some(Duration::from_micros(700)),
                status: 200,
                latency: Duration::from_millis(30),
                ttft: Some(Duration::from_millis(10)),
                prompt_tokens: 5,
                completion_tokens: 7,
                cached_tokens: 0,
                reasoning_tokens: 3,
                stream_failed: false,
                client_gone: false,
            });
        }
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "switchyard_requests_total{class=\"2xx\",endpoint=\"chat\",model=\"gpt-4o-mini\",provider=\"openai\",route=\"fast\",status=\"200\"} 4"
        ), "{text}");
        // Two tenants have series of their own, the rest are summed.
        assert!(text.contains("switchyard_tenant_cost_usd_total{tenant=\"acme\"} 0.5"));
        assert!(text.contains("switchyard_tenant_cost_usd_total{tenant=\"other\"} 1"));
        assert!(!text.contains("tenant=\"gamma\""));
        assert!(
            text.contains("switchyard_tenant_tokens_total{kind=\"reasoning\",tenant=\"beta\"} 3")
        );
        assert!(text.contains("switchyard_gateway_overhead_seconds_count{endpoint=\"chat\"} 4"));
        assert!(text.contains(
            "switchyard_tokens_total{kind=\"completion\",model=\"fast\",provider=\"openai\"} 28"
        ));
        assert!(text.contains("switchyard_time_to_first_token_seconds_bucket"));
    }
}
