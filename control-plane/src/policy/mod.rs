//! The policy document: what operators write, and how it becomes a snapshot.
//!
//! Parsing is strict (`deny_unknown_fields`) so a typo is an error, not a
//! silently ignored setting. Validation is pure and reports every problem at
//! once, each with the path to the offending field.
//!
//! Two compilers share one validator:
//! - [`compile_policy`] is what the control plane runs: key references stay
//!   references (they are resolved on the egress that uses them) and every
//!   declared provider is kept.
//! - [`compile`] is what `switchyard dev` runs: the single process is also
//!   the egress, so references are resolved here and providers without keys
//!   are left out, as before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use switchyard_proto::{
    KeySource, LimitsSnapshot, ProviderKind, ProviderSnapshot, ResolvedKey, Secret, Snapshot,
    SnapshotBuilder,
};

use crate::secrets::{MasterKeys, MASTER_KEY_ENV};

mod providers;
mod routes;
mod tenants;

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
    /// Route name → ordered targets, fallbacks and strategy. Clients name a
    /// route in `model` like an alias.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteDoc>,
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
    /// Public hostname of the region's edges (`api.eu.example.com`):
    /// tenants refused at another region's edge are told to use it.
    pub hostname: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDoc {
    pub max_body_bytes: Option<usize>,
    pub upstream_timeout_ms: Option<u64>,
    pub stream_idle_timeout_ms: Option<u64>,
    /// Default deadline for a streamed answer's first event, per attempt;
    /// past it the edge tries the route's next target. Unset = none.
    pub first_token_timeout_ms: Option<u64>,
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
    /// Environment variable holding the key; several comma-separated keys
    /// form a pool. Shorthand for one `key_pools` entry with `env:`.
    pub api_key_env: Option<String>,
    /// Keys per region, by reference or encrypted.
    #[serde(default)]
    pub key_pools: Vec<KeyPoolDoc>,
    #[serde(default)]
    pub models: Vec<String>,
    /// Model → price per million tokens.
    #[serde(default)]
    pub pricing: BTreeMap<String, PriceDoc>,
    /// Only for `kind: simulated`.
    pub simulated: Option<SimulatedDoc>,
    /// Fault injection in front of this (real) provider, for development
    /// and resilience tests: `ttft_ms` (added first-token delay), `fault`,
    /// per-model overrides under `models`, and `allow_header` to let
    /// clients' `x-switchyard-simulate` header drive it. Not for
    /// `kind: simulated`, which takes the same settings under `simulated`.
    pub faults: Option<SimulatedDoc>,
    /// Region (key of `regions`) whose egress nodes call this provider.
    pub region: Option<String>,
    /// Where the provider processes data; defaults to the region's.
    pub jurisdiction: Option<String>,
    /// How the provider continues a partial assistant answer, for
    /// mid-stream resume (`routes.R.resume`). Default: `trailing_assistant`
    /// for kind anthropic, `none` for the others.
    pub prefill: Option<PrefillDoc>,
}

/// `providers.P.prefill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefillDoc {
    None,
    /// A trailing assistant message is continued (Anthropic).
    TrailingAssistant,
    /// A trailing assistant message with `"prefix": true` (DeepSeek, Mistral).
    Prefix,
    /// `continue_final_message: true` with a trailing assistant message (vLLM).
    ContinueFinalMessage,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceDoc {
    /// USD per million input tokens.
    pub input: f64,
    /// USD per million output tokens.
    pub output: f64,
    /// USD per million input tokens served from the provider's prompt
    /// cache; absent = the input price.
    pub cached_input: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPoolDoc {
    /// Defaults to `pool-N`.
    pub name: Option<String>,
    /// Region whose egress nodes receive these keys; defaults to the provider's.
    pub region: Option<String>,
    /// Jurisdictions whose egress nodes may hold these keys; defaults to the
    /// provider's jurisdiction.
    pub jurisdictions: Option<Vec<String>>,
    pub keys: Vec<KeyDoc>,
}

/// Exactly one of `env`, `file`, `encrypted`, `value`; the rest is the
/// key's identity and limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    /// Stable id, unique in the pool (letters, digits, `.`, `_`, `-`);
    /// defaults to `k<index>`. Runtime health (cooldowns, refusals) is
    /// kept per id, so keep it when rotating the value.
    pub id: Option<String>,
    /// Share of traffic among the pool's keys; default 1.
    pub weight: Option<u32>,
    /// Requests per minute this key may be sent; the egress leaves the key
    /// out for the rest of a minute once it is reached.
    pub rpm: Option<u32>,
    /// Tokens per minute (estimated prompt tokens when sent, completion
    /// tokens when known), enforced the same way.
    pub tpm: Option<u64>,
    /// Environment variable on the egress (comma-separated values = several keys).
    pub env: Option<String>,
    /// File on the egress holding the key.
    pub file: Option<String>,
    /// Sealed by the control plane (`v1:...`).
    pub encrypted: Option<String>,
    /// Plain key: `ctl apply` seals it before storing; never stored as is.
    pub value: Option<Secret>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedDoc {
    #[serde(flatten)]
    pub defaults: ProfileDoc,
    /// Per-model overrides of the defaults.
    #[serde(default)]
    pub models: BTreeMap<String, ProfileDoc>,
    /// Honour the client's `x-switchyard-simulate` header for this provider
    /// on edges other than `switchyard dev` (off: such edges refuse it).
    #[serde(default)]
    pub allow_header: bool,
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyDoc {
    #[default]
    Priority,
    Latency,
    Cost,
    Weighted,
    #[serde(rename = "least_busy")]
    LeastBusy,
}

/// `routes.R.retry`: how the route retries after each target was tried
/// once. Every field is optional; defaults in [`switchyard_proto::RetryPolicy`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDoc {
    /// Extra attempts per request (0 = none; at most 10). Default 3.
    pub attempts: Option<u32>,
    /// Retries may add at most this percentage of the route's requests over
    /// a 10 s sliding window. Default 20.
    pub budget_percent: Option<u32>,
    /// ...or this many retries per window, whichever is more. Default 10.
    pub min_retries: Option<u32>,
    /// First backoff (doubling, full jitter). Default 25.
    pub backoff_ms: Option<u64>,
    /// Longest wait before a retry; a `retry-after` over it is not waited
    /// for (the next target is, or the error goes back). Default 1000.
    pub max_wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDoc {
    #[serde(default)]
    pub strategy: StrategyDoc,
    pub targets: Vec<TargetDoc>,
    /// Routes tried (after every target of this one) in order.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Deadline for a streamed answer's first event, per attempt; past it
    /// the next target is tried. Unset = `limits.first_token_timeout_ms`.
    pub first_token_timeout_ms: Option<u64>,
    /// At most this many targets (fallbacks included) are tried per
    /// request. Unset = every target of the plan.
    pub max_attempts: Option<u32>,
    /// Retries after each target was tried once, under a retry budget.
    #[serde(default)]
    pub retry: RetryDoc,
    /// Longest one attempt may take (a stream: to its first event) before
    /// the next target is tried. Unset = only the request's deadline.
    pub attempt_timeout_ms: Option<u64>,
    /// Evaluated in order before planning: the first whose `when` matches
    /// sends the request to its `route` instead.
    #[serde(default)]
    pub rules: Vec<RuleDoc>,
    /// Non-critical requests (`x-switchyard-priority: low`) go to another
    /// route while this one's primary is degraded.
    pub downgrade: Option<DowngradeDoc>,
    /// A text-only stream the provider cuts after it reached the client
    /// continues on another target of the plan that supports prefill.
    #[serde(default)]
    pub resume: bool,
    /// Hedged requests: a second attempt on the next target when the first
    /// has not answered after a delay; the first answer wins.
    pub hedge: Option<HedgeDoc>,
}

/// `routes.R.hedge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgeDoc {
    /// The delay before the second attempt; with `after: p95`, the delay
    /// while the target's p95 first-byte time is unknown. Default 1000.
    pub delay_ms: Option<u64>,
    /// `p95`: wait the target's p95 first-byte time (this edge's, else the
    /// fleet's) instead of a fixed delay.
    pub after: Option<HedgeAfterDoc>,
    /// Floor of the `after: p95` delay. Default 50.
    pub min_delay_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HedgeAfterDoc {
    P95,
}

/// `routes.R.rules[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    pub when: WhenDoc,
    /// Plan the request on this route instead.
    pub route: Option<String>,
    /// Keep only some of the planned targets (after `route`, if given).
    pub filter: Option<FilterDoc>,
}

/// `routes.R.rules[].filter`: `keep` only targets matching one of these
/// (when given), then `drop` those matching one of these.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterDoc {
    #[serde(default)]
    pub keep: Vec<MatchDoc>,
    #[serde(default)]
    pub drop: Vec<MatchDoc>,
}

/// Every field given must equal the target's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchDoc {
    pub provider: Option<String>,
    pub model: Option<String>,
    /// The provider's region.
    pub region: Option<String>,
}

/// Conditions of a rule; every one given must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhenDoc {
    /// Estimated prompt tokens (≈ 4 characters each) above this.
    pub prompt_tokens_over: Option<u64>,
    /// Requested `max_tokens` above this.
    pub max_tokens_over: Option<u64>,
    /// Tools declared (true) or not (false).
    pub tools: Option<bool>,
    /// Images present (true) or not (false).
    pub images: Option<bool>,
    /// One request header and its value, e.g. `{ x-switchyard-priority: low }`.
    pub header: Option<std::collections::BTreeMap<String, String>>,
    /// One of the comma-separated `x-switchyard-tags`.
    pub tag: Option<String>,
    /// Tenant ids.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// `routes.R.downgrade`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DowngradeDoc {
    pub route: String,
    /// The primary also counts as degraded while its first-token p95 (the
    /// fleet's, or this edge's moving average) is over this.
    pub ttft_p95_over_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetDoc {
    pub provider: String,
    pub model: String,
    /// For `strategy: weighted`; default 1.
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantDoc {
    pub id: String,
    /// Hex SHA-256 of the tenant's policy key; the key itself is never
    /// stored. Optional: keys may also be issued with `ctl vkeys create`.
    pub key_sha256: Option<String>,
    /// Model names (as clients write them) the tenant may use; absent = all.
    pub allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: TenantLimitsDoc,
    pub budget: Option<BudgetDoc>,
    /// Jurisdictions the tenant's requests may be processed in; absent = any.
    pub residency: Option<Vec<String>>,
    /// `strict` (the default with `residency`): an edge outside the
    /// tenant's jurisdictions refuses its requests from the key alone,
    /// before reading the body. `relaxed`: it reads and forwards them.
    pub edge_residency: Option<EdgeResidencyDoc>,
    /// Hedged attempts (routes with `hedge`) may add at most this
    /// percentage of the tenant's requests on hedged routes over a 10 s
    /// sliding window (at least one per window); 0 = never hedge.
    /// Default 10.
    pub hedge_budget_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeResidencyDoc {
    Strict,
    Relaxed,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimitsDoc {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens (prompt estimate at admission, corrected with the real
    /// usage) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    /// What edges do while shared counters (Redis) are unreachable:
    /// `open` (default) admits and counts locally, `closed` refuses.
    pub on_counter_error: Option<CounterErrorDoc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterErrorDoc {
    Open,
    Closed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetDoc {
    pub monthly_usd: Option<f64>,
    pub daily_usd: Option<f64>,
    /// Fraction (0..1) of a budget after which answers carry an
    /// `x-switchyard-budget-warning` header.
    pub warn_at: Option<f64>,
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

/// The largest policy document accepted, in bytes. Real policies are a few
/// kilobytes; the cap bounds what one apply can make the control plane hold.
pub const MAX_POLICY_BYTES: usize = 2 * 1024 * 1024;

/// Refuses documents the strict parser must never see: oversized ones, and
/// any anchor or alias. serde_norway expands aliases silently, so one large
/// scalar referenced a few hundred times becomes hundreds of megabytes in
/// memory and in every answer; policy documents do not need them.
pub fn check_document(yaml: &str) -> Result<(), PolicyError> {
    use saphyr_parser::{Event, Parser};
    if yaml.len() > MAX_POLICY_BYTES {
        return Err(PolicyError {
            path: String::new(),
            message: format!(
                "the document is {} bytes; the limit is {MAX_POLICY_BYTES}",
                yaml.len()
            ),
        });
    }
    let at = |line: usize, col: usize, what: &str| PolicyError {
        path: String::new(),
        message: format!("line {line} column {}: {what}", col + 1),
    };
    for event in Parser::new_from_str(yaml) {
        let (event, span) = event.map_err(|e| {
            at(
                e.marker().line(),
                e.marker().col(),
                &format!("invalid YAML: {}", e.info()),
            )
        })?;
        let anchored = match &event {
            Event::Alias(_) => {
                return Err(at(
                    span.start.line(),
                    span.start.col(),
                    "YAML aliases (*name) are not allowed in a policy; write the value out",
                ))
            }
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _) => *anchor != 0,
            _ => false,
        };
        if anchored {
            return Err(at(
                span.start.line(),
                span.start.col(),
                "YAML anchors (&name) are not allowed in a policy; write the value out",
            ));
        }
    }
    Ok(())
}

/// Parses YAML strictly. A syntax or type error is reported with its path.
/// Anchors, aliases and documents over [`MAX_POLICY_BYTES`] are refused
/// before parsing (see [`check_document`]).
pub fn parse_policy(yaml: &str) -> Result<PolicyDocument, PolicyError> {
    if yaml.trim().is_empty() {
        return Ok(PolicyDocument::default());
    }
    check_document(yaml)?;
    let de = serde_norway::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(de).map_err(|e| PolicyError {
        path: match e.path().to_string().as_str() {
            "." => String::new(),
            p => p.to_string(),
        },
        message: e.inner().to_string(),
    })
}

/// Options of [`compile`] (single-process mode).
pub struct CompileOptions<'a> {
    /// Reads the environment; injected so compilation stays pure in tests.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Add the built-in `simulated` provider when the document has none.
    pub include_simulated: bool,
    pub version: u64,
}

/// Options of [`compile_policy`] (the control plane's compiler).
pub struct PolicyOptions<'a> {
    /// Reads `*_BASE_URL` defaults and, with `env_providers`, provider keys.
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub include_simulated: bool,
    /// Add OpenAI/Anthropic/Gemini when their key variable is set in `env`.
    pub env_providers: bool,
    pub version: u64,
    /// Opens `encrypted:` keys; without it they are an error.
    pub master_keys: Option<&'a MasterKeys>,
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

/// Validates the document and builds the control plane's snapshot (key
/// references unresolved, every declared provider kept), or lists every error.
pub fn compile_policy(
    doc: &PolicyDocument,
    opts: &PolicyOptions<'_>,
) -> Result<Compiled, Vec<PolicyError>> {
    // Section by section, in the order errors are reported; each later
    // section may refer to what an earlier one built.
    let mut errors = Errors::default();
    let regions = providers::regions(doc, &mut errors);
    let jurisdictions = providers::jurisdictions(doc);
    let (providers, status) = providers::providers(doc, opts, &jurisdictions, &mut errors);
    let aliases = routes::aliases(doc, opts, &providers, &mut errors);
    let routes = routes::routes(doc, opts, &providers, &mut errors);
    let tenants = tenants::tenants(doc, &jurisdictions, &mut errors);
    let limits = limits(doc, &mut errors);

    let snapshot = SnapshotBuilder {
        version: opts.version,
        providers,
        aliases,
        tenants,
        limits,
        regions,
        routes,
        scores: Default::default(),
    }
    .build();
    tenants::check_residency(doc, &snapshot, &mut errors);

    if !errors.0.is_empty() {
        return Err(errors.0);
    }
    Ok(Compiled {
        snapshot,
        provider_status: status,
    })
}

/// Every problem of a document, in the order the sections find them.
#[derive(Default)]
struct Errors(Vec<PolicyError>);

impl Errors {
    /// The `(path, message)` callback the section helpers report through.
    fn sink(&mut self) -> impl FnMut(String, String) + '_ {
        |path, message| self.0.push(PolicyError { path, message })
    }
}

fn limits(doc: &PolicyDocument, errors: &mut Errors) -> LimitsSnapshot {
    let mut err = errors.sink();
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
        first_token_timeout: doc.limits.first_token_timeout_ms.map(Duration::from_millis),
    };
    if limits.first_token_timeout.is_some_and(|d| d.is_zero()) {
        err(
            "limits.first_token_timeout_ms".into(),
            "must be greater than 0".into(),
        );
    }
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
    limits
}

fn is_key_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_tag(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Validates the document and builds a snapshot for a single process that
/// is its own egress: key references are resolved here (env through
/// `opts.env`, files from disk) and providers left without keys are not live.
pub fn compile(
    doc: &PolicyDocument,
    opts: &CompileOptions<'_>,
) -> Result<Compiled, Vec<PolicyError>> {
    let master = MasterKeys::from_env(opts.env).map_err(|e| {
        vec![PolicyError {
            path: format!("${MASTER_KEY_ENV}"),
            message: e.to_string(),
        }]
    })?;
    let mut compiled = compile_policy(
        doc,
        &PolicyOptions {
            env: opts.env,
            include_simulated: opts.include_simulated,
            env_providers: true,
            version: opts.version,
            master_keys: Some(&master),
        },
    )?;
    let read_file = |p: &str| std::fs::read_to_string(p);
    let mut snapshot = std::mem::take(&mut compiled.snapshot).into_builder();
    let mut dropped = HashSet::new();
    let mut status: HashMap<String, String> = compiled.provider_status.into_iter().collect();
    for (name, provider) in snapshot.providers.iter_mut() {
        let (keys, problems) = resolve_provider_keys(provider, None, opts.env, &read_file);
        let p = Arc::make_mut(provider);
        p.keys = keys;
        let needs_keys = !p.key_pools.is_empty()
            && !matches!(
                p.kind,
                ProviderKind::OpenAiCompatible | ProviderKind::Simulated
            );
        if needs_keys && p.keys.is_empty() {
            let why = problems
                .first()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "no keys".into());
            status.insert(name.clone(), format!("not live: {why}"));
            dropped.insert(name.clone());
        } else {
            status.insert(name.clone(), live_note(p.kind, &p.base_url, p.keys.len()));
        }
    }
    snapshot.providers.retain(|n, _| !dropped.contains(n));
    snapshot
        .aliases
        .retain(|_, t| !dropped.contains(&t.provider));
    for route in snapshot.routes.values_mut() {
        Arc::make_mut(route)
            .targets
            .retain(|t| !dropped.contains(&t.provider));
    }
    // Built again after the pruning: plan tables compiled before it would
    // still plan the dropped providers.
    compiled.snapshot = snapshot.build();
    let mut status: Vec<_> = status.into_iter().collect();
    status.sort();
    compiled.provider_status = status;
    Ok(compiled)
}

/// Validates the document and builds an edge's snapshot: every declared
/// provider is live and no key is read, opened or kept. An edge never calls
/// a provider (its egress nodes hold the keys), so it does not need to see
/// which keys exist; providers that are not declared are not added from the
/// environment, since the edge cannot see an egress's environment either.
///
/// Takes the document by value because its key pools are dropped before
/// compiling: their references are the egress's business (it validates and
/// resolves them), and `encrypted:` keys must not need the master key here.
pub fn compile_for_edge(
    mut doc: PolicyDocument,
    opts: &CompileOptions<'_>,
) -> Result<Compiled, Vec<PolicyError>> {
    for p in doc.providers.values_mut() {
        p.key_pools.clear();
    }
    let mut compiled = compile_policy(
        &doc,
        &PolicyOptions {
            env: opts.env,
            include_simulated: opts.include_simulated,
            env_providers: false,
            version: opts.version,
            master_keys: None,
        },
    )?;
    let mut parts = std::mem::take(&mut compiled.snapshot).into_builder();
    for p in parts.providers.values_mut() {
        let p = Arc::make_mut(p);
        p.key_pools.clear();
        p.keys.clear();
    }
    compiled.snapshot = parts.build();
    compiled.provider_status = compiled
        .snapshot
        .providers()
        .keys()
        .map(|name| (name.clone(), "live (keys held by the egress)".to_string()))
        .collect();
    compiled.provider_status.sort();
    Ok(compiled)
}

/// Resolves the key references of the pools `region` may hold (`None` =
/// every pool, for single-process mode). Returns the keys found and one
/// error per reference that could not be read; never the values in errors.
pub fn resolve_provider_keys(
    provider: &ProviderSnapshot,
    region: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    read_file: &dyn Fn(&str) -> std::io::Result<String>,
) -> (Vec<ResolvedKey>, Vec<PolicyError>) {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, pool) in provider.key_pools.iter().enumerate() {
        if let (Some(want), Some(have)) = (region, pool.region.as_deref()) {
            if want != have {
                continue;
            }
        }
        for (k, key) in pool.keys.iter().enumerate() {
            let path = format!("providers.{}.key_pools[{i}].keys[{k}]", provider.name);
            let resolved = |id: &str, secret| ResolvedKey::new(&pool.name, id, key, secret);
            match &key.source {
                KeySource::Inline(s) => keys.push(resolved(&key.id, s.clone())),
                KeySource::Env(var) => match env(var).filter(|v| !v.trim().is_empty()) {
                    Some(v) => {
                        let values: Vec<&str> = v
                            .split(',')
                            .map(str::trim)
                            .filter(|k| !k.is_empty())
                            .collect();
                        // Several values in one variable are several keys;
                        // each needs its own id on the health board.
                        let many = values.len() > 1;
                        for (n, value) in values.into_iter().enumerate() {
                            let id = if many {
                                format!("{}.{n}", key.id)
                            } else {
                                key.id.clone()
                            };
                            keys.push(resolved(&id, Secret::new(value)));
                        }
                    }
                    None => errors.push(PolicyError {
                        path,
                        message: format!("${var} is not set"),
                    }),
                },
                KeySource::File(f) => match read_file(f) {
                    Ok(v) if !v.trim().is_empty() => {
                        keys.push(resolved(&key.id, Secret::new(v.trim())))
                    }
                    Ok(_) => errors.push(PolicyError {
                        path,
                        message: format!("key file {f} is empty"),
                    }),
                    Err(e) => errors.push(PolicyError {
                        path,
                        message: format!("cannot read key file {f}: {}", e.kind()),
                    }),
                },
            }
        }
    }
    (keys, errors)
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

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::{KeyHash, Prefill};

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
        let openai = &c.snapshot.providers()["openai"];
        assert_eq!(openai.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(openai.keys.len(), 2);
        assert_eq!(
            c.snapshot.providers()["anthropic"].base_url,
            ANTHROPIC_DEFAULT_URL
        );
        assert!(!c.snapshot.providers().contains_key("gemini"));
        assert!(c.snapshot.providers().contains_key("simulated"));
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
        assert_eq!(s.limits().max_body_bytes, 1024);
        assert_eq!(s.resolve("fast").unwrap().provider, "local");
        let t = s.tenant_for_key("sy-team").unwrap();
        assert!(t.may_use("fast") && !t.may_use("local/llama"));
        let sim = s.providers()["sim"].simulated.as_ref().unwrap();
        assert_eq!(sim.profile("flaky").output_tokens, 3);
        assert_eq!(sim.profile("flaky").fault.as_ref().unwrap().rate, 0.5);
        assert!(sim.profile("other").fault.is_none());
        // a declared simulated provider replaces the built-in one
        assert!(!s.providers().contains_key("simulated"));
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
    fn faults_of_a_real_provider_are_compiled_and_travel() {
        let yaml = "providers:\n  p:\n    kind: openai-compatible\n    base_url: http://127.0.0.1:1/v1\n    api_key_env: P_KEY\n    faults:\n      allow_header: true\n      fault: { status: 503, rate: 0.5 }\n      models:\n        slow: { ttft_ms: 250 }\n";
        let snap = compile_with(yaml, &[("P_KEY", "sk-p")]).unwrap().snapshot;
        for s in [
            snap.clone(),
            Snapshot::try_from(crate::pb::SnapshotMsg::from(&snap)).unwrap(),
        ] {
            let f = s.providers()["p"]
                .simulated
                .as_ref()
                .expect("fault layer settings");
            assert!(f.allow_header);
            // No delay unless asked for: a real provider is not slowed down.
            assert_eq!(f.default_profile.ttft, Duration::ZERO);
            assert_eq!(f.profile("slow").ttft, Duration::from_millis(250));
            let fault = f.default_profile.fault.as_ref().unwrap();
            assert_eq!(fault.rate, 0.5);
            assert!(matches!(
                fault.mode,
                switchyard_proto::FaultMode::Status { status: 503, .. }
            ));
        }
        let plain = "providers:\n  p:\n    kind: openai-compatible\n    base_url: http://127.0.0.1:1/v1\n    api_key_env: P_KEY\n";
        let snap = compile_with(plain, &[("P_KEY", "sk-p")]).unwrap().snapshot;
        assert!(snap.providers()["p"].simulated.is_none());
    }

    #[test]
    fn hedging_and_rule_filters_are_carried_and_checked() {
        let yaml = r#"
routes:
  r:
    hedge: { after: p95, delay_ms: 400, min_delay_ms: 80 }
    rules:
      - when: { tag: eu }
        filter: { keep: [{ provider: simulated }], drop: [{ model: m2 }] }
    targets: [{ provider: simulated, model: m }, { provider: simulated, model: m2 }]
  fixed:
    hedge: { delay_ms: 150 }
    targets: [{ provider: simulated, model: m }]
tenants:
  - { id: a, hedge_budget_percent: 25 }
"#;
        let snap = compile_with(yaml, &[]).unwrap().snapshot;
        for s in [
            snap.clone(),
            Snapshot::try_from(crate::pb::SnapshotMsg::from(&snap)).unwrap(),
        ] {
            let h = s.routes()["r"].hedge.unwrap();
            assert!(h.after_p95);
            assert_eq!(
                (h.delay, h.min_delay),
                (Duration::from_millis(400), Duration::from_millis(80))
            );
            let f = s.routes()["fixed"].hedge.unwrap();
            assert!(!f.after_p95);
            assert_eq!(f.delay, Duration::from_millis(150));
            assert!(s.routes()["fixed"].rules.is_empty());
            let rule = &s.routes()["r"].rules[0];
            assert_eq!(rule.route, "");
            let filter = rule.filter.as_ref().unwrap();
            assert!(filter.admits("simulated", "m", None));
            assert!(!filter.admits("simulated", "m2", None));
            assert!(!filter.admits("other", "m", None));
            let a = s.tenants().by_id("a").unwrap();
            assert_eq!(a.hedge_budget_percent, Some(25));
        }
        let bad = r#"
routes:
  r:
    hedge: { delay_ms: 0, min_delay_ms: 5 }
    rules:
      - when: { tag: x }
      - when: { tag: y }
        filter: {}
      - when: { tag: z }
        filter: { keep: [{}], drop: [{ provider: ghost }, { region: mars }] }
    targets: [{ provider: simulated, model: m }]
tenants:
  - { id: a, hedge_budget_percent: 101 }
"#;
        let errs = compile_with(bad, &[]).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "routes.r.hedge.delay_ms",
            "routes.r.hedge.min_delay_ms",
            "routes.r.rules[0]",
            "routes.r.rules[1].filter",
            "routes.r.rules[2].filter.keep[0]",
            "routes.r.rules[2].filter.drop[0].provider",
            "routes.r.rules[2].filter.drop[1].region",
            "tenants[0].hedge_budget_percent",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn max_attempts_is_carried_and_zero_is_refused() {
        let yaml = "routes:\n  r:\n    max_attempts: 2\n    targets: [{ provider: simulated, model: m }]\n";
        let snap = compile_with(yaml, &[]).unwrap().snapshot;
        assert_eq!(snap.routes()["r"].max_attempts, Some(2));
        let back = Snapshot::try_from(crate::pb::SnapshotMsg::from(&snap)).unwrap();
        assert_eq!(back.routes()["r"].max_attempts, Some(2));
        let e = compile_with(&yaml.replace("max_attempts: 2", "max_attempts: 0"), &[]).unwrap_err();
        assert!(e.iter().any(|e| e.path == "routes.r.max_attempts"), "{e:?}");
    }

    #[test]
    fn first_token_deadlines_per_route_and_by_default() {
        let yaml = r#"
limits: { first_token_timeout_ms: 4000 }
routes:
  quick:
    first_token_timeout_ms: 500
    targets: [{ provider: simulated, model: sim-small }]
  plain:
    targets: [{ provider: simulated, model: sim-small }]
"#;
        let snap = compile_with(yaml, &[]).unwrap().snapshot;
        assert_eq!(
            snap.routes()["quick"].first_token_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(snap.routes()["plain"].first_token_timeout, None);
        assert_eq!(
            snap.limits().first_token_timeout,
            Some(Duration::from_secs(4))
        );
        // It travels to remote nodes.
        let back = Snapshot::try_from(crate::pb::SnapshotMsg::from(&snap)).unwrap();
        assert_eq!(
            back.routes()["quick"].first_token_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(back.routes()["plain"].first_token_timeout, None);
        assert_eq!(
            back.limits().first_token_timeout,
            Some(Duration::from_secs(4))
        );

        let yaml = "limits: { first_token_timeout_ms: 0 }\nroutes:\n  r:\n    first_token_timeout_ms: 0\n    targets: [{ provider: simulated, model: m }]\n";
        let errs = compile_with(yaml, &[]).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"limits.first_token_timeout_ms"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"routes.r.first_token_timeout_ms"),
            "{paths:?}"
        );
    }

    #[test]
    fn resume_needs_a_declared_prefill_that_the_provider_kind_can_speak() {
        let yaml = r#"
providers:
  claude: { kind: anthropic, base_url: "http://127.0.0.1:9", api_key_env: K }
  deepseek: { kind: openai-compatible, base_url: "http://127.0.0.1:9", api_key_env: K, prefill: prefix }
  vllm: { kind: openai-compatible, base_url: "http://127.0.0.1:9", api_key_env: K, prefill: continue_final_message }
  plain: { kind: openai-compatible, base_url: "http://127.0.0.1:9", api_key_env: K }
routes:
  r:
    resume: true
    targets: [{ provider: plain, model: m }]
    fallbacks: [s]
  s:
    targets: [{ provider: deepseek, model: m }]
  off:
    targets: [{ provider: plain, model: m }]
"#;
        let snap = compile_with(yaml, &[("K", "sk-k")]).unwrap().snapshot;
        let prefill = |p: &str| snap.providers()[p].prefill;
        assert_eq!(
            prefill("claude"),
            Prefill::TrailingAssistant,
            "anthropic's default"
        );
        assert_eq!(prefill("deepseek"), Prefill::Prefix);
        assert_eq!(prefill("vllm"), Prefill::ContinueFinalMessage);
        assert_eq!(prefill("plain"), Prefill::None, "never guessed");
        assert!(snap.routes()["r"].resume && !snap.routes()["off"].resume);
        // Both travel to remote nodes.
        let back = Snapshot::try_from(crate::pb::SnapshotMsg::from(&snap)).unwrap();
        assert!(back.routes()["r"].resume && !back.routes()["off"].resume);
        for p in ["claude", "deepseek", "vllm", "plain"] {
            assert_eq!(back.providers()[p].prefill, prefill(p), "{p}");
        }

        // A resume that could never happen is refused, as is a prefill
        // style the kind cannot speak.
        let errs = compile_with(
            &yaml.replace("fallbacks: [s]", "fallbacks: []"),
            &[("K", "sk-k")],
        )
        .unwrap_err();
        assert!(errs.iter().any(|e| e.path == "routes.r.resume"), "{errs:?}");
        for (kind, style) in [
            ("openai", "prefix"),
            ("gemini", "prefix"),
            ("anthropic", "prefix"),
            ("openai-compatible", "trailing_assistant"),
        ] {
            let y = format!(
                "providers:\n  x: {{ kind: {kind}, base_url: \"http://127.0.0.1:9\", prefill: {style} }}\n"
            );
            let errs = compile_with(&y, &[]).unwrap_err();
            assert!(
                errs.iter().any(|e| e.path == "providers.x.prefill"),
                "{kind} {style}: {errs:?}"
            );
        }
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

#[cfg(test)]
mod control_plane_tests {
    use super::*;
    use crate::secrets::{MasterKey, MasterKeys};
    use switchyard_proto::PlanError;

    const EXAMPLE: &str = include_str!("../../../deploy/examples/multi-region.yaml");
    const DEV: &str = include_str!("../../../deploy/dev/switchyard.yaml");

    fn policy(yaml: &str, master: Option<&MasterKeys>) -> Result<Compiled, Vec<PolicyError>> {
        let doc = parse_policy(yaml).map_err(|e| vec![e])?;
        let no_env = |_: &str| None;
        compile_policy(
            &doc,
            &PolicyOptions {
                env: &no_env,
                include_simulated: false,
                env_providers: false,
                version: 3,
                master_keys: master,
            },
        )
    }

    #[test]
    fn example_and_dev_policies_compile() {
        let c = policy(EXAMPLE, None).unwrap();
        let s = &c.snapshot;
        assert_eq!(
            s.providers()["openai-us"].jurisdiction.as_deref(),
            Some("us")
        );
        assert_eq!(s.providers()["openai-us"].key_pools[0].keys.len(), 2);
        assert!(
            s.providers()["openai-us"].keys.is_empty(),
            "references stay references"
        );
        assert_eq!(
            s.providers()["azure-eu"].pricing["gpt-4o"].output_per_million,
            11.0
        );
        let acme = s.tenant("acme-eu").unwrap();
        assert_eq!(acme.rpm, Some(600));
        let eu = vec!["eu".to_string()];
        let plan = s.plan("chat-default", Some(&eu)).unwrap();
        assert!(plan.iter().all(|t| t.jurisdiction.as_deref() == Some("eu")));
        assert!(policy(DEV, None).is_ok());
    }

    #[test]
    fn extended_errors_all_have_paths() {
        let yaml = r#"
regions:
  eu-west: { jurisdiction: eu }
  us-east: { jurisdiction: us }
providers:
  openai:
    kind: openai
    region: us-east
    pricing:
      gpt-4o: { input: -1, output: 2 }
    key_pools:
      - region: mars
        keys: [ { env: A, file: B } ]
      - region: eu-west
        keys: [ { encrypted: "v1:xx:yy" } ]
  anthropic:
    kind: anthropic
    region: eu-west
routes:
  chat-default:
    targets:
      - { provider: anthropic, model: claude }
      - { provider: openai, model: gpt-4o }
      - { provider: antropic, model: claude }
    fallbacks: [loop, nope]
  loop:
    strategy: weighted
    targets: [ { provider: openai, model: gpt-4o, weight: 0 } ]
    fallbacks: [chat-default]
  us-only:
    targets: [ { provider: openai, model: gpt-4o } ]
tenants:
  - id: eu-only
    key_sha256: "0000000000000000000000000000000000000000000000000000000000000001"
    allowed_models: [us-only, openai/*, chat-default]
    residency: [eu, atlantis]
    limits: { rpm: 0 }
    budget: { monthly_usd: -5 }
"#;
        let errs = policy(yaml, None).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "providers.openai.pricing.gpt-4o",
            "providers.openai.key_pools[0].region",
            "providers.openai.key_pools[0].keys[0]",
            "providers.openai.key_pools[1].jurisdictions",
            "providers.openai.key_pools[1].keys[0].encrypted",
            "routes.chat-default.targets[2].provider",
            "routes.chat-default.fallbacks[0]",
            "routes.chat-default.fallbacks[1]",
            "routes.loop.targets[0].weight",
            "tenants[0].residency[1]",
            "tenants[0].limits.rpm",
            "tenants[0].budget.monthly_usd",
            "tenants[0].allowed_models[0]",
            "tenants[0].allowed_models[1]",
        ] {
            assert!(paths.contains(&want), "missing {want} in {errs:#?}");
        }
        let e = errs
            .iter()
            .find(|e| e.path == "routes.chat-default.targets[2].provider")
            .unwrap();
        assert_eq!(
            e.to_string(),
            "routes.chat-default.targets[2].provider: unknown provider \"antropic\""
        );
        let residency = errs
            .iter()
            .find(|e| e.path == "tenants[0].allowed_models[0]")
            .unwrap();
        assert!(
            residency.message.contains("leaves the tenant's residency"),
            "{residency}"
        );
        // chat-default has an EU target, so it is allowed.
        assert!(!paths.contains(&"tenants[0].allowed_models[2]"));
    }

    #[test]
    fn encrypted_keys_open_with_the_master_key_only() {
        let keys = MasterKeys {
            current: Some(
                MasterKey::from_hex(
                    "3c1f9a0e7b52d4686e0b9c27f1a3d5e4902b7c6a18f4e3d25c9b0a7e6f1d2c38",
                    crate::secrets::MASTER_KEY_ENV,
                )
                .unwrap(),
            ),
            previous: None,
        };
        let blob = keys.seal("sk-sealed").unwrap();
        let yaml = format!(
            "providers:\n  p:\n    kind: openai\n    key_pools:\n      - keys: [ {{ encrypted: \"{blob}\" }} ]\n"
        );
        let c = policy(&yaml, Some(&keys)).unwrap();
        match &c.snapshot.providers()["p"].key_pools[0].keys[0].source {
            KeySource::Inline(s) => assert_eq!(s.expose(), "sk-sealed"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!format!("{:?}", c.snapshot).contains("sk-sealed"));
        let e = policy(&yaml, None).unwrap_err();
        assert_eq!(e[0].path, "providers.p.key_pools[0].keys[0].encrypted");
    }

    #[test]
    fn the_edge_compiles_every_declared_provider_without_keys() {
        // No key is set anywhere, and one pool is sealed with a master key
        // the edge does not have: every provider is still live, keyless.
        let yaml = "providers:\n  a:\n    kind: openai\n  b:\n    kind: anthropic\n    key_pools:\n      - keys: [ { encrypted: \"v1:xx:yy\" }, { value: sk-inline } ]\n";
        let doc = parse_policy(yaml).unwrap();
        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-in-edge-env".to_string());
        let c = compile_for_edge(
            doc,
            &CompileOptions {
                env: &env,
                include_simulated: true,
                version: 1,
            },
        )
        .unwrap();
        for name in ["a", "b", "simulated"] {
            let p = &c.snapshot.providers()[name];
            assert!(p.keys.is_empty() && p.key_pools.is_empty(), "{name}");
        }
        // Undeclared providers are not conjured from the edge's environment.
        assert!(!c.snapshot.providers().contains_key("openai"));
        assert!(!format!("{:?}", c.snapshot).contains("sk-"));
    }

    #[test]
    fn dev_compile_resolves_files_and_envs() {
        let dir = std::env::temp_dir().join(format!("sy-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k");
        std::fs::write(&file, "sk-from-file\n").unwrap();
        let yaml = format!(
            "providers:\n  p:\n    kind: openai\n    key_pools:\n      - keys: [ {{ file: \"{}\" }}, {{ env: K }} ]\n  q:\n    kind: anthropic\n    api_key_env: MISSING\naliases:\n  a: q/x\n",
            file.display()
        );
        let doc = parse_policy(&yaml).unwrap();
        let env = |k: &str| (k == "K").then(|| "sk-env-1,sk-env-2".to_string());
        let c = compile(
            &doc,
            &CompileOptions {
                env: &env,
                include_simulated: true,
                version: 1,
            },
        )
        .unwrap();
        let keys: Vec<_> = c.snapshot.providers()["p"]
            .keys
            .iter()
            .map(|k| k.expose().to_string())
            .collect();
        assert_eq!(keys, ["sk-from-file", "sk-env-1", "sk-env-2"]);
        let ids: Vec<_> = c.snapshot.providers()["p"]
            .keys
            .iter()
            .map(|k| format!("{}/{}", k.pool, k.id))
            .collect();
        assert_eq!(ids, ["pool-0/k0", "pool-0/k1.0", "pool-0/k1.1"]);
        assert!(!c.snapshot.providers().contains_key("q"));
        assert!(c.snapshot.aliases().is_empty());
        let status: HashMap<_, _> = c.provider_status.into_iter().collect();
        assert!(
            status["q"].contains("$MISSING is not set"),
            "{}",
            status["q"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_pools_keep_identity_weight_and_limits() {
        let yaml = "providers:\n  p:\n    kind: openai\n    key_pools:\n      - name: main\n        keys:\n          - { env: A, id: primary, weight: 3, rpm: 500, tpm: 90000 }\n          - { env: B }\n";
        let doc = parse_policy(yaml).unwrap();
        let env = |k: &str| matches!(k, "A" | "B").then(|| format!("sk-{k}"));
        let c = compile(
            &doc,
            &CompileOptions {
                env: &env,
                include_simulated: false,
                version: 1,
            },
        )
        .unwrap();
        let p = &c.snapshot.providers()["p"];
        let pool = &p.key_pools[0];
        assert_eq!(
            (
                pool.keys[0].id.as_str(),
                pool.keys[0].weight,
                pool.keys[0].rpm,
                pool.keys[0].tpm
            ),
            ("primary", 3, Some(500), Some(90000))
        );
        assert_eq!((pool.keys[1].id.as_str(), pool.keys[1].weight), ("k1", 1));
        let resolved: Vec<_> = p
            .keys
            .iter()
            .map(|k| (&*k.pool, &*k.id, k.weight, k.rpm))
            .collect();
        assert_eq!(
            resolved,
            [("main", "primary", 3, Some(500)), ("main", "k1", 1, None)]
        );
        assert!(!format!("{:?}", p.keys).contains("sk-"), "keys never print");

        let bad = "providers:\n  p:\n    kind: openai\n    api_key_env: X\n    key_pools:\n      - name: default\n        keys:\n          - { env: A, id: a, weight: 0, rpm: 0, tpm: 0 }\n          - { env: B, id: a }\n          - { env: C, id: \"no/slash\" }\n";
        let e = policy(bad, None).unwrap_err();
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "providers.p.key_pools[0].name",
                "providers.p.key_pools[0].keys[0].weight",
                "providers.p.key_pools[0].keys[0].rpm",
                "providers.p.key_pools[0].keys[0].tpm",
                "providers.p.key_pools[0].keys[1].id",
                "providers.p.key_pools[0].keys[2].id",
            ],
            "{e:?}"
        );
    }

    #[test]
    fn residency_plans_are_compiled_after_pruning() {
        // `q` has no key in this environment, so single-process compile
        // drops it (and the alias to it) after validation; the residency
        // tables must not still plan it.
        let yaml = "regions:\n  eu-west: { jurisdiction: eu }\nproviders:\n  p:\n    kind: openai\n    region: eu-west\n    api_key_env: P_KEY\n  q:\n    kind: anthropic\n    region: eu-west\n    api_key_env: MISSING\naliases:\n  gone: q/m\nroutes:\n  chat:\n    targets:\n      - { provider: q, model: m }\n      - { provider: p, model: m }\ntenants:\n  - id: t\n    key_sha256: \"0000000000000000000000000000000000000000000000000000000000000000\"\n    residency: [eu]\n";
        let doc = parse_policy(yaml).unwrap();
        let env = |k: &str| (k == "P_KEY").then(|| "sk-p".to_string());
        let c = compile(
            &doc,
            &CompileOptions {
                env: &env,
                include_simulated: false,
                version: 1,
            },
        )
        .unwrap();
        let s = &c.snapshot;
        assert!(!s.providers().contains_key("q"));
        let eu = vec!["eu".to_string()];
        let table = &s.plan_tables().by_jurisdictions[&eu];
        let chat: Vec<_> = table["chat"]
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| t.target.provider.as_str())
            .collect();
        assert_eq!(chat, ["p"], "the pruned provider is not planned");
        assert!(!table.contains_key("gone"), "the pruned alias has no plan");
        assert!(matches!(
            s.plan("gone", Some(&eu)),
            Err(PlanError::UnknownModel(_))
        ));
        // The control plane's compiler keeps every provider and plans them.
        let cp = policy(yaml, None).unwrap();
        assert_eq!(
            cp.snapshot.plan_tables().by_jurisdictions[&eu]["chat"]
                .as_ref()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn anchors_aliases_and_oversized_documents_are_refused() {
        let bomb = format!("aliases:\n  a: &big \"{}\"\n  b: *big\n", "x".repeat(1000));
        let e = parse_policy(&bomb).unwrap_err();
        assert!(e.message.contains("anchors"), "{e}");
        let alias_only = "aliases: {a: *nowhere}\n";
        assert!(parse_policy(alias_only).is_err());
        // `&` and `*` inside scalars are not anchors.
        let fine = "aliases:\n  a: \"x*y&z\"\n  b: p/m*x\n  c: https://h/?a=1&b=2\n";
        assert!(parse_policy(fine).is_ok(), "{:?}", parse_policy(fine).err());
        let huge = format!("aliases:\n  a: \"{}\"\n", "x".repeat(MAX_POLICY_BYTES));
        assert!(parse_policy(&huge).unwrap_err().message.contains("limit"));
    }
}
