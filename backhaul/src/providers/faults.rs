//! Fault injection in front of any provider adapter, for development and
//! resilience tests: answer with an error status, hang, delay the first
//! token, or cut a stream after some chunks — against a real provider (or a
//! mock of one), without a simulated provider.
//!
//! Two switches turn it on, both decided outside this module:
//! - the policy's `providers.P.faults` (compiled into
//!   [`ProviderSnapshot::simulated`] for providers that are not of kind
//!   `simulated`), applied to every request to that provider;
//! - the client's `x-switchyard-simulate` header, which the edge forwards only
//!   in `switchyard dev` or where the policy sets `faults.allow_header`.
//!
//! The simulated provider injects its own faults (it shapes whole answers),
//! so it is called as it is. Directives that shape a simulated answer
//! (`tokens`, `tps`) mean nothing to a real provider and are ignored here.

use std::time::Duration;

use futures::StreamExt;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{FaultMode, ProviderKind, SimulatedFault};

use super::simulated::{injected_error, parse_directives};
use super::{CallContext, Provider, ProviderReply};
use crate::stream::UpstreamBytes;

/// What the fault layer does to one request.
#[derive(Debug, Default, PartialEq)]
struct Injection {
    /// Added before the provider is called (a slow first token).
    delay: Duration,
    fault: Option<FaultMode>,
}

/// Calls `adapter`, with the faults the policy and the request ask for.
pub(crate) async fn call(
    adapter: &dyn Provider,
    ctx: CallContext<'_>,
) -> Result<ProviderReply, GatewayError> {
    let provider = ctx.provider;
    if provider.kind == ProviderKind::Simulated
        || (provider.simulated.is_none() && ctx.request.simulate.is_none())
    {
        return adapter.call(ctx).await;
    }
    let injection = decide(
        ctx.provider,
        &ctx.request.target.model,
        ctx.request.simulate.as_deref(),
    )?;
    let drop_after = match injection.fault {
        Some(FaultMode::Status {
            status,
            retry_after,
        }) => {
            tokio::time::sleep(injection.delay).await;
            return Err(injected_error(&provider.name, status, retry_after));
        }
        // The egress's deadline ends this, as it would a real hang.
        Some(FaultMode::Hang) => futures::future::pending().await,
        Some(FaultMode::DropAfter { chunks }) => Some(chunks),
        None => None,
    };
    if !injection.delay.is_zero() {
        tokio::time::sleep(injection.delay).await;
    }
    let reply = adapter.call(ctx).await?;
    match (reply, drop_after) {
        (reply, None) => Ok(reply),
        (
            ProviderReply::Stream {
                upstream,
                translator,
            },
            Some(chunks),
        ) => Ok(ProviderReply::Stream {
            upstream: cut_after(upstream, chunks, provider.name.clone()),
            translator,
        }),
        // A whole answer cut before it arrived.
        (ProviderReply::Json { .. }, Some(_)) => Err(cut_error(&provider.name)),
    }
}

/// The policy's profile for the model, overridden by the header's directives.
fn decide(
    provider: &switchyard_proto::ProviderSnapshot,
    model: &str,
    header: Option<&str>,
) -> Result<Injection, GatewayError> {
    let directives = match header {
        Some(h) => parse_directives(h)?,
        None => Default::default(),
    };
    let profile = provider.simulated.as_ref().map(|s| s.profile(model));
    let delay = match directives.ttft_ms {
        Some(ms) => Duration::from_millis(ms),
        None => profile.map_or(Duration::ZERO, |p| p.ttft),
    };
    let fault = directives
        .fault
        .or_else(|| profile.and_then(|p| p.fault.clone()))
        .filter(fires)
        .map(|f| f.mode);
    Ok(Injection { delay, fault })
}

/// Whether an injected fault fires this time (`rate` is its probability).
pub(crate) fn fires(fault: &SimulatedFault) -> bool {
    fault.rate >= 1.0 || (fault.rate > 0.0 && fastrand::f64() < fault.rate)
}

fn cut_error(provider: &str) -> GatewayError {
    GatewayError::new(
        ErrorKind::Upstream,
        format!("The connection to the provider `{provider}` was cut (injected fault)."),
    )
}

/// Passes `chunks` upstream chunks, then fails the stream as a cut
/// connection would.
fn cut_after(upstream: UpstreamBytes, chunks: u32, provider: String) -> UpstreamBytes {
    let cut = futures::stream::once(async move { Err(cut_error(&provider)) });
    upstream.take(chunks as usize).chain(cut).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use switchyard_proto::{ProviderSnapshot, SimulatedProfile, SimulatedSettings};

    fn provider(fault: Option<SimulatedFault>, ttft_ms: u64) -> ProviderSnapshot {
        ProviderSnapshot {
            name: "p".into(),
            kind: ProviderKind::OpenAiCompatible,
            base_url: "http://127.0.0.1:1/v1".into(),
            keys: vec![],
            models: vec![],
            simulated: Some(SimulatedSettings {
                default_profile: SimulatedProfile {
                    ttft: Duration::from_millis(ttft_ms),
                    fault,
                    ..SimulatedProfile::default()
                },
                models: HashMap::new(),
                allow_header: false,
            }),
            region: None,
            jurisdiction: None,
            pricing: HashMap::new(),
            prefill: Default::default(),
            key_pools: vec![],
        }
    }

    #[test]
    fn policy_faults_apply_and_the_header_overrides_them() {
        let always_429 = SimulatedFault {
            rate: 1.0,
            mode: FaultMode::Status {
                status: 429,
                retry_after: Some(2),
            },
        };
        let p = provider(Some(always_429), 5);
        let i = decide(&p, "m", None).unwrap();
        assert_eq!(i.delay, Duration::from_millis(5));
        assert!(matches!(
            i.fault,
            Some(FaultMode::Status { status: 429, .. })
        ));
        let i = decide(&p, "m", Some("drop_after=2,ttft_ms=0")).unwrap();
        assert_eq!(i.delay, Duration::ZERO);
        assert_eq!(i.fault, Some(FaultMode::DropAfter { chunks: 2 }));
        assert!(decide(&p, "m", Some("ttft_ms=NaN")).is_err());
        let never = SimulatedFault {
            rate: 0.0,
            mode: FaultMode::Hang,
        };
        assert_eq!(
            decide(&provider(Some(never), 0), "m", None).unwrap(),
            Injection::default()
        );
    }

    #[tokio::test]
    async fn a_cut_stream_passes_its_chunks_then_fails() {
        let upstream =
            futures::stream::iter((0..5).map(|i| Ok(bytes::Bytes::from(format!("{i}"))))).boxed();
        let got: Vec<_> = cut_after(upstream, 2, "p".into()).collect().await;
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_ok());
        assert_eq!(got[2].as_ref().unwrap_err().kind, ErrorKind::Upstream);
    }
}
