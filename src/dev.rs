//! `switchyard dev`: the whole gateway in one process.

use std::path::{Path, PathBuf};

use anyhow::Context;
use switchyard_backhaul::node::{NodeError, PolicySource};
use switchyard_control::{parse_policy, PolicyDocument};
use switchyard_edge::node::EdgeNode;
use switchyard_edge::service::TlsFiles;
use switchyard_edge::EdgeLimits;
use switchyard_proto::{KeyHash, TenantSnapshot};

const DEFAULT_CONFIG: &str = "deploy/dev/switchyard.yaml";

#[derive(clap::Args)]
pub struct DevArgs {
    /// Plain-HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// HTTPS listen address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    tls_listen: String,
    /// Serve HTTPS with this certificate chain (PEM) instead of a generated one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Policy YAML.
    #[arg(long, short = 'c', default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where the dev key and the generated certificate are kept.
    #[arg(long, default_value = ".switchyard")]
    state_dir: PathBuf,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    /// Export OpenTelemetry spans over OTLP/HTTP (protobuf) to this
    /// collector, e.g. `http://otel-collector:4318` (off by default).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Worker threads of the edge.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    drain: crate::signals::DrainArgs,
    #[command(flatten)]
    limits: EdgeLimitArgs,
}

/// What one client may hold on the edge (`switchyard dev` and `switchyard edge`).
#[derive(clap::Args)]
pub struct EdgeLimitArgs {
    /// Deadline for a request's whole header (and for the next request on a
    /// kept-alive connection), in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_ms: u64,
    /// Deadline for a request's whole body, in milliseconds.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_ms: u64,
    /// Deadline for the TLS handshake, in milliseconds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    tls_handshake_timeout_ms: u64,
    /// Open client connections on this edge; more are closed at once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Open client connections from one IP address; more are closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_ip: u64,
}

impl EdgeLimitArgs {
    pub fn limits(&self) -> EdgeLimits {
        use std::time::Duration;
        EdgeLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            max_connections: self.max_connections as usize,
            max_connections_per_ip: self.max_connections_per_ip as usize,
        }
    }
}

fn load_policy(path: &Path) -> anyhow::Result<PolicyDocument> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // Running from outside the repo with the default path: no YAML is fine.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => {
            String::new()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    parse_policy(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// `SWITCHYARD_DEV_KEY`, else the key kept in the state dir, else a new one.
fn dev_key(state_dir: &Path) -> anyhow::Result<String> {
    if let Ok(k) = std::env::var("SWITCHYARD_DEV_KEY") {
        if !k.trim().is_empty() {
            return Ok(k.trim().to_string());
        }
    }
    let path = state_dir.join("dev-key");
    #[cfg(unix)]
    {
        // Kept from an earlier version that wrote it world-readable.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let tls_key = state_dir.join("tls").join("key.pem");
        let _ = std::fs::set_permissions(tls_key, std::fs::Permissions::from_mode(0o600));
    }
    if let Ok(k) = std::fs::read_to_string(&path) {
        if !k.trim().is_empty() {
            return Ok(k.trim().to_string());
        }
    }
    let key = format!("sy-dev-{}", random_hex(16)?);
    write_private(&path, key.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

/// Writes a file only its owner can read (the dev key, the TLS key).
pub(crate) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        // `mode` applies only when the file is created.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    options.open(path)?.write_all(contents)
}

fn tls_files(args: &DevArgs) -> anyhow::Result<(TlsFiles, bool)> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return Ok((
            TlsFiles {
                cert_path: cert.display().to_string(),
                key_path: key.display().to_string(),
            },
            false,
        ));
    }
    let dir = args.state_dir.join("tls");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let generated = !(cert.exists() && key.exists());
    if generated {
        std::fs::create_dir_all(&dir)?;
        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let ck = rcgen::generate_simple_self_signed(names).context("generating certificate")?;
        std::fs::write(&cert, ck.cert.pem())?;
        write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
    }
    Ok((
        TlsFiles {
            cert_path: cert.display().to_string(),
            key_path: key.display().to_string(),
        },
        generated,
    ))
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    // A file is watched and reloaded; a missing default file is an empty policy.
    let source = if args.config.exists() {
        PolicySource::File(args.config.clone())
    } else {
        PolicySource::Document(load_policy(&args.config)?)
    };
    let key = dev_key(&args.state_dir)?;
    let (tls, generated) = tls_files(&args)?;
    let cert_path = tls.cert_path.clone();
    let node = EdgeNode::single_node()
        .policy(source)
        .tenant(
            KeyHash::of(&key),
            TenantSnapshot {
                id: "dev".into(),
                allowed_models: None,
            },
        )
        .listen(args.listen.clone())
        .tls(args.tls_listen.clone(), tls)
        .metrics(args.metrics_listen.clone())
        .threads(args.threads)
        .limits(args.limits.limits())
        .simulate_header(true);
    let node = match &args.otlp_endpoint {
        Some(url) => node.otlp(url.clone()),
        None => node,
    };
    crate::node::command_runtime()?.block_on(async move {
        let edge = node.bind().await.map_err(|e| match e {
            // The policy's errors were listed against "policy": name the file.
            NodeError::Policy { errors, .. } => NodeError::Policy {
                path: args.config.clone(),
                errors,
            },
            e => e,
        })?;
        let http = edge.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let https = edge.tls_addr().map(|a| a.to_string()).unwrap_or_default();
        let metrics = edge.metrics_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("switchyard dev");
        println!("  OpenAI base URL:  http://{http}/v1");
        println!("  HTTPS base URL:   https://{https}/v1");
        println!(
            "  TLS certificate:  {cert_path}{}",
            if generated {
                " (generated, self-signed)"
            } else {
                ""
            }
        );
        println!("  metrics:          http://{metrics}/metrics");
        println!("  virtual key:      {key}");
        println!("  providers:");
        for (name, status) in edge.provider_status() {
            println!("    {name:<12} {status}");
        }
        println!("  try: curl http://{http}/v1/chat/completions -H 'authorization: Bearer {key}' \\");
        println!("         -H 'content-type: application/json' -d '{{\"model\":\"simulated/sim-small\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
        // Accepting only after the banner: whoever waits for the port finds it printed.
        let edge = edge.serve();
        crate::signals::run_until_stop(|force| edge.reload(force), false).await;
        edge.drain(args.drain.delay(), args.drain.grace()).await;
        anyhow::Ok(())
    })
}
