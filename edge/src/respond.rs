//! Writing answers to the client.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use switchyard_llm::GatewayError;

/// Response headers every answer carries.
pub struct Common<'a> {
    pub request_id: &'a str,
}

pub fn header(status: u16, common: &Common<'_>) -> Box<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6)).expect("valid status");
    let _ = h.insert_header("x-request-id", common.request_id);
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
    let mut h = header(status, common);
    let _ = h.insert_header("content-type", "application/json");
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
    common: &Common<'_>,
    mut extra: Vec<(&'static str, String)>,
) -> bool {
    if let Some(ra) = &e.retry_after {
        extra.push(("retry-after", ra.clone()));
    }
    let body = Bytes::from(e.to_openai_json().to_string());
    json(session, e.status(), body, common, &extra).await
}
