//! The edge's Pingora application: one client request in, one answer out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use serde_json::json;
use switchyard_backhaul::{
    check_model_name, EgressRequest, EgressResponse, Operation, Protocol, RawPath, RawRequest,
    RequestObserver, RequestReport, ResponseBody, SharedSnapshot, Upstream,
};
use switchyard_llm::anthropic;
use switchyard_llm::openai::{parse_json_object, ChatRequest, EmbeddingsRequest};
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::plan::narrow_residency;
use switchyard_proto::{
    PlanError, PlannedTarget, ProviderKind, RouteTarget, Snapshot, TenantSnapshot,
};

use crate::auth::authenticate;
use crate::guard::EdgeLimits;
use crate::metrics::{EdgeMetrics, Observation};
use crate::respond::{self, Common};

pub struct EdgeApp {
    snapshot: SharedSnapshot,
    upstream: Arc<dyn Upstream>,
    metrics: Arc<EdgeMetrics>,
    /// Where this edge runs; stated on answers it gives itself.
    region: String,
    observer: Option<Arc<dyn RequestObserver>>,
    /// Honour `x-switchyard-simulate` for every provider (`switchyard dev`);
    /// otherwise only where the policy allows it per simulated provider.
    simulate_header: bool,
    limits: EdgeLimits,
    server_options: HttpServerOptions,
}

impl EdgeApp {
    pub fn new(snapshot: SharedSnapshot, upstream: Arc<dyn Upstream>) -> Self {
        EdgeApp {
            snapshot,
            upstream,
            metrics: Arc::new(EdgeMetrics::new()),
            region: "local".to_string(),
            observer: None,
            simulate_header: false,
            limits: EdgeLimits::default(),
            server_options: server_options(&EdgeLimits::default()),
        }
    }

    /// Reports every proxied request (e.g. to the control plane's scores).
    pub fn with_observer(mut self, observer: Arc<dyn RequestObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Honours `x-switchyard-simulate` whatever the policy says: for a
    /// development gateway, never for an edge facing real clients.
    pub fn with_simulate_header(mut self, on: bool) -> Self {
        self.simulate_header = on;
        self
    }

    pub fn with_limits(mut self, limits: EdgeLimits) -> Self {
        self.server_options = server_options(&limits);
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &EdgeLimits {
        &self.limits
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    fn jurisdiction(&self, snap: &Snapshot) -> String {
        snap.regions
            .get(&self.region)
            .and_then(|r| r.jurisdiction.clone())
            .unwrap_or_else(|| "unspecified".to_string())
    }

    /// The edge's Prometheus metrics, for a [`crate::metrics::MetricsApp`] listener.
    pub fn metrics(&self) -> Arc<EdgeMetrics> {
        self.metrics.clone()
    }
}

fn server_options(limits: &EdgeLimits) -> HttpServerOptions {
    let mut o = HttpServerOptions::default();
    // An HTTP/2 connection with no stream open is as idle as a kept-alive
    // HTTP/1.1 one waiting for its next request.
    o.h2_idle_timeout = Some(limits.header_timeout);
    o
}

/// What one request did, for its access-log line.
struct Outcome {
    tenant: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    status: u16,
    error: Option<&'static str>,
    stats: Option<Arc<switchyard_backhaul::RequestStats>>,
    client_gone: bool,
    stream: bool,
    protocol: Protocol,
    endpoint: &'static str,
    /// The requested model when the policy knows it (bounded metric label).
    model_label: Option<String>,
    /// The target that answered (or failed last).
    served: Option<PlannedTarget>,
}

enum Endpoint {
    Chat,
    Embeddings,
    Messages,
    CountTokens,
    Models,
    Model(String),
    Health,
    /// `/passthrough/{provider}/{rest}`: raw, any method.
    Passthrough {
        provider: String,
        rest: String,
    },
}

impl Endpoint {
    fn label(&self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::Models | Endpoint::Model(_) => "models",
            Endpoint::Health => "health",
            Endpoint::Passthrough { .. } => "passthrough",
        }
    }

    fn protocol(&self) -> Protocol {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Protocol::Anthropic,
            _ => Protocol::OpenAi,
        }
    }
}

/// Client headers a provider of the caller's own protocol should receive.
const FORWARDED_HEADERS: &[&str] = &["anthropic-version", "anthropic-beta"];
/// Client headers a raw passthrough forwards as they are.
const RAW_HEADERS: &[&str] = &[
    "content-type",
    "accept",
    "anthropic-version",
    "anthropic-beta",
];

const REQUEST_ID_HEADER: &str = "x-request-id";
/// Fault and timing injection for the simulated provider (see its docs).
const SIMULATE_HEADER: &str = "x-switchyard-simulate";
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

type Failure = (GatewayError, Option<&'static str>);

fn route(method: &http::Method, path: &str, query: Option<&str>) -> Result<Endpoint, Failure> {
    if let Some(rest) = path.strip_prefix("/passthrough/") {
        let (provider, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if provider.is_empty() {
            let e = GatewayError::new(ErrorKind::NotFound, "Use /passthrough/{provider}/{path}.");
            return Err((e.with_code("unknown_url"), None));
        }
        let rest = match query {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        // Refused here, before authentication and before any body is read,
        // so a traversal attempt never gets near the provider.
        RawPath::parse(&rest).map_err(|e| (e, None))?;
        let provider = provider.to_string();
        return Ok(Endpoint::Passthrough { provider, rest });
    }
    let path = path.trim_end_matches('/');
    let (endpoint, allowed) = match path {
        "/v1/messages" => (Endpoint::Messages, "POST"),
        "/v1/messages/count_tokens" => (Endpoint::CountTokens, "POST"),
        "/v1/chat/completions" | "/chat/completions" => (Endpoint::Chat, "POST"),
        "/v1/embeddings" | "/embeddings" => (Endpoint::Embeddings, "POST"),
        "/v1/models" | "/models" => (Endpoint::Models, "GET"),
        "/health" | "/healthz" => (Endpoint::Health, "GET"),
        p => match p.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model(percent_decode(id)), "GET"),
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

/// Reads the whole request body within `deadline` (a total, so a body
/// trickled a byte at a time cannot hold the connection).
async fn read_body(
    session: &mut ServerSession,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, GatewayError> {
    tokio::time::timeout(deadline, read_body_bytes(session, limit))
        .await
        .unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorKind::RequestTimeout,
                format!(
                    "The request body did not arrive within {} ms.",
                    deadline.as_millis()
                ),
            )
            .with_code("request_timeout"))
        })
}

/// Reads the whole request body, refusing more than `limit` bytes.
async fn read_body_bytes(session: &mut ServerSession, limit: usize) -> Result<Bytes, GatewayError> {
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
    ) -> Result<(), Failure> {
        let endpoint = {
            let req = session.req_header();
            route(&req.method, req.uri.path(), req.uri.query())?
        };
        out.protocol = endpoint.protocol();
        out.endpoint = endpoint.label();
        let snap = self.snapshot.load_full();
        let jurisdiction = self.jurisdiction(&snap);
        let common = Common {
            request_id,
            region: &self.region,
            jurisdiction: &jurisdiction,
        };
        if let Endpoint::Health = endpoint {
            let body = Bytes::from(json!({"status": "ok", "version": snap.version}).to_string());
            out.status = 200;
            respond::json(session, 200, body, &common, &[]).await;
            return Ok(());
        }
        let tenant = authenticate(session, &snap).map_err(|e| (e, None))?;
        out.tenant = Some(tenant.id.clone());
        // The tenant's jurisdictions, narrowed (never widened) by the header.
        let residency = narrow_residency(
            snap.tenant_policy(&tenant.id)
                .and_then(|p| p.residency.as_deref()),
            session
                .get_header("x-switchyard-residency")
                .and_then(|v| v.to_str().ok()),
        );
        let limit = snap.limits.max_body_bytes;
        let raw_header = session
            .get_header("x-switchyard-raw")
            .is_some_and(|v| v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true"));
        let (op, plan) = match endpoint {
            Endpoint::Health => unreachable!("answered above"),
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
            Endpoint::Passthrough { provider, rest } => {
                if !snap.providers.contains_key(&provider) {
                    return Err((
                        GatewayError::new(
                            ErrorKind::NotFound,
                            format!("Unknown provider `{provider}`."),
                        )
                        .with_code("provider_not_found"),
                        None,
                    ));
                }
                let wildcard = format!("{provider}/*");
                if !tenant.may_use(&wildcard) {
                    return Err((
                        GatewayError::new(
                            ErrorKind::Forbidden,
                            format!("Your key may not use raw passthrough to `{provider}`."),
                        )
                        .with_code("model_not_allowed"),
                        None,
                    ));
                }
                let p = &snap.providers[&provider];
                if let Some(allowed) = &residency {
                    if !p.jurisdiction.as_ref().is_some_and(|j| allowed.contains(j)) {
                        let e = residency_error(&tenant.id, allowed, &provider);
                        return Err((e, None));
                    }
                }
                let planned = PlannedTarget {
                    target: RouteTarget {
                        provider,
                        model: String::new(),
                    },
                    region: p.region.clone(),
                    jurisdiction: p.jurisdiction.clone(),
                };
                let body = read_body(session, limit, self.limits.body_timeout)
                    .await
                    .map_err(|e| (e, None))?;
                out.model = Some(wildcard);
                let raw = RawRequest {
                    method: session.req_header().method.to_string(),
                    path: rest,
                    headers: copy_headers(session, RAW_HEADERS),
                    body,
                };
                let plan = Plan {
                    targets: vec![planned],
                    excluded: 0,
                };
                (Operation::Raw(raw), plan)
            }
            Endpoint::Chat | Endpoint::Embeddings | Endpoint::Messages | Endpoint::CountTokens => {
                let body = read_body(session, limit, self.limits.body_timeout)
                    .await
                    .map_err(|e| (e, None))?;
                let op = match endpoint {
                    Endpoint::Chat => {
                        Operation::Chat(ChatRequest::parse(&body).map_err(|e| (e, None))?)
                    }
                    Endpoint::Embeddings => Operation::Embeddings(
                        EmbeddingsRequest::parse(&body).map_err(|e| (e, None))?,
                    ),
                    Endpoint::Messages => {
                        let map = parse_json_object(&body).map_err(|e| (e, None))?;
                        let chat =
                            anthropic::messages_to_openai(map.clone()).map_err(|e| (e, None))?;
                        Operation::Messages { body: map, chat }
                    }
                    _ => {
                        let map = parse_json_object(&body).map_err(|e| (e, None))?;
                        if !map.get("model").is_some_and(|m| m.is_string()) {
                            return Err((
                                GatewayError::invalid("model: Field required").with_param("model"),
                                None,
                            ));
                        }
                        Operation::CountTokens { body: map }
                    }
                };
                let requested = requested_model(&op).to_string();
                check_model_name(&requested).map_err(|e| (e, None))?;
                out.model = Some(requested.clone());
                out.stream = op.is_stream();
                let plan = plan(&snap, &tenant, &requested, residency.as_deref())
                    .map_err(|e| (e, None))?;
                let target = &plan.targets[0].target;
                let advertised = snap
                    .providers
                    .get(&target.provider)
                    .is_some_and(|p| p.models.contains(&target.model));
                if advertised || snap.aliases.contains_key(&requested) {
                    out.model_label = Some(requested.clone());
                }
                if raw_header {
                    let kind = snap.providers.get(&target.provider).map(|p| p.kind);
                    let path = raw_path(kind, endpoint_name(&op)).map_err(|e| (e, None))?;
                    let mut map = parse_json_object(&body).map_err(|e| (e, None))?;
                    map.insert(
                        "model".into(),
                        serde_json::Value::String(target.model.clone()),
                    );
                    let raw = RawRequest {
                        method: "POST".into(),
                        path,
                        headers: copy_headers(session, RAW_HEADERS),
                        body: Bytes::from(serde_json::to_vec(&map).unwrap_or_default()),
                    };
                    // Raw mode talks to one provider as it is: no fallbacks.
                    let plan = Plan {
                        targets: plan.targets.into_iter().take(1).collect(),
                        excluded: 0,
                    };
                    (Operation::Raw(raw), plan)
                } else {
                    (op, plan)
                }
            }
        };
        let simulate_for = |t: &PlannedTarget| {
            self.simulate_header
                || snap
                    .providers
                    .get(&t.target.provider)
                    .and_then(|p| p.simulated.as_ref())
                    .is_some_and(|s| s.allow_header)
        };
        let simulate = match session.get_header(SIMULATE_HEADER) {
            None => None,
            // Refused rather than ignored: a caller testing its failure
            // handling against an edge that would silently serve real
            // answers would draw the wrong conclusions.
            Some(_) if !plan.targets.iter().any(simulate_for) => {
                return Err((
                    GatewayError::invalid(
                        "The x-switchyard-simulate header is honoured only by `switchyard dev`, or for providers whose policy sets `simulated.allow_header: true` (or `faults.allow_header: true`); remove it.",
                    )
                    .with_code("simulate_not_allowed"),
                    None,
                ))
            }
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        let e = GatewayError::invalid("The x-switchyard-simulate header is not ASCII.")
                            .with_code("invalid_simulate_header");
                        (e, None)
                    })?
                    .to_string(),
            ),
        };
        let forward_headers = copy_headers(session, FORWARDED_HEADERS);
        let attempts = plan.targets.len();
        let mut op = Some(op);
        let mut last_error = None;
        for (i, planned) in plan.targets.iter().enumerate() {
            let is_last = i + 1 == attempts;
            // Only a request that may still fail over needs a copy.
            let this_op = if is_last { op.take() } else { op.clone() };
            let Some(this_op) = this_op else { break };
            out.provider = Some(planned.target.provider.clone());
            out.served = Some(planned.clone());
            let egress_req = EgressRequest {
                request_id: request_id.to_string(),
                tenant: tenant.id.clone(),
                target: planned.target.clone(),
                op: this_op,
                simulate: simulate.clone().filter(|_| simulate_for(planned)),
                received_at,
                inbound: out.protocol,
                forward_headers: forward_headers.clone(),
                residency: residency.clone().unwrap_or_default(),
            };
            // A client that hangs up while we wait for the provider cancels
            // the provider call: dropping the future closes the request.
            let result = tokio::select! {
                r = self.upstream.execute(egress_req) => r,
                _ = session.read_body_or_idle(true) => {
                    out.client_gone = true;
                    return Ok(());
                }
            };
            match result {
                Ok(response) => {
                    out.stats = Some(response.stats.clone());
                    let served = Common {
                        request_id,
                        region: planned.region.as_deref().unwrap_or(&self.region),
                        jurisdiction: planned.jurisdiction.as_deref().unwrap_or("unspecified"),
                    };
                    self.write_response(session, response, &served, out).await;
                    return Ok(());
                }
                // Nothing has reached the client yet, so a retryable failure
                // moves on to the next target of the plan.
                Err(e) if !is_last && is_retryable(&e) => {
                    tracing::warn!(
                        target: "switchyard::failover",
                        request_id,
                        from = %planned.target.provider,
                        to = %plan.targets[i + 1].target.provider,
                        error = e.kind.label(),
                        "failover"
                    );
                    last_error = Some(e);
                }
                Err(e) => {
                    last_error = Some(e);
                    break;
                }
            }
        }
        let error = last_error.unwrap_or_else(|| {
            GatewayError::new(ErrorKind::Internal, "The route plan had no target.")
        });
        // Every permitted target failed; the ones left are outside the
        // request's jurisdictions and are never tried.
        if plan.excluded > 0 && is_retryable(&error) {
            if let Some(allowed) = &residency {
                let e = GatewayError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "Residency rule: tenant `{}` may only be served in {}; every target inside failed (last: {}) and {} target(s) outside were not tried.",
                        tenant.id,
                        allowed.join(", "),
                        error.message,
                        plan.excluded
                    ),
                )
                .with_code("residency_blocked");
                return Err((e, None));
            }
        }
        Err((error, None))
    }

    async fn write_response(
        &self,
        session: &mut ServerSession,
        response: EgressResponse,
        common: &Common<'_>,
        out: &mut Outcome,
    ) {
        out.status = response.status;
        let mut extra = vec![("content-type", response.content_type)];
        if let Some(ra) = response.retry_after {
            extra.push(("retry-after", ra));
        }
        match response.body {
            ResponseBody::Full(body) => {
                if !respond::full(session, response.status, body, common, &extra).await {
                    out.client_gone = true;
                }
            }
            ResponseBody::Stream(mut chunks) => {
                let mut h = respond::header(response.status, common);
                for (k, v) in &extra {
                    let _ = h.insert_header(*k, v.as_str());
                }
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
                    let chunk = tokio::select! {
                        c = chunks.next() => c,
                        _ = session.read_body_or_idle(true) => {
                            out.client_gone = true;
                            return;
                        }
                    };
                    let Some(chunk) = chunk else { break };
                    if session.write_response_body(chunk, false).await.is_err() {
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

/// SDKs percent-encode the `/` of `provider/model` in path segments.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn requested_model(op: &Operation) -> &str {
    match op {
        Operation::Chat(c) => &c.model,
        Operation::Embeddings(e) => &e.model,
        Operation::Messages { chat, .. } => &chat.model,
        Operation::CountTokens { body } => body.get("model").and_then(|m| m.as_str()).unwrap_or(""),
        Operation::Raw(_) => "",
    }
}

fn endpoint_name(op: &Operation) -> &'static str {
    match op {
        Operation::Chat(_) => "chat/completions",
        Operation::Embeddings(_) => "embeddings",
        Operation::Messages { .. } => "messages",
        Operation::CountTokens { .. } => "messages/count_tokens",
        Operation::Raw(_) => "",
    }
}

/// Where `x-switchyard-raw` sends a normal route: the provider's own
/// endpoint for it, which only exists when the protocols match.
fn raw_path(kind: Option<ProviderKind>, endpoint: &str) -> Result<String, GatewayError> {
    match (kind, endpoint) {
        (Some(ProviderKind::OpenAi | ProviderKind::OpenAiCompatible), "chat/completions" | "embeddings") => {
            Ok(endpoint.to_string())
        }
        (Some(ProviderKind::Anthropic), "messages" | "messages/count_tokens") => Ok(format!("v1/{endpoint}")),
        _ => Err(GatewayError::invalid(
            "x-switchyard-raw needs a provider that speaks this endpoint's protocol; use /passthrough/{provider}/{path} for anything else.",
        )
        .with_code("raw_protocol_mismatch")),
    }
}

fn copy_headers(session: &ServerSession, names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            let v = session.get_header(*n)?.to_str().ok()?;
            Some((n.to_string(), v.to_string()))
        })
        .collect()
}

/// Resolves the requested model to a target the tenant may use.
/// Ordered targets for one request, and how many residency took away.
struct Plan {
    targets: Vec<PlannedTarget>,
    excluded: usize,
}

/// Resolves the requested model to the ordered targets the tenant may use
/// inside the request's jurisdictions (fallbacks included).
fn plan(
    snap: &Snapshot,
    tenant: &TenantSnapshot,
    requested: &str,
    residency: Option<&[String]>,
) -> Result<Plan, GatewayError> {
    if !tenant.may_use(requested) {
        // Checked first so an unknown model does not reveal the catalogue.
        if snap.resolve(requested).is_some() {
            return Err(GatewayError::new(
                ErrorKind::Forbidden,
                format!("Your key is not allowed to use the model `{requested}`."),
            )
            .with_code("model_not_allowed")
            .with_param("model"));
        }
        return Err(GatewayError::model_not_found(requested));
    }
    let all = snap.plan(requested, None).map_err(|e| match e {
        PlanError::UnknownModel(_) | PlanError::Residency { .. } => {
            GatewayError::model_not_found(requested)
        }
    })?;
    let Some(allowed) = residency else {
        return Ok(Plan {
            targets: all,
            excluded: 0,
        });
    };
    match snap.plan(requested, Some(allowed)) {
        Ok(targets) => Ok(Plan {
            excluded: all.len() - targets.len(),
            targets,
        }),
        Err(PlanError::Residency { blocked, .. }) => {
            let where_ = blocked
                .iter()
                .map(|t| {
                    format!(
                        "{}/{} in {}",
                        t.target.provider,
                        t.target.model,
                        t.jurisdiction.as_deref().unwrap_or("no jurisdiction")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            Err(GatewayError::new(
                ErrorKind::Forbidden,
                format!(
                    "Residency rule: tenant `{}` may only be served in {}; no target of `{requested}` is ({where_}).",
                    tenant.id,
                    if allowed.is_empty() { "no jurisdiction (the x-switchyard-residency header left none)".to_string() } else { allowed.join(", ") },
                ),
            )
            .with_code("residency_blocked"))
        }
        Err(PlanError::UnknownModel(_)) => Err(GatewayError::model_not_found(requested)),
    }
}

fn residency_error(tenant: &str, allowed: &[String], provider: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Forbidden,
        format!(
            "Residency rule: tenant `{tenant}` may only be served in {}; provider `{provider}` is outside.",
            allowed.join(", ")
        ),
    )
    .with_code("residency_blocked")
}

/// Failures that say nothing about the request itself, so another target
/// may well succeed.
fn is_retryable(e: &GatewayError) -> bool {
    matches!(
        e.kind,
        ErrorKind::RateLimited | ErrorKind::Upstream | ErrorKind::Overloaded | ErrorKind::Timeout
    )
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
    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.server_options)
    }

    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Pingora's timeouts are per read; a client sending a byte now and
        // then would never hit them, so the whole header gets one deadline.
        match tokio::time::timeout(self.limits.header_timeout, session.read_request()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false) | Err(_)) | Err(_) => return None,
        }
        let received_at = Instant::now();
        // The next request on this connection must start within the same
        // deadline (0 would mean "forever" to Pingora).
        let idle = self.limits.header_timeout.as_secs().max(1);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(idle) });
        session.set_read_timeout(Some(self.limits.body_timeout));
        // A client that closes its side mid-request has gone away: treat
        // EOF as abort so the provider call is cancelled, not left running.
        session.set_abort_on_close(true);
        let request_id = request_id(&session);
        let mut out = Outcome {
            tenant: None,
            model: None,
            provider: None,
            status: 0,
            error: None,
            stats: None,
            client_gone: false,
            stream: false,
            protocol: Protocol::OpenAi,
            endpoint: "other",
            model_label: None,
            served: None,
        };
        let mut reusable = true;
        if let Err((e, allow)) = self
            .handle(&mut session, &request_id, received_at, &mut out)
            .await
        {
            out.status = e.status();
            out.error = Some(e.kind.label());
            let jurisdiction = self.jurisdiction(&self.snapshot.load());
            let common = Common {
                request_id: &request_id,
                region: &self.region,
                jurisdiction: &jurisdiction,
            };
            let extra = allow
                .map(|a| vec![("allow", a.to_string())])
                .unwrap_or_default();
            // An unread request body (413, early errors) makes the connection unusable.
            if !session.is_body_done() {
                reusable = false;
                session.set_keepalive(None);
            }
            respond::error(&mut session, &e, out.protocol, &common, extra).await;
        }
        log_request(&request_id, &session, &out, received_at);
        self.observe(&out, received_at);
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

impl EdgeApp {
    fn observe(&self, out: &Outcome, received_at: Instant) {
        let stats = out.stats.as_deref();
        let usage = stats.and_then(|s| s.usage()).unwrap_or_default();
        if let (Some(observer), Some(served)) = (&self.observer, &out.served) {
            if !out.client_gone && !served.target.model.is_empty() {
                let failed = stats.is_some_and(|s| s.stream_failed());
                observer.observe(RequestReport {
                    provider: served.target.provider.clone(),
                    model: served.target.model.clone(),
                    region: served.region.clone().unwrap_or_default(),
                    ttft: stats.and_then(|s| s.ttft_us()).map(Duration::from_micros),
                    latency: received_at.elapsed(),
                    error_class: if failed {
                        Some("stream_failed")
                    } else {
                        out.error
                    },
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                });
            }
        }
        self.metrics.observe(&Observation {
            endpoint: out.endpoint,
            provider: out.provider.as_deref().unwrap_or("none"),
            model: out.model_label.as_deref().unwrap_or("other"),
            status: if out.client_gone { 499 } else { out.status },
            latency: received_at.elapsed(),
            ttft: stats.and_then(|s| s.ttft_us()).map(Duration::from_micros),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            stream_failed: stats.is_some_and(|s| s.stream_failed()),
            client_gone: out.client_gone,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str) -> Endpoint {
        let m = http::Method::from_bytes(method.as_bytes()).unwrap();
        route(&m, path, None).unwrap_or_else(|(e, _)| panic!("{path}: {e}"))
    }

    #[test]
    fn routes_and_methods() {
        assert!(matches!(ok("POST", "/v1/chat/completions"), Endpoint::Chat));
        assert!(matches!(
            ok("POST", "/v1/chat/completions/"),
            Endpoint::Chat
        ));
        assert!(matches!(ok("POST", "/v1/messages"), Endpoint::Messages));
        assert!(matches!(
            ok("POST", "/v1/messages/count_tokens"),
            Endpoint::CountTokens
        ));
        assert!(matches!(ok("GET", "/v1/models"), Endpoint::Models));
        match ok("GET", "/v1/models/openai%2Fgpt-4o") {
            Endpoint::Model(id) => assert_eq!(id, "openai/gpt-4o"),
            _ => panic!("model route"),
        }
        let m = http::Method::GET;
        let (e, allow) = route(&m, "/v1/chat/completions", None).err().unwrap();
        assert_eq!((e.status(), allow), (405, Some("POST")));
        let (e, _) = route(&m, "/v2/anything", None).err().unwrap();
        assert_eq!(e.status(), 404);
        match route(
            &http::Method::PUT,
            "/passthrough/gemini/v1beta/files",
            Some("a=1"),
        )
        .ok()
        .unwrap()
        {
            Endpoint::Passthrough { provider, rest } => {
                assert_eq!(
                    (provider.as_str(), rest.as_str()),
                    ("gemini", "v1beta/files?a=1")
                )
            }
            _ => panic!("passthrough route"),
        }
        assert!(route(&m, "/passthrough/", None).is_err());
        for evil in [
            "/passthrough/p/../../admin/x",
            "/passthrough/p/%2e%2e/admin",
            "/passthrough/p/v1%2f..%2fadmin",
            "/passthrough/p/v1%5cadmin",
        ] {
            let (e, _) = route(&m, evil, None).err().unwrap();
            assert_eq!((e.status(), e.code), (400, Some("invalid_path")), "{evil}");
        }
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%2"), "%zz%2");
    }

    #[test]
    fn raw_mode_needs_matching_protocols() {
        assert_eq!(
            raw_path(Some(ProviderKind::OpenAi), "chat/completions").unwrap(),
            "chat/completions"
        );
        assert_eq!(
            raw_path(Some(ProviderKind::Anthropic), "messages").unwrap(),
            "v1/messages"
        );
        assert!(raw_path(Some(ProviderKind::Anthropic), "chat/completions").is_err());
        assert!(raw_path(Some(ProviderKind::Gemini), "chat/completions").is_err());
        assert!(raw_path(Some(ProviderKind::Simulated), "chat/completions").is_err());
    }
}
