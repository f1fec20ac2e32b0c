//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless a node is
//! given an endpoint (`--otlp-endpoint`).
//!
//! Spans are built from what the request pipeline already records (no
//! tracing layer on the hot path): the edge exports one span per request
//! and one per attempt, the egress one per provider call, all linked by
//! the W3C trace context that crosses the backhaul ([`crate::trace`]).
//! A span is handed to a bounded queue (dropped and counted when full, so
//! a slow collector never slows requests down); a thread of the exporter's
//! own sends batches to `ENDPOINT/v1/traces`. The messages are OTLP's
//! (`proto/otlp.proto`), encoded with the prost the workspace already
//! has, sent with its reqwest: the opentelemetry crates would have brought
//! a second tonic and hyper.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use switchyard_proto::otlp as pb;
use tokio::sync::mpsc;

use crate::trace::TraceContext;

/// Spans waiting for the collector; more are dropped (and counted).
const QUEUE: usize = 8192;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a span is to its trace (OTLP's span kinds).
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// The edge answering a caller.
    Server,
    /// An attempt or a provider call: this node calling another.
    Client,
}

/// A span being built; [`Exporter::export`] sends it.
pub struct Span {
    inner: pb::Span,
}

impl Span {
    /// `ctx` is this span's own context; `parent` the span it belongs to.
    pub fn new(
        name: &str,
        kind: Kind,
        ctx: &TraceContext,
        parent: Option<[u8; 8]>,
        start: SystemTime,
    ) -> Self {
        let mut inner = pb::Span {
            trace_id: ctx.trace_id.to_vec(),
            span_id: ctx.span_id.to_vec(),
            parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: name.to_string(),
            start_time_unix_nano: unix_nanos(start),
            flags: u32::from(ctx.sampled),
            ..Default::default()
        };
        inner.set_kind(match kind {
            Kind::Server => pb::span::SpanKind::Server,
            Kind::Client => pb::span::SpanKind::Client,
        });
        Span { inner }
    }

    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.inner
            .attributes
            .push(attr(key, pb::any_value::Value::StringValue(value.into())));
        self
    }

    pub fn int(mut self, key: &str, value: i64) -> Self {
        self.inner
            .attributes
            .push(attr(key, pb::any_value::Value::IntValue(value)));
        self
    }

    pub fn float(mut self, key: &str, value: f64) -> Self {
        self.inner
            .attributes
            .push(attr(key, pb::any_value::Value::DoubleValue(value)));
        self
    }

    /// Ends the span; `error` marks it failed with that (low-cardinality)
    /// reason, never a prompt or a key.
    pub fn end(mut self, at: SystemTime, error: Option<&str>) -> pb::Span {
        self.inner.end_time_unix_nano = unix_nanos(at).max(self.inner.start_time_unix_nano);
        let mut status = pb::Status::default();
        match error {
            Some(e) => {
                status.set_code(pb::status::StatusCode::Error);
                status.message = e.to_string();
            }
            None => status.set_code(pb::status::StatusCode::Ok),
        }
        self.inner.status = Some(status);
        self.inner
    }
}

fn attr(key: &str, value: pb::any_value::Value) -> pb::KeyValue {
    pb::KeyValue {
        key: key.to_string(),
        value: Some(pb::AnyValue { value: Some(value) }),
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// Sends spans to an OTLP/HTTP collector from a thread of its own; the
/// thread flushes and ends once every handle is dropped.
pub struct Exporter {
    queue: mpsc::Sender<pb::Span>,
    dropped: AtomicU64,
    exported: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-endpoint {0:?}: not an http(s) URL")]
    Endpoint(String),
    #[error("OTLP exporter: {0}")]
    Start(String),
}

impl Exporter {
    /// `endpoint` is the collector's base URL (`http://collector:4318`);
    /// spans go to `/v1/traces` below it unless it already ends so.
    /// `service` names the node in the spans' resource.
    pub fn start(endpoint: &str, service: &str) -> Result<Arc<Self>, OtlpError> {
        let base = endpoint.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(OtlpError::Endpoint(endpoint.to_string()));
        }
        let url = if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        };
        let url = reqwest::Url::parse(&url).map_err(|_| OtlpError::Endpoint(endpoint.into()))?;
        let client = crate::dns::HickoryResolver::from_system()
            .map_err(crate::upstream::ClientError::from)
            .and_then(crate::upstream::build_client)
            .map_err(|e| OtlpError::Start(e.to_string()))?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let exported = Arc::new(AtomicU64::new(0));
        let resource = pb::Resource {
            attributes: vec![attr(
                "service.name",
                pb::any_value::Value::StringValue(service.to_string()),
            )],
            dropped_attributes_count: 0,
        };
        let counted = exported.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::warn!(error = %e, "OTLP exporter cannot start; spans are dropped");
                        return;
                    }
                };
                rt.block_on(send_loop(rx, client, url, resource, counted));
            })
            .map_err(|e| OtlpError::Start(e.to_string()))?;
        Ok(Arc::new(Exporter {
            queue,
            dropped: AtomicU64::new(0),
            exported,
        }))
    }

    /// Queues a finished span; never waits.
    pub fn export(&self, span: pb::Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
}

async fn send_loop(
    mut rx: mpsc::Receiver<pb::Span>,
    client: reqwest::Client,
    url: reqwest::Url,
    resource: pb::Resource,
    exported: Arc<AtomicU64>,
) {
    let scope = pb::InstrumentationScope {
        name: "switchyard".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut failures = 0u64;
    loop {
        let mut batch = Vec::new();
        let first = tokio::time::timeout(FLUSH_EVERY, rx.recv()).await;
        let closed = matches!(first, Ok(None));
        if let Ok(Some(span)) = first {
            batch.push(span);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let body = pb::ExportTraceServiceRequest {
                resource_spans: vec![pb::ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![pb::ScopeSpans {
                        scope: Some(scope.clone()),
                        spans: batch,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }],
            }
            .encode_to_vec();
            let sent = client
                .post(url.clone())
                .header("content-type", "application/x-protobuf")
                .timeout(SEND_TIMEOUT)
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    exported.fetch_add(n, Ordering::Relaxed);
                }
                other => {
                    failures += 1;
                    // A collector that is down must not flood the log.
                    if failures.is_power_of_two() {
                        let why = match other {
                            Ok(r) => format!("status {}", r.status()),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(target: "switchyard::otlp", %why, spans = n, failures,
                            "OTLP export failed; these spans are dropped");
                    }
                }
            }
        }
        if closed {
            return;
        }
    }
}
