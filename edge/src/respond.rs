//! Writing answers to the client.
//!
//! Statuses here are [`StatusCode`]s: a number that came over the wire is
//! checked where it enters (`dispatch`), so writing never fails on one.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderName, HeaderValue, StatusCode};
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

/// Headers an answer carries beyond the common ones. Names are `HeaderName`
/// constants: Pingora's `insert_header` parses a `&str` name (and copies a
/// custom one) for every header of every answer.
pub type Extra = Vec<(HeaderName, String)>;

/// The answer's head: the common headers and `extra` (a value that cannot
/// be a header value is left out).
fn parts(
    status: StatusCode,
    common: &Common<'_>,
    extra: &[(HeaderName, String)],
) -> http::response::Parts {
    // Built from `http`'s parts rather than `ResponseHeader::build`: that
    // one keeps a second map of each name's original case, so every
    // header added later was parsed, copied and hashed twice. Names go out
    // in lower case, which HTTP/1.1 and every client accept.
    static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    static X_REGION: HeaderName = HeaderName::from_static("x-switchyard-region");
    static X_JURISDICTION: HeaderName = HeaderName::from_static("x-switchyard-jurisdiction");
    static SERVER: HeaderValue = HeaderValue::from_static("switchyard");
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers.reserve(8 + extra.len());
    // The values were checked where they were made (a caller's request id
    // is visible ASCII; region names come from the policy).
    for (name, value) in [
        (&X_REQUEST_ID, common.request_id),
        (&X_REGION, common.region),
        (&X_JURISDICTION, common.jurisdiction),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            parts.headers.insert(name.clone(), v);
        }
    }
    parts.headers.insert(http::header::SERVER, SERVER.clone());
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            parts.headers.insert(name.clone(), v);
        }
    }
    parts
}

/// The head of a streamed answer; `extra` must include its content type.
pub fn stream_header(
    session: &ServerSession,
    status: StatusCode,
    common: &Common<'_>,
    extra: &[(HeaderName, String)],
) -> Box<ResponseHeader> {
    static NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
    static CHUNKED: HeaderValue = HeaderValue::from_static("chunked");
    let mut parts = parts(status, common, extra);
    parts
        .headers
        .insert(http::header::CACHE_CONTROL, NO_CACHE.clone());
    if !session.is_http2() {
        parts
            .headers
            .insert(http::header::TRANSFER_ENCODING, CHUNKED.clone());
    }
    Box::new(ResponseHeader::from(parts))
}

pub async fn json(
    session: &mut ServerSession,
    status: StatusCode,
    body: Bytes,
    common: &Common<'_>,
    extra: &[(HeaderName, String)],
) -> bool {
    let mut all = vec![(CONTENT_TYPE, "application/json".to_string())];
    all.extend(extra.iter().cloned());
    full(session, status, body, common, &all).await
}

/// A complete body; `extra` must include its content type.
pub async fn full(
    session: &mut ServerSession,
    status: StatusCode,
    body: Bytes,
    common: &Common<'_>,
    extra: &[(HeaderName, String)],
) -> bool {
    let mut parts = parts(status, common, extra);
    parts
        .headers
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let h = Box::new(ResponseHeader::from(parts));
    if session.write_response_header(h).await.is_err() {
        return false;
    }
    session.write_response_body(body, true).await.is_ok()
}

/// The status an error is answered with.
pub fn error_status(e: &GatewayError) -> StatusCode {
    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

pub async fn error(
    session: &mut ServerSession,
    e: &GatewayError,
    protocol: Protocol,
    common: &Common<'_>,
    mut extra: Extra,
) -> bool {
    if let Some(ra) = &e.retry_after {
        extra.push((http::header::RETRY_AFTER, ra.clone()));
    }
    let body = match protocol {
        Protocol::OpenAi => e.to_openai_json(),
        Protocol::Anthropic => e.to_anthropic_json(),
        Protocol::Gemini => e.to_gemini_json(),
    };
    let body = Bytes::from(body.to_string());
    json(session, error_status(e), body, common, &extra).await
}
