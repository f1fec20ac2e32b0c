//! Switchyard control plane.
//!
//! - [`policy`]: the policy document (strict YAML), its validation (every
//!   error with its path, residency included) and compilation into the
//!   [`switchyard_proto::Snapshot`] nodes serve from. `switchyard dev` uses
//!   [`compile`]; the control plane uses [`compile_policy`].
//! - [`secrets`]: keys sealed at rest with AES-256-GCM under a master key.
//! - [`store`]: policy versions and the node registry in SQLite (default) or
//!   PostgreSQL (several replicas), one SQL layer, embedded migrations.
//! - [`server`]: the tonic `Operator` and `Node` services, tailoring each
//!   node's snapshot (edges get no keys, egresses only their region's), and
//!   [`http`], the same operator operations as HTTP/JSON.
//! - [`telemetry`]: the aggregator nodes record into, the report sender, and
//!   the control plane's sliding-window latency scores.
//! - [`node_client`]: what an edge or egress process calls to follow the
//!   control plane: [`node_client::NodeAgent::start`].
//! - [`client`]: the operator client behind `switchyard ctl`.
//! - [`admin`]: every role's lifecycle (ready, draining, in flight) and
//!   its admin listener (`/healthz`, `/readyz`, `/metrics`).
//!
//! `tests/e2e_control.rs` (root package) runs all of it in-process on real
//! sockets; `docs/control-plane.md` is the operator's guide.

pub mod admin;
pub mod client;
pub mod diff;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod node_client;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tenancy;
pub mod tls;

pub use policy::{
    compile, compile_for_edge, compile_policy, parse_policy, CompileOptions, Compiled,
    PolicyDocument, PolicyError, PolicyOptions,
};
pub use switchyard_proto::control as pb;
/// The tonic version the services and clients are built with.
pub use tonic;
