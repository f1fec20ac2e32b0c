//! Optional parts of the test environment (the SDK venv, redis-server):
//! a test without them is skipped on a developer's machine and fails where
//! `SWITCHYARD_REQUIRE_SDK=1` says they must be there (`scripts/test.sh`,
//! so CI).

use std::path::PathBuf;

fn required() -> bool {
    std::env::var("SWITCHYARD_REQUIRE_SDK").as_deref() == Ok("1")
}

/// The Python of the venv `scripts/test.sh` creates (`SWITCHYARD_PYTHON`
/// when set); `None` when the caller should skip.
pub fn sdk_python() -> Option<PathBuf> {
    let python = std::env::var("SWITCHYARD_PYTHON")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            // This crate lives in tests/support; the venv is at the root.
            let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
            venv.exists().then_some(venv)
        });
    if python.is_none() {
        if required() {
            panic!("no Python venv with the SDKs: run scripts/test.sh");
        }
        eprintln!("SKIPPED: SDK tests need .venv (run scripts/test.sh)");
    }
    python
}

/// Whether `redis-server` is installed; `false` when the caller should skip.
pub fn redis() -> bool {
    if crate::redis::available() {
        return true;
    }
    if required() {
        panic!("redis-server is missing: run scripts/test.sh");
    }
    eprintln!("SKIPPED: redis-server is not installed (scripts/test.sh installs it)");
    false
}

/// Runs `tests/sdk/<script>` with pytest under `python` (off the async
/// runtime), with `env` set, and fails the test with pytest's output if
/// any case failed.
pub async fn pytest(python: PathBuf, script: &str, env: &[(&str, String)]) {
    // This crate lives in tests/support; the scripts are under the root.
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/sdk")
        .join(script);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(file)
            .envs(env)
            .output()
    })
    .await
    .expect("pytest runner")
    .expect("run pytest");
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
