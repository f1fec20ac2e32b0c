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
//! The planner ([`crate::plan::plan`]) and the egress's key choice read it.
//! Each entry is also a circuit breaker (outlier ejection in Envoy's
//! terms): it opens on consecutive failures or on a high error rate over a
//! sliding window (never on one failure), stays open for an ejection time
//! that doubles while the target keeps failing, then lets a few probe
//! attempts through (half-open) and closes on the first success. Keys also
//! carry what the provider said about them: cooldowns after 429s, refusals
//! after 401/403, and the headroom its rate-limit headers announce.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
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
    join_id(&[provider, model, region.unwrap_or("")])
}

/// The board's id of a key as used for one model: its provider, pool and
/// key id (never its value) and the model. Per model because providers
/// rate-limit a key per model (OpenAI's limits and `x-ratelimit-*` headers
/// are per model): a 429 on one model must not bench the key for others.
pub fn key_id(provider: &str, pool: &str, key: &str, model: &str) -> String {
    join_id(&[provider, pool, key, model])
}

/// Ids are built several times per request: one exact allocation, not the
/// formatting machinery.
fn join_id(parts: &[&str]) -> String {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len();
    let mut id = String::with_capacity(len);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            id.push(SEP);
        }
        id.push_str(part);
    }
    id
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
#[derive(Debug)]
pub struct Entry {
    successes: AtomicU64,
    failures: AtomicU64,
    /// f64 bits: moving average of failures (1) and successes (0).
    error_ewma: AtomicU64,
    /// f64 bits, microseconds; 0 until the first success.
    latency_ewma_us: AtomicU64,
    /// f64 bits: natural log of the p95 latency estimate in microseconds
    /// (stochastic quantile tracking; see [`P95_STEP`]).
    latency_p95_ln_us: AtomicU64,
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
    /// Board milliseconds (plus one) of the refusal; a refused key is
    /// probed again once [`KEY_REFUSAL_PROBE`] has passed.
    refused_at_ms: AtomicU64,
    /// 429s in a row: the cooldown without a `retry-after` doubles with it.
    consecutive_429: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Successes (a) and failures (b) per second over the last
    /// [`WINDOW_SECS`] seconds.
    window: Window,
    breaker: AtomicU8,
    /// Board milliseconds until which an open breaker rejects attempts.
    open_until_ms: AtomicU64,
    /// Ejections in a row without a success: each doubles the next
    /// ejection time.
    ejections: AtomicU32,
    probes: AtomicU32,
    /// What the provider's rate-limit headers last said; `u64::MAX` =
    /// unknown. Reset times are board milliseconds.
    remaining_requests: AtomicU64,
    limit_requests: AtomicU64,
    remaining_tokens: AtomicU64,
    limit_tokens: AtomicU64,
    limits_reset_ms: AtomicU64,
    /// Requests and tokens booked against the key in the current minute
    /// of the board (for policy `rpm`/`tpm`), with that minute's index.
    minute: AtomicU64,
    minute_requests: AtomicU64,
    minute_tokens: AtomicU64,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            error_ewma: AtomicU64::new(0),
            latency_ewma_us: AtomicU64::new(0),
            latency_p95_ln_us: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            cooldown_until_ms: AtomicU64::new(0),
            refused_fingerprint: AtomicU64::new(0),
            refused_at_ms: AtomicU64::new(0),
            consecutive_429: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            window: Window::default(),
            breaker: AtomicU8::new(CLOSED),
            open_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            remaining_requests: AtomicU64::new(u64::MAX),
            limit_requests: AtomicU64::new(u64::MAX),
            remaining_tokens: AtomicU64::new(u64::MAX),
            limit_tokens: AtomicU64::new(u64::MAX),
            limits_reset_ms: AtomicU64::new(0),
            minute: AtomicU64::new(0),
            minute_requests: AtomicU64::new(0),
            minute_tokens: AtomicU64::new(0),
        }
    }
}

/// Seconds the sliding error-rate window spans.
pub const WINDOW_SECS: u64 = 10;

/// Per-second buckets of two counters, reused round-robin: a bucket whose
/// second is over is reset by the first writer of its new second. Racing
/// writers may lose a count at a bucket's turnover, which a rate over
/// seconds does not notice.
#[derive(Debug, Default)]
struct Window {
    buckets: [Bucket; WINDOW_SECS as usize],
}

#[derive(Debug, Default)]
struct Bucket {
    /// Second of the board (plus one) the counts belong to; 0 = unused.
    second: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

impl Window {
    fn add(&self, now_ms: u64, a: u64, b: u64) {
        let second = now_ms / 1000 + 1;
        let bucket = &self.buckets[(second % WINDOW_SECS) as usize];
        let seen = bucket.second.load(Ordering::Acquire);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.a.store(0, Ordering::Relaxed);
            bucket.b.store(0, Ordering::Relaxed);
        }
        bucket.a.fetch_add(a, Ordering::Relaxed);
        bucket.b.fetch_add(b, Ordering::Relaxed);
    }

    /// Sums over the seconds of the window that ends at `now_ms`.
    fn sum(&self, now_ms: u64) -> (u64, u64) {
        let second = now_ms / 1000 + 1;
        let oldest = second.saturating_sub(WINDOW_SECS - 1);
        self.buckets
            .iter()
            .filter(|b| {
                let s = b.second.load(Ordering::Acquire);
                s >= oldest && s <= second
            })
            .fold((0, 0), |(a, b), k| {
                (
                    a + k.a.load(Ordering::Relaxed),
                    b + k.b.load(Ordering::Relaxed),
                )
            })
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Failures in a row that eject a target, key or egress node.
pub const EJECT_CONSECUTIVE: u32 = 5;
/// Error rate over the sliding window that ejects, once the window holds
/// [`EJECT_MIN_REQUESTS`] attempts.
pub const EJECT_ERROR_RATE: f64 = 0.5;
pub const EJECT_MIN_REQUESTS: u64 = 10;
/// First ejection time; doubles per ejection in a row up to the maximum.
pub const EJECT_BASE: Duration = Duration::from_secs(2);
pub const EJECT_MAX: Duration = Duration::from_secs(60);
/// Attempts let through at once while half-open.
pub const HALF_OPEN_PROBES: u32 = 2;
/// How long a key the provider refused stays out before one probe.
pub const KEY_REFUSAL_PROBE: Duration = Duration::from_secs(300);

/// A breaker's state change, for the caller's event and metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Ejected, for this long.
    Opened(Duration),
    /// The ejection time is over: probes may go through.
    HalfOpened,
    /// A probe succeeded.
    Closed,
}

impl Transition {
    pub fn label(self) -> &'static str {
        match self {
            Transition::Opened(_) => "open",
            Transition::HalfOpened => "half_open",
            Transition::Closed => "closed",
        }
    }
}

/// What a breaker allows right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Closed,
    /// Half-open (or due to be) with a probe slot free.
    Probe,
    Ejected,
}

/// Step (in log space) of the p95 estimate: each sample above it raises it
/// by 0.95 × this, each below lowers it by 0.05 × this, so it settles where
/// 5 % of samples lie above (frugal streaming quantiles). Lock-free and
/// constant memory; it follows a target that gets slower within a dozen
/// samples and one that gets faster more slowly, which errs on the side
/// of hedging later.
pub const P95_STEP: f64 = 0.2;

fn update_p95(cell: &AtomicU64, sample_us: f64, first: bool) {
    let ln = sample_us.max(1.0).ln();
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
        let old = f64::from_bits(bits);
        let next = if first {
            ln
        } else if ln >= old {
            old + P95_STEP * 0.95
        } else {
            old - P95_STEP * 0.05
        };
        Some(next.to_bits())
    });
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

    /// Estimated 95th percentile of successful attempts' latency (to the
    /// first byte), once there is a success.
    pub fn latency_p95(&self) -> Option<Duration> {
        if self.successes() == 0 {
            return None;
        }
        let ln = f64::from_bits(self.latency_p95_ln_us.load(Ordering::Relaxed));
        Some(Duration::from_micros(ln.exp().min(3.6e9) as u64))
    }

    fn record(&self, outcome: Outcome, now_ms: u64) -> Option<Transition> {
        let first = self.samples() == 0;
        match outcome {
            Outcome::Success { latency } => {
                let first_latency = self.successes() == 0;
                self.successes.fetch_add(1, Ordering::Relaxed);
                update_ewma(&self.error_ewma, 0.0, first);
                let us = (latency.as_micros() as f64).max(1.0);
                update_ewma(&self.latency_ewma_us, us, first_latency);
                update_p95(&self.latency_p95_ln_us, us, first_latency);
                self.window.add(now_ms, 1, 0);
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.consecutive_429.store(0, Ordering::Relaxed);
                // Only a probe closes a breaker: an attempt that started
                // before it opened proves nothing about now.
                if self
                    .breaker
                    .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.ejections.store(0, Ordering::Relaxed);
                    return Some(Transition::Closed);
                }
                None
            }
            Outcome::Failure => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                update_ewma(&self.error_ewma, 1.0, first);
                self.last_failure_ms.store(now_ms + 1, Ordering::Relaxed);
                self.window.add(now_ms, 0, 1);
                let in_a_row = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                match self.breaker.load(Ordering::Acquire) {
                    HALF_OPEN => self.open(HALF_OPEN, now_ms),
                    CLOSED => {
                        let (ok, failed) = self.window.sum(now_ms);
                        let total = ok + failed;
                        let by_rate = total >= EJECT_MIN_REQUESTS
                            && failed as f64 >= EJECT_ERROR_RATE * total as f64;
                        if in_a_row >= EJECT_CONSECUTIVE || by_rate {
                            self.open(CLOSED, now_ms)
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            }
        }
    }

    /// Opens the breaker if it still is in state `from`.
    fn open(&self, from: u8, now_ms: u64) -> Option<Transition> {
        if self
            .breaker
            .compare_exchange(from, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let time = EJECT_BASE.saturating_mul(1 << n).min(EJECT_MAX);
        self.open_until_ms
            .store(now_ms + time.as_millis() as u64, Ordering::Release);
        Some(Transition::Opened(time))
    }

    /// Attempts over the sliding window: (successes, failures).
    fn window_counts(&self, now_ms: u64) -> (u64, u64) {
        self.window.sum(now_ms)
    }
}

/// A half-open probe slot, given back when dropped.
#[derive(Debug)]
pub struct Probe(Arc<Entry>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.probes.fetch_sub(1, Ordering::Relaxed);
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
struct Board<T = Entry> {
    // Read several times per request. Ids can carry a model name a client
    // chose, but the board never holds more than `MAX_ENTRIES`.
    entries: ArcSwap<HashMap<Box<str>, Arc<T>, crate::FastHash>>,
    /// Serialises inserts only; readers never take it.
    insert: Mutex<()>,
}

impl<T: Default> Board<T> {
    fn new() -> Self {
        Board {
            entries: ArcSwap::from_pointee(HashMap::default()),
            insert: Mutex::new(()),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<T>> {
        self.entries.load().get(id).cloned()
    }

    fn entry(&self, id: &str) -> Option<Arc<T>> {
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
        let e = Arc::new(T::default());
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
    budgets: Board<RetryBudget>,
    /// Per tenant: requests on hedged routes (a) and hedges (b).
    hedge_budgets: Board<RetryBudget>,
    events: Events,
}

/// Counts of what the board decided, for metrics (the egress has no
/// registry of its own; in `switchyard dev` the edge renders these).
#[derive(Debug, Default)]
pub struct Events {
    pub key_cooldowns: AtomicU64,
    pub key_disabled: AtomicU64,
    /// Requests a pool could not serve because every key was out.
    pub pool_exhausted: AtomicU64,
    pub key_breaker_opened: AtomicU64,
    /// Target breakers opened because the fleet-wide error rate the
    /// control plane pushed was over the ejection threshold.
    pub fleet_ejections: AtomicU64,
}

/// A route's retry budget (Envoy's and Finagle's idea): retries may add at
/// most a share of the requests the route saw over the sliding window,
/// plus a small floor so a quiet route can still retry at all.
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// Requests (a) and retries (b) per second.
    window: Window,
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
            budgets: Board::new(),
            hedge_budgets: Board::new(),
            events: Events::default(),
        }
    }

    /// Counters of key and pool events.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The retry budget of a route (or of a bare model name).
    pub fn budget(&self, route: &str) -> Option<Arc<RetryBudget>> {
        self.budgets.entry(route)
    }

    /// A tenant's hedge budget: the same sliding-window machinery as the
    /// retry budget, counting the tenant's requests on hedged routes and
    /// the hedges they started ([`Health::budget_request`],
    /// [`Health::budget_retry`]).
    pub fn hedge_budget(&self, tenant: &str) -> Option<Arc<RetryBudget>> {
        self.hedge_budgets.entry(tenant)
    }

    /// Books one request against the route's budget.
    pub fn budget_request(&self, budget: &RetryBudget, now: Instant) {
        budget.window.add(self.millis(now), 1, 0);
    }

    /// Takes one retry from the budget when it allows it: retries over the
    /// window stay under `ratio` × requests, or under `floor`.
    pub fn budget_retry(&self, budget: &RetryBudget, ratio: f64, floor: u64, now: Instant) -> bool {
        let now_ms = self.millis(now);
        let (requests, retries) = budget.window.sum(now_ms);
        let allowed = ((requests as f64 * ratio) as u64).max(floor);
        if retries >= allowed {
            return false;
        }
        budget.window.add(now_ms, 0, 1);
        true
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

    /// Every entry of a key, one per model it served: for a metrics scrape,
    /// not the request path (it walks the whole key board).
    pub fn key_models(&self, provider: &str, pool: &str, key: &str) -> Vec<Arc<Entry>> {
        let prefix = key_id(provider, pool, key, "");
        self.keys
            .entries
            .load()
            .iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn peek_egress(&self, addr: &str) -> Option<Arc<Entry>> {
        self.egress.get(addr)
    }

    /// Books an attempt's outcome; a breaker state change is returned for
    /// the caller to report.
    pub fn record(&self, entry: &Entry, outcome: Outcome, now: Instant) -> Option<Transition> {
        entry.record(outcome, self.millis(now))
    }

    /// What the entry's breaker allows at `now`, without changing it (the
    /// planner's view).
    pub fn availability(&self, entry: &Entry, now: Instant) -> Availability {
        match entry.breaker.load(Ordering::Acquire) {
            CLOSED => Availability::Closed,
            state => {
                let due = state == HALF_OPEN
                    || self.millis(now) >= entry.open_until_ms.load(Ordering::Acquire);
                if due && entry.probes.load(Ordering::Relaxed) < HALF_OPEN_PROBES {
                    Availability::Probe
                } else {
                    Availability::Ejected
                }
            }
        }
    }

    /// When an open breaker lets its first probe through (`None`: not open).
    pub fn probe_at(&self, entry: &Entry) -> Option<Instant> {
        (entry.breaker.load(Ordering::Acquire) == OPEN).then(|| {
            self.epoch + Duration::from_millis(entry.open_until_ms.load(Ordering::Acquire))
        })
    }

    /// Opens a closed breaker because the fleet says the target fails (the
    /// control plane's error rate over the ejection threshold) while this
    /// node has no success of its own to contradict it. From there the
    /// breaker runs as if it had opened on local failures: ejected, then
    /// half-open probes, closed by a successful one.
    pub fn eject_by_fleet(&self, entry: &Entry, now: Instant) -> Option<Transition> {
        let t = entry.open(CLOSED, self.millis(now));
        if t.is_some() {
            self.events.fleet_ejections.fetch_add(1, Ordering::Relaxed);
        }
        t
    }

    /// Whether the breaker is open or half-open.
    pub fn is_ejected(&self, entry: &Entry) -> bool {
        entry.breaker.load(Ordering::Acquire) != CLOSED
    }

    /// Takes a probe slot of an open breaker whose ejection time is over
    /// (moving it to half-open, reported as the transition) or of a
    /// half-open one. `None`: closed (no probe needed) is `Ok(None)`, no
    /// slot free is `Err(())`.
    #[allow(clippy::result_unit_err)]
    pub fn try_probe(
        &self,
        entry: &Arc<Entry>,
        now: Instant,
    ) -> Result<Option<(Probe, Option<Transition>)>, ()> {
        let mut transition = None;
        match entry.breaker.load(Ordering::Acquire) {
            CLOSED => return Ok(None),
            OPEN => {
                if self.millis(now) < entry.open_until_ms.load(Ordering::Acquire) {
                    return Err(());
                }
                if entry
                    .breaker
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    transition = Some(Transition::HalfOpened);
                }
            }
            _ => {}
        }
        let taken = entry
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < HALF_OPEN_PROBES).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            return Err(());
        }
        Ok(Some((Probe(entry.clone()), transition)))
    }

    /// Successes and failures over the sliding window.
    pub fn window(&self, entry: &Entry, now: Instant) -> (u64, u64) {
        entry.window_counts(self.millis(now))
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

    /// A 429 on the key: cool it down for the provider's `retry-after`, or,
    /// without one, for a backoff that doubles with each 429 in a row.
    /// Returns the cooldown.
    pub fn rate_limited(
        &self,
        entry: &Entry,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> Duration {
        let in_a_row = entry
            .consecutive_429
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let wait = retry_after
            .unwrap_or_else(|| DEFAULT_KEY_COOLDOWN.saturating_mul(1 << in_a_row))
            .min(MAX_KEY_COOLDOWN);
        self.cool_down(entry, wait, now);
        self.events.key_cooldowns.fetch_add(1, Ordering::Relaxed);
        wait
    }

    /// The provider refused this key value: leave it out until the value
    /// behind the id changes (or, once [`KEY_REFUSAL_PROBE`] has passed,
    /// for one probe: a revoked key that was restored comes back).
    pub fn refuse(&self, entry: &Entry, fingerprint: u64, now: Instant) {
        let fresh = entry
            .refused_fingerprint
            .swap(fingerprint.max(1), Ordering::Relaxed)
            != fingerprint.max(1);
        entry
            .refused_at_ms
            .store(self.millis(now) + 1, Ordering::Relaxed);
        if fresh {
            self.events.key_disabled.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_refused(&self, entry: &Entry, fingerprint: u64, now: Instant) -> bool {
        let refused = entry.refused_fingerprint.load(Ordering::Relaxed);
        if refused == 0 || refused != fingerprint.max(1) {
            return false;
        }
        let at = entry
            .refused_at_ms
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        self.millis(now).saturating_sub(at) < KEY_REFUSAL_PROBE.as_millis() as u64
    }

    /// Stores what a provider's rate-limit headers said about the key.
    pub fn observe_limits(&self, entry: &Entry, limits: &RateLimits, now: Instant) {
        let set = |cell: &AtomicU64, v: Option<u64>| {
            if let Some(v) = v {
                cell.store(v, Ordering::Relaxed);
            }
        };
        set(&entry.remaining_requests, limits.remaining_requests);
        set(&entry.limit_requests, limits.limit_requests);
        set(&entry.remaining_tokens, limits.remaining_tokens);
        set(&entry.limit_tokens, limits.limit_tokens);
        if let Some(reset) = limits.reset {
            let at = self.millis(now + reset.min(MAX_KEY_COOLDOWN)).max(1);
            entry.limits_reset_ms.store(at, Ordering::Relaxed);
        }
    }

    /// Until when the key's announced quota is used up (remaining requests
    /// or tokens at zero before the announced reset).
    pub fn quota_exhausted_until(&self, entry: &Entry, now: Instant) -> Option<Instant> {
        let reset = entry.limits_reset_ms.load(Ordering::Relaxed);
        if reset <= self.millis(now) {
            return None;
        }
        let empty = entry.remaining_requests.load(Ordering::Relaxed) == 0
            || entry.remaining_tokens.load(Ordering::Relaxed) == 0;
        empty.then(|| self.epoch + Duration::from_millis(reset))
    }

    /// Share of the key's announced quota left, in [0, 1]; 1 when the
    /// provider announced nothing or its reset has passed.
    pub fn headroom(&self, entry: &Entry, now: Instant) -> f64 {
        if entry.limits_reset_ms.load(Ordering::Relaxed) <= self.millis(now) {
            return 1.0;
        }
        let share = |rem: &AtomicU64, lim: &AtomicU64| {
            let (r, l) = (rem.load(Ordering::Relaxed), lim.load(Ordering::Relaxed));
            if r == u64::MAX || l == u64::MAX || l == 0 {
                1.0
            } else {
                (r as f64 / l as f64).clamp(0.0, 1.0)
            }
        };
        share(&entry.remaining_requests, &entry.limit_requests)
            .min(share(&entry.remaining_tokens, &entry.limit_tokens))
    }

    /// Books a request (and its estimated tokens) against the key's
    /// current minute, for policy `rpm`/`tpm`.
    pub fn book(&self, entry: &Entry, requests: u64, tokens: u64, now: Instant) {
        let minute = self.millis(now) / 60_000 + 1;
        let seen = entry.minute.load(Ordering::Acquire);
        if seen != minute
            && entry
                .minute
                .compare_exchange(seen, minute, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            entry.minute_requests.store(0, Ordering::Relaxed);
            entry.minute_tokens.store(0, Ordering::Relaxed);
        }
        entry.minute_requests.fetch_add(requests, Ordering::Relaxed);
        entry.minute_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Requests and tokens booked in the current minute, and when it ends.
    pub fn minute_usage(&self, entry: &Entry, now: Instant) -> (u64, u64, Instant) {
        let ms = self.millis(now);
        let minute = ms / 60_000 + 1;
        let end = self.epoch + Duration::from_millis(minute * 60_000);
        if entry.minute.load(Ordering::Acquire) != minute {
            return (0, 0, end);
        }
        (
            entry.minute_requests.load(Ordering::Relaxed),
            entry.minute_tokens.load(Ordering::Relaxed),
            end,
        )
    }

    /// Counts a pool that had no key to offer.
    pub fn pool_exhausted(&self) {
        self.events.pool_exhausted.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a provider's rate-limit headers announce about a key; `None` =
/// not said.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    pub remaining_requests: Option<u64>,
    pub limit_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub limit_tokens: Option<u64>,
    /// When the exhausted (or, if none is, the later) quota resets.
    pub reset: Option<Duration>,
}

impl RateLimits {
    pub fn is_empty(&self) -> bool {
        *self == RateLimits::default()
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
    fn the_p95_estimate_settles_where_one_sample_in_twenty_is_slower() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.target("t").unwrap();
        assert_eq!(e.latency_p95(), None);
        let ok = |ms| Outcome::Success {
            latency: Duration::from_millis(ms),
        };
        // 95 % of answers at 100 ms, 5 % at 1 s, in a fixed interleaving.
        for i in 0..2000 {
            h.record(&e, ok(if i % 20 == 0 { 1000 } else { 100 }), now);
        }
        let p95 = e.latency_p95().unwrap();
        println!("p95 estimate {p95:?}, mean {:?}", e.latency());
        assert!(
            p95 >= Duration::from_millis(100) && p95 <= Duration::from_millis(1000),
            "{p95:?}"
        );
        // Everything gets ten times slower: the estimate follows upwards.
        for _ in 0..100 {
            h.record(&e, ok(5000), now);
        }
        assert!(e.latency_p95().unwrap() > Duration::from_millis(1000));
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
        let e = h.key(&key_id("p", "pool", "k0", "m")).unwrap();
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
        h.refuse(&e, 42, now);
        assert!(h.is_refused(&e, 42, now));
        assert!(
            !h.is_refused(&e, 43, now),
            "a rotated value is usable again"
        );
        assert!(
            !h.is_refused(&e, 42, now + KEY_REFUSAL_PROBE),
            "a refused key is probed again after a long while"
        );
        assert_eq!(h.events().key_disabled.load(Ordering::Relaxed), 1);
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn breakers_open_on_failures_in_a_row_probe_and_close() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.target("t").unwrap();
        for _ in 0..EJECT_CONSECUTIVE - 1 {
            assert_eq!(h.record(&e, Outcome::Failure, now), None);
        }
        assert_eq!(h.availability(&e, now), Availability::Closed);
        assert_eq!(
            h.record(&e, Outcome::Failure, now),
            Some(Transition::Opened(EJECT_BASE))
        );
        assert_eq!(h.availability(&e, now), Availability::Ejected);
        assert!(h.try_probe(&e, now).is_err(), "no probe while ejected");
        let later = now + EJECT_BASE;
        assert_eq!(h.availability(&e, later), Availability::Probe);
        let (p1, t) = h.try_probe(&e, later).unwrap().unwrap();
        assert_eq!(t, Some(Transition::HalfOpened));
        let (p2, t) = h.try_probe(&e, later).unwrap().unwrap();
        assert_eq!(t, None);
        assert!(h.try_probe(&e, later).is_err(), "probe slots are bounded");
        assert_eq!(h.availability(&e, later), Availability::Ejected);
        drop(p1);
        // A failed probe ejects again, for twice as long.
        assert_eq!(
            h.record(&e, Outcome::Failure, later),
            Some(Transition::Opened(EJECT_BASE * 2))
        );
        drop(p2);
        let again = later + EJECT_BASE * 2;
        let (_p, _) = h.try_probe(&e, again).unwrap().unwrap();
        let ok = Outcome::Success {
            latency: Duration::from_millis(1),
        };
        assert_eq!(h.record(&e, ok, again), Some(Transition::Closed));
        assert_eq!(h.availability(&e, again), Availability::Closed);
        assert!(h.try_probe(&e, again).unwrap().is_none());
    }

    #[test]
    fn breakers_open_on_the_window_error_rate_not_on_one_failure() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.target("t").unwrap();
        let ok = Outcome::Success {
            latency: Duration::from_millis(1),
        };
        assert_eq!(h.record(&e, Outcome::Failure, now), None);
        // Alternating: never 5 in a row, but half of the window fails.
        let mut opened = None;
        for i in 0..EJECT_MIN_REQUESTS {
            let outcome = if i % 2 == 0 { ok } else { Outcome::Failure };
            if let Some(t) = h.record(&e, outcome, now) {
                opened = Some(t);
            }
        }
        assert!(matches!(opened, Some(Transition::Opened(_))), "{opened:?}");
        assert_eq!(
            h.window(&e, now),
            (EJECT_MIN_REQUESTS / 2, EJECT_MIN_REQUESTS / 2 + 1)
        );
        // The window forgets: eleven seconds later it is empty.
        assert_eq!(
            h.window(&e, now + Duration::from_secs(WINDOW_SECS + 1)),
            (0, 0)
        );
    }

    #[test]
    fn retry_budgets_cap_retries_to_a_share_of_requests() {
        let h = Health::new();
        let now = Instant::now();
        let b = h.budget("chat").unwrap();
        let granted = |n: usize| (0..n).filter(|_| h.budget_retry(&b, 0.2, 3, now)).count();
        assert_eq!(granted(10), 3, "the floor lets a quiet route retry");
        for _ in 0..100 {
            h.budget_request(&b, now);
        }
        assert_eq!(granted(100), 17, "20 % of 100 requests, 3 already used");
        let later = now + Duration::from_secs(WINDOW_SECS + 1);
        assert!(h.budget_retry(&b, 0.2, 3, later), "the window slides");
    }

    #[test]
    fn keys_learn_from_429s_rate_limit_headers_and_their_minute() {
        let h = Health::new();
        let now = Instant::now();
        let e = h.key("k").unwrap();
        assert_eq!(h.rate_limited(&e, None, now), DEFAULT_KEY_COOLDOWN);
        assert_eq!(h.rate_limited(&e, None, now), DEFAULT_KEY_COOLDOWN * 2);
        assert_eq!(
            h.rate_limited(&e, Some(Duration::from_millis(1500)), now),
            Duration::from_millis(1500)
        );
        assert_eq!(h.events().key_cooldowns.load(Ordering::Relaxed), 3);
        assert_eq!(h.headroom(&e, now), 1.0);
        h.observe_limits(
            &e,
            &RateLimits {
                remaining_requests: Some(25),
                limit_requests: Some(100),
                remaining_tokens: Some(500),
                limit_tokens: Some(1000),
                reset: Some(Duration::from_secs(10)),
            },
            now,
        );
        assert_eq!(h.headroom(&e, now), 0.25);
        assert!(h.quota_exhausted_until(&e, now).is_none());
        h.observe_limits(
            &e,
            &RateLimits {
                remaining_requests: Some(0),
                ..RateLimits::default()
            },
            now,
        );
        assert!(h.quota_exhausted_until(&e, now).is_some());
        let after = now + Duration::from_secs(11);
        assert!(h.quota_exhausted_until(&e, after).is_none(), "reset passed");
        assert_eq!(h.headroom(&e, after), 1.0);
        h.book(&e, 1, 40, now);
        h.book(&e, 1, 60, now);
        let (requests, tokens, _) = h.minute_usage(&e, now);
        assert_eq!((requests, tokens), (2, 100));
        let (requests, _, _) = h.minute_usage(&e, now + Duration::from_secs(61));
        assert_eq!(requests, 0, "a new minute starts empty");
    }
}
