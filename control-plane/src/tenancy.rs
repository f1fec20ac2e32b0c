//! Tenant state the control plane pushes besides policy: virtual keys
//! (`ctl vkeys`), fleet-wide spend from the usage ledger, and each edge's
//! lease of every tenant limit.
//!
//! None of it is a policy version: it changes with traffic and operator
//! key operations, so it travels like the latency scores, as a refresh of
//! the current version (a new `scores_generation`) that nodes swap in
//! without an ACK. A revocation or a new key wakes the refresher at once,
//! so it reaches every connected edge within one push.
//!
//! **Leases.** Without shared counters (Redis) each edge enforces a share
//! of every limit. The shares of one tenant across the connected edges sum
//! to at most 1: a floor of [`FLOOR`]/n each, the rest in proportion to the
//! requests each edge recorded recently (its ledger records, decayed by
//! half every refresh). With n edges a limit L admits at most
//! L + n (each edge rounds its share up to a whole request) per window,
//! plus what shares moved while a window was running: an edge whose share
//! grows mid-minute may admit up to its new share even if the one that
//! shrank had used its old one. Shares are quantised to 1/100 and move
//! at most once per refresh.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::{KeyHash, Snapshot};
use tokio::sync::{watch, Notify};

use crate::pb;
use crate::server::{ControlError, ControlPlane};
use crate::store::{now_ms, UsageGroup, VirtualKeyRow};

/// Part of each limit split evenly between the connected edges, so an edge
/// that has been idle can still admit its first requests.
pub const FLOOR: f64 = 0.2;
const QUANTUM: f64 = 0.01;
pub(crate) const DAY_MS: i64 = 86_400_000;
/// How often the fleet's spend is summed from the ledger.
const SPEND_EVERY: Duration = Duration::from_secs(2);

/// What every node gets besides the policy; edges also get their leases.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantState {
    pub virtual_keys: Vec<pb::VirtualKeyMsg>,
    pub spend: HashMap<String, pb::SpendMsg>,
    /// Edge node id → tenant id → its share of the tenant's limits.
    pub leases: HashMap<String, HashMap<String, f64>>,
}

/// The control plane's live tenant bookkeeping.
pub struct Tenancy {
    pub(crate) state: watch::Sender<(u64, Arc<TenantState>)>,
    /// Wakes the refresher (a key created or revoked, an edge came or went).
    pub(crate) wake: Notify,
    /// Connected edges.
    pub(crate) edges: parking_lot_free::Mutex<BTreeSet<String>>,
    /// Edge → tenant → recent requests (decayed every refresh).
    pub(crate) demand: parking_lot_free::Mutex<HashMap<String, HashMap<String, f64>>>,
    /// The last spend figures and when they were summed.
    pub(crate) spend_at: parking_lot_free::Mutex<Option<(std::time::Instant, SpendMap)>>,
}

type SpendMap = HashMap<String, pb::SpendMsg>;

/// `std::sync::Mutex` without poisoning noise: every critical section here
/// is a few map operations that cannot panic half-way.
mod parking_lot_free {
    pub struct Mutex<T>(std::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Mutex(std::sync::Mutex::new(v))
        }

        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

impl Default for Tenancy {
    fn default() -> Self {
        Tenancy {
            state: watch::channel((0, Arc::new(TenantState::default()))).0,
            wake: Notify::new(),
            edges: parking_lot_free::Mutex::new(BTreeSet::new()),
            demand: parking_lot_free::Mutex::new(HashMap::new()),
            spend_at: parking_lot_free::Mutex::new(None),
        }
    }
}

impl Tenancy {
    pub fn edge_connected(&self, id: &str) {
        self.edges.lock().insert(id.to_string());
        self.wake.notify_one();
    }

    pub fn edge_disconnected(&self, id: &str) {
        self.edges.lock().remove(id);
        self.demand.lock().remove(id);
        self.wake.notify_one();
    }

    /// Counts an edge's shipped ledger records as demand for its leases.
    pub fn observe(&self, node: &str, records: &[pb::UsageRecordMsg]) {
        let mut demand = self.demand.lock();
        let per_tenant = demand.entry(node.to_string()).or_default();
        for r in records {
            *per_tenant.entry(r.tenant.clone()).or_default() += 1.0;
        }
    }

    /// The current state and its generation.
    pub fn current(&self) -> (u64, Arc<TenantState>) {
        self.state.borrow().clone()
    }

    fn leases(&self, snapshot: Option<&Snapshot>) -> HashMap<String, HashMap<String, f64>> {
        let edges: Vec<String> = self.edges.lock().iter().cloned().collect();
        let mut out: HashMap<String, HashMap<String, f64>> = HashMap::new();
        let Some(snapshot) = snapshot else {
            return out;
        };
        if edges.len() < 2 {
            return out;
        }
        let mut demand = self.demand.lock();
        let n = edges.len() as f64;
        for tenant in snapshot.tenants().iter() {
            if tenant.limit_set().is_empty() {
                continue;
            }
            let d: Vec<f64> = edges
                .iter()
                .map(|e| {
                    demand
                        .get(e)
                        .and_then(|m| m.get(&tenant.id))
                        .copied()
                        .unwrap_or(0.0)
                })
                .collect();
            let total: f64 = d.iter().sum();
            for (edge, d) in edges.iter().zip(d) {
                let raw = if total > 0.0 {
                    FLOOR / n + (1.0 - FLOOR) * d / total
                } else {
                    1.0 / n
                };
                // Rounded down, so the shares never sum past 1.
                let share = ((raw / QUANTUM).floor() * QUANTUM).max(QUANTUM);
                out.entry(edge.clone())
                    .or_default()
                    .insert(tenant.id.clone(), share);
            }
        }
        for per_tenant in demand.values_mut() {
            for v in per_tenant.values_mut() {
                *v /= 2.0;
            }
            per_tenant.retain(|_, v| *v > 0.01);
        }
        out
    }
}

/// Builds the tenant state from the store and the edges' demand and
/// publishes it when it changed.
pub(crate) async fn refresh(cp: &ControlPlane) -> Result<(), ControlError> {
    let now = now_ms();
    let keys = cp.store().virtual_keys(None).await?;
    let mut virtual_keys: Vec<pb::VirtualKeyMsg> = keys
        .iter()
        .filter(|k| k.revoked_at_ms == 0)
        .filter_map(|k| {
            let hash = KeyHash::from_hex(&k.key_sha256)?;
            Some(pb::VirtualKeyMsg {
                id: k.id.clone(),
                key_sha256: hash.0.to_vec(),
                tenant: k.tenant.clone(),
                allowed_models: (!k.models.is_empty()).then(|| pb::AllowedModels {
                    models: k.models.clone(),
                }),
                rpm: k.rpm,
                tpm: k.tpm,
                concurrency: k.concurrency,
                daily_budget_usd: k.daily_usd,
                monthly_budget_usd: k.monthly_usd,
                expires_at_ms: k.expires_at_ms,
            })
        })
        .collect();
    virtual_keys.sort_by(|a, b| a.id.cmp(&b.id));
    let day = now.div_euclid(DAY_MS);
    let (month, month_start) = month_of(day);
    // Summing the month's ledger is the expensive part: it runs at most
    // every SPEND_EVERY, keys and leases every time.
    let stale = cp
        .tenancy()
        .spend_at
        .lock()
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() >= SPEND_EVERY);
    let spend = if stale {
        let spend: HashMap<String, pb::SpendMsg> = cp
            .store()
            .spend(day * DAY_MS, month_start * DAY_MS)
            .await?
            .into_iter()
            .map(|s| {
                (
                    s.scope,
                    pb::SpendMsg {
                        day_usd: s.day_usd,
                        month_usd: s.month_usd,
                        day,
                        month,
                    },
                )
            })
            .collect();
        *cp.tenancy().spend_at.lock() = Some((std::time::Instant::now(), spend.clone()));
        spend
    } else {
        cp.tenancy()
            .spend_at
            .lock()
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let published = cp.current();
    let leases = cp.tenancy().leases(published.as_ref().map(|p| &p.snapshot));
    let next = TenantState {
        virtual_keys,
        spend,
        leases,
    };
    cp.tenancy().state.send_if_modified(|(generation, old)| {
        if **old == next {
            return false;
        }
        *generation += 1;
        *old = Arc::new(next);
        true
    });
    Ok(())
}

/// Keeps the tenant state fresh: every `every`, and at once when woken.
pub(crate) async fn refresh_loop(
    cp: Arc<ControlPlane>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = refresh(&cp).await {
            tracing::warn!(error = %e, "cannot refresh tenant state");
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
            _ = cp.tenancy().wake.notified() => {}
        }
    }
}

/// (`year * 12 + month - 1`, first day of that month) for a day number.
pub(crate) fn month_of(day: i64) -> (i64, i64) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y * 12 + (m - 1), day - (d - 1))
}

/// Fills a tailored message with the tenant state; `edge` gets its leases.
pub fn tailor_tenants(msg: &mut pb::SnapshotMsg, state: &TenantState, edge: Option<&str>) {
    msg.virtual_keys = state.virtual_keys.clone();
    msg.spend = state.spend.clone();
    if let Some(leases) = edge.and_then(|e| state.leases.get(e)) {
        for t in &mut msg.tenants {
            if let Some(share) = leases.get(&t.id) {
                t.limit_share = *share;
            }
        }
    }
}

impl ControlPlane {
    /// Issues a virtual key for a tenant of the current policy. The key is
    /// returned once; only its SHA-256 is stored.
    pub async fn create_virtual_key(
        &self,
        r: pb::CreateVirtualKeyRequest,
        author: &str,
    ) -> Result<pb::CreateVirtualKeyResponse, ControlError> {
        let invalid = |path: &str, message: String| {
            ControlError::Invalid(vec![crate::policy::PolicyError {
                path: path.to_string(),
                message,
            }])
        };
        let current = self.current().ok_or(ControlError::NoPolicy)?;
        if current.snapshot.tenant(&r.tenant).is_none() {
            return Err(invalid(
                "tenant",
                format!(
                    "no tenant {:?} in policy version {}",
                    r.tenant, current.version
                ),
            ));
        }
        for (field, v) in [("daily_usd", r.daily_usd), ("monthly_usd", r.monthly_usd)] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(field, "must be a non-negative number".into()));
            }
        }
        if r.expires_at_ms != 0 && r.expires_at_ms <= now_ms() {
            return Err(invalid("expires", "must be in the future".into()));
        }
        let mut bytes = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| invalid("", "no randomness available".into()))?;
        let secret = format!("sy-{}", hex::encode(bytes));
        let hash = KeyHash::of(&secret).to_hex();
        let id = if r.id.is_empty() {
            format!("vk_{}", &hex::encode(&bytes[..6]))
        } else {
            if !r
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || r.id.len() > 64
            {
                return Err(invalid(
                    "id",
                    "letters, digits, - and _ only, at most 64".into(),
                ));
            }
            r.id.clone()
        };
        let row = VirtualKeyRow {
            id,
            tenant: r.tenant,
            key_sha256: hash,
            models: r.models,
            rpm: r.rpm,
            tpm: r.tpm,
            concurrency: r.concurrency,
            daily_usd: r.daily_usd,
            monthly_usd: r.monthly_usd,
            expires_at_ms: r.expires_at_ms,
            created_at_ms: now_ms(),
            created_by: author.to_string(),
            revoked_at_ms: 0,
        };
        if let Err(e) = self.store().insert_virtual_key(&row).await {
            return Err(match e {
                crate::store::StoreError::Sql(sqlx::Error::Database(d))
                    if d.is_unique_violation() =>
                {
                    invalid("id", format!("a key named {:?} exists", row.id))
                }
                e => e.into(),
            });
        }
        tracing::info!(key = %row.id, tenant = %row.tenant, author, "virtual key created");
        refresh(self).await?;
        Ok(pb::CreateVirtualKeyResponse {
            key: Some(info(&row)),
            secret,
        })
    }

    pub async fn list_virtual_keys(
        &self,
        tenant: &str,
    ) -> Result<pb::ListVirtualKeysResponse, ControlError> {
        let tenant = (!tenant.is_empty()).then_some(tenant);
        Ok(pb::ListVirtualKeysResponse {
            keys: self
                .store()
                .virtual_keys(tenant)
                .await?
                .iter()
                .map(info)
                .collect(),
        })
    }

    /// Revokes a key and pushes the change to every node before returning.
    pub async fn revoke_virtual_key(&self, id: &str, author: &str) -> Result<bool, ControlError> {
        let revoked = self.store().revoke_virtual_key(id).await?;
        if revoked {
            tracing::info!(key = %id, author, "virtual key revoked");
            refresh(self).await?;
        }
        Ok(revoked)
    }

    pub async fn query_usage(
        &self,
        r: &pb::QueryUsageRequest,
    ) -> Result<pb::QueryUsageResponse, ControlError> {
        let group = UsageGroup::parse(if r.group_by.is_empty() {
            "model"
        } else {
            &r.group_by
        })
        .ok_or_else(|| {
            ControlError::Invalid(vec![crate::policy::PolicyError {
                path: "group_by".into(),
                message: "one of model, provider, key, day, tenant, egress, key_pool".into(),
            }])
        })?;
        let tenant = (!r.tenant.is_empty()).then_some(r.tenant.as_str());
        let rows = self.store().usage(tenant, r.since_ms, group).await?;
        Ok(pb::QueryUsageResponse {
            rows: rows
                .into_iter()
                .map(|u| pb::UsageRowMsg {
                    group: u.group,
                    requests: u.requests,
                    errors: u.errors,
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cached_tokens: u.cached_tokens,
                    cost_usd: u.cost_usd,
                    cache_hits: u.cache_hits,
                    reasoning_tokens: u.reasoning_tokens,
                })
                .collect(),
        })
    }
}

/// `7d`, `24h`, `30m`, `45s` before `now_ms`, or an absolute time in Unix
/// milliseconds.
pub fn parse_since(text: &str, now_ms: i64) -> Option<i64> {
    let text = text.trim();
    let unit = |c: char| match c {
        'd' => Some(DAY_MS),
        'h' => Some(3_600_000),
        'm' => Some(60_000),
        's' => Some(1000),
        _ => None,
    };
    match text.chars().last().and_then(unit) {
        Some(ms) => {
            let n: i64 = text[..text.len() - 1].parse().ok()?;
            (n >= 0).then(|| now_ms - n.saturating_mul(ms))
        }
        None => text.parse().ok().filter(|v: &i64| *v >= 0),
    }
}

/// `30d`, `12h`, `45m`, `90s` from `now_ms`, or Unix milliseconds.
pub fn parse_expiry(text: &str, now_ms: i64) -> Option<i64> {
    let past = parse_since(text, 0)?;
    let relative = text.trim().ends_with(['d', 'h', 'm', 's']);
    Some(if relative { now_ms - past } else { past })
}

/// The rows as CSV, with a header line.
pub fn usage_csv(rows: &[pb::UsageRowMsg], group_by: &str) -> String {
    let mut out = format!(
        "{group_by},requests,errors,input_tokens,output_tokens,cached_tokens,cost_usd,cache_hits,reasoning_tokens\n"
    );
    for r in rows {
        // Group values come from model/provider/key names; quote any that
        // could break a CSV cell.
        let g = if r.group.contains([',', '"', '\n']) {
            format!("\"{}\"", r.group.replace('"', "\"\""))
        } else {
            r.group.clone()
        };
        out.push_str(&format!(
            "{g},{},{},{},{},{},{:.6},{},{}\n",
            r.requests,
            r.errors,
            r.input_tokens,
            r.output_tokens,
            r.cached_tokens,
            r.cost_usd,
            r.cache_hits,
            r.reasoning_tokens
        ));
    }
    out
}

fn info(k: &VirtualKeyRow) -> pb::VirtualKeyInfo {
    pb::VirtualKeyInfo {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        models: k.models.clone(),
        rpm: k.rpm,
        tpm: k.tpm,
        concurrency: k.concurrency,
        daily_usd: k.daily_usd,
        monthly_usd: k.monthly_usd,
        expires_at_ms: k.expires_at_ms,
        created_at_ms: k.created_at_ms,
        created_by: k.created_by.clone(),
        revoked_at_ms: k.revoked_at_ms,
        hash_prefix: k.key_sha256.chars().take(12).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_relative_and_absolute_times() {
        assert_eq!(parse_since("7d", 10 * DAY_MS), Some(3 * DAY_MS));
        assert_eq!(parse_since("2h", 7_200_000), Some(0));
        assert_eq!(parse_since("1234", 0), Some(1234));
        assert_eq!(parse_since("x", 0), None);
        assert_eq!(parse_since("-1d", 0), None);
    }

    #[test]
    fn month_of_days() {
        // 2026-11-29 is day 20_786.
        let (month, start) = month_of(20_786);
        assert_eq!(month, 2026 * 12 + 10);
        assert_eq!(start, 20_786 - 28);
        assert_eq!(crate::store::day_name(start), "2026-11-01");
    }
}
