//! Dashboards and alerts that match what the nodes export: the Prometheus
//! rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`, each alert firing on the series it is meant for), and every
//! metric the rules and the Grafana dashboard name is on a real `/metrics`
//! page of a running fleet (control plane, egress and edge of two regions).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_testkit::cluster::LocalFleet;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.exists())
    });
    if found.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_OPS").as_deref() == Ok("1") {
            panic!("promtool is not installed: run scripts/test.sh");
        }
        eprintln!(
            "SKIPPED: promtool is not installed (scripts/test.sh installs Debian's prometheus)"
        );
    }
    found
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let dir = root().join("deploy/monitoring");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `switchyard_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchyard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_exprs(i, out)),
        _ => {}
    }
}

async fn post(base: &str, key: &str, body: Value, simulate: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&body);
    if let Some(s) = simulate {
        req = req.header("x-switchyard-simulate", s);
    }
    req.send().await.unwrap()
}

// Several threads: the fleet's start-up wait blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_metrics_the_nodes_export() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fleet = LocalFleet::start(binary());
    let key = fleet.secret("tenant-key");
    assert_eq!(fleet.admin.len(), 5, "{:?}", fleet.admin);

    // Traffic that makes every edge series exist: answers, a stream, a
    // stream the provider cuts, a client that goes away mid-stream.
    let chat = |stream: bool| json!({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    for base in [&fleet.eu, &fleet.us] {
        let r = post(base, &key, chat(false), None).await;
        assert_eq!(r.status(), 200);
        let r = post(base, &key, chat(true), None).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        let r = post(base, &key, chat(true), Some("drop_after=2")).await;
        let _ = r.bytes().await;
        let r = post(base, &key, chat(true), Some("tps=5,tokens=200")).await;
        let mut body = r.bytes_stream();
        let _ = tokio::time::timeout(Duration::from_secs(10), body.next()).await;
        drop(body);
    }
    // The edges record the disconnect when they notice it.
    let mut exported = BTreeSet::new();
    for _ in 0..300 {
        exported.clear();
        for admin in &fleet.admin {
            let page = reqwest::get(format!("http://{admin}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            exported.extend(
                page.lines()
                    .filter(|l| !l.starts_with('#'))
                    .flat_map(metric_names),
            );
        }
        if exported.contains("switchyard_client_disconnects_total") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let alerts = std::fs::read_to_string(root().join("deploy/monitoring/alerts.yaml")).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut named = metric_names(&alerts);
    for e in &exprs {
        named.extend(metric_names(e));
    }
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named in the rules or the dashboard, exported by no node: {missing:?}\nexported: {exported:?}"
    );
    // Each role's page has its own series.
    for needle in [
        "switchyard_control_nodes",
        "switchyard_egress_connections",
        "switchyard_backhaul_connected",
        "switchyard_requests_total",
    ] {
        assert!(exported.contains(needle), "{needle} is not exported");
    }
}
