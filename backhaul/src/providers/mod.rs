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
use switchyard_proto::{LimitsSnapshot, ProviderKind, ProviderSnapshot, Secret};

use crate::request::EgressRequest;
use crate::stream::UpstreamBytes;

pub mod anthropic;
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
    let mut url = reqwest::Url::parse(&provider.base_url).map_err(|_| bad_base())?;
    url.path_segments_mut()
        .map_err(|_| bad_base())?
        .pop_if_empty()
        .extend(segments);
    url.set_query(query);
    Ok(url)
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

/// Removes every provider key from text we are about to show a client.
pub(crate) fn scrub<'a>(text: &'a str, keys: &[Secret]) -> std::borrow::Cow<'a, str> {
    if !keys
        .iter()
        .any(|k| k.expose().len() >= 4 && text.contains(k.expose()))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = text.to_string();
    for k in keys {
        let k = k.expose();
        if k.len() >= 4 && out.contains(k) {
            out = out.replace(k, "[redacted]");
        }
    }
    std::borrow::Cow::Owned(out)
}
