//! The fault layer in front of a real provider (issue 8, point 7): faults
//! declared in the policy (`providers.P.faults`) or asked for by header in
//! `switchyard dev`, injected before the provider is called, so failover and
//! key handling can be exercised against any provider. Counted at the mock.

use serde_json::{json, Value};
use switchyard_testkit::gateway::{Gateway, GatewayOptions, TEST_KEY};
use switchyard_testkit::mock::MockUpstream;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn policy(mock: &str) -> String {
    format!(
        r#"providers:
  flaky:
    kind: openai-compatible
    base_url: {mock}/v1
    api_key_env: FAULTS_TEST_KEY
    faults:
      fault: {{ status: 503 }}
  cut:
    kind: openai-compatible
    base_url: {mock}/v1
    api_key_env: FAULTS_TEST_KEY
    faults:
      fault: {{ drop_after: 2 }}
  steady:
    kind: openai-compatible
    base_url: {mock}/v1
    api_key_env: FAULTS_TEST_KEY
routes:
  chat:
    targets:
      - {{ provider: flaky, model: gpt-4o-mini }}
      - {{ provider: steady, model: gpt-4o-mini }}
"#
    )
}

async fn chat(gw: &Gateway, model: &str, stream: bool, simulate: Option<&str>) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut req = reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.base_url()))
        .bearer_auth(TEST_KEY)
        .json(&json!({
            "model": model,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }));
    if let Some(s) = simulate {
        req = req.header("x-switchyard-simulate", s);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_from_the_policy_and_the_dev_header_reach_a_real_provider() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(
        GatewayOptions::new(BIN)
            .env("FAULTS_TEST_KEY", "sk-faults-test")
            .policy(policy(&mock.url())),
    );

    // A status fault answers without calling the provider.
    let (status, body) = chat(&gw, "flaky/gpt-4o-mini", false, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("injected fault"), "{body}");
    assert_eq!(mock.requests().len(), 0, "a faulted target is never called");

    // The route fails over past the faulted target: one upstream call.
    let (status, body) = chat(&gw, "chat", false, None).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert!(answer["choices"][0]["message"]["content"].is_string());
    assert_eq!(mock.requests().len(), 1);

    // A cut stream: the provider is called, two chunks pass, then the
    // stream fails as a dropped connection would.
    let (status, body) = chat(&gw, "cut/gpt-4o-mini", true, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("was cut (injected fault)"), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert_eq!(mock.requests().len(), 2);

    // In `switchyard dev` the header reaches the fault layer of any provider.
    let (status, body) = chat(
        &gw,
        "steady/gpt-4o-mini",
        false,
        Some("status=429,retry_after=1"),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        mock.requests().len(),
        2,
        "the header's fault is injected before the call"
    );
    let (status, body) = chat(&gw, "steady/gpt-4o-mini", false, Some("ttft_ms=inf")).await;
    assert_eq!(status, 400, "{body}");
    assert!(!gw.logs().contains("panicked"));
    assert!(!gw.logs().contains("sk-faults-test"));
}

#[tokio::test(flavor = "multi_thread")]
async fn fields_that_shape_simulated_answers_are_refused_on_real_providers() {
    let out = std::process::Command::new(BIN)
        .args(["check-policy", "-f"])
        .arg({
            let dir = switchyard_testkit::gateway::temp_dir("faults-policy");
            let path = dir.join("p.yaml");
            std::fs::write(
                &path,
                "providers:\n  p:\n    kind: openai-compatible\n    base_url: http://127.0.0.1:1/v1\n    faults:\n      tokens_per_second: 5\n  s:\n    kind: simulated\n    faults:\n      ttft_ms: 5\n",
            )
            .unwrap();
            path
        })
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        errors.contains("providers.p.faults.tokens_per_second"),
        "{errors}"
    );
    assert!(errors.contains("providers.s.faults"), "{errors}");
}
