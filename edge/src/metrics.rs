//! Prometheus metrics of the edge, served on their own listener
//! (`--metrics-listen`) so they are never exposed where clients connect.
//!
//! Label values are bounded: endpoints are a fixed set, providers and models
//! come from the policy (a model the policy does not advertise is `other`),
//! statuses are HTTP codes.

use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Seconds; LLM latencies span milliseconds (cache, errors) to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct EdgeMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    stream_failures: IntCounterVec,
    client_disconnects: IntCounterVec,
}

/// One finished request, as the access log sees it.
pub struct Observation<'a> {
    pub endpoint: &'static str,
    pub provider: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub stream_failed: bool,
    pub client_gone: bool,
}

impl EdgeMetrics {
    /// Where other parts of the edge (limits, ledger) register their
    /// metrics, so they appear on the same listener.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl EdgeMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by endpoint, provider and HTTP status",
            ),
            &["endpoint", "provider", "status"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time from request to last byte")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint", "provider"],
        )
        .expect("metric");
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time from request to the first byte of the answer body",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["provider", "model"],
        )
        .expect("metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "tokens_total",
                "Tokens accounted, by provider, model and kind (prompt|completion)",
            ),
            &["provider", "model", "kind"],
        )
        .expect("metric");
        let stream_failures = IntCounterVec::new(
            Opts::new(
                "stream_failures_total",
                "Streams that ended with an error event (stall, cut, provider error)",
            ),
            &["provider"],
        )
        .expect("metric");
        let client_disconnects = IntCounterVec::new(
            Opts::new(
                "client_disconnects_total",
                "Requests abandoned by the client before the answer ended",
            ),
            &["endpoint"],
        )
        .expect("metric");
        for c in [&requests, &tokens, &stream_failures, &client_disconnects] {
            registry.register(Box::new(c.clone())).expect("register");
        }
        for h in [&latency, &ttft] {
            registry.register(Box::new(h.clone())).expect("register");
        }
        EdgeMetrics {
            registry,
            requests,
            latency,
            ttft,
            tokens,
            stream_failures,
            client_disconnects,
        }
    }

    pub fn observe(&self, o: &Observation<'_>) {
        let status = o.status.to_string();
        self.requests
            .with_label_values(&[o.endpoint, o.provider, &status])
            .inc();
        self.latency
            .with_label_values(&[o.endpoint, o.provider])
            .observe(o.latency.as_secs_f64());
        if let Some(t) = o.ttft {
            self.ttft
                .with_label_values(&[o.provider, o.model])
                .observe(t.as_secs_f64());
        }
        if o.prompt_tokens > 0 {
            self.tokens
                .with_label_values(&[o.provider, o.model, "prompt"])
                .inc_by(o.prompt_tokens);
        }
        if o.completion_tokens > 0 {
            self.tokens
                .with_label_values(&[o.provider, o.model, "completion"])
                .inc_by(o.completion_tokens);
        }
        if o.stream_failed {
            self.stream_failures.with_label_values(&[o.provider]).inc();
        }
        if o.client_gone {
            self.client_disconnects
                .with_label_values(&[o.endpoint])
                .inc();
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `/metrics` listener.
pub struct MetricsApp(pub std::sync::Arc<EdgeMetrics>);

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, body, content_type) = if path == "/metrics" {
            (200, self.0.render(), "text/plain; version=0.0.4")
        } else {
            (404, b"not found\n".to_vec(), "text/plain")
        };
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .expect("valid response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_observations() {
        let m = EdgeMetrics::new();
        m.observe(&Observation {
            endpoint: "chat",
            provider: "openai",
            model: "fast",
            status: 200,
            latency: Duration::from_millis(30),
            ttft: Some(Duration::from_millis(10)),
            prompt_tokens: 5,
            completion_tokens: 7,
            stream_failed: false,
            client_gone: false,
        });
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "switchyard_requests_total{endpoint=\"chat\",provider=\"openai\",status=\"200\"} 1"
        ));
        assert!(text.contains(
            "switchyard_tokens_total{kind=\"completion\",model=\"fast\",provider=\"openai\"} 7"
        ));
        assert!(text.contains("switchyard_time_to_first_token_seconds_bucket"));
    }
}
