//! Provider adapters: one small trait, one implementation per wire protocol.
//!
//! An adapter turns an [`EgressRequest`] into the provider's request, calls it
//! through the shared pooled client, and hands back either a complete body or
//! the raw upstream byte stream plus the translator that maps its events into
//! the caller's protocol. Timeouts, key choice and stream handling are the
//! egress's, so every adapter (the simulated one included) gets the same.

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_llm::openai::Usage;
use switchyard_llm::translate::StreamTranslator;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{
    Health, LimitsSnapshot, ProviderKind, ProviderSnapshot, ResolvedKey, Secret,
};

use crate::request::EgressRequest;
use crate::stream::UpstreamBytes;

pub mod anthropic;
pub(crate) mod faults;
pub mod gemini;
pub mod openai;
pub mod raw;
pub mod simulated;

pub struct CallContext<'a> {
    pub client: &'a reqwest::Client,
    pub provider: &'a ProviderSnapshot,
    pub key: Option<&'a Secret>,
    pub request: &'a EgressRequest,
    pub limits: &'a LimitsSnapshot,
}

pub enum ProviderReply {
    Json {
        body: Bytes,
        usage: Option<Usage>,
    },
    Stream {
        upstream: UpstreamBytes,
        translator: Box<dyn StreamTranslator>,
    },
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// Sends the request and waits for the response head (and, when not
    /// streaming, the whole body).
    async fn call(&self, ctx: CallContext<'_>) -> Result<ProviderReply, GatewayError>;
}

pub fn adapter_for(kind: ProviderKind) -> &'static dyn Provider {
    match kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => &openai::OpenAiAdapter,
        ProviderKind::Simulated => &simulated::SimulatedAdapter,
        ProviderKind::Anthropic => &anthropic::AnthropicAdapter,
        ProviderKind::Gemini => &gemini::GeminiAdapter,
    }
}

pub(crate) fn unsupported(provider: &ProviderSnapshot, what: &str) -> GatewayError {
    GatewayError::invalid(format!(
        "The provider `{}` ({}) does not support {what}.",
        provider.name,
        provider.kind.as_str()
    ))
}

/// The provider's `base_url` with `segments` appended as path segments
/// (each percent-encoded, so none can add a `/` or climb above the base).
pub(crate) fn endpoint_url(
    provider: &ProviderSnapshot,
    segments: &[&str],
    query: Option<&str>,
) -> Result<reqwest::Url, GatewayError> {
    let bad_base = || {
        GatewayError::new(
            ErrorKind::Internal,
            format!("The provider `{}` has an unusable base URL.", provider.name),
        )
    };
    let key = format!(
        "{}\n{}\n{}",
        provider.base_url,
        segments.join("\n"),
        query.unwrap_or("")
    );
    if let Some(url) = URLS.get(&key) {
        return Ok(url);
    }
    let mut url = reqwest::Url::parse(&provider.base_url).map_err(|_| bad_base())?;
    url.path_segments_mut()
        .map_err(|_| bad_base())?
        .pop_if_empty()
        .extend(segments);
    url.set_query(query);
    URLS.put(key, &url);
    Ok(url)
}

/// `{base_url}/{path}` for a fixed endpoint path of the adapter's own
/// (`chat/completions`, `v1/messages`), parsed once per base URL.
pub(crate) fn provider_url(
    provider: &ProviderSnapshot,
    path: &'static str,
) -> Result<reqwest::Url, GatewayError> {
    let key = format!("{}/{path}", provider.base_url);
    if let Some(url) = URLS.get(&key) {
        return Ok(url);
    }
    let url = reqwest::Url::parse(&key).map_err(|_| {
        GatewayError::new(
            ErrorKind::Internal,
            format!("The provider `{}` has an unusable base URL.", provider.name),
        )
    })?;
    URLS.put(key, &url);
    Ok(url)
}

/// Parsed upstream URLs by their text. Parsing one (with IDNA) cost about a
/// tenth of the egress's instructions per chat request; a lookup and a clone
/// cost a few hundred. Keys are whole URLs, so a snapshot swap that changes
/// a base URL simply misses; the bound keeps model names chosen by callers
/// (Gemini puts them in the path) from growing it without end.
static URLS: UrlCache = UrlCache::new();

type UrlMap = std::collections::HashMap<String, reqwest::Url>;

struct UrlCache(std::sync::LazyLock<std::sync::RwLock<UrlMap>>);

impl UrlCache {
    const MAX_ENTRIES: usize = 4096;

    const fn new() -> Self {
        UrlCache(std::sync::LazyLock::new(Default::default))
    }

    fn get(&self, key: &str) -> Option<reqwest::Url> {
        self.0.read().ok()?.get(key).cloned()
    }

    fn put(&self, key: String, url: &reqwest::Url) {
        if let Ok(mut map) = self.0.write() {
            if map.len() < Self::MAX_ENTRIES {
                map.insert(key, url.clone());
            }
        }
    }
}

/// POSTs a JSON body and returns the response if it is a success; a failure
/// status becomes the adapter's error (via `map_error`) with every provider
/// key scrubbed from its message.
pub(crate) async fn post_json(
    ctx: &CallContext<'_>,
    url: impl reqwest::IntoUrl,
    body: &impl serde::Serialize,
    headers: &[(&'static str, &str)],
    stream: bool,
    map_error: impl FnOnce(u16, &[u8], Option<String>) -> GatewayError,
) -> Result<reqwest::Response, GatewayError> {
    let payload = serde_json::to_vec(body)
        .map_err(|e| GatewayError::new(ErrorKind::Internal, e.to_string()))?;
    let mut req = ctx
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(payload);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if stream {
        req = req.header(reqwest::header::ACCEPT, "text/event-stream");
    }
    let resp = req
        .send()
        .await
        .map_err(|e| transport_error(&ctx.provider.name, &e))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let (status, retry_after, body) = read_error(resp).await;
    let mut err = map_error(status, &body, retry_after);
    err.message = scrub(&err.message, &ctx.provider.keys).into_owned();
    if status == 401 || status == 403 {
        // The key was refused, not the request: another key may do.
        err = err
            .with_source(switchyard_llm::Source::Key)
            .with_retry(switchyard_llm::Retry::AnotherKey);
    }
    Err(err)
}

/// The upstream body as a stream of chunks for the SSE translator.
pub(crate) fn byte_stream(resp: reqwest::Response, provider: &str) -> UpstreamBytes {
    use futures::StreamExt;
    let provider = provider.to_string();
    resp.bytes_stream()
        .map(move |r| r.map_err(|e| transport_error(&provider, &e)))
        .boxed()
}

pub(crate) async fn full_body(
    resp: reqwest::Response,
    provider: &str,
) -> Result<(Bytes, serde_json::Value), GatewayError> {
    let body = resp
        .bytes()
        .await
        .map_err(|e| transport_error(provider, &e))?;
    let v = serde_json::from_slice(&body).map_err(|_| {
        GatewayError::new(
            ErrorKind::Upstream,
            format!("The provider `{provider}` answered with a body that is not JSON."),
        )
    })?;
    Ok((body, v))
}

/// Largest upstream error body we read; error bodies are small and an
/// upstream must not make us buffer without bound.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Reads a (bounded) error body and the `retry-after` header.
pub(crate) async fn read_error(resp: reqwest::Response) -> (u16, Option<String>, Bytes) {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    use futures::StreamExt;
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    (status, retry_after, Bytes::from(body))
}

/// Maps a transport failure (connect, reset, timeout) to a client error that
/// names the provider but none of its secrets.
pub(crate) fn transport_error(provider: &str, e: &reqwest::Error) -> GatewayError {
    if e.is_timeout() {
        GatewayError::new(
            ErrorKind::Timeout,
            format!("The provider `{provider}` did not answer in time."),
        )
    } else if e.is_connect() {
        GatewayError::new(
            ErrorKind::Upstream,
            format!("Could not connect to the provider `{provider}`."),
        )
    } else {
        GatewayError::new(
            ErrorKind::Upstream,
            format!("The connection to the provider `{provider}` failed."),
        )
    }
}

/// Chooses the key for the next attempt among `keys` (a provider's
/// resolved keys on this egress), leaving out the indexes in `skip` (keys
/// this request already tried). Returns an index into `keys`.
///
/// Usable keys come first: neither cooling down after a 429 nor refused
/// (401/403) with their current value. Among them the one with the fewest
/// attempts in flight relative to its weight wins; ties go to the first
/// met from `start` on, so an idle pool still rotates. When no key is
/// usable the pool fails open: the key whose cooldown ends first, then a
/// refused one, so the provider still decides (a single-key pool behaves
/// as without a board).
pub fn pick_key(
    keys: &[ResolvedKey],
    health: &Health,
    provider: &str,
    start: usize,
    skip: &[usize],
    now: std::time::Instant,
) -> Option<usize> {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum State {
        Usable,
        Cooling(std::time::Instant),
        Refused,
    }
    let n = keys.len();
    let mut best: Option<(usize, State, u64, u64)> = None;
    for offset in 0..n {
        let i = (start % n + offset) % n;
        if skip.contains(&i) {
            continue;
        }
        let key = &keys[i];
        let entry = health.peek_key(&key.health_id(provider));
        let (state, in_flight) = match &entry {
            None => (State::Usable, 0),
            Some(e) if health.is_refused(e, key.fingerprint) => (State::Refused, e.in_flight()),
            Some(e) => match health.cooling_until(e, now) {
                Some(until) => (State::Cooling(until), e.in_flight()),
                None => (State::Usable, e.in_flight()),
            },
        };
        let weight = u64::from(key.weight.max(1));
        let better = match &best {
            None => true,
            Some((_, b_state, b_flight, b_weight)) => {
                state < *b_state
                    || (state == *b_state
                        && state == State::Usable
                        // in_flight / weight, compared without division.
                        && u64::from(in_flight) * b_weight < b_flight * weight)
            }
        };
        if better {
            best = Some((i, state, u64::from(in_flight), weight));
        }
    }
    best.map(|(i, ..)| i)
}

/// Removes every provider key from text we are about to show a client.
pub(crate) fn scrub<'a>(text: &'a str, keys: &[impl AsRef<Secret>]) -> std::borrow::Cow<'a, str> {
    if !keys
        .iter()
        .any(|k| k.as_ref().expose().len() >= 4 && text.contains(k.as_ref().expose()))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for k in keys {
        let k = k.as_ref().expose();
        if k.len() >= 4 && out.contains(k) {
            out = out.replace(k, "[redacted]");
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod key_choice_tests {
    use std::time::{Duration, Instant};

    use switchyard_proto::{Health, KeySource, PoolKey, ResolvedKey, Secret};

    use super::pick_key;

    fn key(id: &str, weight: u32, value: &str) -> ResolvedKey {
        let mut k = PoolKey::new(0, KeySource::Env("K".into()));
        k.weight = weight;
        ResolvedKey::new("main", id, &k, Secret::new(value))
    }

    fn pool() -> Vec<ResolvedKey> {
        vec![
            key("a", 1, "sk-a"),
            key("b", 1, "sk-b"),
            key("c", 1, "sk-c"),
        ]
    }

    #[test]
    fn an_idle_pool_rotates_and_nothing_is_picked_from_nothing() {
        let (keys, h, now) = (pool(), Health::new(), Instant::now());
        let picks: Vec<_> = (0..4)
            .map(|start| pick_key(&keys, &h, "p", start, &[], now).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        assert_eq!(pick_key(&[], &h, "p", 0, &[], now), None);
        assert_eq!(pick_key(&keys, &h, "p", 0, &[0, 1, 2], now), None);
        assert_eq!(pick_key(&keys, &h, "p", 0, &[0], now), Some(1));
    }

    #[test]
    fn fewest_in_flight_relative_to_weight_wins() {
        let keys = vec![key("a", 1, "sk-a"), key("b", 3, "sk-b")];
        let (h, now) = (Health::new(), Instant::now());
        let a = h.key(&keys[0].health_id("p")).unwrap();
        let b = h.key(&keys[1].health_id("p")).unwrap();
        let _a1 = a.start();
        let (_b1, _b2) = (b.start(), b.start());
        // a: 1 of weight 1; b: 2 of weight 3 → b is less loaded.
        assert_eq!(pick_key(&keys, &h, "p", 0, &[], now), Some(1));
        let _b3 = b.start();
        let _b4 = b.start();
        // b: 4/3 > 1/1 → a.
        assert_eq!(pick_key(&keys, &h, "p", 1, &[], now), Some(0));
    }

    #[test]
    fn cooling_and_refused_keys_are_skipped_then_used_as_a_last_resort() {
        let (mut keys, h, now) = (pool(), Health::new(), Instant::now());
        let entry = |i: usize, keys: &[ResolvedKey]| h.key(&keys[i].health_id("p")).unwrap();
        h.cool_down(&entry(0, &keys), Duration::from_secs(30), now);
        h.refuse(&entry(1, &keys), keys[1].fingerprint);
        for start in 0..3 {
            assert_eq!(pick_key(&keys, &h, "p", start, &[], now), Some(2));
        }
        // Every key out: the one cooling the shortest, refused ones last.
        h.cool_down(&entry(2, &keys), Duration::from_secs(5), now);
        assert_eq!(pick_key(&keys, &h, "p", 0, &[], now), Some(2));
        assert_eq!(pick_key(&keys, &h, "p", 0, &[2], now), Some(0));
        assert_eq!(pick_key(&keys, &h, "p", 0, &[0, 2], now), Some(1));
        // Cooldowns end; a refused key comes back when its value changes.
        let later = now + Duration::from_secs(31);
        assert_eq!(pick_key(&keys, &h, "p", 0, &[], later), Some(0));
        assert_eq!(pick_key(&keys, &h, "p", 1, &[0, 2], later), Some(1));
        keys[1] = key("b", 1, "sk-b-rotated");
        h.cool_down(&entry(0, &keys), Duration::from_secs(300), later);
        h.cool_down(&entry(2, &keys), Duration::from_secs(300), later);
        assert_eq!(pick_key(&keys, &h, "p", 0, &[], later), Some(1));
        // The same key id under another provider is another key.
        assert_eq!(pick_key(&keys, &h, "q", 0, &[], later), Some(0));
    }
}
