//! The control plane's fleet-wide error rates feed ejection: another node
//! reports a target failing, the control plane folds it into scores pushed
//! to every node, and an edge that never tried the target opens its own
//! breaker for it — its requests go to the next target without calling the
//! failing one. A real control plane (gRPC, SQLite store), egress and edge
//! joined by the QUIC backhaul, in process, on loopback.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{http_client, install_crypto, post_chat, BackhaulCerts};
use switchyard_backhaul::node::{ControlLink, EgressNode};
use switchyard_control::client;
use switchyard_control::node_client::{NodeAgent, NodeConfig, Role};
use switchyard_control::pb;
use switchyard_control::server::{self, ServerConfig};
use switchyard_control::telemetry::RequestRecord;
use switchyard_edge::node::EdgeNode;
use switchyard_proto::{KeyHash, Secret, Snapshot};
use switchyard_testkit::gateway::{temp_dir, TEST_KEY};
use switchyard_testkit::metrics::scrape as metrics;
use switchyard_testkit::mock::MockUpstream;

const KEY_ENV: &str = "SY_RES_FLEET_PROVIDER_KEY";

fn link(url: &str, id: &str, dir: &Path) -> ControlLink {
    ControlLink {
        url: url.to_string(),
        node_id: Some(id.to_string()),
        state_dir: dir.join(id),
        tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_fleet_wide_is_ejected_on_an_edge_that_never_tried_it() {
    install_crypto();
    // Only this test in this binary reads it.
    std::env::set_var(KEY_ENV, "sk-fleet-test");
    let mock = MockUpstream::start().await;
    let dir = temp_dir("res-fleet");
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("sqlite://{}/cp.db", dir.display()),
    );
    config.admin_token = Some(Secret::new("admin-token-res-fleet"));
    config.poll_interval = Duration::from_millis(200);
    config.score_interval = Duration::from_millis(200);
    let cp = server::start(config).await.expect("control plane starts");
    let url = format!("http://{}", cp.grpc_addr);
    let provider = |models: &str| {
        format!(
            "    kind: openai\n    base_url: \"{}/v1\"\n    region: eu\n    models: [{models}]\n    key_pools: [ {{ keys: [ {{ env: {KEY_ENV} }} ] }} ]\n",
            mock.url()
        )
    };
    let policy = format!(
        "regions:\n  eu: {{ jurisdiction: eu }}\nproviders:\n  bad:\n{}  good:\n{}routes:\n  chat:\n    targets:\n      - {{ provider: bad, model: broken }}\n      - {{ provider: good, model: gpt-4o-mini }}\n  strict:\n    targets:\n      - {{ provider: good, model: fail-500 }}\n      - {{ provider: bad, model: broken }}\ntenants:\n  - id: test\n    key_sha256: \"{}\"\n",
        provider("broken"),
        provider("gpt-4o-mini, fail-500"),
        KeyHash::of(TEST_KEY).to_hex()
    );
    let mut op = client::connect(&url, Some(&Secret::new("admin-token-res-fleet")), None)
        .await
        .unwrap();
    let applied = op
        .apply_policy(pb::ApplyPolicyRequest {
            yaml: policy,
            dry_run: false,
            author: "test".into(),
            comment: String::new(),
        })
        .await
        .expect("policy applies")
        .into_inner();
    assert!(applied.version > 0, "{applied:?}");

    let certs = BackhaulCerts::generate(&dir, "eu");
    let egress = EgressNode::new("eu", certs.egress_tls())
        .control_plane(link(&url, "egress-eu", &dir))
        .start()
        .await
        .expect("egress starts");
    let edge = EdgeNode::backhaul("eu", certs.edge_tls())
        .control_plane(link(&url, "edge-eu", &dir))
        .egress("eu", egress.local_addr().to_string())
        .listen("127.0.0.1:0")
        .metrics("127.0.0.1:0")
        .start()
        .await
        .expect("edge starts");

    // Another edge of the fleet saw `bad` fail 30 times in 30.
    let other = NodeAgent::start(
        NodeConfig::new(url.clone(), "edge-other", Role::Edge, "eu"),
        Arc::new(ArcSwap::from_pointee(Snapshot::default())),
    )
    .unwrap();
    for _ in 0..30 {
        other.telemetry().record(RequestRecord {
            provider: "bad".into(),
            model: "broken".into(),
            region: "eu".into(),
            ttft: None,
            latency: Duration::from_millis(20),
            error_class: Some("upstream_5xx".into()),
            input_tokens: 0,
            output_tokens: 0,
            cost_usd: 0.0,
        });
    }
    let mut pushed = false;
    for _ in 0..200 {
        pushed = edge
            .snapshot()
            .scores()
            .targets
            .iter()
            .any(|(k, s)| k.provider == "bad" && s.requests >= 20 && s.error_rate >= 0.5);
        if pushed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pushed, "the fleet's scores reached the edge");

    let http = http_client(Duration::from_secs(30));
    let chat = |model: &'static str, stream: bool| {
        post_chat(&http, edge.local_addr().unwrap(), TEST_KEY, model, stream).send()
    };
    // Ejected, not merely demoted: when the route's other target fails,
    // the request does not fail over to the target the fleet saw failing
    // (a demoted target would have been tried next).
    let resp = chat("strict", false).await.unwrap();
    assert_eq!(resp.status(), 502, "{:?}", resp.text().await);
    assert_eq!(
        mock.count(Some("broken"), None),
        0,
        "the target the fleet saw failing was not called from here"
    );
    for i in 0..4 {
        // The route's first target is skipped (it is probed again only
        // once its ejection time is over).
        let resp = chat("chat", i % 2 == 1).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.text().await;
    }
    let page = metrics(&http, edge.metrics_addr().unwrap()).await;
    assert!(
        page.lines()
            .any(|l| l.starts_with("switchyard_fleet_ejections_total ") && !l.ends_with(" 0")),
        "{page}"
    );
    other.shutdown().await;
    edge.shutdown().await;
    egress.shutdown().await;
    cp.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
