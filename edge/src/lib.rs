//! Switchyard edge node: the Pingora service clients talk to.
//!
//! [`EdgeApp`] is a Pingora `HttpServerApp`: it owns each client session,
//! authenticates the virtual key, validates the request in the caller's
//! protocol, resolves the model to a target, hands the request to an
//! [`Upstream`] (the in-process egress in single-node mode) and writes the
//! answer back, streaming SSE frames as they arrive. Errors are always in the
//! caller's protocol shape. One access-log line is written per request.
//!
//! Run a whole edge node with [`node::EdgeNode`] (single-node mode, or
//! over the QUIC backhaul): it returns a handle with the bound addresses and
//! `shutdown()`; `tests/inprocess.rs` and `switchyard dev` / `switchyard
//! edge` in the root crate are the runnable examples. The Pingora service
//! alone comes from [`service::edge_service`].

pub mod app;
pub mod auth;
pub mod guard;
pub mod metrics;
pub mod node;
pub mod respond;
pub mod service;

pub use app::EdgeApp;
pub use guard::EdgeLimits;
pub use switchyard_backhaul::Upstream;
