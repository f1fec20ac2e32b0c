//! What every role (edge, egress, control plane) tells its operator and
//! its orchestrator: the node's [`Lifecycle`] (ready, draining, work in
//! flight) and the admin listener that serves it.
//!
//! | path       | answer |
//! |------------|--------|
//! | `/healthz` | 200 while the process runs (liveness: a restart would not help otherwise) |
//! | `/readyz`  | 200 when the node takes new work; 503 before it is serving and from the moment it starts draining |
//! | `/metrics` | Prometheus text: the role's metrics plus `switchyard_ready`, `switchyard_draining`, `switchyard_in_flight` |
//! | `/status`, `/status.json` | control plane only: the fleet's status page ([`crate::status`]) |
//!
//! Readiness goes false first on SIGTERM so load balancers and Kubernetes
//! stop sending new work while the node finishes what it has; the listener
//! itself stays up until the very end of the drain, so probes keep getting
//! an answer. The listener lives in this crate because all three roles
//! depend on it and it already speaks HTTP (the operator API).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Where a node is in its life, shared by the parts that serve work (they
/// count it with [`Lifecycle::busy`]) and the admin listener.
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    registry: Registry,
    ready_gauge: IntGauge,
    draining_gauge: IntGauge,
    in_flight_gauge: IntGauge,
}

/// One unit of work (an edge request, an egress stream) counted for as long
/// as it lives; a drain waits for all of them.
pub struct Busy(Arc<Lifecycle>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight_gauge.dec();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        let registry =
            Registry::new_custom(Some("switchyard".into()), None).expect("metric registry");
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric");
            registry.register(Box::new(g.clone())).expect("register");
            g
        };
        let ready_gauge = gauge(
            "ready",
            "1 while the node takes new work (what /readyz says)",
        );
        let draining_gauge = gauge(
            "draining",
            "1 from the first SIGTERM until exit: no new work, in-flight work finishing",
        );
        let in_flight_gauge = gauge(
            "in_flight",
            "Work in progress: client requests on an edge, backhaul streams on an egress",
        );
        Arc::new(Lifecycle {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            registry,
            ready_gauge,
            draining_gauge,
            in_flight_gauge,
        })
    }

    /// The node serves: `/readyz` answers 200 (unless it is draining).
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.ready_gauge.set(i64::from(self.is_ready()));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    /// Readiness goes false for good. Returns `false` when the drain had
    /// already started.
    pub fn start_draining(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::AcqRel);
        self.draining_gauge.set(1);
        self.ready_gauge.set(0);
        first
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts one unit of work until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.in_flight_gauge.inc();
        Busy(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until nothing is in flight or `within` has passed; returns
    /// whether the node went idle.
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a last guard dropped in
            // between still wakes us.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }

    /// The lifecycle gauges, for a role's `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// `switchyard_snapshot_updates_total{result="ack|nack"}` of a node that
/// follows a control plane: versions it applied and rejected, read from
/// its agent at scrape time.
pub struct AgentMetrics {
    status: watch::Receiver<crate::node_client::AgentStatus>,
    updates: prometheus::IntCounterVec,
    applied: IntGauge,
    sync: std::sync::Mutex<()>,
}

impl AgentMetrics {
    pub fn new(status: watch::Receiver<crate::node_client::AgentStatus>) -> Self {
        let updates = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "snapshot_updates_total",
                "Snapshot versions this node applied and acknowledged (ack) or rejected (nack)",
            ),
            &["result"],
        )
        .expect("metric");
        let applied = IntGauge::new(
            "snapshot_applied_version",
            "Version of the last snapshot the node's agent applied from the control plane (0 = none yet)",
        )
        .expect("metric");
        AgentMetrics {
            status,
            updates,
            applied,
            sync: std::sync::Mutex::new(()),
        }
    }

    pub fn register(&self, registry: &Registry) {
        let _ = registry.register(Box::new(self.updates.clone()));
        let _ = registry.register(Box::new(self.applied.clone()));
    }

    /// Brings the counters up to the agent's (they only grow).
    pub fn update(&self) {
        let _guard = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.status.borrow().clone();
        for (label, now) in [("ack", s.acks), ("nack", s.nacks)] {
            let c = self.updates.with_label_values(&[label]);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
        self.applied.set(s.applied_version as i64);
    }
}

/// Renders registries as one Prometheus text page.
pub fn render(registries: &[&Registry]) -> Vec<u8> {
    let families: Vec<_> = registries.iter().flat_map(|r| r.gather()).collect();
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&families, &mut out);
    out
}

/// How a role renders its `/metrics` page (it may need to ask a store).
pub type MetricsFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> + Send + Sync>;

/// A page a role adds to its admin listener (the control plane's status
/// page).
pub struct AdminPage {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// An admin page being produced.
pub type PageFuture = Pin<Box<dyn Future<Output = AdminPage> + Send>>;

/// The pages a role adds: `None` for a path it does not serve.
pub type PagesFn = Arc<dyn Fn(&str) -> Option<PageFuture> + Send + Sync>;

/// Status, content type and body of an admin request; shared by this
/// crate's listener and the edge's (a Pingora service, so it is handed to a
/// new process with the client listeners on a graceful upgrade).
pub async fn answer(
    path: &str,
    lifecycle: &Lifecycle,
    metrics: &MetricsFn,
) -> (u16, &'static str, Vec<u8>) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/healthz" => (200, TEXT, b"ok\n".to_vec()),
        "/readyz" if lifecycle.is_ready() => (200, TEXT, b"ready\n".to_vec()),
        "/readyz" if lifecycle.is_draining() => (503, TEXT, b"draining\n".to_vec()),
        "/readyz" => (503, TEXT, b"starting\n".to_vec()),
        "/metrics" => {
            let mut body = metrics().await;
            body.extend(render(&[lifecycle.registry()]));
            (200, "text/plain; version=0.0.4", body)
        }
        _ => (404, TEXT, b"not found\n".to_vec()),
    }
}

/// A bound admin listener, not serving yet.
pub struct AdminListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl AdminListener {
    /// Binds `addr` (port 0 picks one). Call inside the runtime that serves it.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(AdminListener { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` turns true. Probes are tiny: one connection
    /// gets 10 s, and the listener takes at most 64 at once.
    pub fn serve(
        self,
        lifecycle: Arc<Lifecycle>,
        metrics: MetricsFn,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        self.serve_with_pages(lifecycle, metrics, None, stop)
    }

    /// [`Self::serve`] with the role's own pages next to the probes.
    pub fn serve_with_pages(
        self,
        lifecycle: Arc<Lifecycle>,
        metrics: MetricsFn,
        pages: Option<PagesFn>,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let slots = Arc::new(tokio::sync::Semaphore::new(64));
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                    r = self.listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let (lifecycle, metrics, pages) =
                    (lifecycle.clone(), metrics.clone(), pages.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (lifecycle, metrics) = (lifecycle.clone(), metrics.clone());
                        let page = pages.as_ref().and_then(|p| p(req.uri().path()));
                        async move {
                            let page = match page {
                                Some(page) => page.await,
                                None => {
                                    let (status, content_type, body) =
                                        answer(req.uri().path(), &lifecycle, &metrics).await;
                                    AdminPage {
                                        status,
                                        content_type,
                                        headers: Vec::new(),
                                        body,
                                    }
                                }
                            };
                            let mut response = Response::builder()
                                .status(StatusCode::from_u16(page.status).unwrap_or(StatusCode::OK))
                                .header("content-type", page.content_type);
                            for (name, value) in page.headers {
                                response = response.header(name, value);
                            }
                            let response = response
                                .body(Full::new(Bytes::from(page.body)))
                                .expect("valid response");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(TokioIo::new(stream), svc);
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_metrics() -> MetricsFn {
        Arc::new(|| Box::pin(async { Vec::new() }))
    }

    #[tokio::test]
    async fn readiness_follows_the_lifecycle() {
        let l = Lifecycle::new();
        let m = no_metrics();
        assert_eq!(answer("/healthz", &l, &m).await.0, 200);
        assert_eq!(answer("/readyz", &l, &m).await.0, 503, "not serving yet");
        l.mark_ready();
        assert_eq!(answer("/readyz", &l, &m).await.0, 200);
        assert!(l.start_draining());
        assert!(!l.start_draining(), "a second signal does not restart it");
        let (status, _, body) = answer("/readyz", &l, &m).await;
        assert_eq!((status, body.as_slice()), (503, b"draining\n".as_slice()));
        assert_eq!(answer("/healthz", &l, &m).await.0, 200, "still alive");
        let text = String::from_utf8(answer("/metrics", &l, &m).await.2).unwrap();
        assert!(text.contains("switchyard_draining 1"), "{text}");
        assert!(text.contains("switchyard_ready 0"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_work_in_flight() {
        let l = Lifecycle::new();
        assert!(l.wait_idle(Duration::from_secs(1)).await, "idle at once");
        let first = l.busy();
        let second = l.busy();
        assert_eq!(l.in_flight(), 2);
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.wait_idle(Duration::from_secs(60)).await })
        };
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "one is still running");
        drop(second);
        assert!(waiter.await.unwrap());
        let _stuck = l.busy();
        assert!(
            !l.wait_idle(Duration::from_secs(5)).await,
            "the grace period bounds the wait"
        );
    }
}
