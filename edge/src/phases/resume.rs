//! `resume`: mid-stream resume, opt-in per route (`routes.R.resume`).
//!
//! Once a stream is committed nothing is retried (a byte reached the
//! client), with one exception: a text-only answer that the provider cuts
//! (an error event, or an end without the terminal event) continues on
//! another target of the plan that declares assistant prefill
//! (`providers.P.prefill`). That target gets the original request plus the
//! text the client already has as a trailing assistant message, and its
//! stream is spliced into the client's: same response id and indexes, no
//! second preamble (`message_start`, role chunk), its text, then its
//! terminal events and usage. The client sees one answer.
//!
//! Why only text: a tool call cut in the middle cannot be prefilled (its
//! arguments are not assistant text), and guessing a continuation prompt
//! corrupts it; reasoning and several choices likewise. Those, a finished
//! answer, a route without resume, no prefill-capable target left, or
//! [`MAX_RESUMES`] spent end the stream with its error event as before.
//!
//! Targets come from the request's plan only, so residency holds: the plan
//! never contains a target outside the request's jurisdictions, and the
//! jurisdiction is checked again here and at the egress.
//!
//! Cost: with resume on, each event the client gets is parsed (JSON) and
//! the answer's text is kept for the prefill; with resume off the stream
//! passes through untouched, as before.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_backhaul::{Operation, RequestStats};
use switchyard_llm::openai::Usage;
use switchyard_llm::sse::{SseDecoder, SseEvent};
use switchyard_proto::health;
use switchyard_proto::{Prefill, Snapshot};

use super::dispatch::{attempt, egress_request, record_health, AnswerBody};
use super::plan::{simulate_allowed, Outbound, Plan};
use crate::app::EdgeApp;
use crate::ctx::{Attempt, RequestCtx};

/// Resumes per request: each one is a whole new provider call (prompt
/// included), so a provider failing every stream must not multiply them.
pub(crate) const MAX_RESUMES: u32 = 2;

/// The caller's stream shape, which the splice speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// OpenAI chat completion chunks.
    Chat,
    /// Anthropic Messages events.
    Messages,
}

/// One target a cut stream may continue on.
struct Candidate {
    index: usize,
    prefill: Prefill,
    simulate: bool,
}

/// What a resume needs, taken before `dispatch` consumes the request.
pub(crate) struct Resume {
    shape: Shape,
    op: Operation,
    targets: switchyard_proto::Plan,
    candidates: Vec<Candidate>,
    simulate: Option<String>,
    forward_headers: Vec<(String, String)>,
    limit: Option<(Duration, &'static str)>,
    left: u32,
}

impl Resume {
    /// `Some` when the route opted in and the request is a chat or
    /// messages stream (other shapes end with their error event as before).
    pub(crate) fn prepare(
        app: &EdgeApp,
        snap: &Snapshot,
        plan: &Plan,
        outbound: &Outbound,
    ) -> Option<Box<Resume>> {
        if !plan.resume || !outbound.op.is_stream() {
            return None;
        }
        let shape = match &outbound.op {
            Operation::Chat(_) => Shape::Chat,
            Operation::Messages { .. } => Shape::Messages,
            _ => return None,
        };
        let candidates = plan
            .targets
            .iter()
            .enumerate()
            .filter_map(|(index, t)| {
                let prefill = snap.providers().get(&t.target.provider)?.prefill;
                (prefill != Prefill::None).then(|| Candidate {
                    index,
                    prefill,
                    simulate: simulate_allowed(app, snap, t),
                })
            })
            .collect();
        let first_token = plan.first_token_timeout;
        let limit = match (plan.attempt_timeout, first_token) {
            (Some(a), Some(f)) if f <= a => Some((f, "first_token_timeout")),
            (Some(a), _) => Some((a, "attempt_timeout")),
            (None, Some(f)) => Some((f, "first_token_timeout")),
            (None, None) => None,
        };
        Some(Box::new(Resume {
            shape,
            op: outbound.op.clone(),
            targets: plan.targets.clone(),
            candidates,
            simulate: outbound.simulate.clone(),
            forward_headers: outbound.forward_headers.clone(),
            limit,
            left: MAX_RESUMES,
        }))
    }
}

/// Why a cut stream was not resumed (log field and metric label).
fn refusal(state: &Seen, resume: &Resume) -> Option<&'static str> {
    if let Some(why) = state.unresumable {
        return Some(why);
    }
    if state.finished {
        return Some("already_finished");
    }
    if resume.left == 0 {
        return Some("resumes_exhausted");
    }
    None
}

/// What the client has seen of the answer so far.
#[derive(Debug, Default)]
struct Seen {
    /// The answer's text, for the prefill.
    text: String,
    /// Set once something that a prefill cannot carry went out.
    unresumable: Option<&'static str>,
    /// The model said it was done (`finish_reason`, `message_delta`).
    finished: bool,
    /// The terminal event went out (`[DONE]`, `message_stop`).
    done: bool,
    // OpenAI chunks: identity every spliced chunk takes.
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    fingerprint: Option<Value>,
    // Anthropic: the text block still open, and the next free index.
    open_text: Option<u64>,
    next_index: u64,
}

/// How the current resumed stream maps onto the client's.
#[derive(Debug, Default)]
struct Segment {
    /// Leading whitespace of the continuation is dropped: the prefill lost
    /// its trailing whitespace (Anthropic refuses it) but the client has it.
    skip_ws: bool,
    /// Client index = resumed index + offset, once the first block is seen.
    offset: Option<i64>,
    /// The resumed stream's first text block continues the open one.
    merge_first: Option<u64>,
    /// Its usage, added to the earlier segments' in the record.
    stats: Option<Arc<RequestStats>>,
    /// Length of the client's text when it started.
    start_chars: usize,
}

/// The committed stream, spliced across resumes. Without a [`Resume`] it
/// is the stream itself.
pub(crate) struct Spliced {
    inner: BoxStream<'static, Bytes>,
    out: VecDeque<Bytes>,
    resume: Option<Box<Resume>>,
    shape: Shape,
    decoder: SseDecoder,
    events: Vec<SseEvent>,
    seen: Seen,
    /// `Some` while a resumed stream is being spliced.
    segment: Option<Segment>,
    /// Usage of the segments before the current one.
    earlier: Usage,
    ended: bool,
}

impl Spliced {
    pub(crate) fn new(
        first: Option<Bytes>,
        rest: BoxStream<'static, Bytes>,
        resume: Option<Box<Resume>>,
    ) -> Self {
        let mut s = Spliced {
            inner: rest,
            out: VecDeque::new(),
            shape: resume.as_ref().map_or(Shape::Chat, |r| r.shape),
            resume,
            decoder: SseDecoder::new(),
            events: Vec::new(),
            seen: Seen::default(),
            segment: None,
            earlier: Usage::default(),
            ended: false,
        };
        if let Some(first) = first {
            if s.resume.is_some() {
                if let Some(cut) = s.feed(&first) {
                    // Cut within its first chunk: `next` meets the error.
                    s.inner = futures::stream::once(async move { cut }).boxed();
                }
            } else {
                s.out.push_back(first);
            }
        }
        s
    }

    /// The next chunk for the client; may make resume attempts, which are
    /// cancelled with this future when the client goes away. A resume's
    /// state is boxed: inline, every open stream would hold its 2 KB while
    /// it waits for the provider's next event.
    pub(crate) async fn next(&mut self, app: &EdgeApp, ctx: &mut RequestCtx) -> Option<Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            if self.ended {
                return None;
            }
            if self.resume.is_none() {
                return self.inner.next().await;
            }
            match self.inner.next().await {
                Some(chunk) => {
                    if let Some(cut) = self.feed(&chunk) {
                        Box::pin(self.on_cut(app, ctx, Some(cut))).await;
                    }
                }
                None => {
                    self.events.extend(self.decoder.finish());
                    let cut = self.take_events();
                    if cut.is_some() || !self.seen.done {
                        Box::pin(self.on_cut(app, ctx, cut)).await;
                    } else {
                        self.finish(ctx);
                        self.ended = true;
                    }
                }
            }
        }
    }

    /// Decodes a chunk; complete events go out (spliced). Returns the
    /// error event that cut the stream, held back.
    fn feed(&mut self, chunk: &Bytes) -> Option<Bytes> {
        if self.decoder.push(chunk, &mut self.events).is_err() {
            // Not SSE we can read: nothing to splice; pass it on as is.
            self.seen.unresumable.get_or_insert("unreadable_stream");
            self.out.push_back(chunk.clone());
            return None;
        }
        self.take_events()
    }

    fn take_events(&mut self) -> Option<Bytes> {
        let events = std::mem::take(&mut self.events);
        for ev in events {
            let step = match self.shape {
                Shape::Chat => chat_event(&mut self.seen, self.segment.as_mut(), &ev),
                Shape::Messages => messages_event(&mut self.seen, self.segment.as_mut(), &ev),
            };
            match step {
                Step::Forward(b) => self.out.push_back(b),
                Step::Drop => {}
                Step::Cut => return Some(ev.raw),
            }
        }
        None
    }

    /// The stream was cut: resume it, or pass the error on and end.
    async fn on_cut(&mut self, app: &EdgeApp, ctx: &mut RequestCtx, error: Option<Bytes>) {
        let Some(mut resume) = self.resume.take() else {
            return;
        };
        self.cut(&mut resume, app, ctx, error).await;
        self.resume = Some(resume);
    }

    async fn cut(
        &mut self,
        resume: &mut Resume,
        app: &EdgeApp,
        ctx: &mut RequestCtx,
        error: Option<Bytes>,
    ) {
        let cut_from = ctx.served.clone();
        let provider = cut_from
            .as_ref()
            .map_or(String::new(), |s| s.target.provider.clone());
        if let Some(why) = refusal(&self.seen, resume) {
            self.give_up(app, ctx, &provider, why, error);
            return;
        }
        resume.left -= 1;
        // The attempt that committed the stream did not complete it.
        if let Some(a) = ctx.attempts.last_mut() {
            a.error = Some("stream_cut");
        }
        self.account_segment(ctx);
        let failed: Vec<usize> = ctx
            .attempts
            .iter()
            .filter(|a| a.error.is_some())
            .map(|a| a.target)
            .collect();
        let chars = self.seen.text.len();
        let mut tried_any = false;
        for i in 0..resume.candidates.len() {
            let c = &resume.candidates[i];
            let planned = resume.targets[c.index].clone();
            if failed.contains(&c.index) {
                continue;
            }
            // Residency holds: the plan has only permitted targets, and a
            // resume is checked again rather than trusted.
            if let Some(allowed) = &ctx.residency {
                if !planned
                    .jurisdiction
                    .as_ref()
                    .is_some_and(|j| allowed.contains(j))
                {
                    continue;
                }
            }
            let entry = app.health.target(&health::target_id(
                &planned.target.provider,
                &planned.target.model,
                planned.region.as_deref(),
            ));
            // A resume is no breaker probe: an ejected target is passed over.
            if entry.as_deref().is_some_and(|e| app.health.is_ejected(e)) {
                continue;
            }
            let Some((op, trimmed)) = prefilled(&resume.op, &self.seen.text, c.prefill) else {
                continue;
            };
            tried_any = true;
            tracing::info!(
                target: "switchyard::resume",
                event = "resume",
                request_id = %ctx.request_id,
                from = %provider,
                to = %planned.target.provider,
                to_model = %planned.target.model,
                prefill = c.prefill.as_str(),
                emitted_chars = chars,
                "stream cut mid-answer; resuming on another target"
            );
            let started = Instant::now();
            let span = ctx.trace.child();
            let req = egress_request(
                ctx,
                &planned,
                op,
                resume.simulate.clone().filter(|_| c.simulate),
                resume.forward_headers.clone(),
                span,
            );
            // Counted in flight for `least_busy` until its stream ends.
            let in_flight = entry.as_ref().map(|e| e.start());
            let result = attempt(app.upstream.as_ref(), req, resume.limit).await;
            let _ = record_health(app, entry.as_deref(), result.as_ref().err(), started);
            // A resumed answer must be a stream; anything else failed it.
            let result = result.and_then(|a| match a.body {
                AnswerBody::Stream { first, rest } if a.status.is_success() => {
                    Ok((first, rest, a.stats))
                }
                _ => Err(switchyard_llm::GatewayError::new(
                    switchyard_llm::ErrorKind::Upstream,
                    "the resumed attempt did not answer with a stream",
                )),
            });
            ctx.attempts.push(Attempt {
                target: c.index,
                elapsed: started.elapsed(),
                error: result
                    .as_ref()
                    .err()
                    .map(|e| e.code.unwrap_or(e.kind.label())),
                span: Some(span),
                started_after: started.saturating_duration_since(ctx.received_at),
            });
            match result {
                Ok((first, rest, stats)) => {
                    app.metrics.resume(&provider, "resumed");
                    ctx.served = Some(planned);
                    ctx.stats = Some(stats.clone());
                    self.inner = rest
                        .map(move |chunk| {
                            let _held = &in_flight;
                            chunk
                        })
                        .boxed();
                    self.decoder = SseDecoder::new();
                    self.segment = Some(Segment {
                        skip_ws: trimmed,
                        offset: None,
                        merge_first: self.seen.open_text,
                        stats: Some(stats),
                        start_chars: self.seen.text.len(),
                    });
                    if let Some(first) = first {
                        if let Some(cut) = self.feed(&first) {
                            // Cut again before anything: the loop in
                            // `next` sees the end and decides again.
                            self.inner = futures::stream::once(async move { cut }).boxed();
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        target: "switchyard::resume",
                        event = "resume_failed",
                        request_id = %ctx.request_id,
                        to = %planned.target.provider,
                        error = e.code.unwrap_or(e.kind.label()),
                        "resume attempt failed"
                    );
                    app.metrics
                        .resume(&planned.target.provider, "attempt_failed");
                }
            }
        }
        let why = if tried_any {
            "every_resume_failed"
        } else {
            "no_prefill_target"
        };
        self.give_up(app, ctx, &provider, why, error);
    }

    fn give_up(
        &mut self,
        app: &EdgeApp,
        ctx: &mut RequestCtx,
        provider: &str,
        why: &'static str,
        error: Option<Bytes>,
    ) {
        tracing::warn!(
            target: "switchyard::resume",
            event = "resume_refused",
            request_id = %ctx.request_id,
            provider = %provider,
            reason = why,
            "stream cut mid-answer; not resumed"
        );
        app.metrics.resume(provider, why);
        if let Some(stats) = ctx.stats.as_ref() {
            stats.mark_stream_failed();
        }
        self.out.extend(error);
        self.finish(ctx);
        self.ended = true;
    }

    /// Adds the current segment's usage to the earlier ones'. A cut
    /// provider rarely reported its usage: its output is then estimated
    /// from the text (≈ 4 characters a token) and its prompt from the
    /// request.
    fn account_segment(&mut self, ctx: &RequestCtx) {
        let reported = ctx.stats.as_ref().and_then(|s| s.usage());
        let start = self.segment.as_ref().map_or(0, |s| s.start_chars);
        let emitted = self.seen.text.len().saturating_sub(start) as u64;
        let u = match reported {
            Some(u) if u.completion_tokens > 1 => u,
            _ => Usage {
                prompt_tokens: reported
                    .map_or(0, |u| u.prompt_tokens)
                    .max(ctx.estimated_tokens),
                completion_tokens: emitted.div_ceil(4),
                cached_tokens: 0,
                reasoning_tokens: 0,
            },
        };
        self.earlier.prompt_tokens += u.prompt_tokens;
        self.earlier.completion_tokens += u.completion_tokens;
        self.earlier.cached_tokens += u.cached_tokens;
        self.earlier.reasoning_tokens += u.reasoning_tokens;
    }

    /// The record counts every segment's usage, and the client's first
    /// token came from the first one.
    fn finish(&mut self, ctx: &mut RequestCtx) {
        let Some(seg) = self.segment.as_ref() else {
            return;
        };
        let Some(stats) = seg.stats.as_ref() else {
            return;
        };
        let now = stats.usage().unwrap_or_default();
        stats.set_usage(Usage {
            prompt_tokens: now.prompt_tokens + self.earlier.prompt_tokens,
            completion_tokens: now.completion_tokens + self.earlier.completion_tokens,
            cached_tokens: now.cached_tokens + self.earlier.cached_tokens,
            reasoning_tokens: now.reasoning_tokens + self.earlier.reasoning_tokens,
        });
        if let Some(committed) = ctx.committed_at {
            stats.set_ttft_us(
                committed
                    .saturating_duration_since(ctx.received_at)
                    .as_micros()
                    .max(1) as u64,
            );
        }
        ctx.stats = Some(stats.clone());
    }
}

enum Step {
    Forward(Bytes),
    Drop,
    /// An error event: the provider failed mid-answer.
    Cut,
}

fn sse(event: Option<&str>, data: &Value) -> Bytes {
    switchyard_llm::sse::encode_event(event, &data.to_string())
}

/// Drops leading whitespace of a continuation while `skip_ws` holds.
fn skip_leading_ws(seg: &mut Segment, text: &str) -> String {
    if !seg.skip_ws {
        return text.to_string();
    }
    let t = text.trim_start();
    if !t.is_empty() {
        seg.skip_ws = false;
    }
    t.to_string()
}

/// One OpenAI chat chunk.
fn chat_event(seen: &mut Seen, mut seg: Option<&mut Segment>, ev: &SseEvent) -> Step {
    if ev.is_done() {
        seen.done = true;
        return Step::Forward(ev.raw.clone());
    }
    let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(&ev.data) else {
        return Step::Forward(ev.raw.clone());
    };
    if chunk.contains_key("error") {
        return Step::Cut;
    }
    let resumed = seg.is_some();
    if !resumed {
        for (k, slot) in [
            ("id", &mut seen.id),
            ("created", &mut seen.created),
            ("model", &mut seen.model),
            ("system_fingerprint", &mut seen.fingerprint),
        ] {
            if slot.is_none() {
                *slot = chunk.get(k).cloned();
            }
        }
    }
    let mut keep = true;
    if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
        keep = choices.is_empty();
        for choice in choices.iter_mut() {
            if choice.get("index").and_then(Value::as_u64).unwrap_or(0) != 0 {
                seen.unresumable.get_or_insert("multiple_choices");
            }
            let finish = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            seen.finished |= finish;
            let logprobs = choice.get("logprobs").is_some_and(|l| !l.is_null());
            let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                keep = true;
                continue;
            };
            if delta
                .get("tool_calls")
                .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
                || delta.get("function_call").is_some_and(|f| !f.is_null())
            {
                seen.unresumable.get_or_insert("tool_call");
            }
            for k in ["reasoning_content", "reasoning"] {
                if delta
                    .get(k)
                    .and_then(Value::as_str)
                    .is_some_and(|r| !r.is_empty())
                {
                    seen.unresumable.get_or_insert("reasoning");
                }
            }
            if let Some(seg) = seg.as_deref_mut() {
                // No second preamble: the client had its role chunk.
                delta.remove("role");
                if let Some(text) = delta.get("content").and_then(Value::as_str) {
                    let text = skip_leading_ws(seg, text);
                    delta.insert("content".into(), Value::String(text));
                }
            }
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                seen.text.push_str(text);
            }
            let empty = delta
                .values()
                .all(|v| v.is_null() || v.as_str().is_some_and(str::is_empty));
            keep |= !empty || finish || logprobs;
        }
    }
    if !resumed {
        // The first stream goes out byte for byte; only watched.
        return Step::Forward(ev.raw.clone());
    }
    if !keep && chunk.get("usage").is_none_or(Value::is_null) {
        return Step::Drop;
    }
    // A resumed chunk takes the identity of the answer the client has.
    for (k, v) in [
        ("id", &seen.id),
        ("created", &seen.created),
        ("model", &seen.model),
        ("system_fingerprint", &seen.fingerprint),
    ] {
        match v {
            Some(v) => {
                chunk.insert(k.into(), v.clone());
            }
            None => {
                chunk.remove(k);
            }
        }
    }
    Step::Forward(sse(None, &Value::Object(chunk)))
}

/// One Anthropic Messages event.
fn messages_event(seen: &mut Seen, seg: Option<&mut Segment>, ev: &SseEvent) -> Step {
    let Ok(Value::Object(mut data)) = serde_json::from_str::<Value>(&ev.data) else {
        return Step::Forward(ev.raw.clone());
    };
    let kind = data
        .get("type")
        .and_then(Value::as_str)
        .or(ev.event.as_deref())
        .unwrap_or("")
        .to_string();
    if kind == "error" {
        return Step::Cut;
    }
    let index = data.get("index").and_then(Value::as_u64);
    match kind.as_str() {
        "content_block_start" => {
            let block = data
                .get("content_block")
                .and_then(|b| b.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            match block {
                "text" => {}
                "tool_use" | "server_tool_use" => {
                    seen.unresumable.get_or_insert("tool_call");
                }
                "thinking" | "redacted_thinking" => {
                    seen.unresumable.get_or_insert("reasoning");
                }
                _ => {
                    seen.unresumable.get_or_insert("non_text_block");
                }
            }
        }
        "content_block_delta" => {
            let delta_type = data
                .get("delta")
                .and_then(|d| d.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if delta_type != "text_delta" {
                seen.unresumable.get_or_insert("non_text_block");
            }
        }
        "message_delta" => seen.finished = true,
        _ => {}
    }
    let Some(seg) = seg else {
        // The first stream goes out byte for byte; only watched.
        match kind.as_str() {
            "content_block_start" => {
                if let Some(i) = index {
                    let is_text = data
                        .get("content_block")
                        .and_then(|b| b.get("type"))
                        .and_then(Value::as_str)
                        == Some("text");
                    seen.open_text = is_text.then_some(i);
                    seen.next_index = seen.next_index.max(i + 1);
                }
            }
            "content_block_delta" => {
                if let Some(t) = data
                    .get("delta")
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                {
                    seen.text.push_str(t);
                }
            }
            "content_block_stop" if index.is_some() && seen.open_text == index => {
                seen.open_text = None;
            }
            "message_stop" => seen.done = true,
            _ => {}
        }
        return Step::Forward(ev.raw.clone());
    };
    match kind.as_str() {
        // No second preamble: the client has its message, id and usage.
        "message_start" => return Step::Drop,
        "content_block_start" => {
            let Some(i) = index else {
                return Step::Drop;
            };
            if seg.offset.is_none() {
                let is_text = data
                    .get("content_block")
                    .and_then(|b| b.get("type"))
                    .and_then(Value::as_str)
                    == Some("text");
                match (seg.merge_first, is_text) {
                    (Some(open), true) => {
                        seg.offset = Some(open as i64 - i as i64);
                        return Step::Drop;
                    }
                    (Some(open), false) => {
                        // The open text block ends before anything else
                        // starts, as the protocol requires.
                        seen.open_text = None;
                        seg.offset = Some(seen.next_index as i64 - i as i64);
                        let stop = sse(
                            Some("content_block_stop"),
                            &json!({"type": "content_block_stop", "index": open}),
                        );
                        let mapped = seen.next_index;
                        seen.next_index += 1;
                        data.insert("index".into(), json!(mapped));
                        let start = sse(Some(&kind), &Value::Object(data));
                        return Step::Forward(Bytes::from([stop, start].concat()));
                    }
                    (None, _) => seg.offset = Some(seen.next_index as i64 - i as i64),
                }
            }
            let mapped = (i as i64 + seg.offset.unwrap_or(0)).max(0) as u64;
            let is_text = data
                .get("content_block")
                .and_then(|b| b.get("type"))
                .and_then(Value::as_str)
                == Some("text");
            seen.open_text = is_text.then_some(mapped);
            seen.next_index = seen.next_index.max(mapped + 1);
            data.insert("index".into(), json!(mapped));
        }
        "content_block_delta" | "content_block_stop" => {
            let Some(i) = index else {
                return Step::Forward(ev.raw.clone());
            };
            let mapped = (i as i64 + seg.offset.unwrap_or(0)).max(0) as u64;
            data.insert("index".into(), json!(mapped));
            if kind == "content_block_stop" {
                if seen.open_text == Some(mapped) {
                    seen.open_text = None;
                }
            } else if let Some(delta) = data.get_mut("delta").and_then(Value::as_object_mut) {
                if let Some(t) = delta.get("text").and_then(Value::as_str) {
                    let t = skip_leading_ws(seg, t);
                    if t.is_empty() {
                        return Step::Drop;
                    }
                    seen.text.push_str(&t);
                    delta.insert("text".into(), Value::String(t));
                }
            }
        }
        "message_stop" => seen.done = true,
        _ => {}
    }
    Step::Forward(sse(Some(&kind), &Value::Object(data)))
}

/// The request again, with `text` (what the client has) as the assistant's
/// answer to continue, in the target's prefill style; whether trailing
/// whitespace was cut from it. `None` when the style cannot carry it.
fn prefilled(op: &Operation, text: &str, style: Prefill) -> Option<(Operation, bool)> {
    // Anthropic refuses a final assistant turn ending in whitespace.
    let (text, trimmed) = match style {
        Prefill::TrailingAssistant => {
            let t = text.trim_end();
            (t, t.len() != text.len())
        }
        _ => (text, false),
    };
    let chat_with = |chat: &switchyard_llm::openai::ChatRequest| {
        let mut chat = chat.clone();
        if !text.is_empty() {
            let messages = chat
                .body_mut()
                .entry("messages")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(list) = messages.as_array_mut() {
                append_assistant(list, text, false);
                if let Some(Value::Object(last)) = list.last_mut() {
                    if style == Prefill::Prefix {
                        last.insert("prefix".into(), Value::Bool(true));
                    }
                }
            }
            if style == Prefill::ContinueFinalMessage {
                let body = chat.body_mut();
                body.insert("continue_final_message".into(), Value::Bool(true));
                body.insert("add_generation_prompt".into(), Value::Bool(false));
            }
        }
        chat
    };
    let op = match op {
        Operation::Chat(chat) => Operation::Chat(chat_with(chat)),
        Operation::Messages { body, chat } => {
            let mut body = body.clone();
            if !text.is_empty() {
                if let Some(list) = body.get_mut("messages").and_then(Value::as_array_mut) {
                    append_assistant(list, text, true);
                }
            }
            Operation::Messages {
                body,
                chat: chat_with(chat),
            }
        }
        _ => return None,
    };
    Some((op, trimmed))
}

/// Appends `text` to the conversation as the assistant's: to the caller's
/// own trailing assistant message when there is one (its prefill and our
/// text are one answer), else as a new message.
fn append_assistant(list: &mut Vec<Value>, text: &str, anthropic_blocks: bool) {
    if let Some(Value::Object(last)) = list.last_mut() {
        if last.get("role").and_then(Value::as_str) == Some("assistant")
            && last.get("tool_calls").is_none()
        {
            match last.get_mut("content") {
                Some(Value::String(s)) => {
                    s.push_str(text);
                    return;
                }
                Some(Value::Array(parts)) => {
                    if let Some(Value::Object(p)) = parts.last_mut() {
                        if p.get("type").and_then(Value::as_str) == Some("text") {
                            if let Some(Value::String(s)) = p.get_mut("text") {
                                s.push_str(text);
                                return;
                            }
                        }
                    }
                    parts.push(json!({"type": "text", "text": text}));
                    return;
                }
                _ => {}
            }
        }
    }
    if anthropic_blocks {
        list.push(json!({"role": "assistant", "content": [{"type": "text", "text": text}]}));
    } else {
        list.push(json!({"role": "assistant", "content": text}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_llm::openai::ChatRequest;

    fn chat(messages: Value) -> ChatRequest {
        let body = json!({"model": "m", "stream": true, "messages": messages});
        ChatRequest::from_map(body.as_object().unwrap().clone()).unwrap()
    }

    fn last(op: &Operation) -> (Value, Value) {
        match op {
            Operation::Chat(c) => (c.messages().last().unwrap().clone(), Value::Null),
            Operation::Messages { body, chat } => (
                chat.messages().last().unwrap().clone(),
                body["messages"].as_array().unwrap().last().unwrap().clone(),
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn each_prefill_style_carries_the_text_as_the_assistants() {
        let op = Operation::Chat(chat(json!([{"role": "user", "content": "q"}])));
        let (p, _) = prefilled(&op, "Hello ", Prefill::Prefix).unwrap();
        assert_eq!(
            last(&p).0,
            json!({"role": "assistant", "content": "Hello ", "prefix": true})
        );
        let (p, trimmed) = prefilled(&op, "Hello ", Prefill::TrailingAssistant).unwrap();
        assert!(trimmed, "Anthropic refuses trailing whitespace");
        assert_eq!(last(&p).0, json!({"role": "assistant", "content": "Hello"}));
        let (p, _) = prefilled(&op, "Hi", Prefill::ContinueFinalMessage).unwrap();
        let Operation::Chat(c) = &p else { panic!() };
        assert_eq!(c.body()["continue_final_message"], true);
        assert_eq!(c.body()["add_generation_prompt"], false);
        // Nothing emitted yet: the request as it was.
        let (p, _) = prefilled(&op, "", Prefill::Prefix).unwrap();
        assert_eq!(last(&p).0["role"], "user");
    }

    #[test]
    fn a_callers_own_prefill_is_extended_not_followed_by_a_second() {
        let body = json!({"model": "m", "max_tokens": 9, "stream": true, "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "{\"a\":"}]}]});
        let body = body.as_object().unwrap().clone();
        let chat = switchyard_llm::anthropic::messages_to_openai(body.clone()).unwrap();
        let op = Operation::Messages { body, chat };
        let (p, _) = prefilled(&op, " 1", Prefill::TrailingAssistant).unwrap();
        let (hub, native) = last(&p);
        assert_eq!(
            native,
            json!({"role": "assistant", "content": [{"type": "text", "text": "{\"a\": 1"}]})
        );
        assert_eq!(hub["role"], "assistant");
        let Operation::Messages { body, .. } = &p else {
            panic!()
        };
        assert_eq!(body["messages"].as_array().unwrap().len(), 2);
    }

    fn event(name: &str, data: Value) -> SseEvent {
        let raw = sse(Some(name), &data);
        SseEvent {
            event: Some(name.into()),
            data: data.to_string(),
            raw,
        }
    }

    fn out(step: Step) -> String {
        match step {
            Step::Forward(b) => String::from_utf8(b.to_vec()).unwrap(),
            Step::Drop => String::new(),
            Step::Cut => "CUT".into(),
        }
    }

    #[test]
    fn a_resumed_messages_stream_joins_the_open_block_and_drops_the_whitespace_the_prefill_lost() {
        let mut seen = Seen::default();
        for e in [
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1"}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello "}}),
            ),
        ] {
            assert!(!out(messages_event(&mut seen, None, &e)).is_empty());
        }
        let cut = event(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error"}}),
        );
        assert_eq!(out(messages_event(&mut seen, None, &cut)), "CUT");
        assert_eq!((seen.text.as_str(), seen.open_text), ("Hello ", Some(0)));

        let mut seg = Segment {
            skip_ws: true,
            merge_first: seen.open_text,
            ..Segment::default()
        };
        let resumed = [
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_2"}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " "}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}}),
            ),
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
            ),
        ];
        let outs: Vec<String> = resumed
            .iter()
            .map(|e| out(messages_event(&mut seen, Some(&mut seg), e)))
            .collect();
        assert_eq!(outs[0], "", "no second message_start");
        assert_eq!(outs[1], "", "the open block continues");
        assert_eq!(outs[2], "", "whitespace the client already has");
        assert!(outs[3].contains("\"text\":\"world\""), "{}", outs[3]);
        assert!(outs[4].contains("\"index\":0"));
        assert!(outs[5].contains("\"index\":1") && outs[5].contains("tool_use"));
        assert_eq!(seen.text, "Hello world");
        assert_eq!(seen.unresumable, Some("tool_call"));
    }

    #[test]
    fn a_resumed_block_of_another_kind_closes_the_open_text_block_first() {
        let mut seen = Seen {
            open_text: Some(0),
            next_index: 1,
            ..Seen::default()
        };
        let mut seg = Segment {
            merge_first: Some(0),
            ..Segment::default()
        };
        let e = event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}}}),
        );
        let o = out(messages_event(&mut seen, Some(&mut seg), &e));
        let stop = o.find("content_block_stop").unwrap();
        let start = o.find("\"index\":1").unwrap();
        assert!(stop < start, "{o}");
    }

    #[test]
    fn resumed_chat_chunks_take_the_first_streams_identity_and_lose_their_role() {
        let mut seen = Seen::default();
        let first = |d: Value| SseEvent {
            event: None,
            data: d.to_string(),
            raw: sse(None, &d),
        };
        let e = first(
            json!({"id": "a", "created": 1, "model": "m1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": null}]}),
        );
        assert_eq!(
            out(chat_event(&mut seen, None, &e)),
            out(Step::Forward(e.raw.clone()))
        );
        let mut seg = Segment::default();
        let role = first(
            json!({"id": "b", "created": 2, "model": "m2", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
        );
        assert_eq!(out(chat_event(&mut seen, Some(&mut seg), &role)), "");
        let text = first(
            json!({"id": "b", "created": 2, "model": "m2", "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": null}]}),
        );
        let o = out(chat_event(&mut seen, Some(&mut seg), &text));
        assert!(
            o.contains("\"id\":\"a\"")
                && o.contains("\"model\":\"m1\"")
                && o.contains("\"created\":1"),
            "{o}"
        );
        assert!(!o.contains("system_fingerprint"), "{o}");
        assert_eq!(seen.text, "Hi there");
        let error = first(json!({"error": {"message": "cut"}}));
        assert_eq!(out(chat_event(&mut seen, Some(&mut seg), &error)), "CUT");
    }
}
