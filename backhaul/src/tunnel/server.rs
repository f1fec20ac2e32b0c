//! The egress end of the backhaul: accepts edge connections and runs each
//! stream's request through [`Egress::execute`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::backhaul as wire;

use super::frame::{self, FrameKind};
use super::tls::NodeTls;
use super::TunnelError;
use crate::egress::{Egress, SharedSnapshot};
use crate::request::ResponseBody;

/// An edge that connects must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The request header and body must arrive within this once a stream opens.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Stream reset code: the request could not be read.
const RESET_BAD_REQUEST: u32 = 1;

struct Ctx {
    egress: Egress,
    snapshot: SharedSnapshot,
    region: String,
}

pub struct EgressServer {
    endpoint: quinn::Endpoint,
    ctx: Arc<Ctx>,
}

impl EgressServer {
    /// Binds the QUIC endpoint. Call it inside the tokio runtime that is to
    /// drive the endpoint: quinn spawns its I/O driver there.
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        egress: Egress,
        snapshot: SharedSnapshot,
        region: &str,
    ) -> Result<Self, TunnelError> {
        let endpoint = quinn::Endpoint::server(tls.server_config()?, addr)
            .map_err(|e| TunnelError::Bind(addr.to_string(), e))?;
        Ok(EgressServer {
            endpoint,
            ctx: Arc::new(Ctx {
                egress,
                snapshot,
                region: region.to_string(),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TunnelError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TunnelError::Bind("local address".into(), e))
    }

    /// A handle to close the endpoint (`close`, then `wait_idle`) on shutdown.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.endpoint.clone()
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn run(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let ctx = self.ctx.clone();
            tokio::spawn(serve_connection(ctx, incoming));
        }
    }
}

async fn serve_connection(ctx: Arc<Ctx>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // A certificate from another CA ends here.
            tracing::warn!(target: "switchyard::backhaul", %remote, error = %e, "backhaul handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(target: "switchyard::backhaul", %remote, "backhaul handshake timed out");
            return;
        }
    };
    tracing::info!(target: "switchyard::backhaul", %remote, region = %ctx.region, "edge connected");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(ctx.clone(), send, recv));
            }
            Err(e) => {
                tracing::info!(target: "switchyard::backhaul", %remote, reason = %e, "edge disconnected");
                return;
            }
        }
    }
}

async fn read_request(
    recv: &mut quinn::RecvStream,
    body_limit: usize,
) -> Result<(wire::RequestHeader, Vec<u8>), String> {
    let header: wire::RequestHeader = frame::read_message(recv, FrameKind::RequestHeader)
        .await
        .map_err(|e| e.to_string())?;
    let body = recv
        .read_to_end(body_limit)
        .await
        .map_err(|e| e.to_string())?;
    Ok((header, body))
}

/// Why a stream ended early; only for the log line.
enum Ended {
    Cancelled,
    WriteFailed(quinn::WriteError),
}

async fn serve_stream(ctx: Arc<Ctx>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let received_at = Instant::now();
    let snap = ctx.snapshot.load_full();
    // The edge enforced the limit on the client's bytes; the re-serialised
    // JSON may differ slightly in size, hence the margin.
    let body_limit = snap.limits.max_body_bytes.saturating_mul(2).max(64 * 1024);
    let (header, body) = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_request(&mut recv, body_limit),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(error)) => {
            tracing::warn!(target: "switchyard::backhaul", %error, "unreadable backhaul request");
            let _ = send.reset(RESET_BAD_REQUEST.into());
            return;
        }
        Err(_) => {
            tracing::warn!(target: "switchyard::backhaul", "backhaul request not received in time");
            let _ = send.reset(RESET_BAD_REQUEST.into());
            return;
        }
    };
    let (req, meta) = match frame::request_from_wire(header, Bytes::from(body), received_at) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_error(&mut send, &e).await;
            return;
        }
    };
    let request_id = req.request_id.clone();
    if let Err(e) = check_residency(&ctx, &snap, &req.residency) {
        tracing::warn!(target: "switchyard::backhaul", %request_id, residency = %meta.residency, region = %ctx.region, "residency block");
        let _ = write_error(&mut send, &e).await;
        return;
    }
    let target = req.target.clone();
    let execute = async {
        if meta.deadline.is_zero() {
            return ctx.egress.execute(req).await;
        }
        tokio::time::timeout(meta.deadline, ctx.egress.execute(req))
            .await
            .unwrap_or_else(|_| {
                Err(GatewayError::new(
                    ErrorKind::Timeout,
                    format!(
                        "The provider did not answer within the request's deadline of {} ms.",
                        meta.deadline.as_millis()
                    ),
                ))
            })
    };
    // The edge stops the stream when its client goes away: dropping the
    // execute future then closes the provider request.
    let result = tokio::select! {
        r = execute => r,
        _ = send.stopped() => {
            tracing::info!(target: "switchyard::backhaul", %request_id, "request cancelled by the edge before the provider answered");
            return;
        }
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = write_error(&mut send, &e).await;
            return;
        }
    };
    let head = wire::ResponseHeader {
        error: None,
        status: response.status as u32,
        content_type: response.content_type.clone(),
        retry_after: response.retry_after.clone(),
        streaming: matches!(response.body, ResponseBody::Stream(_)),
    };
    let stats = response.stats.clone();
    let sent = async {
        send.write_all(&frame::encode_message(FrameKind::ResponseHeader, &head))
            .await
            .map_err(Ended::WriteFailed)?;
        match response.body {
            ResponseBody::Full(body) => write_data(&mut send, body).await?,
            ResponseBody::Stream(mut chunks) => loop {
                let next = tokio::select! {
                    c = chunks.next() => c,
                    _ = send.stopped() => return Err(Ended::Cancelled),
                };
                match next {
                    Some(chunk) => write_data(&mut send, chunk).await?,
                    None => break,
                }
            },
        }
        let trailer = frame::trailer_from_stats(&stats, &target, &ctx.region);
        send.write_all(&frame::encode_message(FrameKind::Trailer, &trailer))
            .await
            .map_err(Ended::WriteFailed)?;
        let _ = send.finish();
        Ok(())
    };
    match sent.await {
        Ok(()) => {}
        Err(Ended::Cancelled) | Err(Ended::WriteFailed(quinn::WriteError::Stopped(_))) => {
            tracing::info!(target: "switchyard::backhaul", %request_id, "stream cancelled by the edge; provider call closed");
        }
        Err(Ended::WriteFailed(e)) => {
            tracing::warn!(target: "switchyard::backhaul", %request_id, error = %e, "backhaul stream failed");
        }
    }
}

/// Writes a chunk as data frames; the chunk itself is not copied.
async fn write_data(send: &mut quinn::SendStream, mut chunk: Bytes) -> Result<(), Ended> {
    while !chunk.is_empty() {
        let part = chunk.split_to(chunk.len().min(frame::MAX_DATA_FRAME));
        send.write_all(&frame::data_prefix(part.len()))
            .await
            .map_err(Ended::WriteFailed)?;
        send.write_chunk(part).await.map_err(Ended::WriteFailed)?;
    }
    Ok(())
}

async fn write_error(
    send: &mut quinn::SendStream,
    e: &GatewayError,
) -> Result<(), quinn::WriteError> {
    let head = wire::ResponseHeader {
        error: Some(frame::error_to_wire(e)),
        ..Default::default()
    };
    send.write_all(&frame::encode_message(FrameKind::ResponseHeader, &head))
        .await?;
    let _ = send.finish();
    Ok(())
}

/// Defence in depth: a request bound to a jurisdiction is refused by an
/// egress whose region is elsewhere, whatever the edge planned.
fn check_residency(
    ctx: &Ctx,
    snap: &switchyard_proto::Snapshot,
    residency: &[String],
) -> Result<(), GatewayError> {
    if residency.is_empty() {
        return Ok(());
    }
    let here = snap
        .regions
        .get(&ctx.region)
        .and_then(|r| r.jurisdiction.as_deref());
    if here.is_some_and(|h| residency.iter().any(|j| j == h)) {
        return Ok(());
    }
    Err(GatewayError::new(
        ErrorKind::Forbidden,
        format!(
            "Residency rule: this request must stay in jurisdiction(s) {}; the egress region `{}` is in {}.",
            residency.join(", "),
            ctx.region,
            here.unwrap_or("no jurisdiction")
        ),
    )
    .with_code("residency_violation"))
}
