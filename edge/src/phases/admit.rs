//! `admit`: who is asking, for what, and is the request well formed.
//!
//! Everything here happens before a target is chosen: the URL is routed
//! (path checks refuse traversal before any body is read), the virtual key
//! authenticated, the tenant and its jurisdictions resolved, the body read
//! under its size limit and deadline and parsed in the caller's protocol.
//! Health and model-list requests are answered here, like pingora's
//! `request_filter` answering early.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderName, StatusCode};
use pingora::protocols::http::ServerSession;
use serde_json::json;
use switchyard_backhaul::{check_model_name, Operation, Protocol, RawPath, RawRequest};
use switchyard_llm::anthropic;
use switchyard_llm::completions::CompletionsRequest;
use switchyard_llm::gemini_native::{EmbedRequest, GenerateRequest};
use switchyard_llm::openai::{parse_json_object, ChatRequest, EmbeddingsRequest};
use switchyard_llm::responses::ResponsesRequest;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::plan::narrow_residency;
use switchyard_proto::{ProviderKind, Snapshot, Tenant};

use super::{fail, Failure};
use crate::app::EdgeApp;
use crate::auth::authenticate_with;
use crate::cache::{self, CachedAnswer, ResponseCache};
use crate::ctx::RequestCtx;
use crate::respond;

/// What `admit` hands on.
pub(crate) enum Admitted {
    /// Answered by the edge itself (health, models).
    Answered,
    /// A request for a target.
    Proxy(Request),
}

pub(crate) enum Request {
    /// `/passthrough/{provider}/...`: raw, to that provider only.
    Passthrough { provider: String, raw: RawRequest },
    /// A parsed API call. `raw_body` is kept when `x-switchyard-raw` asks
    /// for the provider's own endpoint instead of translation.
    Api {
        op: Operation,
        raw_body: Option<Bytes>,
    },
}

pub(crate) enum Endpoint {
    Chat,
    Responses,
    /// `GET`/`DELETE /v1/responses/{id}[/...]`: stored responses, which
    /// only an OpenAI provider has.
    StoredResponse(String),
    Completions,
    /// Gemini `models/{model}:generateContent` / `:streamGenerateContent`.
    GeminiGenerate {
        model: String,
        stream: bool,
    },
    GeminiCountTokens {
        model: String,
    },
    GeminiEmbed {
        model: String,
        batch: bool,
    },
    GeminiModels,
    /// `GET /v1beta/models/{model}`.
    GeminiModel(String),
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
            Endpoint::Responses | Endpoint::StoredResponse(_) => "responses",
            Endpoint::Completions => "completions",
            Endpoint::GeminiGenerate { .. } => "generate_content",
            Endpoint::GeminiCountTokens { .. } => "count_tokens",
            Endpoint::GeminiEmbed { .. } => "embeddings",
            Endpoint::GeminiModels | Endpoint::GeminiModel(_) => "models",
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
            Endpoint::GeminiGenerate { .. }
            | Endpoint::GeminiCountTokens { .. }
            | Endpoint::GeminiEmbed { .. }
            | Endpoint::GeminiModels
            | Endpoint::GeminiModel(_) => Protocol::Gemini,
            _ => Protocol::OpenAi,
        }
    }
}

/// Client headers a raw passthrough forwards as they are.
pub(crate) static RAW_HEADERS: [HeaderName; 4] = [
    http::header::CONTENT_TYPE,
    http::header::ACCEPT,
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
];

// Request headers the edge reads, as names made once: looked up by `&str`,
// each name was parsed (and checked) again on every request.
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");
const RESIDENCY_HEADER: HeaderName = HeaderName::from_static("x-switchyard-residency");
const RAW_HEADER: HeaderName = HeaderName::from_static("x-switchyard-raw");
const CACHE_HEADER: HeaderName = HeaderName::from_static(cache::HEADER);
const CACHE_TTL_HEADER: HeaderName = HeaderName::from_static(cache::TTL_HEADER);
/// Client-supplied request ids are echoed only when short and printable.
const MAX_REQUEST_ID: usize = 128;

pub(crate) fn request_id(session: &ServerSession) -> String {
    if let Some(id) = session
        .get_header(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
    {
        return id.to_string();
    }
    // `req_` and 24 hex digits, written without `format!`'s machinery.
    let random = (u128::from(fastrand::u64(..)) << 32) | u128::from(fastrand::u32(..));
    let mut id = String::with_capacity(28);
    id.push_str("req_");
    for shift in (0..24).rev() {
        let nibble = ((random >> (shift * 4)) & 0xf) as u8;
        id.push(char::from(b"0123456789abcdef"[usize::from(nibble)]));
    }
    id
}

/// The caller's W3C `traceparent`, when valid (an invalid one starts a new
/// trace, as the specification asks).
pub(crate) fn traceparent(
    session: &ServerSession,
) -> Option<switchyard_backhaul::trace::TraceContext> {
    session
        .get_header(&TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(switchyard_backhaul::trace::TraceContext::parse)
}

pub(crate) async fn admit(
    app: &EdgeApp,
    session: &mut ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
) -> Result<Admitted, Failure> {
    let endpoint = {
        let req = session.req_header();
        route(&req.method, req.uri.path(), req.uri.query())?
    };
    ctx.protocol = endpoint.protocol();
    ctx.endpoint = endpoint.label();
    if let Endpoint::Health = endpoint {
        let body = Bytes::from(json!({"status": "ok", "version": snap.version()}).to_string());
        answer(app, session, snap, ctx, body).await;
        return Ok(Admitted::Answered);
    }
    let principal =
        authenticate_with(session, snap, ctx.protocol == Protocol::Gemini).map_err(fail)?;
    let tenant = principal.tenant;
    ctx.tenant = Some(tenant.clone());
    ctx.key = principal.key;
    // From the key alone, before a byte of the body is read: a tenant
    // bound to other jurisdictions never has its prompt decrypted here.
    check_edge_residency(app, snap, &tenant).map_err(fail)?;
    // The tenant's jurisdictions, narrowed (never widened) by the header.
    ctx.residency = narrow_residency(
        tenant.residency.as_deref(),
        session
            .get_header(&RESIDENCY_HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    let limit = snap.limits().max_body_bytes;
    let body_timeout = app.limits.body_timeout;
    let request = match endpoint {
        Endpoint::Health => return Ok(Admitted::Answered),
        Endpoint::GeminiModel(id) => {
            let discovered = app.upstream.discovered_models().await;
            let Some((name, _)) = all_models(snap, ctx, &tenant, discovered)
                .into_iter()
                .find(|(m, _)| *m == id)
            else {
                return Err(fail(GatewayError::model_not_found(&id)));
            };
            run_hooks(app, ctx)?;
            let body = Bytes::from(gemini_model_object(&name).to_string());
            answer(app, session, snap, ctx, body).await;
            return Ok(Admitted::Answered);
        }
        Endpoint::GeminiModels => {
            run_hooks(app, ctx)?;
            let discovered = app.upstream.discovered_models().await;
            let body = gemini_models_list(&all_models(snap, ctx, &tenant, discovered));
            answer(app, session, snap, ctx, body).await;
            return Ok(Admitted::Answered);
        }
        Endpoint::Models => {
            run_hooks(app, ctx)?;
            let discovered = app.upstream.discovered_models().await;
            let body = models_list(&all_models(snap, ctx, &tenant, discovered));
            answer(app, session, snap, ctx, body).await;
            return Ok(Admitted::Answered);
        }
        Endpoint::Model(id) => {
            let known = snap.model_names().into_iter().find(|(m, _)| *m == id);
            let known = match known {
                Some(k) => Some(k),
                None => {
                    let discovered = app.upstream.discovered_models().await;
                    all_models(snap, ctx, &tenant, discovered)
                        .into_iter()
                        .find(|(m, _)| *m == id)
                }
            };
            let Some((name, owner)) = known.filter(|(m, _)| may_use(ctx, &tenant, m)) else {
                return Err(fail(GatewayError::model_not_found(&id)));
            };
            run_hooks(app, ctx)?;
            let body = Bytes::from(model_object(&name, &owner).to_string());
            answer(app, session, snap, ctx, body).await;
            return Ok(Admitted::Answered);
        }
        Endpoint::Passthrough { provider, rest } => {
            if !snap.providers().contains_key(&provider) {
                return Err(fail(
                    GatewayError::new(
                        ErrorKind::NotFound,
                        format!("Unknown provider `{provider}`."),
                    )
                    .with_code("provider_not_found"),
                ));
            }
            let wildcard = format!("{provider}/*");
            if !may_use(ctx, &tenant, &wildcard) {
                return Err(fail(
                    GatewayError::new(
                        ErrorKind::Forbidden,
                        format!("Your key may not use raw passthrough to `{provider}`."),
                    )
                    .with_code("model_not_allowed"),
                ));
            }
            let body = read_body(session, limit, body_timeout)
                .await
                .map_err(fail)?;
            ctx.model = Some(wildcard);
            let raw = RawRequest {
                method: session.req_header().method.to_string(),
                path: rest,
                headers: copy_headers(session, &RAW_HEADERS),
                body,
            };
            Request::Passthrough { provider, raw }
        }
        Endpoint::StoredResponse(rest) => {
            let provider = stored_responses_provider(snap, &tenant).map_err(fail)?;
            ctx.model = Some(format!("{provider}/*"));
            let raw = RawRequest {
                method: session.req_header().method.to_string(),
                path: rest,
                headers: copy_headers(session, &RAW_HEADERS),
                body: Bytes::new(),
            };
            Request::Passthrough { provider, raw }
        }
        Endpoint::Chat
        | Endpoint::Responses
        | Endpoint::Completions
        | Endpoint::Embeddings
        | Endpoint::Messages
        | Endpoint::CountTokens
        | Endpoint::GeminiGenerate { .. }
        | Endpoint::GeminiCountTokens { .. }
        | Endpoint::GeminiEmbed { .. } => {
            let raw_header = session.get_header(&RAW_HEADER).is_some_and(|v| {
                v.as_bytes() == b"1" || v.as_bytes().eq_ignore_ascii_case(b"true")
            });
            let body = read_body(session, limit, body_timeout)
                .await
                .map_err(fail)?;
            let op = parse_operation(&endpoint, &body).map_err(fail)?;
            let requested = requested_model(&op);
            check_model_name(requested).map_err(fail)?;
            if let Some(key) = ctx.key.as_deref().filter(|k| !k.may_use(requested)) {
                return Err(fail(
                    GatewayError::new(
                        ErrorKind::Forbidden,
                        format!(
                            "The API key {} is not allowed to use the model `{requested}`.",
                            key.id
                        ),
                    )
                    .with_code("model_not_allowed")
                    .with_param("model"),
                ));
            }
            ctx.model = Some(requested.to_string());
            ctx.stream = op.is_stream();
            if app.cache.is_some() && !matches!(op, Operation::CountTokens { .. }) {
                ctx.cache_key = ResponseCache::key_for(
                    header_text(session, &CACHE_HEADER),
                    header_text(session, &CACHE_TTL_HEADER),
                    &tenant.id,
                    ctx.residency.as_deref(),
                    ctx.endpoint,
                    raw_header,
                    &body,
                );
            }
            // About four bytes a token: the estimate `tpm` takes up front,
            // corrected with the real usage when the request ends.
            ctx.estimated_tokens = (body.len() as u64).div_ceil(4);
            Request::Api {
                op,
                raw_body: raw_header.then_some(body),
            }
        }
    };
    enforce_limits(app, snap, ctx).await?;
    run_hooks(app, ctx)?;
    if let (Some(cache), Some(key)) = (&app.cache, &ctx.cache_key) {
        if let Some(hit) = cache.get(key).await {
            ctx.cache_key = None;
            ctx.cache_hit = true;
            replay(app, session, snap, ctx, &hit).await;
            return Ok(Admitted::Answered);
        }
        ctx.answer_headers.push((cache::HEADER_NAME, "miss".into()));
    }
    Ok(Admitted::Proxy(request))
}

fn header_text<'a>(session: &'a ServerSession, name: &HeaderName) -> Option<&'a str> {
    session.get_header(name).and_then(|v| v.to_str().ok())
}

/// Writes a cached answer: the body, or the stream's frames as they were
/// first written (already in the caller's protocol).
async fn replay(
    app: &EdgeApp,
    session: &mut ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    hit: &CachedAnswer,
) {
    ctx.status = 200;
    let jurisdiction = app.jurisdiction(snap);
    let common = app.common(&ctx.request_id, &jurisdiction);
    let mut extra = ctx.answer_headers.clone();
    extra.push((cache::HEADER_NAME, "hit".into()));
    let gone = if hit.stream {
        extra.push((CONTENT_TYPE, "text/event-stream".into()));
        let h = respond::stream_header(session, StatusCode::OK, &common, &extra);
        'write: {
            if session.write_response_header(h).await.is_err() {
                break 'write true;
            }
            for frame in &hit.frames {
                if session
                    .write_response_body(frame.clone(), false)
                    .await
                    .is_err()
                {
                    break 'write true;
                }
            }
            session.finish_body().await.is_err()
        }
    } else {
        let body = hit.frames.first().cloned().unwrap_or_default();
        !respond::json(session, StatusCode::OK, body, &common, &extra).await
    };
    ctx.client_gone |= gone;
}

/// Takes the request's slots in its tenant's and key's limits and budgets,
/// or refuses it with a 429 carrying OpenAI's rate-limit headers.
async fn enforce_limits(
    app: &EdgeApp,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
) -> Result<(), Failure> {
    let (Some(limiter), Some(tenant)) = (&app.limiter, ctx.tenant.clone()) else {
        return Ok(());
    };
    let key = ctx.key.clone();
    match limiter
        .admit(snap, &tenant, key.as_deref(), ctx.estimated_tokens)
        .await
    {
        Ok((ticket, headers)) => {
            ctx.ticket = ticket;
            ctx.answer_headers.extend(headers);
            Ok(())
        }
        Err((e, headers)) => {
            ctx.answer_headers.extend(headers);
            Err(fail(e))
        }
    }
}

fn may_use(ctx: &RequestCtx, tenant: &Tenant, model: &str) -> bool {
    tenant.may_use(model) && ctx.key.as_ref().is_none_or(|k| k.may_use(model))
}

/// A tenant whose residency excludes this edge's jurisdiction is refused
/// here (unless its policy says `edge_residency: relaxed`), naming the
/// regional hostnames it must use. An edge whose region the policy does
/// not declare (single-node mode) cannot tell and lets the plan decide.
fn check_edge_residency(
    app: &EdgeApp,
    snap: &Snapshot,
    tenant: &Tenant,
) -> Result<(), GatewayError> {
    let Some(allowed) = tenant.residency.as_deref() else {
        return Ok(());
    };
    if tenant.edge_residency_relaxed {
        return Ok(());
    }
    let Some(region) = snap.regions().get(&app.region) else {
        return Ok(());
    };
    if region
        .jurisdiction
        .as_ref()
        .is_some_and(|j| allowed.contains(j))
    {
        return Ok(());
    }
    let mut hosts: Vec<&str> = snap
        .regions()
        .values()
        .filter(|r| r.jurisdiction.as_ref().is_some_and(|j| allowed.contains(j)))
        .filter_map(|r| r.hostname.as_deref())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let here = region.jurisdiction.as_deref().unwrap_or("unspecified");
    let message = if hosts.is_empty() {
        format!(
            "This key's data must stay in {}; this edge is in {here} ({}). Use an endpoint in {}.",
            allowed.join(", "),
            app.region,
            allowed.join(", ")
        )
    } else {
        format!(
            "This key's data must stay in {}; this edge is in {here} ({}). Use {}.",
            allowed.join(", "),
            app.region,
            hosts
                .iter()
                .map(|h| format!("https://{h}"))
                .collect::<Vec<_>>()
                .join(" or ")
        )
    };
    Err(GatewayError::new(ErrorKind::Forbidden, message).with_code("residency_wrong_edge"))
}

fn run_hooks(app: &EdgeApp, ctx: &RequestCtx) -> Result<(), Failure> {
    for hook in &app.hooks.admit {
        hook.on_admit(ctx).map_err(fail)?;
    }
    Ok(())
}

/// A 200 JSON answer the edge gives itself.
async fn answer(
    app: &EdgeApp,
    session: &mut ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    body: Bytes,
) {
    ctx.status = 200;
    let jurisdiction = app.jurisdiction(snap);
    let common = app.common(&ctx.request_id, &jurisdiction);
    respond::json(session, StatusCode::OK, body, &common, &[]).await;
}

fn parse_operation(endpoint: &Endpoint, body: &Bytes) -> Result<Operation, GatewayError> {
    Ok(match endpoint {
        Endpoint::Chat => Operation::Chat(ChatRequest::parse_bytes(body)?),
        Endpoint::Responses => {
            Operation::Responses(ResponsesRequest::from_map(parse_json_object(body)?)?)
        }
        Endpoint::Completions => Operation::Completions(CompletionsRequest::parse(body)?),
        Endpoint::GeminiGenerate { model, stream } => Operation::Generate(GenerateRequest::new(
            parse_json_object(body)?,
            model,
            *stream,
        )?),
        Endpoint::GeminiEmbed { model, batch } => {
            Operation::GeminiEmbed(EmbedRequest::new(parse_json_object(body)?, model, *batch)?)
        }
        Endpoint::GeminiCountTokens { model } => Operation::GeminiCountTokens {
            model: model.clone(),
            body: parse_json_object(body)?,
        },
        Endpoint::Embeddings => Operation::Embeddings(EmbeddingsRequest::parse(body)?),
        Endpoint::Messages => {
            let map = parse_json_object(body)?;
            let chat = anthropic::messages_to_openai(map.clone())?;
            Operation::Messages { body: map, chat }
        }
        _ => {
            let map = parse_json_object(body)?;
            if !map.get("model").is_some_and(|m| m.is_string()) {
                return Err(GatewayError::invalid("model: Field required").with_param("model"));
            }
            Operation::CountTokens { body: map }
        }
    })
}

pub(crate) fn route(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Result<Endpoint, Failure> {
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
        RawPath::parse(&rest).map_err(fail)?;
        let provider = provider.to_string();
        return Ok(Endpoint::Passthrough { provider, rest });
    }
    let path = path.trim_end_matches('/');
    if let Some(found) = gemini_route(method, path)? {
        return Ok(found);
    }
    let (endpoint, allowed) = match path {
        "/v1/messages" => (Endpoint::Messages, "POST"),
        "/v1/messages/count_tokens" => (Endpoint::CountTokens, "POST"),
        "/v1/chat/completions" | "/chat/completions" => (Endpoint::Chat, "POST"),
        "/v1/responses" | "/responses" => (Endpoint::Responses, "POST"),
        "/v1/completions" | "/completions" => (Endpoint::Completions, "POST"),
        "/v1/embeddings" | "/embeddings" => (Endpoint::Embeddings, "POST"),
        "/v1/models" | "/models" => (Endpoint::Models, "GET"),
        "/health" | "/healthz" => (Endpoint::Health, "GET"),
        p => match p.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model(percent_decode(id)), "GET"),
            _ if p.starts_with("/v1/responses/") => {
                let rest = p.trim_start_matches("/v1/");
                let rest = match query {
                    Some(q) => format!("{rest}?{q}"),
                    None => rest.to_string(),
                };
                RawPath::parse(&rest).map_err(fail)?;
                let allowed = if method == http::Method::DELETE {
                    "DELETE"
                } else {
                    "GET"
                };
                (Endpoint::StoredResponse(rest), allowed)
            }
            _ => {
                return Err(fail(
                    GatewayError::new(
                        ErrorKind::NotFound,
                        format!("Unknown request URL: {method} {path}."),
                    )
                    .with_code("unknown_url"),
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

/// Gemini's own paths: `/v1beta/models` (or `/v1/...`) and
/// `.../models/{model}:{method}`, the model possibly `provider/model`.
fn gemini_route(method: &http::Method, path: &str) -> Result<Option<Endpoint>, Failure> {
    let rest = match path
        .strip_prefix("/v1beta/")
        .or_else(|| path.strip_prefix("/v1/"))
    {
        Some(r) => r,
        None => return Ok(None),
    };
    let gemini_path = path.starts_with("/v1beta/");
    // Under /v1/ only POSTs are Gemini calls: GET /v1/models/{id} is
    // OpenAI's, and OpenAI fine-tune ids contain `:` too.
    if !gemini_path && method != http::Method::POST {
        return Ok(None);
    }
    let (endpoint, allowed) = if rest == "models" && gemini_path {
        (Endpoint::GeminiModels, "GET")
    } else if let Some(call) = rest.strip_prefix("models/") {
        let Some((model, verb)) = call.rsplit_once(':') else {
            if !gemini_path || call.is_empty() {
                return Ok(None);
            }
            let endpoint = Endpoint::GeminiModel(percent_decode(call));
            return check_method(method, path, "GET").map(|()| Some(endpoint));
        };
        let model = percent_decode(model);
        let endpoint = match verb {
            "generateContent" => Endpoint::GeminiGenerate {
                model,
                stream: false,
            },
            "streamGenerateContent" => Endpoint::GeminiGenerate {
                model,
                stream: true,
            },
            "countTokens" => Endpoint::GeminiCountTokens { model },
            "embedContent" => Endpoint::GeminiEmbed {
                model,
                batch: false,
            },
            "batchEmbedContents" => Endpoint::GeminiEmbed { model, batch: true },
            other => {
                let e = GatewayError::new(
                    ErrorKind::NotFound,
                    format!("The Gemini method `{other}` is not served by this gateway; use /passthrough/{{provider}}/v1beta/... for it."),
                )
                .with_code("unknown_url");
                return Err((e, None));
            }
        };
        (endpoint, "POST")
    } else {
        return Ok(None);
    };
    check_method(method, path, allowed)?;
    Ok(Some(endpoint))
}

fn check_method(method: &http::Method, path: &str, allowed: &'static str) -> Result<(), Failure> {
    if method.as_str() == allowed {
        return Ok(());
    }
    Err((
        GatewayError::new(
            ErrorKind::MethodNotAllowed,
            format!("Method {method} is not allowed on {path}; use {allowed}."),
        )
        .with_code("method_not_allowed"),
        Some(allowed),
    ))
}

/// Reads the whole request body within `deadline` (a total, so a body
/// trickled a byte at a time cannot hold the connection).
async fn read_body(
    session: &mut ServerSession,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, GatewayError> {
    pingora_timeout::fast_timeout::fast_timeout(deadline, read_body_bytes(session, limit))
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

/// What a multi-chunk body reserves at most before its bytes arrive.
const INITIAL_BODY_RESERVE: usize = 64 * 1024;

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
    // Most bodies arrive in one chunk: that chunk is the body, no copy. The
    // buffer for the others grows as bytes arrive: a declared length is a
    // claim, and reserving it up front would let idle senders pin memory.
    let mut first: Option<Bytes> = None;
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                let held = first.as_ref().map_or(0, Bytes::len) + body.len();
                if held + chunk.len() > limit {
                    return Err(too_large());
                }
                if let Some(head) = first.take() {
                    body.reserve(
                        (head.len() + chunk.len())
                            .max(declared.unwrap_or(0).min(INITIAL_BODY_RESERVE)),
                    );
                    body.extend_from_slice(&head);
                }
                if body.is_empty() {
                    first = Some(chunk);
                } else {
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => return Ok(first.unwrap_or_else(|| body.freeze())),
            Err(e) => {
                return Err(GatewayError::invalid(format!(
                    "The request body could not be read: {}",
                    e.etype().as_str()
                )))
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

pub(crate) fn requested_model(op: &Operation) -> &str {
    match op {
        Operation::Chat(c) => &c.model,
        Operation::Embeddings(e) => &e.model,
        Operation::Messages { chat, .. } => &chat.model,
        Operation::CountTokens { body } => body.get("model").and_then(|m| m.as_str()).unwrap_or(""),
        Operation::Responses(r) => &r.model,
        Operation::Completions(c) => &c.model,
        Operation::Generate(g) => &g.model,
        Operation::GeminiCountTokens { model, .. } => model,
        Operation::GeminiEmbed(e) => &e.model,
        Operation::Raw(_) => "",
    }
}

pub(crate) fn copy_headers(session: &ServerSession, names: &[HeaderName]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|n| {
            let v = session.get_header(n)?.to_str().ok()?;
            Some((n.as_str().to_string(), v.to_string()))
        })
        .collect()
}

/// Where stored responses live: the gateway keeps none, so they are read
/// from the first OpenAI provider (by name) the tenant may use raw.
fn stored_responses_provider(snap: &Snapshot, tenant: &Tenant) -> Result<String, GatewayError> {
    let mut names: Vec<&String> = snap
        .providers()
        .iter()
        .filter(|(name, p)| p.kind == ProviderKind::OpenAi && tenant.may_use(&format!("{name}/*")))
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names.first().map(|n| n.to_string()).ok_or_else(|| {
        GatewayError::new(
            ErrorKind::NotFound,
            "Stored responses are kept by OpenAI providers only, and your key may not use one. The gateway itself stores no responses.",
        )
        .with_code("unknown_url")
    })
}

fn model_object(id: &str, owner: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": owner })
}

/// What the tenant may use, as `(name, owner)`: the policy's models,
/// aliases and routes, then the models the providers list themselves
/// (`provider/model`) that the policy did not already name.
fn all_models(
    snap: &Snapshot,
    ctx: &RequestCtx,
    tenant: &Tenant,
    discovered: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut out = snap.model_names();
    let known: std::collections::HashSet<String> = out.iter().map(|(m, _)| m.clone()).collect();
    out.extend(
        discovered
            .into_iter()
            .map(|(provider, model)| (format!("{provider}/{model}"), provider))
            .filter(|(m, _)| !known.contains(m)),
    );
    out.retain(|(m, _)| may_use(ctx, tenant, m));
    out
}

/// `GET /v1beta/models` in Gemini's shape; names keep the gateway's
/// `provider/model` form so they can be used in paths as they are.
fn gemini_models_list(models: &[(String, String)]) -> Bytes {
    let models: Vec<_> = models.iter().map(|(m, _)| gemini_model_object(m)).collect();
    Bytes::from(json!({ "models": models }).to_string())
}

fn gemini_model_object(name: &str) -> serde_json::Value {
    json!({
        "name": format!("models/{name}"),
        "displayName": name,
        "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents"],
    })
}

fn models_list(models: &[(String, String)]) -> Bytes {
    let data: Vec<_> = models
        .iter()
        .map(|(m, owner)| model_object(m, owner))
        .collect();
    Bytes::from(json!({ "object": "list", "data": data }).to_string())
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
}
