//! The shape every streaming translator has: one upstream event in, zero or
//! more downstream frames out, never holding more than the current event.

use bytes::Bytes;

use crate::error::GatewayError;
use crate::openai::Usage;
use crate::sse::SseEvent;

pub trait StreamTranslator: Send {
    /// Translates one upstream event, appending complete wire frames
    /// (already SSE-framed, ready to write) to `out`.
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError>;

    /// Called once when the upstream body ends; appends the closing frames
    /// (for OpenAI output, a usage chunk if asked for and `data: [DONE]`).
    fn finish(&mut self, out: &mut Vec<Bytes>);

    /// Usage seen so far (complete once the stream finished).
    fn usage(&self) -> Option<Usage>;

    /// Whether the stream carried a terminal event (finish reason / stop), so
    /// an upstream that drops the connection early can be told apart.
    fn completed(&self) -> bool;
}
