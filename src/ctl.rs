//! `switchyard ctl`: the operator's command line for the control plane.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use switchyard_control::client::{self, ClientTls};
use switchyard_control::pb;
use switchyard_proto::Secret;

#[derive(clap::Args)]
pub struct CtlArgs {
    /// Control plane gRPC URL (`http://` or `https://`).
    #[arg(
        long,
        env = "SWITCHYARD_SERVER",
        default_value = "http://127.0.0.1:7000"
    )]
    server: String,
    /// Admin token (sent as `authorization: Bearer`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA (PEM) to trust for an `https://` server.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Operator client certificate (PEM), instead of or besides a token.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Validate a policy and make it the new version (every error is listed).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Validate and show the diff without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value = "")]
        comment: String,
        /// Recorded with the version (default: $USER).
        #[arg(long)]
        author: Option<String>,
    },
    /// Show stored policy.
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Make an earlier version current again (as a new version).
    Rollback { version: u64 },
    /// List nodes: id, role, region, acknowledged version, last seen, health.
    Nodes,
    /// Key operations.
    Keys {
        #[command(subcommand)]
        op: KeysOp,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    /// Print a policy version's YAML (default: the current one) and the history.
    Policy {
        #[arg(long)]
        version: Option<u64>,
    },
}

#[derive(Subcommand)]
enum KeysOp {
    /// Re-encrypt stored keys under the current master key and republish,
    /// so egress nodes re-read their env/file key references.
    Rotate,
}

fn author(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default()
}

fn when(ms: i64) -> String {
    let secs = ms / 1000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(secs);
    format!("{}s ago", (now - secs).max(0))
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: CtlArgs) -> anyhow::Result<()> {
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let tls = if args.server.starts_with("https://") {
        Some(ClientTls {
            ca: args.ca.as_ref().map(read).transpose()?,
            identity: match (&args.cert, &args.key) {
                (Some(c), Some(k)) => Some((
                    read(c)?,
                    Secret::new(String::from_utf8(read(k)?).context("--key is not PEM text")?),
                )),
                _ => None,
            },
            domain: None,
        })
    } else {
        None
    };
    let token = args.token.map(Secret::new);
    let mut c = client::connect(&args.server, token.as_ref(), tls).await?;
    match args.command {
        CtlCommand::Apply {
            file,
            dry_run,
            comment,
            author: who,
        } => {
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let r = c
                .apply_policy(pb::ApplyPolicyRequest {
                    yaml,
                    dry_run,
                    author: author(who),
                    comment,
                })
                .await?
                .into_inner();
            print!("{}", client::render_outcome(&r, dry_run));
            if !r.errors.is_empty() {
                anyhow::bail!(
                    "{} error(s) in {}; nothing changed",
                    r.errors.len(),
                    file.display()
                );
            }
        }
        CtlCommand::Get {
            what: GetWhat::Policy { version },
        } => {
            let r = c
                .get_policy(pb::GetPolicyRequest {
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            if let Some(p) = r.policy {
                println!(
                    "# version {} by {} ({}){}",
                    p.version,
                    p.author,
                    when(p.created_at_ms),
                    if p.comment.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", p.comment)
                    }
                );
                print!("{}", p.yaml);
                if !p.yaml.ends_with('\n') {
                    println!();
                }
            }
            eprintln!("history:");
            for h in r.history {
                eprintln!(
                    "  v{:<5} {:<16} {:<12} {}",
                    h.version,
                    h.author,
                    when(h.created_at_ms),
                    h.comment
                );
            }
        }
        CtlCommand::Rollback { version } => {
            let r = c
                .rollback(pb::RollbackRequest {
                    version,
                    author: author(None),
                })
                .await?
                .into_inner();
            print!("{}", client::render_outcome(&r, false));
        }
        CtlCommand::Nodes => {
            let r = c.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
            println!("current version: {}", r.current_version);
            println!(
                "{:<24} {:<7} {:<12} {:>6} {:<14} {:<12} {:<10} NACK",
                "ID", "ROLE", "REGION", "ACKED", "LAST SEEN", "HEALTH", "REPLICA"
            );
            for n in r.nodes {
                let nack = if n.nacked_version > n.acked_version {
                    format!("v{}: {}", n.nacked_version, n.nack_reason)
                } else {
                    String::new()
                };
                println!(
                    "{:<24} {:<7} {:<12} {:>6} {:<14} {:<12} {:<10} {}",
                    n.id,
                    n.role,
                    n.region,
                    n.acked_version,
                    when(n.last_seen_ms),
                    n.health,
                    n.replica,
                    nack
                );
            }
        }
        CtlCommand::Keys { op: KeysOp::Rotate } => {
            let r = c
                .rotate_keys(pb::RotateKeysRequest {
                    author: author(None),
                })
                .await?
                .into_inner();
            print!("{}", client::render_outcome(&r, false));
        }
    }
    Ok(())
}
