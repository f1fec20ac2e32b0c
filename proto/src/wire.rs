//! Wire ↔ domain conversions for snapshots.
//!
//! Domain → wire is infallible. Wire → domain (`TryFrom`) validates what a
//! node must be able to rely on: enum values it knows, well-formed key
//! hashes, routes that only name providers of the same snapshot, non-zero
//! limits. A node that cannot convert a snapshot NACKs it and keeps the
//! previous one. Key references stay references here; resolving them (env,
//! file) is I/O and happens when the node prepares the snapshot.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::control as pb;

/// Most retries a route may ask for; the policy compiler refuses more, a
/// snapshot from the wire is clamped.
pub const MAX_RETRIES: u32 = 10;
use crate::{
    Downgrade, FaultMode, HedgePolicy, KeyHash, KeyPoolSnapshot, KeySource, LimitSet,
    LimitsSnapshot, ModelPrice, PoolKey, Prefill, ProviderKind, ProviderSnapshot, RegionSnapshot,
    RetryPolicy, RouteRule, RouteSnapshot, RouteTarget, RttScore, RuleCondition, ScoreKey, Scores,
    Secret, SimulatedFault, SimulatedProfile, SimulatedSettings, Snapshot, SnapshotBuilder, Spend,
    Strategy, TargetFilter, TargetMatch, TargetScore, Tenant, Tenants, VirtualKey, WeightedTarget,
};

fn spend_to_wire(s: &Spend) -> pb::SpendMsg {
    pb::SpendMsg {
        day_usd: s.day_usd,
        month_usd: s.month_usd,
        day: s.day,
        month: s.month,
    }
}

/// Why a snapshot message cannot become a [`Snapshot`]; `path` names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidSnapshot {
    MissingField { path: String },
    InvalidEnum { path: String, value: i32 },
    InvalidValue { path: String, message: String },
}

impl fmt::Display for InvalidSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidSnapshot::MissingField { path } => write!(f, "{path}: missing"),
            InvalidSnapshot::InvalidEnum { path, value } => {
                write!(f, "{path}: unknown enum value {value}")
            }
            InvalidSnapshot::InvalidValue { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for InvalidSnapshot {}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> InvalidSnapshot {
    InvalidSnapshot::InvalidValue {
        path: path.into(),
        message: message.into(),
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn sorted<K: Ord + Clone, V>(m: &HashMap<K, V>) -> Vec<(&K, &V)> {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

impl From<ProviderKind> for pb::ProviderKindMsg {
    fn from(k: ProviderKind) -> Self {
        match k {
            ProviderKind::OpenAi => pb::ProviderKindMsg::ProviderKindOpenai,
            ProviderKind::OpenAiCompatible => pb::ProviderKindMsg::ProviderKindOpenaiCompatible,
            ProviderKind::Anthropic => pb::ProviderKindMsg::ProviderKindAnthropic,
            ProviderKind::Gemini => pb::ProviderKindMsg::ProviderKindGemini,
            ProviderKind::Simulated => pb::ProviderKindMsg::ProviderKindSimulated,
        }
    }
}

impl From<Strategy> for pb::StrategyMsg {
    fn from(s: Strategy) -> Self {
        match s {
            Strategy::Priority => pb::StrategyMsg::StrategyPriority,
            Strategy::Latency => pb::StrategyMsg::StrategyLatency,
            Strategy::Cost => pb::StrategyMsg::StrategyCost,
            Strategy::Weighted => pb::StrategyMsg::StrategyWeighted,
            Strategy::LeastBusy => pb::StrategyMsg::StrategyLeastBusy,
        }
    }
}

fn profile_to_wire(p: &SimulatedProfile) -> pb::ProfileMsg {
    pb::ProfileMsg {
        ttft_ms: p.ttft.as_millis() as u64,
        tokens_per_second: p.tokens_per_second,
        output_tokens: p.output_tokens,
        fault: p.fault.as_ref().map(|f| pb::FaultMsg {
            rate: f.rate,
            mode: Some(match &f.mode {
                FaultMode::Status {
                    status,
                    retry_after,
                } => pb::fault_msg::Mode::Status(pb::StatusFault {
                    status: u32::from(*status),
                    retry_after: retry_after.unwrap_or(0),
                }),
                FaultMode::Hang => pb::fault_msg::Mode::Hang(true),
                FaultMode::DropAfter { chunks } => pb::fault_msg::Mode::DropAfter(*chunks),
            }),
        }),
    }
}

fn key_to_wire(k: &PoolKey) -> pb::KeyRefMsg {
    pb::KeyRefMsg {
        source: Some(match &k.source {
            KeySource::Env(v) => pb::key_ref_msg::Source::Env(v.clone()),
            KeySource::File(p) => pb::key_ref_msg::Source::File(p.clone()),
            KeySource::Inline(s) => pb::key_ref_msg::Source::Value(s.expose().to_string()),
        }),
        id: k.id.clone(),
        weight: k.weight,
        rpm: k.rpm.unwrap_or(0),
        tpm: k.tpm.unwrap_or(0),
    }
}

impl From<&Scores> for pb::ScoresMsg {
    fn from(s: &Scores) -> Self {
        let mut targets: Vec<_> = s
            .targets
            .iter()
            .map(|(k, v)| pb::TargetScoreMsg {
                provider: k.provider.clone(),
                model: k.model.clone(),
                region: k.region.clone(),
                requests: v.requests,
                error_rate: v.error_rate,
                ttft_p50_ms: v.ttft_p50_ms,
                ttft_p95_ms: v.ttft_p95_ms,
                ttft_p99_ms: v.ttft_p99_ms,
            })
            .collect();
        targets.sort_by(|a, b| {
            (&a.provider, &a.model, &a.region).cmp(&(&b.provider, &b.model, &b.region))
        });
        let mut backhaul: Vec<_> = s
            .backhaul
            .iter()
            .map(|((e, g), v)| pb::RttScoreMsg {
                edge_region: e.clone(),
                egress_region: g.clone(),
                p50_ms: v.p50_ms,
                p95_ms: v.p95_ms,
                p99_ms: v.p99_ms,
            })
            .collect();
        backhaul.sort_by(|a, b| {
            (&a.edge_region, &a.egress_region).cmp(&(&b.edge_region, &b.egress_region))
        });
        pb::ScoresMsg {
            targets,
            backhaul,
            computed_at_ms: s.computed_at_ms,
        }
    }
}

/// Every key pool with its key references or (decrypted) values: the
/// control plane strips what a given node must not receive before sending.
/// A duration as wire milliseconds, 0 for none.
fn millis(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| (d.as_millis() as u64).max(1))
}

impl From<&Snapshot> for pb::SnapshotMsg {
    fn from(s: &Snapshot) -> Self {
        let providers = s
            .providers()
            .iter()
            .map(|(name, p)| {
                let msg = pb::ProviderMsg {
                    prefill: pb::PrefillMsg::from(p.prefill) as i32,
                    name: p.name.clone(),
                    kind: pb::ProviderKindMsg::from(p.kind) as i32,
                    base_url: p.base_url.clone(),
                    models: p.models.clone(),
                    region: p.region.clone().unwrap_or_default(),
                    jurisdiction: p.jurisdiction.clone().unwrap_or_default(),
                    pricing: p
                        .pricing
                        .iter()
                        .map(|(m, price)| {
                            (
                                m.clone(),
                                pb::PriceMsg {
                                    input_per_million: price.input_per_million,
                                    output_per_million: price.output_per_million,
                                    cached_input_per_million: price.cached_input_per_million,
                                },
                            )
                        })
                        .collect(),
                    key_pools: p
                        .key_pools
                        .iter()
                        .map(|pool| pb::KeyPoolMsg {
                            name: pool.name.clone(),
                            region: pool.region.clone().unwrap_or_default(),
                            jurisdictions: pool.jurisdictions.clone(),
                            keys: pool.keys.iter().map(key_to_wire).collect(),
                        })
                        .collect(),
                    simulated: p.simulated.as_ref().map(|sim| pb::SimulatedMsg {
                        default_profile: Some(profile_to_wire(&sim.default_profile)),
                        models: sim
                            .models
                            .iter()
                            .map(|(m, prof)| (m.clone(), profile_to_wire(prof)))
                            .collect(),
                        allow_header: sim.allow_header,
                    }),
                };
                (name.clone(), msg)
            })
            .collect();
        let key_of: HashMap<&str, &KeyHash> = s
            .tenants()
            .keys()
            .map(|(hash, t)| (t.id.as_str(), hash))
            .collect();
        let mut tenants: Vec<_> = s
            .tenants()
            .iter()
            .map(|t| pb::TenantMsg {
                id: t.id.clone(),
                // Empty: a tenant reached through virtual keys only.
                key_sha256: key_of
                    .get(t.id.as_str())
                    .map(|h| h.0.to_vec())
                    .unwrap_or_default(),
                allowed_models: t
                    .allowed_models
                    .as_ref()
                    .map(|m| pb::AllowedModels { models: m.clone() }),
                rpm: t.rpm.unwrap_or(0),
                tpm: t.tpm.unwrap_or(0),
                monthly_budget_usd: t.monthly_budget_usd.unwrap_or(0.0),
                residency: t.residency.clone().unwrap_or_default(),
                concurrency: t.concurrency.unwrap_or(0),
                daily_budget_usd: t.daily_budget_usd.unwrap_or(0.0),
                budget_warn_ratio: t.budget_warn_ratio.unwrap_or(0.0),
                fail_closed: t.fail_closed,
                limit_share: t.limit_share.unwrap_or(0.0),
                edge_residency_relaxed: t.edge_residency_relaxed,
                hedge_budget_percent: t.hedge_budget_percent,
            })
            .collect();
        tenants.sort_by(|a, b| a.id.cmp(&b.id));
        let mut virtual_keys: Vec<_> = s
            .tenants()
            .virtual_keys()
            .map(|(hash, k)| pb::VirtualKeyMsg {
                id: k.id.clone(),
                key_sha256: hash.0.to_vec(),
                tenant: k.tenant.clone(),
                allowed_models: k
                    .allowed_models
                    .as_ref()
                    .map(|m| pb::AllowedModels { models: m.clone() }),
                rpm: k.limits.rpm.unwrap_or(0),
                tpm: k.limits.tpm.unwrap_or(0),
                concurrency: k.limits.concurrency.unwrap_or(0),
                daily_budget_usd: k.limits.daily_usd.unwrap_or(0.0),
                monthly_budget_usd: k.limits.monthly_usd.unwrap_or(0.0),
                expires_at_ms: k.expires_at_ms.unwrap_or(0),
            })
            .collect();
        virtual_keys.sort_by(|a, b| a.id.cmp(&b.id));
        let spend = s
            .tenants()
            .spends()
            .map(|(scope, sp)| (scope.clone(), spend_to_wire(sp)))
            .collect();
        pb::SnapshotMsg {
            version: s.version(),
            providers,
            aliases: sorted(s.aliases())
                .into_iter()
                .map(|(a, t)| {
                    (
                        a.clone(),
                        pb::RouteTargetMsg {
                            provider: t.provider.clone(),
                            model: t.model.clone(),
                            weight: 0,
                        },
                    )
                })
                .collect(),
            routes: s
                .routes()
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        pb::RouteMsg {
                            name: r.name.clone(),
                            strategy: pb::StrategyMsg::from(r.strategy) as i32,
                            targets: r
                                .targets
                                .iter()
                                .map(|t| pb::RouteTargetMsg {
                                    provider: t.provider.clone(),
                                    model: t.model.clone(),
                                    weight: t.weight,
                                })
                                .collect(),
                            fallbacks: r.fallbacks.clone(),
                            first_token_timeout_ms: millis(r.first_token_timeout),
                            max_attempts: r.max_attempts.unwrap_or(0),
                            retry: Some(pb::RetryMsg {
                                attempts: r.retry.attempts,
                                budget_percent: r.retry.budget_percent,
                                budget_floor: r.retry.budget_floor,
                                backoff_ms: r.retry.backoff.as_millis() as u64,
                                max_wait_ms: r.retry.max_wait.as_millis() as u64,
                            }),
                            attempt_timeout_ms: millis(r.attempt_timeout),
                            rules: r
                                .rules
                                .iter()
                                .map(|rule| {
                                    let w = &rule.when;
                                    let (header_name, header_value) =
                                        w.header.clone().unwrap_or_default();
                                    pb::RouteRuleMsg {
                                        prompt_tokens_over: w.prompt_tokens_over,
                                        max_tokens_over: w.max_tokens_over,
                                        tools: w.tools,
                                        images: w.images,
                                        header_name,
                                        header_value,
                                        tag: w.tag.clone().unwrap_or_default(),
                                        tenants: w.tenants.clone(),
                                        route: rule.route.clone(),
                                        filter: rule.filter.as_ref().map(|f| pb::TargetFilterMsg {
                                            keep: f.keep.iter().map(match_msg).collect(),
                                            drop: f.drop.iter().map(match_msg).collect(),
                                        }),
                                    }
                                })
                                .collect(),
                            downgrade: r.downgrade.as_ref().map(|d| pb::DowngradeMsg {
                                route: d.route.clone(),
                                ttft_over_ms: millis(d.ttft_over),
                            }),
                            hedge: r.hedge.map(|h| pb::HedgeMsg {
                                delay_ms: h.delay.as_millis() as u64,
                                after_p95: h.after_p95,
                                min_delay_ms: h.min_delay.as_millis() as u64,
                            }),
                            resume: r.resume,
                        },
                    )
                })
                .collect(),
            tenants,
            virtual_keys,
            spend,
            limits: Some(pb::LimitsMsg {
                max_body_bytes: s.limits().max_body_bytes as u64,
                upstream_timeout_ms: s.limits().upstream_timeout.as_millis() as u64,
                stream_idle_timeout_ms: s.limits().stream_idle_timeout.as_millis() as u64,
                first_token_timeout_ms: millis(s.limits().first_token_timeout),
            }),
            regions: s
                .regions()
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        pb::RegionMsg {
                            name: r.name.clone(),
                            jurisdiction: r.jurisdiction.clone().unwrap_or_default(),
                            egress: r.egress.clone(),
                            hostname: r.hostname.clone().unwrap_or_default(),
                        },
                    )
                })
                .collect(),
            scores: Some(pb::ScoresMsg::from(&**s.scores())),
            scores_generation: 0,
        }
    }
}

fn profile_from_wire(p: &pb::ProfileMsg, path: &str) -> Result<SimulatedProfile, InvalidSnapshot> {
    if !(p.tokens_per_second > 0.0 && p.tokens_per_second.is_finite()) {
        return Err(invalid(
            format!("{path}.tokens_per_second"),
            "must be a positive number",
        ));
    }
    let fault = match &p.fault {
        None => None,
        Some(f) => {
            if !(0.0..=1.0).contains(&f.rate) {
                return Err(invalid(format!("{path}.fault.rate"), "must be in [0, 1]"));
            }
            let mode = match &f.mode {
                None => {
                    return Err(InvalidSnapshot::MissingField {
                        path: format!("{path}.fault.mode"),
                    })
                }
                Some(pb::fault_msg::Mode::Status(s)) => FaultMode::Status {
                    status: u16::try_from(s.status)
                        .ok()
                        .filter(|s| (400..=599).contains(s))
                        .ok_or_else(|| {
                            invalid(format!("{path}.fault.status"), "must be 400-599")
                        })?,
                    retry_after: (s.retry_after > 0).then_some(s.retry_after),
                },
                Some(pb::fault_msg::Mode::Hang(_)) => FaultMode::Hang,
                Some(pb::fault_msg::Mode::DropAfter(n)) => FaultMode::DropAfter { chunks: *n },
            };
            Some(SimulatedFault { rate: f.rate, mode })
        }
    };
    Ok(SimulatedProfile {
        ttft: Duration::from_millis(p.ttft_ms),
        tokens_per_second: p.tokens_per_second,
        output_tokens: p.output_tokens,
        fault,
    })
}

fn provider_from_wire(name: &str, p: pb::ProviderMsg) -> Result<ProviderSnapshot, InvalidSnapshot> {
    let path = format!("providers.{name}");
    if p.name != name {
        return Err(invalid(
            format!("{path}.name"),
            format!("does not match its key ({:?})", p.name),
        ));
    }
    let kind = match pb::ProviderKindMsg::try_from(p.kind) {
        Ok(pb::ProviderKindMsg::ProviderKindOpenai) => ProviderKind::OpenAi,
        Ok(pb::ProviderKindMsg::ProviderKindOpenaiCompatible) => ProviderKind::OpenAiCompatible,
        Ok(pb::ProviderKindMsg::ProviderKindAnthropic) => ProviderKind::Anthropic,
        Ok(pb::ProviderKindMsg::ProviderKindGemini) => ProviderKind::Gemini,
        Ok(pb::ProviderKindMsg::ProviderKindSimulated) => ProviderKind::Simulated,
        Ok(pb::ProviderKindMsg::ProviderKindUnspecified) | Err(_) => {
            return Err(InvalidSnapshot::InvalidEnum {
                path: format!("{path}.kind"),
                value: p.kind,
            })
        }
    };
    let prefill = match pb::PrefillMsg::try_from(p.prefill) {
        Ok(pb::PrefillMsg::PrefillNone) => Prefill::None,
        Ok(pb::PrefillMsg::PrefillTrailingAssistant) => Prefill::TrailingAssistant,
        Ok(pb::PrefillMsg::PrefillPrefix) => Prefill::Prefix,
        Ok(pb::PrefillMsg::PrefillContinueFinalMessage) => Prefill::ContinueFinalMessage,
        Err(_) => {
            return Err(InvalidSnapshot::InvalidEnum {
                path: format!("{path}.prefill"),
                value: p.prefill,
            })
        }
    };
    if kind != ProviderKind::Simulated
        && !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://"))
    {
        return Err(invalid(
            format!("{path}.base_url"),
            "must be an http(s) URL",
        ));
    }
    let mut pricing = HashMap::new();
    for (model, price) in p.pricing {
        if [
            price.input_per_million,
            price.output_per_million,
            price.cached_input_per_million.unwrap_or(0.0),
        ]
        .iter()
        .any(|p| p.is_nan() || *p < 0.0)
        {
            return Err(invalid(
                format!("{path}.pricing.{model}"),
                "prices must be non-negative numbers",
            ));
        }
        pricing.insert(
            model,
            ModelPrice {
                input_per_million: price.input_per_million,
                output_per_million: price.output_per_million,
                cached_input_per_million: price.cached_input_per_million,
            },
        );
    }
    let mut key_pools = Vec::new();
    let mut pool_names = HashSet::new();
    for (i, pool) in p.key_pools.into_iter().enumerate() {
        if !pool_names.insert(pool.name.clone()) {
            return Err(invalid(
                format!("{path}.key_pools[{i}].name"),
                "duplicate pool name",
            ));
        }
        let mut keys = Vec::new();
        let mut ids = HashSet::new();
        for (k, key) in pool.keys.into_iter().enumerate() {
            let kpath = format!("{path}.key_pools[{i}].keys[{k}]");
            let source = match key.source {
                Some(pb::key_ref_msg::Source::Env(v)) if !v.is_empty() => KeySource::Env(v),
                Some(pb::key_ref_msg::Source::File(f)) if !f.is_empty() => KeySource::File(f),
                Some(pb::key_ref_msg::Source::Value(v)) if !v.is_empty() => {
                    KeySource::Inline(Secret::new(v))
                }
                Some(_) => return Err(invalid(kpath, "empty key reference")),
                None => return Err(InvalidSnapshot::MissingField { path: kpath }),
            };
            let mut pool_key = PoolKey::new(k, source);
            if !key.id.is_empty() {
                pool_key.id = key.id;
            }
            if !ids.insert(pool_key.id.clone()) {
                return Err(invalid(
                    format!("{kpath}.id"),
                    "duplicate key id in the pool",
                ));
            }
            pool_key.weight = key.weight.max(1);
            pool_key.rpm = (key.rpm > 0).then_some(key.rpm);
            pool_key.tpm = (key.tpm > 0).then_some(key.tpm);
            keys.push(pool_key);
        }
        key_pools.push(KeyPoolSnapshot {
            name: pool.name,
            region: opt(&pool.region),
            jurisdictions: pool.jurisdictions,
            keys,
        });
    }
    let simulated = match p.simulated {
        None if kind == ProviderKind::Simulated => Some(SimulatedSettings::default()),
        None => None,
        Some(sim) => {
            let default_profile = match &sim.default_profile {
                Some(d) => profile_from_wire(d, &format!("{path}.simulated"))?,
                None => SimulatedProfile::default(),
            };
            let mut models = HashMap::new();
            for (m, prof) in &sim.models {
                models.insert(
                    m.clone(),
                    profile_from_wire(prof, &format!("{path}.simulated.models.{m}"))?,
                );
            }
            Some(SimulatedSettings {
                default_profile,
                models,
                allow_header: sim.allow_header,
            })
        }
    };
    Ok(ProviderSnapshot {
        name: p.name,
        kind,
        base_url: p.base_url,
        keys: Vec::new(),
        models: p.models,
        simulated,
        region: opt(&p.region),
        jurisdiction: opt(&p.jurisdiction),
        pricing,
        key_pools,
        prefill,
    })
}

impl From<Prefill> for pb::PrefillMsg {
    fn from(p: Prefill) -> Self {
        match p {
            Prefill::None => pb::PrefillMsg::PrefillNone,
            Prefill::TrailingAssistant => pb::PrefillMsg::PrefillTrailingAssistant,
            Prefill::Prefix => pb::PrefillMsg::PrefillPrefix,
            Prefill::ContinueFinalMessage => pb::PrefillMsg::PrefillContinueFinalMessage,
        }
    }
}

impl TryFrom<pb::SnapshotMsg> for Snapshot {
    type Error = InvalidSnapshot;

    fn try_from(msg: pb::SnapshotMsg) -> Result<Self, Self::Error> {
        if msg.version == 0 {
            return Err(invalid("version", "must be greater than 0"));
        }
        let mut providers = HashMap::new();
        for (name, p) in msg.providers {
            let provider = provider_from_wire(&name, p)?;
            providers.insert(name, Arc::new(provider));
        }
        let known = |path: String, provider: &str| {
            if providers.contains_key(provider) {
                Ok(())
            } else {
                Err(invalid(path, format!("unknown provider {provider:?}")))
            }
        };
        let mut aliases = HashMap::new();
        for (alias, t) in msg.aliases {
            known(format!("aliases.{alias}.provider"), &t.provider)?;
            aliases.insert(
                alias,
                RouteTarget {
                    provider: t.provider,
                    model: t.model,
                },
            );
        }
        let mut routes = HashMap::new();
        for (name, r) in &msg.routes {
            let path = format!("routes.{name}");
            let strategy = match pb::StrategyMsg::try_from(r.strategy) {
                Ok(pb::StrategyMsg::StrategyPriority) => Strategy::Priority,
                Ok(pb::StrategyMsg::StrategyLatency) => Strategy::Latency,
                Ok(pb::StrategyMsg::StrategyCost) => Strategy::Cost,
                Ok(pb::StrategyMsg::StrategyWeighted) => Strategy::Weighted,
                Ok(pb::StrategyMsg::StrategyLeastBusy) => Strategy::LeastBusy,
                Err(_) => {
                    return Err(InvalidSnapshot::InvalidEnum {
                        path: format!("{path}.strategy"),
                        value: r.strategy,
                    })
                }
            };
            let mut targets = Vec::new();
            for (i, t) in r.targets.iter().enumerate() {
                known(format!("{path}.targets[{i}].provider"), &t.provider)?;
                targets.push(WeightedTarget {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                    weight: t.weight,
                });
            }
            for (i, f) in r.fallbacks.iter().enumerate() {
                if !msg.routes.contains_key(f) {
                    return Err(invalid(
                        format!("{path}.fallbacks[{i}]"),
                        format!("unknown route {f:?}"),
                    ));
                }
            }
            let rules: Result<Vec<RouteRule>, InvalidSnapshot> = r
                .rules
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    if !m.route.is_empty() && !msg.routes.contains_key(&m.route) {
                        return Err(invalid(
                            format!("{path}.rules[{i}].route"),
                            format!("unknown route {:?}", m.route),
                        ));
                    }
                    Ok(RouteRule {
                        when: RuleCondition {
                            prompt_tokens_over: m.prompt_tokens_over,
                            max_tokens_over: m.max_tokens_over,
                            tools: m.tools,
                            images: m.images,
                            header: (!m.header_name.is_empty())
                                .then(|| (m.header_name.clone(), m.header_value.clone())),
                            tag: (!m.tag.is_empty()).then(|| m.tag.clone()),
                            tenants: m.tenants.clone(),
                        },
                        route: m.route.clone(),
                        filter: m.filter.as_ref().map(|f| TargetFilter {
                            keep: f.keep.iter().map(match_from).collect(),
                            drop: f.drop.iter().map(match_from).collect(),
                        }),
                    })
                })
                .collect();
            routes.insert(
                name.clone(),
                Arc::new(RouteSnapshot {
                    name: name.clone(),
                    strategy,
                    targets,
                    fallbacks: r.fallbacks.clone(),
                    first_token_timeout: (r.first_token_timeout_ms > 0)
                        .then(|| Duration::from_millis(r.first_token_timeout_ms)),
                    max_attempts: (r.max_attempts > 0).then_some(r.max_attempts),
                    retry: match &r.retry {
                        None => RetryPolicy::default(),
                        Some(m) => RetryPolicy {
                            attempts: m.attempts.min(MAX_RETRIES),
                            budget_percent: m.budget_percent,
                            budget_floor: m.budget_floor,
                            backoff: Duration::from_millis(m.backoff_ms),
                            max_wait: Duration::from_millis(m.max_wait_ms),
                        },
                    },
                    attempt_timeout: (r.attempt_timeout_ms > 0)
                        .then(|| Duration::from_millis(r.attempt_timeout_ms)),
                    rules: rules?,
                    downgrade: match &r.downgrade {
                        None => None,
                        Some(d) if !msg.routes.contains_key(&d.route) => {
                            return Err(invalid(
                                format!("{path}.downgrade.route"),
                                format!("unknown route {:?}", d.route),
                            ))
                        }
                        Some(d) => Some(Downgrade {
                            route: d.route.clone(),
                            ttft_over: (d.ttft_over_ms > 0)
                                .then(|| Duration::from_millis(d.ttft_over_ms)),
                        }),
                    },
                    hedge: match &r.hedge {
                        None => None,
                        Some(h) if h.delay_ms == 0 => {
                            return Err(invalid(
                                format!("{path}.hedge.delay_ms"),
                                "must be greater than 0",
                            ))
                        }
                        Some(h) => Some(HedgePolicy {
                            delay: Duration::from_millis(h.delay_ms),
                            after_p95: h.after_p95,
                            min_delay: Duration::from_millis(h.min_delay_ms),
                        }),
                    },
                    resume: r.resume,
                }),
            );
        }
        let tenants = tenants_from_wire(msg.tenants, msg.virtual_keys, msg.spend)?;
        let l = msg.limits.ok_or_else(|| InvalidSnapshot::MissingField {
            path: "limits".into(),
        })?;
        for (field, v) in [
            ("max_body_bytes", l.max_body_bytes),
            ("upstream_timeout_ms", l.upstream_timeout_ms),
            ("stream_idle_timeout_ms", l.stream_idle_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(format!("limits.{field}"), "must be greater than 0"));
            }
        }
        let limits = LimitsSnapshot {
            max_body_bytes: usize::try_from(l.max_body_bytes)
                .map_err(|_| invalid("limits.max_body_bytes", "too large"))?,
            upstream_timeout: Duration::from_millis(l.upstream_timeout_ms),
            stream_idle_timeout: Duration::from_millis(l.stream_idle_timeout_ms),
            first_token_timeout: (l.first_token_timeout_ms > 0)
                .then(|| Duration::from_millis(l.first_token_timeout_ms)),
        };
        let regions = msg
            .regions
            .into_iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    RegionSnapshot {
                        name,
                        jurisdiction: opt(&r.jurisdiction),
                        egress: r.egress,
                        hostname: opt(&r.hostname),
                    },
                )
            })
            .collect();
        let scores = msg.scores.map(Scores::from).unwrap_or_default();
        Ok(SnapshotBuilder {
            version: msg.version,
            providers,
            aliases,
            tenants,
            limits,
            regions,
            routes,
            scores: Arc::new(scores),
        }
        .build())
    }
}

/// The tenant part of a snapshot message: tenants, virtual keys and the
/// fleet's spend. Also what a node swaps in on a refresh of the same
/// policy version (new keys, revocations, spend, leases).
pub fn tenants_from_wire(
    tenant_msgs: Vec<pb::TenantMsg>,
    virtual_keys: Vec<pb::VirtualKeyMsg>,
    spend: HashMap<String, pb::SpendMsg>,
) -> Result<Tenants, InvalidSnapshot> {
    let mut tenants = Tenants::default();
    let mut ids = HashSet::new();
    for (i, t) in tenant_msgs.into_iter().enumerate() {
        let path = format!("tenants[{i}]");
        let hash: Option<[u8; 32]> = if t.key_sha256.is_empty() {
            None
        } else {
            Some(
                t.key_sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| invalid(format!("{path}.key_sha256"), "must be 32 bytes"))?,
            )
        };
        if !ids.insert(t.id.clone()) {
            return Err(invalid(format!("{path}.id"), "duplicate tenant id"));
        }
        for (field, v) in [
            ("monthly_budget_usd", t.monthly_budget_usd),
            ("daily_budget_usd", t.daily_budget_usd),
            ("budget_warn_ratio", t.budget_warn_ratio),
            ("limit_share", t.limit_share),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(format!("{path}.{field}"), "must be non-negative"));
            }
        }
        if t.limit_share > 1.0 || t.budget_warn_ratio > 1.0 {
            return Err(invalid(format!("{path}.limit_share"), "at most 1"));
        }
        let positive = |v: f64| (v > 0.0).then_some(v);
        let tenant = Tenant {
            id: t.id,
            allowed_models: t.allowed_models.map(|a| a.models),
            rpm: (t.rpm > 0).then_some(t.rpm),
            tpm: (t.tpm > 0).then_some(t.tpm),
            concurrency: (t.concurrency > 0).then_some(t.concurrency),
            daily_budget_usd: positive(t.daily_budget_usd),
            monthly_budget_usd: positive(t.monthly_budget_usd),
            budget_warn_ratio: positive(t.budget_warn_ratio),
            fail_closed: t.fail_closed,
            limit_share: positive(t.limit_share),
            residency: (!t.residency.is_empty()).then_some(t.residency),
            edge_residency_relaxed: t.edge_residency_relaxed,
            hedge_budget_percent: t.hedge_budget_percent.map(|p| p.min(100)),
        };
        match hash {
            Some(hash) => tenants.insert(KeyHash(hash), tenant),
            None => tenants.insert_keyless(tenant),
        }
    }
    for (i, k) in virtual_keys.into_iter().enumerate() {
        let path = format!("virtual_keys[{i}]");
        let hash: [u8; 32] = k
            .key_sha256
            .as_slice()
            .try_into()
            .map_err(|_| invalid(format!("{path}.key_sha256"), "must be 32 bytes"))?;
        for (field, v) in [
            ("daily_budget_usd", k.daily_budget_usd),
            ("monthly_budget_usd", k.monthly_budget_usd),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(format!("{path}.{field}"), "must be non-negative"));
            }
        }
        let positive = |v: f64| (v > 0.0).then_some(v);
        // A key of a tenant this snapshot does not have grants nothing.
        tenants.insert_virtual_key(
            KeyHash(hash),
            VirtualKey {
                id: k.id,
                tenant: k.tenant,
                allowed_models: k.allowed_models.map(|a| a.models),
                limits: LimitSet {
                    rpm: (k.rpm > 0).then_some(k.rpm),
                    tpm: (k.tpm > 0).then_some(k.tpm),
                    concurrency: (k.concurrency > 0).then_some(k.concurrency),
                    daily_usd: positive(k.daily_budget_usd),
                    monthly_usd: positive(k.monthly_budget_usd),
                },
                expires_at_ms: (k.expires_at_ms > 0).then_some(k.expires_at_ms),
            },
        );
    }
    for (scope, sp) in spend {
        let finite = |x: f64| if x.is_finite() && x >= 0.0 { x } else { 0.0 };
        tenants.set_spend(
            scope,
            Spend {
                day_usd: finite(sp.day_usd),
                month_usd: finite(sp.month_usd),
                day: sp.day,
                month: sp.month,
            },
        );
    }
    Ok(tenants)
}

/// Scores carry no invariants a node relies on, so this cannot fail;
/// non-finite numbers are dropped rather than trusted.
impl From<pb::ScoresMsg> for Scores {
    fn from(m: pb::ScoresMsg) -> Self {
        let finite = |x: f64| if x.is_finite() { x } else { 0.0 };
        Scores {
            targets: m
                .targets
                .into_iter()
                .map(|t| {
                    (
                        ScoreKey {
                            provider: t.provider,
                            model: t.model,
                            region: t.region,
                        },
                        TargetScore {
                            requests: t.requests,
                            error_rate: finite(t.error_rate),
                            ttft_p50_ms: finite(t.ttft_p50_ms),
                            ttft_p95_ms: finite(t.ttft_p95_ms),
                            ttft_p99_ms: finite(t.ttft_p99_ms),
                        },
                    )
                })
                .collect(),
            backhaul: m
                .backhaul
                .into_iter()
                .map(|r| {
                    (
                        (r.edge_region, r.egress_region),
                        RttScore {
                            p50_ms: finite(r.p50_ms),
                            p95_ms: finite(r.p95_ms),
                            p99_ms: finite(r.p99_ms),
                        },
                    )
                })
                .collect(),
            computed_at_ms: m.computed_at_ms,
        }
    }
}

fn match_msg(m: &TargetMatch) -> pb::TargetMatchMsg {
    pb::TargetMatchMsg {
        provider: m.provider.clone(),
        model: m.model.clone(),
        region: m.region.clone(),
    }
}

fn match_from(m: &pb::TargetMatchMsg) -> TargetMatch {
    TargetMatch {
        provider: m.provider.clone(),
        model: m.model.clone(),
        region: m.region.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResolvedKey;

    fn sample() -> Snapshot {
        let mut s = SnapshotBuilder {
            version: 7,
            ..Snapshot::builder()
        };
        s.providers.insert(
            "p".into(),
            Arc::new(ProviderSnapshot {
                name: "p".into(),
                kind: ProviderKind::Anthropic,
                base_url: "https://a".into(),
                keys: vec![ResolvedKey::new(
                    "main",
                    "k0",
                    &PoolKey::new(0, KeySource::Env("K".into())),
                    Secret::new("resolved-never-sent"),
                )],
                models: vec!["m".into()],
                simulated: None,
                region: Some("eu-west".into()),
                jurisdiction: Some("eu".into()),
                pricing: HashMap::from([("m".into(), ModelPrice::default())]),
                prefill: Default::default(),
                key_pools: vec![KeyPoolSnapshot {
                    name: "main".into(),
                    region: Some("eu-west".into()),
                    jurisdictions: vec![],
                    keys: vec![
                        PoolKey::new(0, KeySource::Env("K".into())),
                        PoolKey {
                            id: "backup".into(),
                            weight: 3,
                            rpm: Some(60),
                            tpm: Some(100_000),
                            source: KeySource::Inline(Secret::new("v")),
                        },
                    ],
                }],
            }),
        );
        s.tenants.insert(
            KeyHash::of("k"),
            Tenant {
                id: "t".into(),
                allowed_models: Some(vec!["p/m".into()]),
                rpm: Some(5),
                monthly_budget_usd: Some(10.0),
                residency: Some(vec!["eu".into()]),
                ..Tenant::default()
            },
        );
        s.build()
    }

    #[test]
    fn round_trips_without_resolved_keys() {
        let msg = pb::SnapshotMsg::from(&sample());
        let back = Snapshot::try_from(msg).unwrap();
        let p = &back.providers()["p"];
        assert!(p.keys.is_empty(), "resolved keys never travel");
        assert_eq!(p.key_pools, sample().providers()["p"].key_pools);
        let t = back.tenant_for_key("k").unwrap();
        assert!(t.may_use("p/m"));
        assert_eq!(t.rpm, Some(5));
        assert!(Arc::ptr_eq(t, back.tenant("t").unwrap()), "one record");
    }

    #[test]
    fn key_identity_travels_and_defaults_for_older_senders() {
        let mut msg = pb::SnapshotMsg::from(&sample());
        let keys = &msg.providers["p"].key_pools[0].keys;
        assert_eq!(
            (keys[1].id.as_str(), keys[1].weight, keys[1].rpm),
            ("backup", 3, 60)
        );
        // A control plane that predates key identity sends none of it.
        for k in &mut msg.providers.get_mut("p").unwrap().key_pools[0].keys {
            (k.id, k.weight, k.rpm, k.tpm) = (String::new(), 0, 0, 0);
        }
        let back = Snapshot::try_from(msg.clone()).unwrap();
        let keys = &back.providers()["p"].key_pools[0].keys;
        assert_eq!(
            (keys[1].id.as_str(), keys[1].weight, keys[1].rpm),
            ("k1", 1, None)
        );

        msg.providers.get_mut("p").unwrap().key_pools[0].keys[1].id = "k0".into();
        assert_eq!(
            Snapshot::try_from(msg.clone()).unwrap_err().to_string(),
            "providers.p.key_pools[0].keys[1].id: duplicate key id in the pool"
        );
        let pools = &mut msg.providers.get_mut("p").unwrap().key_pools;
        pools[0].keys[1].id = "k1".into();
        pools.push(pools[0].clone());
        assert_eq!(
            Snapshot::try_from(msg).unwrap_err().to_string(),
            "providers.p.key_pools[1].name: duplicate pool name"
        );
    }

    #[test]
    fn malformed_messages_name_the_field() {
        let mut msg = pb::SnapshotMsg::from(&sample());
        msg.providers.get_mut("p").unwrap().kind = 99;
        let e = Snapshot::try_from(msg).unwrap_err();
        assert_eq!(
            e,
            InvalidSnapshot::InvalidEnum {
                path: "providers.p.kind".into(),
                value: 99
            }
        );
        let mut msg = pb::SnapshotMsg::from(&sample());
        msg.routes.insert(
            "r".into(),
            pb::RouteMsg {
                name: "r".into(),
                strategy: 0,
                targets: vec![pb::RouteTargetMsg {
                    provider: "ghost".into(),
                    model: "m".into(),
                    weight: 1,
                }],
                fallbacks: vec![],
                first_token_timeout_ms: 0,
                max_attempts: 0,
                retry: None,
                attempt_timeout_ms: 0,
                rules: vec![],
                downgrade: None,
                hedge: None,
                resume: false,
            },
        );
        let e = Snapshot::try_from(msg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "routes.r.targets[0].provider: unknown provider \"ghost\""
        );
        let mut msg = pb::SnapshotMsg::from(&sample());
        msg.tenants[0].key_sha256 = vec![1, 2];
        assert!(Snapshot::try_from(msg)
            .unwrap_err()
            .to_string()
            .starts_with("tenants[0].key_sha256"));
    }
}
