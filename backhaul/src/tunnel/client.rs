//! The edge end of the backhaul: warm connections to every egress node and
//! the [`Upstream`] that sends each request over one new stream.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::backhaul as wire;
use switchyard_proto::health::{self, Availability, Health, Outcome, Transition};
use switchyard_proto::Snapshot;
use tokio::sync::{watch, Notify};

use super::frame::{self, FrameError, FrameKind};
use super::tls::{says_ready, speaks_accepted, NodeTls};
use super::TunnelError;
use crate::dns::{DnsError, HickoryResolver};
use crate::egress::SharedSnapshot;
use crate::idle::IdleTimer;
use crate::request::{EgressRequest, EgressResponse, RequestStats, ResponseBody};
use crate::stream::ErrorFramer;
use crate::Upstream;

/// Where the egress nodes of each region are. The static implementation
/// reads the policy and command-line flags; the control plane will provide
/// one fed by its snapshots, and hand it to [`TunnelRouter::reconcile`].
pub trait EgressDirectory: Send + Sync {
    /// Region name → egress addresses (`host:port`).
    fn regions(&self) -> BTreeMap<String, Vec<String>>;
}

/// Egress addresses from the policy's `regions.R.egress` and `--egress` flags.
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory {
    regions: BTreeMap<String, Vec<String>>,
}

impl StaticDirectory {
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let mut d = StaticDirectory::default();
        for (name, r) in snap.regions() {
            for addr in &r.egress {
                d.add(name, addr);
            }
        }
        d
    }

    pub fn add(&mut self, region: &str, addr: &str) {
        let list = self.regions.entry(region.to_string()).or_default();
        if !list.iter().any(|a| a == addr) {
            list.push(addr.to_string());
        }
    }

    /// Parses a `REGION=HOST:PORT` flag.
    pub fn parse_flag(flag: &str) -> Result<(String, String), AddressError> {
        let (region, addr) = flag
            .split_once('=')
            .ok_or_else(|| AddressError::NotRegionAddress(flag.to_string()))?;
        split_host_port(addr)?;
        if region.is_empty() {
            return Err(AddressError::EmptyRegion(flag.to_string()));
        }
        Ok((region.to_string(), addr.to_string()))
    }
}

impl EgressDirectory for StaticDirectory {
    fn regions(&self) -> BTreeMap<String, Vec<String>> {
        self.regions.clone()
    }
}

/// Why an egress address (or `--egress` flag) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("expected REGION=HOST:PORT, got {0:?}")]
    NotRegionAddress(String),
    #[error("empty region in {0:?}")]
    EmptyRegion(String),
    #[error("expected host:port, got {0:?}")]
    NoPort(String),
    #[error("bad port in {0:?}")]
    BadPort(String),
    #[error("empty host in {0:?}")]
    EmptyHost(String),
}

/// Why dialling an egress node failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("{0} is a name and there is no DNS resolver")]
    NoResolver(String),
    #[error(transparent)]
    Resolve(#[from] DnsError),
    #[error("{0} has no address")]
    NoAddress(String),
    #[error("cannot start the handshake: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("the egress did not say READY: {0}")]
    NotReady(String),
    #[error("no handshake within {} s", .0.as_secs())]
    HandshakeTimeout(Duration),
}

fn split_host_port(addr: &str) -> Result<(&str, u16), AddressError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| AddressError::NoPort(addr.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port
        .parse()
        .map_err(|_| AddressError::BadPort(addr.to_string()))?;
    if host.is_empty() {
        return Err(AddressError::EmptyHost(addr.to_string()));
    }
    Ok((host, port))
}

/// How long a connection must have lived for its loss to reset the backoff;
/// a peer that accepts and then drops us at once (a refused client
/// certificate) must not be redialled in a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request for a region whose egress nodes are all (re)connecting waits
/// this long for one to come up before it fails.
const WAIT_FOR_EGRESS: Duration = Duration::from_secs(2);
/// Egress nodes tried per request before giving up.
const MAX_ATTEMPTS: usize = 3;
/// Added to the provider deadline and stream idle timeout: the egress
/// enforces those itself and answers with an error; this bound only catches
/// an egress that went silent.
const SLACK: Duration = Duration::from_secs(5);
/// Stream stop code: the client went away.
const STOP_CANCELLED: u32 = 0;
/// Stream stop and reset code: the egress did not acknowledge the request
/// in time and it went to another egress.
const STOP_ABANDONED: u32 = 3;
/// Bounds of [`ack_deadline`].
const ACK_MIN: Duration = Duration::from_millis(100);
const ACK_MAX: Duration = Duration::from_millis(300);
/// How often a suspect connection is checked for signs of life.
const PROBE_EVERY: Duration = Duration::from_millis(50);

struct Node {
    region: String,
    addr: String,
    conn: ArcSwapOption<quinn::Connection>,
    /// What the next dial presents and trusts (swapped on a certificate reload).
    client: ArcSwap<quinn::ClientConfig>,
    in_flight: AtomicUsize,
    /// Missed an acknowledgement deadline and has sent nothing since: new
    /// requests go elsewhere while any other node is healthy.
    suspect: AtomicBool,
    /// Said GOAWAY (or refused a request as draining): its open streams
    /// finish, new requests go to other nodes until a new connection.
    draining: AtomicBool,
    removed: AtomicBool,
    remove: Notify,
    /// Its breaker on the router's board: opened by transport failures
    /// (streams lost or reset, requests not taken), never by what the
    /// provider answered.
    breaker: Option<Arc<health::Entry>>,
}

impl Node {
    fn connection(&self) -> Option<quinn::Connection> {
        let c = self.conn.load();
        c.as_ref()
            .filter(|c| c.close_reason().is_none())
            .map(|c| (**c).clone())
    }

    fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The egress is going away: no new requests on this connection.
    fn mark_draining(&self, changed: &watch::Sender<u64>) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(target: "switchyard::backhaul", region = %self.region, egress = %self.addr,
                "egress is draining; new requests go to other egress nodes");
            changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Lower is better: RTT scaled by the requests already in flight.
    fn score(&self, conn: &quinn::Connection) -> u128 {
        let rtt = conn.rtt().as_micros().max(1);
        rtt * (1 + self.in_flight.load(Ordering::Relaxed) as u128)
    }
}

/// Counts a request against its egress node for as long as it lives.
struct InFlight(Arc<Node>);

impl InFlight {
    fn new(node: Arc<Node>) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(node)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct TunnelConfig {
    /// The edge's own region: preferred for providers without a region.
    pub region: String,
    pub tls: NodeTls,
}

/// The edge's [`Upstream`] in multi-node mode.
pub struct TunnelRouter {
    endpoint: quinn::Endpoint,
    /// Client configurations are per egress region: each accepts only that
    /// region's egress certificates. Swapped by [`TunnelRouter::reload_tls`].
    tls: ArcSwap<NodeTls>,
    resolver: Option<HickoryResolver>,
    region: String,
    snapshot: SharedSnapshot,
    nodes: ArcSwap<Vec<Arc<Node>>>,
    /// Bumped on every connection change, for requests waiting for a node.
    changed: watch::Sender<u64>,
    runtime: tokio::runtime::Handle,
    /// Egress breakers, keyed by region and address so they survive a
    /// node set reconcile.
    health: Health,
}

fn bind_client() -> Result<quinn::Endpoint, TunnelError> {
    // Dual-stack when the host has IPv6, else IPv4 only.
    let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
    quinn::Endpoint::client(v6)
        .or_else(|_| quinn::Endpoint::client(v4))
        .map_err(|e| TunnelError::Bind("client endpoint".into(), e))
}

impl TunnelRouter {
    /// Binds the client endpoint and starts dialling every egress node of
    /// `directory`. Call it inside the runtime that is to drive the tunnel
    /// (not a Pingora service runtime); requests may come from any runtime.
    pub fn start(
        config: TunnelConfig,
        directory: &dyn EgressDirectory,
        snapshot: SharedSnapshot,
    ) -> Result<Arc<Self>, TunnelError> {
        let endpoint = bind_client()?;
        let resolver = match HickoryResolver::from_system() {
            Ok(r) => Some(r),
            Err(error) => {
                tracing::warn!(target: "switchyard::backhaul", %error, "no DNS resolver; egress addresses must be IP literals");
                None
            }
        };
        // Fails now, not per node later, when the identity is unusable.
        config.tls.client_config(&config.region)?;
        let router = Arc::new(TunnelRouter {
            endpoint,
            tls: ArcSwap::from_pointee(config.tls),
            resolver,
            region: config.region,
            snapshot,
            nodes: ArcSwap::from_pointee(Vec::new()),
            changed: watch::channel(0).0,
            runtime: tokio::runtime::Handle::current(),
            health: Health::new(),
        });
        router.reconcile(directory);
        Ok(router)
    }

    /// Brings the node set in line with `directory`: new addresses are
    /// dialled, removed ones closed, unchanged ones keep their connection.
    pub fn reconcile(&self, directory: &dyn EgressDirectory) {
        let wanted = directory.regions();
        let current = self.nodes.load_full();
        let mut next = Vec::new();
        for (region, addrs) in &wanted {
            let mut client = None;
            for addr in addrs {
                if let Some(n) = current
                    .iter()
                    .find(|n| &n.region == region && &n.addr == addr)
                {
                    next.push(n.clone());
                    continue;
                }
                if client.is_none() {
                    match self.tls.load().client_config(region) {
                        Ok(c) => client = Some(c),
                        Err(error) => {
                            tracing::error!(target: "switchyard::backhaul", %region, %error, "cannot dial this region's egress nodes");
                            break;
                        }
                    }
                }
                let Some(client) = client.clone() else { break };
                let node = Arc::new(Node {
                    region: region.clone(),
                    addr: addr.clone(),
                    conn: ArcSwapOption::empty(),
                    client: ArcSwap::from_pointee(client.clone()),
                    in_flight: AtomicUsize::new(0),
                    suspect: AtomicBool::new(false),
                    draining: AtomicBool::new(false),
                    removed: AtomicBool::new(false),
                    remove: Notify::new(),
                    breaker: self.health.egress(&format!("{region}/{addr}")),
                });
                self.runtime.spawn(maintain(
                    node.clone(),
                    self.endpoint.clone(),
                    self.resolver.clone(),
                    self.changed.clone(),
                ));
                next.push(node);
            }
        }
        for old in current.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, old)) {
                old.removed.store(true, Ordering::Relaxed);
                old.remove.notify_one();
            }
        }
        self.nodes.store(Arc::new(next));
    }

    /// Swaps the node identity: the next dial of every egress presents the
    /// new certificate; open connections keep theirs (nothing is dropped).
    /// Fails, changing nothing, when a region's configuration cannot be built.
    pub fn reload_tls(&self, tls: NodeTls) -> Result<(), TunnelError> {
        let nodes = self.nodes.load();
        let mut configs: BTreeMap<&str, quinn::ClientConfig> = BTreeMap::new();
        for n in nodes.iter() {
            if !configs.contains_key(n.region.as_str()) {
                configs.insert(&n.region, tls.client_config(&n.region)?);
            }
        }
        for n in nodes.iter() {
            if let Some(c) = configs.get(n.region.as_str()) {
                n.client.store(Arc::new(c.clone()));
            }
        }
        self.tls.store(Arc::new(tls));
        Ok(())
    }

    /// The measured backhaul round trip to every connected egress node:
    /// (region, address, RTT), for telemetry and latency scores.
    pub fn rtts(&self) -> Vec<(String, String, Duration)> {
        self.nodes
            .load()
            .iter()
            .filter_map(|n| {
                let c = n.connection()?;
                Some((n.region.clone(), n.addr.clone(), c.rtt()))
            })
            .collect()
    }

    /// Waits until every egress node is connected, or `timeout`; returns
    /// how many are. The edge calls it before it starts listening, so the
    /// first request finds warm connections.
    pub async fn wait_connected(&self, timeout: Duration) -> (usize, usize) {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let nodes = self.nodes.load();
            let up = nodes.iter().filter(|n| n.connection().is_some()).count();
            if up == nodes.len() {
                return (up, nodes.len());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return (up, nodes.len());
            }
        }
    }

    /// QUIC's counters (datagrams, frames by type, path) of each connected
    /// egress, by address: what the backhaul costs in packets.
    pub fn connection_stats(&self) -> Vec<(String, quinn::ConnectionStats)> {
        self.nodes
            .load()
            .iter()
            .filter_map(|n| Some((n.addr.clone(), n.connection()?.stats())))
            .collect()
    }

    /// Connected nodes a request for `region` may use, best first.
    fn candidates(
        &self,
        region: Option<&str>,
        tried: &[Arc<Node>],
    ) -> Vec<(Arc<Node>, quinn::Connection)> {
        let nodes = self.nodes.load();
        let usable = |n: &&Arc<Node>| !n.is_draining() && !tried.iter().any(|t| Arc::ptr_eq(t, n));
        let mut out: Vec<(Arc<Node>, quinn::Connection)> = match region {
            Some(r) => nodes
                .iter()
                .filter(|n| n.region == r)
                .filter(usable)
                .filter_map(|n| n.connection().map(|c| (n.clone(), c)))
                .collect(),
            None => {
                let up: Vec<_> = nodes
                    .iter()
                    .filter(usable)
                    .filter_map(|n| n.connection().map(|c| (n.clone(), c)))
                    .collect();
                let local: Vec<_> = up
                    .iter()
                    .filter(|(n, _)| n.region == self.region)
                    .cloned()
                    .collect();
                if local.is_empty() {
                    up
                } else {
                    local
                }
            }
        };
        // Ejected and suspect nodes go last: used only when no other node
        // of the region is up (a failing egress beats none, and the
        // request then probes it). A breaker due for a probe ranks as
        // healthy, so real traffic probes it.
        let now = Instant::now();
        out.sort_by_key(|(n, c)| {
            let ejected = n
                .breaker
                .as_ref()
                .is_some_and(|b| self.health.availability(b, now) == Availability::Ejected);
            (ejected, n.is_suspect(), n.score(c))
        });
        out
    }

    /// Books a backhaul attempt's transport outcome on the egress's
    /// breaker; a change is a `breaker` event (scope `egress`).
    fn record_transport(&self, node: &Node, outcome: Outcome) {
        let Some(b) = &node.breaker else { return };
        if let Some(t) = self.health.record(b, outcome, Instant::now()) {
            report_egress_breaker(node, t);
        }
    }

    /// Takes a half-open probe slot when the egress's breaker is due for
    /// one; held for the attempt.
    fn probe(&self, node: &Node) -> Option<health::Probe> {
        let b = node.breaker.as_ref()?;
        match self.health.try_probe(b, Instant::now()) {
            Ok(Some((probe, t))) => {
                if let Some(t) = t {
                    report_egress_breaker(node, t);
                }
                Some(probe)
            }
            _ => None,
        }
    }

    /// Marks `node` suspect until `conn` shows a sign of life (any packet
    /// from the egress: a live one acknowledges the keep-alive within a
    /// second) or is replaced by a new connection.
    fn mark_suspect(&self, node: &Arc<Node>, conn: &quinn::Connection) {
        if node.suspect.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(target: "switchyard::backhaul", region = %node.region, egress = %node.addr,
            "egress did not acknowledge a request in time; new requests go elsewhere until it answers");
        let (node, conn) = (node.clone(), conn.clone());
        let baseline = conn.stats().udp_rx.datagrams;
        self.runtime.spawn(async move {
            loop {
                tokio::select! {
                    _ = conn.closed() => return,
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                }
                if conn.stats().udp_rx.datagrams > baseline {
                    node.suspect.store(false, Ordering::Relaxed);
                    tracing::info!(target: "switchyard::backhaul", region = %node.region, egress = %node.addr,
                        "egress answers again");
                    return;
                }
            }
        });
    }

    /// Requests in flight to every egress node: (region, address, streams).
    pub fn streams_open(&self) -> Vec<(String, String, usize)> {
        self.nodes
            .load()
            .iter()
            .map(|n| {
                (
                    n.region.clone(),
                    n.addr.clone(),
                    n.in_flight.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Every egress node: (region, address, connected, draining), for metrics.
    pub fn egress_states(&self) -> Vec<(String, String, bool, bool)> {
        self.nodes
            .load()
            .iter()
            .map(|n| {
                (
                    n.region.clone(),
                    n.addr.clone(),
                    n.connection().is_some(),
                    n.is_draining(),
                )
            })
            .collect()
    }

    /// Egress nodes whose breaker is open or half-open: (region, address).
    pub fn ejected_egress(&self) -> Vec<(String, String)> {
        self.nodes
            .load()
            .iter()
            .filter(|n| {
                n.breaker
                    .as_ref()
                    .is_some_and(|b| self.health.is_ejected(b))
            })
            .map(|n| (n.region.clone(), n.addr.clone()))
            .collect()
    }

    fn has_nodes(&self, region: Option<&str>) -> bool {
        let nodes = self.nodes.load();
        match region {
            Some(r) => nodes.iter().any(|n| n.region == r),
            None => !nodes.is_empty(),
        }
    }

    /// The best connected node, waiting (bounded) for one to come up.
    async fn pick(
        &self,
        region: Option<&str>,
        tried: &[Arc<Node>],
        wait_until: tokio::time::Instant,
    ) -> Option<(Arc<Node>, quinn::Connection)> {
        let mut rx = self.changed.subscribe();
        loop {
            if let Some(best) = self.candidates(region, tried).into_iter().next() {
                return Some(best);
            }
            if tokio::time::timeout_at(wait_until, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }
}

/// Keeps one node connected: dial, hold until lost, redial with backoff.
async fn maintain(
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    resolver: Option<HickoryResolver>,
    changed: watch::Sender<u64>,
) {
    let mut backoff = BACKOFF_MIN;
    let bump = || changed.send_modify(|v| *v = v.wrapping_add(1));
    while !node.removed.load(Ordering::Relaxed) {
        let client = node.client.load_full();
        let dialled = async {
            let conn = dial(&endpoint, &client, resolver.as_ref(), &node.addr).await?;
            match egress_ready(&conn).await {
                Ok(control) => Ok((conn, control)),
                Err(e) => {
                    conn.close(0u32.into(), b"not ready");
                    Err(e)
                }
            }
        };
        let dial = tokio::select! {
            r = dialled => r,
            _ = node.remove.notified() => return,
        };
        match dial {
            Ok((conn, control)) => {
                let since = Instant::now();
                tracing::info!(target: "switchyard::backhaul", region = %node.region, egress = %node.addr,
                    rtt_ms = conn.rtt().as_secs_f64() * 1000.0, "backhaul connected");
                node.conn.store(Some(Arc::new(conn.clone())));
                // A fresh handshake is proof of life, and of a node that
                // takes new work.
                node.suspect.store(false, Ordering::Relaxed);
                node.draining.store(false, Ordering::Relaxed);
                tokio::spawn(listen_for_goaway(
                    node.clone(),
                    conn.clone(),
                    control,
                    changed.clone(),
                ));
                bump();
                let reason = tokio::select! {
                    r = conn.closed() => r,
                    _ = node.remove.notified() => {
                        conn.close(0u32.into(), b"egress removed");
                        node.conn.store(None);
                        bump();
                        return;
                    }
                };
                node.conn.store(None);
                bump();
                tracing::warn!(target: "switchyard::backhaul", region = %node.region, egress = %node.addr,
                    reason = %reason, "backhaul connection lost");
                if since.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(error) => {
                tracing::warn!(target: "switchyard::backhaul", region = %node.region, egress = %node.addr,
                    %error, retry_ms = backoff.as_millis() as u64, "backhaul connect failed");
            }
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = node.remove.notified() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn report_egress_breaker(node: &Node, t: Transition) {
    tracing::warn!(
        target: "switchyard::breaker",
        event = "breaker",
        scope = "egress",
        region = %node.region,
        egress = %node.addr,
        state = t.label(),
        ejected_ms = match t {
            Transition::Opened(d) => Some(d.as_millis() as u64),
            _ => None,
        },
        "egress breaker changed state"
    );
}

/// On a connection that negotiated version 3, waits for the egress to
/// open its control stream with READY and returns that stream; until then
/// the connection is not used (the egress may yet refuse the edge's
/// certificate). Older egress nodes send no READY: `None` at once.
async fn egress_ready(conn: &quinn::Connection) -> Result<Option<quinn::RecvStream>, DialError> {
    if !says_ready(conn) {
        return Ok(None);
    }
    let ready = async {
        let mut control = conn.accept_uni().await?;
        let mut head = [0u8; 5];
        control
            .read_exact(&mut head)
            .await
            .map_err(|e| DialError::NotReady(e.to_string()))?;
        if head != frame::READY {
            return Err(DialError::NotReady(
                "its control stream did not start with READY".into(),
            ));
        }
        Ok(Some(control))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, ready)
        .await
        .unwrap_or(Err(DialError::NotReady(format!(
            "nothing within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))))
}

/// Waits for the egress's GOAWAY on its control stream (or, from an egress
/// older than version 3, on the one unidirectional stream it opens to say
/// it); ends with the connection.
async fn listen_for_goaway(
    node: Arc<Node>,
    conn: quinn::Connection,
    control: Option<quinn::RecvStream>,
    changed: watch::Sender<u64>,
) {
    let mut control = match control {
        Some(c) => c,
        None => match conn.accept_uni().await {
            Ok(c) => c,
            Err(_) => return,
        },
    };
    let mut head = [0u8; 5];
    if control.read_exact(&mut head).await.is_ok() && head == frame::GOAWAY {
        node.mark_draining(&changed);
    }
}

async fn dial(
    endpoint: &quinn::Endpoint,
    client: &quinn::ClientConfig,
    resolver: Option<&HickoryResolver>,
    addr: &str,
) -> Result<quinn::Connection, DialError> {
    let (host, port) = split_host_port(addr)?;
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let resolver = resolver.ok_or_else(|| DialError::NoResolver(host.to_string()))?;
            let ips = resolver.lookup(host).await?;
            // An IPv4 address works whether or not the endpoint is dual-stack.
            ips.iter()
                .find(|ip| ip.is_ipv4())
                .or(ips.first())
                .copied()
                .ok_or_else(|| DialError::NoAddress(host.to_string()))?
        }
    };
    let connecting = endpoint.connect_with(client.clone(), SocketAddr::new(ip, port), host)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DialError::HandshakeTimeout(CONNECT_TIMEOUT)),
    }
}

/// How one attempt on one node ended, when it did not produce a response.
enum AttemptError {
    /// The egress cannot have started the request: try another node.
    NotAccepted(String),
    /// It may have: report, never resend a non-idempotent call.
    Failed(GatewayError),
}

/// A failure after the egress took the request: it may have reached the
/// provider, so it is never sent again, here or to another target.
fn backhaul_failed(detail: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Upstream,
        format!("The egress node failed while handling the request ({detail})."),
    )
    .with_code("backhaul_failed")
    .with_source(Source::Backhaul)
    .with_retry(Retry::Never)
}

fn is_connection_loss(e: &FrameError) -> bool {
    matches!(e, FrameError::Connection(_) | FrameError::Closed)
}

/// How long an egress has to acknowledge a request header before it is
/// presumed dead (a stopped process, dropped packets) and the request goes
/// to another egress: a few round trips, never so short that scheduling
/// noise trips it, never so long that the 500 ms promise is broken.
pub fn ack_deadline(rtt: Duration) -> Duration {
    (rtt * 4).clamp(ACK_MIN, ACK_MAX)
}

#[async_trait::async_trait]
impl Upstream for TunnelRouter {
    async fn execute(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        let snap = self.snapshot.load_full();
        let region = snap
            .providers()
            .get(&req.target.provider)
            .and_then(|p| p.region.clone());
        let region = region.as_deref();
        if !self.has_nodes(region) {
            return Err(GatewayError::new(
                ErrorKind::Overloaded,
                format!(
                    "No egress node is configured for region `{}`.",
                    region.unwrap_or("any")
                ),
            )
            .with_code("no_egress")
            .with_source(Source::Backhaul)
            .with_retry(Retry::AnotherTarget));
        }
        // One deadline covers the whole request, every attempt included.
        let deadline = req.received_at + snap.limits().upstream_timeout;
        let (mut header, body) = frame::request_to_wire(&req, Duration::ZERO);
        let framer: Option<ErrorFramer> = crate::stream::error_framer(&req.op, req.inbound);
        let idle = snap.limits().stream_idle_timeout + SLACK;
        // Never past the deadline: a retry of the request must not wait a
        // second full spell for a node that is not coming.
        let wait_until = (tokio::time::Instant::now() + WAIT_FOR_EGRESS).min(deadline.into());
        let mut tried: Vec<Arc<Node>> = Vec::new();
        let mut last = String::from("no egress node connected");
        for _ in 0..MAX_ATTEMPTS {
            let Some((node, conn)) = self.pick(region, &tried, wait_until).await else {
                break;
            };
            tried.push(node.clone());
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(deadline_spent(snap.limits().upstream_timeout));
            }
            // The egress gets what is left now, so a second attempt carries
            // less; at least 1 ms, as 0 would mean no deadline at all.
            header.deadline_ms = (left.as_millis() as u64).max(1);
            let guard = InFlight::new(node.clone());
            let probe = self.probe(&node);
            let sent = Instant::now();
            let attempt = Attempt {
                conn: &conn,
                header: frame::encode_message(FrameKind::RequestHeader, &header),
                body: &body,
                wait_until: (deadline + SLACK).into(),
                ack_within: speaks_accepted(&conn).then(|| ack_deadline(conn.rtt())),
            };
            let on_silence = || {
                self.mark_suspect(&node, &conn);
                // Wait on regardless when there is no healthy alternative:
                // a slow egress is better than none.
                self.candidates(region, &tried)
                    .iter()
                    .any(|(n, _)| !n.is_suspect())
            };
            let result = attempt.run(on_silence).await;
            // Transport only: the egress answered (whatever it said), or the
            // stream was lost, reset or never taken.
            match &result {
                Ok(_) => self.record_transport(
                    &node,
                    Outcome::Success {
                        latency: sent.elapsed(),
                    },
                ),
                Err(AttemptError::NotAccepted(_)) => self.record_transport(&node, Outcome::Failure),
                Err(AttemptError::Failed(e)) if e.kind != ErrorKind::Timeout => {
                    self.record_transport(&node, Outcome::Failure)
                }
                Err(AttemptError::Failed(_)) => {}
            }
            drop(probe);
            match result {
                Ok((head, recv)) => {
                    if let Some(e) = head.error.as_ref().filter(|_| tried.len() < MAX_ATTEMPTS) {
                        let e = frame::error_from_wire(e.clone());
                        if e.code == Some("egress_draining") {
                            node.mark_draining(&self.changed);
                        }
                        if e.may_try_another_egress() {
                            tracing::warn!(target: "switchyard::backhaul", request_id = %req.request_id,
                                egress = %node.addr, region = %node.region, error = %e.message,
                                "the egress refused the request before starting it; trying another egress");
                            last = e.message;
                            continue;
                        }
                    }
                    return respond(
                        head,
                        recv,
                        guard,
                        framer,
                        idle,
                        req.received_at,
                        left + SLACK,
                    )
                    .await;
                }
                Err(AttemptError::NotAccepted(why)) => {
                    tracing::warn!(target: "switchyard::backhaul", request_id = %req.request_id,
                        egress = %node.addr, region = %node.region, error = %why,
                        "backhaul attempt failed before the egress took the request; trying another egress");
                    last = why;
                }
                Err(AttemptError::Failed(e)) => {
                    tracing::warn!(target: "switchyard::backhaul", request_id = %req.request_id,
                        egress = %node.addr, region = %node.region, error = %e.message,
                        "backhaul request failed after the egress took it; not sent again");
                    return Err(e);
                }
            }
        }
        Err(GatewayError::new(
            if tried.is_empty() {
                ErrorKind::Overloaded
            } else {
                ErrorKind::Upstream
            },
            format!(
                "No egress node of region `{}` could take the request ({last}).",
                region.unwrap_or("any")
            ),
        )
        .with_code("no_egress")
        .with_source(Source::Backhaul)
        // No egress started it: it is safe to send anywhere else.
        .with_retry(Retry::AnotherEgress))
    }
}

fn deadline_spent(total: Duration) -> GatewayError {
    GatewayError::new(
        ErrorKind::Timeout,
        format!(
            "The request's deadline of {} ms passed before an egress node answered.",
            total.as_millis()
        ),
    )
    .with_code("backhaul_timeout")
    .with_source(Source::Backhaul)
    .with_retry(Retry::Never)
}

struct Attempt<'a> {
    conn: &'a quinn::Connection,
    header: Bytes,
    body: &'a Bytes,
    /// When the edge stops waiting for the response header.
    wait_until: tokio::time::Instant,
    /// How long the egress has to acknowledge the request, on connections
    /// whose egress sends ACCEPTED frames.
    ack_within: Option<Duration>,
}

/// How waiting for the response header ended.
enum HeadWait {
    Head(Result<wire::ResponseHeader, FrameError>),
    /// No acknowledgement in time, and another egress can take the request.
    Silent,
    TimedOut,
}

impl Attempt<'_> {
    /// Opens a stream, sends the request and waits for the response header.
    /// `on_silence` is asked, once, when the egress has not acknowledged the
    /// request in time: `true` abandons it for another egress.
    async fn run(
        &self,
        on_silence: impl Fn() -> bool + Send + Sync,
    ) -> Result<(wire::ResponseHeader, quinn::RecvStream), AttemptError> {
        let not_accepted = |e: &dyn std::fmt::Display| AttemptError::NotAccepted(e.to_string());
        let send_request = async {
            let (mut send, recv) = self.conn.open_bi().await.map_err(|e| not_accepted(&e))?;
            send.write_chunk(self.header.clone())
                .await
                .map_err(|e| not_accepted(&e))?;
            if !self.body.is_empty() {
                send.write_chunk(self.body.clone())
                    .await
                    .map_err(|e| not_accepted(&e))?;
            }
            send.finish().map_err(|e| not_accepted(&e))?;
            Ok::<_, AttemptError>((send, recv))
        };
        // Opening a stream costs no round trip; this only waits when flow
        // control or the stream limit holds us back.
        let (mut send, mut recv) =
            match tokio::time::timeout_at(self.wait_until, send_request).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(AttemptError::NotAccepted(
                        "the request could not be sent in time".into(),
                    ))
                }
            };
        // The point of no return is the first sign that the egress has the
        // request: its ACCEPTED frame, or QUIC acknowledging every request
        // byte, or the egress stopping its read. Before it, a lost or silent
        // connection means the egress never started the request (it only
        // starts once the body is complete), so another egress may take it.
        let mut accepted = false;
        let ack_at = self.ack_within.map(|d| tokio::time::Instant::now() + d);
        let outcome = {
            let stopped = send.stopped();
            tokio::pin!(stopped);
            let mut stop_seen = false;
            let mut ack_pending = ack_at.is_some();
            let ack_timer = tokio::time::sleep_until(ack_at.unwrap_or(self.wait_until));
            tokio::pin!(ack_timer);
            let give_up = tokio::time::sleep_until(self.wait_until);
            tokio::pin!(give_up);
            'frames: loop {
                // Kept across the other branches: a frame half read stays so.
                let read = frame::read_frame(&mut recv, frame::MAX_HEADER_FRAME);
                tokio::pin!(read);
                let got = loop {
                    tokio::select! {
                        r = &mut stopped, if !stop_seen => {
                            stop_seen = true;
                            // Ok(None): all bytes acknowledged. Ok(Some): the
                            // egress stopped reading, so it saw the request.
                            accepted |= r.is_ok();
                        }
                        () = &mut ack_timer, if ack_pending && !accepted => {
                            ack_pending = false;
                            if on_silence() {
                                break 'frames HeadWait::Silent;
                            }
                        }
                        () = &mut give_up => break 'frames HeadWait::TimedOut,
                        r = &mut read => break r,
                    }
                };
                match got {
                    Ok((FrameKind::Accepted, _)) => accepted = true,
                    Ok((FrameKind::ResponseHeader, payload)) => {
                        break HeadWait::Head(frame::decode(FrameKind::ResponseHeader, &payload))
                    }
                    Ok((got, _)) => {
                        break HeadWait::Head(Err(FrameError::Unexpected {
                            expected: FrameKind::ResponseHeader,
                            got,
                        }))
                    }
                    Err(e) => break HeadWait::Head(Err(e)),
                }
            }
        };
        match outcome {
            HeadWait::Head(Ok(h)) => Ok((h, recv)),
            HeadWait::Head(Err(e)) if !accepted && is_connection_loss(&e) => {
                Err(AttemptError::NotAccepted(e.to_string()))
            }
            HeadWait::Head(Err(e)) => Err(AttemptError::Failed(backhaul_failed(&e.to_string()))),
            HeadWait::Silent => {
                // Should the egress wake up, it finds the request withdrawn
                // and does not start it.
                let _ = send.reset(STOP_ABANDONED.into());
                let _ = recv.stop(STOP_ABANDONED.into());
                Err(AttemptError::NotAccepted(format!(
                    "no acknowledgement within {} ms",
                    self.ack_within.unwrap_or_default().as_millis()
                )))
            }
            HeadWait::TimedOut => {
                let _ = recv.stop(STOP_CANCELLED.into());
                Err(AttemptError::Failed(
                    GatewayError::new(
                        ErrorKind::Timeout,
                        "The egress node did not answer within the request's deadline.",
                    )
                    .with_code("backhaul_timeout")
                    .with_source(Source::Backhaul)
                    .with_retry(Retry::Never),
                ))
            }
        }
    }
}

async fn respond(
    head: wire::ResponseHeader,
    mut recv: quinn::RecvStream,
    guard: InFlight,
    framer: Option<ErrorFramer>,
    idle: Duration,
    received_at: Instant,
    budget: Duration,
) -> Result<EgressResponse, GatewayError> {
    if let Some(e) = head.error {
        return Err(frame::error_from_wire(e));
    }
    let stats = Arc::new(RequestStats::default());
    let status = u16::try_from(head.status).unwrap_or(502);
    if head.streaming {
        let body = stream_frames(StreamState {
            recv,
            _guard: guard,
            stats: stats.clone(),
            framer,
            idle: IdleTimer::new(idle),
            received_at,
            done: false,
        });
        return Ok(EgressResponse {
            status,
            content_type: head.content_type,
            retry_after: head.retry_after,
            body: ResponseBody::Stream(body),
            stats,
        });
    }
    let read_all = async {
        let mut parts: Vec<Bytes> = Vec::new();
        loop {
            let (kind, payload) = frame::read_frame(&mut recv, frame::MAX_DATA_FRAME).await?;
            match kind {
                FrameKind::Data => parts.push(payload),
                FrameKind::Trailer => {
                    let t: wire::Trailer = frame::decode(kind, &payload)?;
                    frame::apply_trailer(&t, &stats);
                    return Ok::<_, FrameError>(parts);
                }
                other => {
                    return Err(FrameError::Unexpected {
                        expected: FrameKind::Trailer,
                        got: other,
                    })
                }
            }
        }
    };
    let parts = match tokio::time::timeout(budget.max(idle), read_all).await {
        Ok(Ok(p)) => {
            read_to_end(recv);
            p
        }
        Ok(Err(e)) => return Err(backhaul_failed(&e.to_string())),
        Err(_) => return Err(backhaul_failed("the response body did not arrive in time")),
    };
    stats.mark_first_byte(received_at);
    let body = match parts.len() {
        1 => parts.into_iter().next().unwrap_or_default(),
        _ => Bytes::from(parts.concat()),
    };
    drop(guard);
    Ok(EgressResponse {
        status,
        content_type: head.content_type,
        retry_after: head.retry_after,
        body: ResponseBody::Full(body),
        stats,
    })
}

/// Reads the stream's end (its FIN), which the egress sends right after the
/// trailer: at once when it came in the trailer's packet, as it nearly
/// always does, else in a small task. A stream dropped with its end unread
/// makes quinn send STOP_SENDING, a packet (a syscall and an AEAD seal on
/// each side) per request that tells the egress nothing.
fn read_to_end(mut recv: quinn::RecvStream) {
    if futures::FutureExt::now_or_never(recv.read_chunk(usize::MAX, true)).is_some() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(END_WAIT, recv.read_chunk(usize::MAX, true)).await;
    });
}

/// How long an answer's FIN is waited for after its trailer.
const END_WAIT: Duration = Duration::from_secs(1);

struct StreamState {
    recv: quinn::RecvStream,
    _guard: InFlight,
    stats: Arc<RequestStats>,
    framer: Option<ErrorFramer>,
    idle: IdleTimer,
    received_at: Instant,
    done: bool,
}

impl StreamState {
    /// Ends the stream after a backhaul failure, with one error frame in the
    /// caller's protocol (raw passthrough has none: its body just ends).
    fn fail(&mut self, error: GatewayError) -> Option<Bytes> {
        self.done = true;
        self.stats.mark_stream_failed();
        let _ = self.recv.stop(STOP_CANCELLED.into());
        self.framer.map(|f| f(&error))
    }
}

/// Data frames as they arrive: never buffered, one frame per chunk. The
/// trailer fills the stats before the stream reports its end, so the edge's
/// access-log line (written after the end) has the usage.
fn stream_frames(state: StreamState) -> BoxStream<'static, Bytes> {
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let next = st
            .idle
            .within(frame::read_frame(&mut st.recv, frame::MAX_DATA_FRAME))
            .await;
        let out = match next {
            Ok(Ok((FrameKind::Data, payload))) => {
                st.stats.mark_first_byte(st.received_at);
                Some(payload)
            }
            Ok(Ok((FrameKind::Trailer, payload))) => {
                st.done = true;
                match frame::decode::<wire::Trailer>(FrameKind::Trailer, &payload) {
                    Ok(t) => {
                        frame::apply_trailer(&t, &st.stats);
                        read_to_end(st.recv);
                        return None;
                    }
                    Err(e) => st.fail(backhaul_failed(&e.to_string())),
                }
            }
            Ok(Ok((kind, _))) => st.fail(backhaul_failed(&format!("unexpected {kind:?} frame"))),
            Ok(Err(e)) => {
                let e = if is_connection_loss(&e) || matches!(e, FrameError::Reset(_) | FrameError::Eof | FrameError::Truncated) {
                    GatewayError::new(
                        ErrorKind::Upstream,
                        "The connection to the egress node was lost mid-stream; the response is incomplete.",
                    )
                    .with_code("backhaul_lost")
                    .with_source(Source::Backhaul)
                    .with_retry(Retry::Never)
                } else {
                    backhaul_failed(&e.to_string())
                };
                st.fail(e)
            }
            Err(_) => st.fail(
                GatewayError::new(
                    ErrorKind::Timeout,
                    format!("The egress node sent nothing for {} ms; the stream was ended.", st.idle.idle().as_millis()),
                )
                .with_code("backhaul_timeout")
                .with_source(Source::Backhaul)
                .with_retry(Retry::Never),
            ),
        };
        out.map(|chunk| (chunk, st))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_addresses_fail_with_their_reason() {
        assert_eq!(
            StaticDirectory::parse_flag("eu=10.0.0.1:4433").unwrap(),
            ("eu".to_string(), "10.0.0.1:4433".to_string())
        );
        assert_eq!(
            StaticDirectory::parse_flag("10.0.0.1:4433"),
            Err(AddressError::NotRegionAddress("10.0.0.1:4433".into()))
        );
        assert_eq!(
            StaticDirectory::parse_flag("=h:1"),
            Err(AddressError::EmptyRegion("=h:1".into()))
        );
        assert_eq!(
            StaticDirectory::parse_flag("eu=h"),
            Err(AddressError::NoPort("h".into()))
        );
        assert_eq!(
            StaticDirectory::parse_flag("eu=h:99999"),
            Err(AddressError::BadPort("h:99999".into()))
        );
        assert_eq!(
            StaticDirectory::parse_flag("eu=[]:1"),
            Err(AddressError::EmptyHost("[]:1".into()))
        );
        assert_eq!(split_host_port("[::1]:7").unwrap(), ("::1", 7));
    }

    #[test]
    fn the_ack_deadline_follows_the_rtt_within_bounds() {
        assert_eq!(ack_deadline(Duration::from_micros(200)), ACK_MIN);
        assert_eq!(
            ack_deadline(Duration::from_millis(50)),
            Duration::from_millis(200)
        );
        assert_eq!(ack_deadline(Duration::from_secs(1)), ACK_MAX);
        // The promise: a silent egress is left well within 500 ms.
        assert!(ACK_MAX < Duration::from_millis(500));
    }

    #[test]
    fn failures_after_acceptance_are_never_retried() {
        let e = backhaul_failed("lost");
        assert_eq!((e.source, e.retry), (Source::Backhaul, Retry::Never));
        assert!(!e.may_try_another_target());
        let e = deadline_spent(Duration::from_secs(1));
        assert!(!e.is_retryable());
    }
}
