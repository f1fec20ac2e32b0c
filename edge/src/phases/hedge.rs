//! Hedged requests (opt-in per route: `routes.R.hedge`).
//!
//! A slow provider is often slow for one request, not for all: when an
//! attempt has not answered (a complete body, or a stream's first event)
//! after the route's delay — fixed, or the target's p95 time to its first
//! byte — a second attempt starts on the plan's next target that is not cut
//! off, and the first to answer wins. The loser's future is dropped: over
//! the backhaul that resets its QUIC stream and the egress drops the
//! provider call; in one process the provider connection is closed.
//!
//! Hedging only ever uses the plan's targets, which residency has already
//! filtered, so a hedge never leaves the request's jurisdictions. Its cost
//! is capped per tenant: hedges over a sliding window may not exceed
//! `tenants[].hedge_budget_percent` of the tenant's requests on hedged
//! routes (at least one per window), the retry budget's machinery on the
//! health board. Both attempts are in `ctx.attempts` (the loser as
//! `hedge_lost`), so the usage record and `x-switchyard-attempts` count
//! them; a loser is cut before its first byte, so it has no usage to add.
//! Every hedge is a `switchyard::hedge` event and a
//! `switchyard_hedges_total{route,outcome}` sample.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::protocols::http::ServerSession;
use switchyard_proto::health::{self, RetryBudget};
use switchyard_proto::{HedgePolicy, ScoreKey, DEFAULT_HEDGE_BUDGET_PERCENT};

use super::dispatch::{Attempts, Started, Step};
use crate::ctx::RequestCtx;

/// Hedges a tenant may start per window whatever its request count, so a
/// quiet tenant can still hedge at all.
const BUDGET_FLOOR: u64 = 1;
/// Local successes before this edge's own p95 is trusted over the fleet's.
const LOCAL_MIN_SAMPLES: u64 = 3;

/// A request's hedging: the route's policy and the tenant's budget.
pub(super) struct Hedging {
    policy: HedgePolicy,
    budget: Arc<RetryBudget>,
    ratio: f64,
}

/// Hedging for this request, when its route hedges and its tenant's budget
/// is not zero; books the request against the tenant's budget.
pub(super) fn hedging(run: &Attempts<'_>, ctx: &RequestCtx) -> Option<Hedging> {
    let policy = run.plan.hedge?;
    let tenant = ctx.tenant.as_ref()?;
    let percent = tenant
        .hedge_budget_percent
        .unwrap_or(DEFAULT_HEDGE_BUDGET_PERCENT);
    if percent == 0 {
        return None;
    }
    let budget = run.app.health.hedge_budget(&tenant.id)?;
    run.app.health.budget_request(&budget, Instant::now());
    Some(Hedging {
        policy,
        budget,
        ratio: f64::from(percent) / 100.0,
    })
}

/// What one hedged try came to: the primary's step, and the hedge's index
/// and step when one was started and both failed.
pub(super) type Raced = (Step, Option<(usize, Step)>);

impl Hedging {
    /// How long target `i` may take before a hedge starts.
    fn delay(&self, run: &Attempts<'_>, i: usize) -> Duration {
        if !self.policy.after_p95 {
            return self.policy.delay;
        }
        let t = &run.plan.targets[i];
        let local = run
            .app
            .health
            .peek_target(&health::target_id(
                &t.target.provider,
                &t.target.model,
                t.region.as_deref(),
            ))
            .filter(|e| e.successes() >= LOCAL_MIN_SAMPLES)
            .and_then(|e| e.latency_p95());
        let fleet = || {
            run.snap
                .scores()
                .targets
                .get(&ScoreKey {
                    provider: t.target.provider.clone(),
                    model: t.target.model.clone(),
                    region: t.region.clone().unwrap_or_default(),
                })
                .filter(|s| s.requests > 0 && s.ttft_p95_ms > 0.0)
                .map(|s| Duration::from_secs_f64(s.ttft_p95_ms / 1000.0))
        };
        local
            .or_else(fleet)
            .unwrap_or(self.policy.delay)
            .max(self.policy.min_delay)
    }

    /// Tries the plan's `i`th target; if it has not answered after the
    /// delay, races it against the next target the budget allows.
    pub(super) async fn try_target(
        &self,
        run: &Attempts<'_>,
        session: &mut ServerSession,
        ctx: &mut RequestCtx,
        i: usize,
    ) -> Raced {
        let (req, first) = match run.start(ctx, i) {
            Ok(s) => s,
            Err(step) => return (step, None),
        };
        let primary = run.attempt(req);
        tokio::pin!(primary);
        let delay = self.delay(run, i);
        tokio::select! {
            biased;
            r = &mut primary => return (run.finish(ctx, first, r), None),
            _ = session.read_body_or_idle(true) => {
                run.abandon(ctx, first, "client_gone");
                ctx.client_gone = true;
                return (Step::ClientGone, None);
            }
            _ = tokio::time::sleep(delay) => {}
        }
        let Some((j, req2, second)) = (i + 1..run.plan.targets.len())
            .find_map(|j| run.start(ctx, j).ok().map(|(req, s)| (j, req, s)))
        else {
            self.event(run, ctx, i, None, delay, "no_target");
            return (alone(run, session, ctx, primary, first).await, None);
        };
        let app = run.app;
        if !app
            .health
            .budget_retry(&self.budget, self.ratio, BUDGET_FLOOR, Instant::now())
        {
            // Gives the breaker slot and the in-flight count back.
            drop(second);
            self.event(run, ctx, i, Some(j), delay, "budget_refused");
            return (alone(run, session, ctx, primary, first).await, None);
        }
        self.event(run, ctx, i, Some(j), delay, "started");
        let hedge = run.attempt(req2);
        tokio::pin!(hedge);
        let (mut first, mut second) = (Some(first), Some(second));
        let (mut failed_first, mut failed_second) = (None, None);
        loop {
            tokio::select! {
                r = &mut primary, if failed_first.is_none() => {
                    let s = first.take().expect("primary pending");
                    if r.is_ok() {
                        if let Some(loser) = second.take() {
                            run.abandon(ctx, loser, "hedge_lost");
                        }
                        self.event(run, ctx, i, Some(j), delay, "won_primary");
                        return (run.finish(ctx, s, r), None);
                    }
                    failed_first = Some(run.finish(ctx, s, r));
                }
                r = &mut hedge, if failed_second.is_none() => {
                    let s = second.take().expect("hedge pending");
                    if r.is_ok() {
                        if let Some(loser) = first.take() {
                            run.abandon(ctx, loser, "hedge_lost");
                        }
                        self.event(run, ctx, i, Some(j), delay, "won_hedge");
                        return (run.finish(ctx, s, r), None);
                    }
                    failed_second = Some(run.finish(ctx, s, r));
                }
                _ = session.read_body_or_idle(true) => {
                    for s in [first.take(), second.take()].into_iter().flatten() {
                        run.abandon(ctx, s, "client_gone");
                    }
                    ctx.client_gone = true;
                    return (Step::ClientGone, None);
                }
            }
            if let (Some(_), Some(_)) = (&failed_first, &failed_second) {
                break;
            }
        }
        self.event(run, ctx, i, Some(j), delay, "both_failed");
        match (failed_first, failed_second) {
            (Some(a), Some(b)) => (a, Some((j, b))),
            _ => unreachable!("the loop ends when both failed"),
        }
    }

    fn event(
        &self,
        run: &Attempts<'_>,
        ctx: &RequestCtx,
        i: usize,
        j: Option<usize>,
        delay: Duration,
        outcome: &'static str,
    ) {
        let from = &run.plan.targets[i].target;
        let to = j.map(|j| &run.plan.targets[j].target);
        tracing::info!(
            target: "switchyard::hedge",
            event = "hedge",
            outcome,
            request_id = %ctx.request_id,
            route = %run.plan.budget_key,
            provider = %from.provider,
            model = %from.model,
            hedge_provider = to.map_or("", |t| t.provider.as_str()),
            hedge_model = to.map_or("", |t| t.model.as_str()),
            delay_ms = delay.as_millis() as u64,
            "hedged request"
        );
        run.app.metrics.hedge(&run.plan.budget_key, outcome);
    }
}

/// The primary alone, when no hedge could start.
async fn alone<F>(
    run: &Attempts<'_>,
    session: &mut ServerSession,
    ctx: &mut RequestCtx,
    primary: std::pin::Pin<&mut F>,
    first: Started,
) -> Step
where
    F: std::future::Future<Output = Result<super::dispatch::Answer, switchyard_llm::GatewayError>>,
{
    tokio::select! {
        r = primary => run.finish(ctx, first, r),
        _ = session.read_body_or_idle(true) => {
            run.abandon(ctx, first, "client_gone");
            ctx.client_gone = true;
            Step::ClientGone
        }
    }
}
