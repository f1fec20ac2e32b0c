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

pub mod openai;
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

pub fn adapter_for(kind: ProviderKind) -> Option<&'static dyn Provider> {
    match kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => Some(&openai::OpenAiAdapter),
        ProviderKind::Simulated => Some(&simulated::SimulatedAdapter),
        ProviderKind::Anthropic | ProviderKind::Gemini => None,
    }
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
pub(crate) fn scrub(text: &str, keys: &[Secret]) -> String {
    let mut out = text.to_string();
    for k in keys {
        let k = k.expose();
        if k.len() >= 4 && out.contains(k) {
            out = out.replace(k, "[redacted]");
        }
    }
    out
}
