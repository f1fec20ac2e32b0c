//! Raw passthrough: the caller's request goes to the provider as it is (only
//! the pool's key is added) and the answer comes back as it is, for
//! provider-specific features the unified API does not model.

use bytes::Bytes;
use http_body_util::Full;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::ProviderKind;

use super::{
    byte_stream, endpoint_url, invalid_header, read_error, scrub, secret_value, transport_error,
    unsupported, CallContext,
};
use crate::request::{RawPath, RawRequest};
use crate::stream::UpstreamBytes;

pub struct RawReply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: RawBody,
}

pub enum RawBody {
    Full(Bytes),
    Stream(UpstreamBytes),
}

pub async fn call(ctx: &CallContext<'_>, raw: &RawRequest) -> Result<RawReply, GatewayError> {
    let provider = ctx.provider;
    let method = http::Method::from_bytes(raw.method.as_bytes())
        .map_err(|_| GatewayError::invalid(format!("Unsupported method {}", raw.method)))?;
    if provider.kind == ProviderKind::Simulated {
        return Err(unsupported(provider, "raw passthrough"));
    }
    // Checked again here, where the URL is built: the path crossed the backhaul.
    let path = RawPath::parse(&raw.path)?;
    let segments: Vec<&str> = path.segments.iter().map(String::as_str).collect();
    let url = endpoint_url(provider, &segments, path.query)?;
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in &raw.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some(t) = &ctx.request.trace {
        req = req.header("traceparent", t.header());
    }
    if let Some(key) = ctx.key {
        req = match provider.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => req.header(
                http::header::AUTHORIZATION,
                secret_value(&provider.name, &format!("Bearer {}", key.expose()))?,
            ),
            ProviderKind::Anthropic => {
                req.header("x-api-key", secret_value(&provider.name, key.expose())?)
            }
            ProviderKind::Gemini => req.header(
                "x-goog-api-key",
                secret_value(&provider.name, key.expose())?,
            ),
            ProviderKind::Simulated => return Err(unsupported(provider, "raw passthrough")),
        };
    }
    if provider.kind == ProviderKind::Anthropic
        && !raw.headers.iter().any(|(k, _)| k == "anthropic-version")
    {
        req = req.header(
            "anthropic-version",
            switchyard_llm::anthropic::DEFAULT_VERSION,
        );
    }
    let req = req
        .body(Full::new(raw.body.clone()))
        .map_err(|_| invalid_header(&provider.name))?;
    let resp = ctx
        .client
        .send(req)
        .await
        .map_err(|e| transport_error(&provider.name, &e))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    if status == 401 || status == 403 {
        // Even raw answers must not carry (parts of) the gateway's key.
        return Err(GatewayError::new(
            ErrorKind::Upstream,
            format!(
                "The provider `{}` rejected the gateway's credentials (HTTP {status}).",
                provider.name
            ),
        )
        .with_code("upstream_auth_failed")
        .with_source(switchyard_llm::Source::Key)
        .with_retry(switchyard_llm::Retry::AnotherKey));
    }
    if status >= 400 {
        let (status, retry_after, body) = read_error(resp).await;
        let text = String::from_utf8_lossy(&body);
        let clean = scrub(&text, &provider.keys);
        return Ok(RawReply {
            status,
            content_type,
            retry_after,
            body: RawBody::Full(Bytes::from(clean.into_owned())),
        });
    }
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(RawReply {
        status,
        content_type,
        retry_after,
        body: RawBody::Stream(byte_stream(resp, &provider.name)),
    })
}
