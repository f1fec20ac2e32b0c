//! `switchyard ctl vkeys` and `switchyard ctl usage` through the real
//! binary against an in-process control plane (SQLite, port 0).

use std::process::Command;
use std::time::Duration;

use switchyard_control::server::{self, ServerConfig};
use switchyard_proto::Secret;
use switchyard_testkit::gateway::temp_dir;

const ADMIN: &str = "admin-token-ctl";

fn ctl(server: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("ctl")
        .args(["--server", server])
        .args(args)
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN)
        .output()
        .expect("run switchyard ctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_creates_lists_and_revokes_virtual_keys_and_reports_usage() {
    let dir = temp_dir("ctl");
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("sqlite://{}/cp.db", dir.display()),
    );
    config.admin_token = Some(Secret::new(ADMIN));
    config.poll_interval = Duration::from_millis(200);
    let cp = server::start(config).await.expect("control plane starts");
    let server = format!("http://{}", cp.grpc_addr);
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "providers:\n  sim:\n    kind: simulated\n    models: [small]\ntenants:\n  - id: acme\n",
    )
    .unwrap();
    let s = server.clone();
    let p = policy.display().to_string();
    let run = move |args: Vec<String>| {
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ctl(&s, &args)
        })
    };
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (ok, _, err) = run(v(&["apply", "-f", &p])).await.unwrap();
    assert!(ok, "{err}");

    let (ok, key, err) = run(v(&[
        "vkeys",
        "create",
        "--tenant",
        "acme",
        "--id",
        "deploy-bot",
        "--expires",
        "30d",
        "--models",
        "sim/small",
        "--rpm",
        "60",
    ]))
    .await
    .unwrap();
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("sy-") && key.len() > 40, "{key}");
    assert!(err.contains("shown once"), "{err}");

    let (ok, list, err) = run(v(&["vkeys", "list", "--tenant", "acme"]))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        list.contains("deploy-bot") && list.contains("active"),
        "{list}"
    );
    assert!(
        list.contains("rpm=60") && list.contains("models=sim/small"),
        "{list}"
    );
    assert!(!list.contains(&key), "the key is never listed");
    // Only the hash is stored.
    let db = std::fs::read(dir.join("cp.db")).unwrap_or_default();
    let wal = std::fs::read(dir.join("cp.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key is in the store"
        );
    }

    let (ok, _, err) = run(v(&["vkeys", "create", "--tenant", "nobody"]))
        .await
        .unwrap();
    assert!(!ok && err.contains("nobody"), "{err}");

    let (ok, out, err) = run(v(&["vkeys", "revoke", "deploy-bot"])).await.unwrap();
    assert!(ok && out.contains("revoked"), "{err}");
    let (_, list, _) = run(v(&["vkeys", "list"])).await.unwrap();
    assert!(list.contains("revoked"), "{list}");
    let (ok, _, _) = run(v(&["vkeys", "revoke", "deploy-bot"])).await.unwrap();
    assert!(!ok, "a key is revoked once");

    let (ok, csv, err) = run(v(&[
        "usage",
        "--tenant",
        "acme",
        "--since",
        "7d",
        "--group-by",
        "day",
        "--csv",
    ]))
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(csv.starts_with("day,requests,errors,"), "{csv}");
    let (ok, _, err) = run(v(&["usage", "--group-by", "colour"])).await.unwrap();
    assert!(!ok && err.contains("group_by"), "{err}");
    cp.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
