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
    generate_node_cert, EgressServer, NodeTls, StaticDirectory, TunnelConfig, TunnelRouter,
};
use switchyard_backhaul::Egress;
use switchyard_control::{compile, parse_policy, CompileOptions, PolicyDocument};
use switchyard_edge::service::{edge_service, TlsFiles};
use switchyard_edge::EdgeApp;
use switchyard_proto::{KeyHash, Snapshot, TenantSnapshot};

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
}

#[derive(clap::Args)]
pub struct EdgeArgs {
    /// Region this edge runs in; providers without a region prefer its egress nodes.
    #[arg(long)]
    region: String,
    /// Plain-HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// HTTPS listen address.
    #[arg(long)]
    tls_listen: Option<String>,
    /// Policy YAML (providers, regions, tenants). Provider keys are never read here.
    #[arg(long, short = 'c')]
    config: PathBuf,
    #[command(flatten)]
    node_tls: NodeTlsArgs,
    /// Client-facing HTTPS certificate (PEM); defaults to the node certificate.
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
    #[arg(long, short = 'c')]
    config: PathBuf,
    #[command(flatten)]
    node_tls: NodeTlsArgs,
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

    let doc = load_policy(&args.config)?;
    let env = edge_env(&doc);
    let mut snapshot = compile_policy(&doc, &args.config, &env)?;
    strip_keys(&mut snapshot, |_| false);
    if let Ok(k) = std::env::var("SWITCHYARD_DEV_KEY") {
        if !k.trim().is_empty() {
            snapshot.tenants.insert(
                KeyHash::of(k.trim()),
                Arc::new(TenantSnapshot {
                    id: "dev".into(),
                    allowed_models: None,
                }),
            );
        }
    }
    let mut directory = StaticDirectory::from_snapshot(&snapshot);
    for flag in &args.egress {
        let (region, addr) = StaticDirectory::parse_flag(flag).map_err(|e| anyhow::anyhow!(e))?;
        directory.add(&region, &addr);
    }
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    let tls = args.node_tls.load()?;

    // quinn's drivers live on a runtime of our own: Pingora's service
    // runtimes come and go with its services.
    let backhaul_rt = runtime("backhaul", 2)?;
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

    let app = EdgeApp::new(shared.clone(), router);
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let tls_files = TlsFiles {
        cert_path: args
            .tls_cert
            .as_ref()
            .unwrap_or(&args.node_tls.cert)
            .display()
            .to_string(),
        key_path: args
            .tls_key
            .as_ref()
            .unwrap_or(&args.node_tls.key)
            .display()
            .to_string(),
    };
    let service = edge_service(
        app,
        Some(&args.listen),
        args.tls_listen.as_deref().map(|a| (a, &tls_files)),
        args.threads,
    )
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
    let snap = shared.load();
    let mut names: Vec<_> = snap.providers.values().collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    for p in names {
        println!(
            "  provider {} region={} keys={}",
            p.name,
            p.region.as_deref().unwrap_or("any"),
            p.keys.len()
        );
    }
    server.run(RunArgs::default());
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
    let doc = load_policy(&args.config)?;
    let env = |k: &str| std::env::var(k).ok();
    let mut snapshot = compile_policy(&doc, &args.config, &env)?;
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
        let egress = Egress::new(shared.clone()).map_err(|e| anyhow::anyhow!("egress: {e}"))?;
        let server = EgressServer::bind(listen, &tls, egress, shared.clone(), &args.region)?;
        let bound = server.local_addr()?;
        let endpoint = server.endpoint();
        println!("switchyard egress (region {}) listening on {bound} (QUIC)", args.region);
        let snap = shared.load();
        let mut names: Vec<_> = snap.providers.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for p in names {
            println!(
                "  provider {} region={} keys={}",
                p.name,
                p.region.as_deref().unwrap_or("any"),
                p.keys.len()
            );
        }
        tracing::info!(target: "switchyard::backhaul", %bound, region = %args.region, "egress listening");
        let serve = tokio::spawn(server.run());
        shutdown_signal().await;
        // Closing tells every edge at once, instead of after its idle timeout.
        endpoint.close(0u32.into(), b"egress shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        serve.abort();
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
    let g = generate_node_cert(&args.out, &args.name, &args.sans)?;
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
