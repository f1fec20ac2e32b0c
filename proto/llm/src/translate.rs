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

/// Two translators in series: the first one's frames are decoded again and
/// fed to the second. Used when neither end speaks the hub protocol, e.g. an
/// Anthropic-protocol caller served by an OpenAI-protocol provider
/// (provider → OpenAI chunks → Anthropic events).
pub struct Chain {
    first: Box<dyn StreamTranslator>,
    second: Box<dyn StreamTranslator>,
    decoder: crate::sse::SseDecoder,
    frames: Vec<Bytes>,
    events: Vec<SseEvent>,
}

impl Chain {
    pub fn new(first: Box<dyn StreamTranslator>, second: Box<dyn StreamTranslator>) -> Self {
        Chain {
            first,
            second,
            decoder: crate::sse::SseDecoder::new(),
            frames: Vec::new(),
            events: Vec::new(),
        }
    }

    fn pump(&mut self, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        for f in self.frames.drain(..) {
            self.decoder
                .push_bytes(f, &mut self.events)
                .map_err(|e| GatewayError::new(crate::ErrorKind::Upstream, e.to_string()))?;
        }
        for ev in self.events.drain(..) {
            self.second.on_event(&ev, out)?;
        }
        Ok(())
    }
}

impl StreamTranslator for Chain {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        let first = self.first.on_event(event, &mut self.frames);
        self.pump(out)?;
        first
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.first.finish(&mut self.frames);
        if self.pump(out).is_ok() {
            self.events.extend(self.decoder.finish());
            for ev in self.events.drain(..) {
                if self.second.on_event(&ev, out).is_err() {
                    break;
                }
            }
        }
        self.second.finish(out);
    }

    fn usage(&self) -> Option<Usage> {
        self.first.usage().or_else(|| self.second.usage())
    }

    fn completed(&self) -> bool {
        self.first.completed() && self.second.completed()
    }
}
