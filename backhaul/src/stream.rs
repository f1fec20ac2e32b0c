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

use crate::idle::IdleTimer;
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
    idle: IdleTimer,
    stats: Arc<RequestStats>,
    started: Instant,
    framer: ErrorFramer,
    done: bool,
    /// A frame has gone out: from then on a failure can only be a frame.
    yielded: bool,
}

impl State {
    fn fail(&mut self, error: GatewayError) {
        if !self.yielded && self.pending.is_empty() {
            self.stats.mark_failed_before_first_frame(&error);
        } else {
            self.stats.mark_stream_failed();
        }
        self.pending.push_back((self.framer)(&error));
        self.done = true;
    }

    fn translate_events(&mut self) {
        // Taken out so a failure can call `fail`; put back to keep its allocation.
        let mut events = std::mem::take(&mut self.events);
        let mut failed = None;
        for ev in &events {
            if let Err(e) = self.translator.on_event(ev, &mut self.frames) {
                failed = Some(e);
                break;
            }
        }
        events.clear();
        self.events = events;
        self.pending.extend(self.frames.drain(..));
        if let Some(e) = failed {
            self.fail(e);
            return;
        }
        if let Some(u) = self.translator.usage() {
            self.stats.set_usage(u);
        }
    }

    async fn pull(&mut self) {
        match self.idle.within(self.upstream.next()).await {
            Ok(Some(Ok(chunk))) => {
                if let Err(e) = self.decoder.push_bytes(chunk, &mut self.events) {
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
                        self.idle.idle().as_millis()
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
        idle: IdleTimer::new(idle_timeout),
        stats,
        started,
        framer,
        done: false,
        yielded: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(first) = st.pending.pop_front() {
                let frame = join_pending(first, &mut st.pending);
                st.yielded = true;
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

/// The frames one upstream chunk produced go out as one write: a chunk
/// with several events, or one event a translator turns into several
/// frames, would otherwise cost a write (and a chunk header, a syscall)
/// each. Nothing waits for more: only frames already made are joined.
fn join_pending(first: Bytes, rest: &mut VecDeque<Bytes>) -> Bytes {
    if rest.is_empty() {
        return first;
    }
    let len = first.len() + rest.iter().map(Bytes::len).sum::<usize>();
    let mut joined = bytes::BytesMut::with_capacity(len);
    joined.extend_from_slice(&first);
    for frame in rest.drain(..) {
        joined.extend_from_slice(&frame);
    }
    joined.freeze()
}

/// Commit after the first event: waits for the first frame of a stream
/// made by [`translate_stream`]. A stream that fails before it (an error
/// event, a cut, a stall past the idle timeout) is returned as that error
/// instead of a 200 carrying one error frame, so nothing is committed and
/// the edge may still try another target.
pub async fn first_frame(
    mut frames: BoxStream<'static, Bytes>,
    stats: &RequestStats,
) -> Result<BoxStream<'static, Bytes>, GatewayError> {
    let first = frames.next().await;
    if let Some(e) = stats.failed_before_first_frame() {
        return Err(e.clone());
    }
    Ok(match first {
        Some(frame) => futures::stream::once(async move { frame })
            .chain(frames)
            .boxed(),
        None => frames,
    })
}

/// Raw passthrough bodies: chunks go out as they arrive. The protocol is
/// unknown, so a stall or a cut simply ends the body (and is recorded).
pub fn raw_stream(
    upstream: UpstreamBytes,
    idle_timeout: Duration,
    stats: Arc<RequestStats>,
    started: Instant,
) -> BoxStream<'static, Bytes> {
    let idle = IdleTimer::new(idle_timeout);
    futures::stream::unfold(Some((upstream, idle)), move |state| {
        let stats = stats.clone();
        async move {
            let (mut upstream, mut idle) = state?;
            match idle.within(upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    stats.mark_first_byte(started);
                    Some((chunk, Some((upstream, idle))))
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

/// A Responses stream fails with its own `error` event.
pub fn responses_error_frame(e: &GatewayError) -> Bytes {
    switchyard_llm::responses::error_event(e)
}

/// How a stream of `op`, asked for in `inbound`'s protocol, reports a
/// failure after its status was sent; `None` for raw bodies, whose
/// protocol the gateway does not know.
pub fn error_framer(
    op: &crate::request::Operation,
    inbound: crate::request::Protocol,
) -> Option<ErrorFramer> {
    use crate::request::{Operation, Protocol};
    match (op, inbound) {
        (Operation::Raw(_), _) => None,
        (Operation::Responses(_), _) => Some(responses_error_frame),
        (_, Protocol::OpenAi) => Some(openai_error_frame),
        (_, Protocol::Anthropic) => Some(anthropic_error_frame),
        (_, Protocol::Gemini) => Some(gemini_error_frame),
    }
}

/// Gemini streams carry an error as a chunk holding Google's error object.
pub fn gemini_error_frame(e: &GatewayError) -> Bytes {
    switchyard_llm::sse::encode_event(None, &e.to_gemini_json().to_string())
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

    /// Events that arrive together leave together, in order and intact;
    /// events that arrive apart are not held back for one another.
    #[tokio::test]
    async fn events_of_one_chunk_go_out_as_one_frame() {
        let together = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";
        let up = futures::stream::iter(chunks(&[
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            together,
        ]))
        .boxed();
        let stats = Arc::new(RequestStats::default());
        let frames: Vec<Bytes> = translated(up, &stats).collect().await;
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[1], together.as_bytes());
        assert!(!stats.stream_failed());
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

    fn translated(upstream: UpstreamBytes, stats: &Arc<RequestStats>) -> BoxStream<'static, Bytes> {
        translate_stream(
            upstream,
            Box::new(OpenAiPassthrough::new(true)),
            Duration::from_secs(5),
            stats.clone(),
            Instant::now(),
            openai_error_frame,
        )
    }

    #[tokio::test]
    async fn a_stream_failing_before_its_first_frame_is_an_error() {
        let cut = futures::stream::iter(vec![Err(GatewayError::new(ErrorKind::Upstream, "cut"))]);
        let stats = Arc::new(RequestStats::default());
        let e = first_frame(translated(cut.boxed(), &stats), &stats)
            .await
            .err()
            .expect("an error, not a stream");
        assert_eq!(e.kind, ErrorKind::Upstream);
        assert!(e.may_try_another_target());

        let late = futures::stream::iter(chunks(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        ]))
        .chain(futures::stream::iter(vec![Err(GatewayError::new(
            ErrorKind::Upstream,
            "cut",
        ))]));
        let stats = Arc::new(RequestStats::default());
        let frames = first_frame(translated(late.boxed(), &stats), &stats)
            .await
            .expect("committed after the first event");
        let text = String::from_utf8(frames.collect::<Vec<_>>().await.concat()).unwrap();
        assert!(text.starts_with("data: {\"choices\""), "{text}");
        assert!(text.contains("\"error\""), "{text}");
        assert!(stats.stream_failed() && stats.failed_before_first_frame().is_none());
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
