//! Telemetry from the data plane up to the control plane, and the latency
//! scores that come back down.
//!
//! Nodes record into a [`TelemetryHandle`]: a bounded channel `try_send`,
//! so the request path never waits and never takes a lock (a full channel
//! drops the record and counts it). A background task folds records into an
//! [`Aggregator`] and ships one [`pb::TelemetryBatch`] per interval. The
//! control plane folds batches from every node into a [`ScoreBoard`]: a
//! sliding window of fixed-bucket histograms per (provider, model, region)
//! and per (edge region → egress region), from which it reads percentiles.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_proto::health;
use switchyard_proto::{Health, RttScore, ScoreKey, Scores, Snapshot, TargetScore};
use tokio::sync::mpsc;

use crate::pb;

/// Upper bounds (ms) of the histogram buckets every node uses; the last
/// bucket is open-ended.
pub const BUCKET_BOUNDS_MS: [f64; 16] = [
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    f64::INFINITY,
];

fn bucket(d: Duration) -> usize {
    let ms = d.as_secs_f64() * 1000.0;
    BUCKET_BOUNDS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(BUCKET_BOUNDS_MS.len() - 1)
}

/// The value at quantile `q` of a bucketed histogram, as the upper bound of
/// the bucket reaching it (the open last bucket reports the bound before it).
pub fn percentile(buckets: &[u64], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let b = BUCKET_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY);
            return if b.is_finite() {
                b
            } else {
                BUCKET_BOUNDS_MS[BUCKET_BOUNDS_MS.len() - 2]
            };
        }
    }
    0.0
}

/// One finished request, as the node saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub provider: String,
    pub model: String,
    pub region: String,
    /// Time to first token (or to the whole answer when not streamed).
    pub ttft: Option<Duration>,
    pub latency: Duration,
    /// Low-cardinality error class (`timeout`, `rate_limited`, `upstream_5xx`...).
    pub error_class: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug)]
pub enum Event {
    Request(RequestRecord),
    Rtt {
        egress_region: String,
        egress_addr: String,
        rtt: Duration,
    },
}

/// Where nodes record telemetry; cheap to clone, never blocks.
#[derive(Clone)]
pub struct TelemetryHandle {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl TelemetryHandle {
    pub fn record(&self, r: RequestRecord) {
        if self.tx.try_send(Event::Request(r)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A backhaul round trip to one egress (e.g. from QUIC's RTT estimate).
    pub fn record_rtt(&self, egress_region: &str, egress_addr: &str, rtt: Duration) {
        let e = Event::Rtt {
            egress_region: egress_region.to_string(),
            egress_addr: egress_addr.to_string(),
            rtt,
        };
        if self.tx.try_send(e).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records lost because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A handle and the receiving end its aggregating task drains.
pub fn channel(capacity: usize) -> (TelemetryHandle, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        TelemetryHandle {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        rx,
    )
}

/// Per-interval sums, owned by one task.
#[derive(Default)]
pub struct Aggregator {
    targets: HashMap<(String, String, String), pb::TargetStatsMsg>,
    rtt: HashMap<(String, String), Vec<u64>>,
}

impl Aggregator {
    pub fn apply(&mut self, e: Event) {
        let n = BUCKET_BOUNDS_MS.len();
        match e {
            Event::Request(r) => {
                let s = self
                    .targets
                    .entry((r.provider.clone(), r.model.clone(), r.region.clone()))
                    .or_insert_with(|| pb::TargetStatsMsg {
                        provider: r.provider,
                        model: r.model,
                        region: r.region,
                        ttft_buckets: vec![0; n],
                        latency_buckets: vec![0; n],
                        ..Default::default()
                    });
                s.requests += 1;
                if let Some(class) = r.error_class {
                    *s.errors_by_class.entry(class).or_default() += 1;
                }
                if let Some(t) = r.ttft {
                    s.ttft_buckets[bucket(t)] += 1;
                }
                s.latency_buckets[bucket(r.latency)] += 1;
                s.input_tokens += r.input_tokens;
                s.output_tokens += r.output_tokens;
                if r.cost_usd.is_finite() {
                    s.cost_usd += r.cost_usd;
                }
            }
            Event::Rtt {
                egress_region,
                egress_addr,
                rtt,
            } => {
                self.rtt
                    .entry((egress_region, egress_addr))
                    .or_insert_with(|| vec![0; n])[bucket(rtt)] += 1;
            }
        }
    }

    /// Everything recorded since the last call, or `None` when nothing was.
    pub fn take_batch(
        &mut self,
        node_id: &str,
        region: &str,
        role: pb::NodeRole,
        window: Duration,
    ) -> Option<pb::TelemetryBatch> {
        if self.targets.is_empty() && self.rtt.is_empty() {
            return None;
        }
        Some(pb::TelemetryBatch {
            node_id: node_id.to_string(),
            region: region.to_string(),
            role: role as i32,
            window_ms: window.as_millis() as u64,
            targets: self.targets.drain().map(|(_, v)| v).collect(),
            backhaul: self
                .rtt
                .drain()
                .map(
                    |((egress_region, egress_addr), rtt_buckets)| pb::RttStatsMsg {
                        egress_region,
                        egress_addr,
                        rtt_buckets,
                    },
                )
                .collect(),
            health: None,
        })
    }
}

/// Most targets and keys one node's health report carries: the status
/// page needs the unhealthy ones and a pool's keys, not an unbounded list.
pub const MAX_HEALTH_ENTRIES: usize = 512;

/// The health board as it stands, for the control plane's status page.
/// Edges (`keys: false`) report the targets their breakers eject or their
/// planning demotes; egress nodes also every key of the pools they hold,
/// healthy ones included, so an operator sees a pool's size and what is
/// out of it. Key ids and pool names only: never a key's value.
pub fn health_report(snapshot: &Snapshot, health: &Health, keys: bool) -> pb::NodeHealthMsg {
    let now = Instant::now();
    let mut out = pb::NodeHealthMsg::default();
    let mut providers: Vec<_> = snapshot.providers().values().collect();
    providers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in providers {
        for m in &p.models {
            let id = health::target_id(&p.name, m, p.region.as_deref());
            let Some(entry) = health.peek_target(&id) else {
                continue;
            };
            let state = if health.is_ejected(&entry) {
                if health.probe_at(&entry).is_some() {
                    "open"
                } else {
                    "half_open"
                }
            } else if health.is_degraded(&entry) {
                "degraded"
            } else {
                continue;
            };
            if out.targets.len() < MAX_HEALTH_ENTRIES {
                out.targets.push(pb::TargetHealthMsg {
                    provider: p.name.clone(),
                    model: m.clone(),
                    region: p.region.clone().unwrap_or_default(),
                    state: state.into(),
                    error_rate: entry.error_rate(),
                });
            }
        }
        if !keys {
            continue;
        }
        for k in &p.keys {
            if out.keys.len() >= MAX_HEALTH_ENTRIES {
                break;
            }
            // A key is booked per model; its worst model says what it is.
            let (mut state, mut headroom, mut in_flight) = (KeyState::Ok, 1.0f64, 0u32);
            for m in &p.models {
                let Some(e) = health.peek_key(&k.health_id(&p.name, m)) else {
                    continue;
                };
                let s = if health.is_refused(&e, k.fingerprint, now) {
                    KeyState::Refused
                } else if health.is_ejected(&e) {
                    KeyState::Ejected
                } else if health.quota_exhausted_until(&e, now).is_some() {
                    KeyState::QuotaExhausted
                } else if health.cooling_until(&e, now).is_some() {
                    KeyState::Cooling
                } else {
                    KeyState::Ok
                };
                state = state.max(s);
                headroom = headroom.min(health.headroom(&e, now));
                in_flight += e.in_flight();
            }
            out.keys.push(pb::KeyHealthMsg {
                provider: p.name.clone(),
                pool: k.pool.to_string(),
                key_id: k.id.to_string(),
                state: state.label().into(),
                headroom,
                in_flight,
            });
        }
    }
    out
}

/// Ordered from healthy to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum KeyState {
    Ok,
    Cooling,
    QuotaExhausted,
    Ejected,
    Refused,
}

impl KeyState {
    fn label(self) -> &'static str {
        match self {
            KeyState::Ok => "ok",
            KeyState::Cooling => "cooling",
            KeyState::QuotaExhausted => "quota_exhausted",
            KeyState::Ejected => "ejected",
            KeyState::Refused => "refused",
        }
    }
}

struct Slot {
    at: Instant,
    requests: u64,
    errors: u64,
    buckets: Vec<u64>,
    /// Whole-request latency (targets only; empty for round trips).
    latency: Vec<u64>,
}

/// One target's figures over the window, for the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TargetStatus {
    pub provider: String,
    pub model: String,
    pub region: String,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
}

/// Round trips from one edge region to one egress region over the window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RttStatus {
    pub edge_region: String,
    pub egress_region: String,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

/// The control plane's sliding window over every node's reports.
/// At most this many targets (and region pairs) are scored.
pub const MAX_SCORE_KEYS: usize = 2048;

pub struct ScoreBoard {
    window: Duration,
    targets: HashMap<ScoreKey, VecDeque<Slot>>,
    rtt: HashMap<(String, String), VecDeque<Slot>>,
}

impl ScoreBoard {
    pub fn new(window: Duration) -> Self {
        ScoreBoard {
            window,
            targets: HashMap::new(),
            rtt: HashMap::new(),
        }
    }

    /// Folds one batch in; malformed histograms (wrong bucket count) are
    /// ignored rather than trusted.
    pub fn ingest(&mut self, batch: &pb::TelemetryBatch, now: Instant) {
        let n = BUCKET_BOUNDS_MS.len();
        for t in &batch.targets {
            if t.ttft_buckets.len() != n {
                continue;
            }
            let key = ScoreKey {
                provider: t.provider.clone(),
                model: t.model.clone(),
                region: t.region.clone(),
            };
            // Everything here is pushed to every node: bound it whatever
            // the nodes report.
            if self.targets.len() >= MAX_SCORE_KEYS && !self.targets.contains_key(&key) {
                continue;
            }
            self.targets.entry(key).or_default().push_back(Slot {
                at: now,
                requests: t.requests,
                errors: t.errors_by_class.values().sum(),
                buckets: t.ttft_buckets.clone(),
                latency: if t.latency_buckets.len() == n {
                    t.latency_buckets.clone()
                } else {
                    Vec::new()
                },
            });
        }
        for r in &batch.backhaul {
            if r.rtt_buckets.len() != n {
                continue;
            }
            let key = (batch.region.clone(), r.egress_region.clone());
            if self.rtt.len() >= MAX_SCORE_KEYS && !self.rtt.contains_key(&key) {
                continue;
            }
            self.rtt.entry(key).or_default().push_back(Slot {
                at: now,
                requests: r.rtt_buckets.iter().sum(),
                errors: 0,
                buckets: r.rtt_buckets.clone(),
                latency: Vec::new(),
            });
        }
    }

    fn sum(slots: &VecDeque<Slot>) -> (u64, u64, Vec<u64>) {
        let mut buckets = vec![0; BUCKET_BOUNDS_MS.len()];
        let (mut req, mut err) = (0, 0);
        for s in slots {
            req += s.requests;
            err += s.errors;
            for (b, v) in buckets.iter_mut().zip(&s.buckets) {
                *b += v;
            }
        }
        (req, err, buckets)
    }

    /// Per-target and per-region-pair figures over the window, without
    /// changing the board (the status page reads; the score loop expires).
    pub fn status(&self, now: Instant) -> (Vec<TargetStatus>, Vec<RttStatus>) {
        let window = self.window;
        fn live(slots: &VecDeque<Slot>, now: Instant, window: Duration) -> Vec<&Slot> {
            slots
                .iter()
                .filter(|s| now.saturating_duration_since(s.at) <= window)
                .collect()
        }
        let n = BUCKET_BOUNDS_MS.len();
        let mut targets = Vec::new();
        for (k, slots) in &self.targets {
            let slots = live(slots, now, window);
            if slots.is_empty() {
                continue;
            }
            let (mut req, mut err) = (0, 0);
            let (mut ttft, mut latency) = (vec![0; n], vec![0; n]);
            for s in &slots {
                req += s.requests;
                err += s.errors;
                for (b, v) in ttft.iter_mut().zip(&s.buckets) {
                    *b += v;
                }
                for (b, v) in latency.iter_mut().zip(&s.latency) {
                    *b += v;
                }
            }
            targets.push(TargetStatus {
                provider: k.provider.clone(),
                model: k.model.clone(),
                region: k.region.clone(),
                requests: req,
                errors: err,
                error_rate: if req == 0 {
                    0.0
                } else {
                    err as f64 / req as f64
                },
                ttft_p50_ms: percentile(&ttft, 0.50),
                ttft_p95_ms: percentile(&ttft, 0.95),
                latency_p50_ms: percentile(&latency, 0.50),
                latency_p95_ms: percentile(&latency, 0.95),
            });
        }
        targets.sort_by(|a, b| {
            (&a.provider, &a.model, &a.region).cmp(&(&b.provider, &b.model, &b.region))
        });
        let mut rtt = Vec::new();
        for ((edge_region, egress_region), slots) in &self.rtt {
            let slots = live(slots, now, window);
            if slots.is_empty() {
                continue;
            }
            let mut b = vec![0; n];
            for s in &slots {
                for (x, v) in b.iter_mut().zip(&s.buckets) {
                    *x += v;
                }
            }
            rtt.push(RttStatus {
                edge_region: edge_region.clone(),
                egress_region: egress_region.clone(),
                p50_ms: percentile(&b, 0.50),
                p95_ms: percentile(&b, 0.95),
            });
        }
        rtt.sort_by(|a, b| {
            (&a.edge_region, &a.egress_region).cmp(&(&b.edge_region, &b.egress_region))
        });
        (targets, rtt)
    }

    /// Drops what left the window and computes the scores of what is left.
    pub fn scores(&mut self, now: Instant) -> Scores {
        let window = self.window;
        let expire = |slots: &mut VecDeque<Slot>| {
            while slots
                .front()
                .is_some_and(|s| now.duration_since(s.at) > window)
            {
                slots.pop_front();
            }
            !slots.is_empty()
        };
        self.targets.retain(|_, s| expire(s));
        self.rtt.retain(|_, s| expire(s));
        let mut out = Scores {
            computed_at_ms: crate::store::now_ms(),
            ..Scores::default()
        };
        for (k, slots) in &self.targets {
            let (req, err, b) = Self::sum(slots);
            out.targets.insert(
                k.clone(),
                TargetScore {
                    requests: req,
                    error_rate: if req == 0 {
                        0.0
                    } else {
                        err as f64 / req as f64
                    },
                    ttft_p50_ms: percentile(&b, 0.50),
                    ttft_p95_ms: percentile(&b, 0.95),
                    ttft_p99_ms: percentile(&b, 0.99),
                },
            );
        }
        for (k, slots) in &self.rtt {
            let (_, _, b) = Self::sum(slots);
            out.backhaul.insert(
                k.clone(),
                RttScore {
                    p50_ms: percentile(&b, 0.50),
                    p95_ms: percentile(&b, 0.95),
                    p99_ms: percentile(&b, 0.99),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ttft_ms: u64, error: Option<&str>) -> RequestRecord {
        RequestRecord {
            provider: "p".into(),
            model: "m".into(),
            region: "eu-west".into(),
            ttft: Some(Duration::from_millis(ttft_ms)),
            latency: Duration::from_millis(ttft_ms * 2),
            error_class: error.map(str::to_string),
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: 0.001,
        }
    }

    #[test]
    fn batches_fold_into_windowed_percentiles() {
        let mut agg = Aggregator::default();
        for i in 0..100 {
            agg.apply(Event::Request(record(
                if i < 90 { 40 } else { 900 },
                (i % 10 == 0).then_some("timeout"),
            )));
        }
        agg.apply(Event::Rtt {
            egress_region: "us-east".into(),
            egress_addr: "10.0.0.1:7443".into(),
            rtt: Duration::from_millis(80),
        });
        let batch = agg
            .take_batch(
                "edge-1",
                "eu-west",
                pb::NodeRole::Edge,
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(agg
            .take_batch(
                "edge-1",
                "eu-west",
                pb::NodeRole::Edge,
                Duration::from_secs(5)
            )
            .is_none());
        assert_eq!(batch.targets[0].requests, 100);
        assert_eq!(batch.targets[0].input_tokens, 1000);

        let mut board = ScoreBoard::new(Duration::from_secs(60));
        let t0 = Instant::now();
        board.ingest(&batch, t0);
        let s = board.scores(t0);
        let key = ScoreKey {
            provider: "p".into(),
            model: "m".into(),
            region: "eu-west".into(),
        };
        let score = s.targets[&key];
        assert_eq!(score.ttft_p50_ms, 50.0);
        assert_eq!(score.ttft_p95_ms, 1000.0);
        assert!((score.error_rate - 0.1).abs() < 1e-9);
        let rtt = s.backhaul[&("eu-west".to_string(), "us-east".to_string())];
        assert_eq!(rtt.p50_ms, 100.0);
        // Out of the window, the scores are gone.
        let later = t0 + Duration::from_secs(61);
        assert!(board.scores(later).targets.is_empty());
    }

    #[test]
    fn the_health_report_names_ejected_targets_and_every_key_by_id() {
        use switchyard_proto::health::Outcome;
        use switchyard_proto::{KeySource, PoolKey, ProviderKind, ProviderSnapshot, ResolvedKey};
        let key = |id: &str, value: &str| {
            ResolvedKey::new(
                "main",
                id,
                &PoolKey::new(0, KeySource::Env("X".into())),
                switchyard_proto::Secret::new(value),
            )
        };
        let mut b = Snapshot::builder();
        b.providers.insert(
            "p".into(),
            Arc::new(ProviderSnapshot {
                name: "p".into(),
                kind: ProviderKind::OpenAi,
                base_url: "http://127.0.0.1:1/v1".into(),
                keys: vec![key("good", "sk-good-value"), key("slow", "sk-slow-value")],
                models: vec!["m".into(), "n".into()],
                simulated: None,
                region: Some("eu".into()),
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: Default::default(),
                key_pools: vec![],
            }),
        );
        let snap = b.build();
        let health = Health::new();
        let now = Instant::now();
        // Model m's target fails until its breaker opens; n stays healthy.
        let target = health
            .target(&health::target_id("p", "m", Some("eu")))
            .unwrap();
        for _ in 0..20 {
            health.record(&target, Outcome::Failure, now);
        }
        let fine = health
            .target(&health::target_id("p", "n", Some("eu")))
            .unwrap();
        health.record(
            &fine,
            Outcome::Success {
                latency: Duration::from_millis(5),
            },
            now,
        );
        // Key `slow` got a 429 on model n.
        let slow = &snap.providers()["p"].keys[1];
        let entry = health.key(&slow.health_id("p", "n")).unwrap();
        health.rate_limited(&entry, Some(Duration::from_secs(30)), now);

        let edge = health_report(&snap, &health, false);
        assert_eq!(edge.targets.len(), 1, "{edge:?}");
        assert_eq!(
            (
                edge.targets[0].model.as_str(),
                edge.targets[0].state.as_str()
            ),
            ("m", "open")
        );
        assert!(edge.keys.is_empty(), "edges hold no keys");

        let egress = health_report(&snap, &health, true);
        let states: Vec<_> = egress
            .keys
            .iter()
            .map(|k| (k.key_id.as_str(), k.state.as_str()))
            .collect();
        assert_eq!(states, [("good", "ok"), ("slow", "cooling")]);
        let text = format!("{egress:?}");
        assert!(!text.contains("sk-"), "no key value in a report: {text}");
    }

    #[test]
    fn a_full_channel_drops_instead_of_blocking() {
        let (h, _rx) = channel(1);
        h.record(record(1, None));
        h.record(record(1, None));
        assert_eq!(h.dropped(), 1);
    }
}
