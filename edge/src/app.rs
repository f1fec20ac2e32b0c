//! The edge's Pingora application: one client request in, one answer out,
//! through the phases of [`crate::phases`].

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
// Tokio's timeout wakes its timer driver on another worker for each new
// deadline; Pingora's shares 10 ms ticks and wakes no one.
use pingora_timeout::fast_timeout::fast_timeout;
use switchyard_backhaul::{RequestObserver, SharedSnapshot, Upstream};
use switchyard_control::admin::Lifecycle;
use switchyard_proto::{Health, Snapshot};

use crate::cache::{CacheTee, ResponseCache};
use crate::ctx::RequestCtx;
use crate::guard::EdgeLimits;
use crate::hooks::{AdmitHook, Hooks, PlanHook, RecordHook, ResponseObserver};
use crate::limits::Limiter;
use crate::metrics::EdgeMetrics;
use crate::phases::admit::{self, Admitted};
use crate::phases::{dispatch, plan, record, respond, resume, Failure};
use crate::respond::Common;

pub struct EdgeApp {
    pub(crate) snapshot: SharedSnapshot,
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    /// Where this edge runs; stated on answers it gives itself.
    pub(crate) region: String,
    pub(crate) observer: Option<Arc<dyn RequestObserver>>,
    /// Honour `x-switchyard-simulate` for every provider (`switchyard dev`);
    /// otherwise only where the policy allows it per simulated provider.
    pub(crate) simulate_header: bool,
    pub(crate) limits: EdgeLimits,
    pub(crate) hooks: Hooks,
    /// Runtime health of targets, fed by every attempt and read by the
    /// planner; outlives snapshot swaps.
    pub(crate) health: Arc<Health>,
    /// Tenant and key limits and budgets; `None` = nothing enforced.
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// Exact-match answers for requests that opt in.
    pub(crate) cache: Option<Arc<ResponseCache>>,
    /// Readiness and requests in flight, for the admin listener and drains.
    pub(crate) lifecycle: Arc<Lifecycle>,
    server_options: HttpServerOptions,
}

impl EdgeApp {
    pub fn new(snapshot: SharedSnapshot, upstream: Arc<dyn Upstream>) -> Self {
        let health = Arc::new(Health::new());
        let metrics = Arc::new(EdgeMetrics::new());
        metrics.watch_health(health.clone());
        EdgeApp {
            snapshot,
            upstream,
            metrics,
            region: "local".to_string(),
            observer: None,
            simulate_header: false,
            limits: EdgeLimits::default(),
            hooks: Hooks::default(),
            health,
            limiter: None,
            cache: None,
            lifecycle: Lifecycle::new(),
            server_options: server_options(&EdgeLimits::default()),
        }
    }

    /// Reports every proxied request (e.g. to the control plane's scores).
    pub fn with_observer(mut self, observer: Arc<dyn RequestObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Runs at the end of `admit`, for every authenticated request; may
    /// refuse it (limits, budgets).
    pub fn with_admit_hook(mut self, hook: Arc<dyn AdmitHook>) -> Self {
        self.hooks.admit.push(hook);
        self
    }

    /// Sees every request's plan.
    pub fn with_plan_hook(mut self, hook: Arc<dyn PlanHook>) -> Self {
        self.hooks.plan.push(hook);
        self
    }

    /// Sees every answer from a target as it is written (usage, cache tee).
    pub fn with_response_observer(mut self, observer: Arc<dyn ResponseObserver>) -> Self {
        self.hooks.response.push(observer);
        self
    }

    /// Receives each request's one usage record (ledger).
    pub fn with_record_hook(mut self, hook: Arc<dyn RecordHook>) -> Self {
        self.hooks.record.push(hook);
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

    /// Enforces tenants' and virtual keys' limits and budgets with these
    /// counters (in memory, or shared through Redis).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        limiter.register(self.metrics.registry());
        self.limiter = Some(limiter);
        self
    }

    /// Serves requests that opt in (`x-switchyard-cache: use`) from this
    /// cache, and tees their answers into it.
    pub fn with_cache(mut self, cache: Arc<ResponseCache>) -> Self {
        cache.register(self.metrics.registry());
        self.hooks.response.push(Arc::new(CacheTee(cache.clone())));
        self.cache = Some(cache);
        self
    }

    /// Shares a health board (e.g. with the in-process egress of
    /// `switchyard dev`) instead of the edge's own.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.metrics.watch_health(health.clone());
        self.health = health;
        self
    }

    /// Shares a lifecycle (the node's): requests are counted in it, and a
    /// draining lifecycle closes each connection after its answer.
    pub fn with_lifecycle(mut self, lifecycle: Arc<Lifecycle>) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The runtime health board the planner reads.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    pub(crate) fn jurisdiction(&self, snap: &Snapshot) -> String {
        snap.regions()
            .get(&self.region)
            .and_then(|r| r.jurisdiction.clone())
            .unwrap_or_else(|| "unspecified".to_string())
    }

    /// Headers of an answer the edge gives itself.
    pub(crate) fn common<'a>(&'a self, request_id: &'a str, jurisdiction: &'a str) -> Common<'a> {
        Common {
            request_id,
            region: &self.region,
            jurisdiction,
        }
    }

    /// The edge's Prometheus metrics, for a [`crate::metrics::AdminApp`] listener.
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

impl EdgeApp {
    /// One request through its phases over `ctx`, in the order of pingora's
    /// `ProxyHttp`. A failing phase is answered in the caller's protocol;
    /// `record` runs exactly once whatever happened. Returns whether the
    /// connection may serve another request.
    async fn handle(&self, session: &mut ServerSession, ctx: &mut RequestCtx) -> bool {
        let snap = self.snapshot.load_full();
        // Each phase's future is boxed on its own: inline, they made this
        // one 12 KB, all of it held by every open stream although only the
        // answering phase (3 KB) is alive then. Boxed, a phase's state is
        // allocated while it runs and freed when it ends.
        let result: Result<(), Failure> = async {
            let request = match Box::pin(admit::admit(self, session, &snap, ctx)).await? {
                Admitted::Proxy(request) => request,
                Admitted::Answered => return Ok(()),
            };
            let (plan, outbound) = plan::plan(self, session, &snap, ctx, request)?;
            let resume = resume::Resume::prepare(self, &snap, &plan, &outbound);
            let answer = Box::pin(dispatch::dispatch(
                self, session, &snap, ctx, &plan, outbound,
            ))
            .await?;
            if let Some(answer) = answer {
                Box::pin(respond::respond(self, session, ctx, answer, resume)).await;
            }
            Ok(())
        }
        .await;
        let reusable = match result {
            Ok(()) => true,
            Err(failure) => Box::pin(respond::failure(self, session, &snap, ctx, failure)).await,
        };
        record::record(self, session, &snap, ctx);
        reusable
    }
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
        // Boxed, like the phases below: the header read's state is needed
        // only until the head is in, not for the life of a stream.
        match Box::pin(fast_timeout(
            self.limits.header_timeout,
            session.read_request(),
        ))
        .await
        {
            Ok(Ok(true)) => {}
            Ok(Ok(false) | Err(_)) | Err(_) => return None,
        }
        let received_at = Instant::now();
        // Counted until the answer's last byte: a drain waits for it.
        let _busy = self.lifecycle.busy();
        let draining = *shutdown.borrow() || self.lifecycle.is_draining();
        // The next request on this connection must start within the same
        // deadline (0 would mean "forever" to Pingora).
        let idle = self.limits.header_timeout.as_secs().max(1);
        session.set_keepalive(if draining { None } else { Some(idle) });
        session.set_read_timeout(Some(self.limits.body_timeout));
        // A client that closes its side mid-request has gone away: treat
        // EOF as abort so the provider call is cancelled, not left running.
        session.set_abort_on_close(true);
        let mut ctx = RequestCtx::new(admit::request_id(&session), received_at);
        if let Some(parent) = admit::traceparent(&session) {
            ctx.trace = parent.child();
            ctx.trace_parent = Some(parent);
        }
        // Boxed: the request's phases are a large state machine, and held
        // inline it would be allocated for every connection from accept on,
        // idle and half-open ones included.
        let reusable = Box::pin(self.handle(&mut session, &mut ctx)).await;
        if ctx.client_gone {
            return None;
        }
        let persistent = HttpPersistentSettings::for_session(&session);
        // Boxed too: Pingora's `finish` is a 3.7 KB state machine that,
        // inline, every open stream would carry from its first byte.
        match Box::pin(session.finish()).await {
            // A node that started draining during the answer closes the
            // connection after it, so the client reconnects to one that stays.
            Ok(Some(stream)) if reusable && !self.lifecycle.is_draining() => {
                Some(ReusedHttpStream::from_reusable_stream(stream, persistent))
            }
            _ => None,
        }
    }
}
