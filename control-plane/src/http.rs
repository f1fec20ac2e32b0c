//! The operator API as HTTP/JSON, for curl users: a thin mapping onto the
//! same [`ControlPlane`] methods the gRPC `Operator` service calls.
//!
//! | method and path                  | gRPC            | body / answer |
//! |----------------------------------|-----------------|---------------|
//! | `POST /v1/policy[?dry_run=1]`    | ApplyPolicy     | YAML in, `{version, applied, diff, errors}` |
//! | `GET /v1/policy[?version=N]`     | GetPolicy       | `{version, yaml, author, created_at_ms, comment, history}` |
//! | `POST /v1/rollback/N`            | Rollback        | as apply |
//! | `GET /v1/nodes`                  | ListNodes       | `{current_version, nodes: [...]}` |
//! | `POST /v1/keys/rotate`           | RotateKeys      | as apply |
//! | `POST /v1/vkeys`                 | CreateVirtualKey | `{tenant, id?, models?, rpm?, tpm?, concurrency?, daily_usd?, monthly_usd?, expires_at_ms?}` in, `{key, secret}` (the key, shown once) |
//! | `GET /v1/vkeys[?tenant=T]`       | ListVirtualKeys | `{keys: [...]}` (hash prefixes, never keys) |
//! | `POST /v1/vkeys/{id}/revoke`     | RevokeVirtualKey | `{revoked}` |
//! | `GET /v1/usage?tenant=T&since=7d&group_by=model[&format=csv]` | QueryUsage | `{rows: [...]}` or CSV |
//!
//! Authentication: `authorization: Bearer <admin token>`. The listener is
//! plain HTTP; bind it to loopback or put it behind a TLS proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::limits::{ConnLimiter, ListenerLimits};
use crate::pb;
use crate::server::{ApplyOutcome, ControlError, ControlPlane};

const MAX_BODY: usize = crate::policy::MAX_POLICY_BYTES;

pub(crate) async fn serve(
    addr: SocketAddr,
    cp: Arc<ControlPlane>,
    limits: ListenerLimits,
    limiter: ConnLimiter,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                r = crate::limits::accept(&listener, &limiter) => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let cp = cp.clone();
            let limits = limits.clone();
            tokio::spawn(async move {
                let body_timeout = limits.body_timeout;
                let svc = service_fn(move |req| {
                    let cp = cp.clone();
                    async move { Ok::<_, Infallible>(handle(&cp, req, body_timeout).await) }
                });
                // The head deadline also closes idle keep-alive connections:
                // hyper arms it while waiting for the next request.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(limits.http_connection_lifetime, conn).await;
            });
        }
    });
    Ok((local, task))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({ "error": { "message": message.to_string() } }),
    )
}

fn control_error(e: ControlError) -> Response<Full<Bytes>> {
    let status = match &e {
        ControlError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        ControlError::NoSuchVersion(_) | ControlError::NoPolicy => StatusCode::NOT_FOUND,
        ControlError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    error(status, e)
}

fn outcome(o: ApplyOutcome) -> Response<Full<Bytes>> {
    let status = if o.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    reply(
        status,
        json!({
            "version": o.version,
            "applied": o.applied,
            "diff": o.diff,
            "errors": o.errors.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>(),
        }),
    )
}

fn version_json(v: &pb::PolicyVersionMsg, with_yaml: bool) -> Value {
    let mut o = json!({
        "version": v.version,
        "author": v.author,
        "created_at_ms": v.created_at_ms,
        "comment": v.comment,
    });
    if with_yaml {
        o["yaml"] = Value::String(v.yaml.clone());
    }
    o
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn vkey_json(k: &pb::VirtualKeyInfo) -> Value {
    json!({
        "id": k.id, "tenant": k.tenant, "models": k.models, "rpm": k.rpm, "tpm": k.tpm,
        "concurrency": k.concurrency, "daily_usd": k.daily_usd, "monthly_usd": k.monthly_usd,
        "expires_at_ms": k.expires_at_ms, "created_at_ms": k.created_at_ms,
        "created_by": k.created_by, "revoked_at_ms": k.revoked_at_ms,
        "hash_prefix": k.hash_prefix,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    tenant: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    rpm: u32,
    #[serde(default)]
    tpm: u64,
    #[serde(default)]
    concurrency: u32,
    #[serde(default)]
    daily_usd: f64,
    #[serde(default)]
    monthly_usd: f64,
    #[serde(default)]
    expires_at_ms: i64,
}

fn create_request(body: &[u8]) -> Result<pb::CreateVirtualKeyRequest, String> {
    let b: CreateBody = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    Ok(pb::CreateVirtualKeyRequest {
        tenant: b.tenant,
        id: b.id,
        models: b.models,
        rpm: b.rpm,
        tpm: b.tpm,
        concurrency: b.concurrency,
        daily_usd: b.daily_usd,
        monthly_usd: b.monthly_usd,
        expires_at_ms: b.expires_at_ms,
    })
}

async fn handle(
    cp: &ControlPlane,
    req: Request<Incoming>,
    body_timeout: Duration,
) -> Response<Full<Bytes>> {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(principal) = cp.http_principal(auth) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "present authorization: Bearer <admin token>",
        );
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let query = query.as_deref();
    let author = crate::server::audit_author(principal, query_param(query, "author").unwrap_or(""));
    match (method, path.as_str()) {
        (Method::POST, "/v1/policy") => {
            let collect = Limited::new(req.into_body(), MAX_BODY).collect();
            let body = match tokio::time::timeout(body_timeout, collect).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
                Err(_) => {
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time",
                    )
                }
            };
            let Ok(yaml) = std::str::from_utf8(&body) else {
                return error(StatusCode::BAD_REQUEST, "the body must be UTF-8 YAML");
            };
            let dry_run = matches!(query_param(query, "dry_run"), Some("" | "1" | "true"));
            let comment = query_param(query, "comment").unwrap_or("");
            match cp.apply(yaml, dry_run, &author, comment).await {
                Ok(o) => outcome(o),
                Err(e) => control_error(e),
            }
        }
        (Method::GET, "/v1/policy") => {
            let version = match query_param(query, "version").map(str::parse::<u64>) {
                None => 0,
                Some(Ok(v)) => v,
                Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "version must be a number"),
            };
            match cp.get_policy(version).await {
                Ok(r) => {
                    let mut body = r
                        .policy
                        .as_ref()
                        .map(|p| version_json(p, true))
                        .unwrap_or_else(|| json!({}));
                    body["history"] =
                        Value::Array(r.history.iter().map(|h| version_json(h, false)).collect());
                    reply(StatusCode::OK, body)
                }
                Err(e) => control_error(e),
            }
        }
        (Method::POST, p) if p.starts_with("/v1/rollback/") => {
            let Ok(version) = p["/v1/rollback/".len()..].parse::<u64>() else {
                return error(StatusCode::BAD_REQUEST, "expected /v1/rollback/<version>");
            };
            match cp.rollback(version, &author).await {
                Ok(o) => outcome(o),
                Err(e) => control_error(e),
            }
        }
        (Method::GET, "/v1/nodes") => match cp.list_nodes().await {
            Ok(r) => reply(
                StatusCode::OK,
                json!({
                    "current_version": r.current_version,
                    "nodes": r.nodes.iter().map(|n| json!({
                        "id": n.id, "role": n.role, "region": n.region, "build": n.build,
                        "acked_version": n.acked_version, "nacked_version": n.nacked_version,
                        "nack_reason": n.nack_reason, "last_seen_ms": n.last_seen_ms,
                        "health": n.health, "replica": n.replica,
                    })).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => control_error(e),
        },
        (Method::POST, "/v1/keys/rotate") => match cp.rotate_keys(&author).await {
            Ok(o) => outcome(o),
            Err(e) => control_error(e),
        },
        (Method::POST, "/v1/vkeys") => {
            let collect = Limited::new(req.into_body(), 64 * 1024).collect();
            let body = match tokio::time::timeout(body_timeout, collect).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
                Err(_) => {
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body did not arrive in time",
                    )
                }
            };
            let request = match create_request(&body) {
                Ok(r) => r,
                Err(message) => return error(StatusCode::BAD_REQUEST, message),
            };
            match cp.create_virtual_key(request, &author).await {
                Ok(r) => reply(
                    StatusCode::OK,
                    json!({"key": r.key.as_ref().map(vkey_json), "secret": r.secret}),
                ),
                Err(e) => control_error(e),
            }
        }
        (Method::GET, "/v1/vkeys") => {
            match cp
                .list_virtual_keys(query_param(query, "tenant").unwrap_or(""))
                .await
            {
                Ok(r) => reply(
                    StatusCode::OK,
                    json!({"keys": r.keys.iter().map(vkey_json).collect::<Vec<_>>()}),
                ),
                Err(e) => control_error(e),
            }
        }
        (Method::POST, p) if p.starts_with("/v1/vkeys/") && p.ends_with("/revoke") => {
            let id = &p["/v1/vkeys/".len()..p.len() - "/revoke".len()];
            match cp.revoke_virtual_key(id, &author).await {
                Ok(true) => reply(StatusCode::OK, json!({"revoked": true})),
                Ok(false) => error(StatusCode::NOT_FOUND, format!("no active key {id:?}")),
                Err(e) => control_error(e),
            }
        }
        (Method::GET, "/v1/usage") => {
            let since = query_param(query, "since").unwrap_or("30d");
            let Some(since_ms) = crate::tenancy::parse_since(since, crate::store::now_ms()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "since: a duration such as 7d, 24h, 30m, or Unix milliseconds",
                );
            };
            let group_by = query_param(query, "group_by").unwrap_or("model");
            let request = pb::QueryUsageRequest {
                tenant: query_param(query, "tenant").unwrap_or("").to_string(),
                since_ms,
                group_by: group_by.to_string(),
            };
            match cp.query_usage(&request).await {
                Ok(r) if query_param(query, "format") == Some("csv") => {
                    let mut resp = Response::new(Full::new(Bytes::from(
                        crate::tenancy::usage_csv(&r.rows, group_by),
                    )));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/csv"),
                    );
                    resp
                }
                Ok(r) => reply(
                    StatusCode::OK,
                    json!({"group_by": group_by, "since_ms": since_ms, "rows": r.rows.iter().map(|u| json!({
                        "group": u.group, "requests": u.requests, "errors": u.errors,
                        "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                        "cached_tokens": u.cached_tokens, "cost_usd": u.cost_usd,
                        "cache_hits": u.cache_hits, "reasoning_tokens": u.reasoning_tokens,
                    })).collect::<Vec<_>>()}),
                ),
                Err(e) => control_error(e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, format!("no route for {path}")),
    }
}
