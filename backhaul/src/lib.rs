//! Switchyard egress node: everything between a planned request and the
//! provider.
//!
//! [`Egress::execute`] takes an [`EgressRequest`] (target already chosen by
//! the edge), picks a key from the provider's pool, calls the provider
//! through its adapter over one shared pooled HTTP client (rustls, HTTP/2
//! where offered, hickory DNS, `TCP_NODELAY`), and returns the response as a
//! complete body or a stream of ready-to-write SSE frames with accounting.
//!
//! In single-node mode (`switchyard dev`) the edge calls `execute` directly.
//! Between processes the same request crosses the QUIC backhaul in
//! [`tunnel`]: the edge's [`tunnel::TunnelRouter`] is an [`Upstream`] that
//! sends it over a warm, mutually authenticated quinn connection to a
//! [`tunnel::EgressServer`] in the target's region, which runs `execute` and
//! streams the answer back (`switchyard edge` / `switchyard egress`).
//! [`node::EgressNode`] assembles a whole egress node (what `switchyard
//! egress` runs) and returns a handle with its address and `shutdown()`.
//!
//! # Why a framed protocol, not Pingora's custom L4 connector
//!
//! Two ways to carry a request over a QUIC stream were evaluated:
//!
//! 1. **Pingora's custom L4 connector** (`PeerOptions.custom_l4` returning a
//!    virtual socket over a quinn stream): the edge would proxy plain HTTP/1.1
//!    to the egress through `ProxyHttp`, metadata in headers. A prototype of
//!    it worked here.
//! 2. **An explicit framed protocol** on one bidirectional stream per request
//!    (`proto/backhaul.proto`): a length-prefixed protobuf request header,
//!    the body, then response header, data frames and a trailer.
//!
//! We chose (2), because:
//!
//! - The edge is not a byte proxy. It must parse and validate the whole body
//!   anyway (model → route plan, residency, limits), so it holds a typed
//!   [`EgressRequest`] — sending that as protobuf plus the body is simpler
//!   and stricter than re-rendering it as an HTTP request for Pingora to
//!   re-parse on both sides, and the edge keeps its own `HttpServerApp`.
//! - Accounting needs data that only exists at the end of a stream (usage,
//!   stream failure, chosen target). The trailer frame carries it typed; over
//!   HTTP/1.1 through Pingora it would need chunked trailers, which Pingora's
//!   upstream path does not surface, or a sentinel inside the body.
//! - Pingora 0.9.1 does not reuse pooled virtual-socket sessions (upstream
//!   issue cloudflare/pingora#883), so (1) gives no connection reuse benefit
//!   over one stream per request — which (2) does by design, at no round trip.
//! - Failure semantics are explicit: the edge knows whether the egress
//!   acknowledged the request (retry on another egress is safe before, never
//!   after), and cancellation is a QUIC `STOP_SENDING`/reset that the egress
//!   turns into dropping the provider call.
//!
//! The cost is one small protocol of our own (versioned, with round-trip
//! unit tests in `tunnel::frame`) instead of HTTP on both ends.

pub mod discovery;
pub mod dns;
pub mod egress;
mod idle;
pub mod metrics;
pub mod node;
pub mod otlp;
pub mod providers;
pub mod request;
pub mod stream;
pub mod trace;
pub mod tunnel;
pub mod upstream;

pub use dns::DnsError;
pub use egress::{Egress, SharedSnapshot};
pub use request::{
    check_model_name, check_path_model, EgressRequest, EgressResponse, Operation, Protocol,
    RawPath, RawRequest, RequestObserver, RequestReport, RequestStats, ResponseBody,
};
pub use tunnel::client::{AddressError, DialError};
pub use upstream::ClientError;

/// Where the edge sends a planned request: the in-process [`Egress`] in
/// single-node mode, a QUIC tunnel to a regional egress node otherwise.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    async fn execute(
        &self,
        req: EgressRequest,
    ) -> Result<EgressResponse, switchyard_llm::GatewayError>;

    /// `(provider, model)` pairs from the providers' own model lists, where
    /// this upstream holds the keys to ask; none by default (an edge that
    /// reaches its providers over the backhaul holds no keys).
    async fn discovered_models(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

#[async_trait::async_trait]
impl Upstream for Egress {
    async fn execute(
        &self,
        req: EgressRequest,
    ) -> Result<EgressResponse, switchyard_llm::GatewayError> {
        Egress::execute(self, req).await
    }

    async fn discovered_models(&self) -> Vec<(String, String)> {
        self.discovery().models().await
    }
}
