//! The `switchyard` binary: parses the command line, sets up logging and
//! hands over to the library crates.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod control;
mod ctl;
mod dev;
mod fleet;
mod node;
mod signals;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Multi-region LLM API gateway")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json, env = "SWITCHYARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process: edge on HTTP and HTTPS, in-process
    /// egress, providers from the environment plus the simulated provider.
    Dev(dev::DevArgs),
    /// Run an edge node: client-facing HTTP(S), requests sent over the QUIC
    /// backhaul to egress nodes. Holds no provider keys.
    Edge(node::EdgeArgs),
    /// Run an egress node: accepts backhaul connections from edges (mTLS)
    /// and calls providers with the keys from its environment.
    Egress(node::EgressArgs),
    /// Write a throwaway CA and a node certificate signed by it, for the
    /// backhaul's mutual TLS in development and tests.
    GenCerts(node::GenCertsArgs),
    /// Run a control-plane replica: policy versions in SQLite or PostgreSQL,
    /// snapshots pushed to every node over gRPC, operator API (gRPC + HTTP/JSON).
    ControlPlane(control::ControlPlaneArgs),
    /// Run a whole two-region fleet on loopback (control plane, and an
    /// edge and an egress per region with simulated providers) until Ctrl-C.
    Fleet(fleet::FleetArgs),
    /// Operate the control plane: apply, get, rollback, nodes, keys rotate.
    Ctl(ctl::CtlArgs),
    /// Print the SHA-256 of a virtual key, for `tenants[].key_sha256` in policy YAML.
    HashKey {
        /// The virtual key to hash.
        key: String,
    },
    /// Validate a policy file and list every error with its path.
    CheckPolicy {
        /// Policy YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pingora_core=warn,pingora=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .init();
            switchyard_edge::access_log::install_json_writer();
        }
        LogFormat::Pretty => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Pingora and quinn use ring; installing it as the process default keeps
    // every rustls user on one provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A background thread gives the memory of a burst of streams back to the
    // system while the gateway sits idle; without it jemalloc purges only
    // when later allocations happen to trigger it.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background purging is unavailable");
    }
    match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::ControlPlane(args) => control::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Fleet(args) => fleet::run(args),
        Command::Edge(args) => node::run_edge(args),
        Command::Egress(args) => node::run_egress(args),
        Command::GenCerts(args) => node::run_gen_certs(args),
        Command::HashKey { key } => {
            println!("{}", switchyard_proto::KeyHash::of(&key).to_hex());
            Ok(())
        }
        Command::CheckPolicy { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let errors = match switchyard_control::parse_policy(&text) {
                Err(e) => vec![e],
                Ok(doc) => {
                    let env = |k: &str| std::env::var(k).ok();
                    let opts = switchyard_control::CompileOptions {
                        env: &env,
                        include_simulated: true,
                        version: 0,
                    };
                    switchyard_control::compile(&doc, &opts)
                        .err()
                        .unwrap_or_default()
                }
            };
            if errors.is_empty() {
                println!("{}: ok", file.display());
                return Ok(());
            }
            for e in &errors {
                eprintln!("{e}");
            }
            anyhow::bail!("{} error(s) in {}", errors.len(), file.display())
        }
    }
}
