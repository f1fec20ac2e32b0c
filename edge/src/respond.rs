//! Writing answers to the client.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use switchyard_backhaul::Protocol;
use switchyard_llm::GatewayError;

/// Response headers every answer carries.
pub struct Common<'a> {
    pub request_id: &'a str,
    /// The region and jurisdiction that processed the request (residency
    /// made visible on every answer).
    pub region: &'a str,
    pub jurisdiction: &'a str,
}

pub fn header(status: u16, common: &Common<'_>) -> Box<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(8)).expect("valid status");
    let _ = h.insert_header("x-request-id", common.request_id);
    let _ = h.insert_header("x-switchyard-region", common.region);
    let _ = h.insert_header("x-switchyard-jurisdiction", common.jurisdiction);
    let _ = h.insert_header("server", "switchyard");
    Box::new(h)
}

pub async fn json(
    session: &mut ServerSession,
    status: u16,
    body: Bytes,
    common: &Common<'_>,
    extra: &[(&'static str, String)],
) -> bool {
    let mut all = vec![("content-type", "application/json".to_string())];
    all.extend(extra.iter().cloned());
    full(session, status, body, common, &all).await
}

/// A complete body; `extra` must include its content type.
pub async fn full(
    session: &mut ServerSession,
    status: u16,
    body: Bytes,
    common: &Common<'_>,
    extra: &[(&'static str, String)],
) -> bool {
    let mut h = header(status, common);
    let _ = h.insert_header("content-length", body.len().to_string());
    for (k, v) in extra {
        let _ = h.insert_header(*k, v.as_str());
    }
    if session.write_response_header(h).await.is_err() {
        return false;
    }
    session.write_response_body(body, true).await.is_ok()
}

pub async fn error(
    session: &mut ServerSession,
    e: &GatewayError,
    protocol: Protocol,
    common: &Common<'_>,
    mut extra: Vec<(&'static str, String)>,
) -> bool {
    if let Some(ra) = &e.retry_after {
        extra.push(("retry-after", ra.clone()));
    }
    let body = match protocol {
        Protocol::OpenAi => e.to_openai_json(),
        Protocol::Anthropic => e.to_anthropic_json(),
    };
    let body = Bytes::from(body.to_string());
    json(session, e.status(), body, common, &extra).await
}
