//! Tenant and virtual-key limits and budgets, enforced in `admit` and
//! settled in `record`.
//!
//! Every request of a tenant with limits takes, atomically, one slot of
//! each applicable counter: requests this minute, tokens this minute (the
//! prompt estimated from the body; corrected with the real usage when the
//! request ends), requests in flight, and USD spent today and this month
//! (checked at admission, counted with the real cost at the end). The
//! tenant's counters and its virtual key's are checked together; the first
//! one over its limit refuses the request with a 429 in the caller's
//! protocol, `retry-after` and OpenAI's `x-ratelimit-*` headers.
//!
//! Where the counters live:
//! - **Redis** (`EdgeNode::redis`): shared by every edge, so limits hold
//!   across the fleet. When Redis cannot be reached a tenant's
//!   `limits.on_counter_error` decides: `open` (default) counts locally,
//!   `closed` refuses with a 503.
//! - **in memory**: each edge enforces the share of every limit the control
//!   plane leased it (`Tenant::limit_share`). The overshoot across edges is
//!   bounded by the leases: see `docs/tenants.md`.
//!
//! Requests and tokens per minute count over a sliding minute: the UTC
//! minute's counter plus the previous minute's, weighted by the share of
//! that minute still inside the last 60 s (the two-bucket estimate), so a
//! burst at a minute boundary cannot reach twice the limit within 60 s.
//! Budgets use fixed windows (the UTC day and month). Budgets are compared
//! with the fleet-wide spend the control plane pushes (from its usage
//! ledger) plus what this edge spent since.

mod local;
mod shared;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderName;
use prometheus::{GaugeVec, IntCounterVec, Opts};
use switchyard_llm::openai::Usage;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{LimitSet, Snapshot, Spend, Tenant, VirtualKey};

pub use local::LocalCounters;
pub use shared::{RedisLink, SharedCounters, SharedError};

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;
/// Requests in flight are counted with a lifetime, so an edge that dies
/// holding slots gives them back after this long.
const IN_FLIGHT_TTL_MS: u64 = 10 * MINUTE_MS;
/// Budgets are counted in millionths of a dollar.
const MICRO: f64 = 1_000_000.0;
/// Weights of the previous minute are in millionths.
const PPM: i64 = 1_000_000;

/// What one counter measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrency,
    DailyBudget,
    MonthlyBudget,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Concurrency => "concurrency",
            Kind::DailyBudget => "daily_budget",
            Kind::MonthlyBudget => "monthly_budget",
        }
    }

    fn is_budget(self) -> bool {
        matches!(self, Kind::DailyBudget | Kind::MonthlyBudget)
    }
}

/// One counter a request must fit in.
#[derive(Debug, Clone)]
pub struct Check {
    pub kind: Kind,
    /// `tenant` or `key`, for messages.
    pub scope: &'static str,
    /// The tenant or key id, for messages.
    pub owner: String,
    pub key: String,
    /// What this edge enforces (the lease, or the budget left).
    pub limit: i64,
    /// What the policy says, for the `x-ratelimit-limit-*` headers.
    pub configured: i64,
    pub cost: i64,
    pub ttl_ms: u64,
    /// Milliseconds until the counter's window ends.
    pub reset_ms: u64,
    /// Sliding windows: the previous window's counter, counted at
    /// `weight_ppm` millionths (the share of it still inside the window).
    pub previous: Option<String>,
    pub weight_ppm: i64,
    /// Budgets: what the fleet had spent when this edge's counter started
    /// (the control plane's figure; 0 with shared counters, which count
    /// every edge's spend themselves).
    pub spent: i64,
}

impl Check {
    /// The count the limit is compared with: this window's counter plus
    /// the previous one's weighted share.
    pub fn effective(&self, current: i64, previous: i64) -> i64 {
        current + previous * self.weight_ppm / PPM
    }

    /// How long until a refused request would fit, exactly as
    /// [`Check::effective`] counts: until enough of the previous window has
    /// slid out, or, when this window alone is too full, until it has
    /// become the previous one and enough of it has slid out.
    pub fn retry_ms(&self, current: i64, previous: i64) -> u64 {
        if self.previous.is_none() {
            return self.reset_ms;
        }
        let cost = self.cost.max(1);
        if cost > self.limit {
            // Never fits; the client learns that from the message.
            return self.reset_ms + MINUTE_MS;
        }
        // Fits once `previous * weight / 1e6` (rounded down) is at most
        // `room - 1`, i.e. below `room`; the weight falls by 1e6 per minute.
        let wait = |previous: i64, weight_ppm: i64, room: i64| -> u64 {
            let over = previous * weight_ppm - room * PPM;
            if previous <= 0 || over < 0 {
                return 0;
            }
            (over as u64 * MINUTE_MS) / (previous as u64 * PPM as u64) + 1
        };
        if current + cost <= self.limit {
            wait(previous, self.weight_ppm, self.limit - cost - current + 1).max(1)
        } else {
            self.reset_ms + wait(current, PPM, self.limit - cost + 1)
        }
    }

    /// Budgets cost nothing up front (the cost is known at the end), yet
    /// one spent to the last cent must refuse: every check takes at least 1.
    fn exceeded_by(&self, used: i64) -> bool {
        used + self.cost.max(1) > self.limit
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Counted; each counter's value afterwards, in check order.
    Admitted { after: Vec<i64> },
    /// `checks[index]` is full at `used`; nothing was counted. The request
    /// would fit in `retry_ms`.
    Refused {
        index: usize,
        used: i64,
        retry_ms: u64,
    },
}

/// Where a request's counters were taken, so `record` gives back to the
/// same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    Shared,
}

/// A request's hold on its counters, settled once in `record`.
#[derive(Debug)]
pub struct Ticket {
    store: Store,
    tenant: String,
    estimate: i64,
    tokens: Vec<String>,
    in_flight: Vec<String>,
    budgets: Vec<String>,
}

pub struct Limiter {
    local: LocalCounters,
    shared: Option<SharedCounters>,
    rejections: IntCounterVec,
    counter_errors: IntCounterVec,
    budget_used: GaugeVec,
}

/// What the caller gets when admitted: headers for its answer.
pub type Headers = crate::respond::Extra;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
const BUDGET_WARNING: HeaderName = HeaderName::from_static("x-switchyard-budget-warning");

impl Limiter {
    /// Counters in this edge's memory (limits leased by the control plane).
    pub fn local() -> Self {
        Limiter {
            local: LocalCounters::default(),
            shared: None,
            rejections: IntCounterVec::new(
                Opts::new(
                    "limit_rejections_total",
                    "Requests refused by a tenant or key limit, by limit",
                ),
                &["limit"],
            )
            .expect("metric"),
            counter_errors: IntCounterVec::new(
                Opts::new(
                    "limit_counter_errors_total",
                    "Shared-counter (Redis) calls that failed, by outcome (fail_open|fail_closed)",
                ),
                &["outcome"],
            )
            .expect("metric"),
            budget_used: GaugeVec::new(
                Opts::new(
                    "budget_used_ratio",
                    "Share of a tenant's budget spent (fleet spend as this edge last saw it), by tenant and period (day|month); above 1 once spent",
                ),
                &["tenant", "period"],
            )
            .expect("metric"),
        }
    }

    /// Counters shared through Redis at `url`; each call waits at most
    /// `timeout`.
    pub fn redis(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self::shared(RedisLink::new(url, timeout)?))
    }

    /// Counters shared through this Redis.
    pub fn shared(link: Arc<RedisLink>) -> Self {
        let mut l = Self::local();
        l.shared = Some(SharedCounters::new(link));
        l
    }

    pub fn register(&self, registry: &prometheus::Registry) {
        let _ = registry.register(Box::new(self.rejections.clone()));
        let _ = registry.register(Box::new(self.counter_errors.clone()));
        let _ = registry.register(Box::new(self.budget_used.clone()));
        // Present at 0 from the start, so dashboards and alerts see a
        // series before the first refusal.
        for kind in [
            Kind::Requests,
            Kind::Tokens,
            Kind::Concurrency,
            Kind::DailyBudget,
            Kind::MonthlyBudget,
        ] {
            self.rejections.with_label_values(&[kind.label()]);
        }
    }

    /// Sets `budget_used_ratio` from a budget check's counters: one series
    /// per policy tenant and period (keys would be unbounded).
    fn observe_budgets(&self, checks: &[Check], used: impl Fn(usize) -> Option<i64>) {
        for (i, c) in checks.iter().enumerate() {
            if c.scope != "tenant" || !c.kind.is_budget() || c.configured <= 0 {
                continue;
            }
            let Some(used) = used(i) else { continue };
            let period = if c.kind == Kind::DailyBudget {
                "day"
            } else {
                "month"
            };
            let ratio = (c.spent + used) as f64 / c.configured as f64;
            self.budget_used
                .with_label_values(&[c.owner.as_str(), period])
                .set(ratio);
        }
    }

    /// Takes the request's slots, or refuses it. On success the headers
    /// describe what is left; on refusal they go on the 429.
    pub async fn admit(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        key: Option<&VirtualKey>,
        estimate: u64,
    ) -> Result<(Option<Ticket>, Headers), (GatewayError, Headers)> {
        let now = now_ms();
        let store = if self.shared.is_some() {
            Store::Shared
        } else {
            Store::Local
        };
        // Shared counters are global; a lease only splits local ones. For
        // the same reason the fleet's spend (from the ledger) only matters
        // to local counters: Redis counts every edge's spend itself.
        let (share, spend_of) = match store {
            Store::Shared => (1.0, None),
            Store::Local => (tenant.limit_share.unwrap_or(1.0), Some(snap.tenants())),
        };
        let mut checks = Vec::new();
        add_checks(
            &mut checks,
            "tenant",
            &tenant.id,
            &format!("t:{}", tenant.id),
            &tenant.limit_set(),
            share,
            spend_of.and_then(|t| t.spend(&tenant.id)),
            estimate,
            now,
        );
        if let Some(k) = key {
            add_checks(
                &mut checks,
                "key",
                &k.id,
                &format!("k:{}", k.id),
                &k.limits,
                share,
                spend_of.and_then(|t| t.spend(&format!("key:{}", k.id))),
                estimate,
                now,
            );
        }
        if checks.is_empty() {
            return Ok((None, Vec::new()));
        }
        let (decision, store) = match &self.shared {
            None => (self.local.acquire(&tenant.id, &checks, now), Store::Local),
            Some(shared) => match shared.acquire(&checks).await {
                Ok(d) => (d, Store::Shared),
                Err(e) if tenant.fail_closed => {
                    self.counter_errors
                        .with_label_values(&["fail_closed"])
                        .inc();
                    tracing::warn!(target: "switchyard::limits", error = %e, tenant = %tenant.id, "shared counters unreachable; refusing (fail-closed)");
                    let err = GatewayError::new(
                        ErrorKind::Overloaded,
                        "Rate limits cannot be checked right now; try again shortly.",
                    )
                    .with_code("limits_unavailable");
                    let mut err = err;
                    err.source = switchyard_llm::Source::Policy;
                    err.retry = switchyard_llm::Retry::Never;
                    err.retry_after = Some("1".into());
                    return Err((err, Vec::new()));
                }
                Err(e) => {
                    self.counter_errors.with_label_values(&["fail_open"]).inc();
                    tracing::warn!(target: "switchyard::limits", error = %e, tenant = %tenant.id, "shared counters unreachable; counting locally (fail-open)");
                    (self.local.acquire(&tenant.id, &checks, now), Store::Local)
                }
            },
        };
        match decision {
            Decision::Admitted { after } => {
                self.observe_budgets(&checks, |i| after.get(i).copied());
                let headers = headers(&checks, &after, tenant);
                let ticket = Ticket {
                    store,
                    tenant: tenant.id.clone(),
                    estimate: estimate as i64,
                    tokens: keys_of(&checks, Kind::Tokens),
                    in_flight: keys_of(&checks, Kind::Concurrency),
                    budgets: checks
                        .iter()
                        .filter(|c| c.kind.is_budget())
                        .map(|c| c.key.clone())
                        .collect(),
                };
                Ok((Some(ticket), headers))
            }
            Decision::Refused {
                index,
                used,
                retry_ms,
            } => {
                // Refused by a budget: that one is spent. Nothing was
                // counted, so the others are left as they were.
                self.observe_budgets(&checks, |i| (i == index).then(|| used.max(checks[i].limit)));
                // `retry-after` and the reset headers say when it would fit.
                let mut c = checks[index].clone();
                c.reset_ms = retry_ms;
                let c = &c;
                self.rejections.with_label_values(&[c.kind.label()]).inc();
                // The limits, then what is left of the one that refused
                // (nothing) and when it resets.
                let mut h = headers(&checks, &vec![0; checks.len()], tenant);
                h.retain(|(k, _)| k.as_str().starts_with("x-ratelimit-limit"));
                h.extend(refused_headers(c));
                Err((refusal(c), h))
            }
        }
    }

    /// Gives back the request's slot in flight, corrects its token
    /// estimate with the real usage and adds its cost to the budgets.
    pub fn settle(self: &Arc<Self>, ticket: Ticket, usage: Option<Usage>, cost_usd: f64) {
        let mut adjustments: Vec<(String, i64)> = Vec::new();
        if let Some(u) = usage {
            let actual = (u.prompt_tokens + u.completion_tokens) as i64;
            let delta = actual - ticket.estimate.max(1);
            if delta != 0 {
                adjustments.extend(ticket.tokens.iter().map(|k| (k.clone(), delta)));
            }
        }
        adjustments.extend(ticket.in_flight.iter().map(|k| (k.clone(), -1)));
        let micro = (cost_usd * MICRO).round() as i64;
        if micro > 0 {
            adjustments.extend(ticket.budgets.iter().map(|k| (k.clone(), micro)));
        }
        if adjustments.is_empty() {
            return;
        }
        match ticket.store {
            Store::Local => self.local.adjust(&ticket.tenant, &adjustments, now_ms()),
            Store::Shared => {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Some(shared) = &this.shared {
                        if let Err(e) = shared.adjust(&adjustments).await {
                            tracing::warn!(target: "switchyard::limits", error = %e, "cannot settle shared counters; in-flight slots expire on their own");
                        }
                    }
                });
            }
        }
    }

    /// A counter's current value in this edge's memory (tests, benchmarks).
    pub fn local_value(&self, tenant: &str, key: &str) -> i64 {
        self.local.get(tenant, key, now_ms())
    }
}

fn keys_of(checks: &[Check], kind: Kind) -> Vec<String> {
    checks
        .iter()
        .filter(|c| c.kind == kind)
        .map(|c| c.key.clone())
        .collect()
}

/// The counters a request of an owner with `limits` takes at `now_ms`
/// (whole limits, no fleet spend, a one-token estimate), for tests and
/// benchmarks that drive a counter store directly.
pub fn checks_at(prefix: &str, limits: &LimitSet, now_ms: u64) -> Vec<Check> {
    let mut checks = Vec::new();
    add_checks(
        &mut checks,
        "tenant",
        prefix,
        prefix,
        limits,
        1.0,
        None,
        1,
        now_ms,
    );
    checks
}

#[allow(clippy::too_many_arguments)]
fn add_checks(
    checks: &mut Vec<Check>,
    scope: &'static str,
    owner: &str,
    prefix: &str,
    limits: &LimitSet,
    share: f64,
    fleet_spend: Option<&Spend>,
    estimate: u64,
    now: u64,
) {
    let leased = |limit: u64| ((limit as f64 * share).ceil() as i64).max(1);
    let minute = now / MINUTE_MS;
    let minute_reset = (minute + 1) * MINUTE_MS - now;
    // The share of the previous minute still inside the last 60 s.
    let weight_ppm = ((MINUTE_MS - now % MINUTE_MS) as i64 * PPM) / MINUTE_MS as i64;
    let mut push = |kind,
                    key: String,
                    limit: i64,
                    configured: i64,
                    cost: i64,
                    ttl_ms,
                    reset_ms,
                    previous: Option<String>| {
        checks.push(Check {
            kind,
            scope,
            owner: owner.to_string(),
            key,
            limit,
            configured,
            cost,
            ttl_ms,
            reset_ms,
            weight_ppm: if previous.is_some() { weight_ppm } else { 0 },
            previous,
            spent: 0,
        })
    };
    let mut spent_by = [0i64; 2];
    // Counters live two minutes: the previous minute's is still there.
    if let Some(rpm) = limits.rpm {
        push(
            Kind::Requests,
            format!("{prefix}:rpm:{minute}"),
            leased(rpm.into()),
            rpm.into(),
            1,
            2 * MINUTE_MS,
            minute_reset,
            Some(format!("{prefix}:rpm:{}", minute.saturating_sub(1))),
        );
    }
    if let Some(tpm) = limits.tpm {
        push(
            Kind::Tokens,
            format!("{prefix}:tpm:{minute}"),
            leased(tpm),
            tpm as i64,
            estimate.max(1) as i64,
            2 * MINUTE_MS,
            minute_reset,
            Some(format!("{prefix}:tpm:{}", minute.saturating_sub(1))),
        );
    }
    if let Some(n) = limits.concurrency {
        push(
            Kind::Concurrency,
            format!("{prefix}:inflight"),
            leased(n.into()),
            n.into(),
            1,
            IN_FLIGHT_TTL_MS,
            1000,
            None,
        );
    }
    let (day, month, day_reset, month_reset) = calendar(now);
    // A new fleet figure already includes what this edge shipped: local
    // spend counting restarts with it (a fresh counter per figure), so the
    // edge's own past spend is not counted twice.
    let figure = fleet_spend.map_or(0, |s| {
        (s.day_usd.to_bits() ^ s.month_usd.to_bits().rotate_left(17)) % 1_000_000_007
    });
    if let Some(usd) = limits.daily_usd {
        let configured = (usd * MICRO).round() as i64;
        let spent = fleet_spend
            .filter(|s| s.day == day)
            .map_or(0, |s| (s.day_usd * MICRO).round() as i64);
        let left = ((configured - spent) as f64 * share).floor() as i64;
        spent_by[0] = spent;
        push(
            Kind::DailyBudget,
            format!("{prefix}:usd:d{day}:f{figure}"),
            left,
            configured,
            0,
            2 * DAY_MS,
            day_reset,
            None,
        );
    }
    if let Some(usd) = limits.monthly_usd {
        let configured = (usd * MICRO).round() as i64;
        let spent = fleet_spend
            .filter(|s| s.month == month)
            .map_or(0, |s| (s.month_usd * MICRO).round() as i64);
        let left = ((configured - spent) as f64 * share).floor() as i64;
        spent_by[1] = spent;
        push(
            Kind::MonthlyBudget,
            format!("{prefix}:usd:m{month}:f{figure}"),
            left,
            configured,
            0,
            32 * DAY_MS,
            month_reset,
            None,
        );
    }
    for c in checks.iter_mut().filter(|c| c.scope == scope) {
        match c.kind {
            Kind::DailyBudget => c.spent = spent_by[0],
            Kind::MonthlyBudget => c.spent = spent_by[1],
            _ => {}
        }
    }
}

/// (day since epoch, `year * 12 + month - 1`, ms to the next UTC day, ms
/// to the next UTC month).
pub fn calendar(now_ms: u64) -> (i64, i64, u64, u64) {
    let day = (now_ms / DAY_MS) as i64;
    let (y, m, _) = civil_from_days(day);
    let month = y * 12 + (m as i64 - 1);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let next_month_ms = days_from_civil(ny, nm, 1) as u64 * DAY_MS;
    let day_reset = (day as u64 + 1) * DAY_MS - now_ms;
    (day, month, day_reset, next_month_ms.saturating_sub(now_ms))
}

/// Howard Hinnant's `civil_from_days`: (year, month 1..=12, day 1..=31).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// OpenAI's duration format in reset headers: `20ms`, `17s`, `6m0s`.
fn reset_text(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < MINUTE_MS {
        format!("{}s", ms.div_ceil(1000))
    } else {
        let s = ms.div_ceil(1000);
        if s < 3600 {
            format!("{}m{}s", s / 60, s % 60)
        } else {
            format!("{}h{}m{}s", s / 3600, (s % 3600) / 60, s % 60)
        }
    }
}

/// OpenAI's `x-ratelimit-*` headers for requests and tokens (the tightest
/// counter of each kind), and a budget warning past the soft threshold.
fn headers(checks: &[Check], after: &[i64], tenant: &Tenant) -> Headers {
    let mut out = Vec::new();
    for (kind, suffix) in [(Kind::Requests, "requests"), (Kind::Tokens, "tokens")] {
        let tightest = checks
            .iter()
            .zip(after)
            .filter(|(c, _)| c.kind == kind)
            .min_by_key(|(c, used)| c.limit - **used);
        if let Some((c, used)) = tightest {
            let (limit, remaining, reset) = match suffix {
                "requests" => (LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS),
                _ => (LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS),
            };
            out.push((limit, c.configured.to_string()));
            out.push((remaining, (c.limit - used).max(0).to_string()));
            out.push((reset, reset_text(c.reset_ms)));
        }
    }
    // The tenant's soft threshold applies to its keys' budgets too.
    if let Some(ratio) = tenant.budget_warn_ratio {
        for (c, used) in checks.iter().zip(after).filter(|(c, _)| c.kind.is_budget()) {
            if c.configured > 0 && (*used as f64) >= ratio * c.limit as f64 && c.limit > 0 {
                let which = if c.kind == Kind::DailyBudget {
                    "daily"
                } else {
                    "monthly"
                };
                out.push((
                    BUDGET_WARNING,
                    format!(
                        "{} {} budget of {} {:.0}% used",
                        c.scope,
                        which,
                        c.owner,
                        100.0 * *used as f64 / c.limit as f64
                    ),
                ));
                break;
            }
        }
    }
    out
}

fn refused_headers(c: &Check) -> Headers {
    let retry_after = c.reset_ms.div_ceil(1000).max(1).to_string();
    let mut out = vec![(http::header::RETRY_AFTER, retry_after)];
    match c.kind {
        Kind::Requests => {
            out.push((REMAINING_REQUESTS, "0".into()));
            out.push((RESET_REQUESTS, reset_text(c.reset_ms)));
        }
        Kind::Tokens => {
            out.push((REMAINING_TOKENS, "0".into()));
            out.push((RESET_TOKENS, reset_text(c.reset_ms)));
        }
        _ => {}
    }
    out
}

fn refusal(c: &Check) -> GatewayError {
    let (message, code) = match c.kind {
        Kind::Requests => (
            format!(
                "Rate limit reached for {} {}: {} requests per minute. Try again in {}.",
                c.scope,
                c.owner,
                c.configured,
                reset_text(c.reset_ms)
            ),
            "rate_limit_exceeded",
        ),
        Kind::Tokens => (
            format!(
                "Rate limit reached for {} {}: {} tokens per minute. Try again in {}.",
                c.scope,
                c.owner,
                c.configured,
                reset_text(c.reset_ms)
            ),
            "rate_limit_exceeded",
        ),
        Kind::Concurrency => (
            format!(
                "Too many requests in flight for {} {}: at most {} at once.",
                c.scope, c.owner, c.configured
            ),
            "rate_limit_exceeded",
        ),
        Kind::DailyBudget | Kind::MonthlyBudget => (
            format!(
                "You exceeded your current quota: the {} {} budget of {} {} (${:.2}) is spent. It renews in {}.",
                if c.kind == Kind::DailyBudget { "daily" } else { "monthly" },
                "USD",
                c.scope,
                c.owner,
                c.configured as f64 / MICRO,
                reset_text(c.reset_ms)
            ),
            "insufficient_quota",
        ),
    };
    let mut e = GatewayError::new(ErrorKind::RateLimited, message).with_code(code);
    e.source = switchyard_llm::Source::Policy;
    e.retry = switchyard_llm::Retry::Never;
    // `respond::error` writes `retry-after` from here; the other headers
    // travel with the refusal.
    e.retry_after = None;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_windows() {
        // 2026-11-29T11:00:00Z
        let now = 1_795_950_000_000u64;
        let (day, month, day_reset, month_reset) = calendar(now);
        assert_eq!(civil_from_days(day), (2026, 11, 29));
        assert_eq!(month, 2026 * 12 + 10);
        assert_eq!(day_reset, 13 * 3_600_000);
        assert_eq!(month_reset, day_reset + DAY_MS);
        assert_eq!(days_from_civil(2026, 11, 29), day);
    }

    /// 30 requests in the last second of a minute and 30 more in the first
    /// second of the next: fixed windows admitted all 60 within 2 s. The
    /// sliding minute admits one more (the previous minute's weight is
    /// 59/60 of 30 = 29), says when the next fits, and it does then.
    #[test]
    fn a_burst_across_a_minute_boundary_cannot_reach_twice_the_rpm() {
        let local = LocalCounters::default();
        let limits = LimitSet {
            rpm: Some(30),
            ..LimitSet::default()
        };
        let boundary = (1_795_950_000_000u64 / MINUTE_MS + 1) * MINUTE_MS;
        let try_at = |at: u64| local.acquire("t", &checks_at("t:t", &limits, at), at);
        let late = (0..30)
            .filter(|_| matches!(try_at(boundary - 1000), Decision::Admitted { .. }))
            .count();
        assert_eq!(late, 30);
        let mut early = 0;
        let mut retry = None;
        for _ in 0..30 {
            match try_at(boundary + 1000) {
                Decision::Admitted { after } => {
                    early += 1;
                    assert_eq!(after, vec![30], "the sliding count");
                }
                Decision::Refused { retry_ms, used, .. } => {
                    assert_eq!(used, 30);
                    retry = Some(retry_ms);
                }
            }
        }
        assert_eq!(early, 1, "{late} + {early} requests within 2 s at rpm 30");
        let retry = retry.expect("refused");
        assert_eq!(
            retry, 1000,
            "until one more request of the previous minute slid out"
        );
        assert!(
            matches!(
                try_at(boundary + 1000 + retry - 1),
                Decision::Refused { .. }
            ),
            "not a millisecond earlier"
        );
        assert!(matches!(
            try_at(boundary + 1000 + retry),
            Decision::Admitted { .. }
        ));
        assert!(matches!(
            try_at(boundary + 1000 + retry),
            Decision::Refused { .. }
        ));
    }

    #[test]
    fn reset_text_is_openai_shaped() {
        assert_eq!(reset_text(20), "20ms");
        assert_eq!(reset_text(16_200), "17s");
        assert_eq!(reset_text(360_000), "6m0s");
    }

    fn tenant() -> Tenant {
        Tenant {
            id: "t".into(),
            rpm: Some(2),
            tpm: Some(100),
            concurrency: Some(5),
            ..Tenant::default()
        }
    }

    #[tokio::test]
    async fn local_limits_refuse_then_settle_corrects_tokens() {
        let l = Arc::new(Limiter::local());
        let snap = Snapshot::default();
        let t = tenant();
        let (ticket, h) = l.admit(&snap, &t, None, 10).await.unwrap();
        assert!(
            h.contains(&(
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                "1".into()
            )),
            "{h:?}"
        );
        assert!(
            h.contains(&(
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                "90".into()
            )),
            "{h:?}"
        );
        // The real usage was 50 tokens: the minute's counter says so.
        l.settle(
            ticket.unwrap(),
            Some(Usage {
                prompt_tokens: 20,
                completion_tokens: 30,
                cached_tokens: 0,
                reasoning_tokens: 0,
            }),
            0.0,
        );
        let minute = now_ms() / MINUTE_MS;
        assert_eq!(l.local_value("t", &format!("t:t:tpm:{minute}")), 50);
        // 50 + 60 > 100: refused on tokens though one request is left.
        let (e, h) = l.admit(&snap, &t, None, 60).await.unwrap_err();
        assert_eq!((e.status(), e.code), (429, Some("rate_limit_exceeded")));
        assert!(h.iter().any(|(k, _)| *k == "retry-after"), "{h:?}");
        assert!(
            h.contains(&(
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                "100".into()
            )),
            "{h:?}"
        );
        l.admit(&snap, &t, None, 1).await.unwrap();
        let (e, _) = l.admit(&snap, &t, None, 1).await.unwrap_err();
        assert!(e.message.contains("2 requests per minute"), "{e}");
    }

    #[tokio::test]
    async fn budgets_refuse_once_spent_and_warn_before() {
        let l = Arc::new(Limiter::local());
        let snap = Snapshot::default();
        let t = Tenant {
            id: "b".into(),
            daily_budget_usd: Some(0.01),
            budget_warn_ratio: Some(0.5),
            ..Tenant::default()
        };
        let (ticket, h) = l.admit(&snap, &t, None, 1).await.unwrap();
        assert!(h.is_empty(), "{h:?}");
        l.settle(ticket.unwrap(), None, 0.006);
        let (ticket, h) = l.admit(&snap, &t, None, 1).await.unwrap();
        assert!(
            h.iter()
                .any(|(k, v)| *k == "x-switchyard-budget-warning" && v.contains("60%")),
            "{h:?}"
        );
        let used = |l: &Limiter| l.budget_used.with_label_values(&["b", "day"]).get();
        assert!((used(&l) - 0.6).abs() < 1e-9, "{}", used(&l));
        l.settle(ticket.unwrap(), None, 0.006);
        let (e, _) = l.admit(&snap, &t, None, 1).await.unwrap_err();
        assert_eq!((e.status(), e.code), (429, Some("insufficient_quota")));
        assert!(used(&l) >= 1.0, "spent: {}", used(&l));
    }

    #[tokio::test]
    async fn the_fleets_spend_counts_against_local_budgets() {
        let l = Limiter::local();
        let t = Tenant {
            id: "f".into(),
            daily_budget_usd: Some(1.0),
            monthly_budget_usd: Some(10.0),
            ..Tenant::default()
        };
        let (day, month, ..) = calendar(now_ms());
        let mut b = Snapshot::builder();
        b.tenants.insert_keyless(t.clone());
        b.tenants.set_spend(
            "f",
            Spend {
                day_usd: 0.4,
                month_usd: 9.0,
                day,
                month,
            },
        );
        let snap = b.build();
        l.admit(&snap, &t, None, 1).await.unwrap();
        // The gauge counts the fleet's spend, not only this edge's.
        let month_used = l.budget_used.with_label_values(&["f", "month"]).get();
        assert!((month_used - 0.9).abs() < 1e-3, "{month_used}");
        // The other edges spent the whole day's budget.
        let mut b = snap.into_builder();
        b.tenants.set_spend(
            "f",
            Spend {
                day_usd: 1.0,
                month_usd: 9.6,
                day,
                month,
            },
        );
        let (e, _) = l.admit(&b.build(), &t, None, 1).await.unwrap_err();
        assert_eq!(e.code, Some("insufficient_quota"));
        assert!(e.message.contains("daily"), "{e}");
    }

    #[tokio::test]
    async fn a_virtual_keys_own_limit_refuses_before_its_tenants() {
        let l = Limiter::local();
        let snap = Snapshot::default();
        let t = Tenant {
            id: "k".into(),
            rpm: Some(100),
            ..Tenant::default()
        };
        let key = VirtualKey {
            id: "ci".into(),
            tenant: "k".into(),
            limits: LimitSet {
                rpm: Some(1),
                ..LimitSet::default()
            },
            ..VirtualKey::default()
        };
        let (_, h) = l.admit(&snap, &t, Some(&key), 1).await.unwrap();
        // The tightest counter is reported: the key's.
        assert!(
            h.contains(&(
                HeaderName::from_static("x-ratelimit-limit-requests"),
                "1".into()
            )),
            "{h:?}"
        );
        let (e, _) = l.admit(&snap, &t, Some(&key), 1).await.unwrap_err();
        assert!(e.message.contains("key ci"), "{e}");
        // The tenant's other keys (or its policy key) are not held by it.
        l.admit(&snap, &t, None, 1).await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_splits_local_limits() {
        let l = Limiter::local();
        let snap = Snapshot::default();
        let t = Tenant {
            id: "s".into(),
            rpm: Some(10),
            limit_share: Some(0.3),
            ..Tenant::default()
        };
        let mut admitted = 0;
        for _ in 0..10 {
            if l.admit(&snap, &t, None, 1).await.is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
    }
}
