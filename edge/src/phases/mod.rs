//! The request pipeline, one module per phase, in the order
//! [`crate::EdgeApp`] runs them over a [`crate::RequestCtx`]:
//!
//! 1. [`admit`]: route the URL, authenticate, resolve the tenant and its
//!    residency, read and validate the body; may answer early (health, the
//!    model list). Hook: [`crate::hooks::AdmitHook`].
//! 2. [`plan`]: the ordered targets from the snapshot, and what the plan
//!    permits (raw mode, the simulate header). Hook: [`crate::hooks::PlanHook`].
//! 3. [`dispatch`]: the only place that makes attempts; moves to the next
//!    target while nothing is committed and the error allows it.
//! 4. [`respond`]: commits on the first event and writes the answer.
//!    Hook: [`crate::hooks::ResponseObserver`]. A route with `resume`
//!    continues a cut text stream on another target ([`resume`]).
//! 5. [`record`]: exactly one usage record. Hook: [`crate::hooks::RecordHook`].

pub(crate) mod admit;
pub(crate) mod dispatch;
pub(crate) mod hedge;
pub(crate) mod plan;
pub(crate) mod record;
pub(crate) mod respond;
pub(crate) mod resume;

use switchyard_llm::GatewayError;

/// A phase's error, with the `allow` header a 405 carries.
pub(crate) type Failure = (GatewayError, Option<&'static str>);

/// Lifts a plain error into a [`Failure`].
pub(crate) fn fail(e: GatewayError) -> Failure {
    (e, None)
}
