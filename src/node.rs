//! `switchyard edge`, `switchyard egress` and `switchyard gen-certs`: the
//! data plane as separate processes joined by the QUIC backhaul.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use switchyard_backhaul::node::{ControlLink, EgressNode, NodeTlsFiles, PolicySource};
use switchyard_backhaul::tunnel::{
    generate_node_cert, CertScope, ConnectionLimits, NodeTls, StaticDirectory,
};
use switchyard_control::node_client;
use switchyard_edge::node::EdgeNode;
use switchyard_edge::service::TlsFiles;
use switchyard_proto::{Secret, Snapshot};

use crate::signals::{run_until_stop, DrainArgs, Stop};

#[derive(clap::Args)]
pub struct NodeTlsArgs {
    /// This node's certificate chain (PEM), signed by the fleet CA.
    #[arg(long)]
    cert: PathBuf,
    /// This node's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// CA certificate (PEM) every peer node must chain to.
    #[arg(long)]
    ca: PathBuf,
}

impl NodeTlsArgs {
    fn load(&self) -> anyhow::Result<NodeTls> {
        Ok(NodeTls::from_files(&self.cert, &self.key, &self.ca)?)
    }

    /// The files, for reloading them when they change.
    fn files(&self) -> NodeTlsFiles {
        NodeTlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }

    /// The same node identity, for the control plane's mutual TLS.
    fn control_plane_tls(&self) -> anyhow::Result<node_client::NodeTls> {
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let key = String::from_utf8(read(&self.key)?).context("node key is not PEM text")?;
        Ok(node_client::NodeTls {
            ca: read(&self.ca)?,
            cert: read(&self.cert)?,
            key: Secret::new(key),
            domain: None,
        })
    }
}

/// Following a control plane instead of (or after) a static policy file.
#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// Control plane gRPC URL (e.g. https://cp.example:7000). The node then
    /// serves the snapshots it pushes, and keeps serving the last one when
    /// it is unreachable.
    #[arg(long = "control-plane")]
    control_plane: Option<String>,
    /// Node id reported to the control plane (default: ROLE-REGION-PID).
    #[arg(long)]
    node_id: Option<String>,
    /// Where the last applied snapshot is kept, to start without the control plane.
    #[arg(long, default_value = ".switchyard/node")]
    state_dir: PathBuf,
}

impl ControlPlaneArgs {
    fn link(&self, tls: &NodeTlsArgs) -> anyhow::Result<Option<ControlLink>> {
        let Some(url) = &self.control_plane else {
            return Ok(None);
        };
        Ok(Some(ControlLink {
            url: url.clone(),
            node_id: self.node_id.clone(),
            state_dir: self.state_dir.clone(),
            tls: Some(tls.control_plane_tls()?),
        }))
    }
}

#[derive(clap::Args)]
pub struct EdgeArgs {
    /// Region this edge runs in; providers without a region prefer its egress nodes.
    #[arg(long)]
    region: String,
    /// Plain-HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// HTTPS listen address; needs --tls-cert (the node certificate is a
    /// client identity for the backhaul, not a server certificate).
    #[arg(long, requires = "tls_cert")]
    tls_listen: Option<String>,
    /// Policy YAML (providers, regions, tenants). Provider keys are never read
    /// here. Optional with --control-plane.
    #[arg(long, short = 'c', required_unless_present = "control_plane")]
    config: Option<PathBuf>,
    #[command(flatten)]
    cp: ControlPlaneArgs,
    #[command(flatten)]
    node_tls: NodeTlsArgs,
    /// Client-facing HTTPS certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// An egress node, in addition to the policy's `regions.R.egress` (repeatable).
    #[arg(long = "egress", value_name = "REGION=HOST:PORT")]
    egress: Vec<String>,
    /// Worker threads of the edge.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Admin listener: `/healthz`, `/readyz` (503 from the first SIGTERM),
    /// `/metrics`. Keep it off the client-facing network.
    #[arg(long, value_name = "HOST:PORT")]
    admin_listen: Option<String>,
    /// Export OpenTelemetry spans over OTLP/HTTP (protobuf) to this
    /// collector, e.g. `http://otel-collector:4318` (off by default).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    drain: DrainArgs,
    /// Unix socket for graceful upgrades: on SIGQUIT this edge sends its
    /// listening sockets there (to a new process started with --upgrade)
    /// and drains; no connection is refused.
    #[arg(long, value_name = "PATH")]
    upgrade_socket: Option<PathBuf>,
    /// Take the listening sockets from the edge running now (it is sent
    /// SIGQUIT next) through --upgrade-socket instead of binding them.
    #[arg(long, requires = "upgrade_socket")]
    upgrade: bool,
    #[command(flatten)]
    limits: crate::dev::EdgeLimitArgs,
    /// Redis holding tenants' limit and budget counters, shared by every
    /// edge (`redis://host:port`). Without it each edge counts in memory
    /// within the share of each limit the control plane leases it.
    #[arg(long, env = "SWITCHYARD_REDIS_URL")]
    redis: Option<String>,
}

#[derive(clap::Args)]
pub struct EgressArgs {
    /// Region this egress serves; it holds the keys of this region's providers
    /// and of providers without a region.
    #[arg(long)]
    region: String,
    /// QUIC (UDP) listen address for edge connections.
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: String,
    /// Policy YAML; provider keys come from this process's environment.
    /// Optional with --control-plane.
    #[arg(long, short = 'c', required_unless_present = "control_plane")]
    config: Option<PathBuf>,
    #[command(flatten)]
    cp: ControlPlaneArgs,
    #[command(flatten)]
    node_tls: NodeTlsArgs,
    /// Concurrent requests one edge connection may have open; an edge at
    /// the limit waits for one to finish.
    #[arg(long, default_value_t = ConnectionLimits::default().max_streams)]
    max_streams_per_connection: u32,
    /// Request bytes one edge connection may have buffered at once; a
    /// request over it is answered 503.
    #[arg(long, default_value_t = ConnectionLimits::default().max_request_bytes)]
    max_request_bytes_per_connection: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Admin listener: `/healthz`, `/readyz` (503 from the first SIGTERM),
    /// `/metrics`.
    #[arg(long, value_name = "HOST:PORT")]
    admin_listen: Option<String>,
    /// Export OpenTelemetry spans over OTLP/HTTP (protobuf) to this
    /// collector, e.g. `http://otel-collector:4318` (off by default).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    drain: DrainArgs,
}

#[derive(clap::Args)]
pub struct GenCertsArgs {
    /// Directory for `ca.pem`, `ca-key.pem`, `<name>.pem`, `<name>-key.pem`.
    /// An existing CA there is reused, so run once per node.
    #[arg(long)]
    out: PathBuf,
    /// Node name (certificate file name and common name).
    #[arg(long, default_value = "node")]
    name: String,
    /// Extra DNS names or IPs for the certificate (localhost, 127.0.0.1 and ::1 are always in).
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Scope the certificate to a node role (`edge` or `egress`) in
    /// --region: the control plane then lets it claim only that (and refuses
    /// unscoped certificates unless --insecure-allow-unscoped-node-certs),
    /// and the backhaul accepts only edge certificates from edges and egress
    /// certificates of the dialled region from egress nodes. An edge
    /// certificate is for client authentication only; an egress one for
    /// both; an unscoped one (control plane, operators) for both, and is
    /// refused on the backhaul.
    #[arg(long, requires = "region", value_parser = ["edge", "egress"])]
    role: Option<String>,
    /// Region for --role.
    #[arg(long, requires = "role")]
    region: Option<String>,
}

fn policy_source(config: &Option<PathBuf>) -> PolicySource {
    config
        .clone()
        .map_or(PolicySource::None, PolicySource::File)
}

/// The start-up banner's provider lines (key counts, never keys).
fn print_providers(snap: &Snapshot) {
    let mut providers: Vec<_> = snap.providers().values().collect();
    providers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in providers {
        println!(
            "  provider {} region={} keys={}",
            p.name,
            p.region.as_deref().unwrap_or("any"),
            p.keys.len()
        );
    }
}

/// A runtime for the command itself: waiting for the signal and driving the
/// node's start and shutdown (the node runs on runtimes of its own).
pub(crate) fn command_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

pub fn run_edge(args: EdgeArgs) -> anyhow::Result<()> {
    // The dev key is an all-models tenant: fine on a laptop (`switchyard
    // dev`), a hole on an edge that faces clients. Tenants come from the policy.
    if std::env::var_os("SWITCHYARD_DEV_KEY").is_some() {
        tracing::warn!("SWITCHYARD_DEV_KEY is ignored by `switchyard edge` (only `switchyard dev` uses it); give tenants in the policy");
    }
    let mut node = EdgeNode::backhaul(args.region.clone(), args.node_tls.load()?)
        .node_tls_files(args.node_tls.files())
        .policy(policy_source(&args.config))
        .listen(args.listen.clone())
        .threads(args.threads)
        .limits(args.limits.limits());
    if let Some(url) = &args.redis {
        node = node.redis(url.clone());
    }
    if let Some(addr) = &args.admin_listen {
        node = node.admin(addr.clone());
    }
    if let Some(url) = &args.otlp_endpoint {
        node = node.otlp(url.clone());
    }
    if let (true, Some(socket)) = (args.upgrade, &args.upgrade_socket) {
        node = node.upgrade_from(socket.clone());
    }
    for flag in &args.egress {
        let (region, addr) = StaticDirectory::parse_flag(flag).map_err(|e| anyhow::anyhow!(e))?;
        node = node.egress(region, addr);
    }
    if let Some(link) = args.cp.link(&args.node_tls)? {
        node = node.control_plane(link);
    }
    // clap makes --tls-listen require --tls-cert, and --tls-cert --tls-key.
    if let (Some(addr), Some(cert), Some(key)) = (&args.tls_listen, &args.tls_cert, &args.tls_key) {
        node = node.tls(
            addr.clone(),
            TlsFiles {
                cert_path: cert.display().to_string(),
                key_path: key.display().to_string(),
            },
        );
    }
    command_runtime()?.block_on(async move {
        let edge = node.bind().await?;
        println!("switchyard edge (region {})", args.region);
        if let Some(a) = edge.local_addr() {
            println!("  HTTP:   http://{a}/v1");
        }
        if let Some(a) = edge.tls_addr() {
            println!("  HTTPS:  https://{a}/v1");
        }
        if let Some(a) = edge.admin_addr() {
            println!("  admin:  http://{a}/readyz");
        }
        for (region, addrs) in edge.egress_nodes() {
            println!("  egress {region}: {}", addrs.join(", "));
        }
        print_providers(&edge.snapshot());
        // Accepting only after the banner: whoever waits for the port finds it printed.
        let edge = edge.serve();
        let upgrade = args.upgrade_socket.as_deref();
        loop {
            match run_until_stop(|force| edge.reload(force), upgrade.is_some()).await {
                Stop::Drain => {
                    edge.drain(args.drain.delay(), args.drain.grace()).await;
                    break;
                }
                Stop::Upgrade => {
                    let Some(socket) = upgrade else { break };
                    match edge.hand_over(socket).await {
                        // The new process accepts already: no delay.
                        Ok(()) => {
                            crate::signals::exit_on_next_stop_signal();
                            edge.drain(Duration::ZERO, args.drain.grace()).await;
                            break;
                        }
                        Err(error) => tracing::error!(target: "switchyard::lifecycle", %error,
                            "graceful upgrade failed; this edge keeps serving"),
                    }
                }
            }
        }
        Ok(())
    })
}

fn resolve_listen(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} has no address"))
}

pub fn run_egress(args: EgressArgs) -> anyhow::Result<()> {
    let mut node = EgressNode::new(args.region.clone(), args.node_tls.load()?)
        .tls_files(args.node_tls.files())
        .listen(resolve_listen(&args.listen)?)
        .policy(policy_source(&args.config))
        .threads(args.threads)
        .limits(ConnectionLimits {
            max_streams: args.max_streams_per_connection,
            max_request_bytes: args.max_request_bytes_per_connection,
        });
    if let Some(link) = args.cp.link(&args.node_tls)? {
        node = node.control_plane(link);
    }
    if let Some(addr) = &args.admin_listen {
        node = node.admin(resolve_listen(addr)?);
    }
    if let Some(url) = &args.otlp_endpoint {
        node = node.otlp(url.clone());
    }
    command_runtime()?.block_on(async move {
        let egress = node.start().await?;
        println!(
            "switchyard egress (region {}) listening on {} (QUIC)",
            egress.region(),
            egress.local_addr()
        );
        if let Some(a) = egress.admin_addr() {
            println!("  admin: http://{a}/readyz");
        }
        print_providers(&egress.snapshot());
        run_until_stop(|force| egress.reload(force), false).await;
        egress.drain(args.drain.grace()).await;
        Ok(())
    })
}

pub fn run_gen_certs(args: GenCertsArgs) -> anyhow::Result<()> {
    let scope = match (args.role.as_deref(), &args.region) {
        (Some("edge"), Some(region)) => CertScope::Edge(region.clone()),
        (Some("egress"), Some(region)) => CertScope::Egress(region.clone()),
        (None, None) => CertScope::Unscoped,
        _ => bail!("--role edge|egress and --region go together"),
    };
    let g = generate_node_cert(&args.out, &args.name, &args.sans, &scope)?;
    if g.new_ca {
        println!("created CA      {}", g.ca_cert.display());
    } else {
        println!("reused CA       {}", g.ca_cert.display());
    }
    println!("certificate     {}", g.cert.display());
    println!("private key     {}", g.key.display());
    println!(
        "use: --cert {} --key {} --ca {}",
        g.cert.display(),
        g.key.display(),
        g.ca_cert.display()
    );
    Ok(())
}
