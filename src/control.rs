//! `switchyard control-plane`: runs one control-plane replica until SIGINT/SIGTERM
//! (then drains: readiness false, operator calls in progress finish). Its
//! TLS certificate files are reloaded on change and on SIGHUP.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use switchyard_control::secrets::MasterKeys;
use switchyard_control::server::{self, ServerConfig, TlsPem};
use switchyard_proto::Secret;

#[derive(clap::Args)]
pub struct ControlPlaneArgs {
    /// gRPC listen address (Operator and Node services).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// `sqlite://PATH` (created on first start) or `postgres://...`.
    #[arg(long, default_value = "sqlite://.switchyard/control.db")]
    store: String,
    /// Server certificate chain (PEM); enables TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) signing node client certificates; nodes must then present one.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Environment variable holding the operators' bearer token.
    #[arg(long)]
    admin_token_env: Option<String>,
    /// SHA-256 (hex) of a client certificate allowed to act as operator; repeatable.
    #[arg(long = "operator-cert-sha256")]
    operator_cert_sha256: Vec<String>,
    /// Also serve the operator API as HTTP/JSON here (plain HTTP).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Name of this replica in `ctl nodes` (default: cp-<pid>).
    #[arg(long)]
    replica_id: Option<String>,
    /// Seconds between polls of the store for versions applied through another replica.
    #[arg(long, default_value_t = 1.0)]
    poll_seconds: f64,
    /// INSECURE, development only: accept node certificates that are not
    /// scoped to the role and region the node claims (by default they are
    /// refused: otherwise any fleet certificate can claim any region and
    /// receive its egress keys).
    #[arg(long, requires = "client_ca")]
    insecure_allow_unscoped_node_certs: bool,
    /// INSECURE, development only: start with no operator authentication
    /// (no --admin-token-env, no --operator-cert-sha256), or with the admin
    /// token sent over plaintext on a non-loopback address.
    #[arg(long)]
    insecure_open_operator_api: bool,
    /// Seconds a client has to send an HTTP request head (and to finish the
    /// TLS handshake on gRPC); idle keep-alive connections close after it too.
    #[arg(long, default_value_t = 10.0)]
    header_timeout_seconds: f64,
    /// Seconds a client has to send an HTTP request body.
    #[arg(long, default_value_t = 30.0)]
    body_timeout_seconds: f64,
    /// Open connections accepted on each listener, in all.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Open connections accepted on each listener from one IP address.
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: usize,
    /// Seconds between latency-score refreshes pushed to nodes (at most 10).
    #[arg(long, default_value_t = 5.0)]
    score_seconds: f64,
    /// Admin listener: `/healthz`, `/readyz` (503 from the first SIGTERM),
    /// `/metrics` (policy version, nodes by state).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    drain: crate::signals::DrainArgs,
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

pub fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let master_keys = MasterKeys::from_env(&env)?;
    let admin_token = match &args.admin_token_env {
        Some(var) => {
            let v = std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .with_context(|| format!("--admin-token-env: ${var} is not set"))?;
            Some(Secret::new(v.trim()))
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsPem {
            cert: read(cert)?,
            key: Secret::new(String::from_utf8(read(key)?).context("--tls-key is not PEM text")?),
            client_ca: args.client_ca.as_ref().map(read).transpose()?,
        }),
        _ => None,
    };
    let mut config = ServerConfig::new(args.listen, args.store);
    config.require_node_scope = !args.insecure_allow_unscoped_node_certs;
    config.insecure_open_operator_api = args.insecure_open_operator_api;
    let seconds = |s: f64| std::time::Duration::from_secs_f64(s.clamp(0.1, 3600.0));
    config.limits.header_timeout = seconds(args.header_timeout_seconds);
    config.limits.body_timeout = seconds(args.body_timeout_seconds);
    config.limits.max_connections = args.max_connections;
    config.limits.max_connections_per_ip = args.max_connections_per_ip;
    config.tls = tls;
    config.tls_files = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(switchyard_control::tls::ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    config.admin_token = admin_token;
    config.operator_cert_sha256 = args.operator_cert_sha256;
    config.http_listen = args.http_listen;
    config.admin_listen = args.admin_listen;
    config.master_keys = master_keys;
    if let Some(id) = args.replica_id {
        config.replica_id = id;
    }
    config.poll_interval = std::time::Duration::from_secs_f64(args.poll_seconds.max(0.05));
    config.score_interval = std::time::Duration::from_secs_f64(args.score_seconds.clamp(0.1, 10.0));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let running = server::start(config).await?;
        println!("switchyard control-plane");
        println!("  gRPC:     {}", running.grpc_addr);
        if let Some(http) = running.http_addr {
            println!("  HTTP:     http://{http}/v1/policy");
        }
        if let Some(admin) = running.admin_addr {
            println!("  admin:    http://{admin}/readyz");
        }
        println!("  version:  {}", running.state.current_version());
        // The certificate files are looked at every second and on SIGHUP.
        crate::signals::run_until_stop(
            |force| {
                running.reload_tls(force);
            },
            false,
        )
        .await;
        running.drain(args.drain.grace()).await;
        anyhow::Ok(())
    })
}
