//! The egress end of the backhaul: accepts edge connections and runs each
//! stream's request through [`Egress::execute`].
//!
//! Only edges get in (see [`super::tls`]); what they send is then held to
//! what their tenants may do ([`super::admit`]), and each connection is
//! bounded: [`ConnectionLimits`] caps its concurrent streams and the request
//! bytes it may have buffered, so one edge cannot take the egress's memory.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::backhaul as wire;

use switchyard_control::admin::Lifecycle;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::admit;
use super::frame::{self, FrameKind};
use super::tls::{says_ready, speaks_accepted, EdgeRegions, NodeTls, DEFAULT_MAX_STREAMS};
use super::TunnelError;
use crate::egress::{Egress, SharedSnapshot};
use crate::request::ResponseBody;

/// An edge that connects must finish its handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The request header and body must arrive within this once a stream opens.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished stream waits for the edge to acknowledge its tail.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Stream reset code: the request could not be read.
const RESET_BAD_REQUEST: u32 = 1;
/// Stream stop code: the request was refused before it was read whole.
const STOP_REFUSED: u32 = 2;

/// What one edge connection may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Concurrent requests (one bidirectional stream each); an edge at the
    /// limit waits for a stream to free up.
    pub max_streams: u32,
    /// Request bytes (headers and bodies) buffered for its open requests;
    /// a request over it is refused with a 503 instead of being read.
    pub max_request_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_streams: DEFAULT_MAX_STREAMS,
            max_request_bytes: 256 << 20,
        }
    }
}

struct Ctx {
    egress: Egress,
    snapshot: SharedSnapshot,
    region: String,
    limits: ConnectionLimits,
    /// Streams are counted here; a draining lifecycle refuses new streams
    /// and connections and sends GOAWAY on the open ones.
    lifecycle: Arc<Lifecycle>,
    /// Flipped once when the drain starts, for every connection task.
    drain: watch::Receiver<bool>,
    connections: AtomicUsize,
    metrics: Arc<crate::metrics::EgressMetrics>,
}

pub struct EgressServer {
    endpoint: quinn::Endpoint,
    ctx: Arc<Ctx>,
    edge_regions: EdgeRegions,
    drain: watch::Sender<bool>,
}

/// Starts the drain of an [`EgressServer`] (see [`EgressServer::drainer`]).
#[derive(Clone)]
pub struct Drainer {
    lifecycle: Arc<Lifecycle>,
    drain: Arc<watch::Sender<bool>>,
}

impl Drainer {
    /// Readiness goes false, new connections and streams are refused, and
    /// every open connection is told GOAWAY; streams in flight go on.
    pub fn start(&self) {
        self.lifecycle.start_draining();
        let _ = self.drain.send(true);
    }
}

impl EgressServer {
    /// Binds the QUIC endpoint. Call it inside the tokio runtime that is to
    /// drive the endpoint: quinn spawns its I/O driver there.
    ///
    /// Edges of every region the snapshot names (and of this egress's own
    /// region) are accepted: an edge in any region may route to any
    /// provider, and the regions are the fleet's list of where nodes run.
    pub fn bind(
        addr: SocketAddr,
        tls: &NodeTls,
        egress: Egress,
        snapshot: SharedSnapshot,
        region: &str,
        limits: ConnectionLimits,
    ) -> Result<Self, TunnelError> {
        let edge_regions: EdgeRegions = {
            let snapshot = snapshot.clone();
            let own = region.to_string();
            Arc::new(move || {
                let snap = snapshot.load();
                let mut regions: Vec<String> = snap.regions().keys().cloned().collect();
                if !regions.contains(&own) {
                    regions.push(own.clone());
                }
                regions.sort();
                regions
            })
        };
        let config = tls.server_config(edge_regions.clone(), limits.max_streams)?;
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|e| TunnelError::Bind(addr.to_string(), e))?;
        let (drain, drain_rx) = watch::channel(false);
        Ok(EgressServer {
            endpoint,
            ctx: Arc::new(Ctx {
                egress,
                snapshot,
                region: region.to_string(),
                limits,
                lifecycle: Lifecycle::new(),
                drain: drain_rx,
                connections: AtomicUsize::new(0),
                metrics: Arc::new(crate::metrics::EgressMetrics::new()),
            }),
            edge_regions,
            drain,
        })
    }

    /// Counts streams in `lifecycle` (the node's) instead of a private one.
    pub fn with_lifecycle(mut self, lifecycle: Arc<Lifecycle>) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.lifecycle = lifecycle;
        }
        self
    }

    /// What starts this server's drain, usable after `run` took the server.
    pub fn drainer(&self) -> Drainer {
        Drainer {
            lifecycle: self.ctx.lifecycle.clone(),
            drain: Arc::new(self.drain.clone()),
        }
    }

    /// What swaps the node certificate for new connections, usable after
    /// `run` took the server.
    pub fn tls_reloader(&self) -> TlsReloader {
        TlsReloader {
            endpoint: self.endpoint.clone(),
            edge_regions: self.edge_regions.clone(),
            max_streams: self.ctx.limits.max_streams,
        }
    }

    /// What this egress served, for its `/metrics`.
    pub fn metrics(&self) -> Arc<crate::metrics::EgressMetrics> {
        self.ctx.metrics.clone()
    }

    /// The board the egress picks keys from (key-pool health).
    pub fn health(&self) -> Arc<switchyard_proto::Health> {
        self.ctx.egress.health().clone()
    }

    /// Edge connections open now.
    pub fn connection_gauge(&self) -> Arc<dyn Fn() -> usize + Send + Sync> {
        let ctx = self.ctx.clone();
        Arc::new(move || ctx.connections.load(Ordering::Relaxed))
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
            if self.ctx.lifecycle.is_draining() {
                // The edge redials with backoff and meanwhile sends its
                // requests to the region's other egress nodes.
                incoming.refuse();
                continue;
            }
            let ctx = self.ctx.clone();
            tokio::spawn(serve_connection(ctx, incoming));
        }
    }
}

/// Swaps the egress's node certificate: new handshakes use the new one,
/// open connections keep theirs (nothing is dropped).
pub struct TlsReloader {
    endpoint: quinn::Endpoint,
    edge_regions: EdgeRegions,
    max_streams: u32,
}

impl TlsReloader {
    pub fn reload(&self, tls: &NodeTls) -> Result<(), TunnelError> {
        let config = tls.server_config(self.edge_regions.clone(), self.max_streams)?;
        self.endpoint.set_server_config(Some(config));
        Ok(())
    }
}

/// Tells the edge that this egress is draining: on the control stream
/// when the connection has one, else on a stream of its own. Bounded: an
/// edge that does not take the stream (an older build allows none) learns
/// it from the refusal of its next request instead.
async fn send_goaway(conn: quinn::Connection, control: Option<quinn::SendStream>) {
    let sent = async {
        let mut uni = match control {
            Some(s) => s,
            None => conn.open_uni().await.ok()?,
        };
        uni.write_all(&frame::GOAWAY).await.ok()?;
        uni.finish().ok()
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), sent).await;
}

/// Opens the control stream of a version 3 connection and says READY: the
/// edge uses the connection only after that.
async fn say_ready(conn: &quinn::Connection) -> Option<quinn::SendStream> {
    let opened = async {
        let mut uni = conn.open_uni().await.ok()?;
        uni.write_all(&frame::READY).await.ok()?;
        Some(uni)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, opened)
        .await
        .ok()
        .flatten()
}

async fn serve_connection(ctx: Arc<Ctx>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // A certificate from another CA, or not scoped to an edge, ends here.
            tracing::warn!(target: "switchyard::backhaul", %remote, error = %e, "backhaul handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(target: "switchyard::backhaul", %remote, "backhaul handshake timed out");
            return;
        }
    };
    let accepts = speaks_accepted(&conn);
    // Held open for the connection's life: GOAWAY goes on it.
    let mut control = None;
    if says_ready(&conn) {
        control = say_ready(&conn).await;
        if control.is_none() {
            tracing::warn!(target: "switchyard::backhaul", %remote, "edge lost before it was told READY");
            return;
        }
    }
    tracing::info!(target: "switchyard::backhaul", %remote, region = %ctx.region, accepted_frames = accepts, "edge connected");
    let budget = Arc::new(Semaphore::new(
        ctx.limits.max_request_bytes.min(Semaphore::MAX_PERMITS),
    ));
    ctx.connections.fetch_add(1, Ordering::Relaxed);
    let _counted = scopeguard(|| {
        ctx.connections.fetch_sub(1, Ordering::Relaxed);
    });
    let mut drain = ctx.drain.clone();
    let mut told = false;
    loop {
        let accepted = tokio::select! {
            r = conn.accept_bi() => r,
            _ = async { let _ = drain.wait_for(|d| *d).await; }, if !told => {
                told = true;
                tokio::spawn(send_goaway(conn.clone(), control.take()));
                continue;
            }
        };
        match accepted {
            Ok((send, recv)) => {
                // Boxed: tokio moves a spawned future several times on
                // the way into its task cell and again when it completes,
                // ~5,000 instructions a request for a future this large.
                tokio::spawn(Box::pin(serve_stream(
                    ctx.clone(),
                    budget.clone(),
                    accepts,
                    send,
                    recv,
                )));
            }
            Err(e) => {
                tracing::info!(target: "switchyard::backhaul", %remote, reason = %e, "edge disconnected");
                return;
            }
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Why a request was not read.
enum ReadFailed {
    Unreadable(String),
    /// The connection's request-byte budget is spent.
    OverBudget,
}

/// Takes `n` bytes of the connection's budget into `held`.
fn reserve(
    budget: &Arc<Semaphore>,
    held: &mut Option<OwnedSemaphorePermit>,
    n: usize,
) -> Result<(), ReadFailed> {
    let n = u32::try_from(n).map_err(|_| ReadFailed::OverBudget)?;
    let permit = budget
        .clone()
        .try_acquire_many_owned(n)
        .map_err(|_| ReadFailed::OverBudget)?;
    match held {
        Some(h) => h.merge(permit),
        None => *held = Some(permit),
    }
    Ok(())
}

/// Reads the request header and body, counting every byte against the
/// connection's budget before it is buffered; the returned permit holds
/// them until the request is over. With `accepted`, the ACCEPTED frame goes
/// out the moment the header is read: the edge's proof that this egress is
/// alive, which it waits for only briefly before trying another egress.
async fn read_request(
    recv: &mut quinn::RecvStream,
    accepted: Option<&mut quinn::SendStream>,
    body_limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<(wire::RequestHeader, Bytes, Option<OwnedSemaphorePermit>), ReadFailed> {
    let unreadable = |e: &dyn std::fmt::Display| ReadFailed::Unreadable(e.to_string());
    let mut held = None;
    let (kind, len) = frame::read_frame_prefix(recv, frame::MAX_HEADER_FRAME)
        .await
        .map_err(|e| unreadable(&e))?;
    if kind != FrameKind::RequestHeader {
        return Err(ReadFailed::Unreadable(format!(
            "expected a request header, got {kind:?}"
        )));
    }
    reserve(budget, &mut held, len)?;
    let payload = frame::read_frame_payload(recv, len)
        .await
        .map_err(|e| unreadable(&e))?;
    let header: wire::RequestHeader = frame::decode(kind, &payload).map_err(|e| unreadable(&e))?;
    drop(payload);
    if let Some(send) = accepted {
        send.write_all(&frame::ACCEPTED)
            .await
            .map_err(|e| unreadable(&e))?;
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = recv
        .read_chunk(usize::MAX, true)
        .await
        .map_err(|e| unreadable(&e))?
    {
        if body.len() + chunk.bytes.len() > body_limit {
            return Err(ReadFailed::Unreadable(format!(
                "the body is over the limit of {body_limit} bytes"
            )));
        }
        reserve(budget, &mut held, chunk.bytes.len())?;
        body.extend_from_slice(&chunk.bytes);
    }
    Ok((header, body.freeze(), held))
}

/// Why a stream ended early; only for the log line.
enum Ended {
    Cancelled,
    WriteFailed(quinn::WriteError),
}

async fn serve_stream(
    ctx: Arc<Ctx>,
    budget: Arc<Semaphore>,
    accepts: bool,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let received_at = Instant::now();
    if ctx.lifecycle.is_draining() {
        // Sent before the edge saw GOAWAY: refused unread, so the edge may
        // send it to another egress.
        let _ = recv.stop(STOP_REFUSED.into());
        let e = GatewayError::new(
            ErrorKind::Overloaded,
            "The egress node is draining for a restart; retry on another node.",
        )
        .with_code("egress_draining")
        .with_source(Source::Egress)
        .with_retry(Retry::AnotherEgress);
        let _ = write_error(&mut send, &e).await;
        return;
    }
    // Counted until the answer's last byte: a drain waits for it.
    let _busy = ctx.lifecycle.busy();
    let snap = ctx.snapshot.load_full();
    // The edge enforced the limit on the client's bytes; the re-serialised
    // JSON may differ slightly in size, hence the margin.
    let body_limit = snap
        .limits()
        .max_body_bytes
        .saturating_mul(2)
        .max(64 * 1024);
    // `_held` keeps the request's bytes counted until the stream is done.
    let (header, body, _held) = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_request(&mut recv, accepts.then_some(&mut send), body_limit, &budget),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(ReadFailed::Unreadable(error))) => {
            tracing::warn!(target: "switchyard::backhaul", %error, "unreadable backhaul request");
            let _ = send.reset(RESET_BAD_REQUEST.into());
            return;
        }
        Ok(Err(ReadFailed::OverBudget)) => {
            tracing::warn!(target: "switchyard::backhaul", limit = ctx.limits.max_request_bytes,
                "backhaul request refused: the connection's request bytes are over the limit");
            let _ = recv.stop(STOP_REFUSED.into());
            let e = GatewayError::new(
                ErrorKind::Overloaded,
                "The egress node holds too many request bytes from this edge; retry shortly.",
            )
            .with_code("egress_overloaded")
            // Refused before it was read: another egress may take it.
            .with_source(Source::Egress)
            .with_retry(Retry::AnotherEgress);
            let _ = write_error(&mut send, &e).await;
            return;
        }
        Err(_) => {
            tracing::warn!(target: "switchyard::backhaul", "backhaul request not received in time");
            let _ = send.reset(RESET_BAD_REQUEST.into());
            return;
        }
    };
    let (mut req, meta) = match frame::request_from_wire(header, body, received_at) {
        Ok(r) => r,
        Err(e) => {
            let _ = write_error(&mut send, &e).await;
            return;
        }
    };
    let request_id = req.request_id.clone();
    if let Err(e) = admit::check_request(&req) {
        tracing::warn!(target: "switchyard::backhaul", %request_id, tenant = %req.tenant, error = %e.message, "backhaul request refused");
        let _ = write_error(&mut send, &e).await;
        return;
    }
    let admitted = admit::derive_residency(&snap, &mut req)
        .and_then(|()| check_residency(&ctx, &snap, &req.residency));
    if let Err(e) = admitted {
        tracing::warn!(target: "switchyard::backhaul", %request_id, tenant = %req.tenant, claimed = %meta.residency,
            residency = %req.residency.join(","), region = %ctx.region, code = e.code.unwrap_or(""), "residency block");
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
                )
                // The one deadline of the request is spent: nothing is left
                // for another attempt.
                .with_retry(Retry::Never))
            })
    };
    // The edge stops the stream when its client goes away: dropping the
    // execute future then closes the provider request.
    // Biased: a request the edge already withdrew (it stopped waiting for
    // an acknowledgement and sent it elsewhere) is never started.
    let result = tokio::select! {
        biased;
        _ = send.stopped() => {
            tracing::info!(target: "switchyard::backhaul", %request_id, "request cancelled by the edge before the provider answered");
            return;
        }
        r = execute => r,
    };
    let response = match result {
        Ok(r) => r,
        Err(e) => {
            let (provider, model) = crate::metrics::labels(&snap, &target);
            ctx.metrics.observe(provider, model, e.status(), None);
            let _ = write_error(&mut send, &e).await;
            return;
        }
    };
    let status = response.status;
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
        // Still counted until the edge has every byte: a drain that closed
        // the endpoint the moment the last write returned would throw away
        // the stream's tail still in flight. Bounded, as a vanished edge
        // never acknowledges.
        let _ = tokio::time::timeout(ACK_WAIT, send.stopped()).await;
        Ok(())
    };
    let ended = sent.await;
    // Once the answer is over: a stream's usage is known only at its end.
    let (provider, model) = crate::metrics::labels(&snap, &target);
    ctx.metrics.observe(provider, model, status, Some(&stats));
    match ended {
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
        .regions()
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use arc_swap::ArcSwap;
    use futures::FutureExt;
    use switchyard_proto::{RouteTarget, Snapshot};

    use super::*;
    use crate::request::{EgressRequest, Operation, Protocol, RawRequest};
    use crate::tunnel::tls::{generate_node_cert, CertScope};

    /// An egress server of region `eu` on 127.0.0.1 and an edge connected
    /// to it, with real certificates.
    struct Pair {
        dir: PathBuf,
        endpoint: quinn::Endpoint,
        client: quinn::Endpoint,
        conn: quinn::Connection,
        drainer: Drainer,
    }

    impl Pair {
        async fn start(tag: &str, limits: ConnectionLimits) -> Pair {
            Self::start_offering(tag, limits, None).await
        }

        /// With `alpn`, the edge offers only those versions (an older edge).
        async fn start_offering(tag: &str, limits: ConnectionLimits, alpn: Option<&[u8]>) -> Pair {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let dir = std::env::temp_dir().join(format!("sy-limits-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let tls = |name: &str, scope: CertScope| {
                let g = generate_node_cert(&dir, name, &[], &scope).unwrap();
                NodeTls::from_files(&g.cert, &g.key, &g.ca_cert).unwrap()
            };
            let egress_tls = tls("egress", CertScope::Egress("eu".into()));
            let edge_tls = tls("edge", CertScope::Edge("eu".into()));
            let snapshot: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
            let egress = Egress::new(snapshot.clone()).unwrap();
            let server = EgressServer::bind(
                "127.0.0.1:0".parse().unwrap(),
                &egress_tls,
                egress,
                snapshot,
                "eu",
                limits,
            )
            .unwrap();
            let addr = server.local_addr().unwrap();
            let endpoint = server.endpoint();
            let drainer = server.drainer();
            tokio::spawn(server.run());
            let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let client_config = match alpn {
                Some(a) => edge_tls.client_config_offering("eu", vec![a.to_vec()]),
                None => edge_tls.client_config("eu"),
            };
            let connecting = client
                .connect_with(client_config.unwrap(), addr, "localhost")
                .unwrap();
            let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .unwrap()
                .unwrap();
            Pair {
                dir,
                endpoint,
                client,
                conn,
                drainer,
            }
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            self.conn.close(0u32.into(), b"");
            self.client.close(0u32.into(), b"");
            self.endpoint.close(0u32.into(), b"");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The framed header of a raw request from a tenant the egress does
    /// not know: read whole, it is answered with `unknown_tenant`.
    fn raw_header() -> Bytes {
        let req = EgressRequest {
            request_id: "r".into(),
            tenant: "nobody".into(),
            target: RouteTarget {
                provider: "p".into(),
                model: String::new(),
            },
            op: Operation::Raw(RawRequest {
                method: "POST".into(),
                path: "v1/x".into(),
                headers: Vec::new(),
                body: Bytes::new(),
            }),
            simulate: None,
            received_at: Instant::now(),
            inbound: Protocol::OpenAi,
            forward_headers: Vec::new(),
            residency: Vec::new(),
            trace: None,
        };
        let (header, _) = frame::request_to_wire(&req, Duration::ZERO);
        frame::encode_message(FrameKind::RequestHeader, &header)
    }

    /// The error code of the stream's response header (after the ACCEPTED
    /// frame, when the egress sent one).
    async fn answer(recv: &mut quinn::RecvStream) -> String {
        answer_and_accepted(recv).await.0
    }

    async fn answer_and_accepted(recv: &mut quinn::RecvStream) -> (String, bool) {
        let read = async {
            let mut accepted = false;
            loop {
                let (kind, payload) = frame::read_frame(recv, frame::MAX_HEADER_FRAME)
                    .await
                    .unwrap();
                match kind {
                    FrameKind::Accepted => accepted = true,
                    FrameKind::ResponseHeader => {
                        let head: wire::ResponseHeader = frame::decode(kind, &payload).unwrap();
                        return (
                            head.error.and_then(|e| e.code).unwrap_or_default(),
                            accepted,
                        );
                    }
                    other => panic!("unexpected {other:?} frame"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_accepted_edge_is_told_ready_and_later_goaway_on_one_stream() {
        let pair = Pair::start("ready", ConnectionLimits::default()).await;
        assert!(says_ready(&pair.conn), "version 3 was not negotiated");
        let bound = Duration::from_secs(10);
        let mut control = tokio::time::timeout(bound, pair.conn.accept_uni())
            .await
            .unwrap()
            .unwrap();
        let mut head = [0u8; 5];
        tokio::time::timeout(bound, control.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head, frame::READY);
        pair.drainer.start();
        tokio::time::timeout(bound, control.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head, frame::GOAWAY);
        // No second unidirectional stream was opened for it.
        assert!(pair.conn.accept_uni().now_or_never().is_none());
    }

    #[tokio::test]
    async fn an_edge_of_version_2_gets_no_ready_and_goaway_on_a_stream_of_its_own() {
        let pair = Pair::start_offering(
            "v2-edge",
            ConnectionLimits::default(),
            Some(crate::tunnel::tls::ALPN_V2),
        )
        .await;
        assert!(speaks_accepted(&pair.conn) && !says_ready(&pair.conn));
        // Requests are served without a READY first.
        let (mut send, mut recv) = pair.conn.open_bi().await.unwrap();
        send.write_all(&raw_header()).await.unwrap();
        send.finish().unwrap();
        assert_eq!(
            answer_and_accepted(&mut recv).await,
            ("unknown_tenant".to_string(), true)
        );
        assert!(pair.conn.accept_uni().now_or_never().is_none());
        pair.drainer.start();
        let bound = Duration::from_secs(10);
        let mut uni = tokio::time::timeout(bound, pair.conn.accept_uni())
            .await
            .unwrap()
            .unwrap();
        let mut head = [0u8; 5];
        tokio::time::timeout(bound, uni.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head, frame::GOAWAY);
    }

    #[tokio::test]
    async fn the_egress_acknowledges_a_request_header_at_once() {
        let pair = Pair::start("accepted", ConnectionLimits::default()).await;
        assert!(speaks_accepted(&pair.conn), "version 2 was not negotiated");
        let (mut send, mut recv) = pair.conn.open_bi().await.unwrap();
        send.write_all(&raw_header()).await.unwrap();
        // The body is still missing, yet the header is acknowledged.
        let (kind, len) = tokio::time::timeout(
            Duration::from_secs(10),
            frame::read_frame_prefix(&mut recv, frame::MAX_HEADER_FRAME),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((kind, len), (FrameKind::Accepted, 0));
        send.finish().unwrap();
        assert_eq!(
            answer_and_accepted(&mut recv).await,
            ("unknown_tenant".to_string(), false)
        );
    }

    #[tokio::test]
    async fn an_edge_connection_gets_only_its_streams() {
        let pair = Pair::start(
            "streams",
            ConnectionLimits {
                max_streams: 2,
                ..ConnectionLimits::default()
            },
        )
        .await;
        let (mut send_a, mut recv_a) = pair.conn.open_bi().await.unwrap();
        let _b = pair.conn.open_bi().await.unwrap();
        assert!(
            pair.conn.open_bi().now_or_never().is_none(),
            "a third stream was opened over the limit of 2"
        );
        // A stream that ends gives its place back.
        send_a.write_all(&raw_header()).await.unwrap();
        send_a.finish().unwrap();
        assert_eq!(answer(&mut recv_a).await, "unknown_tenant");
        let _ = recv_a.read_to_end(1 << 16).await;
        // The edge reads each answer to its FIN rather than stopping the
        // stream: every answer read so must still give its slot back, or a
        // small `--max-streams-per-connection` would stall requests. One
        // slot is left beside `_b`; twenty requests pass through it in turn.
        for n in 0..20 {
            let (mut send, mut recv) =
                tokio::time::timeout(Duration::from_secs(10), pair.conn.open_bi())
                    .await
                    .unwrap_or_else(|_| panic!("the freed stream never came back (request {n})"))
                    .unwrap();
            send.write_all(&raw_header()).await.unwrap();
            send.finish().unwrap();
            assert_eq!(answer(&mut recv).await, "unknown_tenant");
            recv.read_to_end(1 << 16).await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_edge_connection_gets_only_its_request_bytes() {
        let pair = Pair::start(
            "bytes",
            ConnectionLimits {
                max_request_bytes: 100_000,
                ..ConnectionLimits::default()
            },
        )
        .await;
        let body = vec![b'x'; 80_000];
        // Two unfinished requests of 80 kB each: the egress holds their bytes
        // while it waits for the rest, so one of them must be refused.
        let mut streams = Vec::new();
        for _ in 0..2 {
            let (mut send, recv) = pair.conn.open_bi().await.unwrap();
            send.write_all(&raw_header()).await.unwrap();
            send.write_all(&body).await.unwrap();
            streams.push((send, recv));
        }
        let (mut first, mut second) = (streams.remove(0), streams.remove(0));
        let refused_first = tokio::select! {
            code = answer(&mut first.1) => { assert_eq!(code, "egress_overloaded"); true }
            code = answer(&mut second.1) => { assert_eq!(code, "egress_overloaded"); false }
        };
        let (mut survivor, refused) = if refused_first {
            (second, first)
        } else {
            (first, second)
        };
        drop(refused);
        // The other one was kept and, once complete, is read whole.
        survivor.0.finish().unwrap();
        assert_eq!(answer(&mut survivor.1).await, "unknown_tenant");
        drop(survivor);
        // Bytes of finished requests are given back.
        let (mut send, mut recv) = pair.conn.open_bi().await.unwrap();
        send.write_all(&raw_header()).await.unwrap();
        send.write_all(&body).await.unwrap();
        send.finish().unwrap();
        assert_eq!(answer(&mut recv).await, "unknown_tenant");
    }
}
