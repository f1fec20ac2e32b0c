//! Route planning: what a requested model name leads to, in order, inside
//! the request's jurisdictions. [`plan`] reads `(&Snapshot, &Health)`: the
//! snapshot gives the policy's order (precompiled per tenant jurisdiction
//! set where it can), the runtime health board moves targets that fail
//! lately behind the others. Pure and allocation-light enough for the
//! request path.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::health::{self, Health};
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
/// snapshot's order ([`static_plan`]) with targets the health board has
/// seen failing lately moved behind the others. Demoted targets are kept,
/// in their order: a doubtful target is still better than none.
///
/// This is the one planning entry point of the data plane; breakers and
/// other runtime rules are added here.
pub fn plan(
    snapshot: &Snapshot,
    health: &Health,
    requested: &str,
    jurisdictions: Option<&[String]>,
) -> Result<Plan, PlanError> {
    let targets = static_plan(snapshot, requested, jurisdictions)?;
    Ok(demote_degraded(targets, health))
}

/// Stable partition: healthy targets first, each group in plan order.
/// The snapshot's plan is shared as is unless something is demoted.
fn demote_degraded(targets: Plan, health: &Health) -> Plan {
    if targets.len() < 2 || !health.has_targets() {
        return targets;
    }
    let degraded = |t: &PlannedTarget| {
        let id = health::target_id(&t.target.provider, &t.target.model, t.region.as_deref());
        health
            .peek_target(&id)
            .is_some_and(|e| health.is_degraded(&e))
    };
    let flags: Vec<bool> = targets.iter().map(degraded).collect();
    if !flags.iter().any(|d| *d) {
        return targets;
    }
    let pick = |want: bool| {
        targets
            .iter()
            .zip(&flags)
            .filter(move |(_, d)| **d == want)
            .map(|(t, _)| t.clone())
    };
    pick(false).chain(pick(true)).collect()
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
        Strategy::Priority => {}
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
                    .map(|s| s.ttft_p50_ms)
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
                    ttft_p50_ms: ms,
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
        for _ in 0..crate::health::DEMOTE_MIN_SAMPLES {
            health.record(&eu, crate::health::Outcome::Failure, now);
        }
        let demoted = plan(&s, &health, "chat", Some(&both)).unwrap();
        assert_eq!(providers(&demoted), ["us", "eu"]);
        assert_eq!(
            providers(&first),
            ["eu", "us"],
            "the shared plan is untouched"
        );
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
        health.record(&eu, crate::health::Outcome::Failure, now);
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
            health.record(
                &eu,
                crate::health::Outcome::Success {
                    latency: std::time::Duration::from_millis(5),
                },
                now,
            );
        }
        assert_eq!(
            providers(&plan(&s, &health, "chat", None).unwrap()),
            ["eu", "us"],
            "a healed target is back in its place"
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
}
