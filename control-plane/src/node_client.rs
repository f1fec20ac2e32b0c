//! The node side of the control plane: what an edge or egress process runs
//! to follow policy. One call:
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_control::node_client::AgentError> {
//! use std::sync::Arc;
//! use arc_swap::ArcSwap;
//! use switchyard_control::node_client::{NodeAgent, NodeConfig, Role};
//! use switchyard_proto::Snapshot;
//!
//! let shared = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
//! let config = NodeConfig::new("https://cp.internal:7000", "egress-eu-1", Role::Egress, "eu-west")
//!     .cache_path("/var/lib/switchyard/snapshot.pb");
//! let agent = NodeAgent::start(config, shared.clone())?;
//! // Serve from `shared.load()`; record telemetry into `agent.telemetry()`.
//! # Ok(()) }
//! ```
//!
//! The agent loads the cached snapshot (if any) before returning, so a node
//! can serve while the control plane is unreachable (static stability). In
//! the background it connects, says hello, and for every snapshot received:
//! converts it from the wire (`TryFrom`, [`InvalidSnapshot`]), prepares it
//! (resolves this egress's key references; runs the optional
//! [`NodeConfig::validate`] hook) — any failure NACKs with the reason and
//! keeps the old snapshot — then swaps it in, persists it and ACKs. It
//! reconnects with capped exponential backoff and never touches the request
//! path: readers only `load()` the `ArcSwap`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message;
use switchyard_proto::wire::InvalidSnapshot;
use switchyard_proto::{Secret, Snapshot};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ledger::{ship_loop, Ledger};
use crate::pb;
use crate::pb::node_client::NodeClient;
use crate::policy::resolve_provider_keys;
use crate::telemetry::{self, Aggregator, TelemetryHandle};

/// The largest snapshot message a node decodes (tonic's default, stated so
/// the control plane can refuse to publish anything larger).
pub const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024;
/// The share of [`MAX_SNAPSHOT_BYTES`] kept for the latency scores pushed
/// with each snapshot.
pub const MAX_SCORES_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    Egress,
}

impl From<Role> for pb::NodeRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Edge => pb::NodeRole::Edge,
            Role::Egress => pb::NodeRole::Egress,
        }
    }
}

/// The node's mTLS material (PEM).
#[derive(Clone)]
pub struct NodeTls {
    /// CA that signed the control plane's certificate.
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Secret,
    /// Name to verify in the control plane's certificate; defaults to the URL's host.
    pub domain: Option<String>,
}

/// Extra node-side check run on a prepared snapshot before it is swapped in
/// (e.g. the egress building its provider clients). `Err` NACKs.
pub type ValidateHook = Arc<dyn Fn(&Snapshot) -> Result<(), String> + Send + Sync>;

/// Reads an environment variable; injectable for tests.
pub type EnvReader = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub struct NodeConfig {
    pub endpoint: String,
    pub tls: Option<NodeTls>,
    pub id: String,
    pub role: Role,
    pub region: String,
    pub build: String,
    /// Where the last applied snapshot is kept (mode 0600: an egress's copy
    /// holds its keys). `None` disables static stability.
    pub cache_path: Option<PathBuf>,
    pub validate: Option<ValidateHook>,
    pub env: EnvReader,
    pub report_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Usage records buffered while the control plane is unreachable.
    pub ledger_capacity: usize,
}

impl NodeConfig {
    pub fn new(
        endpoint: impl Into<String>,
        id: impl Into<String>,
        role: Role,
        region: impl Into<String>,
    ) -> Self {
        NodeConfig {
            endpoint: endpoint.into(),
            tls: None,
            id: id.into(),
            role,
            region: region.into(),
            build: env!("CARGO_PKG_VERSION").to_string(),
            cache_path: None,
            validate: None,
            env: Arc::new(|k| std::env::var(k).ok()),
            report_interval: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            ledger_capacity: crate::ledger::DEFAULT_CAPACITY,
        }
    }

    pub fn cache_path(mut self, p: impl Into<PathBuf>) -> Self {
        self.cache_path = Some(p.into());
        self
    }

    pub fn tls(mut self, tls: NodeTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn validate(mut self, hook: ValidateHook) -> Self {
        self.validate = Some(hook);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("control plane endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("NodeAgent::start must be called inside a tokio runtime")]
    NoRuntime,
}

/// Why a snapshot was not applied (the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("invalid snapshot: {0}")]
    Invalid(#[from] InvalidSnapshot),
    #[error("{0}")]
    Keys(String),
    #[error("rejected by node: {0}")]
    Rejected(String),
}

/// What the agent has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub connected: bool,
    /// Version being served (0 = none yet).
    pub applied_version: u64,
    /// Where the served snapshot came from.
    pub from_cache: bool,
    pub last_nack: Option<(u64, String)>,
    pub scores_generation: u64,
    /// Snapshot versions applied (ACKed) and rejected (NACKed) since start.
    pub acks: u64,
    pub nacks: u64,
}

/// What a node's health board says now; called once per report interval.
pub type HealthSource = Arc<dyn Fn() -> pb::NodeHealthMsg + Send + Sync>;

type HealthCell = Arc<std::sync::Mutex<Option<HealthSource>>>;

pub struct NodeAgent {
    status: watch::Receiver<AgentStatus>,
    telemetry: TelemetryHandle,
    ledger: Ledger,
    health: HealthCell,
    config: Arc<NodeConfig>,
    /// The channel new calls use; replaced when the node's certificate is
    /// renewed ([`NodeAgent::set_identity`]).
    channels: watch::Sender<Channel>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeAgent {
    /// Loads the cached snapshot into `shared` (when there is one and it
    /// prepares), then follows the control plane in the background.
    pub fn start(config: NodeConfig, shared: Arc<ArcSwap<Snapshot>>) -> Result<Self, AgentError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AgentError::NoRuntime)?;
        let channel = channel(&config, config.tls.as_ref())?;
        let (channels, _) = watch::channel(channel);
        let (status_tx, status) = watch::channel(AgentStatus::default());
        if let Some(path) = &config.cache_path {
            match load_cache(path, &config) {
                Ok(Some(snapshot)) => {
                    let version = snapshot.version();
                    shared.store(Arc::new(snapshot));
                    status_tx.send_modify(|s| {
                        s.applied_version = version;
                        s.from_cache = true;
                    });
                    tracing::info!(version, path = %path.display(), "serving cached snapshot");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "ignoring unusable snapshot cache")
                }
            }
        }
        let (telemetry, events) = telemetry::channel(8192);
        let ledger = Ledger::new(config.ledger_capacity);
        let health: HealthCell = Arc::default();
        let config = Arc::new(config);
        let tasks = vec![
            runtime.spawn(watch_loop(
                config.clone(),
                channels.subscribe(),
                shared,
                status_tx,
            )),
            runtime.spawn(ship_loop(
                config.id.clone(),
                channels.subscribe(),
                ledger.clone(),
            )),
            runtime.spawn(report_loop(
                config.clone(),
                channels.subscribe(),
                events,
                health.clone(),
            )),
        ];
        Ok(NodeAgent {
            status,
            telemetry,
            ledger,
            health,
            config,
            channels,
            tasks,
        })
    }

    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Changes of [`AgentStatus`], e.g. to wait for a version in tests.
    pub fn watch_status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Where the data plane buffers its usage-ledger records.
    pub fn ledger(&self) -> Ledger {
        self.ledger.clone()
    }

    /// Where the data plane records per-request telemetry.
    pub fn telemetry(&self) -> TelemetryHandle {
        self.telemetry.clone()
    }

    /// A renewed node certificate (and CA) for the control plane's mutual
    /// TLS: new connections present it. The node's id is bound to the
    /// certificate that holds its Watch stream, so the agent moves that
    /// stream (and the telemetry one) to a connection with the new
    /// certificate at once; it keeps serving its snapshot meanwhile, and
    /// calls already under way finish on the old connection.
    pub fn set_identity(&self, ca: Vec<u8>, cert: Vec<u8>, key: Secret) -> Result<(), AgentError> {
        let tls = NodeTls {
            ca,
            cert,
            key,
            domain: self.config.tls.as_ref().and_then(|t| t.domain.clone()),
        };
        let next = channel(&self.config, Some(&tls))?;
        self.channels.send_replace(next);
        Ok(())
    }

    /// Reports the node's health board with every telemetry batch (see
    /// [`crate::telemetry::health_report`]).
    pub fn report_health(&self, source: HealthSource) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// Stops following; the last snapshot stays in the `ArcSwap`.
    pub async fn shutdown(self) {
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Resolves when the channel is replaced; never when the agent is gone
/// (its loops are being aborted then).
pub(crate) async fn renewed(channels: &mut watch::Receiver<Channel>) {
    if channels.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn channel(config: &NodeConfig, tls: Option<&NodeTls>) -> Result<Channel, AgentError> {
    let err = |source| AgentError::Endpoint {
        endpoint: config.endpoint.clone(),
        source,
    };
    let mut ep = Endpoint::from_shared(config.endpoint.clone())
        .map_err(err)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca))
            .identity(Identity::from_pem(&tls.cert, tls.key.expose()));
        if let Some(d) = &tls.domain {
            t = t.domain_name(d.clone());
        }
        ep = ep.tls_config(t).map_err(err)?;
    }
    Ok(ep.connect_lazy())
}

/// Wire → domain → keys resolved → node check. Pure except for reading
/// this node's key references.
pub fn prepare(msg: pb::SnapshotMsg, config: &NodeConfig) -> Result<Snapshot, PrepareError> {
    let mut parts = Snapshot::try_from(msg)?.into_builder();
    let read_file = |p: &str| std::fs::read_to_string(p);
    let mut problems = Vec::new();
    for provider in parts.providers.values_mut() {
        if config.role == Role::Edge {
            // Defence in depth: an edge never holds provider keys, even if
            // a control plane sent some.
            let p = Arc::make_mut(provider);
            p.key_pools.clear();
            p.keys.clear();
            continue;
        }
        let env = |k: &str| (config.env)(k);
        let (keys, errors) =
            resolve_provider_keys(provider, Some(&config.region), &env, &read_file);
        problems.extend(errors.into_iter().map(|e| e.to_string()));
        Arc::make_mut(provider).keys = keys;
    }
    if !problems.is_empty() {
        return Err(PrepareError::Keys(problems.join("; ")));
    }
    let snapshot = parts.build();
    if let Some(hook) = &config.validate {
        hook(&snapshot).map_err(PrepareError::Rejected)?;
    }
    Ok(snapshot)
}

fn load_cache(path: &Path, config: &NodeConfig) -> Result<Option<Snapshot>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let msg = pb::SnapshotMsg::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    prepare(msg, config).map(Some).map_err(|e| e.to_string())
}

/// Written to a temporary file then renamed, so a crash never leaves a
/// half-written cache; 0600 because an egress's copy holds keys.
fn save_cache(path: &Path, msg: &pb::SnapshotMsg) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(&msg.encode_to_vec())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn backoff(attempt: u32, config: &NodeConfig) -> Duration {
    let base = config
        .backoff_min
        .saturating_mul(1u32 << attempt.min(16))
        .min(config.backoff_max);
    // Jitter spreads a fleet's reconnects after a control-plane restart.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.mul_f64(0.5 + (nanos % 1000) as f64 / 2000.0)
}

async fn watch_loop(
    config: Arc<NodeConfig>,
    mut channels: watch::Receiver<Channel>,
    shared: Arc<ArcSwap<Snapshot>>,
    status: watch::Sender<AgentStatus>,
) {
    let mut attempt = 0u32;
    loop {
        let mut client = NodeClient::new(channels.borrow_and_update().clone())
            .max_decoding_message_size(MAX_SNAPSHOT_BYTES);
        let mut renewed_now = false;
        let hello = pb::Hello {
            id: config.id.clone(),
            role: pb::NodeRole::from(config.role) as i32,
            region: config.region.clone(),
            build: config.build.clone(),
            have_version: status.borrow().applied_version,
        };
        match client.watch(hello).await {
            Ok(resp) => {
                attempt = 0;
                status.send_modify(|s| s.connected = true);
                let mut stream = resp.into_inner();
                loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        _ = renewed(&mut channels) => {
                            // Dropping the stream frees the node's id for the
                            // new certificate's Watch.
                            tracing::info!(target: "switchyard::reload", "control-plane session moves to the renewed certificate");
                            renewed_now = true;
                            break;
                        }
                    };
                    match message {
                        Ok(Some(msg)) => {
                            handle_snapshot(&config, &mut client, &shared, &status, msg).await
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "control plane stream ended");
                            break;
                        }
                    }
                }
                status.send_modify(|s| s.connected = false);
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "control plane unreachable");
            }
        }
        if renewed_now {
            continue;
        }
        tokio::time::sleep(backoff(attempt, &config)).await;
        attempt = attempt.saturating_add(1);
    }
}

async fn handle_snapshot(
    config: &NodeConfig,
    client: &mut NodeClient<Channel>,
    shared: &ArcSwap<Snapshot>,
    status: &watch::Sender<AgentStatus>,
    msg: pb::SnapshotMsg,
) {
    let version = msg.version;
    let generation = msg.scores_generation;
    let current = status.borrow().clone();
    if version == current.applied_version && !current.from_cache {
        // Same policy, new scores or tenant state (keys, spend, leases):
        // swap those only; nothing to ACK.
        if generation != current.scores_generation {
            let scores = msg
                .scores
                .clone()
                .map(switchyard_proto::Scores::from)
                .unwrap_or_default();
            let current = shared.load();
            let next = match switchyard_proto::wire::tenants_from_wire(
                msg.tenants.clone(),
                msg.virtual_keys.clone(),
                msg.spend.clone(),
            ) {
                Ok(tenants) => current.with_refresh(Arc::new(scores), tenants),
                Err(e) => {
                    // The version was valid; a bad refresh keeps its tenants.
                    tracing::warn!(error = %e, "ignoring a tenant refresh");
                    current.with_scores(Arc::new(scores))
                }
            };
            shared.store(Arc::new(next));
            status.send_modify(|s| s.scores_generation = generation);
            if let Some(path) = &config.cache_path {
                // Keep the cache's scores fresh too; failures only cost freshness.
                let _ = save_cache(path, &msg);
            }
        }
        return;
    }
    let cached = msg.clone();
    let (ok, reason) = match prepare(msg, config) {
        Ok(snapshot) => {
            shared.store(Arc::new(snapshot));
            status.send_modify(|s| {
                s.applied_version = version;
                s.from_cache = false;
                s.scores_generation = generation;
                s.acks += 1;
            });
            if let Some(path) = &config.cache_path {
                if let Err(e) = save_cache(path, &cached) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot persist snapshot");
                }
            }
            tracing::info!(version, "snapshot applied");
            (true, String::new())
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::warn!(version, reason = %reason, "snapshot rejected; keeping the previous one");
            status.send_modify(|s| {
                s.last_nack = Some((version, reason.clone()));
                s.nacks += 1;
            });
            (false, reason)
        }
    };
    let ack = pb::AckRequest {
        node_id: config.id.clone(),
        version,
        ok,
        reason,
    };
    if let Err(e) = client.ack(ack).await {
        tracing::warn!(error = %e, version, "cannot send ack");
    }
}

async fn report_loop(
    config: Arc<NodeConfig>,
    mut channels: watch::Receiver<Channel>,
    mut events: tokio::sync::mpsc::Receiver<telemetry::Event>,
    health: HealthCell,
) {
    let mut agg = Aggregator::default();
    let mut attempt = 0u32;
    loop {
        let mut client = NodeClient::new(channels.borrow_and_update().clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::TelemetryBatch>(16);
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let call = client.report(stream);
        tokio::pin!(call);
        let mut tick = tokio::time::interval(config.report_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            tokio::select! {
                r = &mut call => break r.err(),
                _ = renewed(&mut channels) => break None,
                e = events.recv() => match e {
                    Some(e) => agg.apply(e),
                    None => return,
                },
                _ = tick.tick() => {
                    let source = health.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let report = source.map(|f| f());
                    let batch = agg.take_batch(
                        &config.id,
                        &config.region,
                        config.role.into(),
                        config.report_interval,
                    );
                    // The board's state goes up on every tick, idle or not:
                    // a breaker that closed again must leave the page.
                    let batch = match (batch, report) {
                        (Some(mut b), r) => {
                            b.health = r;
                            Some(b)
                        }
                        (None, Some(r)) => Some(pb::TelemetryBatch {
                            node_id: config.id.clone(),
                            region: config.region.clone(),
                            role: pb::NodeRole::from(config.role) as i32,
                            window_ms: config.report_interval.as_millis() as u64,
                            health: Some(r),
                            ..Default::default()
                        }),
                        (None, None) => None,
                    };
                    if let Some(batch) = batch {
                        if tx.send(batch).await.is_err() {
                            break None;
                        }
                        attempt = 0;
                    }
                }
            }
        };
        if let Some(e) = ended {
            tracing::debug!(error = %e, "telemetry stream ended");
        }
        tokio::time::sleep(backoff(attempt, &config)).await;
        attempt = attempt.saturating_add(1);
    }
}
