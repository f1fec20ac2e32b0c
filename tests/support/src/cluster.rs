//! Starts `switchyard edge` and `switchyard egress` processes for a test or a
//! benchmark, with certificates from `switchyard gen-certs`, and kills them
//! when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::gateway::{capture, SCRUBBED_ENV, TEST_KEY};

/// A node identity written by `switchyard gen-certs`.
#[derive(Debug, Clone)]
pub struct NodeCerts {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Runs `switchyard gen-certs --out dir --name name` (creating the CA in
/// `dir` on first use).
pub fn gen_certs(binary: &Path, dir: &Path, name: &str) -> NodeCerts {
    gen_certs_with(binary, dir, name, &[])
}

/// A certificate scoped to `role` in `region`: the control plane lets it
/// claim only that, and the backhaul accepts it only in that role (edges
/// must use `edge` certificates, egress nodes `egress` ones).
pub fn gen_scoped_certs(
    binary: &Path,
    dir: &Path,
    name: &str,
    role: &str,
    region: &str,
) -> NodeCerts {
    gen_certs_with(binary, dir, name, &["--role", role, "--region", region])
}

fn gen_certs_with(binary: &Path, dir: &Path, name: &str, extra: &[&str]) -> NodeCerts {
    let out = Command::new(binary)
        .args(["gen-certs", "--out"])
        .arg(dir)
        .args(["--name", name])
        .args(extra)
        .output()
        .expect("run switchyard gen-certs");
    assert!(
        out.status.success(),
        "gen-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    NodeCerts {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// Policy YAML declaring the tenant whose virtual key is [`TEST_KEY`] (by
/// its hash, from `switchyard hash-key`): edges accept only policy tenants.
pub fn test_tenant_yaml(binary: &Path) -> String {
    let out = Command::new(binary)
        .args(["hash-key", TEST_KEY])
        .output()
        .expect("run switchyard hash-key");
    assert!(out.status.success(), "hash-key failed");
    let hash = String::from_utf8(out.stdout).expect("hash-key output");
    format!(
        "tenants:\n  - id: test\n    key_sha256: \"{}\"\n",
        hash.trim()
    )
}

pub fn free_tcp_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("probe addr")
}

pub fn free_udp_port() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind probe");
    s.local_addr().expect("probe addr")
}

/// One running node process with its captured output.
pub struct NodeProcess {
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl NodeProcess {
    fn spawn(binary: &Path, args: &[String], env: &[(String, String)]) -> NodeProcess {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn switchyard node");
        let logs = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        capture(child.stderr.take().unwrap(), logs.clone());
        capture(child.stdout.take().unwrap(), stdout.clone());
        NodeProcess {
            child: Some(child),
            logs,
            stdout,
        }
    }

    /// Any `switchyard` command line, output captured, killed when dropped.
    pub fn start(binary: &Path, args: &[String], env: &[(String, String)]) -> NodeProcess {
        Self::spawn(binary, args, env)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (bounded) until `pred` holds for the logs.
    pub fn wait_for_logs(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if pred(&self.logs()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        pred(&self.logs())
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("exited with {status}: {}", self.logs())),
            _ => None,
        }
    }

    /// The process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the node stays connected but goes silent (no packets, no
    /// acknowledgements), like a frozen host. Undo with [`Self::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM: the node drains (readiness false, work in flight finishes).
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// SIGQUIT: an edge with `--upgrade-socket` hands its listening
    /// sockets to the new process waiting there, then drains.
    pub fn quit(&self) {
        self.signal("-QUIT");
    }

    /// SIGHUP: the node reloads its policy file and certificates.
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// Waits (bounded) for the process to exit; its status, or `None` if
    /// it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        let Some(pid) = self.pid() else { return };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// SIGKILL: the node vanishes without a goodbye, like a crashed host.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct EgressNode {
    pub process: NodeProcess,
    pub addr: SocketAddr,
}

impl EgressNode {
    /// Starts `switchyard egress` on `addr` (a free UDP port when `None`)
    /// and waits until it listens.
    pub fn start(
        binary: &Path,
        region: &str,
        addr: Option<SocketAddr>,
        policy: &Path,
        certs: &NodeCerts,
        env: &[(String, String)],
    ) -> EgressNode {
        let source = vec!["--config".to_string(), policy.display().to_string()];
        Self::start_with(binary, region, addr, &source, certs, env)
    }

    /// Like [`EgressNode::start`], with the policy source given as flags
    /// (`--config FILE` and/or `--control-plane URL ...`).
    pub fn start_with(
        binary: &Path,
        region: &str,
        addr: Option<SocketAddr>,
        source: &[String],
        certs: &NodeCerts,
        env: &[(String, String)],
    ) -> EgressNode {
        let addr = addr.unwrap_or_else(free_udp_port);
        let mut args: Vec<String> = vec![
            "egress".into(),
            "--region".into(),
            region.into(),
            "--listen".into(),
            addr.to_string(),
        ];
        args.extend(source.iter().cloned());
        args.extend([
            "--cert".into(),
            certs.cert.display().to_string(),
            "--key".into(),
            certs.key.display().to_string(),
            "--ca".into(),
            certs.ca.display().to_string(),
        ]);
        let mut process = NodeProcess::spawn(binary, &args, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !process.stdout().contains("listening on") {
            if let Some(why) = process.exited() {
                panic!("egress failed to start: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "egress did not start: {}",
                process.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EgressNode { process, addr }
    }
}

pub struct EdgeNode {
    pub process: NodeProcess,
    pub http_addr: SocketAddr,
    pub key: String,
}

impl EdgeNode {
    /// Starts `switchyard edge` with `egress` flags (`REGION=HOST:PORT`) and
    /// waits until its HTTP port accepts connections. `key` is [`TEST_KEY`],
    /// which works when the policy holds [`test_tenant_yaml`].
    pub fn start(
        binary: &Path,
        region: &str,
        policy: &Path,
        certs: &NodeCerts,
        egress: &[String],
        env: &[(String, String)],
    ) -> EdgeNode {
        let source = vec!["--config".to_string(), policy.display().to_string()];
        Self::start_with(binary, region, &source, certs, egress, env)
    }

    /// Like [`EdgeNode::start`], with the policy source given as flags.
    pub fn start_with(
        binary: &Path,
        region: &str,
        source: &[String],
        certs: &NodeCerts,
        egress: &[String],
        env: &[(String, String)],
    ) -> EdgeNode {
        let http_addr = free_tcp_port();
        let mut args: Vec<String> = vec![
            "edge".into(),
            "--region".into(),
            region.into(),
            "--listen".into(),
            http_addr.to_string(),
        ];
        args.extend(source.iter().cloned());
        args.extend([
            "--cert".into(),
            certs.cert.display().to_string(),
            "--key".into(),
            certs.key.display().to_string(),
            "--ca".into(),
            certs.ca.display().to_string(),
        ]);
        for e in egress {
            args.push("--egress".into());
            args.push(e.clone());
        }
        let mut process = NodeProcess::spawn(binary, &args, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(http_addr).is_err() {
            if let Some(why) = process.exited() {
                panic!("edge failed to start: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "edge did not start: {}",
                process.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        EdgeNode {
            process,
            http_addr,
            key: TEST_KEY.to_string(),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.http_addr)
    }
}

/// A `switchyard control-plane` process with TLS and node mTLS.
pub struct ControlPlaneNode {
    pub process: NodeProcess,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

impl ControlPlaneNode {
    /// Starts it on free ports with `store` (e.g. `sqlite:///tmp/x/cp.db`)
    /// and waits until it prints its addresses. `env` should hold the
    /// admin token variable named by `token_env`.
    pub fn start(
        binary: &Path,
        store: &str,
        certs: &NodeCerts,
        token_env: &str,
        grpc_addr: Option<SocketAddr>,
        env: &[(String, String)],
    ) -> ControlPlaneNode {
        Self::start_with_flags(binary, store, certs, token_env, grpc_addr, env, &[])
    }

    /// Like [`ControlPlaneNode::start`], with `extra` flags appended.
    pub fn start_with_flags(
        binary: &Path,
        store: &str,
        certs: &NodeCerts,
        token_env: &str,
        grpc_addr: Option<SocketAddr>,
        env: &[(String, String)],
        extra: &[&str],
    ) -> ControlPlaneNode {
        let grpc_addr = grpc_addr.unwrap_or_else(free_tcp_port);
        let http_addr = free_tcp_port();
        let mut args: Vec<String> = vec![
            "control-plane".into(),
            "--listen".into(),
            grpc_addr.to_string(),
            "--http-listen".into(),
            http_addr.to_string(),
            "--store".into(),
            store.into(),
            "--tls-cert".into(),
            certs.cert.display().to_string(),
            "--tls-key".into(),
            certs.key.display().to_string(),
            "--client-ca".into(),
            certs.ca.display().to_string(),
            "--admin-token-env".into(),
            token_env.into(),
            "--score-seconds".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut process = NodeProcess::spawn(binary, &args, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(process.stdout().contains("gRPC:") && TcpStream::connect(grpc_addr).is_ok()) {
            if let Some(why) = process.exited() {
                panic!("control plane failed to start: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "control plane did not start: {}",
                process.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ControlPlaneNode {
            process,
            grpc_addr,
            http_addr,
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr.port())
    }
}

/// `switchyard fleet --base-port 0` as a test sees it: the regional edge
/// URLs, the operator API and every admin listener it printed, and the
/// files it keeps (tenant keys, admin token, `fleet.pids`).
pub struct LocalFleet {
    pub process: NodeProcess,
    pub dir: PathBuf,
    /// `http://addr/v1` of the eu-west and us-east edges.
    pub eu: String,
    pub us: String,
    /// `http://addr` of the control plane's HTTP operator API.
    pub operator_api: String,
    /// Admin listeners: control plane, egress eu, egress us, edge eu, edge us.
    pub admin: Vec<SocketAddr>,
}

impl LocalFleet {
    /// Starts it and waits (bounded) until it says it is ready.
    pub fn start(binary: &Path) -> LocalFleet {
        let dir = crate::gateway::temp_dir("local-fleet");
        let args: Vec<String> = vec![
            "fleet".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--base-port".into(),
            "0".into(),
            "--shutdown-grace-seconds".into(),
            "10".into(),
        ];
        let process = NodeProcess::spawn(binary, &args, &[]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !process.stdout().contains("switchyard fleet ready") {
            assert!(
                Instant::now() < deadline,
                "the fleet did not come up: {}\n{}",
                process.stdout(),
                process.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = process.stdout();
        let line = |label: &str| -> String {
            out.lines()
                .find(|l| l.contains(label))
                .unwrap_or_else(|| panic!("no {label:?} in {out}"))
                .to_string()
        };
        let url_after = |label: &str| -> String {
            let l = line(label);
            let start = l.find("http://").unwrap();
            l[start..].split_whitespace().next().unwrap().to_string()
        };
        let admin = line("admin:")
            .split_whitespace()
            .filter_map(|w| w.trim_start_matches("http://").parse::<SocketAddr>().ok())
            .collect();
        LocalFleet {
            eu: url_after("eu-west edge:"),
            us: url_after("us-east edge:"),
            operator_api: url_after("control plane:")
                .trim_end_matches("/v1/policy")
                .to_string(),
            admin,
            process,
            dir,
        }
    }

    /// A file the fleet keeps (`tenant-key`, `tenant-key-eu`, `admin-token`).
    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A node's pid from `fleet.pids`.
    pub fn pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("fleet.pids"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{node} ")))
            .and_then(|p| p.trim().parse().ok())
    }

    /// A chat request for the `chat` route: (status, answering region, body).
    pub async fn chat(&self, base: &str, key: &str) -> (u16, String, String) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let region = r
            .headers()
            .get("x-switchyard-region")
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        (status, region, r.text().await.unwrap())
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        // SIGTERM first: the fleet stops the nodes it started.
        if self.process.wait_exit(Duration::ZERO).is_none() {
            self.process.terminate();
            let _ = self.process.wait_exit(Duration::from_secs(30));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
