//! Turns an upstream byte stream into downstream SSE frames through a
//! [`StreamTranslator`], event by event.
//!
//! Nothing is buffered beyond the event being decoded. A stalled upstream
//! (no bytes for `idle_timeout`), a cut connection or a stream that ends
//! without its terminal event each end the downstream stream with one error
//! frame, because the HTTP status has already been sent.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use switchyard_llm::sse::{SseDecoder, SseEvent};
use switchyard_llm::translate::StreamTranslator;
use switchyard_llm::{ErrorKind, GatewayError};

use crate::request::RequestStats;

/// Renders an error as a frame of the caller's protocol.
pub type ErrorFramer = fn(&GatewayError) -> Bytes;

pub fn openai_error_frame(e: &GatewayError) -> Bytes {
    switchyard_llm::sse::encode_event(None, &e.to_openai_json().to_string())
}

pub type UpstreamBytes = BoxStream<'static, Result<Bytes, GatewayError>>;

struct State {
    upstream: UpstreamBytes,
    decoder: SseDecoder,
    translator: Box<dyn StreamTranslator>,
    pending: VecDeque<Bytes>,
    events: Vec<SseEvent>,
    frames: Vec<Bytes>,
    idle_timeout: Duration,
    stats: Arc<RequestStats>,
    started: Instant,
    framer: ErrorFramer,
    done: bool,
}

impl State {
    fn fail(&mut self, error: GatewayError) {
        self.stats.mark_stream_failed();
        self.pending.push_back((self.framer)(&error));
        self.done = true;
    }

    fn translate_events(&mut self) {
        for ev in self.events.drain(..) {
            if let Err(e) = self.translator.on_event(&ev, &mut self.frames) {
                self.pending.extend(self.frames.drain(..));
                self.stats.mark_stream_failed();
                self.pending.push_back((self.framer)(&e));
                self.done = true;
                return;
            }
        }
        self.pending.extend(self.frames.drain(..));
        if let Some(u) = self.translator.usage() {
            self.stats.set_usage(u);
        }
    }

    async fn pull(&mut self) {
        match tokio::time::timeout(self.idle_timeout, self.upstream.next()).await {
            Ok(Some(Ok(chunk))) => {
                if let Err(e) = self.decoder.push(&chunk, &mut self.events) {
                    self.fail(GatewayError::new(ErrorKind::Upstream, e.to_string()));
                    return;
                }
                self.translate_events();
            }
            Ok(Some(Err(e))) => {
                self.translate_events();
                self.fail(e);
            }
            Ok(None) => {
                self.events.extend(self.decoder.finish());
                self.translate_events();
                if self.done {
                    return;
                }
                self.translator.finish(&mut self.frames);
                self.pending.extend(self.frames.drain(..));
                if let Some(u) = self.translator.usage() {
                    self.stats.set_usage(u);
                }
                if self.translator.completed() {
                    self.done = true;
                } else {
                    self.fail(GatewayError::new(
                        ErrorKind::Upstream,
                        "The provider closed the stream before it completed.",
                    ));
                }
            }
            Err(_) => self.fail(
                GatewayError::new(
                    ErrorKind::Timeout,
                    format!(
                        "The provider sent nothing for {} ms; the stream was ended.",
                        self.idle_timeout.as_millis()
                    ),
                )
                .with_code("upstream_stalled"),
            ),
        }
    }
}

pub fn translate_stream(
    upstream: UpstreamBytes,
    translator: Box<dyn StreamTranslator>,
    idle_timeout: Duration,
    stats: Arc<RequestStats>,
    started: Instant,
    framer: ErrorFramer,
) -> BoxStream<'static, Bytes> {
    let state = State {
        upstream,
        decoder: SseDecoder::new(),
        translator,
        pending: VecDeque::new(),
        events: Vec::new(),
        frames: Vec::new(),
        idle_timeout,
        stats,
        started,
        framer,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.pending.pop_front() {
                st.stats.mark_first_byte(st.started);
                return Some((frame, st));
            }
            if st.done {
                return None;
            }
            st.pull().await;
        }
    })
    .boxed()
}

/// Raw passthrough bodies: chunks go out as they arrive. The protocol is
/// unknown, so a stall or a cut simply ends the body (and is recorded).
pub fn raw_stream(
    upstream: UpstreamBytes,
    idle_timeout: Duration,
    stats: Arc<RequestStats>,
    started: Instant,
) -> BoxStream<'static, Bytes> {
    futures::stream::unfold(Some(upstream), move |state| {
        let stats = stats.clone();
        async move {
            let mut upstream = state?;
            match tokio::time::timeout(idle_timeout, upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    stats.mark_first_byte(started);
                    Some((chunk, Some(upstream)))
                }
                Ok(None) => None,
                Ok(Some(Err(_))) | Err(_) => {
                    stats.mark_stream_failed();
                    None
                }
            }
        }
    })
    .boxed()
}

pub fn anthropic_error_frame(e: &GatewayError) -> Bytes {
    switchyard_llm::sse::encode_event(Some("error"), &e.to_anthropic_json().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_llm::passthrough::OpenAiPassthrough;

    fn chunks(parts: &[&'static str]) -> Vec<Result<Bytes, GatewayError>> {
        parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect()
    }

    async fn collect(upstream: UpstreamBytes, idle: Duration) -> (String, Arc<RequestStats>) {
        let stats = Arc::new(RequestStats::default());
        let s = translate_stream(
            upstream,
            Box::new(OpenAiPassthrough::new(true)),
            idle,
            stats.clone(),
            Instant::now(),
            openai_error_frame,
        );
        let frames: Vec<Bytes> = s.collect().await;
        (String::from_utf8(frames.concat()).unwrap(), stats)
    }

    #[tokio::test]
    async fn complete_stream_passes_and_accounts() {
        let up = futures::stream::iter(chunks(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n",
            "\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
        ]))
        .boxed();
        let (text, stats) = collect(up, Duration::from_secs(5)).await;
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(!stats.stream_failed());
        assert_eq!(stats.usage().unwrap().prompt_tokens, 2);
        assert!(stats.ttft_us().is_some());
    }

    #[tokio::test]
    async fn cut_stream_ends_with_error_frame() {
        let up = futures::stream::iter(chunks(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ]))
        .boxed();
        let (text, stats) = collect(up, Duration::from_secs(5)).await;
        assert!(text.contains("\"error\""), "{text}");
        assert!(stats.stream_failed());
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_stream_times_out() {
        let first = futures::stream::iter(chunks(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ]));
        let up = first.chain(futures::stream::pending()).boxed();
        let (text, stats) = collect(up, Duration::from_millis(300)).await;
        assert!(text.contains("upstream_stalled"), "{text}");
        assert!(stats.stream_failed());
    }
}
