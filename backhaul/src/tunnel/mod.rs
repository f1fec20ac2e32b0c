//! The QUIC backhaul between edge and egress nodes.
//!
//! - [`client::TunnelRouter`] is the edge's [`Upstream`](crate::Upstream):
//!   it keeps a warm, mutually authenticated quinn connection to every
//!   egress node of an [`client::EgressDirectory`] (keep-alive 1 s, idle
//!   timeout 3 s, redial with exponential backoff), and sends each request on
//!   a new bidirectional stream of the best connected node of the target's
//!   region (lowest RTT × in-flight requests).
//! - [`server::EgressServer`] is the egress end: it accepts streams, runs
//!   [`Egress::execute`](crate::Egress::execute) for each, and writes the
//!   answer back frame by frame with QUIC flow control as backpressure.
//! - [`frame`] is the framing (`proto/backhaul.proto`), [`tls`] the mTLS
//!   (with role and region scopes) and transport settings and a
//!   throwaway-CA generator for development, [`admit`] what the egress
//!   re-checks instead of trusting the edge.
//!
//! Failure rules: a request whose bytes the egress had not acknowledged when
//! the connection failed is retried on another egress of the region; one
//! the egress had is answered with a 502 (never sent twice: LLM calls are not
//! idempotent); a stream that breaks after its first byte ends with one error
//! frame in the caller's protocol. Every wait is bounded.
//!
//! `switchyard edge` and `switchyard egress` in the root crate run both ends;
//! `tests/e2e_backhaul.rs` drives them as real processes.

pub mod admit;
pub mod client;
pub mod frame;
pub mod server;
pub mod tls;

pub use client::{EgressDirectory, StaticDirectory, TunnelConfig, TunnelRouter};
pub use server::{ConnectionLimits, EgressServer};
pub use tls::{generate_node_cert, CertScope, NodeTls};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
}
