//! Prometheus metrics of the edge, served on their own listener
//! (`--metrics-listen`) so they are never exposed where clients connect.
//!
//! Label values are bounded: endpoints are a fixed set, providers and models
//! come from the policy (a model the policy does not advertise is `other`),
//! statuses are HTTP codes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use switchyard_control::admin::{answer, Lifecycle, MetricsFn};

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
    key_events: IntCounterVec,
    rules: IntCounterVec,
    downgrades: IntCounterVec,
    resumes: IntCounterVec,
    /// The board whose key and pool events are rendered (shared with the
    /// in-process egress in `switchyard dev`).
    health: Mutex<Option<Arc<switchyard_proto::Health>>>,
}

/// One finished request, as the access log sees it.
pub struct Observation<'a> {
    pub endpoint: &'static str,
    pub provider: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub stream_failed: bool,
    pub client_gone: bool,
}

impl EdgeMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by endpoint, provider and HTTP status",
            ),
            &["endpoint", "provider", "status"],
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
        let key_events = counter(
            "key_events_total",
            "Key pool events at the egress: cooldown (429), disabled (401/403), pool_exhausted, breaker_opened",
            &["event"],
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
        let resumes = counter(
            "stream_resumes_total",
            "Streams cut mid-answer: resumed on another target, or why not, by the provider cut (or the resume target that failed)",
            &["provider", "outcome"],
        );
        for c in [
            &resumes,
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
            &key_events,
        ] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        for h in [&latency, &ttft] {
            registry.register(Box::new(h.clone())).expect("register");
        }
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
            key_events,
            rules,
            downgrades,
            resumes,
            health: Mutex::new(None),
        }
    }

    /// Renders the key and pool events this board counts.
    pub fn watch_health(&self, health: Arc<switchyard_proto::Health>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(health);
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

    /// Brings the key-event counters up to the board's (counters only
    /// grow, so the difference is what happened since the last scrape).
    fn sync_key_events(&self) {
        // Held while syncing so two scrapes cannot both add a difference.
        let guard = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some(h) = guard.as_ref() else {
            return;
        };
        let e = h.events();
        for (event, cell) in [
            ("cooldown", &e.key_cooldowns),
            ("disabled", &e.key_disabled),
            ("pool_exhausted", &e.pool_exhausted),
            ("breaker_opened", &e.key_breaker_opened),
        ] {
            let c = self.key_events.with_label_values(&[event]);
            let now = cell.load(Ordering::Relaxed);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
    }

    pub fn observe(&self, o: &Observation<'_>) {
        let status = o.status.to_string();
        self.requests
            .with_label_values(&[o.endpoint, o.provider, &status])
            .inc();
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

    /// The registry, for pages that render several (the admin listener),
    /// with the counters read from the health board brought up to date.
    pub fn registry(&self) -> &Registry {
        self.sync_key_events();
        &self.registry
    }
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
        let m = EdgeMetrics::new();
        m.observe(&Observation {
            endpoint: "chat",
            provider: "openai",
            model: "fast",
            status: 200,
            latency: Duration::from_millis(30),
            ttft: Some(Duration::from_millis(10)),
            prompt_tokens: 5,
            completion_tokens: 7,
            stream_failed: false,
            client_gone: false,
        });
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "switchyard_requests_total{endpoint=\"chat\",provider=\"openai\",status=\"200\"} 1"
        ));
        assert!(text.contains(
            "switchyard_tokens_total{kind=\"completion\",model=\"fast\",provider=\"openai\"} 7"
        ));
        assert!(text.contains("switchyard_time_to_first_token_seconds_bucket"));
    }
}
