//! Route planning: what a requested model name leads to, in order, inside
//! the request's jurisdictions. [`plan`] reads `(&Snapshot, &Health)`: the
//! snapshot gives the policy's order (precompiled per tenant jurisdiction
//! set where it can), the runtime health board moves targets that fail
//! lately behind the others. Pure and allocation-light enough for the
//! request path.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::health::{self, Availability, Health};
use crate::{
    PlanTables, ProviderSnapshot, RouteSnapshot, RouteTarget, ScoreKey, Snapshot, Strategy,
};

/// A route plan: its targets, best first. Shared, so handing a compiled
/// plan to a request is a reference count, not a copy.
pub type Plan = Arc<[PlannedTarget]>;

/// One step of a route plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTarget {
    pub target: RouteTarget,
    /// Region whose egress calls the provider; `None` = any egress.
    pub region: Option<String>,
    pub jurisdiction: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// Not an alias, route or `provider/model` of a known provider.
    UnknownModel(String),
    /// Every target lies outside the request's jurisdictions; the request
    /// must be refused with a residency error, never sent elsewhere.
    Residency {
        model: String,
        allowed: Vec<String>,
        blocked: Vec<PlannedTarget>,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::UnknownModel(m) => write!(f, "unknown model {m:?}"),
            PlanError::Residency { model, allowed, .. } => write!(
                f,
                "residency: no target for {model:?} inside jurisdiction(s) {}",
                allowed.join(", ")
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// The jurisdictions a request may use: the tenant's, narrowed (never
/// widened) by the comma-separated `x-switchyard-residency` header.
/// `None` = unrestricted. An empty list means nothing is allowed.
pub fn narrow_residency(tenant: Option<&[String]>, header: Option<&str>) -> Option<Vec<String>> {
    let asked: Option<Vec<String>> = header.map(|h| {
        h.split(',')
            .map(|j| j.trim().to_ascii_lowercase())
            .filter(|j| !j.is_empty())
            .collect()
    });
    match (tenant, asked) {
        (None, None) => None,
        (Some(t), None) => Some(t.to_vec()),
        (None, Some(a)) => Some(a),
        (Some(t), Some(a)) => Some(a.into_iter().filter(|j| t.contains(j)).collect()),
    }
}

/// Order-insensitive key of a jurisdiction set.
fn jurisdiction_key(set: &[String]) -> Vec<String> {
    let mut key = set.to_vec();
    key.sort();
    key.dedup();
    key
}

/// Every target `requested` may go to, best first, for one request: the
/// snapshot's order ([`static_plan`]) as runtime health amends it:
/// - targets whose breaker is open (ejected) are left out, unless every
///   target is: then the plan is kept whole, so the caller can still tell
///   a cut-off model (dispatch answers `circuit_open` with when it is
///   probed again) from an unknown one;
/// - targets due for a half-open probe keep their place, so real traffic
///   probes them;
/// - targets failing lately (local error rate) move behind the healthy
///   ones;
/// - a target whose fleet-wide error rate (pushed by the control plane in
///   the scores) is over the breaker's threshold while this node has seen
///   no success of its own to contradict it has this node's breaker
///   opened: ejected, then probed back like a target failing locally.
///
/// Residency is decided before: health only orders and removes, it never
/// adds a target. This is the one planning entry point of the data plane.
pub fn plan(
    snapshot: &Snapshot,
    health: &Health,
    requested: &str,
    jurisdictions: Option<&[String]>,
) -> Result<Plan, PlanError> {
    let targets = static_plan(snapshot, requested, jurisdictions)?;
    let now = Instant::now();
    let targets = apply_strategy(snapshot, health, requested, targets);
    Ok(apply_health(snapshot, targets, health, now))
}

/// Share of requests on a `latency` route that go first to a target with
/// no latency data yet, so a new or recovered target gets measured.
pub const EXPLORE: f64 = 0.1;
/// Local samples a target needs before its own latency is trusted over
/// the fleet's.
const LOCAL_MIN_SAMPLES: u64 = 3;

/// Orders the requested route's own targets (the plan's leading ones; its
/// fallbacks keep their place after them) per request, for the strategies
/// that decide per request:
/// - `weighted`: a random order drawn by weight (Efraimidis–Spirakis), so
///   traffic splits by weight instead of always hitting the heaviest;
/// - `least_busy`: fewest attempts in flight from this node first;
/// - `latency`: power of two choices — two targets drawn at random, the
///   one with the lower p95 first-token time scaled by its error rate
///   goes first (this node's own p95 estimate, never below its moving
///   average, once it has a few samples, else the fleet's scores); with
///   probability [`EXPLORE`] a
///   target without any data goes first instead.
///
/// Other strategies are compiled into the snapshot's order already.
fn apply_strategy(snapshot: &Snapshot, health: &Health, requested: &str, targets: Plan) -> Plan {
    let Some(route) = snapshot.route(requested) else {
        return targets;
    };
    if !matches!(
        route.strategy,
        Strategy::Weighted | Strategy::LeastBusy | Strategy::Latency
    ) {
        return targets;
    }
    let own = targets
        .iter()
        .take_while(|t| {
            route
                .targets
                .iter()
                .any(|w| w.provider == t.target.provider && w.model == t.target.model)
        })
        .count();
    if own < 2 {
        return targets;
    }
    let entry = |t: &PlannedTarget| {
        health.peek_target(&health::target_id(
            &t.target.provider,
            &t.target.model,
            t.region.as_deref(),
        ))
    };
    let mut head: Vec<PlannedTarget> = targets[..own].to_vec();
    match route.strategy {
        Strategy::Weighted => {
            let weight = |t: &PlannedTarget| {
                route
                    .targets
                    .iter()
                    .find(|w| w.provider == t.target.provider && w.model == t.target.model)
                    .map_or(1.0, |w| f64::from(w.weight.max(1)))
            };
            let mut keyed: Vec<(f64, PlannedTarget)> = head
                .into_iter()
                .map(|t| (fastrand::f64().powf(1.0 / weight(&t)), t))
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            head = keyed.into_iter().map(|(_, t)| t).collect();
        }
        Strategy::LeastBusy => {
            head.sort_by_key(|t| entry(t).map_or(0, |e| e.in_flight()));
        }
        Strategy::Latency => {
            let score = |t: &PlannedTarget| -> Option<f64> {
                if let Some(e) = entry(t).filter(|e| e.successes() >= LOCAL_MIN_SAMPLES) {
                    // The tail decides what callers feel: the p95 estimate,
                    // with the average as a floor while the estimate settles.
                    let ewma = e.latency()?;
                    let tail = e.latency_p95().map_or(ewma, |p95| p95.max(ewma));
                    let ms = tail.as_secs_f64() * 1000.0;
                    return Some(ms * (1.0 + 4.0 * e.error_rate()));
                }
                snapshot
                    .scores()
                    .targets
                    .get(&ScoreKey {
                        provider: t.target.provider.clone(),
                        model: t.target.model.clone(),
                        region: t.region.clone().unwrap_or_default(),
                    })
                    .filter(|s| s.requests > 0)
                    .map(|s| s.ttft_p95_ms * (1.0 + 4.0 * s.error_rate))
            };
            let scored: Vec<(Option<f64>, PlannedTarget)> =
                head.into_iter().map(|t| (score(&t), t)).collect();
            let unknown: Vec<usize> = (0..scored.len())
                .filter(|i| scored[*i].0.is_none())
                .collect();
            let known: Vec<usize> = (0..scored.len())
                .filter(|i| scored[*i].0.is_some())
                .collect();
            let first = if !unknown.is_empty() && (known.is_empty() || fastrand::f64() < EXPLORE) {
                Some(unknown[fastrand::usize(..unknown.len())])
            } else if known.len() >= 2 {
                let a = fastrand::usize(..known.len());
                let mut b = fastrand::usize(..known.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (known[a], known[b]);
                Some(if scored[a].0 <= scored[b].0 { a } else { b })
            } else {
                known.first().copied()
            };
            let mut rest: Vec<usize> = (0..scored.len()).filter(|i| Some(*i) != first).collect();
            rest.sort_by(|a, b| {
                let key = |i: &usize| scored[*i].0.unwrap_or(f64::INFINITY);
                key(a).total_cmp(&key(b))
            });
            let mut slots: Vec<Option<PlannedTarget>> =
                scored.into_iter().map(|(_, t)| Some(t)).collect();
            head = first
                .into_iter()
                .chain(rest)
                .filter_map(|i| slots[i].take())
                .collect();
        }
        Strategy::Priority | Strategy::Cost => {}
    }
    if head[..] == targets[..own] {
        return targets;
    }
    head.extend(targets[own..].iter().cloned());
    head.into()
}

/// A fleet-wide error rate at or above this (over at least
/// [`FLEET_MIN_REQUESTS`] requests) ejects a target on every node that
/// has not seen it succeed lately: the breaker's own error-rate threshold.
pub const FLEET_ERROR_RATE: f64 = health::EJECT_ERROR_RATE;
pub const FLEET_MIN_REQUESTS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    Healthy,
    Degraded,
    Ejected,
}

fn standing(snapshot: &Snapshot, health: &Health, t: &PlannedTarget, now: Instant) -> Standing {
    let id = health::target_id(&t.target.provider, &t.target.model, t.region.as_deref());
    let local = health.peek_target(&id);
    if let Some(e) = &local {
        match health.availability(e, now) {
            Availability::Ejected => return Standing::Ejected,
            Availability::Probe => return Standing::Healthy,
            Availability::Closed => {}
        }
        if health.is_degraded(e) {
            return Standing::Degraded;
        }
    }
    let fleet_failing = !snapshot.scores().targets.is_empty()
        && snapshot
            .scores()
            .targets
            .get(&ScoreKey {
                provider: t.target.provider.clone(),
                model: t.target.model.clone(),
                region: t.region.clone().unwrap_or_default(),
            })
            .is_some_and(|s| s.requests >= FLEET_MIN_REQUESTS && s.error_rate >= FLEET_ERROR_RATE);
    let locally_fine = local.as_ref().is_some_and(|e| health.window(e, now).0 > 0);
    if fleet_failing && !locally_fine {
        // Over the breaker's own threshold fleet-wide: eject it here too,
        // through this node's breaker, so it is probed back like a target
        // that failed locally. Past the board's cap it can only be demoted.
        return match health.target(&id) {
            Some(e) => {
                if let Some(tr) = health.eject_by_fleet(&e, now) {
                    tracing::warn!(
                        target: "switchyard::breaker",
                        event = "breaker",
                        scope = "fleet",
                        provider = %t.target.provider,
                        model = %t.target.model,
                        region = t.region.as_deref().unwrap_or(""),
                        state = tr.label(),
                        "the fleet's error rate ejected the target"
                    );
                }
                Standing::Ejected
            }
            None => Standing::Degraded,
        };
    }
    Standing::Healthy
}

/// Stable partition by standing; ejected targets are dropped unless none
/// would be left. The snapshot's plan is shared as is when nothing moves.
fn apply_health(snapshot: &Snapshot, targets: Plan, health: &Health, now: Instant) -> Plan {
    if targets.is_empty() || (!health.has_targets() && snapshot.scores().targets.is_empty()) {
        return targets;
    }
    let standings: Vec<Standing> = targets
        .iter()
        .map(|t| standing(snapshot, health, t, now))
        .collect();
    if standings.iter().all(|s| *s == Standing::Healthy) {
        return targets;
    }
    let keep_ejected = standings.iter().all(|s| *s == Standing::Ejected);
    let pick = |want: Standing| {
        targets
            .iter()
            .zip(&standings)
            .filter(move |(_, s)| **s == want)
            .map(|(t, _)| t.clone())
    };
    let ordered = pick(Standing::Healthy).chain(pick(Standing::Degraded));
    if keep_ejected {
        ordered.chain(pick(Standing::Ejected)).collect()
    } else {
        ordered.collect()
    }
}

/// The snapshot's own order for `requested`, without runtime health: the
/// route's targets ordered by its strategy, then its fallbacks' (depth
/// first, each target once). `jurisdictions = None` means unrestricted;
/// otherwise a target is kept only when its provider's jurisdiction is
/// listed. Routes, aliases and advertised models are looked up in the
/// snapshot's precompiled [`PlanTables`]; only other `provider/model`
/// names and jurisdiction sets no tenant has are planned here.
pub fn static_plan(
    snapshot: &Snapshot,
    requested: &str,
    jurisdictions: Option<&[String]>,
) -> Result<Plan, PlanError> {
    let tables = snapshot.plan_tables();
    let compiled = match jurisdictions {
        None => tables.unrestricted.get(requested),
        Some(allowed) => tables
            .by_jurisdictions
            .get(&jurisdiction_key(allowed))
            .and_then(|table| table.get(requested)),
    };
    match compiled {
        // A reference count on the shared plan; only a refusal is copied.
        Some(compiled) => compiled.clone(),
        None => plan_uncached(snapshot, requested, jurisdictions),
    }
}

/// Every plan a request can look up: routes, aliases and advertised
/// `provider/model` names, unrestricted and for every tenant jurisdiction
/// set. [`crate::SnapshotBuilder::build`] calls it on the final parts, so
/// the tables never name a target the snapshot does not have.
pub(crate) fn compile_plan_tables(snapshot: &Snapshot) -> PlanTables {
    let mut sets: Vec<Vec<String>> = snapshot
        .tenants()
        .iter()
        .filter_map(|t| t.residency.as_deref().map(jurisdiction_key))
        .collect();
    sets.sort();
    sets.dedup();
    let mut names: Vec<String> = snapshot
        .routes()
        .keys()
        .chain(snapshot.aliases().keys())
        .cloned()
        .collect();
    for p in snapshot.providers().values() {
        names.extend(p.models.iter().map(|m| format!("{}/{m}", p.name)));
    }
    let table_for = |set: Option<&[String]>| {
        names
            .iter()
            .map(|name| (name.clone(), plan_uncached(snapshot, name, set)))
            .collect()
    };
    PlanTables {
        unrestricted: table_for(None),
        by_jurisdictions: sets
            .iter()
            .map(|set| (set.clone(), table_for(Some(set))))
            .collect(),
    }
}

impl Snapshot {
    /// [`static_plan`]: the snapshot's order without runtime health. The
    /// data plane uses [`plan`] instead.
    pub fn plan(
        &self,
        requested: &str,
        jurisdictions: Option<&[String]>,
    ) -> Result<Plan, PlanError> {
        static_plan(self, requested, jurisdictions)
    }
}

fn plan_uncached(
    snap: &Snapshot,
    requested: &str,
    jurisdictions: Option<&[String]>,
) -> Result<Plan, PlanError> {
    let mut all = Vec::new();
    if let Some(route) = snap.route(requested) {
        let mut seen_routes = HashSet::new();
        expand_route(snap, route, &mut seen_routes, &mut all);
    } else if let Some(t) = snap.resolve(requested) {
        all.push(planned(snap, t.provider, t.model));
    } else {
        return Err(PlanError::UnknownModel(requested.to_string()));
    }
    let mut seen = HashSet::new();
    all.retain(|t| seen.insert(t.target.clone()));
    let Some(allowed) = jurisdictions else {
        return Ok(all.into());
    };
    let (kept, blocked): (Vec<_>, Vec<_>) = all.into_iter().partition(|t| {
        t.jurisdiction
            .as_ref()
            .is_some_and(|j| allowed.iter().any(|a| a == j))
    });
    if kept.is_empty() {
        return Err(PlanError::Residency {
            model: requested.to_string(),
            allowed: allowed.to_vec(),
            blocked,
        });
    }
    Ok(kept.into())
}

fn planned(snap: &Snapshot, provider: String, model: String) -> PlannedTarget {
    let p: Option<&ProviderSnapshot> = snap.provider(&provider).map(|p| &**p);
    PlannedTarget {
        region: p.and_then(|p| p.region.clone()),
        jurisdiction: p.and_then(|p| p.jurisdiction.clone()),
        target: RouteTarget { provider, model },
    }
}

fn expand_route<'a>(
    snap: &'a Snapshot,
    route: &'a RouteSnapshot,
    seen_routes: &mut HashSet<&'a str>,
    out: &mut Vec<PlannedTarget>,
) {
    if !seen_routes.insert(route.name.as_str()) {
        return;
    }
    let mut targets: Vec<_> = route
        .targets
        .iter()
        .filter(|t| snap.providers().contains_key(&t.provider))
        .collect();
    match route.strategy {
        // Reordered per request from the health board (`plan`).
        Strategy::Priority | Strategy::LeastBusy => {}
        Strategy::Weighted => targets.sort_by_key(|t| std::cmp::Reverse(t.weight)),
        Strategy::Cost => targets.sort_by(|a, b| {
            let price = |t: &crate::WeightedTarget| {
                snap.provider(&t.provider)
                    .and_then(|p| p.pricing.get(&t.model))
                    .map(|p| p.input_per_million + p.output_per_million)
                    .unwrap_or(f64::INFINITY)
            };
            price(a).total_cmp(&price(b))
        }),
        Strategy::Latency => targets.sort_by(|a, b| {
            let ttft = |t: &crate::WeightedTarget| {
                let region = snap
                    .provider(&t.provider)
                    .and_then(|p| p.region.clone())
                    .unwrap_or_default();
                snap.scores()
                    .targets
                    .get(&ScoreKey {
                        provider: t.provider.clone(),
                        model: t.model.clone(),
                        region,
                    })
                    .filter(|s| s.requests > 0)
                    .map(|s| s.ttft_p95_ms * (1.0 + 4.0 * s.error_rate))
                    .unwrap_or(f64::INFINITY)
            };
            ttft(a).total_cmp(&ttft(b))
        }),
    }
    for t in targets {
        out.push(planned(snap, t.provider.clone(), t.model.clone()));
    }
    for f in &route.fallbacks {
        if let Some(next) = snap.route(f) {
            expand_route(snap, next, seen_routes, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::{ModelPrice, ProviderKind, Scores, TargetScore, WeightedTarget};

    fn provider(name: &str, region: &str, jurisdiction: &str) -> Arc<ProviderSnapshot> {
        Arc::new(ProviderSnapshot {
            name: name.into(),
            kind: ProviderKind::OpenAi,
            base_url: "http://x".into(),
            keys: vec![],
            models: vec![],
            simulated: None,
            region: Some(region.into()),
            jurisdiction: Some(jurisdiction.into()),
            pricing: HashMap::from([(
                "m".to_string(),
                ModelPrice {
                    input_per_million: if name == "us" { 1.0 } else { 5.0 },
                    output_per_million: 1.0,
                    cached_input_per_million: None,
                },
            )]),
            prefill: Default::default(),
            key_pools: vec![],
        })
    }

    fn snapshot(strategy: Strategy) -> Snapshot {
        builder(strategy).build()
    }

    fn builder(strategy: Strategy) -> crate::SnapshotBuilder {
        let mut s = Snapshot::builder();
        s.providers
            .insert("eu".into(), provider("eu", "eu-west", "eu"));
        s.providers
            .insert("us".into(), provider("us", "us-east", "us"));
        let t = |p: &str, w| WeightedTarget {
            provider: p.into(),
            model: "m".into(),
            weight: w,
        };
        s.routes.insert(
            "chat".into(),
            Arc::new(RouteSnapshot {
                name: "chat".into(),
                strategy,
                targets: vec![t("eu", 1), t("us", 9)],
                fallbacks: vec!["backup".into()],
                first_token_timeout: None,
                max_attempts: None,
                ..RouteSnapshot::default()
            }),
        );
        s.routes.insert(
            "backup".into(),
            Arc::new(RouteSnapshot {
                name: "backup".into(),
                strategy: Strategy::Priority,
                targets: vec![t("us", 1)],
                fallbacks: vec!["chat".into()],
                first_token_timeout: None,
                max_attempts: None,
                ..RouteSnapshot::default()
            }),
        );
        s.routes.insert(
            "us-only".into(),
            Arc::new(RouteSnapshot {
                name: "us-only".into(),
                strategy: Strategy::Priority,
                targets: vec![t("us", 1)],
                fallbacks: vec![],
                first_token_timeout: None,
                max_attempts: None,
                ..RouteSnapshot::default()
            }),
        );
        s
    }

    fn providers(plan: &[PlannedTarget]) -> Vec<&str> {
        plan.iter().map(|t| t.target.provider.as_str()).collect()
    }

    #[test]
    fn strategies_order_targets_and_fallbacks_follow() {
        let s = snapshot(Strategy::Priority);
        assert_eq!(providers(&s.plan("chat", None).unwrap()), ["eu", "us"]);
        assert_eq!(
            providers(&snapshot(Strategy::Cost).plan("chat", None).unwrap()),
            ["us", "eu"]
        );
        assert_eq!(
            providers(&snapshot(Strategy::Weighted).plan("chat", None).unwrap()),
            ["us", "eu"]
        );
        let s = snapshot(Strategy::Latency);
        let mut scores = Scores::default();
        for (p, region, ms) in [("eu", "eu-west", 300.0), ("us", "us-east", 100.0)] {
            scores.targets.insert(
                ScoreKey {
                    provider: p.into(),
                    model: "m".into(),
                    region: region.into(),
                },
                TargetScore {
                    requests: 10,
                    ttft_p95_ms: ms,
                    ..TargetScore::default()
                },
            );
        }
        let s = s.with_scores(Arc::new(scores));
        assert_eq!(providers(&s.plan("chat", None).unwrap()), ["us", "eu"]);
    }

    #[test]
    fn per_jurisdiction_tables_are_compiled_and_used() {
        let mut s = builder(Strategy::Priority);
        s.tenants.insert(
            crate::KeyHash::of("k"),
            crate::Tenant {
                id: "t".into(),
                residency: Some(vec!["eu".into()]),
                ..Default::default()
            },
        );
        let s = s.build();
        let eu = vec!["eu".to_string()];
        let table = &s.plan_tables().by_jurisdictions[&eu];
        assert_eq!(table.len(), 3, "every route compiled");
        assert_eq!(s.plan_tables().unrestricted.len(), 3);
        assert_eq!(table["chat"], plan_uncached(&s, "chat", Some(&eu)));
        assert!(matches!(table["us-only"], Err(PlanError::Residency { .. })));
        // A set no tenant has (e.g. narrowed by a header) is computed.
        let us = vec!["us".to_string()];
        assert_eq!(providers(&s.plan("chat", Some(&us)).unwrap()), ["us"]);
    }

    #[test]
    fn compiled_plans_are_shared_not_copied() {
        let mut s = builder(Strategy::Priority);
        s.tenants.insert(
            crate::KeyHash::of("k"),
            crate::Tenant {
                id: "t".into(),
                residency: Some(vec!["eu".into(), "us".into()]),
                ..Default::default()
            },
        );
        let s = s.build();
        // Written in another order than the table's key: the same set.
        let both = vec!["us".to_string(), "eu".to_string()];
        let first = s.plan("chat", Some(&both)).unwrap();
        assert!(Arc::ptr_eq(&first, &s.plan("chat", Some(&both)).unwrap()));
        let health = Health::new();
        let healthy = plan(&s, &health, "chat", Some(&both)).unwrap();
        assert!(Arc::ptr_eq(&first, &healthy), "nothing demoted: no copy");

        let eu = health
            .target(&health::target_id("eu", "m", Some("eu-west")))
            .unwrap();
        let now = std::time::Instant::now();
        degrade(&health, &eu, now);
        let demoted = plan(&s, &health, "chat", Some(&both)).unwrap();
        assert_eq!(providers(&demoted), ["us", "eu"]);
        assert_eq!(
            providers(&first),
            ["eu", "us"],
            "the shared plan is untouched"
        );
    }

    /// Fails often enough to be demoted (error rate), never enough in a
    /// row or in the window to be ejected.
    fn degrade(health: &Health, e: &crate::health::Entry, now: std::time::Instant) {
        use crate::health::Outcome;
        let ok = Outcome::Success {
            latency: std::time::Duration::from_millis(5),
        };
        for o in [
            Outcome::Failure,
            Outcome::Failure,
            Outcome::Failure,
            ok,
            Outcome::Failure,
            Outcome::Failure,
        ] {
            assert_eq!(health.record(e, o, now), None);
        }
        assert!(health.is_degraded(e) && !health.is_ejected(e));
    }

    #[test]
    fn health_demotes_failing_targets_keeping_order_and_residency() {
        let s = snapshot(Strategy::Priority);
        let health = Health::new();
        assert_eq!(
            providers(&plan(&s, &health, "chat", None).unwrap()),
            ["eu", "us"]
        );
        let now = std::time::Instant::now();
        let eu = health
            .target(&health::target_id("eu", "m", Some("eu-west")))
            .unwrap();
        // Too few attempts to judge: the order stays.
        for _ in 0..crate::health::DEMOTE_MIN_SAMPLES - 1 {
            health.record(&eu, crate::health::Outcome::Failure, now);
        }
        assert_eq!(
            providers(&plan(&s, &health, "chat", None).unwrap()),
            ["eu", "us"]
        );
        let ok = crate::health::Outcome::Success {
            latency: std::time::Duration::from_millis(5),
        };
        health.record(&eu, ok, now);
        health.record(&eu, crate::health::Outcome::Failure, now);
        assert!(health.is_degraded(&eu) && !health.is_ejected(&eu));
        assert_eq!(
            providers(&plan(&s, &health, "chat", None).unwrap()),
            ["us", "eu"],
            "a failing target goes last, not away"
        );
        // Health never widens residency: the only EU target stays the plan.
        let only_eu = vec!["eu".to_string()];
        assert_eq!(
            providers(&plan(&s, &health, "chat", Some(&only_eu)).unwrap()),
            ["eu"]
        );
        // The snapshot's own order is untouched.
        assert_eq!(providers(&s.plan("chat", None).unwrap()), ["eu", "us"]);
        for _ in 0..10 {
            health.record(&eu, ok, now);
        }
        assert_eq!(
            providers(&plan(&s, &health, "chat", None).unwrap()),
            ["eu", "us"],
            "a healed target is back in its place"
        );
    }

    #[test]
    fn ejected_targets_are_skipped_probed_in_place_and_kept_when_alone() {
        let s = snapshot(Strategy::Priority);
        let health = Health::new();
        let now = std::time::Instant::now();
        let eu = health
            .target(&health::target_id("eu", "m", Some("eu-west")))
            .unwrap();
        for _ in 0..crate::health::EJECT_CONSECUTIVE {
            health.record(&eu, crate::health::Outcome::Failure, now);
        }
        assert!(health.is_ejected(&eu));
        let at =
            |t| providers(&apply_health(&s, s.plan("chat", None).unwrap(), &health, t)).join(",");
        assert_eq!(at(now), "us", "an ejected target is skipped");
        // Residency left only the ejected target: the plan keeps it.
        let only_eu = vec!["eu".to_string()];
        let kept = apply_health(&s, s.plan("chat", Some(&only_eu)).unwrap(), &health, now);
        assert_eq!(providers(&kept), ["eu"]);
        // Once the ejection time is over it is probed where it stands.
        assert_eq!(at(now + crate::health::EJECT_BASE), "eu,us");
    }

    #[test]
    fn fleet_error_rates_open_the_breaker_until_a_probe_succeeds() {
        let s = snapshot(Strategy::Priority);
        let mut scores = Scores::default();
        scores.targets.insert(
            ScoreKey {
                provider: "eu".into(),
                model: "m".into(),
                region: "eu-west".into(),
            },
            TargetScore {
                requests: FLEET_MIN_REQUESTS,
                error_rate: 0.9,
                ..TargetScore::default()
            },
        );
        let s = s.with_scores(Arc::new(scores));
        let health = Health::new();
        let now = std::time::Instant::now();
        let at = |when| {
            let p = apply_health(&s, s.plan("chat", None).unwrap(), &health, when);
            providers(&p).join(",")
        };
        // Ejected here as well, though this node never saw it fail.
        assert_eq!(at(now), "us");
        let eu = health
            .peek_target(&health::target_id("eu", "m", Some("eu-west")))
            .expect("the fleet's ejection lives on this node's board");
        assert!(health.is_ejected(&eu));
        assert_eq!(
            health
                .events()
                .fleet_ejections
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(at(now + std::time::Duration::from_millis(10)), "us");
        // Its ejection time over, it is probed where it stands; a probe
        // that succeeds closes the breaker and the fleet's rate no longer
        // overrides this node's own success.
        let later = now + crate::health::EJECT_BASE;
        assert_eq!(at(later), "eu,us");
        let (probe, _) = health.try_probe(&eu, later).unwrap().unwrap();
        let ok = crate::health::Outcome::Success {
            latency: std::time::Duration::from_millis(5),
        };
        health.record(&eu, ok, later);
        drop(probe);
        assert!(!health.is_ejected(&eu));
        assert_eq!(at(later), "eu,us");
        assert_eq!(
            health
                .events()
                .fleet_ejections
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn residency_filters_fallbacks_too_and_never_widens() {
        let s = snapshot(Strategy::Priority);
        let eu = vec!["eu".to_string()];
        assert_eq!(providers(&s.plan("chat", Some(&eu)).unwrap()), ["eu"]);
        // backup's own target is in the US, its fallback (a cycle back to
        // chat) reaches the EU one.
        assert_eq!(providers(&s.plan("backup", None).unwrap()), ["us", "eu"]);
        assert_eq!(providers(&s.plan("backup", Some(&eu)).unwrap()), ["eu"]);
        let err = s.plan("us-only", Some(&eu)).unwrap_err();
        assert!(matches!(&err, PlanError::Residency { blocked, .. } if blocked.len() == 1));
        assert!(err.to_string().contains("residency"));
        assert!(matches!(
            s.plan("us/m", Some(&eu)),
            Err(PlanError::Residency { .. })
        ));
        assert!(matches!(
            s.plan("nope", None),
            Err(PlanError::UnknownModel(_))
        ));

        let tenant = vec!["eu".to_string()];
        assert_eq!(narrow_residency(Some(&tenant), Some("us")), Some(vec![]));
        assert_eq!(narrow_residency(Some(&tenant), Some("EU, us")), Some(eu));
        assert_eq!(narrow_residency(None, None), None);
    }

    #[test]
    fn weighted_least_busy_and_latency_decide_per_request() {
        let now = std::time::Instant::now();
        let draws = 2000;
        let first = |s: &Snapshot, h: &Health| {
            let p = apply_strategy(s, h, "chat", s.plan("chat", None).unwrap());
            assert_eq!(p.len(), 2);
            p[0].target.provider.clone()
        };
        // Weighted 1:9, drawn per request rather than always the heaviest.
        let s = snapshot(Strategy::Weighted);
        let h = Health::new();
        let eu_first = (0..draws).filter(|_| first(&s, &h) == "eu").count();
        assert!((100..=320).contains(&eu_first), "{eu_first} of {draws}");

        // Least busy: the target with attempts in flight goes second.
        let s = snapshot(Strategy::LeastBusy);
        assert_eq!(first(&s, &h), "eu");
        let eu = h
            .target(&health::target_id("eu", "m", Some("eu-west")))
            .unwrap();
        let busy = eu.start();
        assert_eq!(first(&s, &h), "us");
        drop(busy);
        assert_eq!(first(&s, &h), "eu");

        // Latency: measured p95 × error rate; the faster wins both choices.
        let s = snapshot(Strategy::Latency);
        let h = Health::new();
        let ok = |ms| crate::health::Outcome::Success {
            latency: std::time::Duration::from_millis(ms),
        };
        let us = h
            .target(&health::target_id("us", "m", Some("us-east")))
            .unwrap();
        for _ in 0..LOCAL_MIN_SAMPLES {
            h.record(&us, ok(300), now);
        }
        // eu has no data: explored about one request in ten.
        let explored = (0..draws).filter(|_| first(&s, &h) == "eu").count();
        assert!((100..=320).contains(&explored), "{explored} of {draws}");
        let eu = h
            .target(&health::target_id("eu", "m", Some("eu-west")))
            .unwrap();
        for _ in 0..LOCAL_MIN_SAMPLES {
            h.record(&eu, ok(100), now);
        }
        assert!(
            (0..100).all(|_| first(&s, &h) == "eu"),
            "the faster goes first"
        );
    }
}
