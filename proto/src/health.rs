//! The runtime health board: what a node has learnt from its own attempts,
//! kept next to the snapshot rather than in it.
//!
//! Snapshots are immutable and swapped whole; health changes on every
//! request. So the board lives for the node's lifetime, keyed by ids that
//! stay stable across policy versions (provider/model/region for targets,
//! provider/pool/key id for keys, the address for egress nodes), and a new
//! snapshot finds the old counters where it left them.
//!
//! Reading is lock-free: each board is an `ArcSwap` of a map from id to an
//! entry of atomics. A new id copies the map under a mutex (ids are few and
//! stable, so this happens a handful of times per node lifetime); updates
//! to an existing entry are plain atomic operations. A board is capped so
//! ids that come from outside (clients may name any model of a provider)
//! cannot grow it without bound; past the cap, new ids are simply not
//! tracked and read as healthy.
//!
//! The planner ([`crate::plan::plan`]) and the egress's key choice read it;
//! the resilience work (breakers, half-open probes) builds on the same
//! entries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// Weight of the newest sample in the error-rate and latency averages:
/// about the last ten attempts dominate.
const EWMA_ALPHA: f64 = 0.2;

/// Most ids one board tracks.
const MAX_ENTRIES: usize = 4096;

/// Joins id parts; a control character no provider, model, pool or key
/// name is expected to hold, so parts never run into each other.
const SEP: char = '\u{1f}';

/// The board's id of a target: a provider's model as called from a region.
pub fn target_id(provider: &str, model: &str, region: Option<&str>) -> String {
    format!("{provider}{SEP}{model}{SEP}{}", region.unwrap_or(""))
}

/// The board's id of a key: its provider, pool and key id (never its value).
pub fn key_id(provider: &str, pool: &str, key: &str) -> String {
    format!("{provider}{SEP}{pool}{SEP}{key}")
}

/// One attempt's result as the board counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Answered; `latency` to the first byte (or the whole answer).
    Success { latency: Duration },
    /// Failed in a way that says something about the target, key or node
    /// (not a client error).
    Failure,
}

/// Counters of one target, key or egress node. Every field is an atomic so
/// concurrent requests update it without locks.
#[derive(Debug, Default)]
pub struct Entry {
    successes: AtomicU64,
    failures: AtomicU64,
    /// f64 bits: moving average of failures (1) and successes (0).
    error_ewma: AtomicU64,
    /// f64 bits, microseconds; 0 until the first success.
    latency_ewma_us: AtomicU64,
    /// Milliseconds since the board's epoch, plus one; 0 = never.
    last_failure_ms: AtomicU64,
    in_flight: AtomicU32,
    /// Milliseconds since the board's epoch until which the key must not
    /// be used (after a 429); 0 = none.
    cooldown_until_ms: AtomicU64,
    /// Fingerprint of the key value the provider refused (401/403); 0 =
    /// none. Tied to the value, so rotating the secret behind the same key
    /// id re-enables it.
    refused_fingerprint: AtomicU64,
}

fn update_ewma(cell: &AtomicU64, sample: f64, first: bool) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        let old = f64::from_bits(bits);
        let next = if first {
            sample
        } else {
            old + EWMA_ALPHA * (sample - old)
        };
        Some(next.to_bits())
    });
}

impl Entry {
    /// Marks one attempt in flight until the guard is dropped, so a
    /// cancelled request cannot leak a count.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn samples(&self) -> u64 {
        self.successes() + self.failures()
    }

    /// Recent share of failed attempts, in [0, 1].
    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_ewma.load(Ordering::Relaxed))
    }

    /// Moving average of successful attempts' latency.
    pub fn latency(&self) -> Option<Duration> {
        let us = f64::from_bits(self.latency_ewma_us.load(Ordering::Relaxed));
        (us > 0.0).then(|| Duration::from_micros(us as u64))
    }

    fn record(&self, outcome: Outcome, now_ms: u64) {
        let first = self.samples() == 0;
        match outcome {
            Outcome::Success { latency } => {
                let first_latency = self.successes() == 0;
                self.successes.fetch_add(1, Ordering::Relaxed);
                update_ewma(&self.error_ewma, 0.0, first);
                let us = (latency.as_micros() as f64).max(1.0);
                update_ewma(&self.latency_ewma_us, us, first_latency);
            }
            Outcome::Failure => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                update_ewma(&self.error_ewma, 1.0, first);
                self.last_failure_ms.store(now_ms + 1, Ordering::Relaxed);
            }
        }
    }
}

/// An attempt in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Entry>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One kind of id → entry, read without locks.
struct Board {
    entries: ArcSwap<HashMap<Box<str>, Arc<Entry>>>,
    /// Serialises inserts only; readers never take it.
    insert: Mutex<()>,
}

impl Board {
    fn new() -> Self {
        Board {
            entries: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.entries.load().get(id).cloned()
    }

    fn entry(&self, id: &str) -> Option<Arc<Entry>> {
        if let Some(e) = self.get(id) {
            return Some(e);
        }
        // A poisoned lock only means another insert panicked midway; the
        // map itself is swapped whole, so it is still consistent.
        let _guard = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.entries.load_full();
        if let Some(e) = current.get(id) {
            return Some(e.clone());
        }
        if current.len() >= MAX_ENTRIES {
            return None;
        }
        let mut next = (*current).clone();
        let e = Arc::new(Entry::default());
        next.insert(id.into(), e.clone());
        self.entries.store(Arc::new(next));
        Some(e)
    }

    fn len(&self) -> usize {
        self.entries.load().len()
    }
}

/// The node's health board. Share one (`Arc<Health>`) between everything
/// in a node that makes or plans attempts; it outlives snapshots.
pub struct Health {
    epoch: Instant,
    targets: Board,
    keys: Board,
    egress: Board,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("targets", &self.targets.len())
            .field("keys", &self.keys.len())
            .field("egress", &self.egress.len())
            .finish()
    }
}

/// A recent error rate at or above this demotes a target (once it has
/// [`DEMOTE_MIN_SAMPLES`] attempts, so one early failure does not).
pub const DEMOTE_ERROR_RATE: f64 = 0.5;
pub const DEMOTE_MIN_SAMPLES: u64 = 5;

/// Longest cooldown a provider's `retry-after` can impose on a key: the
/// header comes from outside.
pub const MAX_KEY_COOLDOWN: Duration = Duration::from_secs(300);
/// Cooldown after a 429 that named no `retry-after`.
pub const DEFAULT_KEY_COOLDOWN: Duration = Duration::from_secs(1);

impl Health {
    pub fn new() -> Self {
        Health {
            epoch: Instant::now(),
            targets: Board::new(),
            keys: Board::new(),
            egress: Board::new(),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The target's entry, created on first use; `None` past the cap.
    pub fn target(&self, id: &str) -> Option<Arc<Entry>> {
        self.targets.entry(id)
    }

    pub fn key(&self, id: &str) -> Option<Arc<Entry>> {
        self.keys.entry(id)
    }

    pub fn egress(&self, addr: &str) -> Option<Arc<Entry>> {
        self.egress.entry(addr)
    }

    /// Whether any target has been recorded; lets planning skip the
    /// lookups on a fresh node.
    pub fn has_targets(&self) -> bool {
        self.targets.len() > 0
    }

    /// Looks an entry up without creating it (what planning does: an id
    /// never tried is healthy).
    pub fn peek_target(&self, id: &str) -> Option<Arc<Entry>> {
        self.targets.get(id)
    }

    pub fn peek_key(&self, id: &str) -> Option<Arc<Entry>> {
        self.keys.get(id)
    }

    pub fn peek_egress(&self, addr: &str) -> Option<Arc<Entry>> {
        self.egress.get(addr)
    }

    pub fn record(&self, entry: &Entry, outcome: Outcome, now: Instant) {
        entry.record(outcome, self.millis(now));
    }

    /// When the entry last failed, if it has.
    pub fn last_failure(&self, entry: &Entry) -> Option<Instant> {
        match entry.last_failure_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// Whether planning should move the target behind the healthy ones.
    pub fn is_degraded(&self, entry: &Entry) -> bool {
        entry.samples() >= DEMOTE_MIN_SAMPLES && entry.error_rate() >= DEMOTE_ERROR_RATE
    }

    /// Keeps a key out of use for `wait` (clamped to [`MAX_KEY_COOLDOWN`])
    /// from `now`; a longer cooldown already set is kept.
    pub fn cool_down(&self, entry: &Entry, wait: Duration, now: Instant) {
        let until = self.millis(now + wait.min(MAX_KEY_COOLDOWN)).max(1);
        entry.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// When the key's cooldown ends, if it is cooling at `now`.
    pub fn cooling_until(&self, entry: &Entry, now: Instant) -> Option<Instant> {
        let until = entry.cooldown_until_ms.load(Ordering::Relaxed);
        (until > self.millis(now)).then(|| self.epoch + Duration::from_millis(until))
    }

    /// The provider refused this key value: leave it out until the value
    /// behind the id changes.
    pub fn refuse(&self, entry: &Entry, fingerprint: u64) {
        entry
            .refused_fingerprint
            .store(fingerprint.max(1), Ordering::Relaxed);
    }

    pub fn is_refused(&self, entry: &Entry, fingerprint: u64) -> bool {
        let refused = entry.refused_fingerprint.load(Ordering::Relaxed);
        refused != 0 && refused == fingerprint.max(1)
    }
}

/// Reads a `retry-after` value (delta seconds; HTTP dates are rare from
/// LLM providers and read as absent).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_KEY_COOLDOWN.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_shared_and_survive_new_ids() {
        let h = Health::new();
        let id = target_id("p", "m", Some("eu"));
        let a = h.target(&id).unwrap();
        for i in 0..50 {
            h.target(&target_id("p", &format!("m{i}"), None));
        }
        let b = h.target(&id).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "copy-on-insert keeps existing entries");
        assert!(h.peek_target(&target_id("p", "never", None)).is_none());
        assert_ne!(target_id("a", "b/c", None), target_id("a/b", "c", None));
    }

    #[test]
    fn board_is_capped() {
        let h = Health::new();
        for i in 0..MAX_ENTRIES {
            assert!(h.target(&i.to_string()).is_some());
        }
        assert!(h.target("one-too-many").is_none());
        assert!(h.target("0").is_some(), "known ids still resolve");
    }

    #[test]
    fn outcomes_feed_counters_error_rate_and_latency() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.target("t").unwrap();
        assert_eq!(e.error_rate(), 0.0);
        h.record(
            &e,
            Outcome::Success {
                latency: Duration::from_millis(100),
            },
            now,
        );
        assert_eq!(e.latency(), Some(Duration::from_millis(100)));
        assert!(!h.is_degraded(&e));
        for _ in 0..DEMOTE_MIN_SAMPLES {
            h.record(&e, Outcome::Failure, now);
        }
        assert_eq!((e.successes(), e.failures()), (1, DEMOTE_MIN_SAMPLES));
        assert!(e.error_rate() > DEMOTE_ERROR_RATE, "{}", e.error_rate());
        assert!(h.is_degraded(&e));
        assert!(h.last_failure(&e).is_some());
        for _ in 0..10 {
            h.record(
                &e,
                Outcome::Success {
                    latency: Duration::from_millis(100),
                },
                now,
            );
        }
        assert!(!h.is_degraded(&e), "recent successes heal the rate");
    }

    #[test]
    fn in_flight_guard_counts_until_dropped() {
        let h = Health::new();
        let e = h.key(&key_id("p", "pool", "k0")).unwrap();
        let g1 = e.start();
        let g2 = e.start();
        assert_eq!(e.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn cooldowns_end_and_refusals_follow_the_value() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.key("k").unwrap();
        assert!(h.cooling_until(&e, now).is_none());
        h.cool_down(&e, Duration::from_secs(3), now);
        h.cool_down(&e, Duration::from_secs(1), now);
        assert!(h.cooling_until(&e, now + Duration::from_secs(2)).is_some());
        assert!(h.cooling_until(&e, now + Duration::from_secs(4)).is_none());
        h.cool_down(&e, Duration::from_secs(86_400), now);
        assert!(
            h.cooling_until(&e, now + MAX_KEY_COOLDOWN + Duration::from_secs(1))
                .is_none(),
            "an outside retry-after is clamped"
        );
        h.refuse(&e, 42);
        assert!(h.is_refused(&e, 42));
        assert!(!h.is_refused(&e, 43), "a rotated value is usable again");
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
