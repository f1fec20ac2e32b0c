//! Runs the official Python SDKs (tests/sdk/*.py, pytest) against the real
//! gateway binary in front of mock providers that replay recorded payloads.
//!
//! The venv comes from `scripts/test.sh` (the README's test command). When it
//! is missing the test fails if `SWITCHYARD_REQUIRE_SDK=1` (as in CI) and is
//! skipped loudly otherwise, so a bare `cargo test` still works.

use std::path::PathBuf;
use std::process::Command;

use switchyard_testkit::gateway::{Gateway, GatewayOptions};
use switchyard_testkit::mock::MockUpstream;

async fn run_pytest(file: &str) {
    let Some(python) = switchyard_testkit::require::sdk_python() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let gw = Gateway::start(
        GatewayOptions::new(bin)
            .env("OPENAI_API_KEY", "sk-sdk-test-openai")
            .env("OPENAI_BASE_URL", format!("{}/v1", mock.url()))
            .env("ANTHROPIC_API_KEY", "sk-ant-sdk-test")
            .env("ANTHROPIC_BASE_URL", mock.url())
            .env("GEMINI_API_KEY", "gm-sdk-test")
            .env("GEMINI_BASE_URL", mock.url()),
    );
    let sim = Gateway::start(GatewayOptions::new(bin));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let file = root.join("tests/sdk").join(file);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(file)
            .env("SWITCHYARD_BASE_URL", format!("http://{}", gw.http_addr))
            .env(
                "SWITCHYARD_SIM_BASE_URL",
                format!("http://{}", sim.http_addr),
            )
            .env("SWITCHYARD_KEY", &gw.key)
            .output()
            .map(|o| (o, gw, sim))
    })
    .await
    .unwrap()
    .expect("run pytest");
    let (out, gw, _sim) = out;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pytest failed:\n{stdout}\n{stderr}\n--- gateway log ---\n{}",
        gw.logs()
    );
    eprintln!("{}", stdout.lines().last().unwrap_or(""));
    for secret in ["sk-sdk-test-openai", "sk-ant-sdk-test", "gm-sdk-test"] {
        assert!(!gw.logs().contains(secret), "provider key in gateway logs");
    }
    drop(mock);
}

#[tokio::test]
async fn openai_sdk() {
    run_pytest("test_openai_sdk.py").await;
}

#[tokio::test]
async fn translation_through_sdks() {
    run_pytest("test_translation_sdk.py").await;
}

#[tokio::test]
async fn responses_completions_and_gemini_sdks() {
    run_pytest("test_responses_gemini_sdk.py").await;
}
