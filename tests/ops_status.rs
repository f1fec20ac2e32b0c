//! The control plane's status page, loaded the way an operator does: a
//! local fleet (`switchyard fleet`) serves some traffic, then headless
//! Chromium opens `/status` on the control plane's admin listener, lets its
//! script fetch `/status.json`, and the rendered DOM must name the nodes,
//! the regions, the targets, an egress node's key pool (one key refused by
//! the provider) and the tenants by spend, with a tenant name full of
//! markup shown as text, never run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_testkit::cluster::LocalFleet;
use switchyard_testkit::mock::MockUpstream;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_switchyard"))
}

/// Debian's `chromium`; scripts/setup.sh installs it for the ops tests.
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|p| [p.join("chromium"), p.join("chromium-browser")])
            .find(|p| p.exists())
    });
    if found.is_none() {
        if std::env::var("SWITCHYARD_REQUIRE_OPS").as_deref() == Ok("1") {
            panic!("chromium is not installed: run scripts/test.sh");
        }
        eprintln!(
            "SKIPPED: chromium is not installed (scripts/test.sh installs Debian's chromium)"
        );
    }
    found
}

/// A tenant id an operator could write into the policy: the page must show
/// it as text.
const MARKUP_TENANT: &str = "<img src=x onerror=\"document.title='pwned'\">mallory";
const MARKUP_KEY: &str = "sy-test-status-page-markup-tenant";
/// Provider keys of the mock's pool: the mock answers the first with 401.
const REFUSED_KEY: &str = "sk-status-page-refused-0123456789";
const GOOD_KEY: &str = "sk-status-page-good-0123456789";

fn hash_key(key: &str) -> String {
    let out = Command::new(binary())
        .args(["hash-key", key])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn chat(base: &str, key: &str) -> u16 {
    chat_model(base, key, "chat").await
}

async fn chat_model(base: &str, key: &str, model: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Runs Chromium on `url` until it prints the DOM (bounded).
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = switchyard_testkit::gateway::temp_dir("status-chromium");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            // Loopback only: none of Chromium's own calls home.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            // Virtual time runs the page's timers; fetches still take real
            // time, and the budget waits for them.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&profile);
    reader.join().unwrap()
}

fn ids(v: &Value, list: &str, field: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x[field].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_fleet_in_headless_chromium() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(chromium) = chromium() else { return };
    let fleet = LocalFleet::start(binary());
    let control_admin = fleet.admin[0];
    let global = fleet.secret("tenant-key");

    // A tenant named with markup, and a provider with a key pool of two
    // keys in eu-west (a mock upstream that refuses one of them), added
    // through the operator API.
    let mock = MockUpstream::start().await;
    mock.revoke_key(REFUSED_KEY);
    let policy = std::fs::read_to_string(fleet.dir.join("policy.yaml")).unwrap();
    let with_markup = policy
        .replace(
            "tenants:\n",
            &format!(
                "tenants:\n  - id: {}\n    key_sha256: \"{}\"\n    budget: {{ monthly_usd: 50 }}\n",
                serde_json::to_string(MARKUP_TENANT).unwrap(),
                hash_key(MARKUP_KEY)
            ),
        )
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  mock-eu:\n    kind: openai-compatible\n    base_url: \"{}/v1\"\n    region: eu-west\n    models: [m]\n    key_pools:\n      - name: main\n        keys:\n          - {{ id: team-a, value: \"{REFUSED_KEY}\" }}\n          - {{ id: team-b, value: \"{GOOD_KEY}\" }}\n",
                mock.url()
            ),
        );
    assert_ne!(with_markup, policy);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/policy?author=test", fleet.operator_api))
        .bearer_auth(fleet.secret("admin-token"))
        .body(with_markup)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while chat(&fleet.eu, MARKUP_KEY).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the new tenant never reached the edge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(chat(&fleet.eu, &global).await, 200);
        assert_eq!(chat(&fleet.us, &global).await, 200);
        assert_eq!(chat(&fleet.us, MARKUP_KEY).await, 200);
    }

    // The JSON the page renders from: every node acknowledged, telemetry
    // and the ledger arrived, and the egress reported its pool with the
    // refused key (the pool rotates keys: requests go on until one met it).
    let started = Instant::now();
    let status_url = format!("http://{control_admin}/status.json");
    let key_state = |v: &Value, id: &str| -> Option<String> {
        v["keys"].as_array()?.iter().find_map(|k| {
            (k["key_id"] == id && k["node"] == "egress-eu")
                .then(|| k["state"].as_str().unwrap_or_default().to_string())
        })
    };
    let status = loop {
        let v: Value = reqwest::get(&status_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if key_state(&v, "team-a").as_deref() != Some("refused") {
            assert_eq!(chat_model(&fleet.eu, &global, "mock-eu/m").await, 200);
        }
        let nodes = ids(&v, "nodes", "id");
        let ok = v["nodes"]
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n["state"] == "ok"));
        let tenants = ids(&v, "top_tenants", "tenant");
        let complete = nodes.len() == 4
            && ok
            && key_state(&v, "team-a").as_deref() == Some("refused")
            && key_state(&v, "team-b").as_deref() == Some("ok")
            && !ids(&v, "targets", "provider").is_empty()
            && tenants.contains(&"fleet-global".to_string())
            && tenants.contains(&MARKUP_TENANT.to_string());
        if complete {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the status never showed the whole fleet: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "status.json complete after {:?}: {} bytes",
        started.elapsed(),
        status.to_string().len()
    );
    let text = status.to_string();
    assert!(
        !text.contains(REFUSED_KEY) && !text.contains(GOOD_KEY),
        "a provider key on the status page: {text}"
    );
    let spend = status["top_tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "fleet-global")
        .unwrap()
        .clone();
    assert!(spend["cost_usd"].as_f64().unwrap() > 0.0, "{spend}");
    assert_eq!(spend["monthly_budget_usd"], 100.0, "{spend}");
    assert!(
        ids(&status, "regions", "name") == ["eu-west", "us-east"],
        "{status:#}"
    );

    // The page itself: self-contained, locked down.
    let page = reqwest::get(format!("http://{control_admin}/status"))
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );

    let t = Instant::now();
    let dom = dump_dom(&chromium, &format!("http://{control_admin}/status"));
    println!("chromium rendered the page in {:?}", t.elapsed());
    // What was rendered, without the page's own script text.
    let dom = match (dom.find("<script>"), dom.find("</script>")) {
        (Some(a), Some(b)) if a < b => format!("{}{}", &dom[..a], &dom[b..]),
        _ => dom,
    };
    for needle in [
        "edge-eu",
        "edge-us",
        "egress-eu",
        "egress-us",
        "eu-west",
        "us-east",
        "sim-eu",
        "fleet-global",
        "policy version",
        "team-a",
        "team-b",
        "refused",
    ] {
        assert!(dom.contains(needle), "{needle} is not on the page:\n{dom}");
    }
    assert!(
        dom.contains("<div id=\"error\" class=\"bad\"></div>"),
        "the page could not refresh:\n{dom}"
    );
    assert!(
        !dom.contains(">loading<"),
        "the page never rendered:\n{dom}"
    );
    // The markup tenant is text: escaped in the serialised DOM, no element.
    assert!(dom.contains("&lt;img src=x onerror="), "{dom}");
    assert!(dom.contains("mallory"), "{dom}");
    assert!(
        !dom.contains("<img"),
        "markup from a tenant id became an element:\n{dom}"
    );
    assert!(dom.contains("<title>Switchyard status</title>"), "{dom}");
    assert!(
        !dom.contains("sk-status-page"),
        "a provider key on the page"
    );
    println!(
        "mock upstream: {} requests with the refused key, {} with the good one",
        mock.count(None, Some(REFUSED_KEY)),
        mock.count(None, Some(GOOD_KEY))
    );
}
