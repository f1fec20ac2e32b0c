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
use switchyard_proto::health::{Availability, RateLimits};
use switchyard_proto::{
    Health, LimitsSnapshot, ProviderKind, ProviderSnapshot, ResolvedKey, Secret,
};

use http_body_util::Full;

use crate::request::EgressRequest;
use crate::stream::UpstreamBytes;
use crate::upstream::{UpstreamError, UpstreamResponse};

pub mod anthropic;
pub(crate) mod faults;
pub mod gemini;
pub mod openai;
pub mod raw;
pub mod simulated;

pub struct CallContext<'a> {
    pub client: &'a crate::upstream::UpstreamClient,
    pub provider: &'a ProviderSnapshot,
    pub key: Option<&'a Secret>,
    pub request: &'a EgressRequest,
    pub limits: &'a LimitsSnapshot,
    /// Told what the provider's rate-limit headers say about the key, on
    /// every answer (success or error) that carries them.
    pub on_limits: Option<&'a (dyn Fn(&RateLimits) + Send + Sync)>,
}

impl CallContext<'_> {
    pub(crate) fn observe_limits(&self, headers: &http::HeaderMap) {
        if let Some(report) = self.on_limits {
            let limits = rate_limits(headers);
            if !limits.is_empty() {
                report(&limits);
            }
        }
    }
}

/// Reads the rate-limit headers providers send on every answer: OpenAI's
/// (and most OpenAI-compatible servers') `x-ratelimit-{limit,remaining,
/// reset}-{requests,tokens}` with resets as durations (`6m0s`, `1.5s`,
/// `20ms`), and Anthropic's `anthropic-ratelimit-{requests,tokens,
/// input-tokens,output-tokens}-{limit,remaining,reset}` with resets as
/// RFC 3339 times. The reset kept is the one of a quota that is used up,
/// else the later one, so a key is steered away until it can serve again.
pub fn rate_limits(headers: &http::HeaderMap) -> RateLimits {
    // One pass over the answer's headers (this runs on every answer): a
    // lookup per known name hashed eighteen names per answer.
    // Each field's first value counts, as `HeaderMap::get` would give it.
    #[derive(Default, Clone, Copy)]
    struct Quota<'a> {
        remaining: Option<&'a str>,
        limit: Option<&'a str>,
        reset: Option<&'a str>,
    }
    impl Quota<'_> {
        fn remaining(&self) -> Option<u64> {
            self.remaining.and_then(|v| v.trim().parse().ok())
        }
        fn limit(&self) -> Option<u64> {
            self.limit.and_then(|v| v.trim().parse().ok())
        }
    }
    // OpenAI's requests and tokens; Anthropic's requests, tokens, input
    // tokens and output tokens.
    let mut quotas = [Quota::default(); 6];
    for (name, value) in headers {
        let name = name.as_str();
        let (index, field) = if let Some(rest) = name.strip_prefix("x-ratelimit-") {
            let Some((field, what)) = rest.split_once('-') else {
                continue;
            };
            match what {
                "requests" => (0, field),
                "tokens" => (1, field),
                _ => continue,
            }
        } else if let Some(rest) = name.strip_prefix("anthropic-ratelimit-") {
            let Some((what, field)) = rest.rsplit_once('-') else {
                continue;
            };
            match what {
                "requests" => (2, field),
                "tokens" => (3, field),
                "input-tokens" => (4, field),
                "output-tokens" => (5, field),
                _ => continue,
            }
        } else {
            continue;
        };
        let Ok(text) = value.to_str() else { continue };
        let q = &mut quotas[index];
        let slot = match field {
            "remaining" => &mut q.remaining,
            "limit" => &mut q.limit,
            "reset" => &mut q.reset,
            _ => continue,
        };
        slot.get_or_insert(text);
    }
    let mut out = RateLimits::default();
    let mut resets: Vec<(Option<u64>, std::time::Duration)> = Vec::new();
    for (i, q) in quotas[..2].iter().enumerate() {
        if let Some(reset) = q.reset.and_then(parse_go_duration) {
            resets.push((q.remaining(), reset));
        }
        let (r, l) = if i == 0 {
            (&mut out.remaining_requests, &mut out.limit_requests)
        } else {
            (&mut out.remaining_tokens, &mut out.limit_tokens)
        };
        *r = q.remaining();
        *l = q.limit();
    }
    let mut now = None;
    for (i, q) in quotas[2..].iter().enumerate() {
        if let Some(reset) = q
            .reset
            .and_then(|v| {
                time::OffsetDateTime::parse(
                    v.trim(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .map(|at| {
                let now = *now.get_or_insert_with(std::time::SystemTime::now);
                std::time::SystemTime::from(at)
                    .duration_since(now)
                    .unwrap_or_default()
            })
        {
            resets.push((q.remaining(), reset));
        }
        let (r, l) = if i == 0 {
            (&mut out.remaining_requests, &mut out.limit_requests)
        } else {
            (&mut out.remaining_tokens, &mut out.limit_tokens)
        };
        // Of several token quotas, the tightest speaks for the key.
        if let Some(rem) = q.remaining() {
            if r.is_none_or(|old| rem < old) {
                *r = Some(rem);
                *l = q.limit();
            }
        }
    }
    out.reset = resets
        .iter()
        .filter(|(remaining, _)| *remaining == Some(0))
        .map(|(_, d)| *d)
        .max()
        .or_else(|| resets.iter().map(|(_, d)| *d).max());
    out
}

/// Go-style durations as OpenAI writes resets: `1s`, `6m0s`, `1m30.5s`,
/// `20ms`, `1h2m`.
fn parse_go_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        total += value
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                "us" | "µs" => 0.000_001,
                "ns" => 0.000_000_001,
                _ => return None,
            };
        rest = tail;
    }
    (total.is_finite() && total >= 0.0)
        .then(|| std::time::Duration::from_secs_f64(total.min(86_400.0)))
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
) -> Result<http::Uri, GatewayError> {
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
    let mut url = url::Url::parse(&provider.base_url).map_err(|_| bad_base())?;
    url.path_segments_mut()
        .map_err(|_| bad_base())?
        .pop_if_empty()
        .extend(segments);
    url.set_query(query);
    let uri = to_uri(&url).ok_or_else(bad_base)?;
    URLS.put(key, &uri);
    Ok(uri)
}

/// `{base_url}/{path}` for a fixed endpoint path of the adapter's own
/// (`chat/completions`, `v1/messages`), parsed once per base URL.
pub(crate) fn provider_url(
    provider: &ProviderSnapshot,
    path: &'static str,
) -> Result<http::Uri, GatewayError> {
    // Concatenated, not `format!`ed: this runs on every request.
    let key = [provider.base_url.as_str(), "/", path].concat();
    if let Some(url) = URLS.get(&key) {
        return Ok(url);
    }
    let uri = url::Url::parse(&key)
        .ok()
        .as_ref()
        .and_then(to_uri)
        .ok_or_else(|| {
            GatewayError::new(
                ErrorKind::Internal,
                format!("The provider `{}` has an unusable base URL.", provider.name),
            )
        })?;
    URLS.put(key, &uri);
    Ok(uri)
}

/// A parsed (so normalised and percent-encoded) URL as hyper's URI; only
/// http and https go to providers.
fn to_uri(url: &url::Url) -> Option<http::Uri> {
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    url.as_str().parse().ok()
}

/// Parsed upstream URLs by their text. Parsing one (with IDNA) cost about a
/// tenth of the egress's instructions per chat request; a lookup and a clone
/// cost a few hundred. Keys are whole URLs, so a snapshot swap that changes
/// a base URL simply misses; the bound keeps model names chosen by callers
/// (Gemini puts them in the path) from growing it without end.
static URLS: UrlCache = UrlCache::new();

type UrlMap = std::collections::HashMap<String, http::Uri, switchyard_proto::FastHash>;

struct UrlCache(std::sync::LazyLock<std::sync::RwLock<UrlMap>>);

impl UrlCache {
    const MAX_ENTRIES: usize = 4096;

    const fn new() -> Self {
        UrlCache(std::sync::LazyLock::new(Default::default))
    }

    fn get(&self, key: &str) -> Option<http::Uri> {
        self.0.read().ok()?.get(key).cloned()
    }

    fn put(&self, key: String, url: &http::Uri) {
        if let Ok(mut map) = self.0.write() {
            if map.len() < Self::MAX_ENTRIES {
                map.insert(key, url.clone());
            }
        }
    }
}

/// Header names made once: `Builder::header` parses a `&str` name on every
/// request.
static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// POSTs a JSON body and returns the response if it is a success; a failure
/// status becomes the adapter's error (via `map_error`) with every provider
/// key scrubbed from its message.
pub(crate) async fn post_json(
    ctx: &CallContext<'_>,
    url: http::Uri,
    body: &impl serde::Serialize,
    headers: &[(http::HeaderName, &str)],
    stream: bool,
    map_error: impl FnOnce(u16, &[u8], Option<String>) -> GatewayError,
) -> Result<UpstreamResponse, GatewayError> {
    let payload = serde_json::to_vec(body)
        .map_err(|e| GatewayError::new(ErrorKind::Internal, e.to_string()))?;
    post_payload(ctx, url, payload, headers, stream, map_error).await
}

/// [`post_json`] with the body already written.
pub(crate) async fn post_payload(
    ctx: &CallContext<'_>,
    url: http::Uri,
    payload: Vec<u8>,
    headers: &[(http::HeaderName, &str)],
    stream: bool,
    map_error: impl FnOnce(u16, &[u8], Option<String>) -> GatewayError,
) -> Result<UpstreamResponse, GatewayError> {
    let mut req = http::Request::post(url).header(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    // The adapters pass their credentials here; a sensitive value is kept
    // out of any `Debug` output of the request.
    for (k, v) in headers {
        req = req.header(k, secret_value(&ctx.provider.name, v)?);
    }
    if stream {
        req = req.header(
            http::header::ACCEPT,
            http::HeaderValue::from_static("text/event-stream"),
        );
    }
    if let Some(t) = &ctx.request.trace {
        req = req.header(&TRACEPARENT, t.header());
    }
    let req = req
        .body(Full::new(Bytes::from(payload)))
        .map_err(|_| invalid_header(&ctx.provider.name))?;
    let resp = ctx
        .client
        .send(req)
        .await
        .map_err(|e| transport_error(&ctx.provider.name, &e))?;
    ctx.observe_limits(resp.headers());
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

/// A credential as a header value, marked sensitive.
pub(crate) fn secret_value(provider: &str, value: &str) -> Result<http::HeaderValue, GatewayError> {
    let mut v = http::HeaderValue::from_str(value).map_err(|_| invalid_header(provider))?;
    v.set_sensitive(true);
    Ok(v)
}

/// A header that cannot go on the wire (a key with a newline, say); the
/// message names neither the header's value nor any key.
pub(crate) fn invalid_header(provider: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Internal,
        format!("A request header for the provider `{provider}` is not a valid HTTP header value."),
    )
}

/// The upstream body as a stream of chunks for the SSE translator.
pub(crate) fn byte_stream(resp: UpstreamResponse, provider: &str) -> UpstreamBytes {
    use futures::StreamExt;
    let provider = provider.to_string();
    resp.bytes_stream()
        .map(move |r| r.map_err(|e| transport_error(&provider, &e)))
        .boxed()
}

pub(crate) async fn full_body(
    resp: UpstreamResponse,
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
pub(crate) async fn read_error(resp: UpstreamResponse) -> (u16, Option<String>, Bytes) {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    let mut stream = std::pin::pin!(resp.bytes_stream());
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
pub(crate) fn transport_error(provider: &str, e: &UpstreamError) -> GatewayError {
    // The client's error says what failed, not why: the cause (a reset, a
    // GOAWAY, a TLS alert) is for the operator. hyper's errors carry no
    // header values, so no key can be in it.
    let mut cause = e.to_string();
    // Each variant's text already includes its direct source's.
    let mut source = std::error::Error::source(e).and_then(|s| s.source());
    while let Some(s) = source {
        cause.push_str(": ");
        cause.push_str(&s.to_string());
        source = s.source();
    }
    tracing::warn!(target: "switchyard::upstream", provider, error = %cause, "provider transport failed");
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

/// What the pool offers for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPick {
    /// This index into the keys.
    Key(usize),
    /// The provider has no keys here (or every one was tried already).
    NoKey,
    /// Every key is out: cooling after a 429, out of its announced quota,
    /// at its policy `rpm`/`tpm`, or refused. `until`: when the first
    /// comes back, if any will.
    Exhausted { until: Option<std::time::Instant> },
}

/// Chooses the key for the next attempt among `keys` (a provider's
/// resolved keys on this egress), leaving out the indexes in `skip` (keys
/// this request already tried); `tokens` is the request's estimated size.
/// Key state is kept per key and model (see [`switchyard_proto::health::key_id`]).
///
/// A key is out while it cools down after a 429 (its `retry-after`, or a
/// doubling backoff), while the provider's rate-limit headers say its
/// quota is used up until their reset, while its policy `rpm`/`tpm` for
/// the current minute is reached, and after a 401/403 (until its value
/// changes, or one probe after a long while). Among usable keys the one
/// with the most headroom wins: fewest attempts in flight for its weight,
/// scaled up by its recent error rate and by how little of its announced
/// quota is left. Ties go to the first met from `start` on, so an idle
/// pool rotates. When every key is out nothing is picked: the provider is
/// not called to be told again what it already said.
#[allow(clippy::too_many_arguments)]
pub fn pick_key(
    keys: &[ResolvedKey],
    health: &Health,
    provider: &str,
    model: &str,
    start: usize,
    skip: &[usize],
    tokens: u64,
    now: std::time::Instant,
) -> KeyPick {
    let n = keys.len();
    let mut best: Option<(usize, f64)> = None;
    let mut any = false;
    let mut until: Option<std::time::Instant> = None;
    for offset in 0..n {
        let i = (start % n + offset) % n;
        if skip.contains(&i) {
            continue;
        }
        any = true;
        let key = &keys[i];
        let weight = f64::from(key.weight.max(1));
        let Some(e) = health.peek_key(&key.health_id(provider, model)) else {
            let cost = 1.0 / weight;
            if best.is_none_or(|(_, c)| cost < c) {
                best = Some((i, cost));
            }
            continue;
        };
        if health.is_refused(&e, key.fingerprint, now) {
            continue;
        }
        let mut out_until = health
            .cooling_until(&e, now)
            .into_iter()
            .chain(health.quota_exhausted_until(&e, now))
            .max();
        // A key whose breaker is open (failing over and over) waits for
        // its probe like a cooling one.
        if health.availability(&e, now) == Availability::Ejected {
            out_until = out_until.max(health.probe_at(&e).or(Some(now)));
        }
        if key.rpm.is_some() || key.tpm.is_some() {
            let (requests, used, minute_end) = health.minute_usage(&e, now);
            let over_rpm = key.rpm.is_some_and(|rpm| requests >= u64::from(rpm));
            // A request larger than a whole minute's quota still gets one
            // try on a fresh minute rather than never.
            let over_tpm = key
                .tpm
                .is_some_and(|tpm| used > 0 && used.saturating_add(tokens) > tpm);
            if over_rpm || over_tpm {
                out_until = out_until.max(Some(minute_end));
            }
        }
        if let Some(t) = out_until {
            until = Some(until.map_or(t, |u| u.min(t)));
            continue;
        }
        let load = f64::from(e.in_flight()) + 1.0;
        let cost =
            load / weight * (1.0 + 2.0 * e.error_rate()) / health.headroom(&e, now).max(0.05);
        if best.is_none_or(|(_, c)| cost < c) {
            best = Some((i, cost));
        }
    }
    match best {
        Some((i, _)) => KeyPick::Key(i),
        None if !any => KeyPick::NoKey,
        None => KeyPick::Exhausted { until },
    }
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

    use switchyard_proto::health::RateLimits;
    use switchyard_proto::{Health, KeySource, PoolKey, ResolvedKey, Secret};

    use super::{pick_key, rate_limits, KeyPick};

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

    fn pick(
        keys: &[ResolvedKey],
        h: &Health,
        start: usize,
        skip: &[usize],
        now: Instant,
    ) -> KeyPick {
        pick_key(keys, h, "p", "m", start, skip, 10, now)
    }

    #[test]
    fn an_idle_pool_rotates_and_nothing_is_picked_from_nothing() {
        let (keys, h, now) = (pool(), Health::new(), Instant::now());
        let picks: Vec<_> = (0..4)
            .map(|start| pick(&keys, &h, start, &[], now))
            .collect();
        assert_eq!(
            picks,
            [
                KeyPick::Key(0),
                KeyPick::Key(1),
                KeyPick::Key(2),
                KeyPick::Key(0)
            ]
        );
        assert_eq!(pick(&[], &h, 0, &[], now), KeyPick::NoKey);
        assert_eq!(pick(&keys, &h, 0, &[0, 1, 2], now), KeyPick::NoKey);
        assert_eq!(pick(&keys, &h, 0, &[0], now), KeyPick::Key(1));
    }

    #[test]
    fn fewest_in_flight_relative_to_weight_wins() {
        let keys = vec![key("a", 1, "sk-a"), key("b", 3, "sk-b")];
        let (h, now) = (Health::new(), Instant::now());
        let a = h.key(&keys[0].health_id("p", "m")).unwrap();
        let b = h.key(&keys[1].health_id("p", "m")).unwrap();
        let _a1 = a.start();
        let (_b1, _b2) = (b.start(), b.start());
        // a: (1+1)/1; b: (2+1)/3 → b is less loaded.
        assert_eq!(pick(&keys, &h, 0, &[], now), KeyPick::Key(1));
        let _b3 = b.start();
        let _b4 = b.start();
        let _b5 = b.start();
        // b: 6/3 = a: 2/1 → the tie goes to the rotation's start.
        assert_eq!(pick(&keys, &h, 0, &[], now), KeyPick::Key(0));
        let _b6 = b.start();
        assert_eq!(pick(&keys, &h, 1, &[], now), KeyPick::Key(0));
    }

    #[test]
    fn cooling_refused_and_exhausted_keys_are_left_out_and_the_pool_says_until_when() {
        let (mut keys, h, now) = (pool(), Health::new(), Instant::now());
        let entry = |i: usize, keys: &[ResolvedKey]| h.key(&keys[i].health_id("p", "m")).unwrap();
        h.cool_down(&entry(0, &keys), Duration::from_secs(30), now);
        h.refuse(&entry(1, &keys), keys[1].fingerprint, now);
        for start in 0..3 {
            assert_eq!(pick(&keys, &h, start, &[], now), KeyPick::Key(2));
        }
        h.cool_down(&entry(2, &keys), Duration::from_secs(5), now);
        let KeyPick::Exhausted { until: Some(until) } = pick(&keys, &h, 0, &[], now) else {
            panic!("every key is out");
        };
        let back = until.duration_since(now).as_millis();
        assert!(
            (4_990..=5_000).contains(&back),
            "the first to come back: {back}"
        );
        // Cooldowns end; a refused key comes back when its value changes.
        let later = now + Duration::from_secs(31);
        assert_eq!(pick(&keys, &h, 0, &[], later), KeyPick::Key(0));
        assert!(matches!(
            pick(&keys, &h, 1, &[0, 2], later),
            KeyPick::Exhausted { until: None }
        ));
        keys[1] = key("b", 1, "sk-b-rotated");
        assert_eq!(pick(&keys, &h, 1, &[0, 2], later), KeyPick::Key(1));
        // The same key id under another provider is another key.
        h.cool_down(&entry(0, &keys), Duration::from_secs(300), later);
        assert_eq!(
            pick_key(&keys, &h, "q", "m", 0, &[], 10, later),
            KeyPick::Key(0)
        );
    }

    #[test]
    fn announced_quotas_and_policy_limits_steer_before_a_429() {
        let (mut keys, h, now) = (pool(), Health::new(), Instant::now());
        let a = h.key(&keys[0].health_id("p", "m")).unwrap();
        let b = h.key(&keys[1].health_id("p", "m")).unwrap();
        // a has 10 % of its quota left, b 90 %: b wins though a comes first.
        let said = |remaining| RateLimits {
            remaining_requests: Some(remaining),
            limit_requests: Some(100),
            reset: Some(Duration::from_secs(20)),
            ..RateLimits::default()
        };
        h.observe_limits(&a, &said(10), now);
        h.observe_limits(&b, &said(90), now);
        assert_eq!(pick(&keys[..2], &h, 0, &[], now), KeyPick::Key(1));
        // Used up until the reset: out, though no 429 was seen.
        h.observe_limits(&b, &said(0), now);
        h.observe_limits(&a, &said(0), now);
        assert!(matches!(
            pick(&keys[..2], &h, 0, &[], now),
            KeyPick::Exhausted { until: Some(_) }
        ));
        assert_eq!(
            pick(&keys[..2], &h, 0, &[], now + Duration::from_secs(21)),
            KeyPick::Key(0)
        );
        // Policy rpm: two requests this minute and the key is out.
        keys[2].rpm = Some(2);
        let c = h.key(&keys[2].health_id("p", "m")).unwrap();
        assert_eq!(pick(&keys[2..], &h, 0, &[], now), KeyPick::Key(0));
        h.book(&c, 2, 20, now);
        assert!(matches!(
            pick(&keys[2..], &h, 0, &[], now),
            KeyPick::Exhausted { .. }
        ));
        keys[2].rpm = None;
        keys[2].tpm = Some(25);
        assert!(
            matches!(pick(&keys[2..], &h, 0, &[], now), KeyPick::Exhausted { .. }),
            "20 + 10 > 25"
        );
        assert_eq!(
            pick(&keys[2..], &h, 0, &[], now + Duration::from_secs(61)),
            KeyPick::Key(0)
        );
    }

    #[test]
    fn rate_limit_headers_of_openai_and_anthropic_recordings() {
        // tests/fixtures/openai/error-429-rate-limit-exceeded
        let mut h = http::HeaderMap::new();
        for (k, v) in [
            ("x-ratelimit-limit-requests", "200"),
            ("x-ratelimit-limit-tokens", "40000"),
            ("x-ratelimit-remaining-requests", "196"),
            ("x-ratelimit-remaining-tokens", "39923"),
            ("x-ratelimit-reset-requests", "21m36.001s"),
            ("x-ratelimit-reset-tokens", "115ms"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let l = rate_limits(&h);
        assert_eq!(
            (
                l.remaining_requests,
                l.limit_requests,
                l.remaining_tokens,
                l.limit_tokens
            ),
            (Some(196), Some(200), Some(39923), Some(40000))
        );
        assert_eq!(l.reset, Some(Duration::from_millis(21 * 60_000 + 36_001)));
        // Anthropic: the tightest token quota speaks; RFC 3339 resets.
        let mut h = http::HeaderMap::new();
        let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(30);
        let soon = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            soon.year(),
            soon.month() as u8,
            soon.day(),
            soon.hour(),
            soon.minute(),
            soon.second()
        );
        for (k, v) in [
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-tokens-limit", "40000"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-input-tokens-remaining", "100"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        h.insert("anthropic-ratelimit-tokens-reset", soon.parse().unwrap());
        let l = rate_limits(&h);
        assert_eq!(
            (l.remaining_requests, l.remaining_tokens),
            (Some(49), Some(0))
        );
        let reset = l.reset.unwrap();
        assert!(
            reset <= Duration::from_secs(30) && reset >= Duration::from_secs(28),
            "{reset:?}"
        );
        assert!(rate_limits(&http::HeaderMap::new()).is_empty());
    }
}
