//! The `regions` and `providers` sections: endpoints, key pools, pricing,
//! simulated settings and fault layers, plus the providers the environment
//! and the built-in simulator add.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::{
    FaultMode, KeyPoolSnapshot, KeySource, ModelPrice, PoolKey, Prefill, ProviderKind,
    ProviderSnapshot, RegionSnapshot, SimulatedFault, SimulatedProfile, SimulatedSettings,
};

use super::{
    default_models, is_http_url, is_key_id, is_tag, live_note, Errors, FaultDoc, PolicyDocument,
    PolicyOptions, PrefillDoc, ProfileDoc, ProviderDoc, SimulatedDoc, ENV_PROVIDERS,
};
use crate::secrets::MASTER_KEY_ENV;

/// Provider name → why it is or is not live.
pub(super) type Status = Vec<(String, String)>;

/// A variable of `opts.env`; blank counts as unset.
fn env(opts: &PolicyOptions<'_>, name: &str) -> Option<String> {
    (opts.env)(name).filter(|v| !v.trim().is_empty())
}

fn region_jurisdiction(doc: &PolicyDocument, region: &str) -> Option<String> {
    doc.regions.get(region).and_then(|r| r.jurisdiction.clone())
}

/// Regions come first: providers and pools refer to them.
pub(super) fn regions(
    doc: &PolicyDocument,
    errors: &mut Errors,
) -> HashMap<String, RegionSnapshot> {
    let mut err = errors.sink();
    let mut regions = HashMap::new();
    for (name, r) in &doc.regions {
        for (i, addr) in r.egress.iter().enumerate() {
            let valid = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                err(
                    format!("regions.{name}.egress[{i}]"),
                    format!("expected host:port, got {addr:?}"),
                );
            }
        }
        if r.jurisdiction.as_deref().is_some_and(|j| !is_tag(j)) {
            err(
                format!("regions.{name}.jurisdiction"),
                "must be a lowercase tag such as eu or us".into(),
            );
        }
        regions.insert(
            name.clone(),
            RegionSnapshot {
                name: name.clone(),
                jurisdiction: r.jurisdiction.clone(),
                egress: r.egress.clone(),
                hostname: r.hostname.clone(),
            },
        );
    }
    regions
}

/// Every jurisdiction some region or provider declares: the only tags pools
/// and tenants may name.
pub(super) fn jurisdictions(doc: &PolicyDocument) -> HashSet<String> {
    let mut jurisdictions: HashSet<String> = doc
        .regions
        .values()
        .filter_map(|r| r.jurisdiction.clone())
        .collect();
    jurisdictions.extend(
        doc.providers
            .values()
            .filter_map(|p| p.jurisdiction.clone()),
    );
    jurisdictions
}

/// The declared providers, then the environment's (with
/// `opts.env_providers`), then the built-in simulator (with
/// `opts.include_simulated`, unless a simulated provider is declared).
pub(super) fn providers(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    jurisdictions: &HashSet<String>,
    errors: &mut Errors,
) -> (HashMap<String, Arc<ProviderSnapshot>>, Status) {
    let mut err = errors.sink();
    let mut providers: HashMap<String, Arc<ProviderSnapshot>> = HashMap::new();
    let mut status = Vec::new();

    for (name, p) in &doc.providers {
        if let Some((provider, note)) =
            declared_provider(doc, opts, jurisdictions, name, p, &mut err)
        {
            status.push((name.clone(), note));
            providers.insert(name.clone(), Arc::new(provider));
        }
    }
    if opts.env_providers {
        env_providers(doc, opts, &mut providers, &mut status, &mut err);
    }
    if opts.include_simulated
        && !providers
            .values()
            .any(|p| p.kind == ProviderKind::Simulated)
    {
        let name = "simulated".to_string();
        status.push((name.clone(), "live: built-in simulated provider".into()));
        providers.insert(
            name.clone(),
            Arc::new(ProviderSnapshot {
                name,
                kind: ProviderKind::Simulated,
                base_url: String::new(),
                keys: Vec::new(),
                models: default_models(ProviderKind::Simulated)
                    .iter()
                    .map(|m| m.to_string())
                    .collect(),
                simulated: Some(SimulatedSettings::default()),
                region: None,
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: Default::default(),
                key_pools: Vec::new(),
            }),
        );
    }
    (providers, status)
}

/// One entry of `providers` and its status line; `None` when it is too
/// broken to serve (its errors are reported).
fn declared_provider(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    jurisdictions: &HashSet<String>,
    name: &str,
    p: &ProviderDoc,
    err: &mut impl FnMut(String, String),
) -> Option<(ProviderSnapshot, String)> {
    let path = format!("providers.{name}");
    if name.is_empty() || name.contains('/') {
        err(
            path.clone(),
            "provider names must be non-empty and contain no '/'".into(),
        );
        return None;
    }
    let kind: ProviderKind = p.kind.into();
    let env_default = ENV_PROVIDERS.iter().find(|e| e.1 == kind && e.0 == name);
    let base_url = match (&p.base_url, kind) {
        (Some(u), _) => u.clone(),
        (None, ProviderKind::Simulated) => String::new(),
        (None, ProviderKind::OpenAiCompatible) => {
            err(
                format!("{path}.base_url"),
                "required for kind openai-compatible".into(),
            );
            return None;
        }
        (None, _) => {
            let (_, _, _, url_var, default) = ENV_PROVIDERS
                .iter()
                .find(|e| e.1 == kind)
                .copied()
                .unwrap_or(ENV_PROVIDERS[0]);
            env(opts, url_var).unwrap_or_else(|| default.to_string())
        }
    };
    if kind != ProviderKind::Simulated && !is_http_url(&base_url) {
        err(
            format!("{path}.base_url"),
            format!("must be an http:// or https:// URL, got {base_url:?}"),
        );
        return None;
    }
    if kind == ProviderKind::Simulated && p.base_url.is_some() {
        err(
            format!("{path}.base_url"),
            "the simulated provider has no endpoint".into(),
        );
    }
    if kind != ProviderKind::Simulated && p.simulated.is_some() {
        err(
            format!("{path}.simulated"),
            "only valid for kind simulated (use `faults` to inject faults in front of a real provider)".into(),
        );
    }
    if kind == ProviderKind::Simulated && p.faults.is_some() {
        err(
            format!("{path}.faults"),
            "the simulated provider takes its faults under `simulated`".into(),
        );
    }
    if let Some(region) = &p.region {
        if !doc.regions.contains_key(region) {
            err(
                format!("{path}.region"),
                format!("unknown region {region:?}"),
            );
        }
    }
    if p.jurisdiction.as_deref().is_some_and(|j| !is_tag(j)) {
        err(
            format!("{path}.jurisdiction"),
            "must be a lowercase tag such as eu or us".into(),
        );
    }
    let jurisdiction = p.jurisdiction.clone().or_else(|| {
        p.region
            .as_deref()
            .and_then(|r| region_jurisdiction(doc, r))
    });

    let pricing = pricing(&path, p, err);
    let key_var = p
        .api_key_env
        .clone()
        .or_else(|| env_default.map(|e| e.2.to_string()));
    let key_pools = key_pools(
        doc,
        opts,
        jurisdictions,
        &path,
        p,
        key_var,
        jurisdiction.as_ref(),
        err,
    );

    let simulated = if kind == ProviderKind::Simulated {
        Some(simulated_settings(
            p.simulated.as_ref(),
            &format!("{path}.simulated"),
            err,
        ))
    } else {
        p.faults
            .as_ref()
            .map(|f| fault_layer_settings(f, &format!("{path}.faults"), err))
    };
    let models = if p.models.is_empty() {
        default_models(kind).iter().map(|m| m.to_string()).collect()
    } else {
        p.models.clone()
    };
    let prefill = prefill(&path, kind, p.prefill, err);
    let note = live_note(kind, &base_url, key_pools.len());
    let provider = ProviderSnapshot {
        name: name.to_string(),
        kind,
        base_url: base_url.trim_end_matches('/').to_string(),
        keys: Vec::new(),
        models,
        simulated,
        region: p.region.clone(),
        jurisdiction,
        pricing,
        prefill,
        key_pools,
    };
    Some((provider, note))
}

/// What a kind of provider is known to support without being told:
/// Anthropic continues a trailing assistant message (documented prefill);
/// OpenAI's own API has no prefill.
fn default_prefill(kind: ProviderKind) -> Prefill {
    match kind {
        ProviderKind::Anthropic => Prefill::TrailingAssistant,
        _ => Prefill::None,
    }
}

/// `providers.P.prefill`: declared, never guessed. The OpenAI-compatible
/// styles need an OpenAI-compatible server that documents them; a style a
/// kind cannot speak is refused rather than silently never used.
fn prefill(
    path: &str,
    kind: ProviderKind,
    declared: Option<PrefillDoc>,
    err: &mut impl FnMut(String, String),
) -> Prefill {
    let Some(declared) = declared else {
        return default_prefill(kind);
    };
    let (prefill, fits) = match declared {
        PrefillDoc::None => (Prefill::None, true),
        PrefillDoc::TrailingAssistant => {
            (Prefill::TrailingAssistant, kind == ProviderKind::Anthropic)
        }
        PrefillDoc::Prefix => (Prefill::Prefix, kind == ProviderKind::OpenAiCompatible),
        PrefillDoc::ContinueFinalMessage => (
            Prefill::ContinueFinalMessage,
            kind == ProviderKind::OpenAiCompatible,
        ),
    };
    if !fits {
        err(
            format!("{path}.prefill"),
            format!(
                "`{}` is not supported by kind {} (trailing_assistant: anthropic; prefix and continue_final_message: openai-compatible servers that document them; none: any)",
                prefill.as_str(),
                kind.as_str()
            ),
        );
        return Prefill::None;
    }
    prefill
}

fn pricing(
    path: &str,
    p: &ProviderDoc,
    err: &mut impl FnMut(String, String),
) -> HashMap<String, ModelPrice> {
    let mut pricing = HashMap::new();
    for (model, price) in &p.pricing {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !ok(price.input) || !ok(price.output) || !price.cached_input.is_none_or(ok) {
            err(
                format!("{path}.pricing.{model}"),
                "input and output must be non-negative numbers (USD per million tokens)".into(),
            );
            continue;
        }
        pricing.insert(
            model.clone(),
            ModelPrice {
                input_per_million: price.input,
                output_per_million: price.output,
                cached_input_per_million: price.cached_input,
            },
        );
    }
    pricing
}

/// The `default` pool `api_key_env` (or the kind's usual variable) makes,
/// then the declared `key_pools`.
#[allow(clippy::too_many_arguments)]
fn key_pools(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    jurisdictions: &HashSet<String>,
    path: &str,
    p: &ProviderDoc,
    key_var: Option<String>,
    jurisdiction: Option<&String>,
    err: &mut impl FnMut(String, String),
) -> Vec<KeyPoolSnapshot> {
    let mut key_pools = Vec::new();
    if let Some(var) = key_var {
        key_pools.push(KeyPoolSnapshot {
            name: "default".into(),
            region: p.region.clone(),
            jurisdictions: Vec::new(),
            keys: vec![PoolKey::new(0, KeySource::Env(var))],
        });
    }
    for (i, pool) in p.key_pools.iter().enumerate() {
        let ppath = format!("{path}.key_pools[{i}]");
        let region = pool.region.clone().or_else(|| p.region.clone());
        if let Some(r) = &pool.region {
            if !doc.regions.contains_key(r) {
                err(format!("{ppath}.region"), format!("unknown region {r:?}"));
            }
        }
        let allowed: Vec<String> = pool.jurisdictions.clone().unwrap_or_default();
        for (j, tag) in allowed.iter().enumerate() {
            if !jurisdictions.contains(tag) {
                err(
                    format!("{ppath}.jurisdictions[{j}]"),
                    format!("unknown jurisdiction {tag:?} (no region or provider declares it)"),
                );
            }
        }
        // A pool whose own region may not hold it could never be used:
        // almost certainly a mistake, so refuse it.
        let pool_allowed = if allowed.is_empty() {
            jurisdiction.cloned().into_iter().collect()
        } else {
            allowed.clone()
        };
        if let Some(r) = &region {
            if let Some(rj) = region_jurisdiction(doc, r) {
                if !pool_allowed.is_empty() && !pool_allowed.contains(&rj) {
                    err(
                        format!("{ppath}.jurisdictions"),
                        format!(
                            "region {r:?} (jurisdiction {rj}) may not hold this pool's keys (allowed: {})",
                            pool_allowed.join(", ")
                        ),
                    );
                }
            }
        }
        if pool.keys.is_empty() {
            err(
                format!("{ppath}.keys"),
                "a pool needs at least one key".into(),
            );
        }
        let pool_name = pool.name.clone().unwrap_or_else(|| format!("pool-{i}"));
        if key_pools
            .iter()
            .any(|p: &KeyPoolSnapshot| p.name == pool_name)
        {
            err(
                format!("{ppath}.name"),
                format!("another pool of this provider is named {pool_name:?} (`api_key_env` makes one named \"default\")"),
            );
        }
        let mut keys = Vec::new();
        let mut key_ids = HashSet::new();
        for (k, key) in pool.keys.iter().enumerate() {
            let kpath = format!("{ppath}.keys[{k}]");
            let mut identity = PoolKey::new(k, KeySource::Env(String::new()));
            if let Some(id) = &key.id {
                if !is_key_id(id) {
                    err(
                        format!("{kpath}.id"),
                        "must be 1-64 letters, digits, '.', '_' or '-'".into(),
                    );
                }
                identity.id = id.clone();
            }
            if !key_ids.insert(identity.id.clone()) {
                err(
                    format!("{kpath}.id"),
                    format!("duplicate key id {:?} in this pool", identity.id),
                );
            }
            match key.weight {
                Some(0) => err(format!("{kpath}.weight"), "must be greater than 0".into()),
                Some(w) => identity.weight = w,
                None => {}
            }
            // Enforced by the egress's key choice per minute of its board.
            for (field, zero) in [("rpm", key.rpm == Some(0)), ("tpm", key.tpm == Some(0))] {
                if zero {
                    err(
                        format!("{kpath}.{field}"),
                        "must be greater than 0 (leave it out for no limit)".into(),
                    );
                }
            }
            identity.rpm = key.rpm;
            identity.tpm = key.tpm;
            let mut push = |source| {
                keys.push(PoolKey {
                    source,
                    ..identity.clone()
                })
            };
            let set = [
                key.env.is_some(),
                key.file.is_some(),
                key.encrypted.is_some(),
                key.value.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                err(
                    kpath,
                    "set exactly one of env, file, encrypted, value".into(),
                );
                continue;
            }
            if let Some(v) = &key.env {
                push(KeySource::Env(v.clone()));
            } else if let Some(f) = &key.file {
                push(KeySource::File(f.clone()));
            } else if let Some(v) = &key.value {
                push(KeySource::Inline(v.clone()));
            } else if let Some(blob) = &key.encrypted {
                match opts.master_keys.map(|m| m.open(blob)) {
                    Some(Ok(secret)) => push(KeySource::Inline(secret)),
                    Some(Err(e)) => err(format!("{kpath}.encrypted"), e.to_string()),
                    None => err(
                        format!("{kpath}.encrypted"),
                        format!("${MASTER_KEY_ENV} is not set"),
                    ),
                }
            }
        }
        key_pools.push(KeyPoolSnapshot {
            name: pool_name,
            region,
            jurisdictions: allowed,
            keys,
        });
    }
    key_pools
}

/// The providers the environment brings (`OPENAI_API_KEY`, ...) that the
/// document does not declare itself.
fn env_providers(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
    providers: &mut HashMap<String, Arc<ProviderSnapshot>>,
    status: &mut Status,
    err: &mut impl FnMut(String, String),
) {
    for (name, kind, key_var, url_var, default_url) in ENV_PROVIDERS {
        if doc.providers.contains_key(*name) {
            continue;
        }
        if env(opts, key_var).is_none() {
            status.push((name.to_string(), format!("not live: ${key_var} is not set")));
            continue;
        }
        let base_url = env(opts, url_var).unwrap_or_else(|| default_url.to_string());
        if !is_http_url(&base_url) {
            err(
                format!("${url_var}"),
                format!("must be an http:// or https:// URL, got {base_url:?}"),
            );
            continue;
        }
        providers.insert(
            name.to_string(),
            Arc::new(ProviderSnapshot {
                name: name.to_string(),
                kind: *kind,
                base_url: base_url.trim_end_matches('/').to_string(),
                keys: Vec::new(),
                models: default_models(*kind)
                    .iter()
                    .map(|m| m.to_string())
                    .collect(),
                simulated: None,
                region: None,
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: default_prefill(*kind),
                key_pools: vec![KeyPoolSnapshot {
                    name: "default".into(),
                    region: None,
                    jurisdictions: Vec::new(),
                    keys: vec![PoolKey::new(0, KeySource::Env(key_var.to_string()))],
                }],
            }),
        );
    }
}

fn simulated_settings(
    doc: Option<&SimulatedDoc>,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> SimulatedSettings {
    match doc {
        Some(doc) => settings_over(&SimulatedProfile::default(), doc, path, err),
        None => SimulatedSettings::default(),
    }
}

/// `doc`'s default profile over `base`, and each model's over that.
fn settings_over(
    base: &SimulatedProfile,
    doc: &SimulatedDoc,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> SimulatedSettings {
    let base = profile(base, &doc.defaults, path, err);
    let models = doc
        .models
        .iter()
        .map(|(m, p)| {
            (
                m.clone(),
                profile(&base, p, &format!("{path}.models.{m}"), err),
            )
        })
        .collect();
    SimulatedSettings {
        default_profile: base,
        models,
        allow_header: doc.allow_header,
    }
}

/// `faults` of a real provider: the simulated profile's fault and delay
/// fields, with no delay unless one is asked for; the fields that shape a
/// simulated answer are refused, as a real provider writes its own.
fn fault_layer_settings(
    doc: &SimulatedDoc,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> SimulatedSettings {
    let answer_only = |p: &ProfileDoc, at: &str, err: &mut dyn FnMut(String, String)| {
        for (field, set) in [
            ("tokens_per_second", p.tokens_per_second.is_some()),
            ("output_tokens", p.output_tokens.is_some()),
        ] {
            if set {
                err(
                    format!("{at}.{field}"),
                    "only the simulated provider shapes answers; faults take ttft_ms and fault"
                        .into(),
                );
            }
        }
    };
    answer_only(&doc.defaults, path, &mut *err);
    for (m, p) in &doc.models {
        answer_only(p, &format!("{path}.models.{m}"), &mut *err);
    }
    let no_delay = SimulatedProfile {
        ttft: Duration::ZERO,
        ..SimulatedProfile::default()
    };
    settings_over(&no_delay, doc, path, err)
}

fn profile(
    base: &SimulatedProfile,
    doc: &ProfileDoc,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> SimulatedProfile {
    let mut p = base.clone();
    if let Some(ms) = doc.ttft_ms {
        p.ttft = Duration::from_millis(ms);
    }
    if let Some(tps) = doc.tokens_per_second {
        if !(tps > 0.0 && tps.is_finite()) {
            err(
                format!("{path}.tokens_per_second"),
                "must be a positive number".into(),
            );
        } else {
            p.tokens_per_second = tps;
        }
    }
    if let Some(n) = doc.output_tokens {
        p.output_tokens = n;
    }
    if let Some(f) = &doc.fault {
        p.fault = fault(f, &format!("{path}.fault"), err);
    }
    p
}

fn fault(
    doc: &FaultDoc,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> Option<SimulatedFault> {
    let rate = doc.rate.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&rate) {
        err(
            format!("{path}.rate"),
            format!("must be between 0 and 1, got {rate}"),
        );
        return None;
    }
    let chosen = [doc.status.is_some(), doc.hang, doc.drop_after.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        err(
            path.to_string(),
            "set exactly one of status, hang, drop_after".into(),
        );
        return None;
    }
    let mode = if let Some(status) = doc.status {
        if !(400..=599).contains(&status) {
            err(
                format!("{path}.status"),
                format!("must be an error status (400-599), got {status}"),
            );
            return None;
        }
        FaultMode::Status {
            status,
            retry_after: doc.retry_after,
        }
    } else if doc.hang {
        FaultMode::Hang
    } else {
        FaultMode::DropAfter {
            chunks: doc.drop_after.unwrap_or(0),
        }
    };
    Some(SimulatedFault { rate, mode })
}
