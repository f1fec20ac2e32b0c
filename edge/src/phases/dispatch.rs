//! `dispatch`: the only place that makes attempts.
//!
//! Each target of the plan is tried in order while nothing has reached the
//! client and the error says another target may succeed
//! ([`GatewayError::may_try_another_target`]): a request an egress accepted
//! and then lost is never sent again. An attempt succeeds when its answer
//! can be committed: a complete body, or a stream's first event. A stream
//! that fails or stalls (past the route's `first_token_timeout_ms`) before
//! that still moves on. Retries on the same target and hedging belong here
//! too, later; features that only watch (limits, cache, ledger) use the
//! other phases' hooks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::StatusCode;
use pingora::protocols::http::ServerSession;
use switchyard_backhaul::{EgressRequest, RequestStats, ResponseBody, Upstream};
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::health::{self, Outcome};
use switchyard_proto::{PlannedTarget, Snapshot};

use super::plan::{simulate_allowed, Outbound, Plan};
use super::{fail, Failure};
use crate::app::EdgeApp;
use crate::ctx::{Attempt, RequestCtx};

/// An answer ready to commit.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: AnswerBody,
    pub stats: Arc<RequestStats>,
}

pub(crate) enum AnswerBody {
    Full(Bytes),
    /// The first chunk (already arrived: what commits the answer) and the
    /// rest. `first` is `None` only for a stream that ended without any.
    Stream {
        first: Option<Bytes>,
        rest: BoxStream<'static, Bytes>,
    },
}

/// Tries the plan's targets in order. `Ok(None)`: the client went away.
pub(crate) async fn dispatch(
    app: &EdgeApp,
    session: &mut ServerSession,
    snap: &Snapshot,
    ctx: &mut RequestCtx,
    plan: &Plan,
    outbound: Outbound,
) -> Result<Option<Answer>, Failure> {
    let Outbound {
        op,
        simulate,
        forward_headers,
    } = outbound;
    // The first-token deadline is for streams: a complete answer's first
    // byte is its last, bounded by the total deadline instead.
    let first_token = plan.first_token_timeout.filter(|_| op.is_stream());
    let attempts = plan.targets.len();
    let mut op = Some(op);
    let mut last_error = None;
    for (i, planned) in plan.targets.iter().enumerate() {
        let is_last = i + 1 == attempts;
        // Only a request that may still fail over needs a copy.
        let this_op = if is_last { op.take() } else { op.clone() };
        let Some(this_op) = this_op else { break };
        ctx.served = Some(planned.clone());
        let req = EgressRequest {
            request_id: ctx.request_id.clone(),
            tenant: ctx
                .tenant
                .as_ref()
                .map(|t| t.id.clone())
                .unwrap_or_default(),
            target: planned.target.clone(),
            op: this_op,
            simulate: simulate
                .clone()
                .filter(|_| simulate_allowed(app, snap, planned)),
            received_at: ctx.received_at,
            inbound: ctx.protocol,
            forward_headers: forward_headers.clone(),
            residency: ctx.residency.clone().unwrap_or_default(),
        };
        let started = Instant::now();
        // A client that hangs up while we wait for the provider cancels
        // the provider call: dropping the future closes the request.
        let result = tokio::select! {
            r = attempt(app.upstream.as_ref(), req, first_token) => r,
            _ = session.read_body_or_idle(true) => {
                ctx.client_gone = true;
                ctx.attempts.push(Attempt { target: i, elapsed: started.elapsed(), error: Some("client_gone") });
                return Ok(None);
            }
        };
        record_health(app, planned, result.as_ref().err(), started);
        let error = result
            .as_ref()
            .err()
            .map(|e| e.code.unwrap_or(e.kind.label()));
        ctx.attempts.push(Attempt {
            target: i,
            elapsed: started.elapsed(),
            error,
        });
        match result {
            Ok(answer) => return Ok(Some(answer)),
            // Nothing has reached the client yet, so a failure that allows
            // it moves on to the next target of the plan.
            Err(e) if !is_last && e.may_try_another_target() => {
                tracing::warn!(
                    target: "switchyard::failover",
                    request_id = %ctx.request_id,
                    from = %planned.target.provider,
                    to = %plan.targets[i + 1].target.provider,
                    error = e.kind.label(),
                    code = e.code.unwrap_or(""),
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
    let error = last_error
        .unwrap_or_else(|| GatewayError::new(ErrorKind::Internal, "The route plan had no target."));
    // Every permitted target failed; the ones left are outside the
    // request's jurisdictions and are never tried.
    if plan.excluded > 0 && error.may_try_another_target() {
        if let (Some(allowed), Some(tenant)) = (&ctx.residency, &ctx.tenant) {
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
            return Err(fail(e));
        }
    }
    Err(fail(error))
}

/// One attempt, up to the moment its answer can be committed.
async fn attempt(
    upstream: &dyn Upstream,
    req: EgressRequest,
    first_token: Option<Duration>,
) -> Result<Answer, GatewayError> {
    let provider = req.target.provider.clone();
    let run = async {
        let response = upstream.execute(req).await?;
        let status = answer_status(response.status)?;
        let body = match response.body {
            ResponseBody::Full(b) => AnswerBody::Full(b),
            ResponseBody::Stream(mut rest) => AnswerBody::Stream {
                first: rest.next().await,
                rest,
            },
        };
        Ok(Answer {
            status,
            content_type: response.content_type,
            retry_after: response.retry_after,
            body,
            stats: response.stats,
        })
    };
    let Some(limit) = first_token else {
        return run.await;
    };
    // Dropping `run` on the deadline cancels the provider call.
    pingora_timeout::fast_timeout::fast_timeout(limit, run)
        .await
        .unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorKind::Timeout,
                format!(
                    "`{provider}` sent no first event within {} ms.",
                    limit.as_millis()
                ),
            )
            .with_code("first_token_timeout")
            .with_source(Source::Provider)
            .with_retry(Retry::AnotherTarget))
        })
}

/// The status an upstream answered with, as far as it can be passed on:
/// it came over the wire, so anything but a final HTTP status is an
/// upstream fault, not something to write (or panic on).
pub(crate) fn answer_status(status: u16) -> Result<StatusCode, GatewayError> {
    StatusCode::from_u16(status)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
        .ok_or_else(|| {
            GatewayError::new(
                ErrorKind::Upstream,
                format!("The upstream answered with status {status}, which is not a valid final HTTP status."),
            )
            .with_code("invalid_upstream_status")
            .with_source(Source::Egress)
            // It answered, so it may have carried the request out.
            .with_retry(Retry::Never)
        })
}

/// Feeds the planner's health board: what the attempt says about the
/// target. A client's or the policy's fault says nothing about it.
fn record_health(
    app: &EdgeApp,
    planned: &PlannedTarget,
    error: Option<&GatewayError>,
    started: Instant,
) {
    let outcome = match error {
        None => Outcome::Success {
            latency: started.elapsed(),
        },
        Some(e) if matches!(e.source, Source::Client | Source::Policy) => return,
        Some(_) => Outcome::Failure,
    };
    let id = health::target_id(
        &planned.target.provider,
        &planned.target.model,
        planned.region.as_deref(),
    );
    if let Some(entry) = app.health.target(&id) {
        app.health.record(&entry, outcome, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_from_the_wire_are_checked_not_trusted() {
        for ok in [200, 204, 404, 429, 503, 599] {
            assert_eq!(answer_status(ok).unwrap().as_u16(), ok);
        }
        for bad in [0, 42, 99, 100, 101, 199, 600, 1000, u16::MAX] {
            let e = answer_status(bad).unwrap_err();
            assert_eq!((e.status(), e.code), (502, Some("invalid_upstream_status")));
            assert!(!e.may_try_another_target(), "{bad}");
        }
    }
}
