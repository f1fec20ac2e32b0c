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
//! Failure rules, in the terms of [`switchyard_llm::Retry`]: a request the
//! egress has not acknowledged (no ACCEPTED frame, no QUIC acknowledgement
//! of its bytes) when the connection fails or stays silent past
//! [`client::ack_deadline`] is sent to another egress of the region, and the
//! silent connection is marked suspect so new requests avoid it until it
//! answers again (a stopped egress is left in a few hundred milliseconds, not
//! at the 3 s idle timeout); one the egress had fails with
//! `Retry::Never` (never sent twice, not even to another target: LLM calls
//! are not idempotent); a stream that breaks after its first byte ends with
//! one error frame in the caller's protocol. One deadline covers the
//! request: each attempt tells the egress what is left of it. Every wait is
//! bounded.
//!
//! `switchyard edge` and `switchyard egress` in the root crate run both ends;
//! `tests/e2e_backhaul.rs` drives them as real processes.

pub mod admit;
pub mod client;
pub mod frame;
pub mod server;
pub mod tls;

pub use client::{
    AddressError, DialError, EgressDirectory, StaticDirectory, TunnelConfig, TunnelRouter,
};
pub use server::{ConnectionLimits, EgressServer};
pub use tls::{generate_node_cert, CertScope, NodeTls};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
}
