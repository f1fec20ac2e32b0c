//! `dispatch`: the only place that makes attempts.
//!
//! First each target of the plan is tried once, in order, while nothing
//! has reached the client and the error says another target may succeed
//! ([`GatewayError::may_try_another_target`]): a request an egress
//! accepted and then lost is never sent again. A target whose breaker is
//! open (and has no half-open probe slot free) is skipped: cut off until
//! its probes succeed; a request whose every target is cut off is answered
//! 503 `circuit_open` at once. Then, when every target
//! failed, targets whose failure allows it (rate-limited, overloaded, a
//! transient upstream error; never a client error, a refused key or a
//! timeout) are tried again after a jittered backoff, or the provider's
//! `retry-after` when it fits the route's `max_wait` and the request's
//! deadline, up to the route's `retry.attempts`, each retry drawing on the
//! route's retry budget so retries cannot multiply an outage.
//!
//! An attempt succeeds when its answer can be committed: a complete body,
//! or a stream's first event. A stream that fails or stalls (past the
//! route's `first_token_timeout_ms`) before that still moves on. Every
//! retry, failover, breaker change and skip is a log event and a metric.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::StatusCode;
use pingora::protocols::http::ServerSession;
use switchyard_backhaul::{EgressRequest, Operation, RequestStats, ResponseBody, Upstream};
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::health::{self, Outcome, Transition};
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

/// How one try of one target ended.
pub(super) enum Step {
    Answer(Answer),
    Failed(GatewayError),
    /// Not tried: its breaker is open.
    Skipped,
    ClientGone,
}

/// What every attempt of one request shares.
pub(super) struct Attempts<'a> {
    pub app: &'a EdgeApp,
    pub snap: &'a Snapshot,
    pub plan: &'a Plan,
    op: Operation,
    simulate: Option<String>,
    forward_headers: Vec<(String, String)>,
    /// Per-attempt deadline and the error code it ends with.
    limit: Option<(Duration, &'static str)>,
}

/// Tries the plan's targets, then retries. `Ok(None)`: the client went away.
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
    // byte is its last, bounded by the attempt or total deadline instead.
    let first_token = plan.first_token_timeout.filter(|_| op.is_stream());
    let limit = match (plan.attempt_timeout, first_token) {
        (Some(a), Some(f)) if f <= a => Some((f, "first_token_timeout")),
        (Some(a), _) => Some((a, "attempt_timeout")),
        (None, Some(f)) => Some((f, "first_token_timeout")),
        (None, None) => None,
    };
    let deadline = ctx.received_at + snap.limits().upstream_timeout;
    let budget = app.health.budget(&plan.budget_key);
    if let Some(b) = &budget {
        app.health.budget_request(b, Instant::now());
    }
    let run = Attempts {
        app,
        snap,
        plan,
        op,
        simulate,
        forward_headers,
        limit,
    };
    let hedging = super::hedge::hedging(&run, ctx);
    let n = plan.targets.len();
    let mut failed: Vec<Option<GatewayError>> = vec![None; n];
    let mut last_error: Option<GatewayError> = None;

    let mut i = 0;
    'first: while i < n {
        let (step, hedged) = match &hedging {
            // Boxed: racing two attempts is a large state, and only hedged
            // routes need it; inline, every request waiting for its first
            // token would carry it.
            Some(h) => Box::pin(h.try_target(&run, session, ctx, i)).await,
            None => (run.try_target(session, ctx, i).await, None),
        };
        // A hedge that failed too was the plan's next target to try.
        let next = hedged.as_ref().map_or(i + 1, |(j, _)| j + 1);
        for (k, step) in std::iter::once((i, step)).chain(hedged) {
            match step {
                Step::Answer(a) => return Ok(Some(a)),
                Step::ClientGone => return Ok(None),
                Step::Skipped => continue,
                Step::Failed(e) => {
                    let stop = !e.may_try_another_target();
                    if !stop && next < n {
                        let (from, to) = (&plan.targets[k].target, &plan.targets[next].target);
                        tracing::warn!(
                            target: "switchyard::failover",
                            request_id = %ctx.request_id,
                            from = %from.provider,
                            from_model = %from.model,
                            to = %to.provider,
                            to_model = %to.model,
                            error = e.kind.label(),
                            code = e.code.unwrap_or(""),
                            "failover"
                        );
                        app.metrics.failover(&from.provider, &to.provider);
                    }
                    failed[k] = Some(e.clone());
                    last_error = Some(e);
                    if stop {
                        break 'first;
                    }
                }
            }
        }
        i = next;
    }

    let policy = plan.retry;
    let may_retry = last_error
        .as_ref()
        .is_some_and(|e| e.may_try_another_target());
    let mut retries = 0;
    while may_retry && retries < policy.attempts {
        // The target that may be retried soonest goes first: a 25 ms
        // backoff before a one-second `retry-after`.
        let Some((i, wait)) = failed
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, retry_wait(e.as_ref()?, retries, &policy)?)))
            .filter(|(_, wait)| Instant::now() + *wait < deadline)
            .min_by_key(|(_, wait)| *wait)
        else {
            break;
        };
        if let Some(b) = &budget {
            let ratio = f64::from(policy.budget_percent) / 100.0;
            if !app
                .health
                .budget_retry(b, ratio, u64::from(policy.budget_floor), Instant::now())
            {
                tracing::warn!(
                    target: "switchyard::retry",
                    event = "retry_budget_exhausted",
                    request_id = %ctx.request_id,
                    model = %plan.budget_key,
                    "retry budget spent; not retrying"
                );
                app.metrics
                    .retry_budget_exhausted(ctx.model_label.as_deref().unwrap_or("other"));
                break;
            }
        }
        let target = &plan.targets[i].target;
        let cause = failed[i]
            .as_ref()
            .map_or("", |e| e.code.unwrap_or(e.kind.label()));
        tracing::info!(
            target: "switchyard::retry",
            event = "retry",
            request_id = %ctx.request_id,
            provider = %target.provider,
            model = %target.model,
            retry = retries + 1,
            wait_ms = wait.as_millis() as u64,
            error = cause,
            "retrying the target"
        );
        app.metrics.retry(&target.provider, cause);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = session.read_body_or_idle(true) => {
                ctx.client_gone = true;
                return Ok(None);
            }
        }
        retries += 1;
        match run.try_target(session, ctx, i).await {
            Step::Answer(a) => return Ok(Some(a)),
            Step::ClientGone => return Ok(None),
            // Ejected meanwhile: not worth another wait.
            Step::Skipped => failed[i] = None,
            Step::Failed(e) => {
                let stop = !e.may_try_another_target();
                failed[i] = Some(e.clone());
                last_error = Some(e);
                if stop {
                    break;
                }
            }
        }
    }

    let error = last_error.unwrap_or_else(|| circuit_open(app, plan));
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

/// Every target was skipped, its breaker open: the answer says when the
/// first is probed again.
fn circuit_open(app: &EdgeApp, plan: &Plan) -> GatewayError {
    let now = Instant::now();
    let back_in = plan
        .targets
        .iter()
        .filter_map(|t| {
            let id = health::target_id(&t.target.provider, &t.target.model, t.region.as_deref());
            let e = app.health.peek_target(&id)?;
            app.health
                .probe_at(&e)
                .map(|at| at.saturating_duration_since(now))
        })
        .min()
        .unwrap_or(Duration::from_secs(1));
    GatewayError::new(
        ErrorKind::Overloaded,
        "Every target of this model is failing and cut off by its circuit breaker; it is probed again shortly.",
    )
    .with_code("circuit_open")
    .with_retry(Retry::Never)
    .with_retry_after(Some(back_in.as_secs_f64().ceil().max(1.0).to_string()))
}

/// How long to wait before trying a target again after `e`, or `None`
/// when it must not be: nothing the request could change (a client error,
/// a refused key, an exhausted pool), a timeout (the target would likely
/// stall again; the deadline is better spent elsewhere), or a
/// `retry-after` longer than the route accepts.
fn retry_wait(
    e: &GatewayError,
    retries: u32,
    policy: &switchyard_proto::RetryPolicy,
) -> Option<Duration> {
    let allowed = matches!(
        e.retry,
        Retry::SameTargetAfterDelay | Retry::AnotherTarget | Retry::AnotherEgress
    ) && !matches!(e.source, Source::Key | Source::Client | Source::Policy)
        && e.kind != ErrorKind::Timeout;
    if !allowed {
        return None;
    }
    let asked = e.retry_after.as_deref().and_then(health::parse_retry_after);
    if asked.is_some_and(|a| a > policy.max_wait) {
        return None;
    }
    // Equal jitter: half the doubled backoff, plus up to as much again.
    let cap = policy
        .backoff
        .saturating_mul(1 << retries.min(16))
        .min(policy.max_wait);
    let half = cap / 2;
    let jittered = half + Duration::from_micros(fastrand::u64(0..=half.as_micros() as u64));
    Some(asked.map_or(jittered, |a| a.max(jittered)))
}

/// An attempt about to be made: what `finish` needs once it ends.
pub(super) struct Started {
    pub i: usize,
    entry: Option<Arc<health::Entry>>,
    probe: Option<health::Probe>,
    /// Counted in flight for `least_busy` until the answer ends.
    in_flight: Option<health::InFlight>,
    /// The attempt's span, sent over the backhaul as the egress's parent.
    span: switchyard_backhaul::trace::TraceContext,
    pub started: Instant,
}

impl Attempts<'_> {
    /// One try of the plan's `i`th target, unless its breaker is open.
    async fn try_target(
        &self,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        i: usize,
    ) -> Step {
        let (req, started) = match self.start(ctx, i) {
            Ok(s) => s,
            Err(step) => return step,
        };
        // A client that hangs up while we wait for the provider cancels
        // the provider call: dropping the future closes the request.
        let result = tokio::select! {
            r = self.attempt(req) => r,
            _ = session.read_body_or_idle(true) => {
                self.abandon(ctx, started, "client_gone");
                ctx.client_gone = true;
                return Step::ClientGone;
            }
        };
        self.finish(ctx, started, result)
    }

    /// Takes the target's breaker slot and builds its request; `Err` when
    /// the breaker is open (the skip is an event and a metric).
    pub(super) fn start(
        &self,
        ctx: &RequestCtx,
        i: usize,
    ) -> Result<(EgressRequest, Started), Step> {
        let app = self.app;
        let planned = &self.plan.targets[i];
        let entry = app.health.target(&health::target_id(
            &planned.target.provider,
            &planned.target.model,
            planned.region.as_deref(),
        ));
        let probe = match entry
            .as_ref()
            .map(|e| app.health.try_probe(e, Instant::now()))
        {
            None | Some(Ok(None)) => None,
            Some(Ok(Some((probe, transition)))) => {
                if let Some(t) = transition {
                    report_breaker(app, ctx, planned, t);
                }
                Some(probe)
            }
            Some(Err(())) => {
                tracing::debug!(
                    target: "switchyard::breaker",
                    request_id = %ctx.request_id,
                    provider = %planned.target.provider,
                    model = %planned.target.model,
                    "target ejected; skipped"
                );
                app.metrics.ejected_skip(&planned.target.provider);
                return Err(Step::Skipped);
            }
        };
        let span = ctx.trace.child();
        let simulate = self
            .simulate
            .clone()
            .filter(|_| simulate_allowed(app, self.snap, planned));
        let req = egress_request(
            ctx,
            planned,
            self.op.clone(),
            simulate,
            self.forward_headers.clone(),
            span,
        );
        let in_flight = entry.as_ref().map(|e| e.start());
        Ok((
            req,
            Started {
                i,
                entry,
                probe,
                in_flight,
                span,
                started: Instant::now(),
            },
        ))
    }

    /// The attempt itself, up to its commit point.
    pub(super) fn attempt(
        &self,
        req: EgressRequest,
    ) -> impl std::future::Future<Output = Result<Answer, GatewayError>> + Send + '_ {
        attempt(self.app.upstream.as_ref(), req, self.limit)
    }

    /// Books an attempt that ended: health, breaker, `ctx.attempts`.
    pub(super) fn finish(
        &self,
        ctx: &mut RequestCtx,
        s: Started,
        result: Result<Answer, GatewayError>,
    ) -> Step {
        let app = self.app;
        let planned = &self.plan.targets[s.i];
        ctx.served = Some(planned.clone());
        if let Some(t) = record_health(app, s.entry.as_deref(), result.as_ref().err(), s.started) {
            report_breaker(app, ctx, planned, t);
        }
        drop(s.probe);
        let error = result
            .as_ref()
            .err()
            .map(|e| e.code.unwrap_or(e.kind.label()));
        // Most requests make one attempt, and a stream keeps the list for
        // its whole life: room for one, not the four a first push makes.
        ctx.attempts.reserve_exact(1);
        ctx.attempts.push(Attempt {
            target: s.i,
            elapsed: s.started.elapsed(),
            error,
            span: Some(s.span),
            started_after: s.started.saturating_duration_since(ctx.received_at),
        });
        let in_flight = s.in_flight;
        match result {
            Ok(mut answer) => {
                if let AnswerBody::Stream { rest, .. } = &mut answer.body {
                    let body = std::mem::replace(rest, futures::stream::empty().boxed());
                    *rest = body
                        .map(move |chunk| {
                            let _held = &in_flight;
                            chunk
                        })
                        .boxed();
                }
                Step::Answer(answer)
            }
            Err(e) => Step::Failed(e),
        }
    }

    /// Books an attempt dropped before it ended (the client left, or a
    /// hedge answered first): it counts as an attempt but says nothing
    /// about the target's health.
    pub(super) fn abandon(&self, ctx: &mut RequestCtx, s: Started, why: &'static str) {
        if ctx.served.is_none() {
            ctx.served = Some(self.plan.targets[s.i].clone());
        }
        ctx.attempts.push(Attempt {
            target: s.i,
            elapsed: s.started.elapsed(),
            error: Some(why),
            span: Some(s.span),
            started_after: s.started.saturating_duration_since(ctx.received_at),
        });
    }
}

/// What one attempt asks of an egress: the request's identity, tenant,
/// jurisdictions and trace, for one target.
pub(crate) fn egress_request(
    ctx: &RequestCtx,
    planned: &PlannedTarget,
    op: Operation,
    simulate: Option<String>,
    forward_headers: Vec<(String, String)>,
    span: switchyard_backhaul::trace::TraceContext,
) -> EgressRequest {
    EgressRequest {
        request_id: ctx.request_id.clone(),
        tenant: ctx
            .tenant
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default(),
        target: planned.target.clone(),
        op,
        simulate,
        received_at: ctx.received_at,
        inbound: ctx.protocol,
        forward_headers,
        residency: ctx.residency.clone().unwrap_or_default(),
        trace: Some(span),
    }
}

fn report_breaker(app: &EdgeApp, ctx: &RequestCtx, planned: &PlannedTarget, t: Transition) {
    let ejected_ms = match t {
        Transition::Opened(d) => Some(d.as_millis() as u64),
        _ => None,
    };
    tracing::warn!(
        target: "switchyard::breaker",
        event = "breaker",
        scope = "target",
        request_id = %ctx.request_id,
        provider = %planned.target.provider,
        model = %planned.target.model,
        region = planned.region.as_deref().unwrap_or(""),
        state = t.label(),
        ejected_ms,
        "target breaker changed state"
    );
    app.metrics
        .breaker("target", &planned.target.provider, t.label());
}

/// One attempt, up to the moment its answer can be committed.
pub(crate) async fn attempt(
    upstream: &dyn Upstream,
    req: EgressRequest,
    limit: Option<(Duration, &'static str)>,
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
    let Some((limit, code)) = limit else {
        return run.await;
    };
    // Dropping `run` on the deadline cancels the provider call.
    pingora_timeout::fast_timeout::fast_timeout(limit, run)
        .await
        .unwrap_or_else(|_| {
            Err(GatewayError::new(
                ErrorKind::Timeout,
                format!(
                    "`{provider}` sent no {} within {} ms.",
                    if code == "first_token_timeout" {
                        "first event"
                    } else {
                        "answer"
                    },
                    limit.as_millis()
                ),
            )
            .with_code(code)
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
/// target. A client's or the policy's fault says nothing about it, nor
/// does the backhaul's: an egress whose streams fail is cut off by its
/// own breaker in the tunnel, and the target stays usable through the
/// region's other egress nodes.
pub(crate) fn record_health(
    app: &EdgeApp,
    entry: Option<&health::Entry>,
    error: Option<&GatewayError>,
    started: Instant,
) -> Option<Transition> {
    let outcome = match error {
        None => Outcome::Success {
            latency: started.elapsed(),
        },
        Some(e) if matches!(e.source, Source::Client | Source::Policy | Source::Backhaul) => {
            return None
        }
        Some(_) => Outcome::Failure,
    };
    app.health.record(entry?, outcome, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::RetryPolicy;

    #[test]
    fn retries_wait_a_jittered_backoff_or_the_providers_retry_after_and_never_on_client_errors() {
        let policy = RetryPolicy::default();
        let e = |kind| GatewayError::new(kind, "x");
        for _ in 0..50 {
            let w = retry_wait(&e(ErrorKind::Upstream), 0, &policy).unwrap();
            assert!(w >= policy.backoff / 2 && w <= policy.backoff, "{w:?}");
            let w = retry_wait(&e(ErrorKind::Overloaded), 3, &policy).unwrap();
            assert!(w >= policy.backoff * 4 && w <= policy.backoff * 8, "{w:?}");
        }
        let limited = e(ErrorKind::RateLimited).with_retry_after(Some("0.5".into()));
        assert!(retry_wait(&limited, 0, &policy).unwrap() >= Duration::from_millis(500));
        let too_long = e(ErrorKind::RateLimited).with_retry_after(Some("20".into()));
        assert_eq!(
            retry_wait(&too_long, 0, &policy),
            None,
            "longer than max_wait"
        );
        for never in [
            e(ErrorKind::InvalidRequest),
            e(ErrorKind::ModelNotFound),
            e(ErrorKind::PayloadTooLarge),
            e(ErrorKind::Timeout),
            e(ErrorKind::Upstream).with_retry(Retry::Never),
            e(ErrorKind::Upstream)
                .with_source(Source::Key)
                .with_retry(Retry::AnotherKey),
            e(ErrorKind::RateLimited)
                .with_source(Source::Key)
                .with_retry(Retry::AnotherTarget),
        ] {
            assert_eq!(retry_wait(&never, 0, &policy), None, "{never:?}");
        }
    }

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
