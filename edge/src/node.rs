//! The edge node as a library: [`EdgeNode`] assembles what `switchyard
//! edge` and `switchyard dev` run (snapshot, node agent and telemetry,
//! the upstream: QUIC backhaul or the in-process egress, the listeners)
//! and returns a [`RunningEdge`] with its bound addresses and `shutdown()`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_backhaul::node::NodeError> {
//! use switchyard_backhaul::node::PolicySource;
//! use switchyard_edge::node::EdgeNode;
//!
//! let edge = EdgeNode::single_node()
//!     .policy(PolicySource::File("policy.yaml".into()))
//!     .listen("127.0.0.1:0")
//!     .start()
//!     .await?;
//! println!("http://{}/v1", edge.local_addr().unwrap());
//! edge.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Listeners are bound here, before Pingora sees them, and handed over as
//! already-listening sockets (Pingora's graceful-upgrade path): so port 0
//! works, the real address is known at once, and a port in use is an error
//! from `start()` instead of a panic inside a Pingora runtime. The Pingora
//! services run on a runtime of the node's own, not under `pingora::Server`,
//! whose `run` owns the process's signals and never returns to a test.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::server::{Fds, ListenFds, ShutdownWatch};
use pingora::services::Service as PingoraService;
use switchyard_backhaul::node::{
    node_runtime, reload_policy_file, run_on, single_process, stop_runtime,
    wait_for_first_snapshot, ControlLink, NodeError, NodeTlsFiles, PolicySource, WatchedFile,
    WatchedTls,
};
use switchyard_backhaul::tunnel::{
    EgressDirectory, NodeTls, StaticDirectory, TunnelConfig, TunnelRouter,
};
use switchyard_backhaul::{Egress, RequestObserver, RequestReport, Upstream};
use switchyard_control::admin::{Lifecycle, MetricsFn};
use switchyard_control::node_client::{NodeAgent, Role};
use switchyard_control::telemetry::{RequestRecord, TelemetryHandle};
use switchyard_control::{compile, compile_for_edge, PolicyDocument};
use switchyard_proto::{KeyHash, Snapshot, TenantSnapshot};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::EdgeApp;
use crate::cache::ResponseCache;
use crate::guard::EdgeLimits;
use crate::hooks::RecordHook;
use crate::ledger::LedgerHook;
use crate::limits::{Limiter, RedisLink};
use crate::metrics::{AdminApp, EdgeMetrics};
use crate::service::{admin_service, edge_service, ListenerTls, TlsFiles};

/// How the whole stack waits for the first backhaul connections at start.
const BACKHAUL_WARM_UP: Duration = Duration::from_secs(5);
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);
/// What in-flight connections get after `shutdown()` (the old
/// `graceful_shutdown_timeout_seconds`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a request waits for the shared limit counters before its
/// tenant's fail-open/fail-closed choice applies.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Memory the exact-match response cache may hold (requests opt in).
const RESPONSE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

enum Mode {
    /// The egress logic in this process (`switchyard dev`).
    SingleNode,
    /// Egress nodes over the QUIC backhaul (`switchyard edge`).
    Backhaul {
        region: String,
        tls: NodeTls,
        egress: Vec<(String, String)>,
    },
}

/// Builds an edge node; see the module docs.
pub struct EdgeNode {
    mode: Mode,
    policy: PolicySource,
    control: Option<ControlLink>,
    listen: Option<String>,
    tls_listen: Option<(String, TlsFiles)>,
    admin_listen: Option<String>,
    node_tls_files: Option<NodeTlsFiles>,
    upgrade_from: Option<PathBuf>,
    threads: usize,
    limits: EdgeLimits,
    simulate_header: bool,
    tenants: Vec<(KeyHash, TenantSnapshot)>,
    redis: Option<String>,
    /// Single-node mode: the region this edge says it runs in.
    single_region: Option<String>,
    record_hooks: Vec<Arc<dyn RecordHook>>,
    otlp: Option<String>,
}

impl EdgeNode {
    fn with_mode(mode: Mode) -> Self {
        EdgeNode {
            mode,
            policy: PolicySource::None,
            control: None,
            listen: None,
            tls_listen: None,
            admin_listen: None,
            node_tls_files: None,
            upgrade_from: None,
            threads: 2,
            limits: EdgeLimits::default(),
            simulate_header: false,
            tenants: Vec::new(),
            redis: None,
            single_region: None,
            record_hooks: Vec::new(),
            otlp: None,
        }
    }

    /// Exports spans (each request, each attempt; in single-node mode each
    /// provider call too) over OTLP/HTTP to this collector
    /// (`http://collector:4318`); off by default.
    pub fn otlp(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp = Some(endpoint.into());
        self
    }

    /// Every role in one process: the edge calls the egress logic directly,
    /// with provider keys from this process's environment.
    pub fn single_node() -> Self {
        Self::with_mode(Mode::SingleNode)
    }

    /// An edge in `region` sending requests over the QUIC backhaul with
    /// this node identity. Its snapshot never holds provider keys.
    pub fn backhaul(region: impl Into<String>, tls: NodeTls) -> Self {
        Self::with_mode(Mode::Backhaul {
            region: region.into(),
            tls,
            egress: Vec::new(),
        })
    }

    /// An egress node in addition to the policy's `regions.R.egress`
    /// (backhaul mode only; ignored in single-node mode).
    pub fn egress(mut self, region: impl Into<String>, addr: impl Into<String>) -> Self {
        if let Mode::Backhaul { egress, .. } = &mut self.mode {
            egress.push((region.into(), addr.into()));
        }
        self
    }

    pub fn policy(mut self, source: PolicySource) -> Self {
        self.policy = source;
        self
    }

    pub fn control_plane(mut self, link: ControlLink) -> Self {
        self.control = Some(link);
        self
    }

    /// Plain-HTTP listen address (`127.0.0.1:0` picks a free port).
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = Some(addr.into());
        self
    }

    /// HTTPS listen address with its certificate.
    pub fn tls(mut self, addr: impl Into<String>, files: TlsFiles) -> Self {
        self.tls_listen = Some((addr.into(), files));
        self
    }

    /// Admin listener: `/healthz`, `/readyz` (false once draining) and
    /// `/metrics` (see [`switchyard_control::admin`]).
    pub fn admin(mut self, addr: impl Into<String>) -> Self {
        self.admin_listen = Some(addr.into());
        self
    }

    /// The admin listener under its old name (it served only `/metrics`).
    pub fn metrics(self, addr: impl Into<String>) -> Self {
        self.admin(addr)
    }

    /// Takes the listening sockets from the edge running now instead of
    /// binding them (graceful upgrade): it sends them to `socket` when told
    /// ([`RunningEdge::hand_over`]), and no connection is refused meanwhile.
    pub fn upgrade_from(mut self, socket: impl Into<PathBuf>) -> Self {
        self.upgrade_from = Some(socket.into());
        self
    }

    /// Where the backhaul identity came from: [`RunningEdge::reload`]
    /// reloads it when these files change.
    pub fn node_tls_files(mut self, files: NodeTlsFiles) -> Self {
        self.node_tls_files = Some(files);
        self
    }

    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    pub fn limits(mut self, limits: EdgeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Honour `x-switchyard-simulate` (development only).
    pub fn simulate_header(mut self, on: bool) -> Self {
        self.simulate_header = on;
        self
    }

    /// A tenant added to every snapshot loaded at start (the dev key).
    pub fn tenant(mut self, key: KeyHash, tenant: TenantSnapshot) -> Self {
        self.tenants.push((key, tenant));
        self
    }

    /// The region a single-node edge runs in (backhaul edges take it from
    /// [`Self::backhaul`]): its jurisdiction decides which tenants it may
    /// serve at all (`edge_residency`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        match &mut self.mode {
            Mode::SingleNode => self.single_region = Some(region.into()),
            Mode::Backhaul { region: r, .. } => *r = region.into(),
        }
        self
    }

    /// Another receiver of every request's usage record (besides the
    /// ledger, which a node following a control plane gets by itself).
    pub fn record_hook(mut self, hook: Arc<dyn RecordHook>) -> Self {
        self.record_hooks.push(hook);
        self
    }

    /// Shares tenants' limit and budget counters with every other edge
    /// through the Redis at `url` (`redis://host:port`); without it each
    /// edge counts in memory within the share the control plane leases it.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// [`Self::bind`], then [`BoundEdge::serve`]. May be awaited from any runtime.
    pub async fn start(self) -> Result<RunningEdge, NodeError> {
        Ok(self.bind().await?.serve())
    }

    /// Loads the snapshot, starts the agent and the upstream and binds
    /// every listener, without accepting yet: the caller can announce the
    /// addresses (a start-up banner) before the first client gets in.
    pub async fn bind(self) -> Result<BoundEdge, NodeError> {
        let preparer = Preparer {
            backhaul: matches!(self.mode, Mode::Backhaul { .. }),
            tenants: self.tenants,
        };
        // A static policy file is reloaded on change; one from a control
        // plane is replaced by its snapshots instead.
        let policy_file = match (&self.policy, &self.control) {
            (PolicySource::File(path), None) => Some(WatchedFile::new(path)),
            _ => None,
        };
        let compiled = self.policy.compile(|doc| preparer.compile(doc))?;
        let (snapshot, provider_status) = compiled
            .map(|c| (c.snapshot, c.provider_status))
            .unwrap_or_default();
        let snapshot = preparer.finish(snapshot);
        let shared = Arc::new(ArcSwap::from_pointee(snapshot));
        let listener_tls = match &self.tls_listen {
            Some((_, files)) => Some(Arc::new(ListenerTls::load(files.clone()).map_err(|e| {
                NodeError::Service {
                    what: "edge",
                    message: e.to_string(),
                }
            })?)),
            None => None,
        };

        // Listening sockets handed over by the process this one replaces
        // (graceful upgrade); addresses it had are taken from it, not bound.
        let mut inherited = match &self.upgrade_from {
            Some(path) => receive_listeners(path.clone()).await?,
            None => HashMap::new(),
        };
        let mut bind = |addr: &str| bind(addr, &mut inherited);
        // Bound first, so a taken port fails here and port 0 has an answer.
        let plain = self.listen.as_deref().map(&mut bind).transpose()?;
        let tls = match &self.tls_listen {
            Some((addr, files)) => Some((bind(addr)?, files)),
            None => None,
        };
        let metrics = self.admin_listen.as_deref().map(&mut bind).transpose()?;
        {
            // Not listening yet, two sockets with SO_REUSEADDR may share an
            // address; only one of them could ever listen.
            let mut seen = Vec::new();
            let addrs = [&plain, &metrics]
                .into_iter()
                .flatten()
                .map(|(a, _)| *a)
                .chain(tls.as_ref().map(|((a, _), _)| *a));
            for a in addrs {
                if seen.contains(&a) {
                    return Err(NodeError::Bind {
                        addr: a.to_string(),
                        source: std::io::ErrorKind::AddrInUse.into(),
                    });
                }
                seen.push(a);
            }
        }

        let exporter = match &self.otlp {
            Some(endpoint) => {
                let service = match (&self.control, &self.mode) {
                    (Some(c), _) if c.node_id.is_some() => c.node_id.clone().unwrap_or_default(),
                    (_, Mode::Backhaul { region, .. }) => format!("edge-{region}"),
                    _ => "switchyard-dev".to_string(),
                };
                Some(
                    switchyard_backhaul::otlp::Exporter::start(endpoint, &service).map_err(
                        |e| NodeError::Service {
                            what: "otlp",
                            message: e.to_string(),
                        },
                    )?,
                )
            }
            None => None,
        };
        // One runtime for the whole node: the backhaul's quinn drivers and
        // agent share the request tasks' threads, so a request's stream
        // writes and reads wake no thread of another runtime.
        let mut rt = NodeRuntime(Some(node_runtime("edge", self.threads)?));
        let mut backhaul = None;
        let mut router = None;
        let upstream: Arc<dyn Upstream>;
        let health = Arc::new(switchyard_proto::Health::new());
        let region;
        let mut ledger = None;
        let mut egress_nodes = Vec::new();
        match self.mode {
            Mode::SingleNode => {
                // One board: the edge's metrics show the egress's key events.
                // The egress is this process: its ledger name says so.
                let name = format!("local-{}", self.single_region.as_deref().unwrap_or("dev"));
                upstream = Arc::new(
                    Egress::sharing_edge_health(shared.clone(), health.clone())?
                        .with_node_name(&name)
                        .with_otlp(exporter.clone()),
                );
                region = self.single_region.clone();
            }
            Mode::Backhaul {
                region: r,
                tls: node_tls,
                egress,
            } => {
                let started = run_on(
                    rt.get(),
                    start_backhaul(r.clone(), node_tls, egress, self.control, shared.clone()),
                )
                .await;
                let parts = match started {
                    Ok(Ok(parts)) => parts,
                    Ok(Err(e)) | Err(e) => {
                        rt.stop().await;
                        return Err(e);
                    }
                };
                router = Some(parts.router.clone());
                upstream = parts.router;
                ledger = parts.ledger;
                egress_nodes = parts.egress_nodes;
                if let Some(agent) = &parts.agent {
                    // Ejected and demoted targets, for the status page.
                    let (shared, health) = (shared.clone(), health.clone());
                    agent.report_health(Arc::new(move || {
                        switchyard_control::telemetry::health_report(&shared.load(), &health, false)
                    }));
                }
                backhaul = Some(Backhaul {
                    agent: parts.agent,
                    observer: parts.observer,
                });
                region = Some(r);
            }
        }

        let redis = match &self.redis {
            Some(url) => {
                Some(
                    RedisLink::new(url, REDIS_TIMEOUT).map_err(|e| NodeError::Service {
                        what: "limits",
                        message: format!("--redis: {e}"),
                    })?,
                )
            }
            None => None,
        };
        let (limiter, cache) = match redis {
            Some(link) => (
                Limiter::shared(link.clone()),
                ResponseCache::with_redis(RESPONSE_CACHE_BYTES, link),
            ),
            None => (Limiter::local(), ResponseCache::new(RESPONSE_CACHE_BYTES)),
        };
        let lifecycle = Lifecycle::new();
        let mut app = EdgeApp::new(shared.clone(), upstream)
            .with_health(health)
            .with_simulate_header(self.simulate_header)
            .with_limits(self.limits)
            .with_limiter(Arc::new(limiter))
            .with_cache(cache.clone())
            .with_lifecycle(lifecycle.clone());
        if let Some(r) = &region {
            app = app.with_region(r.clone());
        }
        if let Some(observer) = backhaul.as_ref().and_then(|b| b.observer.clone()) {
            app = app.with_observer(observer);
        }
        if let Some(ledger) = ledger {
            let hook = LedgerHook::new(ledger, app.metrics().registry());
            app = app.with_record_hook(Arc::new(hook));
        }
        for hook in self.record_hooks {
            app = app.with_record_hook(hook);
        }
        if let Some(exporter) = exporter {
            app = app.with_record_hook(Arc::new(crate::otlp::OtlpHook::new(exporter)));
        }
        let edge_metrics = app.metrics();

        // An inherited socket nobody here listens on would take connections
        // and never answer them: it closes as it is dropped.
        for addr in inherited.into_keys() {
            tracing::warn!(target: "switchyard::lifecycle", %addr, "an inherited listener is not in this configuration; closed");
        }
        // Every listening socket by address, for handing over in the next
        // upgrade. The edge's own sockets stay owned by its listeners (the
        // table keeps their numbers); the admin socket's is Pingora's.
        let fds: ListenFds = Arc::new(parking_lot::Mutex::new(Fds::new()));
        let plain_addr = plain.as_ref().map(|(a, _)| *a);
        let tls_addr = tls.as_ref().map(|((a, _), _)| *a);
        let metrics_addr = metrics.as_ref().map(|(a, _)| *a);
        for (addr, socket) in plain.iter().chain(tls.as_ref().map(|(l, _)| l)) {
            fds.lock().add(addr.to_string(), socket.as_raw_fd());
        }
        if let Some((addr, socket)) = metrics {
            fds.lock().add(addr.to_string(), socket.into_raw_fd());
        }
        let service = edge_service(
            app,
            plain,
            tls.map(|(l, _)| l).zip(listener_tls.clone()),
            self.threads,
        )
        .map_err(|e| NodeError::Service {
            what: "edge",
            message: e.to_string(),
        })?;

        let pending: Vec<Box<dyn PingoraService>> = vec![Box::new(service)];
        let admin_pending = metrics_addr.map(|addr| {
            let app = AdminApp {
                lifecycle: lifecycle.clone(),
                metrics: edge_metrics_page(
                    edge_metrics,
                    shared.clone(),
                    router.clone(),
                    backhaul
                        .as_ref()
                        .and_then(|b| b.agent.as_ref())
                        .map(|a| a.watch_status()),
                ),
            };
            Box::new(admin_service(app, &addr.to_string())) as Box<dyn PingoraService>
        });
        let (shutdown_tx, _) = watch::channel(false);
        let (admin_shutdown_tx, _) = watch::channel(false);
        let node_tls = self.node_tls_files.map(WatchedTls::new);
        Ok(BoundEdge {
            edge: RunningEdge {
                plain_addr,
                tls_addr,
                metrics_addr,
                region,
                shared,
                provider_status,
                egress_nodes,
                shutdown_tx,
                admin_shutdown_tx,
                services: Vec::new(),
                admin_services: Vec::new(),
                rt: rt.0.take(),
                backhaul,
                cache,
                lifecycle,
                reload: Reload {
                    preparer,
                    policy_file,
                    listener_tls,
                    node_tls,
                    router,
                },
                listen_fds: fds.clone(),
            },
            pending,
            admin_pending,
            fds,
        })
    }
}

/// Turns a policy document into what this edge serves, at start and on
/// every reload alike.
struct Preparer {
    backhaul: bool,
    /// Added to every snapshot (the dev key).
    tenants: Vec<(KeyHash, TenantSnapshot)>,
}

impl Preparer {
    fn compile(
        &self,
        doc: PolicyDocument,
    ) -> Result<switchyard_control::Compiled, Vec<switchyard_control::PolicyError>> {
        let env = |k: &str| std::env::var(k).ok();
        if self.backhaul {
            compile_for_edge(doc, &single_process(&env))
        } else {
            compile(&doc, &single_process(&env))
        }
    }

    fn finish(&self, snapshot: Snapshot) -> Snapshot {
        if !self.backhaul && self.tenants.is_empty() {
            return snapshot;
        }
        let mut parts = snapshot.into_builder();
        if self.backhaul {
            // Whatever the source, an edge holds no key material.
            for p in parts.providers.values_mut() {
                if !p.keys.is_empty() || !p.key_pools.is_empty() {
                    let p = Arc::make_mut(p);
                    p.keys.clear();
                    p.key_pools.clear();
                }
            }
        }
        for (key, tenant) in &self.tenants {
            parts.tenants.insert(*key, Arc::new(tenant.clone()));
        }
        parts.build()
    }
}

/// What [`RunningEdge::reload`] looks at.
struct Reload {
    preparer: Preparer,
    policy_file: Option<WatchedFile>,
    listener_tls: Option<Arc<ListenerTls>>,
    node_tls: Option<WatchedTls>,
    router: Option<Arc<TunnelRouter>>,
}

/// The edge's `/metrics`: request metrics, the snapshot version and the
/// state of every backhaul connection (the lifecycle's gauges are added by
/// the admin listener).
fn edge_metrics_page(
    metrics: Arc<EdgeMetrics>,
    shared: Arc<ArcSwap<Snapshot>>,
    router: Option<Arc<TunnelRouter>>,
    agent_status: Option<
        tokio::sync::watch::Receiver<switchyard_control::node_client::AgentStatus>,
    >,
) -> MetricsFn {
    use prometheus::{GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};
    let agent = agent_status.map(switchyard_control::admin::AgentMetrics::new);
    let rtt = GaugeVec::new(
        Opts::new(
            "backhaul_rtt_seconds",
            "QUIC's smoothed round-trip time to each connected egress node",
        ),
        &["region", "egress"],
    )
    .expect("metric");
    let streams = IntGaugeVec::new(
        Opts::new(
            "backhaul_streams_open",
            "Requests in flight on the backhaul to each egress node (one QUIC stream each)",
        ),
        &["region", "egress"],
    )
    .expect("metric");
    let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
    let version =
        IntGauge::new("snapshot_version", "Version of the snapshot being served").expect("metric");
    let connected = IntGaugeVec::new(
        Opts::new(
            "backhaul_connected",
            "1 while the backhaul connection to this egress node is up and not draining",
        ),
        &["region", "egress"],
    )
    .expect("metric");
    let ejected = IntGaugeVec::new(
        Opts::new(
            "backhaul_ejected",
            "1 while this egress node's breaker is open or half-open (its streams kept failing at the transport level)",
        ),
        &["region", "egress"],
    )
    .expect("metric");
    for g in [&connected, &streams] {
        registry.register(Box::new(g.clone())).expect("register");
    }
    registry.register(Box::new(rtt.clone())).expect("register");
    if let Some(a) = &agent {
        a.register(&registry);
    }
    registry
        .register(Box::new(ejected.clone()))
        .expect("register");
    registry
        .register(Box::new(version.clone()))
        .expect("register");
    Arc::new(move || {
        let snap = shared.load();
        version.set(snap.version() as i64);
        metrics.update_keys(&snap);
        if let Some(a) = &agent {
            a.update();
        }
        // Bounded by the policy's providers.
        for p in snap.providers().keys() {
            metrics.init_provider(p);
        }
        if let Some(router) = &router {
            // Reset first: an egress removed from the policy leaves the page.
            connected.reset();
            for (region, addr, up, draining) in router.egress_states() {
                connected
                    .with_label_values(&[region.as_str(), addr.as_str()])
                    .set(i64::from(up && !draining));
            }
            ejected.reset();
            for (region, addr) in router.ejected_egress() {
                ejected
                    .with_label_values(&[region.as_str(), addr.as_str()])
                    .set(1);
            }
            rtt.reset();
            for (region, addr, d) in router.rtts() {
                rtt.with_label_values(&[region.as_str(), addr.as_str()])
                    .set(d.as_secs_f64());
            }
            streams.reset();
            for (region, addr, n) in router.streams_open() {
                streams
                    .with_label_values(&[region.as_str(), addr.as_str()])
                    .set(n as i64);
            }
        }
        let page = switchyard_control::admin::render(&[metrics.registry(), &registry]);
        Box::pin(async move { page })
    })
}

/// An edge whose sockets are bound but not accepting yet; its addresses
/// and snapshot are known (through `Deref`). Dropping it stops the node.
pub struct BoundEdge {
    edge: RunningEdge,
    pending: Vec<Box<dyn PingoraService>>,
    admin_pending: Option<Box<dyn PingoraService>>,
    fds: ListenFds,
}

impl std::ops::Deref for BoundEdge {
    type Target = RunningEdge;

    fn deref(&self) -> &RunningEdge {
        &self.edge
    }
}

impl BoundEdge {
    /// Starts the Pingora services on the node's runtime: from here on
    /// clients are accepted.
    pub fn serve(self) -> RunningEdge {
        let BoundEdge {
            mut edge,
            pending,
            admin_pending,
            fds,
        } = self;
        if let Some(rt) = &edge.rt {
            for mut service in pending {
                let fds = fds.clone();
                let shutdown: ShutdownWatch = edge.shutdown_tx.subscribe();
                edge.services.push(rt.spawn(async move {
                    service.start_service(Some(fds), shutdown, 1).await;
                }));
            }
            // The admin listener has a stop signal of its own: it answers
            // `/readyz` (503) until the very end of a drain.
            if let Some(mut service) = admin_pending {
                let fds = fds.clone();
                let shutdown: ShutdownWatch = edge.admin_shutdown_tx.subscribe();
                edge.admin_services.push(rt.spawn(async move {
                    service.start_service(Some(fds), shutdown, 1).await;
                }));
            }
        }
        edge.lifecycle.mark_ready();
        edge
    }
}

/// Binds a socket, not listening yet: connections are refused until
/// [`BoundEdge::serve`] starts its listener. An address found in
/// `inherited` (a graceful upgrade) is not bound: the inherited socket,
/// already listening, is taken.
fn bind(
    addr: &str,
    inherited: &mut HashMap<String, OwnedFd>,
) -> Result<(SocketAddr, TcpSocket), NodeError> {
    let failed = |source| NodeError::Bind {
        addr: addr.to_string(),
        source,
    };
    let resolved = addr
        .to_socket_addrs()
        .map_err(failed)?
        .next()
        .ok_or_else(|| {
            failed(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address",
            ))
        })?;
    if let Some(fd) = inherited.remove(&resolved.to_string()) {
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        return Ok((resolved, socket));
    }
    let socket = match resolved {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(failed)?;
    // As Pingora does: a restart must not wait out old connections' TIME_WAIT.
    socket.set_reuseaddr(true).map_err(failed)?;
    socket.bind(resolved).map_err(failed)?;
    let local = socket.local_addr().map_err(failed)?;
    Ok((local, socket))
}

/// Waits (about 6 s, as Pingora's sender does) for the running edge to send
/// its listening sockets to `path` (`switchyard edge --upgrade`, then
/// SIGQUIT to the old process).
///
/// Pingora's wire format (the addresses, space-separated, as the data; the
/// sockets in the same order as `SCM_RIGHTS`), read here so that each
/// socket arrives owned: Pingora's reader hands out bare descriptor
/// numbers, which only `unsafe` code could take over.
async fn receive_listeners(path: PathBuf) -> Result<HashMap<String, OwnedFd>, NodeError> {
    let failed = |message: String| NodeError::Service {
        what: "upgrade",
        message,
    };
    tokio::task::spawn_blocking(move || {
        let name = path.display().to_string();
        let received = receive_fds(&path)
            .map_err(|e| failed(format!("no listening sockets received on {name}: {e}")))?;
        tracing::info!(target: "switchyard::lifecycle", socket = %name,
            listeners = ?received.keys().collect::<Vec<_>>(),
            "took over the listening sockets of the running edge");
        Ok(received)
    })
    .await
    .map_err(|_| NodeError::Interrupted)?
}

fn receive_fds(path: &Path) -> std::io::Result<HashMap<String, OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::io::{Error, ErrorKind, IoSliceMut};
    use std::mem::MaybeUninit;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    // Pingora's limits: 32 sockets, 2 KiB of addresses.
    const MAX_FDS: usize = 32;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Made before any change of user, as Pingora's is.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::new(ErrorKind::TimedOut, "nothing was sent"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(6)))?;
    let mut names = [0u8; 2048];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &conn,
        &mut [IoSliceMut::new(&mut names)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let _ = std::fs::remove_file(path);
    let names = std::str::from_utf8(&names[..got.bytes])
        .map_err(|_| Error::new(ErrorKind::InvalidData, "addresses are not UTF-8"))?;
    let names: Vec<&str> = names.split_ascii_whitespace().collect();
    if names.len() != fds.len() {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("{} addresses for {} sockets", names.len(), fds.len()),
        ));
    }
    Ok(names.into_iter().map(String::from).zip(fds).collect())
}

struct BackhaulParts {
    router: Arc<TunnelRouter>,
    ledger: Option<switchyard_control::ledger::Ledger>,
    agent: Option<NodeAgent>,
    observer: Option<Arc<dyn RequestObserver>>,
    egress_nodes: Vec<(String, Vec<String>)>,
}

/// The edge's side of the backhaul and of the control plane. Runs on the
/// node's runtime, where Pingora's services run too.
async fn start_backhaul(
    region: String,
    tls: NodeTls,
    flags: Vec<(String, String)>,
    control: Option<ControlLink>,
    shared: Arc<ArcSwap<Snapshot>>,
) -> Result<BackhaulParts, NodeError> {
    let agent = match &control {
        Some(link) => {
            let agent = link.start_agent(Role::Edge, &region, &shared)?;
            wait_for_first_snapshot(&shared, FIRST_SNAPSHOT_WAIT).await;
            Some(agent)
        }
        None => None,
    };
    let directory_of = move |snap: &Snapshot| {
        let mut d = StaticDirectory::from_snapshot(snap);
        for (region, addr) in &flags {
            d.add(region, addr);
        }
        d
    };
    let directory = directory_of(&shared.load());
    let router = TunnelRouter::start(
        TunnelConfig {
            region: region.clone(),
            tls,
        },
        &directory,
        shared.clone(),
    )?;
    let (up, total) = router.wait_connected(BACKHAUL_WARM_UP).await;
    tracing::info!(target: "switchyard::backhaul", up, total, "backhaul warm-up done");

    // New snapshots may move egress nodes; the router follows them, and the
    // measured backhaul RTTs flow to the control plane's latency scores.
    {
        let shared = shared.clone();
        let router = router.clone();
        let telemetry = agent.as_ref().map(|a| a.telemetry());
        tokio::spawn(async move {
            let mut seen = shared.load().version();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let snap = shared.load_full();
                if snap.version() != seen {
                    seen = snap.version();
                    router.reconcile(&directory_of(&snap));
                }
                if let Some(t) = &telemetry {
                    for (region, addr, rtt) in router.rtts() {
                        t.record_rtt(&region, &addr, rtt);
                    }
                }
            }
        });
    }
    let observer = agent.as_ref().map(|a| {
        Arc::new(TelemetryObserver {
            handle: a.telemetry(),
            snapshot: shared.clone(),
        }) as Arc<dyn RequestObserver>
    });
    Ok(BackhaulParts {
        ledger: agent.as_ref().map(|a| a.ledger()),
        router,
        agent,
        observer,
        egress_nodes: directory.regions().into_iter().collect(),
    })
}

/// Feeds the edge's per-request reports to the control plane's telemetry.
struct TelemetryObserver {
    handle: TelemetryHandle,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl RequestObserver for TelemetryObserver {
    fn observe(&self, r: RequestReport) {
        let cost_usd = self
            .snapshot
            .load()
            .providers()
            .get(&r.provider)
            .and_then(|p| p.pricing.get(&r.model))
            .map(|price| price.cost(r.prompt_tokens, r.completion_tokens))
            .unwrap_or(0.0);
        self.handle.record(RequestRecord {
            provider: r.provider,
            model: r.model,
            region: r.region,
            ttft: r.ttft,
            latency: r.latency,
            error_class: r.error_class.map(str::to_string),
            input_tokens: r.prompt_tokens,
            output_tokens: r.completion_tokens,
            cost_usd,
        });
    }
}

struct Backhaul {
    agent: Option<NodeAgent>,
    observer: Option<Arc<dyn RequestObserver>>,
}

impl Backhaul {
    /// Stops the agent, on the node's runtime where its tasks live.
    async fn stop(self, rt: &tokio::runtime::Runtime) {
        if let Some(agent) = self.agent {
            let _ = run_on(rt, agent.shutdown()).await;
        }
    }
}

/// The node's runtime while it is being started: an error path drops it
/// inside async code, where a runtime may only be let go, not waited for.
struct NodeRuntime(Option<tokio::runtime::Runtime>);

impl NodeRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("taken only when the node is built")
    }

    async fn stop(&mut self) {
        if let Some(rt) = self.0.take() {
            stop_runtime(rt, SHUTDOWN_GRACE).await;
        }
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A started edge node.
pub struct RunningEdge {
    plain_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    region: Option<String>,
    shared: Arc<ArcSwap<Snapshot>>,
    provider_status: Vec<(String, String)>,
    egress_nodes: Vec<(String, Vec<String>)>,
    shutdown_tx: watch::Sender<bool>,
    admin_shutdown_tx: watch::Sender<bool>,
    services: Vec<JoinHandle<()>>,
    admin_services: Vec<JoinHandle<()>>,
    /// `None` once shut down; see the `Drop` impl.
    rt: Option<tokio::runtime::Runtime>,
    backhaul: Option<Backhaul>,
    cache: Arc<ResponseCache>,
    lifecycle: Arc<Lifecycle>,
    reload: Reload,
    /// The listening sockets, for a graceful upgrade.
    listen_fds: ListenFds,
}

impl RunningEdge {
    /// The plain-HTTP address (the real port when asked for port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The admin listener under its old name.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Reloads what changed on disk (or everything, with `force`, as on
    /// SIGHUP): the policy file of a static-policy node (compiled and
    /// swapped, or refused with the old policy kept), the listener
    /// certificate and the backhaul identity (for new connections; open
    /// ones keep theirs). Each outcome is logged.
    pub fn reload(&self, force: bool) {
        let r = &self.reload;
        if let Some(file) = &r.policy_file {
            if file.changed() || force {
                let _ = reload_policy_file(file.path(), &self.shared, |doc| {
                    let compiled = r
                        .preparer
                        .compile(doc)
                        .map_err(|errors| NodeError::Policy {
                            path: file.path().to_path_buf(),
                            errors,
                        })?;
                    Ok(r.preparer.finish(compiled.snapshot))
                });
            }
        }
        if let Some(tls) = &r.listener_tls {
            tls.reload(force);
        }
        if let (Some(tls), Some(router)) = (&r.node_tls, &r.router) {
            let loaded = tls
                .load_if_changed(force)
                .map(|identity| identity.and_then(|identity| router.reload_tls(identity)));
            match loaded {
                None => {}
                Some(Ok(())) => {
                    tracing::info!(target: "switchyard::reload",
                        "node certificate reloaded; new backhaul connections use it");
                    if let Some(agent) = self.backhaul.as_ref().and_then(|b| b.agent.as_ref()) {
                        tls.renew_agent(agent);
                    }
                }
                Some(Err(error)) => tracing::error!(target: "switchyard::reload", %error,
                    "node certificate reload refused; the old one stays"),
            }
        }
    }

    /// Graceful upgrade, the old process's half: sends every listening
    /// socket to the new process waiting on `socket` (`switchyard edge
    /// --upgrade`), then drains as on SIGTERM with no delay. The sockets
    /// never close, so no client is refused. On failure nothing changed and
    /// this edge keeps serving.
    pub async fn hand_over(&self, socket: &Path) -> Result<(), NodeError> {
        let failed = |message: String| NodeError::Service {
            what: "upgrade",
            message,
        };
        let name = socket
            .to_str()
            .ok_or_else(|| failed(format!("{} is not UTF-8", socket.display())))?
            .to_string();
        let fds = self.listen_fds.clone();
        tokio::task::spawn_blocking(move || {
            fds.lock()
                .send_to_sock(name.as_str())
                .map(|_| ())
                .map_err(|e| failed(format!("cannot send the listening sockets to {name}: {e}")))
        })
        .await
        .map_err(|_| NodeError::Interrupted)??;
        tracing::info!(target: "switchyard::lifecycle", socket = %socket.display(),
            "listening sockets handed to the new process");
        Ok(())
    }

    /// Drains, then shuts down: readiness goes false at once; after `delay`
    /// (for load balancers to notice) the client listeners stop accepting;
    /// requests and streams in flight get up to `grace` to finish, each
    /// connection closing after its answer. Returns how many requests were
    /// still running when the grace period ran out.
    pub async fn drain(mut self, delay: Duration, grace: Duration) -> usize {
        let started = std::time::Instant::now();
        self.lifecycle.start_draining();
        tracing::info!(target: "switchyard::lifecycle", in_flight = self.lifecycle.in_flight(),
            delay_s = delay.as_secs(), grace_s = grace.as_secs(), "draining: readiness is false");
        tokio::time::sleep(delay).await;
        let _ = self.shutdown_tx.send(true);
        for service in std::mem::take(&mut self.services) {
            // The accept loops end at once; what they spawned goes on.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, service).await;
        }
        tracing::info!(target: "switchyard::lifecycle", in_flight = self.lifecycle.in_flight(),
            "listeners closed; waiting for requests in flight");
        let idle = self.lifecycle.wait_idle(grace).await;
        let left = self.lifecycle.in_flight();
        if idle {
            tracing::info!(target: "switchyard::lifecycle", waited_ms = started.elapsed().as_millis() as u64,
                "drained: every request finished");
        } else {
            tracing::warn!(target: "switchyard::lifecycle", cut = left, "grace period over; cutting the requests left");
        }
        self.shutdown().await;
        left
    }

    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Answers held by the response cache.
    pub fn cached_answers(&self) -> u64 {
        self.cache.len()
    }

    /// The snapshot being served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }

    /// Provider name → whether it is live and why, as compiled at start.
    pub fn provider_status(&self) -> &[(String, String)] {
        &self.provider_status
    }

    /// Egress nodes by region as dialled at start (backhaul mode).
    pub fn egress_nodes(&self) -> &[(String, Vec<String>)] {
        &self.egress_nodes
    }

    /// Stops accepting, gives open connections a short grace, then stops
    /// the agent and every runtime of the node. Returns when its listening
    /// ports are free again.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.admin_shutdown_tx.send(true);
        let services = std::mem::take(&mut self.services);
        for service in services
            .into_iter()
            .chain(std::mem::take(&mut self.admin_services))
        {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, service).await;
        }
        if let Some(rt) = self.rt.take() {
            if let Some(b) = self.backhaul.take() {
                b.stop(&rt).await;
            }
            stop_runtime(rt, SHUTDOWN_GRACE).await;
        }
    }
}

impl Drop for RunningEdge {
    /// Dropped without `shutdown()` (a failing test, say): a runtime cannot
    /// be dropped inside async code, so it is let go without waiting.
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.admin_shutdown_tx.send(true);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
