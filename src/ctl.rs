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
    /// Provider-key operations (the master key sealing provider keys).
    Keys {
        #[command(subcommand)]
        op: KeysOp,
    },
    /// Virtual keys: the keys tenants' applications use (stored as hashes).
    Vkeys {
        #[command(subcommand)]
        op: VkeysOp,
    },
    /// The usage ledger: requests, tokens and cost, grouped.
    Usage {
        /// One tenant (default: all).
        #[arg(long)]
        tenant: Option<String>,
        /// How far back: 7d, 24h, 30m, or Unix milliseconds.
        #[arg(long, default_value = "7d")]
        since: String,
        /// model | provider | key | day | tenant | egress | key_pool
        #[arg(long, default_value = "model")]
        group_by: String,
        /// CSV on stdout instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum VkeysOp {
    /// Issue a key for a tenant; it is printed once and only its hash kept.
    Create {
        #[arg(long)]
        tenant: String,
        /// A name for the key (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Lifetime (30d, 12h, ...) or expiry in Unix milliseconds.
        #[arg(long)]
        expires: Option<String>,
        /// Models the key may use (comma-separated; default: the tenant's).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long)]
        rpm: Option<u32>,
        #[arg(long)]
        tpm: Option<u64>,
        #[arg(long)]
        concurrency: Option<u32>,
        #[arg(long)]
        daily_usd: Option<f64>,
        #[arg(long)]
        monthly_usd: Option<f64>,
    },
    /// List keys (ids, hash prefixes, rules, expiry, revocation).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key; every edge refuses it once the push reaches it.
    Revoke { id: String },
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
        CtlCommand::Vkeys {
            op:
                VkeysOp::Create {
                    tenant,
                    id,
                    expires,
                    models,
                    rpm,
                    tpm,
                    concurrency,
                    daily_usd,
                    monthly_usd,
                },
        } => {
            let now = switchyard_control::store::now_ms();
            let expires_at_ms = match expires {
                None => 0,
                Some(text) => {
                    switchyard_control::tenancy::parse_expiry(&text, now).with_context(|| {
                        format!("--expires {text:?}: use 30d, 12h, 45m or Unix milliseconds")
                    })?
                }
            };
            let r = c
                .create_virtual_key(pb::CreateVirtualKeyRequest {
                    tenant,
                    id: id.unwrap_or_default(),
                    models,
                    rpm: rpm.unwrap_or(0),
                    tpm: tpm.unwrap_or(0),
                    concurrency: concurrency.unwrap_or(0),
                    daily_usd: daily_usd.unwrap_or(0.0),
                    monthly_usd: monthly_usd.unwrap_or(0.0),
                    expires_at_ms,
                })
                .await?
                .into_inner();
            let key = r.key.unwrap_or_default();
            eprintln!(
                "created virtual key {} for tenant {} (shown once; only its hash is stored)",
                key.id, key.tenant
            );
            println!("{}", r.secret);
        }
        CtlCommand::Vkeys {
            op: VkeysOp::List { tenant },
        } => {
            let r = c
                .list_virtual_keys(pb::ListVirtualKeysRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "{:<20} {:<14} {:<13} {:<9} {:<20} {:<14} RULES",
                "ID", "TENANT", "HASH", "STATE", "EXPIRES", "CREATED"
            );
            let now = switchyard_control::store::now_ms();
            for k in r.keys {
                let state = if k.revoked_at_ms > 0 {
                    "revoked"
                } else if k.expires_at_ms > 0 && k.expires_at_ms <= now {
                    "expired"
                } else {
                    "active"
                };
                let expires = if k.expires_at_ms == 0 {
                    "never".to_string()
                } else {
                    format!("in {}s", (k.expires_at_ms - now) / 1000)
                };
                let mut rules = Vec::new();
                if !k.models.is_empty() {
                    rules.push(format!("models={}", k.models.join(",")));
                }
                for (name, v) in [
                    ("rpm", u64::from(k.rpm)),
                    ("tpm", k.tpm),
                    ("concurrency", u64::from(k.concurrency)),
                ] {
                    if v > 0 {
                        rules.push(format!("{name}={v}"));
                    }
                }
                for (name, v) in [("daily_usd", k.daily_usd), ("monthly_usd", k.monthly_usd)] {
                    if v > 0.0 {
                        rules.push(format!("{name}={v}"));
                    }
                }
                println!(
                    "{:<20} {:<14} {:<13} {:<9} {:<20} {:<14} {}",
                    k.id,
                    k.tenant,
                    k.hash_prefix,
                    state,
                    expires,
                    when(k.created_at_ms),
                    rules.join(" ")
                );
            }
        }
        CtlCommand::Vkeys {
            op: VkeysOp::Revoke { id },
        } => {
            let r = c
                .revoke_virtual_key(pb::RevokeVirtualKeyRequest { id: id.clone() })
                .await?
                .into_inner();
            if !r.revoked {
                anyhow::bail!("no active virtual key {id:?}");
            }
            println!("revoked {id}");
        }
        CtlCommand::Usage {
            tenant,
            since,
            group_by,
            csv,
        } => {
            let now = switchyard_control::store::now_ms();
            let since_ms =
                switchyard_control::tenancy::parse_since(&since, now).with_context(|| {
                    format!("--since {since:?}: use 7d, 24h, 30m or Unix milliseconds")
                })?;
            let r = c
                .query_usage(pb::QueryUsageRequest {
                    tenant: tenant.unwrap_or_default(),
                    since_ms,
                    group_by: group_by.clone(),
                })
                .await?
                .into_inner();
            if csv {
                print!(
                    "{}",
                    switchyard_control::tenancy::usage_csv(&r.rows, &group_by)
                );
            } else {
                println!(
                    "{:<32} {:>9} {:>7} {:>12} {:>12} {:>10} {:>12}",
                    group_by.to_uppercase(),
                    "REQUESTS",
                    "ERRORS",
                    "INPUT",
                    "OUTPUT",
                    "CACHED",
                    "COST USD"
                );
                for u in r.rows {
                    println!(
                        "{:<32} {:>9} {:>7} {:>12} {:>12} {:>10} {:>12.6}",
                        if u.group.is_empty() { "-" } else { &u.group },
                        u.requests,
                        u.errors,
                        u.input_tokens,
                        u.output_tokens,
                        u.cached_tokens,
                        u.cost_usd
                    );
                }
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
