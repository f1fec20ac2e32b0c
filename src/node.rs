//! `switchyard edge`, `switchyard egress` and `switchyard gen-certs`: the
//! data plane as separate processes joined by the QUIC backhaul.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use switchyard_backhaul::tunnel::{
    generate_node_cert, CertScope, ConnectionLimits, EgressServer, NodeTls, StaticDirectory,
    TunnelConfig, TunnelRouter,
};
use switchyard_backhaul::Egress;
use switchyard_backhaul::{RequestObserver, RequestReport};
use switchyard_control::node_client::{self, NodeAgent, NodeConfig, Role};
use switchyard_control::telemetry::{RequestRecord, TelemetryHandle};
use switchyard_control::{compile, parse_policy, CompileOptions, PolicyDocument};
use switchyard_edge::service::{edge_service, TlsFiles};
use switchyard_edge::EdgeApp;
use switchyard_proto::{Secret, Snapshot};

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
    /// Starts the node agent (it loads the cached snapshot into `shared`
    /// before returning). Call inside a runtime the node owns.
    fn start_agent(
        &self,
        role: Role,
        region: &str,
        tls: &NodeTlsArgs,
        shared: &Arc<ArcSwap<Snapshot>>,
    ) -> anyhow::Result<Option<NodeAgent>> {
        let Some(url) = &self.control_plane else {
            return Ok(None);
        };
        let role_name = match role {
            Role::Edge => "edge",
            Role::Egress => "egress",
        };
        let id = self
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{role_name}-{region}-{}", std::process::id()));
        std::fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("cannot create {}", self.state_dir.display()))?;
        let cache = self
            .state_dir
            .join(format!("{role_name}-{region}.snapshot"));
        let config = NodeConfig::new(url.clone(), id, role, region)
            .tls(tls.control_plane_tls()?)
            .cache_path(cache);
        let agent = NodeAgent::start(config, shared.clone())
            .map_err(|e| anyhow::anyhow!("control plane agent: {e}"))?;
        Ok(Some(agent))
    }
}

/// Waits (bounded) for the first snapshot when the node has nothing to serve.
async fn wait_for_first_snapshot(shared: &Arc<ArcSwap<Snapshot>>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while shared.load().version == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
            .providers
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
    #[command(flatten)]
    limits: crate::dev::EdgeLimitArgs,
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

fn load_policy(path: &Path) -> anyhow::Result<PolicyDocument> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_policy(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn compile_policy(
    doc: &PolicyDocument,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Snapshot> {
    match compile(
        doc,
        &CompileOptions {
            env,
            include_simulated: true,
            version: 1,
        },
    ) {
        Ok(c) => Ok(c.snapshot),
        Err(errors) => {
            for e in &errors {
                eprintln!("{}: {e}", path.display());
            }
            bail!("{} error(s) in the policy", errors.len())
        }
    }
}

/// Stands in for a provider key on the edge, so providers compile as live;
/// cleared right after compilation.
const EDGE_KEY_PLACEHOLDER: &str = "held-by-egress";

/// The environment as the edge's compiler sees it: every variable that names
/// a provider key reads as a placeholder, never the real value, so a key in
/// the edge's environment by mistake still never reaches its snapshot.
/// Providers must be declared in the policy: the edge cannot see which keys
/// an egress has in its environment.
fn edge_env(doc: &PolicyDocument) -> impl Fn(&str) -> Option<String> {
    let mut key_vars: HashSet<String> = HashSet::new();
    for (name, p) in &doc.providers {
        match &p.api_key_env {
            Some(var) => {
                key_vars.insert(var.clone());
            }
            None => {
                key_vars.insert(format!("{}_API_KEY", name.to_ascii_uppercase()));
            }
        }
    }
    move |k: &str| {
        if key_vars.contains(k) {
            Some(EDGE_KEY_PLACEHOLDER.to_string())
        } else if k.ends_with("_API_KEY") {
            None
        } else {
            std::env::var(k).ok()
        }
    }
}

fn strip_keys(snapshot: &mut Snapshot, keep: impl Fn(Option<&str>) -> bool) {
    for p in snapshot.providers.values_mut() {
        if !p.keys.is_empty() && !keep(p.region.as_deref()) {
            let mut stripped = (**p).clone();
            stripped.keys.clear();
            *p = Arc::new(stripped);
        }
    }
}

/// The start-up banner's provider lines (key counts, never keys).
fn print_providers(snap: &Snapshot) {
    let mut providers: Vec<_> = snap.providers.values().collect();
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

fn runtime(name: &str, threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .context("tokio runtime")
}

pub fn run_edge(args: EdgeArgs) -> anyhow::Result<()> {
    use pingora::server::configuration::ServerConf;
    use pingora::server::{RunArgs, Server};

    let mut snapshot = match &args.config {
        Some(path) => {
            let doc = load_policy(path)?;
            let env = edge_env(&doc);
            compile_policy(&doc, path, &env)?
        }
        None => Snapshot::default(),
    };
    strip_keys(&mut snapshot, |_| false);
    // The dev key is an all-models tenant: fine on a laptop (`switchyard
    // dev`), a hole on an edge that faces clients. Tenants come from the policy.
    if std::env::var_os("SWITCHYARD_DEV_KEY").is_some() {
        tracing::warn!("SWITCHYARD_DEV_KEY is ignored by `switchyard edge` (only `switchyard dev` uses it); give tenants in the policy");
    }
    let mut flags = Vec::new();
    for flag in &args.egress {
        flags.push(StaticDirectory::parse_flag(flag).map_err(|e| anyhow::anyhow!(e))?);
    }
    let directory_of = move |snap: &Snapshot| {
        let mut d = StaticDirectory::from_snapshot(snap);
        for (region, addr) in &flags {
            d.add(region, addr);
        }
        d
    };
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let tls = args.node_tls.load()?;

    // quinn's drivers (and the control-plane agent) live on a runtime of
    // our own: Pingora's service runtimes come and go with its services.
    let backhaul_rt = runtime("backhaul", 2)?;
    let agent = backhaul_rt.block_on(async {
        let agent = args
            .cp
            .start_agent(Role::Edge, &args.region, &args.node_tls, &shared)?;
        if agent.is_some() {
            wait_for_first_snapshot(&shared, Duration::from_secs(10)).await;
        }
        Ok::<_, anyhow::Error>(agent)
    })?;
    let directory = directory_of(&shared.load());
    let router = backhaul_rt.block_on(async {
        let router = TunnelRouter::start(
            TunnelConfig {
                region: args.region.clone(),
                tls,
            },
            &directory,
            shared.clone(),
        )?;
        let (up, total) = router.wait_connected(Duration::from_secs(5)).await;
        tracing::info!(target: "switchyard::backhaul", up, total, "backhaul warm-up done");
        Ok::<_, anyhow::Error>(router)
    })?;

    // New snapshots may move egress nodes; the router follows them, and the
    // measured backhaul RTTs flow to the control plane's latency scores.
    {
        let shared = shared.clone();
        let router = router.clone();
        let telemetry = agent.as_ref().map(|a| a.telemetry());
        backhaul_rt.spawn(async move {
            let mut seen = shared.load().version;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let snap = shared.load_full();
                if snap.version != seen {
                    seen = snap.version;
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
    let mut app = EdgeApp::new(shared.clone(), router.clone())
        .with_region(args.region.clone())
        .with_limits(args.limits.limits());
    if let Some(a) = &agent {
        app = app.with_observer(Arc::new(TelemetryObserver {
            handle: a.telemetry(),
            snapshot: shared.clone(),
        }));
    }
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // clap makes --tls-listen require --tls-cert, and --tls-cert --tls-key.
    let tls_files = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert_path: cert.display().to_string(),
            key_path: key.display().to_string(),
        }),
        _ => None,
    };
    let https = match (args.tls_listen.as_deref(), &tls_files) {
        (Some(addr), Some(files)) => Some((addr, files)),
        _ => None,
    };
    let service = edge_service(app, Some(&args.listen), https, args.threads)
        .map_err(|e| anyhow::anyhow!("edge: {e}"))?;
    server.add_service(service);

    println!("switchyard edge (region {})", args.region);
    println!("  HTTP:   http://{}/v1", args.listen);
    if let Some(a) = &args.tls_listen {
        println!("  HTTPS:  https://{a}/v1");
    }
    use switchyard_backhaul::tunnel::EgressDirectory;
    for (region, addrs) in directory.regions() {
        println!("  egress {region}: {}", addrs.join(", "));
    }
    print_providers(&shared.load());
    server.run(RunArgs::default());
    drop(agent);
    drop(backhaul_rt);
    Ok(())
}

fn resolve_listen(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} has no address"))
}

pub fn run_egress(args: EgressArgs) -> anyhow::Result<()> {
    let mut snapshot = match &args.config {
        Some(path) => {
            let doc = load_policy(path)?;
            let env = |k: &str| std::env::var(k).ok();
            compile_policy(&doc, path, &env)?
        }
        None => Snapshot::default(),
    };
    if !snapshot.regions.is_empty() && !snapshot.regions.contains_key(&args.region) {
        bail!(
            "region {:?} is not in the policy's regions ({})",
            args.region,
            snapshot
                .regions
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // An egress holds only the keys it may use: its region's providers and
    // those bound to no region.
    let region = args.region.clone();
    strip_keys(&mut snapshot, |r| r.is_none_or(|r| r == region));
    let tls = args.node_tls.load()?;
    let listen = resolve_listen(&args.listen)?;
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let rt = runtime("egress", args.threads)?;
    rt.block_on(async move {
        // The control plane sends this egress only its own region's keys.
        let agent = args.cp.start_agent(Role::Egress, &args.region, &args.node_tls, &shared)?;
        if agent.is_some() {
            wait_for_first_snapshot(&shared, Duration::from_secs(10)).await;
        }
        let egress = Egress::new(shared.clone()).map_err(|e| anyhow::anyhow!("egress: {e}"))?;
        let limits = ConnectionLimits {
            max_streams: args.max_streams_per_connection,
            max_request_bytes: args.max_request_bytes_per_connection,
        };
        let server = EgressServer::bind(listen, &tls, egress, shared.clone(), &args.region, limits)?;
        let bound = server.local_addr()?;
        let endpoint = server.endpoint();
        println!("switchyard egress (region {}) listening on {bound} (QUIC)", args.region);
        print_providers(&shared.load());
        tracing::info!(target: "switchyard::backhaul", %bound, region = %args.region, "egress listening");
        let serve = tokio::spawn(server.run());
        shutdown_signal().await;
        // Closing tells every edge at once, instead of after its idle timeout.
        endpoint.close(0u32.into(), b"egress shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        serve.abort();
        if let Some(a) = agent {
            a.shutdown().await;
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
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
