//! The policy document: what operators write, and how it becomes a snapshot.
//!
//! Parsing is strict (`deny_unknown_fields`) so a typo is an error, not a
//! silently ignored setting. Validation is pure and reports every problem at
//! once, each with the path to the offending field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use switchyard_proto::{
    FaultMode, KeyHash, LimitsSnapshot, ProviderKind, ProviderSnapshot, RegionSnapshot,
    RouteTarget, Secret, SimulatedFault, SimulatedProfile, SimulatedSettings, Snapshot,
    TenantSnapshot,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default)]
    pub limits: LimitsDoc,
    /// Provider name (the `provider/` prefix clients use) → provider.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderDoc>,
    /// Alias → `provider/model`.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub tenants: Vec<TenantDoc>,
    /// Region name → region.
    #[serde(default)]
    pub regions: BTreeMap<String, RegionDoc>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDoc {
    /// Jurisdiction tag (e.g. `eu`, `us`) for residency rules.
    pub jurisdiction: Option<String>,
    /// Egress node addresses (`host:port`) serving this region.
    #[serde(default)]
    pub egress: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDoc {
    pub max_body_bytes: Option<usize>,
    pub upstream_timeout_ms: Option<u64>,
    pub stream_idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKindDoc {
    Openai,
    OpenaiCompatible,
    Anthropic,
    Gemini,
    Simulated,
}

impl From<ProviderKindDoc> for ProviderKind {
    fn from(k: ProviderKindDoc) -> Self {
        match k {
            ProviderKindDoc::Openai => ProviderKind::OpenAi,
            ProviderKindDoc::OpenaiCompatible => ProviderKind::OpenAiCompatible,
            ProviderKindDoc::Anthropic => ProviderKind::Anthropic,
            ProviderKindDoc::Gemini => ProviderKind::Gemini,
            ProviderKindDoc::Simulated => ProviderKind::Simulated,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderDoc {
    pub kind: ProviderKindDoc,
    /// Overrides the kind's default endpoint (and the `*_BASE_URL` variable).
    pub base_url: Option<String>,
    /// Environment variable holding the key; several comma-separated keys form a pool.
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    /// Only for `kind: simulated`.
    pub simulated: Option<SimulatedDoc>,
    /// Region (key of `regions`) whose egress nodes call this provider.
    pub region: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedDoc {
    #[serde(flatten)]
    pub defaults: ProfileDoc,
    /// Per-model overrides of the defaults.
    #[serde(default)]
    pub models: BTreeMap<String, ProfileDoc>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileDoc {
    pub ttft_ms: Option<u64>,
    pub tokens_per_second: Option<f64>,
    pub output_tokens: Option<u32>,
    pub fault: Option<FaultDoc>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDoc {
    /// Probability in [0, 1]; default 1.
    pub rate: Option<f64>,
    pub status: Option<u16>,
    pub retry_after: Option<u32>,
    #[serde(default)]
    pub hang: bool,
    pub drop_after: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDoc {
    pub id: String,
    /// Hex SHA-256 of the virtual key; the key itself is never stored.
    pub key_sha256: String,
    /// Model names (as clients write them) the tenant may use; absent = all.
    pub allowed_models: Option<Vec<String>>,
}

/// One problem in a policy document, located by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for PolicyError {}

/// Parses YAML strictly. A syntax or type error is reported with its path.
pub fn parse_policy(yaml: &str) -> Result<PolicyDocument, PolicyError> {
    if yaml.trim().is_empty() {
        return Ok(PolicyDocument::default());
    }
    let de = serde_norway::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(de).map_err(|e| PolicyError {
        path: match e.path().to_string().as_str() {
            "." => String::new(),
            p => p.to_string(),
        },
        message: e.inner().to_string(),
    })
}

pub struct CompileOptions<'a> {
    /// Reads the environment; injected so compilation stays pure in tests.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Add the built-in `simulated` provider when the document has none.
    pub include_simulated: bool,
    pub version: u64,
}

#[derive(Debug)]
pub struct Compiled {
    pub snapshot: Snapshot,
    /// Provider name → why it is or is not live, for the start-up banner.
    pub provider_status: Vec<(String, String)>,
}

const OPENAI_DEFAULT_URL: &str = "https://api.openai.com/v1";
const ANTHROPIC_DEFAULT_URL: &str = "https://api.anthropic.com";
const GEMINI_DEFAULT_URL: &str = "https://generativelanguage.googleapis.com";

fn default_models(kind: ProviderKind) -> &'static [&'static str] {
    match kind {
        ProviderKind::OpenAi => &[
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o4-mini",
            "text-embedding-3-small",
        ],
        ProviderKind::Anthropic => &["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"],
        ProviderKind::Gemini => &["gemini-2.5-flash", "gemini-2.5-pro", "gemini-embedding-001"],
        ProviderKind::Simulated => &["sim-small", "sim-large", "sim-embed"],
        ProviderKind::OpenAiCompatible => &[],
    }
}

/// The providers a user gets from the environment alone, with the variables
/// the official SDKs use.
const ENV_PROVIDERS: &[(&str, ProviderKind, &str, &str, &str)] = &[
    (
        "openai",
        ProviderKind::OpenAi,
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        OPENAI_DEFAULT_URL,
    ),
    (
        "anthropic",
        ProviderKind::Anthropic,
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        ANTHROPIC_DEFAULT_URL,
    ),
    (
        "gemini",
        ProviderKind::Gemini,
        "GEMINI_API_KEY",
        "GEMINI_BASE_URL",
        GEMINI_DEFAULT_URL,
    ),
];

/// Validates the document and builds a snapshot, or lists every error.
pub fn compile(
    doc: &PolicyDocument,
    opts: &CompileOptions<'_>,
) -> Result<Compiled, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut err = |path: String, message: String| errors.push(PolicyError { path, message });
    let env = |name: &str| (opts.env)(name).filter(|v| !v.trim().is_empty());

    let mut providers: HashMap<String, Arc<ProviderSnapshot>> = HashMap::new();
    let mut status = Vec::new();

    for (name, p) in &doc.providers {
        let path = format!("providers.{name}");
        if name.is_empty() || name.contains('/') {
            err(
                path.clone(),
                "provider names must be non-empty and contain no '/'".into(),
            );
            continue;
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
                continue;
            }
            (None, _) => {
                let (_, _, _, url_var, default) = ENV_PROVIDERS
                    .iter()
                    .find(|e| e.1 == kind)
                    .copied()
                    .unwrap_or(ENV_PROVIDERS[0]);
                env(url_var).unwrap_or_else(|| default.to_string())
            }
        };
        if kind != ProviderKind::Simulated && !is_http_url(&base_url) {
            err(
                format!("{path}.base_url"),
                format!("must be an http:// or https:// URL, got {base_url:?}"),
            );
            continue;
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
                "only valid for kind simulated".into(),
            );
        }
        let key_var = p
            .api_key_env
            .clone()
            .or_else(|| env_default.map(|e| e.2.to_string()));
        let keys: Vec<Secret> = match &key_var {
            Some(var) => env(var)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|k| !k.is_empty())
                        .map(Secret::new)
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        if let Some(var) = &key_var {
            if keys.is_empty() && kind != ProviderKind::OpenAiCompatible {
                status.push((name.clone(), format!("not live: ${var} is not set")));
                continue;
            }
        }
        let simulated = if kind == ProviderKind::Simulated {
            Some(simulated_settings(
                p.simulated.as_ref(),
                &format!("{path}.simulated"),
                &mut err,
            ))
        } else {
            None
        };
        let models = if p.models.is_empty() {
            default_models(kind).iter().map(|m| m.to_string()).collect()
        } else {
            p.models.clone()
        };
        if let Some(region) = &p.region {
            if !doc.regions.contains_key(region) {
                err(
                    format!("{path}.region"),
                    format!("unknown region {region:?}"),
                );
            }
        }
        status.push((name.clone(), live_note(kind, &base_url, keys.len())));
        providers.insert(
            name.clone(),
            Arc::new(ProviderSnapshot {
                name: name.clone(),
                kind,
                base_url: base_url.trim_end_matches('/').to_string(),
                keys,
                models,
                simulated,
                region: p.region.clone(),
            }),
        );
    }

    for (name, kind, key_var, url_var, default_url) in ENV_PROVIDERS {
        if doc.providers.contains_key(*name) {
            continue;
        }
        let Some(key) = env(key_var) else {
            status.push((name.to_string(), format!("not live: ${key_var} is not set")));
            continue;
        };
        let base_url = env(url_var).unwrap_or_else(|| default_url.to_string());
        if !is_http_url(&base_url) {
            err(
                format!("${url_var}"),
                format!("must be an http:// or https:// URL, got {base_url:?}"),
            );
            continue;
        }
        let keys: Vec<Secret> = key
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(Secret::new)
            .collect();
        status.push((name.to_string(), live_note(*kind, &base_url, keys.len())));
        providers.insert(
            name.to_string(),
            Arc::new(ProviderSnapshot {
                name: name.to_string(),
                kind: *kind,
                base_url: base_url.trim_end_matches('/').to_string(),
                keys,
                models: default_models(*kind)
                    .iter()
                    .map(|m| m.to_string())
                    .collect(),
                simulated: None,
                region: None,
            }),
        );
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
            }),
        );
    }

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
                let declared = doc.providers.contains_key(provider)
                    || ENV_PROVIDERS.iter().any(|e| e.0 == provider)
                    || (provider == "simulated" && opts.include_simulated);
                if !declared {
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

    let mut tenants = HashMap::new();
    let mut seen_ids = HashSet::new();
    for (i, t) in doc.tenants.iter().enumerate() {
        let path = format!("tenants[{i}]");
        if !seen_ids.insert(t.id.clone()) {
            err(
                format!("{path}.id"),
                format!("duplicate tenant id {:?}", t.id),
            );
        }
        match KeyHash::from_hex(&t.key_sha256) {
            Some(hash) => {
                if tenants.contains_key(&hash) {
                    err(
                        format!("{path}.key_sha256"),
                        "another tenant has the same key".into(),
                    );
                }
                tenants.insert(
                    hash,
                    Arc::new(TenantSnapshot {
                        id: t.id.clone(),
                        allowed_models: t.allowed_models.clone(),
                    }),
                );
            }
            None => err(
                format!("{path}.key_sha256"),
                "must be 64 hex characters (SHA-256 of the virtual key)".into(),
            ),
        }
    }

    let defaults = LimitsSnapshot::default();
    let limits = LimitsSnapshot {
        max_body_bytes: doc.limits.max_body_bytes.unwrap_or(defaults.max_body_bytes),
        upstream_timeout: doc
            .limits
            .upstream_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.upstream_timeout),
        stream_idle_timeout: doc
            .limits
            .stream_idle_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.stream_idle_timeout),
    };
    if limits.max_body_bytes == 0 {
        err(
            "limits.max_body_bytes".into(),
            "must be greater than 0".into(),
        );
    }
    if limits.upstream_timeout.is_zero() {
        err(
            "limits.upstream_timeout_ms".into(),
            "must be greater than 0".into(),
        );
    }
    if limits.stream_idle_timeout.is_zero() {
        err(
            "limits.stream_idle_timeout_ms".into(),
            "must be greater than 0".into(),
        );
    }

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
        regions.insert(
            name.clone(),
            RegionSnapshot {
                name: name.clone(),
                jurisdiction: r.jurisdiction.clone(),
                egress: r.egress.clone(),
            },
        );
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Compiled {
        snapshot: Snapshot {
            version: opts.version,
            providers,
            aliases,
            tenants,
            limits,
            regions,
        },
        provider_status: status,
    })
}

fn live_note(kind: ProviderKind, base_url: &str, keys: usize) -> String {
    match kind {
        ProviderKind::Simulated => "live: built-in simulated provider".into(),
        _ => format!("live: {} at {base_url} ({keys} key(s))", kind.as_str()),
    }
}

fn is_http_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    matches!(rest, Some(host) if !host.is_empty() && !host.starts_with('/'))
}

fn simulated_settings(
    doc: Option<&SimulatedDoc>,
    path: &str,
    err: &mut impl FnMut(String, String),
) -> SimulatedSettings {
    let Some(doc) = doc else {
        return SimulatedSettings::default();
    };
    let base = profile(&SimulatedProfile::default(), &doc.defaults, path, err);
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
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_with(yaml: &str, vars: &[(&str, &str)]) -> Result<Compiled, Vec<PolicyError>> {
        let doc = parse_policy(yaml).map_err(|e| vec![e])?;
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = move |k: &str| vars.get(k).cloned();
        compile(
            &doc,
            &CompileOptions {
                env: &env,
                include_simulated: true,
                version: 1,
            },
        )
    }

    #[test]
    fn providers_come_from_the_environment() {
        let c = compile_with(
            "",
            &[
                ("OPENAI_API_KEY", "sk-a,sk-b"),
                ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
                ("ANTHROPIC_API_KEY", "ak"),
            ],
        )
        .unwrap();
        let openai = &c.snapshot.providers["openai"];
        assert_eq!(openai.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(openai.keys.len(), 2);
        assert_eq!(
            c.snapshot.providers["anthropic"].base_url,
            ANTHROPIC_DEFAULT_URL
        );
        assert!(!c.snapshot.providers.contains_key("gemini"));
        assert!(c.snapshot.providers.contains_key("simulated"));
        let status: HashMap<_, _> = c.provider_status.into_iter().collect();
        assert!(status["gemini"].starts_with("not live"));
        assert!(!format!("{:?}", c.snapshot).contains("sk-a"));
    }

    #[test]
    fn yaml_providers_aliases_tenants() {
        let hash = KeyHash::of("sy-team").to_hex();
        let yaml = format!(
            r#"
limits: {{ max_body_bytes: 1024, stream_idle_timeout_ms: 250 }}
providers:
  local:
    kind: openai-compatible
    base_url: http://127.0.0.1:8000/v1
    models: [llama]
  sim:
    kind: simulated
    ttft_ms: 5
    models: [a]
    simulated:
      output_tokens: 3
      models:
        flaky: {{ fault: {{ status: 503, rate: 0.5 }} }}
aliases:
  fast: local/llama
tenants:
  - id: team
    key_sha256: "{hash}"
    allowed_models: [fast]
"#
        );
        let err = compile_with(&yaml, &[]).unwrap_err();
        assert_eq!(err[0].path, "providers.sim.ttft_ms");
        let yaml = yaml.replace("    ttft_ms: 5\n", "");
        let c = compile_with(&yaml, &[]).unwrap();
        let s = &c.snapshot;
        assert_eq!(s.limits.max_body_bytes, 1024);
        assert_eq!(s.resolve("fast").unwrap().provider, "local");
        let t = s.tenant_for_key("sy-team").unwrap();
        assert!(t.may_use("fast") && !t.may_use("local/llama"));
        let sim = s.providers["sim"].simulated.as_ref().unwrap();
        assert_eq!(sim.profile("flaky").output_tokens, 3);
        assert_eq!(sim.profile("flaky").fault.as_ref().unwrap().rate, 0.5);
        assert!(sim.profile("other").fault.is_none());
        // a declared simulated provider replaces the built-in one
        assert!(!s.providers.contains_key("simulated"));
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let yaml = r#"
providers:
  bad:
    kind: openai-compatible
  worse:
    kind: openai-compatible
    base_url: ftp://x
  sim:
    kind: simulated
    simulated:
      models:
        x: { fault: { status: 200 } }
        y: { fault: { rate: 2, hang: true } }
aliases:
  fast: antropic/claude
  weird: nope
tenants:
  - { id: a, key_sha256: "xyz" }
  - { id: a, key_sha256: "xyz" }
"#;
        let errs = compile_with(yaml, &[]).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "providers.bad.base_url",
            "providers.worse.base_url",
            "providers.sim.simulated.models.x.fault.status",
            "providers.sim.simulated.models.y.fault.rate",
            "aliases.fast",
            "aliases.weird",
            "tenants[0].key_sha256",
            "tenants[1].id",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let fast = errs.iter().find(|e| e.path == "aliases.fast").unwrap();
        assert!(fast.to_string().contains("unknown provider \"antropic\""));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = compile_with(
            "providers:\n  x:\n    kind: openai\n    base_ur: http://a\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e[0].path, "providers.x.base_ur");
        assert!(e[0].message.contains("base_ur"), "{}", e[0].message);
        let e = compile_with("providers:\n  x:\n    kind: openia\n", &[]).unwrap_err();
        assert_eq!(e[0].path, "providers.x.kind");
    }
}
