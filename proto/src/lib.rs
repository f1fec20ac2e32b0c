//! Types the Switchyard nodes share: the compiled, validated policy snapshot
//! that edge and egress nodes serve from.
//!
//! A snapshot is immutable once built. Nodes hold it behind an `Arc` and swap
//! a whole new one in when policy changes, so the request path reads it
//! without locks. The control plane (`switchyard-control`) builds snapshots
//! from the operator's policy document; later the same types travel to remote
//! nodes as protobuf messages compiled from this folder's `.proto` files.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

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
    pub keys: Vec<Secret>,
    /// Models advertised in `/v1/models`; requests may name others.
    pub models: Vec<String>,
    /// Only for [`ProviderKind::Simulated`]: default behaviour and per-model overrides.
    pub simulated: Option<SimulatedSettings>,
    /// Region whose egress nodes call this provider; `None` = any egress.
    pub region: Option<String>,
}

/// A region of the fleet: where its egress nodes listen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionSnapshot {
    pub name: String,
    /// Jurisdiction tag (e.g. `eu`, `us`) used by residency rules.
    pub jurisdiction: Option<String>,
    /// Egress node addresses (`host:port`), resolved by the edge.
    pub egress: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct SimulatedSettings {
    pub default_profile: SimulatedProfile,
    pub models: HashMap<String, SimulatedProfile>,
}

impl SimulatedSettings {
    pub fn profile(&self, model: &str) -> &SimulatedProfile {
        self.models.get(model).unwrap_or(&self.default_profile)
    }
}

/// Where a model name leads: one provider and the model name it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTarget {
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Clone)]
pub struct TenantSnapshot {
    pub id: String,
    /// `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
}

impl TenantSnapshot {
    /// `allowed_models` entries are exact names, `*`, or `provider/*`.
    pub fn may_use(&self, requested: &str) -> bool {
        match &self.allowed_models {
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
}

/// Limits and timeouts the data plane enforces.
#[derive(Debug, Clone)]
pub struct LimitsSnapshot {
    pub max_body_bytes: usize,
    /// Time allowed for the upstream to answer with headers.
    pub upstream_timeout: Duration,
    /// Longest silence tolerated between two streamed events.
    pub stream_idle_timeout: Duration,
}

impl Default for LimitsSnapshot {
    fn default() -> Self {
        LimitsSnapshot {
            max_body_bytes: 32 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything a node needs to serve requests, immutable once built.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    pub providers: HashMap<String, Arc<ProviderSnapshot>>,
    /// Alias name → target.
    pub aliases: HashMap<String, RouteTarget>,
    pub tenants: HashMap<KeyHash, Arc<TenantSnapshot>>,
    pub limits: LimitsSnapshot,
    pub regions: HashMap<String, RegionSnapshot>,
}

impl Snapshot {
    /// Resolves what a client wrote in `model`: an alias first, then
    /// `provider/model`. Unknown providers resolve to nothing.
    pub fn resolve(&self, requested: &str) -> Option<RouteTarget> {
        if let Some(target) = self.aliases.get(requested) {
            return Some(target.clone());
        }
        let (provider, model) = requested.split_once('/')?;
        if model.is_empty() || !self.providers.contains_key(provider) {
            return None;
        }
        Some(RouteTarget {
            provider: provider.to_string(),
            model: model.to_string(),
        })
    }

    pub fn tenant_for_key(&self, key: &str) -> Option<&Arc<TenantSnapshot>> {
        self.tenants.get(&KeyHash::of(key))
    }

    /// Every name `/v1/models` lists: `provider/model` for advertised models, then aliases.
    pub fn model_names(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut providers: Vec<_> = self.providers.values().collect();
        providers.sort_by(|a, b| a.name.cmp(&b.name));
        for p in providers {
            for m in &p.models {
                out.push((format!("{}/{}", p.name, m), p.name.clone()));
            }
        }
        let mut aliases: Vec<_> = self.aliases.iter().collect();
        aliases.sort_by(|a, b| a.0.cmp(b.0));
        for (alias, target) in aliases {
            out.push((alias.clone(), target.provider.clone()));
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
    fn key_hash_round_trip() {
        let h = KeyHash::of("sy-dev-abc");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }

    #[test]
    fn resolves_aliases_then_provider_prefix() {
        let mut snap = Snapshot::default();
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
            }),
        );
        snap.aliases.insert(
            "fast".into(),
            RouteTarget {
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
            },
        );
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
