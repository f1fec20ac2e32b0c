//! The egress node's request executor: key choice, provider call with
//! deadlines, and the response stream with accounting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{Secret, Snapshot};

use crate::providers::{adapter_for, CallContext, ProviderReply};
use crate::request::{EgressRequest, EgressResponse, RequestStats, ResponseBody};
use crate::stream::{openai_error_frame, translate_stream};

/// The snapshot every component of a node reads; swapped whole on change.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub struct Egress {
    snapshot: SharedSnapshot,
    client: reqwest::Client,
    key_cursor: AtomicUsize,
}

impl Egress {
    pub fn new(snapshot: SharedSnapshot) -> Result<Self, String> {
        Ok(Egress {
            snapshot,
            client: crate::upstream::build_client()?,
            key_cursor: AtomicUsize::new(0),
        })
    }

    fn pick_key<'a>(&self, keys: &'a [Secret]) -> Option<&'a Secret> {
        if keys.is_empty() {
            return None;
        }
        let i = self.key_cursor.fetch_add(1, Ordering::Relaxed);
        keys.get(i % keys.len())
    }

    /// Runs one request against its target. The future may be dropped at any
    /// point (client gone); dropping it, or the returned stream, closes the
    /// upstream request.
    pub async fn execute(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        let snap = self.snapshot.load_full();
        let provider = snap.providers.get(&req.target.provider).ok_or_else(|| {
            GatewayError::model_not_found(&format!("{}/{}", req.target.provider, req.target.model))
        })?;
        let adapter = adapter_for(provider.kind).ok_or_else(|| {
            GatewayError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "Provider `{}` of kind {} cannot serve this request yet.",
                    provider.name,
                    provider.kind.as_str()
                ),
            )
        })?;
        let stats = Arc::new(RequestStats::default());
        let ctx = CallContext {
            client: &self.client,
            provider,
            key: self.pick_key(&provider.keys),
            request: &req,
            limits: &snap.limits,
        };
        let reply = tokio::time::timeout(snap.limits.upstream_timeout, adapter.call(ctx))
            .await
            .map_err(|_| {
                GatewayError::new(
                    ErrorKind::Timeout,
                    format!(
                        "The provider `{}` did not answer within {} ms.",
                        provider.name,
                        snap.limits.upstream_timeout.as_millis()
                    ),
                )
            })??;
        match reply {
            ProviderReply::Json { body, usage } => {
                stats.mark_first_byte(req.received_at);
                if let Some(u) = usage {
                    stats.set_usage(u);
                }
                Ok(EgressResponse {
                    status: 200,
                    body: ResponseBody::Json(body),
                    stats,
                })
            }
            ProviderReply::Stream {
                upstream,
                translator,
            } => {
                let frames = translate_stream(
                    upstream,
                    translator,
                    snap.limits.stream_idle_timeout,
                    stats.clone(),
                    req.received_at,
                    openai_error_frame,
                );
                Ok(EgressResponse {
                    status: 200,
                    body: ResponseBody::Sse(frames),
                    stats,
                })
            }
        }
    }
}

/// An empty JSON object, for answers that have no body of their own.
pub fn empty_json() -> Bytes {
    Bytes::from_static(b"{}")
}
