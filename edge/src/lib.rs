//! Switchyard edge node: the Pingora service clients talk to.
//!
//! [`EdgeApp`] is a Pingora `HttpServerApp`: it owns each client session,
//! authenticates the virtual key, validates the request in the caller's
//! protocol, resolves the model to a target, hands the request to an
//! [`Upstream`] (the in-process egress in single-node mode) and writes the
//! answer back, streaming SSE frames as they arrive. Errors are always in the
//! caller's protocol shape. One access-log line is written per request.
//!
//! Build a server with [`service::edge_service`]; `switchyard dev` in the
//! root crate is the runnable example.

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
