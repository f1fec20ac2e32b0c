//! Graceful upgrade of an edge under load: a new `switchyard edge
//! --upgrade` takes the listening sockets of the running one (SIGQUIT), the
//! old one drains, and no client request fails or is refused meanwhile.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_testkit::cluster::{
    free_tcp_port, gen_scoped_certs, test_tenant_yaml, EdgeNode, EgressNode, NodeProcess,
};
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn access_lines(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("switchyard::access") && l.contains("/chat/completions"))
        .count()
}

/// Waits (bounded) until `pred` holds.
async fn wait_until(what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Several threads: the mock provider and the clients must keep running
// while the test blocks waiting for a process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_request_fails_during_an_edge_upgrade_under_load() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::start().await;
    let dir = temp_dir("ops-upgrade");
    let edge_certs = gen_scoped_certs(binary(), &dir.join("pki"), "edge", "edge", "eu");
    let egress_certs = gen_scoped_certs(binary(), &dir.join("pki"), "egress", "egress", "eu");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "regions:\n  eu: {{ jurisdiction: eu }}\nproviders:\n  openai:\n    kind: openai\n    base_url: \"{}/v1\"\n    region: eu\n{}",
            mock.url(),
            test_tenant_yaml(binary())
        ),
    )
    .unwrap();
    let egress = EgressNode::start(
        binary(),
        "eu",
        None,
        &policy,
        &egress_certs,
        &[("OPENAI_API_KEY".into(), "sk-test-UPGRADE".into())],
    );
    let socket = dir.join("upgrade.sock");
    let admin = free_tcp_port();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut flags: Vec<String> = vec![
            "--config".into(),
            policy.display().to_string(),
            "--upgrade-socket".into(),
            socket.display().to_string(),
            "--admin-listen".into(),
            admin.to_string(),
        ];
        flags.extend(extra.iter().map(|s| s.to_string()));
        flags
    };
    let egress_flag = format!("eu={}", egress.addr);
    let mut old = EdgeNode::start_with(
        binary(),
        "eu",
        &common(&[]),
        &edge_certs,
        std::slice::from_ref(&egress_flag),
        &[],
    );

    // Load: four clients, a new connection per request, until told to stop.
    let url = format!("{}/chat/completions", old.base_url());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (url, stop, ok, failures) = (url.clone(), stop.clone(), ok.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .bearer_auth(TEST_KEY)
                    .json(&json!({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let line = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                        failures.lock().unwrap().push(line);
                    }
                    Err(e) => failures.lock().unwrap().push(format!("{e:?}")),
                }
            }
        }));
    }
    wait_until("load on the old edge", || ok.load(Ordering::Relaxed) >= 40).await;

    // The new binary starts, waits on the socket; the old one hands over.
    let mut args: Vec<String> = vec![
        "edge".into(),
        "--region".into(),
        "eu".into(),
        "--listen".into(),
        old.http_addr.to_string(),
        "--egress".into(),
        egress_flag,
        "--cert".into(),
        edge_certs.cert.display().to_string(),
        "--key".into(),
        edge_certs.key.display().to_string(),
        "--ca".into(),
        edge_certs.ca.display().to_string(),
    ];
    args.extend(common(&["--upgrade"]));
    let new = NodeProcess::start(binary(), &args, &[]);
    old.process.quit();
    let status = old
        .process
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| {
            let tail = |l: String| l.lines().rev().filter(|l| !l.contains("switchyard::access")).take(15).collect::<Vec<_>>().join("\n");
            let logs = old.process.logs();
            let after: Vec<&str> = logs.lines().skip_while(|l| !l.contains("draining")).filter(|l| l.contains("access")).collect();
            panic!("the old edge did not exit: ok={} failures={:?} access-after-drain={after:?}\n{}\n--- new: {}", ok.load(Ordering::Relaxed), failures.lock().unwrap(), tail(old.process.logs()), tail(new.logs()))
        });
    assert!(status.success(), "{status}: {}", old.process.logs());
    assert!(
        new.wait_for_logs(Duration::from_secs(30), |l| l
            .contains("took over the listening sockets of the running edge")),
        "{}",
        new.logs()
    );
    let handed_over_at = ok.load(Ordering::Relaxed);
    wait_until("load on the new edge", || {
        ok.load(Ordering::Relaxed) >= handed_over_at + 40
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    // Every success was logged by one of the two processes (the new one's
    // last lines may still be on their way through the pipe).
    let total = ok.load(Ordering::Relaxed);
    let served = || access_lines(&old.process.logs()) + access_lines(&new.logs());
    wait_until("every request in an access log", || served() >= total).await;
    let (by_old, by_new) = (access_lines(&old.process.logs()), access_lines(&new.logs()));
    assert!(by_old > 0 && by_new > 0, "old {by_old}, new {by_new}");
    assert_eq!(by_old + by_new, total);
    println!(
        "upgrade under load: {} requests, {by_old} by the old edge, {by_new} by the new one, 0 failed",
        by_old + by_new
    );
    let old_logs = old.process.logs();
    assert!(
        old_logs.contains("listening sockets handed to the new process"),
        "{old_logs}"
    );
    assert!(
        old_logs.contains("drained: every request finished"),
        "{old_logs}"
    );
    drop((new, egress));
    let _ = std::fs::remove_dir_all(&dir);
}
