//! `switchyard fleet`: a whole two-region fleet on loopback in one command,
//! as separate processes of this binary (the same ones a deployment runs):
//! a control plane, and for `eu-west` and `us-east` an egress node with a
//! simulated provider and an edge, each port standing for a regional
//! hostname. It generates the certificates, applies a policy, prints what
//! to try, restarts a node that exits, and on Ctrl-C or SIGTERM drains and
//! stops everything it started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use switchyard_backhaul::tunnel::{generate_node_cert, CertScope};
use switchyard_control::client::{self, ClientTls};
use switchyard_control::pb;
use switchyard_proto::{KeyHash, Secret};

#[derive(clap::Args)]
pub struct FleetArgs {
    /// Where certificates, the store, logs, the tenant keys and
    /// `fleet.pids` are kept (reused by the next run).
    #[arg(long, default_value = ".switchyard/fleet")]
    dir: PathBuf,
    /// First of the ports used: edges at +1 (eu-west) and +2 (us-east),
    /// control plane at +10 (gRPC) and +11 (HTTP), egress nodes at +21 and
    /// +22 (UDP), admin listeners at +30..+34. 0 picks free ports.
    #[arg(long, default_value_t = 18000)]
    base_port: u16,
    /// How long nodes may drain on Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace_seconds: f64,
}

const REGIONS: [(&str, &str); 2] = [("eu-west", "eu"), ("us-east", "us")];
/// How long a node may take to answer `/readyz` at start.
const READY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
struct Ports {
    edge: [SocketAddr; 2],
    grpc: SocketAddr,
    http: SocketAddr,
    egress: [SocketAddr; 2],
    admin_cp: SocketAddr,
    admin_egress: [SocketAddr; 2],
    admin_edge: [SocketAddr; 2],
}

fn loopback(port: u16) -> SocketAddr {
    (std::net::Ipv4Addr::LOCALHOST, port).into()
}

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

impl Ports {
    fn new(base: u16) -> anyhow::Result<Ports> {
        if base == 0 {
            return Ok(Ports {
                edge: [free_tcp()?, free_tcp()?],
                grpc: free_tcp()?,
                http: free_tcp()?,
                egress: [free_udp()?, free_udp()?],
                admin_cp: free_tcp()?,
                admin_egress: [free_tcp()?, free_tcp()?],
                admin_edge: [free_tcp()?, free_tcp()?],
            });
        }
        if base > u16::MAX - 40 {
            bail!("--base-port {base} leaves no room for the fleet's ports");
        }
        let p = |offset: u16| loopback(base + offset);
        Ok(Ports {
            edge: [p(1), p(2)],
            grpc: p(10),
            http: p(11),
            egress: [p(21), p(22)],
            admin_cp: p(30),
            admin_egress: [p(31), p(32)],
            admin_edge: [p(33), p(34)],
        })
    }
}

/// One node process of the fleet, restarted when it exits on its own.
struct Node {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    admin: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

/// A node that exits sooner than this after its start is restarted only
/// once this much time has passed, so a crash loop does not spin.
const RESTART_AFTER: Duration = Duration::from_secs(2);

impl Node {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find this binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(exe)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it exited (and how), without waiting.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `GET path` on an admin listener; the status code.
fn admin_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nhost: localhost\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn wait_ready(node: &mut Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    while admin_status(node.admin, "/readyz") != Some(200) {
        if let Some(status) = node.exited() {
            bail!(
                "{} exited at start ({status}); see {}",
                node.name,
                node.log.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} is not ready; see {}", node.name, node.log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A secret kept in the fleet directory across runs (owner-only).
fn kept_secret(
    dir: &Path,
    name: &str,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let path = dir.join(name);
    if let Ok(v) = std::fs::read_to_string(&path) {
        if !v.trim().is_empty() {
            return Ok(v.trim().to_string());
        }
    }
    let v = make()?;
    crate::dev::write_private(&path, v.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(v)
}

/// The fleet's policy: a simulated provider per region, a `chat` route
/// that prefers eu-west, a tenant that may use both regions and one bound
/// to the EU.
pub fn fleet_policy(egress: [SocketAddr; 2], global_key: &str, eu_key: &str) -> String {
    format!(
        r#"# Applied by `switchyard fleet`; change it and apply it again with
# `switchyard ctl ... apply -f` (see the fleet's banner).
regions:
  eu-west: {{ jurisdiction: eu, egress: ["{eu}"] }}
  us-east: {{ jurisdiction: us, egress: ["{us}"] }}
providers:
  sim-eu:
    kind: simulated
    region: eu-west
    models: [sim-small, sim-slow]
    # Made-up prices (USD per million tokens), so spend and budgets move.
    pricing: {{ sim-small: {{ input: 1, output: 2 }}, sim-slow: {{ input: 3, output: 15 }} }}
    # The fleet is for trying things: `x-switchyard-simulate` drives faults.
    simulated: {{ ttft_ms: 20, tokens_per_second: 200, output_tokens: 24, allow_header: true }}
  sim-us:
    kind: simulated
    region: us-east
    models: [sim-small, sim-slow]
    # Made-up prices (USD per million tokens), so spend and budgets move.
    pricing: {{ sim-small: {{ input: 1, output: 2 }}, sim-slow: {{ input: 3, output: 15 }} }}
    # The fleet is for trying things: `x-switchyard-simulate` drives faults.
    simulated: {{ ttft_ms: 20, tokens_per_second: 200, output_tokens: 24, allow_header: true }}
routes:
  chat:
    targets:
      - {{ provider: sim-eu, model: sim-small }}
      - {{ provider: sim-us, model: sim-small }}
tenants:
  - id: fleet-global
    key_sha256: "{global}"
    # Spend shows on the status page and in switchyard_budget_used_ratio.
    budget: {{ monthly_usd: 100 }}
  - id: fleet-eu
    key_sha256: "{eu_hash}"
    residency: [eu]
    # Served through either regional port (the US edge forwards to the EU);
    # `strict`, the default, would refuse it at the US edge.
    edge_residency: relaxed
"#,
        eu = egress[0],
        us = egress[1],
        global = KeyHash::of(global_key).to_hex(),
        eu_hash = KeyHash::of(eu_key).to_hex(),
    )
}

async fn apply(url: &str, ca: &[u8], token: &str, yaml: String) -> anyhow::Result<u64> {
    let tls = ClientTls {
        ca: Some(ca.to_vec()),
        identity: None,
        domain: None,
    };
    let mut c = client::connect(url, Some(&Secret::new(token)), Some(tls)).await?;
    let r = c
        .apply_policy(pb::ApplyPolicyRequest {
            yaml,
            dry_run: false,
            author: "switchyard fleet".into(),
            comment: String::new(),
        })
        .await?
        .into_inner();
    if !r.errors.is_empty() {
        bail!(
            "the fleet policy was refused:\n{}",
            client::render_outcome(&r, false)
        );
    }
    Ok(r.version)
}

fn write_pids(dir: &Path, nodes: &[Node]) {
    let text: String = nodes
        .iter()
        .filter_map(|n| n.pid().map(|p| format!("{} {p}\n", n.name)))
        .collect();
    let _ = std::fs::write(dir.join("fleet.pids"), text);
}

pub fn run(args: FleetArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let pki = dir.join("pki");
    let logs = dir.join("logs");
    for d in [dir, &pki, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let ports = Ports::new(args.base_port)?;
    let cp = generate_node_cert(&pki, "control-plane", &[], &CertScope::Unscoped)?;
    let certs: Vec<_> = REGIONS
        .iter()
        .map(|(region, short)| {
            let edge = generate_node_cert(
                &pki,
                &format!("edge-{short}"),
                &[],
                &CertScope::Edge(region.to_string()),
            )?;
            let egress = generate_node_cert(
                &pki,
                &format!("egress-{short}"),
                &[],
                &CertScope::Egress(region.to_string()),
            )?;
            Ok((edge, egress))
        })
        .collect::<anyhow::Result<_>>()?;
    let token = kept_secret(dir, "admin-token", || random_hex(16))?;
    let master = kept_secret(dir, "master-key", || random_hex(32))?;
    let global_key = kept_secret(dir, "tenant-key", || {
        Ok(format!("sy-fleet-{}", random_hex(12)?))
    })?;
    let eu_key = kept_secret(dir, "tenant-key-eu", || {
        Ok(format!("sy-fleet-eu-{}", random_hex(12)?))
    })?;
    let grace = format!("{}", args.shutdown_grace_seconds.max(0.0));
    let path = |p: &Path| p.display().to_string();
    let cp_url = format!("https://localhost:{}", ports.grpc.port());

    let mut nodes = vec![Node {
        name: "control-plane".into(),
        args: vec![
            "control-plane".into(),
            format!("--listen={}", ports.grpc),
            format!("--http-listen={}", ports.http),
            format!("--admin-listen={}", ports.admin_cp),
            format!("--store=sqlite://{}", path(&dir.join("control.db"))),
            format!("--tls-cert={}", path(&cp.cert)),
            format!("--tls-key={}", path(&cp.key)),
            format!("--client-ca={}", path(&cp.ca_cert)),
            "--admin-token-env=SWITCHYARD_ADMIN_TOKEN".into(),
            "--score-seconds=1".into(),
            format!("--shutdown-grace-seconds={grace}"),
        ],
        env: vec![
            ("SWITCHYARD_ADMIN_TOKEN".into(), token.clone()),
            ("SWITCHYARD_MASTER_KEY".into(), master),
        ],
        admin: ports.admin_cp,
        child: None,
        started: Instant::now(),
        log: logs.join("control-plane.log"),
    }];
    for (i, ((region, short), (edge, egress))) in REGIONS.iter().zip(&certs).enumerate() {
        let node_flags = |role: &str, c: &switchyard_backhaul::tunnel::tls::GeneratedNode| {
            vec![
                format!("--control-plane={cp_url}"),
                format!("--node-id={role}-{short}"),
                format!(
                    "--state-dir={}",
                    path(&dir.join("state").join(format!("{role}-{short}")))
                ),
                format!("--cert={}", path(&c.cert)),
                format!("--key={}", path(&c.key)),
                format!("--ca={}", path(&c.ca_cert)),
                format!("--shutdown-grace-seconds={grace}"),
            ]
        };
        let mut egress_args = vec![
            "egress".to_string(),
            format!("--region={region}"),
            format!("--listen={}", ports.egress[i]),
            format!("--admin-listen={}", ports.admin_egress[i]),
        ];
        egress_args.extend(node_flags("egress", egress));
        nodes.push(Node {
            name: format!("egress-{short}"),
            args: egress_args,
            env: Vec::new(),
            admin: ports.admin_egress[i],
            child: None,
            started: Instant::now(),
            log: logs.join(format!("egress-{short}.log")),
        });
        let mut edge_args = vec![
            "edge".to_string(),
            format!("--region={region}"),
            format!("--listen={}", ports.edge[i]),
            format!("--admin-listen={}", ports.admin_edge[i]),
        ];
        edge_args.extend(node_flags("edge", edge));
        nodes.push(Node {
            name: format!("edge-{short}"),
            args: edge_args,
            env: Vec::new(),
            admin: ports.admin_edge[i],
            child: None,
            started: Instant::now(),
            log: logs.join(format!("edge-{short}.log")),
        });
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = runtime.block_on(async {
        nodes[0].spawn()?;
        wait_ready(&mut nodes[0])?;
        let ca = std::fs::read(&cp.ca_cert)?;
        let policy = fleet_policy(ports.egress, &global_key, &eu_key);
        std::fs::write(dir.join("policy.yaml"), &policy)?;
        let version = apply(&cp_url, &ca, &token, policy).await?;
        // Egress nodes first: edges find them up when they start.
        for i in [1, 3, 2, 4] {
            nodes[i].spawn()?;
        }
        for node in nodes.iter_mut() {
            wait_ready(node)?;
        }
        anyhow::Ok(version)
    });
    let version = match started {
        Ok(v) => v,
        Err(e) => {
            stop(&mut nodes, Duration::from_secs(5));
            return Err(e);
        }
    };
    write_pids(dir, &nodes);

    println!("switchyard fleet ready (policy version {version})");
    println!(
        "  eu-west edge:   http://{}/v1   (stands for eu-west.api.example.com)",
        ports.edge[0]
    );
    println!(
        "  us-east edge:   http://{}/v1   (stands for us-east.api.example.com)",
        ports.edge[1]
    );
    println!(
        "  egress nodes:   eu-west {} / us-east {} (QUIC)",
        ports.egress[0], ports.egress[1]
    );
    println!(
        "  control plane:  {cp_url} (gRPC), http://{}/v1/policy",
        ports.http
    );
    println!(
        "  admin:          control-plane http://{} / egress {} {} / edge {} {}",
        ports.admin_cp,
        ports.admin_egress[0],
        ports.admin_egress[1],
        ports.admin_edge[0],
        ports.admin_edge[1]
    );
    println!("  status page:    http://{}/status", ports.admin_cp);
    println!("  tenant keys:    {global_key} (any region), {eu_key} (EU only)");
    println!(
        "  files:          {} (certificates, logs/, policy.yaml, fleet.pids)",
        dir.display()
    );
    println!("  try:");
    println!(
        "    curl http://{}/v1/chat/completions -H 'authorization: Bearer {global_key}' -H 'content-type: application/json' \\",
        ports.edge[1]
    );
    println!("      -d '{{\"model\":\"chat\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -i   # x-switchyard-region: eu-west");
    println!(
        "    SWITCHYARD_ADMIN_TOKEN=$(cat {}) switchyard ctl --server {cp_url} --ca {} apply -f {}",
        path(&dir.join("admin-token")),
        path(&cp.ca_cert),
        path(&dir.join("policy.yaml"))
    );
    println!(
        "    kill -TERM $(awk '/egress-eu/ {{print $2}}' {})   # drained and restarted",
        path(&dir.join("fleet.pids"))
    );
    println!("  Ctrl-C drains and stops everything.");
    let _ = std::io::stdout().flush();

    runtime.block_on(supervise(&mut nodes, dir));
    stop(
        &mut nodes,
        Duration::from_secs_f64(args.shutdown_grace_seconds.max(0.0) + 5.0),
    );
    let _ = std::fs::remove_file(dir.join("fleet.pids"));
    println!("switchyard fleet stopped");
    Ok(())
}

/// Restarts nodes that exit until SIGTERM or SIGINT.
async fn supervise(nodes: &mut [Node], dir: &Path) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = tick.tick() => {}
        }
        let mut changed = false;
        for node in nodes.iter_mut() {
            let Some(status) = node.exited() else {
                continue;
            };
            if node.started.elapsed() < RESTART_AFTER {
                continue;
            }
            tracing::warn!(target: "switchyard::fleet", node = %node.name, %status, "node exited; restarting it");
            if let Err(error) = node.spawn() {
                tracing::error!(target: "switchyard::fleet", node = %node.name, %error, "cannot restart it");
                node.child = None;
            }
            changed = true;
        }
        if changed {
            write_pids(dir, nodes);
        }
    }
}

/// SIGTERM to every node (edges first, the control plane last), each
/// given `grace` to drain, then SIGKILL for what is left.
fn stop(nodes: &mut [Node], grace: Duration) {
    let order = |n: &Node| match n.name.split('-').next() {
        Some("edge") => 0,
        Some("egress") => 1,
        _ => 2,
    };
    for rank in 0..3 {
        for node in nodes.iter().filter(|n| order(n) == rank) {
            node.signal("-TERM");
        }
        let deadline = Instant::now() + grace;
        for node in nodes.iter_mut().filter(|n| order(n) == rank) {
            while node.child.is_some() && node.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
