//! Test harness for Switchyard's end-to-end tests and benchmarks.
//!
//! - [`mock::MockUpstream`]: an HTTP server on `127.0.0.1:0` that speaks the
//!   providers' real wire formats by replaying recorded payloads from
//!   `tests/fixtures/`, with faults (errors, hangs, stalls, cuts) chosen by the
//!   model name, and a log of every request it saw (and every cancellation).
//! - [`gateway::Gateway`]: starts the real `switchyard` binary on free
//!   loopback ports with a given policy and environment, captures its logs,
//!   and kills it when dropped.
//! - [`cluster`]: the same for `switchyard edge` / `switchyard egress`
//!   processes joined by the QUIC backhaul, with certificates from
//!   `switchyard gen-certs`.
//! - [`tls_front`]: TLS in front of the mock, for provider calls over HTTPS.
//! - [`redis::RedisServer`]: a throwaway `redis-server` on a free loopback
//!   port (shared limit counters), stopped when dropped.

pub mod cluster;
pub mod fixtures;
pub mod gateway;
pub mod metrics;
pub mod mock;
pub mod redis;
pub mod require;
pub mod sse;
pub mod tls_front;
