//! Virtual-key authentication against the snapshot's hashed keys.

use pingora::protocols::http::ServerSession;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{KeyHash, Principal, Snapshot};

/// Reads the key from `Authorization: Bearer` (OpenAI SDK) or `x-api-key`
/// (Anthropic SDK) and finds its tenant (and virtual key, refused once
/// expired). The key is only ever hashed.
pub fn authenticate(
    session: &ServerSession,
    snapshot: &Snapshot,
) -> Result<Principal, GatewayError> {
    authenticate_with(session, snapshot, false)
}

/// The SDKs' key headers besides `Authorization` (Anthropic's, Google's),
/// made once rather than parsed per request.
const ANTHROPIC_KEY_HEADER: http::HeaderName = http::HeaderName::from_static("x-api-key");
const GOOGLE_KEY_HEADER: http::HeaderName = http::HeaderName::from_static("x-goog-api-key");

/// As [`authenticate`]; Gemini-style callers (`google-genai`) may also send
/// the key as `x-goog-api-key` or, on Gemini paths only (`url_key`), as
/// `?key=`.
pub fn authenticate_with(
    session: &ServerSession,
    snapshot: &Snapshot,
    url_key: bool,
) -> Result<Principal, GatewayError> {
    let query_key = url_key
        .then(|| session.req_header().uri.query())
        .flatten()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("key="))
                .map(str::to_string)
        });
    let bearer = session
        .get_header(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    let key = bearer
        .or_else(|| {
            session
                .get_header(&ANTHROPIC_KEY_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .or_else(|| {
            session
                .get_header(&GOOGLE_KEY_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .or(query_key.as_deref());
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(GatewayError::new(
            ErrorKind::Unauthorized,
            "You didn't provide an API key. Send your Switchyard virtual key as `Authorization: Bearer <key>`.",
        )
        .with_code("missing_api_key"));
    };
    let principal = snapshot
        .tenants()
        .principal(&KeyHash::of(key))
        .ok_or_else(|| {
            GatewayError::new(ErrorKind::Unauthorized, "Incorrect API key provided.")
                .with_code("invalid_api_key")
        })?;
    if let Some(k) = &principal.key {
        if k.expired_at(crate::limits::now_ms() as i64) {
            return Err(GatewayError::new(
                ErrorKind::Unauthorized,
                format!("The API key {} has expired.", k.id),
            )
            .with_code("expired_api_key"));
        }
    }
    Ok(principal)
}
