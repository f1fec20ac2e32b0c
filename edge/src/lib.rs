//! Switchyard edge node: the Pingora service clients talk to.
//!
//! [`EdgeApp`] is a Pingora `HttpServerApp`: it owns each client session and
//! runs every request through explicit phases over one [`RequestCtx`], as
//! pingora's `ProxyHttp` does: `admit` (route, authenticate, tenant, read
//! and validate the body in the caller's protocol), `plan` (the ordered
//! targets), `dispatch` (the attempts, handed to an [`Upstream`]: the
//! in-process egress in single-node mode), `respond` (commit on the first
//! event, then stream SSE frames as they arrive) and `record` (one usage
//! record: access log, metrics, telemetry). Errors are always in the
//! caller's protocol shape. Later features plug into a phase through the
//! small traits of [`hooks`], registered with `EdgeApp::with_*` builders.
//!
//! Run a whole edge node with [`node::EdgeNode`] (single-node mode, or
//! over the QUIC backhaul): it returns a handle with the bound addresses and
//! `shutdown()`; `tests/inprocess.rs` and `switchyard dev` / `switchyard
//! edge` in the root crate are the runnable examples. The Pingora service
//! alone comes from [`service::edge_service`].

pub mod access_log;
pub mod app;
pub mod auth;
pub mod cache;
mod client_socket;
pub mod ctx;
pub mod guard;
pub mod hooks;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod otlp;
pub(crate) mod phases;
pub mod respond;
pub mod service;

pub use app::EdgeApp;
pub use ctx::{Attempt, RequestCtx};
pub use guard::EdgeLimits;
pub use hooks::{AdmitHook, PlanHook, RecordHook, ResponseObserver, UsageRecord};
pub use phases::plan::{route_plan, Plan};
pub use switchyard_backhaul::Upstream;
