//! Model discovery: what each provider's own model list says, so
//! `GET /v1/models` can show models nobody wrote into the policy.
//!
//! Lists are fetched with the node's own provider keys (so only where the
//! keys are: the egress, or `switchyard dev`), kept in an `ArcSwap`ped
//! cache, and refreshed in the background once older than [`MAX_AGE`]: a
//! caller is answered from the cache and never waits for a provider, except
//! the very first one, which waits at most [`FIRST_FETCH`]. A provider whose
//! list cannot be fetched keeps its previous list. The edge filters the
//! result by the tenant's permissions before showing it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::Value;
use switchyard_proto::{ProviderKind, ProviderSnapshot};

use crate::egress::SharedSnapshot;

/// How long a fetched list is served before a background refresh.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// The longest the first `/v1/models` waits for the lists.
pub const FIRST_FETCH: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Lists {
    fetched_at: Option<Instant>,
    /// provider name → model ids as the provider names them.
    models: BTreeMap<String, Arc<[String]>>,
}

pub struct Discovery {
    snapshot: SharedSnapshot,
    client: reqwest::Client,
    lists: ArcSwap<Lists>,
    refreshing: AtomicBool,
}

impl Discovery {
    pub(crate) fn new(snapshot: SharedSnapshot, client: reqwest::Client) -> Self {
        Discovery {
            snapshot,
            client,
            lists: ArcSwap::from_pointee(Lists::default()),
            refreshing: AtomicBool::new(false),
        }
    }

    /// Every discovered `(provider, model)`, providers of the current
    /// snapshot only.
    pub async fn models(self: &Arc<Self>) -> Vec<(String, String)> {
        let lists = self.lists.load_full();
        match lists.fetched_at {
            None => {
                let _ = tokio::time::timeout(FIRST_FETCH, self.clone().refresh()).await;
            }
            Some(at) if at.elapsed() > MAX_AGE => {
                let me = self.clone();
                tokio::spawn(async move { me.refresh().await });
            }
            Some(_) => {}
        }
        let snap = self.snapshot.load();
        let lists = self.lists.load();
        lists
            .models
            .iter()
            .filter(|(p, _)| snap.providers().contains_key(*p))
            .flat_map(|(p, models)| models.iter().map(move |m| (p.clone(), m.clone())))
            .collect()
    }

    async fn refresh(self: Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let snap = self.snapshot.load_full();
        let mut models = self.lists.load().models.clone();
        let client = &self.client;
        let fetches = snap
            .providers()
            .values()
            .map(|p| async move { (p.name.clone(), fetch(client, p).await) });
        for (name, listed) in futures::future::join_all(fetches).await {
            if let Some(list) = listed {
                models.insert(name, list.into());
            }
        }
        self.lists.store(Arc::new(Lists {
            fetched_at: Some(Instant::now()),
            models,
        }));
        self.refreshing.store(false, Ordering::Release);
    }
}

/// One provider's list, or `None` when it has none to give (no key, no
/// list endpoint, an error: logged without the key).
async fn fetch(client: &reqwest::Client, p: &ProviderSnapshot) -> Option<Vec<String>> {
    let key = p.keys.first()?.secret.expose();
    let base = p.base_url.trim_end_matches('/');
    let req = match p.kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
            client.get(format!("{base}/models")).bearer_auth(key)
        }
        ProviderKind::Anthropic => client
            .get(format!("{base}/v1/models?limit=1000"))
            .header("x-api-key", key)
            .header(
                "anthropic-version",
                switchyard_llm::anthropic::DEFAULT_VERSION,
            ),
        ProviderKind::Gemini => client
            .get(format!("{base}/v1beta/models?pageSize=1000"))
            .header("x-goog-api-key", key),
        ProviderKind::Simulated => return None,
    };
    let resp = match req.timeout(FIRST_FETCH).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            tracing::info!(provider = %p.name, status = r.status().as_u16(), "model list not available");
            return None;
        }
        Err(_) => {
            tracing::info!(provider = %p.name, "model list could not be fetched");
            return None;
        }
    };
    let body: Value = resp.json().await.ok()?;
    Some(parse_list(p.kind, &body))
}

/// Model ids from a provider's list body.
pub fn parse_list(kind: ProviderKind, body: &Value) -> Vec<String> {
    let (items, field, prefix) = match kind {
        ProviderKind::Gemini => (body.get("models"), "name", "models/"),
        _ => (body.get("data"), "id", ""),
    };
    let mut out: Vec<String> = items
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get(field)?.as_str())
        .map(|id| id.strip_prefix(prefix).unwrap_or(id).to_string())
        // A name that could not be routed is not worth listing.
        .filter(|id| crate::request::check_model_name(id).is_ok() && !id.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_of_every_kind() {
        let openai = json!({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}, {"id": "bad?id"}]});
        assert_eq!(parse_list(ProviderKind::OpenAi, &openai), ["gpt-4o"]);
        let anthropic =
            json!({"data": [{"id": "claude-sonnet-4-5", "type": "model"}], "has_more": false});
        assert_eq!(
            parse_list(ProviderKind::Anthropic, &anthropic),
            ["claude-sonnet-4-5"]
        );
        let gemini = json!({"models": [{"name": "models/gemini-2.5-flash"}]});
        assert_eq!(
            parse_list(ProviderKind::Gemini, &gemini),
            ["gemini-2.5-flash"]
        );
        assert!(parse_list(ProviderKind::OpenAi, &json!({})).is_empty());
    }
}
