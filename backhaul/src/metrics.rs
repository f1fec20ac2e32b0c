//! Prometheus metrics of the egress role: what the providers answered
//! through this node, how long they made it wait, and the health of every
//! key pool. Rendered on the egress's admin listener, and (the key pools)
//! by `switchyard dev`, whose in-process egress shares the edge's board.
//!
//! Labels are bounded by the policy: providers, their models and pools;
//! statuses are collapsed into classes.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use switchyard_proto::{Health, Snapshot};

use crate::request::RequestStats;

/// Seconds, for provider waits (first byte of an answer).
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// `2xx`, `4xx`, ...: the status class label every role uses.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The provider and model labels of a request: the policy's names, or
/// `other` for anything the policy does not list (an edge may name any
/// model for a provider that takes any), so a peer cannot grow the label
/// set.
pub fn labels<'a>(
    snap: &Snapshot,
    target: &'a switchyard_proto::RouteTarget,
) -> (&'a str, &'a str) {
    match snap.providers().get(&target.provider) {
        Some(p) if p.models.contains(&target.model) => (&target.provider, &target.model),
        Some(_) => (&target.provider, "other"),
        None => ("other", "other"),
    }
}

/// Key events and the state of every key of every pool, read from a
/// health board at scrape time.
pub struct KeyPoolMetrics {
    events: IntCounterVec,
    keys: IntGaugeVec,
    /// Held while syncing, so two scrapes cannot both add a difference.
    sync: Mutex<()>,
}

impl KeyPoolMetrics {
    pub fn new() -> Self {
        KeyPoolMetrics {
            events: IntCounterVec::new(
                Opts::new(
                    "key_events_total",
                    "Key pool events: cooldown (429), disabled (401/403), pool_exhausted, breaker_opened",
                ),
                &["event"],
            )
            .expect("metric"),
            keys: IntGaugeVec::new(
                Opts::new(
                    "key_pool_keys",
                    "Keys of each provider's pool by state: ok, cooling (rate-limited or quota spent), ejected (breaker open), disabled (refused by the provider)",
                ),
                &["provider", "pool", "state"],
            )
            .expect("metric"),
            sync: Mutex::new(()),
        }
    }

    pub fn register(&self, registry: &Registry) {
        let _ = registry.register(Box::new(self.events.clone()));
        let _ = registry.register(Box::new(self.keys.clone()));
    }

    /// Brings the series up to the board: event counters grow by what
    /// happened since the last scrape, key states are recounted.
    pub fn update(&self, snap: &Snapshot, health: &Health) {
        let _guard = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let e = health.events();
        for (event, cell) in [
            ("cooldown", &e.key_cooldowns),
            ("disabled", &e.key_disabled),
            ("pool_exhausted", &e.pool_exhausted),
            ("breaker_opened", &e.key_breaker_opened),
        ] {
            let c = self.events.with_label_values(&[event]);
            let now = cell.load(Ordering::Relaxed);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
        // A pool removed from the policy leaves the page.
        self.keys.reset();
        let now = Instant::now();
        for p in snap.providers().values() {
            for key in &p.keys {
                // A key is as bad as its worst model: the board keeps one
                // entry per key and model.
                let mut state = 0;
                for m in &p.models {
                    let Some(entry) = health.peek_key(&key.health_id(&p.name, m)) else {
                        continue;
                    };
                    let s = if health.is_refused(&entry, key.fingerprint, now) {
                        3
                    } else if health.is_ejected(&entry) {
                        2
                    } else if health.cooling_until(&entry, now).is_some()
                        || health.quota_exhausted_until(&entry, now).is_some()
                    {
                        1
                    } else {
                        0
                    };
                    state = state.max(s);
                }
                for (i, label) in ["ok", "cooling", "ejected", "disabled"].iter().enumerate() {
                    let g = self.keys.with_label_values(&[&p.name, &*key.pool, label]);
                    if i == state {
                        g.inc();
                    }
                }
            }
        }
    }
}

impl Default for KeyPoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the egress served: one observation per backhaul request.
pub struct EgressMetrics {
    registry: Registry,
    requests: IntCounterVec,
    upstream_wait: HistogramVec,
    tokens: IntCounterVec,
    pub keys: KeyPoolMetrics,
}

impl EgressMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "egress_requests_total",
                "Backhaul requests answered by this egress, by provider, model and status class",
            ),
            &["provider", "model", "class"],
        )
        .expect("metric");
        let upstream_wait = HistogramVec::new(
            HistogramOpts::new(
                "upstream_wait_seconds",
                "The provider's wait before the first byte of its answer, from the call that answered",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
            &["provider"],
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "egress_tokens_total",
                "Tokens the providers reported through this egress, by provider and kind (prompt|completion|cached|reasoning)",
            ),
            &["provider", "kind"],
        )
        .expect("metric");
        for c in [&requests, &tokens] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        registry
            .register(Box::new(upstream_wait.clone()))
            .expect("register");
        let keys = KeyPoolMetrics::new();
        keys.register(&registry);
        EgressMetrics {
            registry,
            requests,
            upstream_wait,
            tokens,
            keys,
        }
    }

    /// One request answered with `status`; `stats` when an answer existed.
    /// `provider` and `model` come from [`labels`].
    pub fn observe(&self, provider: &str, model: &str, status: u16, stats: Option<&RequestStats>) {
        self.requests
            .with_label_values(&[provider, model, status_class(status)])
            .inc();
        let Some(stats) = stats else { return };
        if let Some(us) = stats.upstream_us() {
            self.upstream_wait
                .with_label_values(&[provider])
                .observe(Duration::from_micros(us).as_secs_f64());
        }
        if let Some(u) = stats.usage() {
            for (kind, n) in [
                ("prompt", u.prompt_tokens),
                ("completion", u.completion_tokens),
                ("cached", u.cached_tokens),
                ("reasoning", u.reasoning_tokens),
            ] {
                if n > 0 {
                    self.tokens.with_label_values(&[provider, kind]).inc_by(n);
                }
            }
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for EgressMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_observations_render() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(0), "5xx");
        let m = EgressMetrics::new();
        let stats = RequestStats::default();
        stats.set_upstream_wait(Duration::from_millis(40));
        stats.set_usage(switchyard_llm::openai::Usage {
            prompt_tokens: 5,
            completion_tokens: 9,
            cached_tokens: 0,
            reasoning_tokens: 4,
        });
        m.observe("openai", "gpt-4o", 200, Some(&stats));
        m.observe("openai", "gpt-4o", 429, None);
        m.keys.update(&Snapshot::default(), &Health::new());
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &m.registry().gather(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "switchyard_egress_requests_total{class=\"2xx\",model=\"gpt-4o\",provider=\"openai\"} 1",
            "switchyard_egress_requests_total{class=\"4xx\",model=\"gpt-4o\",provider=\"openai\"} 1",
            "switchyard_egress_tokens_total{kind=\"reasoning\",provider=\"openai\"} 4",
            "switchyard_upstream_wait_seconds_count{provider=\"openai\"} 1",
            "switchyard_key_events_total{event=\"cooldown\"} 0",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
    }
}
