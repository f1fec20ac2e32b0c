//! The one data-plane error class.
//!
//! Every failure a client can see is a [`GatewayError`]: it knows its HTTP
//! status, its low-cardinality metric label, and how to render itself in the
//! caller's protocol (OpenAI or Anthropic error shape). Nothing here logs; the
//! layer that handles the error logs it once.

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Malformed or semantically invalid request (400).
    InvalidRequest,
    /// Missing or wrong virtual key (401).
    Unauthorized,
    /// Authenticated but not allowed: model not permitted, residency (403).
    Forbidden,
    /// Unknown model or route (404).
    ModelNotFound,
    /// Unknown path (404).
    NotFound,
    /// Known path, wrong method (405).
    MethodNotAllowed,
    /// The client did not send its request in time (408).
    RequestTimeout,
    /// Request body over the configured limit (413).
    PayloadTooLarge,
    /// Rate limited, by us or by the upstream (429).
    RateLimited,
    /// Upstream failed or answered something unusable (502).
    Upstream,
    /// Upstream overloaded or no capacity anywhere (503).
    Overloaded,
    /// Upstream did not answer in time (504).
    Timeout,
    /// A bug or an impossible state on our side (500).
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::ModelNotFound | ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::RateLimited => 429,
            ErrorKind::Upstream => 502,
            ErrorKind::Overloaded => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Internal => 500,
        }
    }

    /// Metric label and OpenAI `type`.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::ModelNotFound | ErrorKind::NotFound => "not_found_error",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Upstream => "upstream_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Timeout => "timeout_error",
            ErrorKind::Internal => "api_error",
        }
    }

    /// Anthropic's `error.type` vocabulary.
    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::MethodNotAllowed | ErrorKind::RequestTimeout => {
                "invalid_request_error"
            }
            ErrorKind::Unauthorized => "authentication_error",
            ErrorKind::Forbidden => "permission_error",
            ErrorKind::ModelNotFound | ErrorKind::NotFound => "not_found_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Upstream | ErrorKind::Timeout | ErrorKind::Internal => "api_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub message: String,
    /// OpenAI `code`, e.g. `model_not_found`.
    pub code: Option<&'static str>,
    /// OpenAI `param`, e.g. `messages`.
    pub param: Option<String>,
    /// Seconds, passed on from the upstream or our own limiter.
    pub retry_after: Option<String>,
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)
    }
}

impl std::error::Error for GatewayError {}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GatewayError {
            kind,
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_retry_after(mut self, retry_after: Option<String>) -> Self {
        self.retry_after = retry_after;
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            ErrorKind::ModelNotFound,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_code("model_not_found")
        .with_param("model")
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// OpenAI's `{"error": {"message", "type", "param", "code"}}`.
    pub fn to_openai_json(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind.label(),
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// Anthropic's `{"type": "error", "error": {"type", "message"}}`.
    pub fn to_anthropic_json(&self) -> Value {
        json!({
            "type": "error",
            "error": { "type": self.kind.anthropic_type(), "message": self.message }
        })
    }

    /// Maps an upstream HTTP status to our class: what the client should see
    /// when a provider answered `status`.
    pub fn kind_for_upstream_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::InvalidRequest,
            // The provider rejected *our* key: a gateway-side fault, not the caller's.
            401 | 403 => ErrorKind::Upstream,
            404 => ErrorKind::ModelNotFound,
            408 | 504 => ErrorKind::Timeout,
            413 => ErrorKind::PayloadTooLarge,
            429 => ErrorKind::RateLimited,
            503 | 529 => ErrorKind::Overloaded,
            _ => ErrorKind::Upstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = GatewayError::model_not_found("nope");
        let v = e.to_openai_json();
        assert_eq!(e.status(), 404);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["param"], "model");
    }

    #[test]
    fn anthropic_shape() {
        let v = GatewayError::new(ErrorKind::Overloaded, "busy").to_anthropic_json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
    }

    #[test]
    fn upstream_statuses() {
        assert_eq!(GatewayError::kind_for_upstream_status(429).status(), 429);
        assert_eq!(GatewayError::kind_for_upstream_status(500).status(), 502);
        assert_eq!(GatewayError::kind_for_upstream_status(401).status(), 502);
        assert_eq!(GatewayError::kind_for_upstream_status(529).status(), 503);
        assert_eq!(GatewayError::kind_for_upstream_status(504).status(), 504);
    }
}
