//! The egress node's request executor: key choice, provider call with
//! deadlines, and the response stream with accounting.
//!
//! Every attempt feeds the node's health board ([`Health`]): the target's
//! and the key's outcome and latency, keys in flight, and what the
//! provider's rate-limit headers say about each key. The key for an
//! attempt is chosen from the board ([`pick_key`]); a key the provider
//! refuses (401/403) is disabled and one it rate-limits (429) cools down,
//! and when the pool has another usable key the same request is tried
//! with it at once: the provider rejected it, so it was not executed. When
//! every key of the pool is out, the request is answered at once with
//! `key_pool_exhausted` (429, its `retry-after` the time until the first
//! key is back) without calling the provider, and the edge moves on to
//! another target.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
// Pingora's timer: tokio's wakes its timer driver when a new deadline is
// registered from another worker, a thread wake-up per request.
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use pingora_timeout::fast_timeout::fast_timeout;
use switchyard_llm::{ErrorKind, GatewayError, Source};
use switchyard_proto::health::{self, Entry, InFlight, Outcome, RateLimits};
use switchyard_proto::{Health, ProviderSnapshot, ResolvedKey, Snapshot};

use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest};
use switchyard_llm::responses::{self, RequestEcho};
use switchyard_llm::translate::{Chain, StreamTranslator};
use switchyard_llm::{anthropic, completions, gemini_native, tokens};
use switchyard_proto::ProviderKind;

use crate::discovery::Discovery;
use crate::providers::raw::{self, RawBody};
use crate::providers::{adapter_for, faults, pick_key, CallContext, KeyPick, ProviderReply};
use crate::request::{
    EgressRequest, EgressResponse, Operation, RequestStats, ResponseBody, EVENT_STREAM, JSON,
};
use crate::stream::{error_framer, first_frame, openai_error_frame, raw_stream, translate_stream};

/// The snapshot every component of a node reads; swapped whole on change.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

pub struct Egress {
    snapshot: SharedSnapshot,
    client: crate::upstream::UpstreamClient,
    /// Where ties between equally loaded keys start, so an idle pool rotates.
    key_cursor: AtomicUsize,
    health: Arc<Health>,
    discovery: Arc<Discovery>,
    /// Off when the board is shared with an in-process edge, which books
    /// targets itself: each attempt must count once.
    record_targets: bool,
    /// This node's name, reported with every answer (ledger, access log).
    node_name: Arc<str>,
    /// Where provider-call spans go, when traces are exported.
    otlp: Option<Arc<crate::otlp::Exporter>>,
}

/// The key chosen for one attempt, counted in flight while it is held.
struct KeyAttempt<'a> {
    index: usize,
    key: &'a ResolvedKey,
    entry: Option<Arc<Entry>>,
    guard: Option<InFlight>,
    /// Held while the attempt is a half-open probe of the key's breaker.
    _probe: Option<health::Probe>,
}

impl Egress {
    pub fn new(snapshot: SharedSnapshot) -> Result<Self, crate::upstream::ClientError> {
        Self::with_health(snapshot, Arc::new(Health::new()))
    }

    /// An egress that records into (and picks keys from) a board shared
    /// with the rest of the node.
    pub fn with_health(
        snapshot: SharedSnapshot,
        health: Arc<Health>,
    ) -> Result<Self, crate::upstream::ClientError> {
        // One resolver (and so one DNS cache) for both clients.
        let resolver = crate::dns::HickoryResolver::from_system()?;
        let client = crate::upstream::UpstreamClient::new(resolver.clone())?;
        // Model lists are fetched rarely and with a deadline of their own:
        // reqwest's conveniences are worth their cost there.
        let lists = crate::upstream::build_client(resolver)?;
        Ok(Egress {
            discovery: Arc::new(Discovery::new(snapshot.clone(), lists)),
            snapshot,
            client,
            key_cursor: AtomicUsize::new(0),
            health,
            record_targets: true,
            node_name: "egress".into(),
            otlp: None,
        })
    }

    /// Exports a span per provider call to this OTLP exporter.
    pub fn with_otlp(mut self, exporter: Option<Arc<crate::otlp::Exporter>>) -> Self {
        self.otlp = exporter;
        self
    }

    /// Names the node in what every answer reports (the ledger's `egress`).
    pub fn with_node_name(mut self, name: &str) -> Self {
        self.node_name = name.into();
        self
    }

    /// The providers' own model lists, as this node's keys see them.
    pub fn discovery(&self) -> &Arc<Discovery> {
        &self.discovery
    }

    /// An egress inside the edge's process (`switchyard dev`) on the edge's
    /// own board: keys are booked here, targets by the edge, and the edge's
    /// metrics show the key events.
    pub fn sharing_edge_health(
        snapshot: SharedSnapshot,
        health: Arc<Health>,
    ) -> Result<Self, crate::upstream::ClientError> {
        let mut egress = Self::with_health(snapshot, health)?;
        egress.record_targets = false;
        Ok(egress)
    }

    /// The node's health board as this egress feeds it.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The key for the next attempt, booked against its minute and counted
    /// in flight; `Ok(None)` when the provider has no key here.
    fn choose_key<'a>(
        &self,
        provider: &'a ProviderSnapshot,
        model: &str,
        start: usize,
        tried: &[usize],
        tokens: u64,
    ) -> Result<Option<KeyAttempt<'a>>, GatewayError> {
        let now = Instant::now();
        let index = match pick_key(
            &provider.keys,
            &self.health,
            &provider.name,
            model,
            start,
            tried,
            tokens,
            now,
        ) {
            KeyPick::Key(i) => i,
            KeyPick::NoKey => return Ok(None),
            KeyPick::Exhausted { until } => return Err(self.pool_exhausted(provider, until, now)),
        };
        let key = &provider.keys[index];
        let entry = self.health.key(&key.health_id(&provider.name, model));
        let mut probe = None;
        if let Some(e) = &entry {
            self.health.book(e, 1, tokens, now);
            // A breaker due for its probe goes half-open with this attempt;
            // without a free slot the attempt goes ahead as the pool's
            // choice (the board raced with another request).
            if let Ok(Some((p, transition))) = self.health.try_probe(e, now) {
                if let Some(t) = transition {
                    tracing::info!(
                        target: "switchyard::breaker",
                        event = "breaker",
                        scope = "key",
                        provider = %provider.name,
                        pool = %key.pool,
                        key = %key.id,
                        state = t.label(),
                        "key breaker changed state"
                    );
                }
                probe = Some(p);
            }
        }
        let guard = entry.as_ref().map(|e| e.start());
        Ok(Some(KeyAttempt {
            index,
            key,
            entry,
            guard,
            _probe: probe,
        }))
    }

    fn pool_exhausted(
        &self,
        provider: &ProviderSnapshot,
        until: Option<Instant>,
        now: Instant,
    ) -> GatewayError {
        self.health.pool_exhausted();
        let wait = until.map(|u| u.saturating_duration_since(now));
        tracing::warn!(
            target: "switchyard::keys",
            event = "pool_exhausted",
            provider = %provider.name,
            keys = provider.keys.len(),
            back_in_ms = wait.map(|w| w.as_millis() as u64),
            "every key of the pool is cooling down, out of quota or refused; not calling the provider"
        );
        let err = GatewayError::new(
            ErrorKind::RateLimited,
            format!(
                "Every key of the provider `{}` is rate-limited or refused right now.",
                provider.name
            ),
        )
        .with_code("key_pool_exhausted")
        .with_source(Source::Key)
        // The provider was not called: anything else may be tried.
        .with_retry(switchyard_llm::Retry::AnotherTarget);
        match wait {
            Some(w) => err.with_retry_after(Some(w.as_secs_f64().ceil().max(1.0).to_string())),
            None => err,
        }
    }

    /// Books a failed attempt on its key; true when the pool may serve the
    /// same request with another key.
    fn key_failed(&self, provider: &str, attempt: &KeyAttempt<'_>, e: &GatewayError) -> bool {
        let Some(entry) = &attempt.entry else {
            return e.may_try_another_key();
        };
        let now = Instant::now();
        if e.source == Source::Key {
            self.health.refuse(entry, attempt.key.fingerprint, now);
            self.key_outcome(provider, attempt, Outcome::Failure, now);
            tracing::warn!(
                target: "switchyard::keys",
                event = "key_disabled",
                provider,
                pool = %attempt.key.pool,
                key = %attempt.key.id,
                "the provider refused the key (401/403); it is left out until its value changes"
            );
            return e.may_try_another_key();
        }
        if e.kind == ErrorKind::RateLimited {
            self.rate_limited(provider, attempt, e.retry_after.as_deref(), now);
            return true;
        }
        false
    }

    fn rate_limited(
        &self,
        provider: &str,
        attempt: &KeyAttempt<'_>,
        retry_after: Option<&str>,
        now: Instant,
    ) {
        let Some(entry) = &attempt.entry else { return };
        let wait =
            self.health
                .rate_limited(entry, retry_after.and_then(health::parse_retry_after), now);
        self.key_outcome(provider, attempt, Outcome::Failure, now);
        tracing::info!(
            target: "switchyard::keys",
            event = "key_cooldown",
            provider,
            pool = %attempt.key.pool,
            key = %attempt.key.id,
            cooldown_ms = wait.as_millis() as u64,
            "the provider rate-limited the key; it cools down"
        );
    }

    /// Books an outcome on the key, reporting its breaker's changes.
    fn key_outcome(
        &self,
        provider: &str,
        attempt: &KeyAttempt<'_>,
        outcome: Outcome,
        now: Instant,
    ) {
        let Some(entry) = &attempt.entry else { return };
        if let Some(t) = self.health.record(entry, outcome, now) {
            if matches!(t, health::Transition::Opened(_)) {
                self.health
                    .events()
                    .key_breaker_opened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(
                target: "switchyard::breaker",
                event = "breaker",
                scope = "key",
                provider,
                pool = %attempt.key.pool,
                key = %attempt.key.id,
                state = t.label(),
                "key breaker changed state"
            );
        }
    }

    /// What the provider's rate-limit headers say goes to the key's entry.
    fn limits_observer(
        &self,
        attempt: Option<&KeyAttempt<'_>>,
    ) -> Option<impl Fn(&RateLimits) + Send + Sync + 'static> {
        let entry = attempt?.entry.clone()?;
        let health = self.health.clone();
        Some(move |l: &RateLimits| health.observe_limits(&entry, l, Instant::now()))
    }

    /// Runs one request against its target. The future may be dropped at any
    /// point (client gone); dropping it, or the returned stream, closes the
    /// upstream request.
    pub async fn execute(&self, mut req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        // The provider call is a span of its own inside the edge's attempt.
        let parent = req.trace;
        req.trace = req.trace.map(|t| t.child());
        let span = match (&self.otlp, &req.trace) {
            (Some(exporter), Some(ctx)) => Some(CallSpan {
                exporter: exporter.clone(),
                span: Some(
                    crate::otlp::Span::new(
                        "egress.provider_call",
                        crate::otlp::Kind::Client,
                        ctx,
                        parent.map(|p| p.span_id),
                        std::time::SystemTime::now(),
                    )
                    .str("switchyard.node", &self.node_name)
                    .str("switchyard.provider", &req.target.provider)
                    .str("gen_ai.request.model", &req.target.model),
                ),
                stats: None,
                error: None,
            }),
            _ => None,
        };
        let result = self.execute_inner(req).await;
        let Some(mut span) = span else { return result };
        match result {
            Ok(mut response) => {
                span.stats = Some(response.stats.clone());
                // A stream's span ends with the stream.
                response.body = match response.body {
                    ResponseBody::Stream(s) => ResponseBody::Stream(hold(s, span)),
                    full => full,
                };
                Ok(response)
            }
            Err(e) => {
                span.error = Some(e.code.unwrap_or(e.kind.label()));
                Err(e)
            }
        }
    }

    async fn execute_inner(&self, req: EgressRequest) -> Result<EgressResponse, GatewayError> {
        let snap = self.snapshot.load_full();
        let provider = snap.providers().get(&req.target.provider).ok_or_else(|| {
            GatewayError::model_not_found(&format!("{}/{}", req.target.provider, req.target.model))
        })?;
        if !req.residency.is_empty()
            && !provider
                .jurisdiction
                .as_ref()
                .is_some_and(|j| req.residency.contains(j))
        {
            // Defence in depth: the edge never plans such a target.
            return Err(GatewayError::new(
                ErrorKind::Forbidden,
                format!(
                    "Residency rule: this request must stay in jurisdiction(s) {}; provider `{}` is in {}.",
                    req.residency.join(", "),
                    provider.name,
                    provider.jurisdiction.as_deref().unwrap_or("no known jurisdiction")
                ),
            )
            .with_code("residency_violation"));
        }
        // A malformed fault directive is the caller's error, whatever state
        // the pool is in: checked before a key is chosen.
        if provider.kind != ProviderKind::Simulated {
            if let Some(directives) = req.simulate.as_deref() {
                crate::providers::simulated::parse_directives(directives)?;
            }
        }
        let stats = Arc::new(RequestStats::default());
        stats.set_egress_node(self.node_name.clone());
        let start = self.key_cursor.fetch_add(1, Ordering::Relaxed);
        let tokens = req.op.estimated_prompt_tokens();
        let target_entry = self
            .record_targets
            .then(|| {
                self.health.target(&health::target_id(
                    &provider.name,
                    &req.target.model,
                    provider.region.as_deref(),
                ))
            })
            .flatten();
        let target_guard = target_entry.as_ref().map(|e| e.start());
        let started = Instant::now();
        let deadline = started + snap.limits().upstream_timeout;
        let record_target = |outcome: Result<(), &GatewayError>| {
            let Some(entry) = &target_entry else { return };
            let now = Instant::now();
            let outcome = match outcome {
                Ok(()) => Outcome::Success {
                    latency: now.saturating_duration_since(started),
                },
                // Only failures that say something about the target count.
                Err(e) if matches!(e.source, Source::Provider | Source::Key) => Outcome::Failure,
                Err(_) => return,
            };
            // The edge plans; the egress's own target breakers are
            // informational, so their changes are not reported here.
            let _ = self.health.record(entry, outcome, now);
        };
        let timeout_error = || {
            GatewayError::new(
                ErrorKind::Timeout,
                format!(
                    "The provider `{}` did not answer within {} ms.",
                    provider.name,
                    snap.limits().upstream_timeout.as_millis()
                ),
            )
        };

        if let Operation::Raw(raw) = &req.op {
            // Raw answers pass through as the provider sent them, so a
            // refused or limited key is booked but the request not retried.
            let attempt = self.choose_key(provider, &req.target.model, start, &[], tokens)?;
            let observer = self.limits_observer(attempt.as_ref());
            let ctx = CallContext {
                client: &self.client,
                provider,
                key: attempt.as_ref().map(|a| &a.key.secret),
                request: &req,
                limits: snap.limits(),
                on_limits: observer
                    .as_ref()
                    .map(|f| f as &(dyn Fn(&RateLimits) + Send + Sync)),
            };
            let call_started = Instant::now();
            let reply = match fast_timeout(left(deadline), raw::call(&ctx, raw)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    if let Some(a) = &attempt {
                        self.key_failed(&provider.name, a, &e);
                    }
                    record_target(Err(&e));
                    return Err(e);
                }
                Err(_) => {
                    let e = timeout_error();
                    record_target(Err(&e));
                    return Err(e);
                }
            };
            if let Some(a) = &attempt {
                let now = Instant::now();
                if reply.status == 429 {
                    self.rate_limited(&provider.name, a, reply.retry_after.as_deref(), now);
                } else if reply.status < 400 {
                    let latency = now.saturating_duration_since(started);
                    self.key_outcome(&provider.name, a, Outcome::Success { latency }, now);
                }
            }
            if reply.status < 400 {
                record_target(Ok(()));
            }
            stats.set_upstream_wait(call_started.elapsed());
            if let Some(a) = &attempt {
                stats.set_key(a.key.pool.clone(), a.key.id.clone());
            }
            let held = (target_guard, attempt.and_then(|a| a.guard));
            let body = match reply.body {
                RawBody::Full(b) => {
                    stats.mark_first_byte(req.received_at);
                    ResponseBody::Full(b)
                }
                RawBody::Stream(s) => ResponseBody::Stream(hold(
                    raw_stream(
                        s,
                        snap.limits().stream_idle_timeout,
                        stats.clone(),
                        req.received_at,
                    ),
                    held,
                )),
            };
            return Ok(EgressResponse {
                status: reply.status,
                content_type: reply.content_type,
                retry_after: reply.retry_after,
                body,
                stats,
            });
        }

        if let Some(body) = local_count(&req.op, provider.kind) {
            // No counting endpoint at this provider: counted here, and no
            // key or provider call is spent on it.
            stats.mark_first_byte(req.received_at);
            return Ok(EgressResponse {
                status: 200,
                content_type: JSON.to_string(),
                retry_after: None,
                body: ResponseBody::Full(body),
                stats,
            });
        }
        let adapter = adapter_for(provider.kind);
        // A caller whose protocol the provider does not speak goes through
        // the hub: caller's protocol → OpenAI chat → provider, and back.
        let (hub, back) = hub_route(&req.op, provider)?;
        let hub_req;
        let call_req = match hub {
            Some(op) => {
                hub_req = EgressRequest { op, ..req.clone() };
                &hub_req
            }
            None => &req,
        };
        // Each key at most once; the deadline covers every attempt.
        let mut tried: Vec<usize> = Vec::new();
        let mut last_error: Option<GatewayError> = None;
        let mut call_started: Instant;
        let (reply, attempt) = loop {
            let attempt = match self.choose_key(provider, &req.target.model, start, &tried, tokens)
            {
                Ok(a) => a,
                // Keys were tried and the rest are out: the provider's own
                // answer says more than "exhausted".
                Err(exhausted) => {
                    let e = last_error.take().unwrap_or(exhausted);
                    record_target(Err(&e));
                    return Err(e);
                }
            };
            let observer = self.limits_observer(attempt.as_ref());
            let ctx = CallContext {
                client: &self.client,
                provider,
                key: attempt.as_ref().map(|a| &a.key.secret),
                request: call_req,
                limits: snap.limits(),
                on_limits: observer
                    .as_ref()
                    .map(|f| f as &(dyn Fn(&RateLimits) + Send + Sync)),
            };
            call_started = Instant::now();
            match fast_timeout(left(deadline), faults::call(adapter, ctx)).await {
                Ok(Ok(reply)) => break (reply, attempt),
                Ok(Err(e)) => {
                    let another = attempt.as_ref().is_some_and(|a| {
                        tried.push(a.index);
                        self.key_failed(&provider.name, a, &e)
                    });
                    let untried = provider.keys.len() > tried.len();
                    if another && untried {
                        tracing::info!(
                            target: "switchyard::keys",
                            event = "key_retry",
                            request_id = %req.request_id,
                            provider = %provider.name,
                            key = attempt.as_ref().map_or("", |a| &*a.key.id),
                            source = e.source.label(),
                            "the provider refused or rate-limited the key; trying another key of the pool"
                        );
                        last_error = Some(e);
                        continue;
                    }
                    record_target(Err(&e));
                    return Err(e);
                }
                Err(_) => {
                    let e = timeout_error();
                    record_target(Err(&e));
                    return Err(e);
                }
            }
        };
        record_target(Ok(()));
        if let Some(a) = &attempt {
            stats.set_key(a.key.pool.clone(), a.key.id.clone());
            let now = Instant::now();
            let latency = now.saturating_duration_since(started);
            self.key_outcome(&provider.name, a, Outcome::Success { latency }, now);
        }
        // The answer's own tokens count against the key's minute once known.
        let completion =
            attempt
                .as_ref()
                .and_then(|a| a.entry.clone())
                .map(|entry| BookCompletion {
                    health: self.health.clone(),
                    entry,
                    stats: stats.clone(),
                });
        let held = (target_guard, attempt.and_then(|a| a.guard), completion);
        let model = &req.target.model;
        match reply {
            ProviderReply::Json { body, usage } => {
                stats.mark_first_byte(req.received_at);
                stats.set_upstream_wait(call_started.elapsed());
                if let Some(u) = usage {
                    stats.set_usage(u);
                }
                let body = match &back {
                    // The adapter already answers in the hub's (OpenAI chat)
                    // shape: re-parsing and re-serialising it cost a third
                    // more instructions per chat request for nothing.
                    Back::Native | Back::Hub => body,
                    back => {
                        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                            GatewayError::new(ErrorKind::Internal, format!("hub response: {e}"))
                        })?;
                        Bytes::from(back.response(&v, model).to_string())
                    }
                };
                Ok(EgressResponse {
                    status: 200,
                    content_type: JSON.to_string(),
                    retry_after: None,
                    body: ResponseBody::Full(body),
                    stats,
                })
            }
            ProviderReply::Stream {
                upstream,
                translator,
            } => {
                let translator: Box<dyn StreamTranslator> = match back.stream(model) {
                    Some(second) => Box::new(Chain::new(translator, second)),
                    None => translator,
                };
                let framer = error_framer(&req.op, req.inbound).unwrap_or(openai_error_frame);
                let frames = translate_stream(
                    upstream,
                    translator,
                    snap.limits().stream_idle_timeout,
                    stats.clone(),
                    req.received_at,
                    framer,
                );
                let frames = first_frame(frames, &stats).await?;
                stats.set_upstream_wait(call_started.elapsed());
                Ok(EgressResponse {
                    status: 200,
                    content_type: EVENT_STREAM.to_string(),
                    retry_after: None,
                    body: ResponseBody::Stream(hold(frames, held)),
                    stats,
                })
            }
        }
    }
}

/// How a hub answer goes back to the caller's protocol.
enum Back {
    /// The provider speaks the caller's protocol: nothing to translate.
    Native,
    /// The caller speaks the hub protocol (OpenAI chat).
    Hub,
    Anthropic,
    Responses(Box<RequestEcho>),
    Completions {
        caller_wants_usage: bool,
    },
    Gemini,
    GeminiEmbed {
        batch: bool,
    },
}

impl Back {
    fn response(&self, v: &serde_json::Value, model: &str) -> serde_json::Value {
        match self {
            Back::Native | Back::Hub => v.clone(),
            Back::Anthropic => anthropic::openai_response_to_messages(v, model),
            Back::Responses(echo) => responses::from_chat_response(v, model, echo),
            Back::Completions { .. } => completions::from_chat_response(v, model),
            Back::Gemini => gemini_native::from_chat_response(v, model),
            Back::GeminiEmbed { batch } => gemini_native::embed_from_openai(v, *batch),
        }
    }

    /// The second translator of the chain, after provider → hub chunks.
    fn stream(&self, model: &str) -> Option<Box<dyn StreamTranslator>> {
        match self {
            Back::Native | Back::Hub | Back::GeminiEmbed { .. } => None,
            Back::Anthropic => Some(Box::new(anthropic::MessagesStreamFromOpenAi::new(model))),
            Back::Responses(echo) => Some(Box::new(responses::ResponsesStreamFromChat::new(
                model,
                (**echo).clone(),
            ))),
            Back::Completions { caller_wants_usage } => Some(Box::new(
                completions::CompletionsStreamFromChat::new(model, *caller_wants_usage),
            )),
            Back::Gemini => Some(Box::new(gemini_native::GenerateStreamFromChat::new(model))),
        }
    }
}

/// The provider call's span, exported when the answer is over (dropped).
struct CallSpan {
    exporter: Arc<crate::otlp::Exporter>,
    span: Option<crate::otlp::Span>,
    stats: Option<Arc<RequestStats>>,
    error: Option<&'static str>,
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        let mut error = self.error;
        if let Some(stats) = &self.stats {
            if let Some((pool, key)) = stats.key() {
                span = span
                    .str("switchyard.key_pool", pool)
                    .str("switchyard.key_id", key);
            }
            if let Some(u) = stats.usage() {
                span = span
                    .int("gen_ai.usage.input_tokens", u.prompt_tokens as i64)
                    .int("gen_ai.usage.output_tokens", u.completion_tokens as i64);
            }
            if stats.stream_failed() {
                error = error.or(Some("stream_failed"));
            }
        }
        self.exporter
            .export(span.end(std::time::SystemTime::now(), error));
    }
}

/// Books an answer's completion tokens against its key's minute when the
/// answer is done (dropped), so policy `tpm` counts what was produced.
struct BookCompletion {
    health: Arc<Health>,
    entry: Arc<Entry>,
    stats: Arc<RequestStats>,
}

impl Drop for BookCompletion {
    fn drop(&mut self) {
        if let Some(u) = self.stats.usage() {
            self.health
                .book(&self.entry, 0, u.completion_tokens, Instant::now());
        }
    }
}

/// A token count answered by the egress itself, for providers without a
/// counting endpoint of the caller's protocol.
fn local_count(op: &Operation, kind: ProviderKind) -> Option<Bytes> {
    let body = match op {
        Operation::CountTokens { body } if kind != ProviderKind::Anthropic => {
            serde_json::json!({"input_tokens": tokens::anthropic_input_tokens(body)})
        }
        Operation::GeminiCountTokens { body, .. } if kind != ProviderKind::Gemini => {
            serde_json::json!({"totalTokens": tokens::gemini_input_tokens(body)})
        }
        _ => return None,
    };
    Some(Bytes::from(body.to_string()))
}

/// Whether `op` reaches `provider` natively or through the hub: the hub
/// operation to send instead (chat with usage always asked for, since the
/// caller's protocol accounts from it; or embeddings) and how the answer
/// goes back.
fn hub_route(
    op: &Operation,
    provider: &ProviderSnapshot,
) -> Result<(Option<Operation>, Back), GatewayError> {
    let with_usage = |mut chat: ChatRequest| {
        chat.include_usage = true;
        Operation::Chat(chat)
    };
    // What this provider cannot take (stored state, built-in tools) another
    // target of the plan may: the request is fine, the pairing is not, and
    // the target's health is not at stake.
    let elsewhere = |e: GatewayError| {
        e.with_source(Source::Client)
            .with_retry(switchyard_llm::Retry::AnotherTarget)
    };
    Ok(match op {
        Operation::Messages { chat, .. } if provider.kind != ProviderKind::Anthropic => {
            (Some(with_usage(chat.clone())), Back::Anthropic)
        }
        Operation::Generate(g) if provider.kind != ProviderKind::Gemini => (
            Some(with_usage(g.chat.clone().map_err(elsewhere)?)),
            Back::Gemini,
        ),
        Operation::Responses(r) if provider.kind != ProviderKind::OpenAi => {
            let chat = r.chat_for(&provider.name).map_err(elsewhere)?;
            (
                Some(with_usage(chat)),
                Back::Responses(Box::new(RequestEcho::new(&r.body))),
            )
        }
        Operation::Completions(c) if provider.kind != ProviderKind::OpenAi => {
            let chat = c.chat.clone().map_err(elsewhere)?;
            (
                Some(with_usage(chat)),
                Back::Completions {
                    caller_wants_usage: c.include_usage,
                },
            )
        }
        Operation::GeminiEmbed(e) if provider.kind != ProviderKind::Gemini => {
            let body = e.to_openai(&e.model);
            let embeddings =
                EmbeddingsRequest::parse(&serde_json::to_vec(&body).unwrap_or_default())?;
            (
                Some(Operation::Embeddings(embeddings)),
                Back::GeminiEmbed { batch: e.batch },
            )
        }
        Operation::Chat(_) | Operation::Embeddings(_) => (None, Back::Hub),
        _ => (None, Back::Native),
    })
}

/// Keeps `guard` (attempts counted in flight) alive as long as the stream:
/// a streamed answer occupies its target and key until it ends or is
/// dropped.
fn hold<G: Send + 'static>(
    stream: BoxStream<'static, Bytes>,
    guard: G,
) -> BoxStream<'static, Bytes> {
    stream
        .map(move |chunk| {
            let _held = &guard;
            chunk
        })
        .boxed()
}

/// Time left until `deadline` (zero once it has passed).
fn left(deadline: Instant) -> std::time::Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use switchyard_llm::openai::ChatRequest;
    use switchyard_proto::{KeySource, PoolKey, ProviderKind, RouteTarget, Secret};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::request::Protocol;

    /// An OpenAI-compatible mock on 127.0.0.1: refuses `sk-bad` with 401,
    /// answers every other key, and counts calls per key.
    async fn mock() -> (String, Arc<Mutex<HashMap<String, u32>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then the body by content-length.
                    loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        let key = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("authorization: bearer ")
                                    .map(str::to_string)
                            })
                            .unwrap_or_default();
                        *seen.lock().unwrap().entry(key.clone()).or_default() += 1;
                        let (status, body) = if key == "sk-bad" {
                            (
                                "401 Unauthorized",
                                r#"{"error":{"message":"bad key sk-bad"}}"#,
                            )
                        } else {
                            (
                                "200 OK",
                                r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                            )
                        };
                        let resp = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = sock.write_all(resp.as_bytes()).await;
                        buf.clear();
                    }
                });
            }
        });
        (format!("http://{addr}/v1"), calls)
    }

    fn snapshot(base_url: String) -> Snapshot {
        let key = |id: &str, value: &str| {
            ResolvedKey::new(
                "main",
                id,
                &PoolKey::new(0, KeySource::Env("K".into())),
                Secret::new(value),
            )
        };
        let mut s = Snapshot::builder();
        s.providers.insert(
            "p".into(),
            Arc::new(ProviderSnapshot {
                name: "p".into(),
                kind: ProviderKind::OpenAiCompatible,
                base_url,
                keys: vec![key("bad", "sk-bad"), key("good", "sk-good")],
                models: vec![],
                simulated: None,
                region: None,
                jurisdiction: None,
                pricing: HashMap::new(),
                prefill: Default::default(),
                key_pools: vec![],
            }),
        );
        s.build()
    }

    fn request() -> EgressRequest {
        let chat =
            ChatRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
                .unwrap();
        EgressRequest {
            request_id: "r".into(),
            tenant: "t".into(),
            target: RouteTarget {
                provider: "p".into(),
                model: "m".into(),
            },
            op: Operation::Chat(chat),
            simulate: None,
            received_at: std::time::Instant::now(),
            inbound: Protocol::OpenAi,
            forward_headers: Vec::new(),
            residency: Vec::new(),
            trace: None,
        }
    }

    #[tokio::test]
    async fn a_refused_key_is_retried_with_another_then_left_out() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, calls) = mock().await;
        let shared: SharedSnapshot = Arc::new(ArcSwap::from_pointee(snapshot(url)));
        let egress = Egress::new(shared).unwrap();
        for _ in 0..4 {
            let resp = tokio::time::timeout(Duration::from_secs(10), egress.execute(request()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status, 200);
        }
        let calls = calls.lock().unwrap().clone();
        // The bad key is met at most once (rotation may start on it), then
        // the board keeps it out; every request succeeds on the good key.
        assert_eq!(calls.get("sk-bad").copied().unwrap_or(0), 1, "{calls:?}");
        assert_eq!(calls.get("sk-good").copied(), Some(4), "{calls:?}");
        let h = egress.health();
        let bad = h
            .peek_key(&health::key_id("p", "main", "bad", "m"))
            .unwrap();
        let good = h
            .peek_key(&health::key_id("p", "main", "good", "m"))
            .unwrap();
        assert_eq!((bad.failures(), good.successes()), (1, 4));
        assert_eq!((bad.in_flight(), good.in_flight()), (0, 0));
        let target = h.peek_target(&health::target_id("p", "m", None)).unwrap();
        assert_eq!((target.successes(), target.failures()), (4, 0));
        assert!(target.latency().is_some());
    }
}
