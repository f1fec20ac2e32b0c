//! The egress node's request executor: key choice, provider call with
//! deadlines, and the response stream with accounting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{Secret, Snapshot};

use switchyard_llm::anthropic;
use switchyard_llm::translate::{Chain, StreamTranslator};
use switchyard_proto::ProviderKind;

use crate::providers::raw::{self, RawBody};
use crate::providers::{adapter_for, unsupported, CallContext, ProviderReply};
use crate::request::{
    EgressRequest, EgressResponse, Operation, Protocol, RequestStats, ResponseBody, EVENT_STREAM,
    JSON,
};
use crate::stream::{
    anthropic_error_frame, first_frame, openai_error_frame, raw_stream, translate_stream,
};

/// The snapshot every component of a node reads; swapped whole on change.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub struct Egress {
    snapshot: SharedSnapshot,
    client: reqwest::Client,
    key_cursor: AtomicUsize,
}

impl Egress {
    pub fn new(snapshot: SharedSnapshot) -> Result<Self, crate::upstream::ClientError> {
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
        if !req.residency.is_empty()
            && !provider
                .jurisdiction
                .as_ref()
                .is_some_and(|j| req.residency.contains(j))
        {
            // Defence in depth: the edge never plans such a target.
            return Err(GatewayError::new(
                ErrorKind::Forbidden,
                format!(
                    "Residency rule: this request must stay in jurisdiction(s) {}; provider `{}` is in {}.",
                    req.residency.join(", "),
                    provider.name,
                    provider.jurisdiction.as_deref().unwrap_or("no known jurisdiction")
                ),
            )
            .with_code("residency_violation"));
        }
        let stats = Arc::new(RequestStats::default());
        let key = self.pick_key(&provider.keys);
        let timeout_error = || {
            GatewayError::new(
                ErrorKind::Timeout,
                format!(
                    "The provider `{}` did not answer within {} ms.",
                    provider.name,
                    snap.limits.upstream_timeout.as_millis()
                ),
            )
        };

        if let Operation::Raw(raw) = &req.op {
            let ctx = CallContext {
                client: &self.client,
                provider,
                key,
                request: &req,
                limits: &snap.limits,
            };
            let reply = tokio::time::timeout(snap.limits.upstream_timeout, raw::call(&ctx, raw))
                .await
                .map_err(|_| timeout_error())??;
            let body = match reply.body {
                RawBody::Full(b) => {
                    stats.mark_first_byte(req.received_at);
                    ResponseBody::Full(b)
                }
                RawBody::Stream(s) => ResponseBody::Stream(raw_stream(
                    s,
                    snap.limits.stream_idle_timeout,
                    stats.clone(),
                    req.received_at,
                )),
            };
            return Ok(EgressResponse {
                status: reply.status,
                content_type: reply.content_type,
                retry_after: reply.retry_after,
                body,
                stats,
            });
        }

        let adapter = adapter_for(provider.kind);
        // An Anthropic-protocol caller served by a provider that does not speak
        // Anthropic goes through the hub: Anthropic → OpenAI → provider, and back.
        let via_hub = match &req.op {
            Operation::Messages { chat, .. } if provider.kind != ProviderKind::Anthropic => {
                let mut chat = chat.clone();
                chat.include_usage = true;
                Some(chat)
            }
            Operation::CountTokens { .. } if provider.kind != ProviderKind::Anthropic => {
                return Err(unsupported(provider, "count_tokens"));
            }
            _ => None,
        };
        let to_anthropic = via_hub.is_some();
        let hub_req;
        let call_req = match via_hub {
            Some(chat) => {
                hub_req = EgressRequest {
                    op: Operation::Chat(chat),
                    ..req.clone()
                };
                &hub_req
            }
            None => &req,
        };
        let ctx = CallContext {
            client: &self.client,
            provider,
            key,
            request: call_req,
            limits: &snap.limits,
        };
        let reply = tokio::time::timeout(snap.limits.upstream_timeout, adapter.call(ctx))
            .await
            .map_err(|_| timeout_error())??;
        let model = &req.target.model;
        match reply {
            ProviderReply::Json { body, usage } => {
                stats.mark_first_byte(req.received_at);
                if let Some(u) = usage {
                    stats.set_usage(u);
                }
                let body = if to_anthropic {
                    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                        GatewayError::new(ErrorKind::Internal, format!("hub response: {e}"))
                    })?;
                    Bytes::from(anthropic::openai_response_to_messages(&v, model).to_string())
                } else {
                    body
                };
                Ok(EgressResponse {
                    status: 200,
                    content_type: JSON.to_string(),
                    retry_after: None,
                    body: ResponseBody::Full(body),
                    stats,
                })
            }
            ProviderReply::Stream {
                upstream,
                translator,
            } => {
                let translator: Box<dyn StreamTranslator> = if to_anthropic {
                    Box::new(Chain::new(
                        translator,
                        Box::new(anthropic::MessagesStreamFromOpenAi::new(model)),
                    ))
                } else {
                    translator
                };
                let framer = match req.inbound {
                    Protocol::OpenAi => openai_error_frame,
                    Protocol::Anthropic => anthropic_error_frame,
                };
                let frames = translate_stream(
                    upstream,
                    translator,
                    snap.limits.stream_idle_timeout,
                    stats.clone(),
                    req.received_at,
                    framer,
                );
                let frames = first_frame(frames, &stats).await?;
                Ok(EgressResponse {
                    status: 200,
                    content_type: EVENT_STREAM.to_string(),
                    retry_after: None,
                    body: ResponseBody::Stream(frames),
                    stats,
                })
            }
        }
    }
}
