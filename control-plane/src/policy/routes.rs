//! The `aliases` and `routes` sections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::wire::MAX_RETRIES;
use switchyard_proto::{
    Downgrade, HedgePolicy, ProviderSnapshot, RetryPolicy, RouteRule, RouteSnapshot, RouteTarget,
    RuleCondition, Strategy, TargetFilter, TargetMatch, WeightedTarget,
};

use super::{Errors, PolicyDocument, PolicyOptions, StrategyDoc, ENV_PROVIDERS};

type Providers = HashMap<String, Arc<ProviderSnapshot>>;

/// Names a target may use: declared providers, the environment ones
/// (present or not: a missing key is not a policy error), the built-in.
fn declared(doc: &PolicyDocument, opts: &PolicyOptions<'_>, provider: &str) -> bool {
    doc.providers.contains_key(provider)
        || ENV_PROVIDERS.iter().any(|e| e.0 == provider)
        || (provider == "simulated" && opts.include_simulated)
}

/// Aliases to a provider that is declared but not compiled (broken, or an
/// environment one without its key) are dropped without an error.
pub(super) fn aliases(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    providers: &Providers,
    errors: &mut Errors,
) -> HashMap<String, RouteTarget> {
    let mut err = errors.sink();
    let mut aliases = HashMap::new();
    for (alias, target) in &doc.aliases {
        let path = format!("aliases.{alias}");
        if alias.contains('/') {
            err(
                path.clone(),
                "an alias must not contain '/' (that form is provider/model)".into(),
            );
        }
        match target.split_once('/') {
            Some((provider, model)) if !provider.is_empty() && !model.is_empty() => {
                if !declared(doc, opts, provider) {
                    err(path, format!("unknown provider {provider:?}"));
                } else if providers.contains_key(provider) {
                    aliases.insert(
                        alias.clone(),
                        RouteTarget {
                            provider: provider.to_string(),
                            model: model.to_string(),
                        },
                    );
                }
            }
            _ => err(path, format!("expected provider/model, got {target:?}")),
        }
    }
    aliases
}

/// Targets on a declared provider that is not compiled are dropped the
/// same way as aliases.
pub(super) fn routes(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    providers: &Providers,
    errors: &mut Errors,
) -> HashMap<String, Arc<RouteSnapshot>> {
    let mut err = errors.sink();
    let mut routes = HashMap::new();
    for (name, r) in &doc.routes {
        let path = format!("routes.{name}");
        if name.is_empty() || name.contains('/') {
            err(
                path.clone(),
                "a route name must be non-empty and contain no '/'".into(),
            );
        }
        if doc.aliases.contains_key(name) {
            err(path.clone(), format!("{name:?} is also an alias"));
        }
        if r.targets.is_empty() {
            err(
                format!("{path}.targets"),
                "a route needs at least one target".into(),
            );
        }
        let mut targets = Vec::new();
        for (i, t) in r.targets.iter().enumerate() {
            let tpath = format!("{path}.targets[{i}]");
            if !declared(doc, opts, &t.provider) {
                err(
                    format!("{tpath}.provider"),
                    format!("unknown provider {:?}", t.provider),
                );
                continue;
            }
            if t.model.is_empty() {
                err(format!("{tpath}.model"), "must not be empty".into());
            }
            let weight = t.weight.unwrap_or(1);
            if r.strategy == StrategyDoc::Weighted && weight == 0 {
                err(
                    format!("{tpath}.weight"),
                    "must be greater than 0 for strategy weighted".into(),
                );
            }
            if providers.contains_key(&t.provider) {
                targets.push(WeightedTarget {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                    weight,
                });
            }
        }
        if r.max_attempts == Some(0) {
            err(format!("{path}.max_attempts"), "must be at least 1".into());
        }
        if r.resume && !any_prefill(doc, providers, name) {
            err(
                format!("{path}.resume"),
                "no target of the route or its fallbacks supports prefill (`providers.P.prefill`), so a cut stream could never be resumed".into(),
            );
        }
        if r.attempt_timeout_ms == Some(0) {
            err(
                format!("{path}.attempt_timeout_ms"),
                "must be greater than 0".into(),
            );
        }
        let dflt = RetryPolicy::default();
        let retry = RetryPolicy {
            attempts: r.retry.attempts.unwrap_or(dflt.attempts),
            budget_percent: r.retry.budget_percent.unwrap_or(dflt.budget_percent),
            budget_floor: r.retry.min_retries.unwrap_or(dflt.budget_floor),
            backoff: r
                .retry
                .backoff_ms
                .map_or(dflt.backoff, Duration::from_millis),
            max_wait: r
                .retry
                .max_wait_ms
                .map_or(dflt.max_wait, Duration::from_millis),
        };
        if retry.attempts > MAX_RETRIES {
            err(
                format!("{path}.retry.attempts"),
                format!("at most {MAX_RETRIES}"),
            );
        }
        if retry.budget_percent > 100 {
            err(format!("{path}.retry.budget_percent"), "at most 100".into());
        }
        if retry.max_wait > Duration::from_secs(60) {
            err(format!("{path}.retry.max_wait_ms"), "at most 60000".into());
        }
        let mut rules = Vec::new();
        for (i, rule) in r.rules.iter().enumerate() {
            let rpath = format!("{path}.rules[{i}]");
            match &rule.route {
                Some(to) if !doc.routes.contains_key(to) => {
                    err(format!("{rpath}.route"), format!("unknown route {to:?}"));
                }
                Some(to) if to == name => {
                    err(
                        format!("{rpath}.route"),
                        "a rule cannot send a route to itself".into(),
                    );
                }
                Some(_) => {}
                None if rule.filter.is_none() => {
                    err(
                        rpath.clone(),
                        "a rule needs a `route`, a `filter` or both".into(),
                    );
                }
                None => {}
            }
            let filter = rule.filter.as_ref().map(|f| {
                let fpath = format!("{rpath}.filter");
                if f.keep.is_empty() && f.drop.is_empty() {
                    err(fpath.clone(), "give `keep`, `drop` or both".into());
                }
                let mut matches = |list: &[super::MatchDoc], field: &str| {
                    list.iter()
                        .enumerate()
                        .map(|(j, m)| {
                            let mpath = format!("{fpath}.{field}[{j}]");
                            if m.provider.is_none() && m.model.is_none() && m.region.is_none() {
                                err(
                                    mpath.clone(),
                                    "give provider, model, region or several".into(),
                                );
                            }
                            if let Some(p) = &m.provider {
                                if !declared(doc, opts, p) {
                                    err(
                                        format!("{mpath}.provider"),
                                        format!("unknown provider {p:?}"),
                                    );
                                }
                            }
                            if let Some(r) = &m.region {
                                if !doc.regions.contains_key(r)
                                    && !doc
                                        .providers
                                        .values()
                                        .any(|p| p.region.as_deref() == Some(r))
                                {
                                    err(format!("{mpath}.region"), format!("unknown region {r:?}"));
                                }
                            }
                            TargetMatch {
                                provider: m.provider.clone(),
                                model: m.model.clone(),
                                region: m.region.clone(),
                            }
                        })
                        .collect::<Vec<_>>()
                };
                let keep = matches(&f.keep, "keep");
                let drop = matches(&f.drop, "drop");
                TargetFilter { keep, drop }
            });
            let w = &rule.when;
            let header = match &w.header {
                None => None,
                Some(h) if h.len() == 1 => h
                    .iter()
                    .next()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone())),
                Some(_) => {
                    err(
                        format!("{rpath}.when.header"),
                        "exactly one header name and value".into(),
                    );
                    None
                }
            };
            for (j, t) in w.tenants.iter().enumerate() {
                if !doc.tenants.iter().any(|d| d.id == *t) {
                    err(
                        format!("{rpath}.when.tenants[{j}]"),
                        format!("unknown tenant {t:?}"),
                    );
                }
            }
            let when = RuleCondition {
                prompt_tokens_over: w.prompt_tokens_over,
                max_tokens_over: w.max_tokens_over,
                tools: w.tools,
                images: w.images,
                header,
                tag: w.tag.clone(),
                tenants: w.tenants.clone(),
            };
            if when == RuleCondition::default() {
                err(
                    format!("{rpath}.when"),
                    "a rule needs at least one condition".into(),
                );
            }
            rules.push(RouteRule {
                when,
                route: rule.route.clone().unwrap_or_default(),
                filter,
            });
        }
        let downgrade = r.downgrade.as_ref().map(|d| {
            if !doc.routes.contains_key(&d.route) || d.route == *name {
                err(
                    format!("{path}.downgrade.route"),
                    format!("unknown route {:?} (or the route itself)", d.route),
                );
            }
            if d.ttft_p95_over_ms == Some(0) {
                err(
                    format!("{path}.downgrade.ttft_p95_over_ms"),
                    "must be greater than 0".into(),
                );
            }
            Downgrade {
                route: d.route.clone(),
                ttft_over: d.ttft_p95_over_ms.map(Duration::from_millis),
            }
        });
        let hedge = r.hedge.as_ref().map(|h| {
            for (field, v) in [("delay_ms", h.delay_ms), ("min_delay_ms", h.min_delay_ms)] {
                if v == Some(0) {
                    err(
                        format!("{path}.hedge.{field}"),
                        "must be greater than 0".into(),
                    );
                }
            }
            if h.min_delay_ms.is_some() && h.after.is_none() {
                err(
                    format!("{path}.hedge.min_delay_ms"),
                    "only means something with `after: p95`".into(),
                );
            }
            HedgePolicy {
                delay: Duration::from_millis(h.delay_ms.unwrap_or(1000).max(1)),
                after_p95: h.after == Some(super::HedgeAfterDoc::P95),
                min_delay: Duration::from_millis(h.min_delay_ms.unwrap_or(50)),
            }
        });
        if r.first_token_timeout_ms == Some(0) {
            err(
                format!("{path}.first_token_timeout_ms"),
                "must be greater than 0".into(),
            );
        }
        for (i, f) in r.fallbacks.iter().enumerate() {
            if !doc.routes.contains_key(f) {
                err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("unknown route {f:?}"),
                );
            } else if reaches(doc, f, name) {
                err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("fallback cycle: {f:?} leads back to {name:?}"),
                );
            }
        }
        routes.insert(
            name.clone(),
            Arc::new(RouteSnapshot {
                name: name.clone(),
                strategy: match r.strategy {
                    StrategyDoc::Priority => Strategy::Priority,
                    StrategyDoc::Latency => Strategy::Latency,
                    StrategyDoc::Cost => Strategy::Cost,
                    StrategyDoc::Weighted => Strategy::Weighted,
                    StrategyDoc::LeastBusy => Strategy::LeastBusy,
                },
                targets,
                fallbacks: r.fallbacks.clone(),
                first_token_timeout: r.first_token_timeout_ms.map(Duration::from_millis),
                max_attempts: r.max_attempts,
                retry,
                attempt_timeout: r.attempt_timeout_ms.map(Duration::from_millis),
                rules,
                downgrade,
                hedge,
                resume: r.resume,
            }),
        );
    }
    routes
}

/// Whether some target of `route` or of the routes it falls back to can
/// continue a partial answer.
fn any_prefill(doc: &PolicyDocument, providers: &Providers, route: &str) -> bool {
    let mut stack = vec![route];
    let mut seen = HashSet::new();
    while let Some(r) = stack.pop() {
        if !seen.insert(r) {
            continue;
        }
        let Some(doc_route) = doc.routes.get(r) else {
            continue;
        };
        if doc_route.targets.iter().any(|t| {
            providers
                .get(&t.provider)
                .is_some_and(|p| p.prefill != switchyard_proto::Prefill::None)
        }) {
            return true;
        }
        stack.extend(doc_route.fallbacks.iter().map(String::as_str));
    }
    false
}

fn reaches(doc: &PolicyDocument, from: &str, target: &str) -> bool {
    let mut stack = vec![from];
    let mut seen = HashSet::new();
    while let Some(r) = stack.pop() {
        if r == target {
            return true;
        }
        if !seen.insert(r) {
            continue;
        }
        if let Some(route) = doc.routes.get(r) {
            stack.extend(route.fallbacks.iter().map(String::as_str));
        }
    }
    false
}
