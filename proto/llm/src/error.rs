//! The one data-plane error class.
//!
//! Every failure a client can see is a [`GatewayError`]: it knows its HTTP
//! status, its low-cardinality metric label, and how to render itself in the
//! caller's protocol (OpenAI or Anthropic error shape). Nothing here logs; the
//! layer that handles the error logs it once.
//!
//! Every error also says where it came from ([`Source`]) and what may be
//! tried again ([`Retry`]), in the spirit of pingora-error's `ErrorSource`
//! and `RetryType`: the egress rotates keys inside a target, the edge moves
//! between targets and egress nodes, and nothing else retries. Constructors
//! derive both from the [`ErrorKind`], so an error only states them when it
//! knows better (a key the provider refused, a request the egress may
//! already have started).

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

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The caller's request is at fault (malformed, unknown model, too big).
    Client,
    /// The policy refused it (tenant permissions, residency, limits).
    Policy,
    /// The edge itself.
    Edge,
    /// The QUIC backhaul between edge and egress.
    Backhaul,
    /// The egress node itself (overloaded, wrong protocol version).
    Egress,
    /// The provider answered with an error, or did not answer.
    Provider,
    /// The provider refused the key the egress used.
    Key,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Client => "client",
            Source::Policy => "policy",
            Source::Edge => "edge",
            Source::Backhaul => "backhaul",
            Source::Egress => "egress",
            Source::Provider => "provider",
            Source::Key => "key",
        }
    }
}

/// What may be tried again after a failure, narrowest first. Every class
/// but [`Retry::Never`] also allows moving on to another target: the
/// request did not do anything a second attempt elsewhere could repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Nothing: the request itself is at fault, or it may already have been
    /// executed (LLM calls are not idempotent), or its deadline is spent.
    Never,
    /// The same target may succeed after a delay (`retry_after` when known).
    SameTargetAfterDelay,
    /// Another key of the same pool may succeed.
    AnotherKey,
    /// Another target may succeed.
    AnotherTarget,
    /// No egress started the request: the same target through another
    /// egress node is safe, and so is anything else.
    AnotherEgress,
}

impl Retry {
    pub fn label(self) -> &'static str {
        match self {
            Retry::Never => "never",
            Retry::SameTargetAfterDelay => "same_target_after_delay",
            Retry::AnotherKey => "another_key",
            Retry::AnotherTarget => "another_target",
            Retry::AnotherEgress => "another_egress",
        }
    }
}

impl ErrorKind {
    /// Where an error of this kind comes from unless its creator says.
    pub fn default_source(self) -> Source {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::Unauthorized
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::PayloadTooLarge
            | ErrorKind::RequestTimeout => Source::Client,
            ErrorKind::Forbidden => Source::Policy,
            ErrorKind::RateLimited
            | ErrorKind::Upstream
            | ErrorKind::Overloaded
            | ErrorKind::Timeout => Source::Provider,
            ErrorKind::Internal => Source::Edge,
        }
    }

    /// What may be retried after an error of this kind unless its creator
    /// says: failures that say nothing about the request itself may succeed
    /// elsewhere; the rest never will.
    pub fn default_retry(self) -> Retry {
        match self {
            ErrorKind::RateLimited | ErrorKind::Overloaded => Retry::SameTargetAfterDelay,
            ErrorKind::Upstream | ErrorKind::Timeout => Retry::AnotherTarget,
            ErrorKind::InvalidRequest
            | ErrorKind::Unauthorized
            | ErrorKind::Forbidden
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::PayloadTooLarge
            | ErrorKind::RequestTimeout
            | ErrorKind::Internal => Retry::Never,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayError {
    pub kind: ErrorKind,
    /// Where it came from; defaults from `kind`.
    pub source: Source,
    /// What may be tried again; defaults from `kind`.
    pub retry: Retry,
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
            source: kind.default_source(),
            retry: kind.default_retry(),
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

    pub fn with_source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Whether anything at all may be tried again.
    pub fn is_retryable(&self) -> bool {
        self.retry != Retry::Never
    }

    /// Whether the edge may move on to the next target of the plan.
    pub fn may_try_another_target(&self) -> bool {
        self.retry != Retry::Never
    }

    /// Whether the same target may be sent through another egress node:
    /// only when no egress started the request.
    pub fn may_try_another_egress(&self) -> bool {
        self.retry == Retry::AnotherEgress
    }

    /// Whether the egress may retry the target with another key of its pool.
    pub fn may_try_another_key(&self) -> bool {
        self.retry == Retry::AnotherKey
    }

    /// Whether the same target may be tried again (after `retry_after`).
    pub fn may_retry_same_target(&self) -> bool {
        matches!(
            self.retry,
            Retry::SameTargetAfterDelay | Retry::AnotherEgress
        )
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

    /// Google's `{"error": {"code", "message", "status"}}`.
    pub fn to_gemini_json(&self) -> Value {
        let status = match self.status() {
            400 | 413 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            405 => "UNIMPLEMENTED",
            408 | 504 => "DEADLINE_EXCEEDED",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        json!({
            "error": { "code": self.status(), "message": self.message, "status": status }
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
    fn retry_defaults_keep_the_old_failover_rule() {
        // Before the retry grammar the edge failed over on exactly these kinds.
        let old = |k: ErrorKind| {
            matches!(
                k,
                ErrorKind::RateLimited
                    | ErrorKind::Upstream
                    | ErrorKind::Overloaded
                    | ErrorKind::Timeout
            )
        };
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::ModelNotFound,
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::PayloadTooLarge,
            ErrorKind::RateLimited,
            ErrorKind::Upstream,
            ErrorKind::Overloaded,
            ErrorKind::Timeout,
            ErrorKind::Internal,
        ] {
            let e = GatewayError::new(kind, "x");
            assert_eq!(e.may_try_another_target(), old(kind), "{kind:?}");
            assert_eq!(e.is_retryable(), old(kind), "{kind:?}");
            assert!(!e.may_try_another_egress(), "{kind:?}");
        }
    }

    #[test]
    fn an_explicit_class_overrides_the_kind() {
        let e = GatewayError::new(ErrorKind::Upstream, "taken, then lost")
            .with_source(Source::Backhaul)
            .with_retry(Retry::Never);
        assert!(!e.may_try_another_target());
        assert_eq!(e.source, Source::Backhaul);
        let e = GatewayError::new(ErrorKind::Upstream, "never reached an egress")
            .with_retry(Retry::AnotherEgress);
        assert!(e.may_try_another_egress() && e.may_try_another_target());
        assert!(e.may_retry_same_target());
        let e = GatewayError::new(ErrorKind::Upstream, "key refused")
            .with_source(Source::Key)
            .with_retry(Retry::AnotherKey);
        assert!(e.may_try_another_key() && !e.may_retry_same_target());
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
