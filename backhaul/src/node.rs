//! The egress node as a library: [`EgressNode`] assembles what `switchyard
//! egress` runs (policy or control-plane snapshot, key pools, the QUIC
//! server) and returns a [`RunningEgress`] with its bound address and a
//! `shutdown()`, so tests start real nodes in-process on port 0.
//!
//! The pieces both node kinds share live here too ([`PolicySource`],
//! [`ControlLink`], [`NodeError`]); the edge's builder is
//! `switchyard_edge::node::EdgeNode`.
//!
//! Why the node crates depend on `switchyard-control`: the node agent
//! ([`NodeAgent`]) and the policy compiler are the node side of the control
//! plane, and a node builder owns their lifecycle (start before serving,
//! shut down after). The control plane depends on neither node crate, so the
//! graph stays acyclic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use switchyard_control::node_client::{self, AgentError, NodeAgent, NodeConfig, Role};
use switchyard_control::{
    compile, parse_policy, CompileOptions, Compiled, PolicyDocument, PolicyError,
};
use switchyard_proto::Snapshot;
use tokio::task::JoinHandle;

use crate::tunnel::server::{Drainer, TlsReloader};
use crate::tunnel::{ConnectionLimits, EgressServer, NodeTls, TunnelError};
use crate::upstream::ClientError;
use crate::Egress;
use switchyard_control::admin::{AdminListener, Lifecycle, MetricsFn};

/// How long a node that follows a control plane and has nothing cached
/// waits for its first snapshot before serving anyway.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(10);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Parse { path: PathBuf, error: PolicyError },
    #[error("{}{} error(s) in the policy", list_errors(path, errors), errors.len())]
    Policy {
        path: PathBuf,
        errors: Vec<PolicyError>,
    },
    #[error("region {region:?} is not in the policy's regions ({known})")]
    UnknownRegion { region: String, known: String },
    #[error("cannot create {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control plane agent: {0}")]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("egress: {0}")]
    Client(#[from] ClientError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Service { what: &'static str, message: String },
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// The task that assembles the node ended without an answer (it panicked).
    #[error("node start-up was interrupted")]
    Interrupted,
}

fn list_errors(path: &Path, errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {e}\n", path.display()))
        .collect()
}

/// Where a node's first snapshot comes from.
#[derive(Default)]
pub enum PolicySource {
    /// Nothing until the control plane sends one (needs a [`ControlLink`]).
    #[default]
    None,
    /// A policy YAML file, compiled for the node's role at start.
    File(PathBuf),
    /// A parsed document, compiled for the node's role at start.
    Document(PolicyDocument),
    /// An already compiled snapshot (tests, embedding).
    Snapshot(Snapshot),
}

impl PolicySource {
    /// The snapshot this source gives a node, compiled by `compiler` (the
    /// role's compiler); `None` when there is nothing to compile.
    pub fn compile(
        self,
        compiler: impl FnOnce(PolicyDocument) -> Result<Compiled, Vec<PolicyError>>,
    ) -> Result<Option<Compiled>, NodeError> {
        let (doc, path) = match self {
            PolicySource::None => return Ok(None),
            PolicySource::Snapshot(snapshot) => {
                return Ok(Some(Compiled {
                    snapshot,
                    provider_status: Vec::new(),
                }))
            }
            PolicySource::File(path) => (load_policy(&path)?, path),
            PolicySource::Document(doc) => (doc, PathBuf::from("policy")),
        };
        compiler(doc)
            .map(Some)
            .map_err(|errors| NodeError::Policy { path, errors })
    }
}

/// Reads and parses a policy file.
pub fn load_policy(path: &Path) -> Result<PolicyDocument, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_policy(&text).map_err(|error| NodeError::Parse {
        path: path.to_path_buf(),
        error,
    })
}

/// A file a node reloads when its content changes (policy, certificates).
///
/// Polled by content, not watched with inotify: Kubernetes swaps a
/// ConfigMap's or Secret's files by replacing a symlinked directory, editors
/// save by renaming, and both defeat a watch on the file itself, while one
/// small read a second sees every kind of change and costs nothing.
pub struct WatchedFile {
    path: PathBuf,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
}

impl WatchedFile {
    /// Remembers the file's content now.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let seen = std::fs::read(&path).ok();
        WatchedFile {
            path,
            seen: std::sync::Mutex::new(seen),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the content differs from the last look; the new content is
    /// remembered either way. An unreadable file is no change (it may be
    /// mid-replace); the next look sees it when it is back.
    pub fn changed(&self) -> bool {
        let Ok(now) = std::fs::read(&self.path) else {
            return false;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.as_deref() == Some(now.as_slice()) {
            return false;
        }
        *seen = Some(now);
        true
    }
}

/// The node identity files, to reload when they change.
#[derive(Debug, Clone)]
pub struct NodeTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The node identity files as watched files.
pub struct WatchedTls {
    files: NodeTlsFiles,
    watched: [WatchedFile; 3],
}

impl WatchedTls {
    pub fn new(files: NodeTlsFiles) -> Self {
        let watched = [
            WatchedFile::new(&files.cert),
            WatchedFile::new(&files.key),
            WatchedFile::new(&files.ca),
        ];
        WatchedTls { files, watched }
    }

    pub fn files(&self) -> &NodeTlsFiles {
        &self.files
    }

    /// Hands a renewed identity (already checked to load) to the node's
    /// control-plane agent, whose new connections then present it too.
    pub fn renew_agent(&self, agent: &NodeAgent) {
        let read = |p: &Path| std::fs::read(p);
        let renewed = (|| -> Result<(), String> {
            let key = String::from_utf8(read(&self.files.key).map_err(|e| e.to_string())?)
                .map_err(|_| "the node key is not PEM text".to_string())?;
            agent
                .set_identity(
                    read(&self.files.ca).map_err(|e| e.to_string())?,
                    read(&self.files.cert).map_err(|e| e.to_string())?,
                    switchyard_proto::Secret::new(key),
                )
                .map_err(|e| e.to_string())
        })();
        match renewed {
            Ok(()) => tracing::info!(target: "switchyard::reload",
                "node certificate reloaded for the control plane; new connections present it"),
            Err(error) => tracing::error!(target: "switchyard::reload", %error,
                "node certificate not reloaded for the control plane; the old one stays"),
        }
    }

    /// The identity when any file changed (or `force`), else `None`.
    pub fn load_if_changed(&self, force: bool) -> Option<Result<NodeTls, TunnelError>> {
        // Every file is looked at, so each remembers its new content.
        let changed = self.watched.iter().filter(|w| w.changed()).count() > 0;
        (changed || force).then(|| {
            NodeTls::from_files(&self.files.cert, &self.files.key, &self.files.ca)
                .map_err(TunnelError::from)
        })
    }
}

/// Prepares a new snapshot from the policy file and swaps it in, or keeps
/// the old one when the file does not compile (the same prepare → refuse
/// or swap as a control-plane snapshot). Logs what changed or why not.
/// `prepare` turns the document into the role's snapshot.
pub fn reload_policy_file(
    path: &Path,
    shared: &Arc<ArcSwap<Snapshot>>,
    prepare: impl FnOnce(PolicyDocument) -> Result<Snapshot, NodeError>,
) -> Result<u64, NodeError> {
    let prepared = load_policy(path).and_then(prepare);
    let next = match prepared {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(target: "switchyard::reload", file = %path.display(), %error,
                version = shared.load().version(), "policy reload refused; the old policy stays");
            return Err(error);
        }
    };
    let old = shared.load_full();
    let mut parts = next.into_builder();
    parts.version = old.version() + 1;
    let next = parts.build();
    let changes = switchyard_control::diff::diff(Some(&old), &next);
    let version = next.version();
    shared.store(Arc::new(next));
    tracing::info!(target: "switchyard::reload", file = %path.display(), version, changes = %changes,
        "policy reloaded");
    Ok(version)
}

/// Following a control plane: snapshots pushed to the node, telemetry up.
#[derive(Clone)]
pub struct ControlLink {
    /// gRPC URL of the control plane.
    pub url: String,
    /// Reported node id (default: ROLE-REGION-PID).
    pub node_id: Option<String>,
    /// Where the last applied snapshot is cached, to start without the control plane.
    pub state_dir: PathBuf,
    /// The node's identity for the control plane's mutual TLS.
    pub tls: Option<node_client::NodeTls>,
}

impl ControlLink {
    /// Starts the node agent (it loads the cached snapshot into `shared`
    /// before returning). Call inside the runtime the node owns.
    pub fn start_agent(
        &self,
        role: Role,
        region: &str,
        shared: &Arc<ArcSwap<Snapshot>>,
    ) -> Result<NodeAgent, NodeError> {
        let role_name = match role {
            Role::Edge => "edge",
            Role::Egress => "egress",
        };
        let id = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{role_name}-{region}-{}", std::process::id()));
        std::fs::create_dir_all(&self.state_dir).map_err(|source| NodeError::StateDir {
            path: self.state_dir.clone(),
            source,
        })?;
        let cache = self
            .state_dir
            .join(format!("{role_name}-{region}.snapshot"));
        let mut config = NodeConfig::new(self.url.clone(), id, role, region).cache_path(cache);
        if let Some(tls) = &self.tls {
            config = config.tls(tls.clone());
        }
        Ok(NodeAgent::start(config, shared.clone())?)
    }
}

/// Waits (bounded) for the first snapshot when the node has nothing to serve.
pub async fn wait_for_first_snapshot(shared: &Arc<ArcSwap<Snapshot>>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while shared.load().version() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A multi-thread runtime owned by a node (never the caller's: a node's
/// tasks must outlive whatever runtime started it, until `shutdown`).
pub fn node_runtime(name: &str, threads: usize) -> Result<tokio::runtime::Runtime, NodeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)
}

/// Stops a node's runtime and waits until its threads (and so its sockets)
/// are gone. Dropping a runtime blocks, which is not allowed inside async
/// code, so it happens on a thread of its own.
pub async fn stop_runtime(rt: tokio::runtime::Runtime, grace: Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("node-stop".into())
        .spawn(move || {
            rt.shutdown_timeout(grace);
            let _ = tx.send(());
        });
    if spawned.is_ok() {
        let _ = rx.await;
    }
}

/// Runs `fut` on `rt` and waits for it from whatever runtime the caller is on.
pub async fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, NodeError> {
    rt.spawn(fut).await.map_err(|_| NodeError::Interrupted)
}

/// Options for a node that resolves its own keys (`env` reads them).
pub fn single_process<'a>(env: &'a dyn Fn(&str) -> Option<String>) -> CompileOptions<'a> {
    CompileOptions {
        env,
        include_simulated: true,
        version: 1,
    }
}

/// Drops every key a node in `region` may not hold: its region's providers
/// and those bound to no region stay.
fn keep_region_keys(snapshot: Snapshot, region: &str) -> Snapshot {
    let mut parts = snapshot.into_builder();
    for p in parts.providers.values_mut() {
        if !p.keys.is_empty() && p.region.as_deref().is_some_and(|r| r != region) {
            Arc::make_mut(p).keys.clear();
        }
    }
    parts.build()
}

/// Builds an egress node: `EgressNode::new(region, tls).policy(...).start()`.
pub struct EgressNode {
    region: String,
    tls: NodeTls,
    listen: SocketAddr,
    policy: PolicySource,
    control: Option<ControlLink>,
    limits: ConnectionLimits,
    threads: usize,
    admin: Option<SocketAddr>,
    tls_files: Option<NodeTlsFiles>,
    otlp: Option<String>,
}

impl EgressNode {
    /// An egress for `region` with this backhaul identity, listening on
    /// 127.0.0.1 with a port the system picks.
    pub fn new(region: impl Into<String>, tls: NodeTls) -> Self {
        EgressNode {
            region: region.into(),
            tls,
            listen: (std::net::Ipv4Addr::LOCALHOST, 0).into(),
            policy: PolicySource::None,
            control: None,
            limits: ConnectionLimits::default(),
            threads: 2,
            admin: None,
            tls_files: None,
            otlp: None,
        }
    }

    /// Exports a span per provider call over OTLP/HTTP to this collector
    /// (`http://collector:4318`); off by default.
    pub fn otlp(mut self, endpoint: impl Into<String>) -> Self {
        self.otlp = Some(endpoint.into());
        self
    }

    /// Admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Where the node identity came from: [`RunningEgress::reload`]
    /// reloads it when these files change.
    pub fn tls_files(mut self, files: NodeTlsFiles) -> Self {
        self.tls_files = Some(files);
        self
    }

    /// QUIC (UDP) listen address; port 0 picks a free one ([`RunningEgress::local_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The first snapshot. A policy file is compiled with provider keys
    /// from this process's environment.
    pub fn policy(mut self, source: PolicySource) -> Self {
        self.policy = source;
        self
    }

    pub fn control_plane(mut self, link: ControlLink) -> Self {
        self.control = Some(link);
        self
    }

    pub fn limits(mut self, limits: ConnectionLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Compiles the policy, starts the agent, binds the QUIC endpoint and
    /// serves on a runtime of the node's own. May be awaited from any runtime.
    pub async fn start(self) -> Result<RunningEgress, NodeError> {
        // A static policy file is reloaded on change; one from a control
        // plane is replaced by its snapshots instead.
        let policy_file = match (&self.policy, &self.control) {
            (PolicySource::File(path), None) => Some(WatchedFile::new(path)),
            _ => None,
        };
        let region = self.region.clone();
        let snapshot = match self
            .policy
            .compile(|doc| compile(&doc, &single_process(&env_var)))?
        {
            Some(c) => prepare_egress(c.snapshot, &region)?,
            None => Snapshot::default(),
        };
        let shared = Arc::new(ArcSwap::from_pointee(snapshot));
        let lifecycle = Lifecycle::new();
        let rt = node_runtime("egress", self.threads)?;
        let started = {
            let shared = shared.clone();
            let region = self.region.clone();
            let lifecycle = lifecycle.clone();
            let (tls, limits, listen, control, admin, otlp) = (
                self.tls,
                self.limits,
                self.listen,
                self.control,
                self.admin,
                self.otlp,
            );
            run_on(&rt, async move {
                // The control plane sends this egress only its own region's keys.
                let agent = match &control {
                    Some(link) => {
                        let agent = link.start_agent(Role::Egress, &region, &shared)?;
                        wait_for_first_snapshot(&shared, FIRST_SNAPSHOT_WAIT).await;
                        Some(agent)
                    }
                    None => None,
                };
                let admin = match admin {
                    Some(addr) => Some(AdminListener::bind(addr).await.map_err(|source| {
                        NodeError::Bind {
                            addr: addr.to_string(),
                            source,
                        }
                    })?),
                    None => None,
                };
                // The name the control plane knows the node by, so ledger
                // rows and `ctl nodes` agree.
                let name = control
                    .as_ref()
                    .and_then(|c| c.node_id.clone())
                    .unwrap_or_else(|| format!("egress-{region}-{}", std::process::id()));
                let exporter = match &otlp {
                    Some(endpoint) => Some(
                        crate::otlp::Exporter::start(endpoint, &name).map_err(|e| {
                            NodeError::Service {
                                what: "otlp",
                                message: e.to_string(),
                            }
                        })?,
                    ),
                    None => None,
                };
                let egress = Egress::new(shared.clone())?
                    .with_node_name(&name)
                    .with_otlp(exporter);
                if let Some(agent) = &agent {
                    // Key pools as this node sees them, for the status page.
                    let (shared, health) = (shared.clone(), egress.health().clone());
                    agent.report_health(Arc::new(move || {
                        switchyard_control::telemetry::health_report(&shared.load(), &health, true)
                    }));
                }
                let server = EgressServer::bind(listen, &tls, egress, shared.clone(), &region, limits)?
                    .with_lifecycle(lifecycle.clone());
                let addr = server.local_addr()?;
                let endpoint = server.endpoint();
                let drainer = server.drainer();
                let tls_reloader = server.tls_reloader();
                let connections = server.connection_gauge();
                let served = (server.metrics(), server.health());
                tracing::info!(target: "switchyard::backhaul", bound = %addr, %region, "egress listening");
                let serve = tokio::spawn(server.run());
                let (admin_stop, admin_rx) = tokio::sync::watch::channel(false);
                let admin_addr = admin.as_ref().map(AdminListener::local_addr);
                if let Some(admin) = admin {
                    let agent_status = agent.as_ref().map(|a| a.watch_status());
                    let metrics = egress_metrics(shared.clone(), connections, served, agent_status);
                    admin.serve(lifecycle.clone(), metrics, admin_rx);
                }
                lifecycle.mark_ready();
                Ok::<_, NodeError>(EgressParts {
                    addr,
                    endpoint,
                    serve,
                    agent,
                    drainer,
                    tls_reloader,
                    admin_addr,
                    admin_stop,
                })
            })
            .await
        };
        let parts = match started {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) | Err(e) => {
                stop_runtime(rt, Duration::from_secs(1)).await;
                return Err(e);
            }
        };
        Ok(RunningEgress {
            addr: parts.addr,
            region: self.region,
            shared,
            endpoint: parts.endpoint,
            serve: parts.serve,
            agent: parts.agent,
            lifecycle,
            drainer: parts.drainer,
            tls_reloader: parts.tls_reloader,
            policy_file,
            tls_files: self.tls_files.map(WatchedTls::new),
            admin_addr: parts.admin_addr,
            admin_stop: parts.admin_stop,
            rt: Some(rt),
        })
    }
}

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// What the egress serves from a compiled snapshot: its region must be in
/// the policy, and only its region's keys stay.
fn prepare_egress(snapshot: Snapshot, region: &str) -> Result<Snapshot, NodeError> {
    if !snapshot.regions().is_empty() && !snapshot.regions().contains_key(region) {
        let known: Vec<String> = snapshot.regions().keys().cloned().collect();
        return Err(NodeError::UnknownRegion {
            region: region.to_string(),
            known: known.join(", "),
        });
    }
    Ok(keep_region_keys(snapshot, region))
}

/// The egress's `/metrics`: what it served (requests, provider waits,
/// tokens), key-pool health, snapshot version and ACK/NACK counts, open
/// edge connections (the lifecycle's gauges, among them the streams in
/// flight, are added by the admin listener), and per key (labels
/// provider, pool and key id, never the value) its state, calls in
/// flight, error rate and quota headroom from the egress's own board,
/// rebuilt per scrape so a key removed from the policy disappears.
fn egress_metrics(
    shared: Arc<ArcSwap<Snapshot>>,
    connections: Arc<dyn Fn() -> usize + Send + Sync>,
    (served, health): (
        Arc<crate::metrics::EgressMetrics>,
        Arc<switchyard_proto::Health>,
    ),
    agent_status: Option<
        tokio::sync::watch::Receiver<switchyard_control::node_client::AgentStatus>,
    >,
) -> MetricsFn {
    use prometheus::{GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};
    let agent = agent_status.map(switchyard_control::admin::AgentMetrics::new);
    let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
    let version =
        IntGauge::new("snapshot_version", "Version of the snapshot being served").expect("metric");
    let open = IntGauge::new("egress_connections", "Edge connections open on this egress")
        .expect("metric");
    for g in [&version, &open] {
        registry.register(Box::new(g.clone())).expect("register");
    }
    let labels = ["provider", "pool", "key"];
    let in_flight = IntGaugeVec::new(
        Opts::new("key_in_flight", "Provider calls in flight on the key"),
        &labels,
    )
    .expect("metric");
    let error_rate = GaugeVec::new(
        Opts::new(
            "key_error_rate",
            "Recent share of failed calls on the key (its worst model)",
        ),
        &labels,
    )
    .expect("metric");
    let headroom = GaugeVec::new(
        Opts::new(
            "key_headroom",
            "Share of the key's announced quota left (1 = unknown or full), its worst model",
        ),
        &labels,
    )
    .expect("metric");
    let state = IntGaugeVec::new(
        Opts::new(
            "key_state",
            "1 for the key's state: ok, cooling (after a 429), quota_exhausted, ejected (breaker open), disabled (refused by the provider)",
        ),
        &["provider", "pool", "key", "state"],
    )
    .expect("metric");
    registry
        .register(Box::new(in_flight.clone()))
        .expect("register");
    registry
        .register(Box::new(error_rate.clone()))
        .expect("register");
    registry
        .register(Box::new(headroom.clone()))
        .expect("register");
    registry
        .register(Box::new(state.clone()))
        .expect("register");
    if let Some(a) = &agent {
        a.register(&registry);
    }
    Arc::new(move || {
        let snapshot = shared.load();
        version.set(snapshot.version() as i64);
        open.set(connections() as i64);
        served.keys.update(&snapshot, &health);
        if let Some(a) = &agent {
            a.update();
        }
        for g in [&in_flight, &state] {
            g.reset();
        }
        for g in [&error_rate, &headroom] {
            g.reset();
        }
        let now = std::time::Instant::now();
        for p in snapshot.providers().values() {
            for k in &p.keys {
                let (mut flying, mut rate, mut room) = (0i64, 0f64, 1f64);
                let mut worst = 0;
                for entry in health.key_models(&p.name, &k.pool, &k.id) {
                    flying += i64::from(entry.in_flight());
                    rate = rate.max(entry.error_rate());
                    room = room.min(health.headroom(&entry, now));
                    let s = if health.is_refused(&entry, k.fingerprint, now) {
                        4
                    } else if health.is_ejected(&entry) {
                        3
                    } else if health.quota_exhausted_until(&entry, now).is_some() {
                        2
                    } else if health.cooling_until(&entry, now).is_some() {
                        1
                    } else {
                        0
                    };
                    worst = worst.max(s);
                }
                let l = [p.name.as_str(), &*k.pool, &*k.id];
                in_flight.with_label_values(&l).set(flying);
                error_rate.with_label_values(&l).set(rate);
                headroom.with_label_values(&l).set(room);
                let names = ["ok", "cooling", "quota_exhausted", "ejected", "disabled"];
                for (i, name) in names.iter().enumerate() {
                    state
                        .with_label_values(&[l[0], l[1], l[2], name])
                        .set(i64::from(i == worst));
                }
            }
        }
        let page = switchyard_control::admin::render(&[&registry, served.registry()]);
        Box::pin(async move { page })
    })
}

struct EgressParts {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    serve: JoinHandle<()>,
    agent: Option<NodeAgent>,
    drainer: Drainer,
    tls_reloader: TlsReloader,
    admin_addr: Option<SocketAddr>,
    admin_stop: tokio::sync::watch::Sender<bool>,
}

/// A started egress node.
pub struct RunningEgress {
    addr: SocketAddr,
    region: String,
    shared: Arc<ArcSwap<Snapshot>>,
    endpoint: quinn::Endpoint,
    serve: JoinHandle<()>,
    agent: Option<NodeAgent>,
    lifecycle: Arc<Lifecycle>,
    drainer: Drainer,
    tls_reloader: TlsReloader,
    policy_file: Option<WatchedFile>,
    tls_files: Option<WatchedTls>,
    admin_addr: Option<SocketAddr>,
    admin_stop: tokio::sync::watch::Sender<bool>,
    /// `None` once shut down; see the `Drop` impl.
    rt: Option<tokio::runtime::Runtime>,
}

impl RunningEgress {
    /// The bound QUIC address (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The snapshot being served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.load_full()
    }

    /// The admin listener's address (the real port when asked for port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Reloads what changed on disk (or everything, with `force`, as on
    /// SIGHUP): the policy file of a static-policy node, compiled and
    /// swapped or refused with the old one kept; the node certificate, for
    /// new connections only. Each outcome is logged.
    pub fn reload(&self, force: bool) {
        if let Some(file) = &self.policy_file {
            if file.changed() || force {
                let _ = reload_policy_file(file.path(), &self.shared, |doc| {
                    let compiled = compile(&doc, &single_process(&env_var)).map_err(|errors| {
                        NodeError::Policy {
                            path: file.path().to_path_buf(),
                            errors,
                        }
                    })?;
                    prepare_egress(compiled.snapshot, &self.region)
                });
            }
        }
        if let Some(tls) = &self.tls_files {
            match tls.load_if_changed(force) {
                None => {}
                Some(Ok(identity)) => match self.tls_reloader.reload(&identity) {
                    Ok(()) => {
                        tracing::info!(target: "switchyard::reload",
                            "node certificate reloaded; new backhaul connections use it");
                        if let Some(agent) = &self.agent {
                            tls.renew_agent(agent);
                        }
                    }
                    Err(error) => tracing::error!(target: "switchyard::reload", %error,
                        "node certificate reload refused; the old one stays"),
                },
                Some(Err(error)) => tracing::error!(target: "switchyard::reload", %error,
                    "node certificate reload refused; the old one stays"),
            }
        }
    }

    /// Drains, then shuts down: readiness goes false, every edge is told
    /// GOAWAY (they send new requests to other egress nodes), new
    /// connections and streams are refused, and streams in flight get up to
    /// `grace` to finish. Returns how many were still running when it ran out.
    pub async fn drain(self, grace: Duration) -> usize {
        self.drainer.start();
        let started = std::time::Instant::now();
        tracing::info!(target: "switchyard::lifecycle", in_flight = self.lifecycle.in_flight(),
            grace_s = grace.as_secs(), "draining: readiness is false, edges are told GOAWAY");
        let idle = self.lifecycle.wait_idle(grace).await;
        let left = self.lifecycle.in_flight();
        if idle {
            tracing::info!(target: "switchyard::lifecycle", waited_ms = started.elapsed().as_millis() as u64,
                "drained: every stream finished");
        } else {
            tracing::warn!(target: "switchyard::lifecycle", cut = left, "grace period over; cutting the streams left");
        }
        self.shutdown().await;
        left
    }

    /// Closes the endpoint (telling every edge at once, instead of after its
    /// idle timeout), stops the agent and the node's runtime. Returns when
    /// the UDP port is free again.
    pub async fn shutdown(mut self) {
        let Some(rt) = self.rt.take() else {
            return;
        };
        let endpoint = self.endpoint.clone();
        let serve = self.serve.abort_handle();
        let agent = self.agent.take();
        let admin_stop = self.admin_stop.clone();
        let _ = run_on(&rt, async move {
            let _ = admin_stop.send(true);
            endpoint.close(0u32.into(), b"egress shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
            serve.abort();
            if let Some(a) = agent {
                a.shutdown().await;
            }
        })
        .await;
        stop_runtime(rt, Duration::from_secs(1)).await;
    }
}

impl Drop for RunningEgress {
    /// Dropped without `shutdown()` (a failing test, say): a runtime cannot
    /// be dropped inside async code, so it is let go without waiting.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
