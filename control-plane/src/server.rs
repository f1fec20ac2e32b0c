//! The control plane process: the `Operator` and `Node` gRPC services, the
//! publishing of versions to watching nodes, and the replica's follow loop
//! (a version stored by another replica is picked up from the database).
//!
//! State flows one way: store → [`Published`] (compiled once per version)
//! → a `watch` channel → one task per connected node, which tailors the
//! snapshot to that node before sending it. Nothing here is on the data
//! plane's request path.

use crate::tenancy::{tailor_tenants, Tenancy};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use switchyard_proto::{Secret, Snapshot};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::{AdminListener, Lifecycle, MetricsFn};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::limits::{ConnLimiter, ListenerLimits};
use crate::node_client::{MAX_SCORES_BYTES, MAX_SNAPSHOT_BYTES};
use crate::pb;
use crate::pb::node_server::{Node, NodeServer};
use crate::pb::operator_server::{Operator, OperatorServer};
use crate::policy::{compile_policy, parse_policy, Compiled, PolicyError, PolicyOptions};
use crate::secrets::{seal_document, MasterKeys};
use crate::store::{now_ms, NodeRecord, Store, StoreError};
use crate::telemetry::ScoreBoard;

/// PEM files of the gRPC listener.
#[derive(Clone)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Secret,
    /// CA that signs node (and operator) client certificates. When set,
    /// `Node` calls require a client certificate.
    pub client_ca: Option<Vec<u8>>,
}

pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`.
    pub store_url: String,
    pub tls: Option<TlsPem>,
    /// Bearer token operators present. Without it and without operator
    /// certificates the control plane refuses to start, unless
    /// `insecure_open_operator_api`.
    pub admin_token: Option<Secret>,
    /// SHA-256 (hex) of client certificates allowed to act as operators.
    pub operator_cert_sha256: Vec<String>,
    /// Plain-HTTP JSON form of the operator API.
    pub http_listen: Option<SocketAddr>,
    /// Names this replica in the node registry.
    pub replica_id: String,
    pub master_keys: MasterKeys,
    /// How often the store is polled for versions another replica stored
    /// (PostgreSQL also wakes replicas with NOTIFY).
    pub poll_interval: Duration,
    pub score_interval: Duration,
    pub score_window: Duration,
    /// Refuse node certificates that are not scoped to the role and region
    /// the node claims (see [`node_scope_name`]). On by default: without it
    /// any fleet certificate could claim a region and receive its keys.
    pub require_node_scope: bool,
    /// Development only: serve the operator API with no authentication, or
    /// with a bearer token over plaintext on a non-loopback address.
    pub insecure_open_operator_api: bool,
    pub limits: ListenerLimits,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`; see [`crate::admin`]).
    pub admin_listen: Option<SocketAddr>,
    /// The files `tls` came from: [`RunningControlPlane::reload_tls`]
    /// follows them (new connections get a renewed certificate).
    pub tls_files: Option<crate::tls::ServerTlsFiles>,
}

/// The DNS name a node certificate carries when it is scoped to one role
/// and region (`switchyard gen-certs --role --region` writes it). Without
/// it any certificate of the fleet CA could claim any region and receive
/// that region's egress keys. The backhaul checks the same scopes.
pub use switchyard_proto::scope::node_scope_name;

/// Whether the leaf certificate is scoped to `role` in `region`.
pub fn certificate_has_scope(
    leaf: &tonic::transport::CertificateDer<'_>,
    role: &str,
    region: &str,
) -> bool {
    switchyard_proto::scope::certificate_has_scope(leaf, role, region)
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, store_url: impl Into<String>) -> Self {
        ServerConfig {
            listen,
            store_url: store_url.into(),
            tls: None,
            admin_token: None,
            operator_cert_sha256: Vec::new(),
            http_listen: None,
            replica_id: format!("cp-{}", std::process::id()),
            master_keys: MasterKeys::default(),
            poll_interval: Duration::from_secs(1),
            score_interval: Duration::from_secs(5),
            score_window: Duration::from_secs(300),
            require_node_scope: true,
            insecure_open_operator_api: false,
            limits: ListenerLimits::default(),
            admin_listen: None,
            tls_files: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] tonic::transport::Error),
    #[error(transparent)]
    ServerTls(#[from] crate::tls::TlsError),
    #[error("stored policy version {version} no longer compiles: {errors}")]
    StoredPolicy { version: u64, errors: String },
    #[error("the operator API would be open to anyone who reaches it: set --admin-token-env or --operator-cert-sha256 (or, for local development only, --insecure-open-operator-api)")]
    OpenOperatorApi,
    #[error("the admin token would travel in plaintext on {addr}: serve gRPC with --tls-cert/--tls-key and bind --http-listen to loopback (or, for development only, --insecure-open-operator-api)")]
    PlaintextToken { addr: SocketAddr },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("policy version {0} does not exist")]
    NoSuchVersion(u64),
    #[error("no policy has been applied yet")]
    NoPolicy,
    #[error("{}", join_errors(.0))]
    Invalid(Vec<PolicyError>),
}

fn join_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        match &e {
            ControlError::Store(_) => {
                tracing::error!(error = %e, "store failure");
                Status::unavailable(e.to_string())
            }
            ControlError::NoSuchVersion(_) | ControlError::NoPolicy => {
                Status::not_found(e.to_string())
            }
            ControlError::Invalid(_) => Status::invalid_argument(e.to_string()),
        }
    }
}

/// One stored version, compiled. `wire` holds every key pool; each node
/// receives a tailored copy.
pub struct Published {
    pub version: u64,
    pub yaml: String,
    pub snapshot: Snapshot,
    pub wire: pb::SnapshotMsg,
}

/// What an apply (or rollback, or rotation) did.
#[derive(Debug, Clone, Default)]
pub struct ApplyOutcome {
    pub version: u64,
    pub applied: bool,
    pub diff: String,
    pub errors: Vec<PolicyError>,
}

impl From<ApplyOutcome> for pb::ApplyPolicyResponse {
    fn from(o: ApplyOutcome) -> Self {
        pb::ApplyPolicyResponse {
            version: o.version,
            applied: o.applied,
            diff: o.diff,
            errors: o
                .errors
                .into_iter()
                .map(|e| pb::PolicyErrorMsg {
                    path: e.path,
                    message: e.message,
                })
                .collect(),
        }
    }
}

/// A node's ACK or NACK, as seen by this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckEvent {
    pub node_id: String,
    pub version: u64,
    pub ok: bool,
    pub reason: String,
}

/// The shared state of one control-plane replica.
pub struct ControlPlane {
    store: Store,
    replica: String,
    master: MasterKeys,
    admin_token: Option<Secret>,
    operator_certs: Vec<String>,
    require_node_cert: bool,
    require_node_scope: bool,
    /// No operator authentication configured, and the operator chose that.
    open_operator_api: bool,
    /// Node id → the certificate holding it while connected, so another
    /// certificate cannot take the id, ACK or report for it.
    sessions: Mutex<HashMap<String, NodeSession>>,
    current: watch::Sender<Option<Arc<Published>>>,
    scores: watch::Sender<(u64, Arc<pb::ScoresMsg>)>,
    board: Mutex<ScoreBoard>,
    acks: broadcast::Sender<AckEvent>,
    /// Serialises applies within the replica so diffs are against the
    /// version they will follow.
    apply_lock: tokio::sync::Mutex<()>,
    /// Set on shutdown: ends node streams so the server's graceful stop
    /// does not wait for them forever.
    stopping: watch::Receiver<bool>,
    /// Virtual keys, fleet spend and edge leases (`crate::tenancy`).
    tenancy: Tenancy,
    /// `switchyard_control_snapshot_acks_total{result="ack|nack"}`.
    ack_counter: prometheus::IntCounterVec,
    /// Each node's latest health board, for the status page.
    health_reports: crate::status::HealthReports,
}

impl ControlPlane {
    fn compile_yaml(&self, yaml: &str, version: u64) -> Result<Compiled, Vec<PolicyError>> {
        let doc = parse_policy(yaml).map_err(|e| vec![e])?;
        // The control plane's own environment must not leak into policy:
        // key references are resolved on the egress nodes.
        let no_env = |_: &str| None;
        let compiled = compile_policy(
            &doc,
            &PolicyOptions {
                env: &no_env,
                include_simulated: false,
                env_providers: false,
                version,
                master_keys: Some(&self.master),
            },
        )?;
        // A snapshot nodes cannot decode would freeze every node on the old
        // version while the registry says they are behind: refuse it here.
        let size = prost::Message::encoded_len(&pb::SnapshotMsg::from(&compiled.snapshot));
        let limit = MAX_SNAPSHOT_BYTES - MAX_SCORES_BYTES;
        if size > limit {
            return Err(vec![PolicyError {
                path: String::new(),
                message: format!(
                    "the compiled snapshot is {size} bytes; nodes accept at most {limit}"
                ),
            }]);
        }
        Ok(compiled)
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.current.borrow().clone()
    }

    pub fn current_version(&self) -> u64 {
        self.current().map_or(0, |p| p.version)
    }

    /// ACKs and NACKs as they arrive (for tests, benchmarks, operators).
    pub fn subscribe_acks(&self) -> broadcast::Receiver<AckEvent> {
        self.acks.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn tenancy(&self) -> &Tenancy {
        &self.tenancy
    }

    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// What nodes last said about their health boards.
    pub fn health_reports(&self) -> &crate::status::HealthReports {
        &self.health_reports
    }

    /// Per-target and per-region-pair telemetry over the score window.
    pub fn board_status(
        &self,
        now: Instant,
    ) -> (
        Vec<crate::telemetry::TargetStatus>,
        Vec<crate::telemetry::RttStatus>,
    ) {
        self.board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status(now)
    }

    fn publish(&self, version: u64, yaml: String) -> Result<(), Vec<PolicyError>> {
        let compiled = self.compile_yaml(&yaml, version)?;
        let wire = pb::SnapshotMsg::from(&compiled.snapshot);
        let published = Arc::new(Published {
            version,
            yaml,
            snapshot: compiled.snapshot,
            wire,
        });
        self.current.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.version >= version) {
                return false;
            }
            *cur = Some(published);
            true
        });
        tracing::info!(version, replica = %self.replica, "policy version published");
        Ok(())
    }

    /// Publishes the store's latest version when it is newer than ours.
    pub async fn sync_from_store(&self) -> Result<(), ServeError> {
        let latest = self.store.latest_version().await?;
        if latest <= self.current_version() {
            return Ok(());
        }
        let Some(v) = self.store.get(latest).await? else {
            return Ok(());
        };
        self.publish(v.version, v.yaml)
            .map_err(|errors| ServeError::StoredPolicy {
                version: v.version,
                errors: join_errors(&errors),
            })
    }

    /// Validates `yaml`; unless `dry_run` or invalid, stores and publishes
    /// it as a new version. Invalid documents change nothing.
    pub async fn apply(
        &self,
        yaml: &str,
        dry_run: bool,
        author: &str,
        comment: &str,
    ) -> Result<ApplyOutcome, ControlError> {
        let _guard = self.apply_lock.lock().await;
        // Another replica may have applied since we last looked.
        let _ = self.sync_from_store().await;
        let current = self.current();
        let current_version = current.as_ref().map_or(0, |c| c.version);
        let rejected = |errors| ApplyOutcome {
            version: current_version,
            applied: false,
            diff: String::new(),
            errors,
        };
        let sealed = match seal_document(yaml, &self.master, false) {
            Ok(s) => s,
            Err(errors) => return Ok(rejected(errors)),
        };
        let stored = sealed.yaml.unwrap_or_else(|| yaml.to_string());
        let compiled = match self.compile_yaml(&stored, current_version + 1) {
            Ok(c) => c,
            Err(errors) => return Ok(rejected(errors)),
        };
        let diff = crate::diff::diff(current.as_ref().map(|c| &c.snapshot), &compiled.snapshot);
        if dry_run {
            return Ok(ApplyOutcome {
                version: current_version,
                applied: false,
                diff,
                errors: Vec::new(),
            });
        }
        self.store_and_publish(&stored, author, comment, diff).await
    }

    async fn store_and_publish(
        &self,
        yaml: &str,
        author: &str,
        comment: &str,
        diff: String,
    ) -> Result<ApplyOutcome, ControlError> {
        let version = self.store.insert_version(yaml, author, comment).await?;
        self.publish(version, yaml.to_string())
            .map_err(ControlError::Invalid)?;
        tracing::info!(version, author, "policy applied");
        Ok(ApplyOutcome {
            version,
            applied: true,
            diff,
            errors: Vec::new(),
        })
    }

    /// Makes `version`'s document current again, as a new version.
    pub async fn rollback(&self, version: u64, author: &str) -> Result<ApplyOutcome, ControlError> {
        let _guard = self.apply_lock.lock().await;
        let _ = self.sync_from_store().await;
        let old = self
            .store
            .get(version)
            .await?
            .filter(|_| version > 0)
            .ok_or(ControlError::NoSuchVersion(version))?;
        let current = self.current();
        let compiled = self
            .compile_yaml(&old.yaml, 0)
            .map_err(ControlError::Invalid)?;
        let diff = crate::diff::diff(current.as_ref().map(|c| &c.snapshot), &compiled.snapshot);
        self.store_and_publish(
            &old.yaml,
            author,
            &format!("rollback to version {version}"),
            diff,
        )
        .await
    }

    /// Re-seals stored keys under the current master key and publishes the
    /// result as a new version, which also makes every egress re-read its
    /// env/file key references.
    pub async fn rotate_keys(&self, author: &str) -> Result<ApplyOutcome, ControlError> {
        let _guard = self.apply_lock.lock().await;
        let _ = self.sync_from_store().await;
        let current = self.current().ok_or(ControlError::NoPolicy)?;
        let sealed =
            seal_document(&current.yaml, &self.master, true).map_err(ControlError::Invalid)?;
        let yaml = sealed.yaml.unwrap_or_else(|| current.yaml.clone());
        self.store_and_publish(
            &yaml,
            author,
            &format!(
                "keys rotated ({} sealed key(s) re-encrypted)",
                sealed.resealed
            ),
            String::new(),
        )
        .await
    }

    pub async fn get_policy(&self, version: u64) -> Result<pb::GetPolicyResponse, ControlError> {
        let v = self.store.get(version).await?.ok_or(if version == 0 {
            ControlError::NoPolicy
        } else {
            ControlError::NoSuchVersion(version)
        })?;
        let history = self.store.history(100).await?;
        let msg = |v: crate::store::PolicyVersion| pb::PolicyVersionMsg {
            version: v.version,
            yaml: v.yaml,
            author: v.author,
            created_at_ms: v.created_at_ms,
            comment: v.comment,
        };
        Ok(pb::GetPolicyResponse {
            policy: Some(msg(v)),
            history: history.into_iter().map(msg).collect(),
        })
    }

    pub async fn list_nodes(&self) -> Result<pb::ListNodesResponse, ControlError> {
        // The latest stored version, not only ours: nodes of another
        // replica are judged against the same number.
        let current = self.store.latest_version().await?;
        let nodes = self.store.nodes().await?;
        Ok(pb::ListNodesResponse {
            current_version: current,
            nodes: nodes
                .into_iter()
                .map(|n| pb::NodeStatusMsg {
                    health: health(&n, current).into(),
                    id: n.id,
                    role: n.role,
                    region: n.region,
                    build: n.build,
                    acked_version: n.acked_version,
                    nacked_version: n.nacked_version,
                    nack_reason: n.nack_reason,
                    last_seen_ms: n.last_seen_ms,
                    replica: n.replica,
                })
                .collect(),
        })
    }

    fn operator_principal<T>(&self, req: &Request<T>) -> Result<String, Status> {
        if let Some(token) = &self.admin_token {
            let presented = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if let Some(p) = presented {
                if constant_time_eq(p.as_bytes(), token.expose().as_bytes()) {
                    return Ok("admin-token".into());
                }
            }
        }
        if let Some(certs) = req.peer_certs() {
            if let Some(leaf) = certs.first() {
                let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, leaf.as_ref()));
                if self
                    .operator_certs
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case(&fp))
                {
                    return Ok(format!("cert:{}", &fp[..16]));
                }
            }
        }
        if self.open_operator_api {
            return Ok("anonymous".into());
        }
        Err(Status::unauthenticated(
            "operator API: present `authorization: Bearer <admin token>` or an operator certificate",
        ))
    }

    /// Checks an HTTP bearer token the way the gRPC API does; the
    /// authenticated principal, or `None`.
    pub fn http_principal(&self, authorization: Option<&str>) -> Option<String> {
        if let Some(token) = &self.admin_token {
            let presented = authorization.and_then(|v| v.strip_prefix("Bearer "));
            if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.expose().as_bytes()))
            {
                return Some("admin-token".into());
            }
        }
        self.open_operator_api.then(|| "anonymous".into())
    }

    /// The SHA-256 of the node's certificate when node certificates are
    /// required (the identity the node's id is bound to).
    fn authorize_node<T>(&self, req: &Request<T>) -> Result<Option<String>, Status> {
        let leaf = req.peer_certs().and_then(|c| c.first().cloned());
        match leaf {
            Some(leaf) if self.require_node_cert => Ok(Some(hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                leaf.as_ref(),
            )))),
            None if self.require_node_cert => Err(Status::unauthenticated(
                "node API requires a client certificate",
            )),
            _ => Ok(None),
        }
    }

    /// Takes `id` for this certificate while its stream lasts; refused when
    /// another certificate holds it.
    fn bind_node(
        self: &Arc<Self>,
        id: &str,
        fingerprint: Option<String>,
        region: &str,
    ) -> Result<Option<SessionGuard>, Status> {
        let Some(fingerprint) = fingerprint else {
            return Ok(None);
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions
            .entry(id.to_string())
            .or_insert_with(|| NodeSession {
                fingerprint: fingerprint.clone(),
                region: region.to_string(),
                streams: 0,
            });
        if session.fingerprint != fingerprint || session.region != region {
            tracing::warn!(node = %id, "node refused: its id is held by another certificate");
            return Err(Status::already_exists(format!(
                "node id {id:?} is held by another connected certificate"
            )));
        }
        session.streams += 1;
        Ok(Some(SessionGuard {
            cp: self.clone(),
            id: id.to_string(),
        }))
    }

    /// The region of the session `id` holds under this certificate; an ACK
    /// or a report for an id the caller does not hold is refused.
    fn bound_region(&self, id: &str, fingerprint: &str) -> Result<String, Status> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(id) {
            Some(s) if s.fingerprint == fingerprint => Ok(s.region.clone()),
            _ => Err(Status::permission_denied(format!(
                "node id {id:?} is not held by this certificate (open a Watch first)"
            ))),
        }
    }

    /// Keeps only scores of targets and regions the current policy has: a
    /// node must not grow the score table pushed to every node.
    fn known_scores(&self, batch: &mut pb::TelemetryBatch) {
        let Some(p) = self.current() else {
            batch.targets.clear();
            batch.backhaul.clear();
            return;
        };
        let snap = &p.snapshot;
        let region_ok = |r: &str| r.is_empty() || snap.regions().contains_key(r);
        batch.targets.retain(|t| {
            snap.providers().get(&t.provider).is_some_and(|prov| {
                t.model.len() <= 256 && (prov.models.is_empty() || prov.models.contains(&t.model))
            }) && region_ok(&t.region)
        });
        if !region_ok(&batch.region) {
            batch.backhaul.clear();
        }
        batch
            .backhaul
            .retain(|r| snap.regions().contains_key(&r.egress_region));
    }
}

struct NodeSession {
    fingerprint: String,
    region: String,
    streams: usize,
}

/// Releases a node id when the last stream holding it ends.
struct SessionGuard {
    cp: Arc<ControlPlane>,
    id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut sessions = self.cp.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = sessions.get_mut(&self.id) {
            s.streams = s.streams.saturating_sub(1);
            if s.streams == 0 {
                sessions.remove(&self.id);
            }
        }
    }
}

/// The author recorded with a version: who authenticated, with what the
/// caller claims to be only as a label (it is not verified).
pub(crate) fn audit_author(principal: String, claimed: &str) -> String {
    let claimed: String = claimed
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    if claimed.is_empty() || claimed == principal {
        principal
    } else {
        format!("{principal} (claims {claimed})")
    }
}

fn health(n: &NodeRecord, current: u64) -> &'static str {
    if !n.connected {
        "disconnected"
    } else if n.nacked_version >= current && n.nacked_version > n.acked_version {
        "rejected"
    } else if n.acked_version < current {
        "behind"
    } else {
        "ok"
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a node with this hello may receive: edges no key material at all;
/// an egress only the pools of its own region, and only when the region's
/// jurisdiction is allowed for the pool.
pub fn tailor(
    full: &pb::SnapshotMsg,
    snapshot: &Snapshot,
    role: pb::NodeRole,
    region: &str,
) -> pb::SnapshotMsg {
    let mut msg = full.clone();
    let region_jurisdiction = snapshot
        .regions()
        .get(region)
        .and_then(|r| r.jurisdiction.clone());
    for p in msg.providers.values_mut() {
        if role != pb::NodeRole::Egress {
            p.key_pools.clear();
            continue;
        }
        let provider_jurisdiction = p.jurisdiction.clone();
        p.key_pools.retain(|pool| {
            let region_ok = pool.region.is_empty() || pool.region == region;
            let allowed: Vec<String> = if pool.jurisdictions.is_empty() {
                (!provider_jurisdiction.is_empty())
                    .then(|| provider_jurisdiction.clone())
                    .into_iter()
                    .collect()
            } else {
                pool.jurisdictions.clone()
            };
            let jurisdiction_ok = allowed.is_empty()
                || region_jurisdiction
                    .as_ref()
                    .is_some_and(|j| allowed.contains(j));
            region_ok && jurisdiction_ok
        });
    }
    msg
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotMsg, Status>> + Send>>;

#[derive(Clone)]
struct Services(Arc<ControlPlane>);

#[tonic::async_trait]
impl Operator for Services {
    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let who = self.0.operator_principal(&req)?;
        let r = req.into_inner();
        let author = audit_author(who, &r.author);
        let out = self
            .0
            .apply(&r.yaml, r.dry_run, &author, &r.comment)
            .await?;
        Ok(Response::new(out.into()))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        self.0.operator_principal(&req)?;
        Ok(Response::new(
            self.0.get_policy(req.into_inner().version).await?,
        ))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let who = self.0.operator_principal(&req)?;
        let r = req.into_inner();
        let author = audit_author(who, &r.author);
        Ok(Response::new(
            self.0.rollback(r.version, &author).await?.into(),
        ))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.0.operator_principal(&req)?;
        Ok(Response::new(self.0.list_nodes().await?))
    }

    async fn rotate_keys(
        &self,
        req: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        let who = self.0.operator_principal(&req)?;
        let r = req.into_inner();
        let author = audit_author(who, &r.author);
        Ok(Response::new(self.0.rotate_keys(&author).await?.into()))
    }

    async fn create_virtual_key(
        &self,
        req: Request<pb::CreateVirtualKeyRequest>,
    ) -> Result<Response<pb::CreateVirtualKeyResponse>, Status> {
        let who = self.0.operator_principal(&req)?;
        let author = audit_author(who, "");
        Ok(Response::new(
            self.0.create_virtual_key(req.into_inner(), &author).await?,
        ))
    }

    async fn list_virtual_keys(
        &self,
        req: Request<pb::ListVirtualKeysRequest>,
    ) -> Result<Response<pb::ListVirtualKeysResponse>, Status> {
        self.0.operator_principal(&req)?;
        Ok(Response::new(
            self.0.list_virtual_keys(&req.into_inner().tenant).await?,
        ))
    }

    async fn revoke_virtual_key(
        &self,
        req: Request<pb::RevokeVirtualKeyRequest>,
    ) -> Result<Response<pb::RevokeVirtualKeyResponse>, Status> {
        let who = self.0.operator_principal(&req)?;
        let author = audit_author(who, "");
        let revoked = self
            .0
            .revoke_virtual_key(&req.into_inner().id, &author)
            .await?;
        Ok(Response::new(pb::RevokeVirtualKeyResponse { revoked }))
    }

    async fn query_usage(
        &self,
        req: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        self.0.operator_principal(&req)?;
        Ok(Response::new(self.0.query_usage(&req.into_inner()).await?))
    }
}

#[tonic::async_trait]
impl Node for Services {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::Hello>) -> Result<Response<WatchStream>, Status> {
        let fingerprint = self.0.authorize_node(&req)?;
        let peer = req.peer_certs();
        let hello = req.into_inner();
        if hello.id.is_empty() || hello.id.len() > 128 {
            return Err(Status::invalid_argument("hello.id: 1 to 128 characters"));
        }
        let role = match pb::NodeRole::try_from(hello.role) {
            Ok(r @ (pb::NodeRole::Edge | pb::NodeRole::Egress)) => r,
            _ => return Err(Status::invalid_argument("hello.role: edge or egress")),
        };
        if role == pb::NodeRole::Egress && hello.region.is_empty() {
            return Err(Status::invalid_argument(
                "hello.region: required for an egress",
            ));
        }
        let role_name = if role == pb::NodeRole::Egress {
            "egress"
        } else {
            "edge"
        };
        if let Some(leaf) = peer.as_ref().and_then(|c| c.first()) {
            if !certificate_has_scope(leaf, role_name, &hello.region) {
                if self.0.require_node_scope {
                    tracing::warn!(node = %hello.id, role = role_name, region = %hello.region, "node refused: certificate not scoped to its claim");
                    return Err(Status::permission_denied(format!(
                        "this certificate is not scoped to {role_name} in region {:?} (it must carry the DNS name {})",
                        hello.region,
                        node_scope_name(role_name, &hello.region)
                    )));
                }
                tracing::warn!(node = %hello.id, role = role_name, region = %hello.region, "INSECURE: node certificate not scoped to its claimed role and region (--insecure-allow-unscoped-node-certs)");
            }
        }
        // Which certificate holds the session (public; shows renewals).
        let cert: String = fingerprint
            .as_deref()
            .map(|f| f.chars().take(16).collect())
            .unwrap_or_default();
        let session = self.0.bind_node(&hello.id, fingerprint, &hello.region)?;
        let cp = self.0.clone();
        cp.store
            .upsert_node(&NodeRecord {
                id: hello.id.clone(),
                role: role
                    .as_str_name()
                    .trim_start_matches("NODE_ROLE_")
                    .to_lowercase(),
                region: hello.region.clone(),
                build: hello.build.clone(),
                last_seen_ms: now_ms(),
                connected: true,
                replica: cp.replica.clone(),
                ..NodeRecord::default()
            })
            .await
            .map_err(ControlError::from)?;
        tracing::info!(node = %hello.id, role = ?role, region = %hello.region, have = hello.have_version, %cert, "node connected");
        let edge_id = (role == pb::NodeRole::Edge).then(|| hello.id.clone());
        if let Some(id) = &edge_id {
            cp.tenancy.edge_connected(id);
        }
        let (tx, rx) = mpsc::channel::<Result<pb::SnapshotMsg, Status>>(4);
        tokio::spawn(async move {
            let held: Option<SessionGuard> = session;
            let mut stopping = cp.stopping.clone();
            let mut policy = cp.current.subscribe();
            let mut scores = cp.scores.subscribe();
            let mut tenants = cp.tenancy.state.subscribe();
            let mut sent = (0u64, 0u64);
            loop {
                let published = policy.borrow_and_update().clone();
                let (score_generation, score_msg) = scores.borrow_and_update().clone();
                let (tenant_generation, tenant_state) = tenants.borrow_and_update().clone();
                // Both only grow, so their sum changes whenever either does:
                // the node sees one "refresh" generation for both.
                let generation = score_generation + tenant_generation;
                if let Some(p) = published {
                    if (p.version, generation) != sent {
                        let mut msg = tailor(&p.wire, &p.snapshot, role, &hello.region);
                        tailor_tenants(&mut msg, &tenant_state, edge_id.as_deref());
                        msg.scores = Some((*score_msg).clone());
                        msg.scores_generation = generation;
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                        sent = (p.version, generation);
                    }
                }
                tokio::select! {
                    r = policy.changed() => if r.is_err() { break },
                    r = scores.changed() => if r.is_err() { break },
                    r = tenants.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                    _ = stopping.wait_for(|s| *s) => break,
                }
            }
            tracing::info!(node = %hello.id, "node disconnected");
            if let Some(id) = &edge_id {
                cp.tenancy.edge_disconnected(id);
            }
            let bound = held.is_some();
            drop(held);
            // A node that moved to a renewed certificate has already
            // watched again: it is connected, whatever this old stream says.
            let rebound = bound
                && cp
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&hello.id);
            if rebound {
                return;
            }
            if let Err(e) = cp.store.set_connected(&hello.id, false, &cp.replica).await {
                tracing::warn!(error = %e, node = %hello.id, "cannot record disconnect");
            }
            // Bound again while the store was written: the new stream's
            // "connected" may have landed first.
            let bound_now = bound
                && cp
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&hello.id);
            if bound_now {
                let _ = cp.store.set_connected(&hello.id, true, &cp.replica).await;
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let fingerprint = self.0.authorize_node(&req)?;
        let a = req.into_inner();
        if let Some(fp) = &fingerprint {
            self.0.bound_region(&a.node_id, fp)?;
        }
        // A NACK reason comes from the node; bound it before storing.
        let reason: String = a.reason.chars().take(1000).collect();
        self.0
            .ack_counter
            .with_label_values(&[if a.ok { "ack" } else { "nack" }])
            .inc();
        if a.ok {
            tracing::debug!(node = %a.node_id, version = a.version, "ack");
        } else {
            tracing::warn!(node = %a.node_id, version = a.version, reason = %reason, "nack");
        }
        // Announced before the registry write: watchers of propagation
        // should not wait on the store's fsync.
        let _ = self.0.acks.send(AckEvent {
            node_id: a.node_id.clone(),
            version: a.version,
            ok: a.ok,
            reason: reason.clone(),
        });
        self.0
            .store
            .record_ack(&a.node_id, a.version, a.ok, &reason)
            .await
            .map_err(ControlError::from)?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn report(
        &self,
        req: Request<tonic::Streaming<pb::TelemetryBatch>>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let fingerprint = self.0.authorize_node(&req)?;
        let mut stream = req.into_inner();
        let mut stopping = self.0.stopping.clone();
        loop {
            let mut batch = tokio::select! {
                m = stream.message() => match m? {
                    Some(b) => b,
                    None => break,
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            if let Some(fp) = &fingerprint {
                // The region comes from the bound (scope-checked) session,
                // not from what the batch says.
                batch.region = self.0.bound_region(&batch.node_id, fp)?;
            }
            let health = batch.health.take();
            if let Some(health) = health.filter(|_| (1..=128).contains(&batch.node_id.len())) {
                self.0
                    .health_reports
                    .record(&batch.node_id, &batch.region, health);
            }
            self.0.known_scores(&mut batch);
            let now = Instant::now();
            self.0
                .board
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ingest(&batch, now);
        }
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn ship_usage(
        &self,
        req: Request<pb::UsageBatch>,
    ) -> Result<Response<pb::UsageAck>, Status> {
        let fingerprint = self.0.authorize_node(&req)?;
        let batch = req.into_inner();
        if let Some(fp) = &fingerprint {
            self.0.bound_region(&batch.node_id, fp)?;
        }
        if batch.records.len() > MAX_USAGE_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_USAGE_BATCH} records per batch"
            )));
        }
        let stored = self
            .0
            .store
            .insert_usage(&batch.node_id, &batch.records)
            .await
            .map_err(ControlError::from)?;
        self.0.tenancy.observe(&batch.node_id, &batch.records);
        Ok(Response::new(pb::UsageAck {
            stored: stored as u32,
        }))
    }
}

/// Records one `ShipUsage` call may carry (nodes send at most this many).
pub const MAX_USAGE_BATCH: usize = 1000;

/// A running replica; dropping it does not stop it, [`Self::shutdown`] does.
pub struct RunningControlPlane {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<ControlPlane>,
    pub lifecycle: Arc<Lifecycle>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningControlPlane {
    /// The bound gRPC address (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Reloads the gRPC certificate when its files changed (or `force`,
    /// on SIGHUP): new connections use it, open ones keep theirs.
    pub fn reload_tls(&self, force: bool) -> bool {
        self.tls.as_ref().is_some_and(|t| t.reload(force))
    }

    /// Readiness goes false, then the replica stops: operator calls in
    /// progress finish (up to `grace`), node streams end and the nodes
    /// reconnect to another replica (they keep serving their snapshot
    /// meanwhile).
    pub async fn drain(self, grace: Duration) {
        self.lifecycle.start_draining();
        tracing::info!(target: "switchyard::lifecycle", grace_s = grace.as_secs(), "draining: readiness is false");
        let admin_shutdown = self.admin_shutdown.clone();
        if tokio::time::timeout(grace, self.shutdown()).await.is_err() {
            tracing::warn!(target: "switchyard::lifecycle", "grace period over; stopping now");
        }
        let _ = admin_shutdown.send(true);
    }

    /// Stops listening and closes every node stream.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.admin_shutdown.send(true);
        for mut t in self.tasks {
            // Node streams end on the signal, so the graceful stop is quick;
            // the timeout only guards against a stuck peer.
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
        self.state.store.close().await;
    }
}

/// Refuses configurations that leave the operator API open or send its
/// token in the clear, unless the operator asked for that explicitly.
fn check_operator_auth(config: &ServerConfig) -> Result<bool, ServeError> {
    let authenticated = config.admin_token.is_some() || !config.operator_cert_sha256.is_empty();
    if !authenticated {
        if !config.insecure_open_operator_api {
            return Err(ServeError::OpenOperatorApi);
        }
        tracing::warn!("INSECURE: the operator API is open to anyone who reaches it (--insecure-open-operator-api); development only");
        return Ok(true);
    }
    if config.admin_token.is_some() {
        let plaintext = config
            .tls
            .is_none()
            .then_some(config.listen)
            .into_iter()
            .chain(config.http_listen);
        for addr in plaintext {
            if addr.ip().is_loopback() {
                tracing::warn!(%addr, "the admin token travels in plaintext on this loopback listener");
            } else if config.insecure_open_operator_api {
                tracing::warn!(%addr, "INSECURE: the admin token travels in plaintext on a non-loopback listener (--insecure-open-operator-api)");
            } else {
                return Err(ServeError::PlaintextToken { addr });
            }
        }
    }
    Ok(false)
}

/// Opens the store, publishes its latest version and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningControlPlane, ServeError> {
    let open_operator_api = check_operator_auth(&config)?;
    let require_node_cert = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if require_node_cert && !config.require_node_scope {
        tracing::warn!("INSECURE: node certificates are not checked against the role and region nodes claim (--insecure-allow-unscoped-node-certs): any fleet certificate can receive any region's keys");
    }
    let store = Store::open(&config.store_url).await?;
    let (current, _) = watch::channel(None);
    let (scores, _) = watch::channel((0, Arc::new(pb::ScoresMsg::default())));
    let (acks, _) = broadcast::channel(4096);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let state = Arc::new(ControlPlane {
        store,
        replica: config.replica_id.clone(),
        master: config.master_keys,
        admin_token: config.admin_token.clone(),
        operator_certs: config.operator_cert_sha256.clone(),
        require_node_cert,
        require_node_scope: config.require_node_scope,
        open_operator_api,
        sessions: Mutex::new(HashMap::new()),
        current,
        scores,
        board: Mutex::new(ScoreBoard::new(config.score_window)),
        acks,
        apply_lock: tokio::sync::Mutex::new(()),
        stopping: shutdown_rx.clone(),
        tenancy: Tenancy::default(),
        ack_counter: {
            let c = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "control_snapshot_acks_total",
                    "Snapshot versions nodes acknowledged (ack) or rejected (nack), as received by this replica",
                ),
                &["result"],
            )
            .expect("metric");
            // Both series exist from the start, so a rate of NACKs is 0, not absent.
            c.with_label_values(&["ack"]);
            c.with_label_values(&["nack"]);
            c
        },
        health_reports: Default::default(),
    });
    state.sync_from_store().await?;
    if !state.require_node_cert {
        tracing::warn!("no client CA: nodes are not authenticated (use --tls-cert/--tls-key/--client-ca outside development)");
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    // Watch and Report streams live as long as the node, so there is no
    // per-request timeout; dead peers are found by keepalive, and the
    // number of connections and streams is bounded.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(64))
        .concurrency_limit_per_connection(64)
        .http2_max_header_list_size(Some(16 * 1024));
    // TLS is terminated by `crate::tls` rather than tonic, so the
    // certificate can be renewed under a running replica.
    let server_tls = match &config.tls {
        Some(tls) => Some(Arc::new(crate::tls::ServerTls::new(
            &tls.cert,
            tls.key.expose().as_bytes(),
            tls.client_ca.as_deref(),
            config.tls_files.clone(),
        )?)),
        None => None,
    };
    let services = Services(state.clone());
    let mut stop = shutdown_rx.clone();
    let router = builder
        .add_service(OperatorServer::new(services.clone()))
        .add_service(NodeServer::new(services));
    let mut tasks = Vec::new();
    let grpc_limiter = ConnLimiter::new(&config.limits);
    let handshake_timeout = config.limits.header_timeout;
    let server_tls_task = server_tls.clone();
    tasks.push(tokio::spawn(async move {
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let served = match server_tls_task {
            Some(tls) => {
                let incoming = tls.incoming(listener, grpc_limiter, handshake_timeout);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
            None => {
                let incoming = crate::limits::incoming(listener, grpc_limiter);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    let http_addr = match config.http_listen {
        Some(addr) => {
            let (addr, task) = crate::http::serve(
                addr,
                state.clone(),
                config.limits.clone(),
                ConnLimiter::new(&config.limits),
                shutdown_rx.clone(),
            )
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };

    tasks.push(tokio::spawn(follow_store(
        state.clone(),
        config.poll_interval,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::tenancy::refresh_loop(
        state.clone(),
        TENANT_REFRESH,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(refresh_scores(
        state.clone(),
        config.score_interval,
        shutdown_rx,
    )));
    let lifecycle = Lifecycle::new();
    let (admin_shutdown, admin_rx) = watch::channel(false);
    let admin_addr = match config.admin_listen {
        Some(addr) => {
            let admin = AdminListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let local = admin.local_addr();
            // Not in `tasks`: it answers `/readyz` until the drain is over.
            admin.serve_with_pages(
                lifecycle.clone(),
                control_metrics(state.clone()),
                Some(crate::status::pages(state.clone())),
                admin_rx,
            );
            Some(local)
        }
        None => None,
    };
    lifecycle.mark_ready();
    tracing::info!(%grpc_addr, ?http_addr, ?admin_addr, replica = %config.replica_id, version = state.current_version(), "control plane listening");
    Ok(RunningControlPlane {
        grpc_addr,
        http_addr,
        admin_addr,
        state,
        lifecycle,
        tls: server_tls,
        shutdown,
        admin_shutdown,
        tasks,
    })
}

/// How often virtual keys (also from other replicas), spend and leases are
/// refreshed; creating or revoking a key on this replica pushes at once.
const TENANT_REFRESH: Duration = Duration::from_millis(500);
/// The control plane's `/metrics`: the latest policy version and how many
/// nodes are in each state (the lifecycle's gauges are added by the admin
/// listener). Node counts, not per-node series: node ids change with
/// every restart, and a series per id would grow without bound.
fn control_metrics(cp: Arc<ControlPlane>) -> MetricsFn {
    use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};
    let registry = Registry::new_custom(Some("switchyard".into()), None).expect("registry");
    let version = IntGauge::new(
        "control_policy_version",
        "Latest policy version in the store",
    )
    .expect("metric");
    let nodes = IntGaugeVec::new(
        Opts::new(
            "control_nodes",
            "Nodes known to the store by role and state: ok (acknowledged the latest version), behind (connected, not acknowledged yet), rejected (NACKed it), disconnected",
        ),
        &["role", "state"],
    )
    .expect("metric");
    let store_up = IntGauge::new(
        "control_store_up",
        "1 when the last scrape could read the store",
    )
    .expect("metric");
    registry
        .register(Box::new(version.clone()))
        .expect("register");
    registry
        .register(Box::new(nodes.clone()))
        .expect("register");
    registry
        .register(Box::new(store_up.clone()))
        .expect("register");
    registry
        .register(Box::new(cp.ack_counter.clone()))
        .expect("register");
    let registry = Arc::new(registry);
    Arc::new(move || {
        let (cp, registry) = (cp.clone(), registry.clone());
        let (version, nodes, store_up) = (version.clone(), nodes.clone(), store_up.clone());
        Box::pin(async move {
            match cp.list_nodes().await {
                Ok(list) => {
                    store_up.set(1);
                    version.set(list.current_version as i64);
                    nodes.reset();
                    for role in ["edge", "egress"] {
                        for state in ["ok", "behind", "rejected", "disconnected"] {
                            nodes.with_label_values(&[role, state]).set(0);
                        }
                    }
                    for n in &list.nodes {
                        let role = if n.role == "edge" { "edge" } else { "egress" };
                        let state = match n.health.as_str() {
                            s @ ("ok" | "behind" | "rejected" | "disconnected") => s,
                            _ => "disconnected",
                        };
                        nodes.with_label_values(&[role, state]).inc();
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics: cannot read the node registry");
                    store_up.set(0);
                }
            }
            crate::admin::render(&[&registry])
        })
    })
}

/// Picks up versions stored by other replicas: PostgreSQL NOTIFY when
/// available, polling always (a missed notification costs one interval).
async fn follow_store(cp: Arc<ControlPlane>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut listener = match cp.store.postgres_pool() {
        Some(pool) => match sqlx::postgres::PgListener::connect_with(pool).await {
            Ok(mut l) => match l.listen("switchyard_policy").await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling only");
                None
            }
        },
        None => None,
    };
    loop {
        let notified = async {
            match listener.as_mut() {
                Some(l) => {
                    if l.recv().await.is_err() {
                        tokio::time::sleep(every).await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
            _ = notified => {}
        }
        if let Err(e) = cp.sync_from_store().await {
            tracing::warn!(error = %e, "cannot sync from the store");
        }
    }
}

/// Recomputes the scores and publishes them when they changed.
async fn refresh_scores(cp: Arc<ControlPlane>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(every) => {}
        }
        let scores = cp
            .board
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .scores(Instant::now());
        let mut msg = pb::ScoresMsg::from(&scores);
        let size = prost::Message::encoded_len(&msg);
        if size > MAX_SCORES_BYTES {
            tracing::warn!(
                size,
                limit = MAX_SCORES_BYTES,
                "scores too large to push; keeping the previous ones"
            );
            continue;
        }
        cp.scores.send_if_modified(|(generation, old)| {
            // The timestamp alone changing is not news for the nodes.
            msg.computed_at_ms = old.computed_at_ms;
            if **old == msg {
                return false;
            }
            msg.computed_at_ms = scores.computed_at_ms;
            *generation += 1;
            *old = Arc::new(std::mem::take(&mut msg));
            true
        });
    }
}

#[cfg(test)]
mod scope_tests {
    use super::*;

    fn cert_with(names: &[&str]) -> tonic::transport::CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        ck.cert.der().clone()
    }

    #[test]
    fn node_certificates_are_scoped_by_role_and_region() {
        let cert = cert_with(&["localhost", &node_scope_name("egress", "eu")]);
        assert!(certificate_has_scope(&cert, "egress", "eu"));
        assert!(!certificate_has_scope(&cert, "egress", "us"));
        assert!(!certificate_has_scope(&cert, "edge", "eu"));
        let unscoped = cert_with(&["localhost"]);
        assert!(!certificate_has_scope(&unscoped, "egress", "eu"));
        // A region that is not a DNS label can never match.
        assert!(!certificate_has_scope(&cert, "egress", "e u"));
    }
}
