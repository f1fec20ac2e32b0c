//! Types the Switchyard nodes share: the compiled, validated policy snapshot
//! that edge and egress nodes serve from.
//!
//! A snapshot is immutable once built. Nodes hold it behind an `Arc` and swap
//! a whole new one in when policy changes, so the request path reads it
//! without locks. The control plane (`switchyard-control`) builds snapshots
//! from the operator's policy document; later the same types travel to remote
//! nodes as protobuf messages compiled from this folder's `.proto` files
//! ([`control`]); [`wire`] converts those messages into the domain types
//! with `TryFrom`, rejecting malformed input with [`wire::InvalidSnapshot`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Control-plane services and snapshot messages (`control.proto`).
pub mod control {
    tonic::include_proto!("switchyard.control.v1");
}

pub mod health;
pub mod plan;
pub mod scope;
pub mod wire;

pub use health::Health;

/// The hasher of maps read on every request whose keys an attacker cannot
/// choose freely (the policy's ids and key hashes, or a bounded set):
/// SipHash cost ~900 instructions per request on the health board alone.
/// foldhash's per-process seed still keeps collisions from being planned.
pub type FastHash = foldhash::fast::RandomState;
pub use plan::{Plan, PlanError, PlannedTarget};

/// OTLP trace export messages (see `otlp.proto`).
pub mod otlp {
    tonic::include_proto!("switchyard.otlp");
}

/// The edge ↔ egress framing's messages (`backhaul.proto`).
pub mod backhaul {
    tonic::include_proto!("switchyard.backhaul");
}

/// A provider credential. It never prints: `Debug` and `Display` show a
/// redaction marker, so a stray `{:?}` cannot leak it into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The only way to read the value; grep for it when auditing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Policy documents carry keys in `value:` fields; reading one must not
/// require a plain `String` that could end up in a `Debug` print.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// SHA-256 of a virtual key: what the snapshot stores instead of the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    pub fn from_hex(hex_text: &str) -> Option<Self> {
        let bytes = hex::decode(hex_text.trim()).ok()?;
        Some(KeyHash(bytes.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..12])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// api.openai.com.
    OpenAi,
    /// Any server speaking OpenAI's API (DeepSeek, Mistral, vLLM, ...).
    OpenAiCompatible,
    Anthropic,
    Gemini,
    /// The built-in deterministic provider for demos and tests.
    Simulated,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::OpenAiCompatible => "openai-compatible",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Simulated => "simulated",
        }
    }
}

/// How the simulated provider behaves for one model (or by default).
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedProfile {
    pub ttft: Duration,
    pub tokens_per_second: f64,
    pub output_tokens: u32,
    pub fault: Option<SimulatedFault>,
}

impl Default for SimulatedProfile {
    fn default() -> Self {
        SimulatedProfile {
            ttft: Duration::from_millis(20),
            tokens_per_second: 400.0,
            output_tokens: 24,
            fault: None,
        }
    }
}

/// A failure the simulated provider injects, with probability `rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedFault {
    pub rate: f64,
    pub mode: FaultMode,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultMode {
    /// Answer with this HTTP status (and `retry-after` for 429/503).
    Status {
        status: u16,
        retry_after: Option<u32>,
    },
    /// Never answer.
    Hang,
    /// Stream this many content chunks, then cut the connection.
    DropAfter { chunks: u32 },
}

#[derive(Debug, Clone)]
pub struct ProviderSnapshot {
    /// The name clients use as the `provider/` prefix.
    pub name: String,
    pub kind: ProviderKind,
    /// For OpenAI-style providers this includes the version path (`.../v1`);
    /// Anthropic and Gemini take the host root.
    pub base_url: String,
    /// The keys this node resolved from `key_pools` (only on an egress, or
    /// in single-process mode), each with its pool and id.
    pub keys: Vec<ResolvedKey>,
    /// Models advertised in `/v1/models`; requests may name others.
    pub models: Vec<String>,
    /// Only for [`ProviderKind::Simulated`]: default behaviour and per-model overrides.
    pub simulated: Option<SimulatedSettings>,
    /// Region whose egress nodes call this provider; `None` = any egress.
    pub region: Option<String>,
    /// Jurisdiction the provider's traffic stays in (defaults to its
    /// region's); `None` = unknown, which no residency rule accepts.
    pub jurisdiction: Option<String>,
    /// Model → price; models not listed have no known cost.
    pub pricing: HashMap<String, ModelPrice>,
    /// Where `keys` come from, per region. Egress nodes receive only the
    /// pools of their own region; edges receive none.
    pub key_pools: Vec<KeyPoolSnapshot>,
    /// How it continues a partial assistant answer; mid-stream resume only
    /// moves a cut stream to providers that declare one.
    pub prefill: Prefill,
}

/// How a provider is asked to continue an assistant answer it is handed
/// (assistant prefill). Declared, never guessed: a provider that does not
/// support it would start a new answer and duplicate the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefill {
    #[default]
    None,
    /// A trailing assistant message is continued (Anthropic Messages).
    TrailingAssistant,
    /// A trailing assistant message marked `"prefix": true` (DeepSeek's
    /// and Mistral's chat prefix completion).
    Prefix,
    /// A trailing assistant message with `continue_final_message: true`
    /// and `add_generation_prompt: false` (vLLM).
    ContinueFinalMessage,
}

impl Prefill {
    pub fn as_str(self) -> &'static str {
        match self {
            Prefill::None => "none",
            Prefill::TrailingAssistant => "trailing_assistant",
            Prefill::Prefix => "prefix",
            Prefill::ContinueFinalMessage => "continue_final_message",
        }
    }
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ModelPrice {
    pub input_per_million: f64,
    pub output_per_million: f64,
    /// Price of input tokens the provider served from its prompt cache;
    /// `None` = the input price.
    pub cached_input_per_million: Option<f64>,
}

impl ModelPrice {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        self.cost_with_cache(input_tokens, 0, output_tokens)
    }

    /// Cost when `cached` of the `input_tokens` came from the provider's
    /// prompt cache (they are part of `input_tokens`, as OpenAI counts them).
    pub fn cost_with_cache(&self, input_tokens: u64, cached: u64, output_tokens: u64) -> f64 {
        let cached = cached.min(input_tokens);
        let cached_price = self
            .cached_input_per_million
            .unwrap_or(self.input_per_million);
        ((input_tokens - cached) as f64 * self.input_per_million
            + cached as f64 * cached_price
            + output_tokens as f64 * self.output_per_million)
            / 1_000_000.0
    }
}

/// Where one provider key is read. References are resolved on the egress
/// node that uses them, so the control plane never sees those values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(String),
    /// Decrypted by the control plane from its encrypted store.
    Inline(Secret),
}

/// The keys of one provider in one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPoolSnapshot {
    pub name: String,
    /// Region whose egress nodes may hold these keys; `None` = any region.
    pub region: Option<String>,
    /// Jurisdictions whose egress nodes may hold these keys; empty = the
    /// pool's region's jurisdiction only.
    pub jurisdictions: Vec<String>,
    pub keys: Vec<PoolKey>,
}

/// One key of a pool: its stable identity and limits, and where its value
/// is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    /// Unique in its pool and stable across policy versions (the health
    /// board keys on it); defaults to `k<index>`.
    pub id: String,
    /// Share of traffic relative to the pool's other keys; at least 1.
    pub weight: u32,
    /// The provider's requests-per-minute limit for this key, if known.
    pub rpm: Option<u32>,
    /// The provider's tokens-per-minute limit for this key, if known.
    pub tpm: Option<u64>,
    pub source: KeySource,
}

impl PoolKey {
    /// A key with default identity (`k<index>`), weight 1 and no limits.
    pub fn new(index: usize, source: KeySource) -> Self {
        PoolKey {
            id: format!("k{index}"),
            weight: 1,
            rpm: None,
            tpm: None,
            source,
        }
    }
}

/// A key value read on this node, with the identity of the pool key it
/// came from. An `env:` reference holding several comma-separated values
/// yields one resolved key per value (`<id>.<n>`).
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedKey {
    pub pool: Arc<str>,
    pub id: Arc<str>,
    pub weight: u32,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub secret: Secret,
    /// Tells values apart without holding them twice: the health board
    /// remembers a refused key by it.
    pub fingerprint: u64,
}

impl ResolvedKey {
    pub fn new(pool: &str, id: &str, key: &PoolKey, secret: Secret) -> Self {
        let digest = Sha256::digest(secret.expose().as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        ResolvedKey {
            pool: pool.into(),
            id: id.into(),
            weight: key.weight.max(1),
            rpm: key.rpm,
            tpm: key.tpm,
            secret,
            fingerprint: u64::from_le_bytes(first),
        }
    }

    /// The value; see [`Secret::expose`].
    pub fn expose(&self) -> &str {
        self.secret.expose()
    }

    /// This key's id on the health board, for `model`.
    pub fn health_id(&self, provider: &str, model: &str) -> String {
        health::key_id(provider, &self.pool, &self.id, model)
    }
}

/// Lets code that scrubs keys from text take resolved keys or bare secrets.
impl AsRef<Secret> for ResolvedKey {
    fn as_ref(&self) -> &Secret {
        &self.secret
    }
}

impl AsRef<Secret> for Secret {
    fn as_ref(&self) -> &Secret {
        self
    }
}

impl fmt::Debug for ResolvedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedKey")
            .field("pool", &self.pool)
            .field("id", &self.id)
            .field("weight", &self.weight)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .finish_non_exhaustive()
    }
}

/// A region of the fleet: where its egress nodes listen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionSnapshot {
    pub name: String,
    /// Jurisdiction tag (e.g. `eu`, `us`) used by residency rules.
    pub jurisdiction: Option<String>,
    /// Egress node addresses (`host:port`), resolved by the edge.
    pub egress: Vec<String>,
    /// The public hostname clients of this region use (named in errors
    /// that send a tenant to its own region).
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SimulatedSettings {
    pub default_profile: SimulatedProfile,
    pub models: HashMap<String, SimulatedProfile>,
    /// Edges other than `switchyard dev` honour the client's
    /// `x-switchyard-simulate` header for this provider only when set.
    pub allow_header: bool,
}

impl SimulatedSettings {
    pub fn profile(&self, model: &str) -> &SimulatedProfile {
        self.models.get(model).unwrap_or(&self.default_profile)
    }
}

/// Where a model name leads: one provider and the model name it knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteTarget {
    pub provider: String,
    pub model: String,
}

/// A tenant with access rules only: no limits, no budget, no residency.
/// A shorthand [`Tenants::insert`] takes (as a [`Tenant`]) for keys added
/// outside the policy, such as `switchyard dev`'s own.
#[derive(Debug, Clone)]
pub struct TenantSnapshot {
    pub id: String,
    /// `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
}

/// One tenant: what its key may use and what it is held to. Authenticating
/// a key gives the whole record; the egress finds the same record by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tenant {
    pub id: String,
    /// `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens (input + output) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    pub daily_budget_usd: Option<f64>,
    pub monthly_budget_usd: Option<f64>,
    /// Fraction of a budget after which answers carry a warning header.
    pub budget_warn_ratio: Option<f64>,
    /// Refuse requests while shared counters cannot be reached (otherwise
    /// they are let through, counted locally).
    pub fail_closed: bool,
    /// The fraction of each limit one edge may use on its own, leased by
    /// the control plane when counters are not shared; `None` = all of it.
    pub limit_share: Option<f64>,
    /// Jurisdictions the tenant's requests may be processed in; `None` = any.
    pub residency: Option<Vec<String>>,
    /// With residency: an edge outside it still reads the request and sends
    /// it to a permitted region (otherwise it is refused from the key alone).
    pub edge_residency_relaxed: bool,
    /// Hedged attempts may add at most this percentage of the tenant's
    /// requests on hedged routes over a sliding window; `None` = the
    /// default ([`DEFAULT_HEDGE_BUDGET_PERCENT`]), 0 = never hedge.
    pub hedge_budget_percent: Option<u32>,
}

/// A tenant's hedge budget when the policy names none.
pub const DEFAULT_HEDGE_BUDGET_PERCENT: u32 = 10;

/// The limits and budgets one tenant or one virtual key is held to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitSet {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
    pub daily_usd: Option<f64>,
    pub monthly_usd: Option<f64>,
}

impl LimitSet {
    pub fn is_empty(&self) -> bool {
        *self == LimitSet::default()
    }
}

impl Tenant {
    pub fn limit_set(&self) -> LimitSet {
        LimitSet {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            daily_usd: self.daily_budget_usd,
            monthly_usd: self.monthly_budget_usd,
        }
    }
}

/// A virtual key issued to a tenant (`switchyard ctl vkeys create`): its
/// own id, expiry, and rules that narrow the tenant's, never widen them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VirtualKey {
    pub id: String,
    pub tenant: String,
    /// `None` = whatever the tenant may use.
    pub allowed_models: Option<Vec<String>>,
    pub limits: LimitSet,
    /// Unix milliseconds after which the key is refused; `None` = never.
    pub expires_at_ms: Option<i64>,
}

impl VirtualKey {
    pub fn may_use(&self, requested: &str) -> bool {
        models_allow(self.allowed_models.as_deref(), requested)
    }

    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| now_ms >= t)
    }
}

/// USD a tenant (or key) spent in the current UTC day and month across the
/// fleet, as the control plane's ledger knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spend {
    pub day_usd: f64,
    pub month_usd: f64,
    /// Days since the Unix epoch (UTC) `day_usd` belongs to.
    pub day: i64,
    /// `year * 12 + month - 1` (UTC) `month_usd` belongs to.
    pub month: i64,
}

/// What a key authenticates as.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: Arc<Tenant>,
    /// Set when the key is a virtual key rather than the policy's key.
    pub key: Option<Arc<VirtualKey>>,
}

impl From<TenantSnapshot> for Tenant {
    fn from(t: TenantSnapshot) -> Self {
        Tenant {
            id: t.id,
            allowed_models: t.allowed_models,
            ..Tenant::default()
        }
    }
}

impl From<Arc<TenantSnapshot>> for Tenant {
    fn from(t: Arc<TenantSnapshot>) -> Self {
        Arc::unwrap_or_clone(t).into()
    }
}

/// Every tenant of a snapshot, by the hash of its key and by id. Both
/// indexes hold the same records, so they cannot disagree about a tenant.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    // Keys are the policy's (key hashes and tenant ids); a client's key is
    // only ever looked up.
    by_key: HashMap<KeyHash, Arc<Tenant>, FastHash>,
    by_id: HashMap<String, Arc<Tenant>, FastHash>,
    /// Virtual keys, each pointing at a tenant of `by_id` by id. Behind an
    /// `Arc` (as `spend`) so snapshots stay small to move around.
    virtual_keys: Arc<HashMap<KeyHash, Arc<VirtualKey>, FastHash>>,
    /// Fleet-wide spend by tenant id, and by `key:<virtual key id>`.
    spend: Arc<HashMap<String, Spend>>,
}

impl Tenants {
    /// Makes `tenant` the holder of `key`, and the tenant its id names.
    pub fn insert(&mut self, key: KeyHash, tenant: impl Into<Tenant>) {
        let tenant = Arc::new(tenant.into());
        self.by_id.insert(tenant.id.clone(), tenant.clone());
        self.by_key.insert(key, tenant);
    }

    /// A tenant reachable only through virtual keys.
    pub fn insert_keyless(&mut self, tenant: impl Into<Tenant>) {
        let tenant = Arc::new(tenant.into());
        self.by_id.insert(tenant.id.clone(), tenant);
    }

    pub fn by_key(&self, key: &KeyHash) -> Option<&Arc<Tenant>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id)
    }

    /// Adds a virtual key; one whose tenant is unknown is ignored (the
    /// tenant was removed from the policy, so the key grants nothing).
    pub fn insert_virtual_key(&mut self, key: KeyHash, vkey: VirtualKey) -> bool {
        if !self.by_id.contains_key(&vkey.tenant) || self.by_key.contains_key(&key) {
            return false;
        }
        Arc::make_mut(&mut self.virtual_keys).insert(key, Arc::new(vkey));
        true
    }

    /// The tenant (and virtual key) a key hash authenticates as.
    pub fn principal(&self, key: &KeyHash) -> Option<Principal> {
        if let Some(t) = self.by_key.get(key) {
            return Some(Principal {
                tenant: t.clone(),
                key: None,
            });
        }
        let vkey = self.virtual_keys.get(key)?;
        Some(Principal {
            tenant: self.by_id.get(&vkey.tenant)?.clone(),
            key: Some(vkey.clone()),
        })
    }

    pub fn virtual_keys(&self) -> impl Iterator<Item = (&KeyHash, &Arc<VirtualKey>)> {
        self.virtual_keys.iter()
    }

    pub fn set_spend(&mut self, scope: impl Into<String>, spend: Spend) {
        Arc::make_mut(&mut self.spend).insert(scope.into(), spend);
    }

    /// Fleet-wide spend of a tenant id or `key:<id>`.
    pub fn spend(&self, scope: &str) -> Option<&Spend> {
        self.spend.get(scope)
    }

    pub fn spends(&self) -> impl Iterator<Item = (&String, &Spend)> {
        self.spend.iter()
    }

    pub fn contains_key(&self, key: &KeyHash) -> bool {
        self.by_key.contains_key(key)
    }

    /// Every key with its tenant.
    pub fn keys(&self) -> impl Iterator<Item = (&KeyHash, &Arc<Tenant>)> {
        self.by_key.iter()
    }

    /// Every tenant once.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// How a route orders its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// As written.
    #[default]
    Priority,
    /// Lowest p50 TTFT from the pushed scores first.
    Latency,
    /// Cheapest (input + output price) first.
    Cost,
    /// Randomised by weight per request.
    Weighted,
    /// Fewest attempts in flight on this node first.
    LeastBusy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedTarget {
    pub provider: String,
    pub model: String,
    pub weight: u32,
}

/// How a route retries (beyond trying each target of its plan once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra attempts after the plan's targets were each tried once: a
    /// target whose failure allows it is tried again after a backoff.
    pub attempts: u32,
    /// Retries may add at most this share (percent) of the route's
    /// requests over a sliding window...
    pub budget_percent: u32,
    /// ...or this many per window, whichever is more (a quiet route can
    /// still retry).
    pub budget_floor: u32,
    /// First backoff; each further retry doubles it, with full jitter.
    pub backoff: Duration,
    /// Longest wait before a retry, backoff or the provider's
    /// `retry-after`: a target asking for longer is not retried.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            budget_percent: 20,
            budget_floor: 10,
            backoff: Duration::from_millis(25),
            max_wait: Duration::from_secs(1),
        }
    }
}

/// A policy rule of a route: when a request matches `when`, it is planned
/// on `route` instead (the first matching rule wins; the chosen route's own
/// rules are not evaluated again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub when: RuleCondition,
    /// The route to plan on instead; empty = the route itself (a rule
    /// that only filters).
    pub route: String,
    /// Narrows the planned targets (fallbacks included); `None` = all.
    pub filter: Option<TargetFilter>,
}

/// A rule's `filter` action: keep only the targets matching one of `keep`
/// (when any is given), then leave out those matching one of `drop`.
/// Applied after residency, so it can only narrow what was permitted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetFilter {
    pub keep: Vec<TargetMatch>,
    pub drop: Vec<TargetMatch>,
}

/// Every field given must equal the target's (`None` matches anything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetMatch {
    pub provider: Option<String>,
    pub model: Option<String>,
    /// The region whose egress calls the provider.
    pub region: Option<String>,
}

impl TargetMatch {
    pub fn matches(&self, provider: &str, model: &str, region: Option<&str>) -> bool {
        self.provider.as_deref().is_none_or(|p| p == provider)
            && self.model.as_deref().is_none_or(|m| m == model)
            && self.region.as_deref().is_none_or(|r| Some(r) == region)
    }
}

impl TargetFilter {
    pub fn admits(&self, provider: &str, model: &str, region: Option<&str>) -> bool {
        (self.keep.is_empty() || self.keep.iter().any(|m| m.matches(provider, model, region)))
            && !self.drop.iter().any(|m| m.matches(provider, model, region))
    }
}

/// Every condition set must hold (an empty condition matches everything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleCondition {
    /// Estimated prompt tokens above this.
    pub prompt_tokens_over: Option<u64>,
    /// Requested `max_tokens` above this.
    pub max_tokens_over: Option<u64>,
    /// The request declares tools (true) or does not (false).
    pub tools: Option<bool>,
    /// The request carries images (true) or does not (false).
    pub images: Option<bool>,
    /// A request header with this value (name lower-case; value compared
    /// case-insensitively), e.g. `x-switchyard-priority: low`.
    pub header: Option<(String, String)>,
    /// One of the comma-separated `x-switchyard-tags`.
    pub tag: Option<String>,
    /// The request's tenant is one of these.
    pub tenants: Vec<String>,
}

/// Downgrade: while the route's primary (its first target) is degraded —
/// ejected, failing lately, or with a first-token p95 over `ttft_over` —
/// requests marked non-critical (`x-switchyard-priority: low`) are planned
/// on `route` instead; the rest keep the primary chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downgrade {
    pub route: String,
    pub ttft_over: Option<Duration>,
}

/// A named route: ordered targets, then the routes to fall back to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteSnapshot {
    pub name: String,
    pub strategy: Strategy,
    pub targets: Vec<WeightedTarget>,
    pub fallbacks: Vec<String>,
    /// How long each attempt may take to its first streamed event before
    /// the edge moves on to the next target; `None` = the limits' default.
    pub first_token_timeout: Option<Duration>,
    /// At most this many targets of the route's plan (fallbacks included)
    /// are tried per request; `None` = every target.
    pub max_attempts: Option<u32>,
    pub retry: RetryPolicy,
    /// Longest a single attempt may take to its answer (a stream: to its
    /// first event) before the next is tried; `None` = only the request's
    /// deadline (and `first_token_timeout` for streams).
    pub attempt_timeout: Option<Duration>,
    /// Evaluated in order before planning.
    pub rules: Vec<RouteRule>,
    pub downgrade: Option<Downgrade>,
    /// A text-only stream cut after it was committed continues on another
    /// of the plan's targets that supports prefill (see `Prefill`).
    pub resume: bool,
    /// Hedged requests: `None` = off.
    pub hedge: Option<HedgePolicy>,
}

/// A route's hedging: when an attempt has not answered (a complete body,
/// or a stream's first event) after the delay, a second attempt starts on
/// the plan's next target and the first to answer wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HedgePolicy {
    /// The delay; with `after_p95`, the delay used while the target's p95
    /// first-byte time is unknown.
    pub delay: Duration,
    /// Wait the target's p95 time to its first byte (this edge's estimate
    /// once it has a few samples, else the fleet's) instead.
    pub after_p95: bool,
    /// Floor of the p95 delay, so a fast target is not hedged on noise.
    pub min_delay: Duration,
}

/// Latency and error scores the control plane folds from every node's
/// telemetry over a sliding window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    pub targets: HashMap<ScoreKey, TargetScore>,
    /// (edge region, egress region) → backhaul round-trip time.
    pub backhaul: HashMap<(String, String), RttScore>,
    pub computed_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScoreKey {
    pub provider: String,
    pub model: String,
    pub region: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TargetScore {
    pub requests: u64,
    pub error_rate: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub ttft_p99_ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RttScore {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Tenant {
    /// `allowed_models` entries are exact names, `*`, or `provider/*`.
    pub fn may_use(&self, requested: &str) -> bool {
        models_allow(self.allowed_models.as_deref(), requested)
    }
}

fn models_allow(allowed: Option<&[String]>, requested: &str) -> bool {
    match allowed {
        None => true,
        Some(list) => list.iter().any(|m| {
            m == requested
                || m == "*"
                || m.strip_suffix("/*").is_some_and(|p| {
                    requested
                        .strip_prefix(p)
                        .is_some_and(|r| r.starts_with('/'))
                })
        }),
    }
}

/// Limits and timeouts the data plane enforces.
#[derive(Debug, Clone)]
pub struct LimitsSnapshot {
    pub max_body_bytes: usize,
    /// Time allowed for the upstream to answer with headers.
    pub upstream_timeout: Duration,
    /// Longest silence tolerated between two streamed events.
    pub stream_idle_timeout: Duration,
    /// Default first-event deadline of a streamed answer, per attempt
    /// (routes may set their own); `None` = only the other deadlines.
    pub first_token_timeout: Option<Duration>,
}

impl Default for LimitsSnapshot {
    fn default() -> Self {
        LimitsSnapshot {
            max_body_bytes: 32 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            first_token_timeout: None,
        }
    }
}

/// The parts of a [`Snapshot`], filled in by the policy compiler, the wire
/// decoder and tests. [`SnapshotBuilder::build`] derives the plan tables
/// from them once, so a snapshot's tables always match its parts.
#[derive(Debug, Clone, Default)]
pub struct SnapshotBuilder {
    pub version: u64,
    pub providers: HashMap<String, Arc<ProviderSnapshot>>,
    /// Alias name → target.
    pub aliases: HashMap<String, RouteTarget>,
    /// Tenant records, by key hash and by id.
    pub tenants: Tenants,
    pub limits: LimitsSnapshot,
    pub regions: HashMap<String, RegionSnapshot>,
    /// Route name → route (ordered targets with fallbacks).
    pub routes: HashMap<String, Arc<RouteSnapshot>>,
    /// Shared so a score refresh does not copy the policy and vice versa.
    pub scores: Arc<Scores>,
}

impl SnapshotBuilder {
    /// Freezes the parts and compiles the plan tables: every route, alias
    /// and advertised `provider/model`, unrestricted and for every tenant's
    /// jurisdiction set, so requests look plans up instead of computing them.
    pub fn build(self) -> Snapshot {
        let mut snapshot = Snapshot {
            parts: self,
            plans: Arc::default(),
        };
        snapshot.plans = Arc::new(plan::compile_plan_tables(&snapshot));
        snapshot
    }
}

/// Everything a node needs to serve requests, immutable once built: the
/// parts are read through accessors, and changing one goes through
/// [`Snapshot::into_builder`] so the plan tables are rebuilt with it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    parts: SnapshotBuilder,
    plans: Arc<PlanTables>,
}

impl Default for Snapshot {
    fn default() -> Self {
        SnapshotBuilder::default().build()
    }
}

/// Precompiled plans: model name → plan, unrestricted and per sorted
/// jurisdiction set.
#[derive(Debug, Clone, Default)]
pub struct PlanTables {
    pub unrestricted: HashMap<String, Result<Plan, PlanError>>,
    pub by_jurisdictions: HashMap<Vec<String>, HashMap<String, Result<Plan, PlanError>>>,
}

impl Snapshot {
    pub fn builder() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// The parts, to change and [`SnapshotBuilder::build`] again.
    pub fn into_builder(self) -> SnapshotBuilder {
        self.parts
    }

    /// The same policy with new scores; latency-ordered plans follow them.
    pub fn with_scores(&self, scores: Arc<Scores>) -> Snapshot {
        let mut parts = self.parts.clone();
        parts.scores = scores;
        parts.build()
    }

    /// The same policy with refreshed scores and tenant state (virtual
    /// keys, spend, leases), as the control plane pushes between versions.
    pub fn with_refresh(&self, scores: Arc<Scores>, tenants: Tenants) -> Snapshot {
        let mut parts = self.parts.clone();
        parts.scores = scores;
        parts.tenants = tenants;
        parts.build()
    }

    pub fn version(&self) -> u64 {
        self.parts.version
    }

    pub fn providers(&self) -> &HashMap<String, Arc<ProviderSnapshot>> {
        &self.parts.providers
    }

    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderSnapshot>> {
        self.parts.providers.get(name)
    }

    pub fn aliases(&self) -> &HashMap<String, RouteTarget> {
        &self.parts.aliases
    }

    pub fn tenants(&self) -> &Tenants {
        &self.parts.tenants
    }

    pub fn limits(&self) -> &LimitsSnapshot {
        &self.parts.limits
    }

    pub fn regions(&self) -> &HashMap<String, RegionSnapshot> {
        &self.parts.regions
    }

    pub fn routes(&self) -> &HashMap<String, Arc<RouteSnapshot>> {
        &self.parts.routes
    }

    pub fn route(&self, name: &str) -> Option<&Arc<RouteSnapshot>> {
        self.parts.routes.get(name)
    }

    pub fn scores(&self) -> &Arc<Scores> {
        &self.parts.scores
    }

    pub fn plan_tables(&self) -> &PlanTables {
        &self.plans
    }

    /// Resolves what a client wrote in `model`: an alias first, then a
    /// route (its first target as written), then `provider/model`. Unknown
    /// providers resolve to nothing. [`Snapshot::plan`] gives the whole
    /// ordered, residency-filtered list.
    pub fn resolve(&self, requested: &str) -> Option<RouteTarget> {
        if let Some(target) = self.aliases().get(requested) {
            return Some(target.clone());
        }
        if let Some(t) = self.route(requested).and_then(|r| r.targets.first()) {
            return Some(RouteTarget {
                provider: t.provider.clone(),
                model: t.model.clone(),
            });
        }
        let (provider, model) = requested.split_once('/')?;
        if model.is_empty() || !self.providers().contains_key(provider) {
            return None;
        }
        Some(RouteTarget {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }

    /// The tenant a virtual key authenticates as.
    pub fn tenant_for_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.tenants().by_key(&KeyHash::of(key))
    }

    pub fn tenant(&self, tenant_id: &str) -> Option<&Arc<Tenant>> {
        self.tenants().by_id(tenant_id)
    }

    /// Every name `/v1/models` lists: `provider/model` for advertised models, then aliases.
    pub fn model_names(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut providers: Vec<_> = self.providers().values().collect();
        providers.sort_by(|a, b| a.name.cmp(&b.name));
        for p in providers {
            for m in &p.models {
                out.push((format!("{}/{}", p.name, m), p.name.clone()));
            }
        }
        let mut aliases: Vec<_> = self.aliases().iter().collect();
        aliases.sort_by(|a, b| a.0.cmp(b.0));
        for (alias, target) in aliases {
            out.push((alias.clone(), target.provider.clone()));
        }
        let mut routes: Vec<_> = self.routes().values().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        for r in routes {
            if let Some(first) = r.targets.first() {
                out.push((r.name.clone(), first.provider.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-live-123");
        assert!(!format!("{s:?} {s}").contains("sk-live"));
        assert_eq!(s.expose(), "sk-live-123");
    }

    #[test]
    fn cached_input_tokens_cost_their_discounted_price() {
        let price = ModelPrice {
            input_per_million: 2.0,
            output_per_million: 8.0,
            cached_input_per_million: Some(0.5),
        };
        // 1M input of which 600k cached, 100k output.
        let cost = price.cost_with_cache(1_000_000, 600_000, 100_000);
        assert!(
            (cost - (0.4 * 2.0 + 0.6 * 0.5 + 0.1 * 8.0)).abs() < 1e-9,
            "{cost}"
        );
        // No cached price: cached tokens cost the input price.
        let plain = ModelPrice {
            cached_input_per_million: None,
            ..price
        };
        assert!((plain.cost_with_cache(1_000_000, 600_000, 0) - 2.0).abs() < 1e-9);
        // More cached than input (a provider's rounding) never goes negative.
        assert!(price.cost_with_cache(10, 20, 0) >= 0.0);
    }

    #[test]
    fn key_hash_round_trip() {
        let h = KeyHash::of("sy-dev-abc");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }

    #[test]
    fn resolves_aliases_then_provider_prefix() {
        let mut snap = Snapshot::builder();
        snap.providers.insert(
            "openai".into(),
            Arc::new(ProviderSnapshot {
                name: "openai".into(),
                kind: ProviderKind::OpenAi,
                base_url: "http://127.0.0.1:1/v1".into(),
                keys: vec![],
                models: vec!["gpt-4o-mini".into()],
                simulated: None,
                region: None,
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: Default::default(),
                key_pools: vec![],
            }),
        );
        snap.aliases.insert(
            "fast".into(),
            RouteTarget {
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
            },
        );
        let snap = snap.build();
        assert_eq!(snap.resolve("fast").unwrap().model, "gpt-4o-mini");
        assert_eq!(snap.resolve("openai/o3").unwrap().model, "o3");
        assert_eq!(
            snap.resolve("openai/ft:gpt-4o:org/x").unwrap().model,
            "ft:gpt-4o:org/x"
        );
        assert!(snap.resolve("nope/x").is_none());
        assert!(snap.resolve("openai/").is_none());
        assert!(snap.resolve("gpt-4o").is_none());
        assert_eq!(snap.model_names().len(), 2);
    }
}
