//! Switchyard egress node: everything between a planned request and the
//! provider.
//!
//! [`Egress::execute`] takes an [`EgressRequest`] (target already chosen by
//! the edge), picks a key from the provider's pool, calls the provider
//! through its adapter over one shared pooled HTTP client (rustls, HTTP/2
//! where offered, hickory DNS, `TCP_NODELAY`), and returns the response as a
//! complete body or a stream of ready-to-write SSE frames with accounting.
//!
//! In single-node mode (`switchyard dev`) the edge calls `execute` directly;
//! the QUIC tunnel that carries the same request between processes lives in
//! this crate too once the backhaul lands.

pub mod dns;
pub mod egress;
pub mod providers;
pub mod request;
pub mod stream;
pub mod upstream;

pub use egress::{Egress, SharedSnapshot};
pub use request::{
    EgressRequest, EgressResponse, Operation, Protocol, RawRequest, RequestStats, ResponseBody,
};

/// Where the edge sends a planned request: the in-process [`Egress`] in
/// single-node mode, a QUIC tunnel to a regional egress node otherwise.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    async fn execute(
        &self,
        req: EgressRequest,
    ) -> Result<EgressResponse, switchyard_llm::GatewayError>;
}

#[async_trait::async_trait]
impl Upstream for Egress {
    async fn execute(
        &self,
        req: EgressRequest,
    ) -> Result<EgressResponse, switchyard_llm::GatewayError> {
        Egress::execute(self, req).await
    }
}
