//! Wire formats of the LLM APIs Switchyard speaks, and the pure translation
//! between them.
//!
//! The OpenAI chat-completions shape is the hub: every provider adapter maps
//! requests out of it and responses, stream events and errors back into it.
//! Nothing in this crate performs I/O, so every function is testable with
//! recorded payloads alone (see `tests/`).
//!
//! - [`sse`]: incremental Server-Sent Events decoder/encoder.
//! - [`scan`]: a JSON object's top-level members, split without parsing.
//! - [`openai`]: request validation, usage accounting, chunk inspection.
//! - [`error`]: the data-plane error class and its protocol-shaped bodies.
//! - [`anthropic`]: Anthropic Messages ⇄ OpenAI, both directions (requests,
//!   responses, streams, errors), thinking blocks preserved.
//! - [`gemini`]: Gemini generateContent / streamGenerateContent /
//!   batchEmbedContents ⇄ OpenAI.
//! - [`completions`]: legacy OpenAI completions ⇄ OpenAI chat.
//! - [`responses`]: the OpenAI Responses API ⇄ OpenAI chat, both
//!   directions, streams included.
//! - [`gemini_native`]: Gemini's own API as an inbound protocol ⇄ OpenAI chat.
//! - [`tokens`]: local token counts (o200k_base BPE) where a provider has
//!   no counting endpoint.
//! - [`translate`]: the streaming translator trait the adapters implement.

pub mod anthropic;
pub mod completions;
mod convert;
pub mod error;
pub mod gemini;
pub mod gemini_native;
pub mod openai;
pub mod passthrough;
mod quick_chat;
pub mod responses;
pub mod scan;
pub mod sse;
pub mod tokens;
pub mod translate;

pub use error::{ErrorKind, GatewayError, Retry, Source};
