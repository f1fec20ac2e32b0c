//! Starts the real `switchyard` binary for a test and stops it afterwards.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Variables that would make a test depend on the developer's machine.
pub(crate) const SCRUBBED_ENV: &[&str] = &[
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "GEMINI_API_KEY",
    "GEMINI_BASE_URL",
    "SWITCHYARD_DEV_KEY",
    "SWITCHYARD_LOG",
    "SWITCHYARD_LOG_FORMAT",
];

pub const TEST_KEY: &str = "sy-test-key-0123456789";

pub struct GatewayOptions {
    pub binary: PathBuf,
    pub env: Vec<(String, String)>,
    /// Policy YAML; `None` starts with an empty policy (env providers + simulated).
    pub policy: Option<String>,
    /// Extra `switchyard dev` flags (e.g. `--header-timeout-ms 1000`).
    pub args: Vec<String>,
}

impl GatewayOptions {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        GatewayOptions {
            binary: binary.into(),
            env: Vec::new(),
            policy: None,
            args: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_string(), v.into()));
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn policy(mut self, yaml: impl Into<String>) -> Self {
        self.policy = Some(yaml.into());
        self
    }
}

pub struct Gateway {
    child: Child,
    pub http_addr: SocketAddr,
    pub https_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub key: String,
    pub state_dir: PathBuf,
    logs: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    l.local_addr().expect("probe addr")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "switchyard-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Copies a child's output into `into` on a thread of its own.
pub(crate) fn capture(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
}

impl Gateway {
    pub fn start(opts: GatewayOptions) -> Gateway {
        let state_dir = temp_dir("gw");
        let policy_path = state_dir.join("policy.yaml");
        std::fs::write(&policy_path, opts.policy.as_deref().unwrap_or("")).expect("write policy");
        // Ports picked by probing can be taken by someone else before the
        // gateway binds them; try a few times.
        let mut last_err = String::new();
        for _ in 0..3 {
            let http_addr = free_port();
            let https_addr = free_port();
            let metrics_addr = free_port();
            let mut cmd = Command::new(&opts.binary);
            cmd.arg("dev")
                .arg("--listen")
                .arg(http_addr.to_string())
                .arg("--tls-listen")
                .arg(https_addr.to_string())
                .arg("--metrics-listen")
                .arg(metrics_addr.to_string())
                .arg("--config")
                .arg(&policy_path)
                .arg("--state-dir")
                .arg(&state_dir)
                .args(&opts.args)
                .env("SWITCHYARD_DEV_KEY", TEST_KEY)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for k in SCRUBBED_ENV {
                cmd.env_remove(k);
            }
            cmd.env("SWITCHYARD_DEV_KEY", TEST_KEY);
            for (k, v) in &opts.env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().expect("spawn switchyard");
            let logs = Arc::new(Mutex::new(String::new()));
            let stdout = Arc::new(Mutex::new(String::new()));
            capture(child.stderr.take().unwrap(), logs.clone());
            capture(child.stdout.take().unwrap(), stdout.clone());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("exited with {status}: {}", logs.lock().unwrap());
                    break;
                }
                if TcpStream::connect(http_addr).is_ok() && TcpStream::connect(https_addr).is_ok() {
                    return Gateway {
                        child,
                        http_addr,
                        https_addr,
                        metrics_addr,
                        key: TEST_KEY.to_string(),
                        state_dir,
                        logs,
                        stdout,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("gateway did not start listening: {}", logs.lock().unwrap());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("gateway failed to start: {last_err}");
    }

    /// `http://127.0.0.1:port/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.http_addr)
    }

    pub fn tls_base_url(&self) -> String {
        format!("https://{}/v1", self.https_addr)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.state_dir.join("tls/cert.pem")
    }

    /// Everything the gateway logged so far (stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The start-up banner and anything else on stdout.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (bounded) until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The policy file the gateway was started with (and watches).
    pub fn policy_path(&self) -> PathBuf {
        self.state_dir.join("policy.yaml")
    }

    /// SIGHUP: reload the policy file and certificates now.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP failed");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
