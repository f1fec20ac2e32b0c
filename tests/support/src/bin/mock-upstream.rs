//! Runs the fixture-replaying mock provider on a fixed address, for
//! benchmarks and manual experiments: `mock-upstream 127.0.0.1:9000`.

use std::time::Duration;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let mock = switchyard_testkit::mock::MockUpstream::start_on(&addr).await;
    // A long benchmark would otherwise keep every request in memory.
    mock.set_recording(std::env::var("MOCK_RECORD").as_deref() == Ok("1"));
    if let Some(gap) = std::env::var("MOCK_EVENT_GAP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        mock.set_event_gap(Duration::from_millis(gap));
    }
    println!("mock upstream listening on {}", mock.url());
    let _ = tokio::signal::ctrl_c().await;
}
