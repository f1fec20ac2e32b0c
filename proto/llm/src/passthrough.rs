//! Same-protocol streaming (OpenAI in, OpenAI-style provider out): events are
//! forwarded byte for byte; we only read them for accounting.
//!
//! The gateway always asks the upstream for the usage chunk so every request
//! can be accounted; when the caller did not ask for it, that one chunk is
//! withheld from them.

use bytes::Bytes;

use crate::error::GatewayError;
use crate::openai::{inspect_chunk, Usage};
use crate::sse::{SseEvent, DONE_EVENT};
use crate::translate::StreamTranslator;

#[derive(Debug)]
pub struct OpenAiPassthrough {
    caller_wants_usage: bool,
    usage: Option<Usage>,
    saw_done: bool,
    saw_finish: bool,
}

impl OpenAiPassthrough {
    pub fn new(caller_wants_usage: bool) -> Self {
        OpenAiPassthrough {
            caller_wants_usage,
            usage: None,
            saw_done: false,
            saw_finish: false,
        }
    }
}

impl StreamTranslator for OpenAiPassthrough {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if event.is_done() {
            self.saw_done = true;
            out.push(event.raw.clone());
            return Ok(());
        }
        let info = inspect_chunk(&event.data);
        if info.usage.is_some() {
            self.usage = info.usage;
        }
        if info.finished {
            self.saw_finish = true;
        }
        if info.usage_only && !self.caller_wants_usage {
            return Ok(());
        }
        out.push(event.raw.clone());
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        // Some OpenAI-compatible servers end the body without the sentinel;
        // SDKs are fine either way, but a complete stream should carry it.
        if self.saw_finish && !self.saw_done {
            out.push(Bytes::from_static(DONE_EVENT));
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn completed(&self) -> bool {
        self.saw_done || self.saw_finish
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseDecoder;

    const STREAM: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n\
data: [DONE]\n\n";

    fn run(wants_usage: bool) -> (Vec<Bytes>, OpenAiPassthrough) {
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(STREAM.as_bytes(), &mut evs).unwrap();
        let mut t = OpenAiPassthrough::new(wants_usage);
        let mut out = Vec::new();
        for e in &evs {
            t.on_event(e, &mut out).unwrap();
        }
        t.finish(&mut out);
        (out, t)
    }

    #[test]
    fn forwards_verbatim_and_accounts() {
        let (out, t) = run(true);
        assert_eq!(out.concat(), STREAM.as_bytes());
        assert_eq!(t.usage().unwrap().prompt_tokens, 5);
        assert!(t.completed());
    }

    #[test]
    fn withholds_usage_chunk_nobody_asked_for() {
        let (out, t) = run(false);
        assert_eq!(out.len(), 3);
        assert!(!out.iter().any(|b| b.windows(5).any(|w| w == b"usage")));
        assert_eq!(t.usage().unwrap().completion_tokens, 1);
    }
}

/// Same-protocol Anthropic streaming (Anthropic caller, Anthropic provider):
/// events are forwarded verbatim and read only for usage.
#[derive(Debug, Default)]
pub struct AnthropicPassthrough {
    usage: Usage,
    saw_usage: bool,
    stopped: bool,
}

impl AnthropicPassthrough {
    pub fn new() -> Self {
        Self::default()
    }

    fn read_usage(&mut self, u: &serde_json::Value) {
        let get = |k: &str| u.get(k).and_then(serde_json::Value::as_u64);
        let cache_read = get("cache_read_input_tokens").unwrap_or(0);
        let cache_write = get("cache_creation_input_tokens").unwrap_or(0);
        if let Some(input) = get("input_tokens") {
            self.usage.prompt_tokens = input + cache_read + cache_write;
            self.usage.cached_tokens = cache_read;
            self.saw_usage = true;
        }
        if let Some(output) = get("output_tokens") {
            self.usage.completion_tokens = output;
            self.saw_usage = true;
        }
    }
}

impl StreamTranslator for AnthropicPassthrough {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        out.push(event.raw.clone());
        match event.event.as_deref() {
            Some("message_start") | Some("message_delta") => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&event.data) {
                    let usage = v
                        .pointer("/message/usage")
                        .or_else(|| v.get("usage"))
                        .cloned();
                    if let Some(u) = usage {
                        self.read_usage(&u);
                    }
                }
            }
            Some("message_stop") => self.stopped = true,
            // The error event was forwarded as is; the stream ends here.
            Some("error") => self.stopped = true,
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Bytes>) {}

    fn usage(&self) -> Option<Usage> {
        self.saw_usage.then_some(self.usage)
    }

    fn completed(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod anthropic_tests {
    use super::*;
    use crate::sse::SseDecoder;

    #[test]
    fn anthropic_events_pass_verbatim_with_usage() {
        let wire = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(wire.as_bytes(), &mut evs).unwrap();
        let mut t = AnthropicPassthrough::new();
        let mut out = Vec::new();
        for e in &evs {
            t.on_event(e, &mut out).unwrap();
        }
        assert_eq!(out.concat(), wire.as_bytes());
        let u = t.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.completion_tokens),
            (15, 5, 7)
        );
        assert!(t.completed());
    }
}
