//! Switchyard control plane.
//!
//! Today this crate owns the policy document: its typed YAML form
//! ([`policy::PolicyDocument`]), strict parsing that reports every error with
//! its path, and compilation into the [`switchyard_proto::Snapshot`] that the
//! data plane serves from. `switchyard dev` compiles the dev policy
//! (`deploy/dev/switchyard.yaml`) with it; the gRPC services that push
//! snapshots to remote nodes build on the same compiler.

pub mod policy;

pub use policy::{compile, parse_policy, CompileOptions, Compiled, PolicyDocument, PolicyError};
