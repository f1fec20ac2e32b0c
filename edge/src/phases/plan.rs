//! `plan`: the ordered targets a request may go to, and what the plan
//! permits.
//!
//! [`route_plan`] is the one call into the snapshot's planner, so a planner
//! that also reads runtime health replaces one function. A plan is never
//! empty: a route left without a usable target is a clear error here, not
//! an index out of bounds later.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use pingora::protocols::http::ServerSession;
use switchyard_backhaul::{Operation, RawRequest};
use switchyard_llm::openai::parse_json_object;
use switchyard_llm::{ErrorKind, GatewayError, Retry};
use switchyard_proto::{
    Health, HedgePolicy, PlanError, PlannedTarget, ProviderKind, RetryPolicy, RouteTarget,
    Snapshot, TargetFilter, Tenant,
};

use super::admit::{copy_headers, requested_model, Request, RAW_HEADERS};
use super::{fail, Failure};
use crate::app::EdgeApp;
use crate::ctx::RequestCtx;

/// Ordered targets for one request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Best first; never empty. Usually the snapshot's own compiled plan,
    /// shared rather than copied.
    pub targets: switchyard_proto::Plan,
    /// How many targets residency took away.
    pub excluded: usize,
    /// Deadline for each attempt's first streamed event.
    pub first_token_timeout: Option<Duration>,
    /// Deadline of each attempt (a stream: to its first event).
    pub attempt_timeout: Option<Duration>,
    /// How the request may retry, and whose budget it draws on (the
    /// route's, or the model name's when it names no route).
    pub retry: RetryPolicy,
    pub budget_key: String,
    /// The route's hedging, if on.
    pub hedge: Option<HedgePolicy>,
    /// The route continues cut text streams elsewhere (`routes.R.resume`).
    pub resume: bool,
}

/// What `dispatch` sends to each target of the plan.
pub(crate) struct Outbound {
    pub op: Operation,
    /// `x-switchyard-simulate`, for the targets allowed to honour it.
    pub simulate: Option<String>,
    /// Caller headers a same-protocol provider should see.
    pub forward_headers: Vec<(String, String)>,
}

/// Client headers a provider of the caller's own protocol should receive.
static FORWARDED_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
];
/// Fault and timing injection for the simulated provider (see its docs).
const SIMULATE_HEADER: HeaderName = HeaderName::from_static("x-switchyard-simulate");

pub(crate) fn plan(
    app: &EdgeApp,
    session: &ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    request: Request,
) -> Result<(Plan, Outbound), Failure> {
    let residency = ctx.residency.as_deref();
    let (plan, op) = match request {
        Request::Passthrough { provider, raw } => {
            let plan = passthrough_plan(snap, ctx, &provider).map_err(fail)?;
            (plan, Operation::Raw(raw))
        }
        Request::Api { op, raw_body } => {
            let tenant = ctx.tenant.as_deref().ok_or_else(|| fail(no_tenant()))?;
            let requested = requested_model(&op);
            let (name, filter) = choose_route(app, session, snap, ctx, tenant, requested, &op);
            let mut plan =
                plan_as(snap, &app.health, tenant, requested, name, residency).map_err(fail)?;
            if let Some(filter) = filter {
                filter_targets(&mut plan, filter, requested).map_err(fail)?;
            }
            let first = plan
                .targets
                .first()
                .ok_or_else(|| fail(empty_plan(requested)))?;
            let target = &first.target;
            let advertised = snap
                .providers()
                .get(&target.provider)
                .is_some_and(|p| p.models.contains(&target.model));
            if advertised || snap.aliases().contains_key(requested) {
                ctx.model_label = Some(requested.to_string());
            }
            match raw_body {
                None => (plan, op),
                Some(body) => {
                    let raw = raw_request(session, snap, target, &op, &body).map_err(fail)?;
                    // Raw mode talks to one provider as it is: no fallbacks.
                    plan.targets = plan.targets[..1].into();
                    plan.excluded = 0;
                    plan.retry.attempts = 0;
                    plan.hedge = None;
                    (plan, Operation::Raw(raw))
                }
            }
        }
    };
    let simulate = simulate_header(app, session, snap, &plan)?;
    for hook in &app.hooks.plan {
        hook.on_plan(ctx, &plan.targets);
    }
    let outbound = Outbound {
        op,
        simulate,
        forward_headers: copy_headers(session, &FORWARDED_HEADERS),
    };
    Ok((plan, outbound))
}

/// Marks a request non-critical: it may be downgraded.
const PRIORITY_HEADER: &str = "x-switchyard-priority";
const TAGS_HEADER: &str = "x-switchyard-tags";

/// The route a request is planned on: the requested route unless one of
/// its rules matches (first match wins) or, for a non-critical request,
/// its downgrade applies, with the matching rule's target filter. Both
/// are events and metrics.
fn choose_route<'a>(
    app: &EdgeApp,
    session: &ServerSession,
    snap: &'a Snapshot,
    ctx: &RequestCtx,
    tenant: &Tenant,
    requested: &'a str,
    op: &Operation,
) -> (&'a str, Option<&'a TargetFilter>) {
    let Some(route) = snap.route(requested) else {
        return (requested, None);
    };
    let header = |name: &str| {
        session
            .get_header(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if !route.rules.is_empty() {
        // Estimated once, only when some rule asks.
        let mut tokens = None;
        for (i, rule) in route.rules.iter().enumerate() {
            let w = &rule.when;
            let mut prompt = || *tokens.get_or_insert_with(|| op.estimated_prompt_tokens());
            let holds = w.prompt_tokens_over.is_none_or(|n| prompt() > n)
                && w.max_tokens_over
                    .is_none_or(|n| op.requested_max_tokens().is_some_and(|m| m > n))
                && w.tools.is_none_or(|t| op.has_tools() == t)
                && w.images.is_none_or(|i| op.has_images() == i)
                && w.header.as_ref().is_none_or(|(name, value)| {
                    header(name).is_some_and(|v| v.eq_ignore_ascii_case(value))
                })
                && w.tag.as_ref().is_none_or(|tag| {
                    header(TAGS_HEADER).is_some_and(|tags| tags.split(',').any(|t| t.trim() == tag))
                })
                && (w.tenants.is_empty() || w.tenants.contains(&tenant.id));
            if holds {
                // A filter-only rule keeps the route.
                let to = if rule.route.is_empty() {
                    &route.name
                } else {
                    &rule.route
                };
                tracing::info!(
                    target: "switchyard::rules",
                    event = "rule",
                    request_id = %ctx.request_id,
                    route = %route.name,
                    rule = i,
                    to = %to,
                    filter = rule.filter.is_some(),
                    "a policy rule matched"
                );
                app.metrics.rule_matched(&route.name, to);
                return (to, rule.filter.as_ref());
            }
        }
    }
    if let Some(d) = &route.downgrade {
        let non_critical = header(PRIORITY_HEADER).is_some_and(|p| p.eq_ignore_ascii_case("low"));
        if non_critical && primary_degraded(app, snap, route, d) {
            tracing::info!(
                target: "switchyard::downgrade",
                event = "downgrade",
                request_id = %ctx.request_id,
                route = %route.name,
                to = %d.route,
                "the route's primary is degraded; non-critical request downgraded"
            );
            app.metrics.downgrade(&route.name, &d.route);
            return (&d.route, None);
        }
    }
    (requested, None)
}

/// A rule's filter over the plan: it only ever removes targets (residency
/// was applied first), and a plan it leaves empty is refused with a clear
/// error rather than sent somewhere the rule excluded.
fn filter_targets(
    plan: &mut Plan,
    filter: &TargetFilter,
    requested: &str,
) -> Result<(), GatewayError> {
    let admits =
        |t: &PlannedTarget| filter.admits(&t.target.provider, &t.target.model, t.region.as_deref());
    if plan.targets.iter().all(admits) {
        return Ok(());
    }
    let kept: Vec<PlannedTarget> = plan.targets.iter().filter(|t| admits(t)).cloned().collect();
    if kept.is_empty() {
        return Err(GatewayError::new(
            ErrorKind::Overloaded,
            format!("A policy rule's filter left `{requested}` no target this gateway may use for this request."),
        )
        .with_code("rule_filtered_all")
        .with_retry(Retry::Never));
    }
    plan.targets = kept.into();
    Ok(())
}

/// Whether the route's first target is ejected, failing lately, or slower
/// to its first token (p95) than the downgrade's threshold.
fn primary_degraded(
    app: &EdgeApp,
    snap: &Snapshot,
    route: &switchyard_proto::RouteSnapshot,
    d: &switchyard_proto::Downgrade,
) -> bool {
    let Some(primary) = route.targets.first() else {
        return false;
    };
    let region = snap
        .provider(&primary.provider)
        .and_then(|p| p.region.clone());
    let entry = app.health.peek_target(&switchyard_proto::health::target_id(
        &primary.provider,
        &primary.model,
        region.as_deref(),
    ));
    if entry
        .as_ref()
        .is_some_and(|e| app.health.is_ejected(e) || app.health.is_degraded(e))
    {
        return true;
    }
    let Some(limit) = d.ttft_over else {
        return false;
    };
    let local = entry
        .as_ref()
        .and_then(|e| e.latency())
        .is_some_and(|l| l > limit);
    let fleet = snap
        .scores()
        .targets
        .get(&switchyard_proto::ScoreKey {
            provider: primary.provider.clone(),
            model: primary.model.clone(),
            region: region.unwrap_or_default(),
        })
        .is_some_and(|s| s.requests > 0 && s.ttft_p95_ms > limit.as_secs_f64() * 1000.0);
    local || fleet
}

/// Whether `target` may honour the client's `x-switchyard-simulate`.
pub(crate) fn simulate_allowed(app: &EdgeApp, snap: &Snapshot, target: &PlannedTarget) -> bool {
    app.simulate_header
        || snap
            .providers()
            .get(&target.target.provider)
            .and_then(|p| p.simulated.as_ref())
            .is_some_and(|s| s.allow_header)
}

fn simulate_header(
    app: &EdgeApp,
    session: &ServerSession,
    snap: &Snapshot,
    plan: &Plan,
) -> Result<Option<String>, Failure> {
    match session.get_header(&SIMULATE_HEADER) {
        None => Ok(None),
        // Refused rather than ignored: a caller testing its failure
        // handling against an edge that would silently serve real answers
        // would draw the wrong conclusions.
        Some(_) if !plan.targets.iter().any(|t| simulate_allowed(app, snap, t)) => {
            Err(fail(
                GatewayError::invalid(
                    "The x-switchyard-simulate header is honoured only by `switchyard dev`, or for providers whose policy sets `simulated.allow_header: true` (or `faults.allow_header: true`); remove it.",
                )
                .with_code("simulate_not_allowed"),
            ))
        }
        Some(v) => v.to_str().map(|v| Some(v.to_string())).map_err(|_| {
            fail(
                GatewayError::invalid("The x-switchyard-simulate header is not ASCII.")
                    .with_code("invalid_simulate_header"),
            )
        }),
    }
}

fn no_tenant() -> GatewayError {
    GatewayError::new(
        ErrorKind::Internal,
        "The request reached planning unauthenticated.",
    )
}

fn empty_plan(requested: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Overloaded,
        format!("`{requested}` has no target this gateway can use right now."),
    )
    .with_code("no_route_target")
    .with_retry(Retry::Never)
}

/// `/passthrough/{provider}`: one target, inside the request's jurisdictions.
fn passthrough_plan(
    snap: &Snapshot,
    ctx: &RequestCtx,
    provider: &str,
) -> Result<Plan, GatewayError> {
    let p = snap.providers().get(provider).ok_or_else(|| {
        GatewayError::new(
            ErrorKind::NotFound,
            format!("Unknown provider `{provider}`."),
        )
        .with_code("provider_not_found")
    })?;
    if let Some(allowed) = &ctx.residency {
        if !p.jurisdiction.as_ref().is_some_and(|j| allowed.contains(j)) {
            let tenant = ctx.tenant.as_deref().map_or("", |t| t.id.as_str());
            return Err(residency_error(tenant, allowed, provider));
        }
    }
    Ok(Plan {
        targets: Arc::new([PlannedTarget {
            target: RouteTarget {
                provider: provider.to_string(),
                model: String::new(),
            },
            region: p.region.clone(),
            jurisdiction: p.jurisdiction.clone(),
        }]),
        excluded: 0,
        first_token_timeout: None,
        attempt_timeout: None,
        // Raw passthrough answers are passed on as they are: no retries.
        retry: RetryPolicy {
            attempts: 0,
            ..RetryPolicy::default()
        },
        budget_key: String::new(),
        hedge: None,
        resume: false,
    })
}

/// `x-switchyard-raw`: the provider's own endpoint with only the model
/// rewritten.
fn raw_request(
    session: &ServerSession,
    snap: &Snapshot,
    target: &RouteTarget,
    op: &Operation,
    body: &Bytes,
) -> Result<RawRequest, GatewayError> {
    let kind = snap.providers().get(&target.provider).map(|p| p.kind);
    let path = raw_path(kind, endpoint_name(op))?;
    let mut map = parse_json_object(body)?;
    map.insert(
        "model".into(),
        serde_json::Value::String(target.model.clone()),
    );
    Ok(RawRequest {
        method: "POST".into(),
        path,
        headers: copy_headers(session, &RAW_HEADERS),
        body: Bytes::from(serde_json::to_vec(&map).unwrap_or_default()),
    })
}

fn endpoint_name(op: &Operation) -> &'static str {
    match op {
        Operation::Chat(_) => "chat/completions",
        Operation::Embeddings(_) => "embeddings",
        Operation::Messages { .. } => "messages",
        Operation::CountTokens { .. } => "messages/count_tokens",
        Operation::Responses(_) => "responses",
        Operation::Completions(_) => "completions",
        Operation::Generate(_)
        | Operation::GeminiCountTokens { .. }
        | Operation::GeminiEmbed(_) => "gemini",
        Operation::Raw(_) => "",
    }
}

/// Where `x-switchyard-raw` sends a normal route: the provider's own
/// endpoint for it, which only exists when the protocols match.
fn raw_path(kind: Option<ProviderKind>, endpoint: &str) -> Result<String, GatewayError> {
    match (kind, endpoint) {
        (Some(ProviderKind::OpenAi | ProviderKind::OpenAiCompatible), "chat/completions" | "embeddings") => {
            Ok(endpoint.to_string())
        }
        (Some(ProviderKind::OpenAi), "responses" | "completions") => Ok(endpoint.to_string()),
        (Some(ProviderKind::Anthropic), "messages" | "messages/count_tokens") => Ok(format!("v1/{endpoint}")),
        _ => Err(GatewayError::invalid(
            "x-switchyard-raw needs a provider that speaks this endpoint's protocol; use /passthrough/{provider}/{path} for anything else.",
        )
        .with_code("raw_protocol_mismatch")),
    }
}

/// The one call into the planner: the ordered targets the tenant may use
/// for `requested` inside the request's jurisdictions (fallbacks included),
/// with the route's first-token deadline. Never returns an empty plan.
pub fn route_plan(
    snap: &Snapshot,
    health: &Health,
    tenant: &Tenant,
    requested: &str,
    residency: Option<&[String]>,
) -> Result<Plan, GatewayError> {
    plan_as(snap, health, tenant, requested, requested, residency)
}

/// [`route_plan`] of `name`, the route a rule or a downgrade chose for
/// what the caller asked (`requested`, which permissions are checked on:
/// a route the policy chose is the policy's business, not the tenant's).
fn plan_as(
    snap: &Snapshot,
    health: &Health,
    tenant: &Tenant,
    requested: &str,
    name: &str,
    residency: Option<&[String]>,
) -> Result<Plan, GatewayError> {
    if !tenant.may_use(requested) {
        // Checked first so an unknown model does not reveal the catalogue.
        if snap.resolve(requested).is_some() {
            return Err(GatewayError::new(
                ErrorKind::Forbidden,
                format!("Your key is not allowed to use the model `{requested}`."),
            )
            .with_code("model_not_allowed")
            .with_param("model"));
        }
        return Err(GatewayError::model_not_found(requested));
    }
    let route = snap.routes().get(name);
    let first_token_timeout = route
        .and_then(|r| r.first_token_timeout)
        .or(snap.limits().first_token_timeout);
    let attempt_timeout = route.and_then(|r| r.attempt_timeout);
    let retry = route.map(|r| r.retry).unwrap_or_default();
    let budget_key = name.to_string();
    let hedge = route.and_then(|r| r.hedge);
    let resume = route.is_some_and(|r| r.resume);
    let plan = match residency {
        // Runtime health orders what the policy allows; it never adds to it.
        None => Plan {
            targets: switchyard_proto::plan::plan(snap, health, name, None)
                .map_err(|_| GatewayError::model_not_found(requested))?,
            excluded: 0,
            first_token_timeout,
            attempt_timeout,
            retry,
            budget_key,
            hedge,
            resume,
        },
        Some(allowed) => match switchyard_proto::plan::plan(snap, health, name, Some(allowed)) {
            Ok(targets) => {
                let all = snap
                    .plan(name, None)
                    .map_err(|_| GatewayError::model_not_found(requested))?;
                Plan {
                    excluded: all.len().saturating_sub(targets.len()),
                    targets,
                    first_token_timeout,
                    attempt_timeout,
                    retry,
                    budget_key,
                    hedge,
                    resume,
                }
            }
            Err(PlanError::Residency { blocked, .. }) => {
                let where_ = blocked
                    .iter()
                    .map(|t| {
                        format!(
                            "{}/{} in {}",
                            t.target.provider,
                            t.target.model,
                            t.jurisdiction.as_deref().unwrap_or("no jurisdiction")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(GatewayError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "Residency rule: tenant `{}` may only be served in {}; no target of `{requested}` is ({where_}).",
                        tenant.id,
                        if allowed.is_empty() { "no jurisdiction (the x-switchyard-residency header left none)".to_string() } else { allowed.join(", ") },
                    ),
                )
                .with_code("residency_blocked"));
            }
            Err(PlanError::UnknownModel(_)) => {
                return Err(GatewayError::model_not_found(requested))
            }
        },
    };
    if plan.targets.is_empty() {
        return Err(empty_plan(requested));
    }
    Ok(bounded(
        plan,
        snap.routes().get(name).and_then(|r| r.max_attempts),
    ))
}

/// The route's `max_attempts` caps how many targets one request may try;
/// the plan is copied only when it is actually cut.
fn bounded(mut plan: Plan, max_attempts: Option<u32>) -> Plan {
    if let Some(max) = max_attempts.map(|m| m.max(1) as usize) {
        if plan.targets.len() > max {
            plan.targets = plan.targets[..max].into();
        }
    }
    plan
}

pub(crate) fn residency_error(tenant: &str, allowed: &[String], provider: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Forbidden,
        format!(
            "Residency rule: tenant `{tenant}` may only be served in {}; provider `{provider}` is outside.",
            allowed.join(", ")
        ),
    )
    .with_code("residency_blocked")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use switchyard_proto::{
        ProviderSnapshot, RouteSnapshot, SnapshotBuilder, Strategy, WeightedTarget,
    };

    #[test]
    fn raw_mode_needs_matching_protocols() {
        assert_eq!(
            raw_path(Some(ProviderKind::OpenAi), "chat/completions").unwrap(),
            "chat/completions"
        );
        assert_eq!(
            raw_path(Some(ProviderKind::Anthropic), "messages").unwrap(),
            "v1/messages"
        );
        assert!(raw_path(Some(ProviderKind::Anthropic), "chat/completions").is_err());
        assert!(raw_path(Some(ProviderKind::Gemini), "chat/completions").is_err());
        assert!(raw_path(Some(ProviderKind::Simulated), "chat/completions").is_err());
    }

    fn route(name: &str, targets: Vec<WeightedTarget>, ftt: Option<u64>) -> Arc<RouteSnapshot> {
        Arc::new(RouteSnapshot {
            name: name.into(),
            strategy: Strategy::Priority,
            targets,
            fallbacks: vec![],
            first_token_timeout: ftt.map(Duration::from_millis),
            max_attempts: None,
            ..RouteSnapshot::default()
        })
    }

    #[test]
    fn a_route_without_a_usable_target_is_an_error_not_an_empty_plan() {
        let mut snap = Snapshot::builder();
        // Its only provider is gone (pruned for want of keys, say).
        let ghost = WeightedTarget {
            provider: "ghost".into(),
            model: "m".into(),
            weight: 1,
        };
        snap.routes
            .insert("r".into(), route("r", vec![ghost], None));
        let snap = snap.build();
        let tenant = Tenant {
            id: "t".into(),
            ..Tenant::default()
        };
        let e = route_plan(&snap, &Health::new(), &tenant, "r", None).unwrap_err();
        assert_eq!((e.status(), e.code), (503, Some("no_route_target")));
        assert!(!e.may_try_another_target());
    }

    fn snapshot_with_provider() -> SnapshotBuilder {
        let mut snap = Snapshot::builder();
        snap.providers.insert(
            "p".into(),
            Arc::new(ProviderSnapshot {
                name: "p".into(),
                kind: ProviderKind::OpenAi,
                base_url: "http://x".into(),
                keys: vec![],
                models: vec![],
                simulated: None,
                region: None,
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: Default::default(),
                key_pools: vec![],
            }),
        );
        snap
    }

    #[test]
    fn max_attempts_caps_the_targets_a_request_may_try() {
        let t = |m: &str| WeightedTarget {
            provider: "p".into(),
            model: m.into(),
            weight: 1,
        };
        let mut snap = snapshot_with_provider();
        let mut capped = (*route("capped", vec![t("a"), t("b"), t("c")], None)).clone();
        capped.max_attempts = Some(2);
        snap.routes.insert("capped".into(), Arc::new(capped));
        snap.routes.insert(
            "open".into(),
            route("open", vec![t("a"), t("b"), t("c")], None),
        );
        let snap = snap.build();
        let tenant = Tenant {
            id: "t".into(),
            ..Tenant::default()
        };
        let models = |r: &str| -> Vec<String> {
            route_plan(&snap, &Health::new(), &tenant, r, None)
                .unwrap()
                .targets
                .iter()
                .map(|p| p.target.model.clone())
                .collect()
        };
        assert_eq!(models("capped"), ["a", "b"]);
        assert_eq!(models("open"), ["a", "b", "c"]);
    }

    #[test]
    fn the_route_sets_the_first_token_deadline_else_the_limits() {
        let mut snap = snapshot_with_provider();
        let t = || WeightedTarget {
            provider: "p".into(),
            model: "m".into(),
            weight: 1,
        };
        snap.routes
            .insert("own".into(), route("own", vec![t()], Some(250)));
        snap.routes
            .insert("dflt".into(), route("dflt", vec![t()], None));
        snap.limits.first_token_timeout = Some(Duration::from_secs(3));
        let snap = snap.build();
        let tenant = Tenant {
            id: "t".into(),
            ..Tenant::default()
        };
        let ftt = |m: &str| {
            route_plan(&snap, &Health::new(), &tenant, m, None)
                .unwrap()
                .first_token_timeout
        };
        assert_eq!(ftt("own"), Some(Duration::from_millis(250)));
        assert_eq!(ftt("dflt"), Some(Duration::from_secs(3)));
        assert_eq!(ftt("p/m"), Some(Duration::from_secs(3)));
    }
}
