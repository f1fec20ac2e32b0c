//! The edge's Pingora application: one client request in, one answer out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde_json::json;
use switchyard_backhaul::{EgressRequest, EgressResponse, Operation, ResponseBody, SharedSnapshot};
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest};
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{Snapshot, TenantSnapshot};

use crate::auth::authenticate;
use crate::respond::{self, Common};

/// Where the edge sends a planned request: the in-process egress in
/// single-node mode, a QUIC tunnel to a regional egress otherwise.
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    async fn execute(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError>;
}

#[async_trait]
impl Upstream for switchyard_backhaul::Egress {
    async fn execute(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        switchyard_backhaul::Egress::execute(self, req).await
    }
}

pub struct EdgeApp {
    snapshot: SharedSnapshot,
    upstream: Arc<dyn Upstream>,
}

impl EdgeApp {
    pub fn new(snapshot: SharedSnapshot, upstream: Arc<dyn Upstream>) -> Self {
        EdgeApp { snapshot, upstream }
    }
}

/// What one request did, for its access-log line.
#[derive(Default)]
struct Outcome {
    tenant: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    status: u16,
    error: Option<&'static str>,
    stats: Option<Arc<switchyard_backhaul::RequestStats>>,
    client_gone: bool,
    stream: bool,
}

enum Endpoint {
    Chat,
    Embeddings,
    Models,
    Model(String),
    Health,
}

const REQUEST_ID_HEADER: &str = "x-request-id";
/// Client-supplied request ids are echoed only when short and printable.
const MAX_REQUEST_ID: usize = 128;

fn request_id(session: &ServerSession) -> String {
    if let Some(id) = session
        .get_header(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
    {
        return id.to_string();
    }
    format!("req_{:016x}{:08x}", fastrand::u64(..), fastrand::u32(..))
}

fn route(
    method: &http::Method,
    path: &str,
) -> Result<Endpoint, (GatewayError, Option<&'static str>)> {
    let path = path.trim_end_matches('/');
    let (endpoint, allowed) = match path {
        "/v1/chat/completions" | "/chat/completions" => (Endpoint::Chat, "POST"),
        "/v1/embeddings" | "/embeddings" => (Endpoint::Embeddings, "POST"),
        "/v1/models" | "/models" => (Endpoint::Models, "GET"),
        "/health" | "/healthz" => (Endpoint::Health, "GET"),
        p => match p.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model(id.to_string()), "GET"),
            _ => {
                return Err((
                    GatewayError::new(
                        ErrorKind::NotFound,
                        format!("Unknown request URL: {method} {path}."),
                    )
                    .with_code("unknown_url"),
                    None,
                ))
            }
        },
    };
    if method.as_str() != allowed {
        return Err((
            GatewayError::new(
                ErrorKind::MethodNotAllowed,
                format!("Method {method} is not allowed on {path}; use {allowed}."),
            )
            .with_code("method_not_allowed"),
            Some(allowed),
        ));
    }
    Ok(endpoint)
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body(session: &mut ServerSession, limit: usize) -> Result<Bytes, GatewayError> {
    let too_large = || {
        GatewayError::new(
            ErrorKind::PayloadTooLarge,
            format!("The request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    };
    let declared = session
        .get_header(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(GatewayError::invalid(format!(
                    "The request body could not be read: {}",
                    e.etype().as_str()
                )))
            }
        }
    }
}

impl EdgeApp {
    async fn handle(
        &self,
        session: &mut ServerSession,
        request_id: &str,
        received_at: Instant,
        out: &mut Outcome,
    ) -> Result<(), (GatewayError, Option<&'static str>)> {
        let endpoint = {
            let req = session.req_header();
            route(&req.method, req.uri.path())?
        };
        let snap = self.snapshot.load_full();
        let common = Common { request_id };
        if let Endpoint::Health = endpoint {
            let body = Bytes::from(json!({"status": "ok", "version": snap.version}).to_string());
            out.status = 200;
            respond::json(session, 200, body, &common, &[]).await;
            return Ok(());
        }
        let tenant = authenticate(session, &snap).map_err(|e| (e, None))?;
        out.tenant = Some(tenant.id.clone());
        let op = match endpoint {
            Endpoint::Models => {
                out.status = 200;
                let body = models_list(&snap, &tenant);
                respond::json(session, 200, body, &common, &[]).await;
                return Ok(());
            }
            Endpoint::Model(id) => {
                let known = snap.model_names().into_iter().find(|(m, _)| *m == id);
                let Some((name, owner)) = known.filter(|(m, _)| tenant.may_use(m)) else {
                    return Err((GatewayError::model_not_found(&id), None));
                };
                out.status = 200;
                let body = Bytes::from(model_object(&name, &owner).to_string());
                respond::json(session, 200, body, &common, &[]).await;
                return Ok(());
            }
            Endpoint::Chat => {
                let body = read_body(session, snap.limits.max_body_bytes)
                    .await
                    .map_err(|e| (e, None))?;
                Operation::Chat(ChatRequest::parse(&body).map_err(|e| (e, None))?)
            }
            Endpoint::Embeddings => {
                let body = read_body(session, snap.limits.max_body_bytes)
                    .await
                    .map_err(|e| (e, None))?;
                Operation::Embeddings(EmbeddingsRequest::parse(&body).map_err(|e| (e, None))?)
            }
            Endpoint::Health => unreachable!("answered above"),
        };
        let requested = match &op {
            Operation::Chat(c) => &c.model,
            Operation::Embeddings(e) => &e.model,
        };
        out.model = Some(requested.clone());
        out.stream = op.is_stream();
        let target = plan(&snap, &tenant, requested).map_err(|e| (e, None))?;
        out.provider = Some(target.provider.clone());
        let simulate = session
            .get_header("x-switchyard-simulate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let egress_req = EgressRequest {
            request_id: request_id.to_string(),
            tenant: tenant.id.clone(),
            target,
            op,
            simulate,
            received_at,
        };
        // A client that hangs up while we wait for the provider cancels the
        // provider call: dropping the future closes the upstream request.
        let response = tokio::select! {
            r = self.upstream.execute(egress_req) => r.map_err(|e| (e, None))?,
            _ = session.read_body_or_idle(true) => {
                out.client_gone = true;
                out.status = 499;
                return Ok(());
            }
        };
        out.stats = Some(response.stats.clone());
        self.write_response(session, response, &common, out).await;
        Ok(())
    }

    async fn write_response(
        &self,
        session: &mut ServerSession,
        response: EgressResponse,
        common: &Common<'_>,
        out: &mut Outcome,
    ) {
        out.status = response.status;
        match response.body {
            ResponseBody::Json(body) => {
                respond::json(session, response.status, body, common, &[]).await;
            }
            ResponseBody::Sse(mut frames) => {
                let mut h = respond::header(response.status, common);
                let _ = h.insert_header("content-type", "text/event-stream; charset=utf-8");
                let _ = h.insert_header("cache-control", "no-cache");
                if !session.is_http2() {
                    let _ = h.insert_header("transfer-encoding", "chunked");
                }
                if session.write_response_header(h).await.is_err() {
                    out.client_gone = true;
                    return;
                }
                loop {
                    // Waiting on the client too means a hang-up is noticed
                    // even while the provider is silent.
                    let frame = tokio::select! {
                        f = frames.next() => f,
                        _ = session.read_body_or_idle(true) => {
                            out.client_gone = true;
                            return;
                        }
                    };
                    let Some(frame) = frame else { break };
                    if session.write_response_body(frame, false).await.is_err() {
                        out.client_gone = true;
                        return;
                    }
                }
                if session.finish_body().await.is_err() {
                    out.client_gone = true;
                }
            }
        }
    }
}

/// Resolves the requested model to a target the tenant may use.
fn plan(
    snap: &Snapshot,
    tenant: &TenantSnapshot,
    requested: &str,
) -> Result<switchyard_proto::RouteTarget, GatewayError> {
    let target = snap
        .resolve(requested)
        .ok_or_else(|| GatewayError::model_not_found(requested))?;
    if !tenant.may_use(requested) {
        return Err(GatewayError::new(
            ErrorKind::Forbidden,
            format!("Your key is not allowed to use the model `{requested}`."),
        )
        .with_code("model_not_allowed")
        .with_param("model"));
    }
    Ok(target)
}

fn model_object(id: &str, owner: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": owner })
}

fn models_list(snap: &Snapshot, tenant: &TenantSnapshot) -> Bytes {
    let data: Vec<_> = snap
        .model_names()
        .into_iter()
        .filter(|(m, _)| tenant.may_use(m))
        .map(|(m, owner)| model_object(&m, &owner))
        .collect();
    Bytes::from(json!({ "object": "list", "data": data }).to_string())
}

#[async_trait]
impl HttpServerApp for EdgeApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) | Err(_) => return None,
        }
        let received_at = Instant::now();
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(75) });
        session.set_read_timeout(Some(Duration::from_secs(60)));
        // A client that closes its side mid-request has gone away: treat
        // EOF as abort so the provider call is cancelled, not left running.
        session.set_abort_on_close(true);
        let request_id = request_id(&session);
        let mut out = Outcome::default();
        let mut reusable = true;
        if let Err((e, allow)) = self
            .handle(&mut session, &request_id, received_at, &mut out)
            .await
        {
            out.status = e.status();
            out.error = Some(e.kind.label());
            let common = Common {
                request_id: &request_id,
            };
            let extra = allow
                .map(|a| vec![("allow", a.to_string())])
                .unwrap_or_default();
            // An unread request body (413, early errors) makes the connection unusable.
            if !session.is_body_done() {
                reusable = false;
                session.set_keepalive(None);
            }
            respond::error(&mut session, &e, &common, extra).await;
        }
        log_request(&request_id, &session, &out, received_at);
        if out.client_gone {
            return None;
        }
        if out.stats.as_ref().is_some_and(|s| s.stream_failed()) {
            out.error = Some("stream_failed");
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) if reusable => {
                Some(ReusedHttpStream::from_reusable_stream(stream, persistent))
            }
            _ => None,
        }
    }
}

/// One line per request. Prompt and completion text are never logged.
fn log_request(request_id: &str, session: &ServerSession, out: &Outcome, received_at: Instant) {
    let req = session.req_header();
    let stats = out.stats.as_deref();
    let usage = stats.and_then(|s| s.usage());
    let status = if out.client_gone { 499 } else { out.status };
    let error = if stats.is_some_and(|s| s.stream_failed()) {
        Some("stream_failed")
    } else {
        out.error
    };
    tracing::info!(
        target: "switchyard::access",
        request_id,
        method = %req.method,
        path = req.uri.path(),
        tenant = out.tenant.as_deref().unwrap_or("-"),
        model = out.model.as_deref().unwrap_or("-"),
        provider = out.provider.as_deref().unwrap_or("-"),
        status,
        stream = out.stream,
        latency_ms = received_at.elapsed().as_secs_f64() * 1000.0,
        ttft_ms = stats.and_then(|s| s.ttft_us()).map(|us| us as f64 / 1000.0),
        prompt_tokens = usage.map(|u| u.prompt_tokens),
        completion_tokens = usage.map(|u| u.completion_tokens),
        error,
        client_gone = out.client_gone,
        "request"
    );
}
