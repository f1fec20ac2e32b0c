//! Frames on a backhaul stream, and the conversions between the wire
//! messages of `proto/backhaul.proto` and the egress's domain types.
//!
//! A frame is `[kind: u8][length: u32 big-endian][payload]`. The length
//! prefix lets the reader allocate exactly once per frame and refuse
//! oversized frames before reading them. The same checks are available
//! without a stream ([`split_frame`], [`inspect`]) for the fuzz target in
//! `backhaul/fuzz` and the bounded mutation run in the test suite.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use switchyard_llm::anthropic;
use switchyard_llm::completions::CompletionsRequest;
use switchyard_llm::gemini_native::{EmbedRequest, GenerateRequest};
use switchyard_llm::openai::{parse_json_object, ChatRequest, EmbeddingsRequest, Usage};
use switchyard_llm::responses::ResponsesRequest;
use switchyard_llm::{ErrorKind, GatewayError, Retry, Source};
use switchyard_proto::backhaul as wire;
use switchyard_proto::RouteTarget;

use crate::request::{EgressRequest, Operation, Protocol, RawRequest, RequestStats};

/// Protocol version carried in every request header.
pub const PROTOCOL_VERSION: u32 = 1;

/// Header frames hold metadata only; a larger one is a bug or an attack.
pub const MAX_HEADER_FRAME: usize = 1 << 20;
/// Data frames are provider chunks; a whole non-streamed body is split.
pub const MAX_DATA_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    RequestHeader = 1,
    ResponseHeader = 2,
    Data = 3,
    Trailer = 4,
    /// Egress → edge, empty: the request header was read. Sent only on
    /// connections that negotiated [`super::tls::ALPN_V2`].
    Accepted = 5,
    /// Egress → edge, empty, alone on a unidirectional stream: the egress
    /// is draining. Streams already open finish; new requests go to another
    /// egress of the region (QUIC has no GOAWAY of its own; HTTP/3's is an
    /// application frame too).
    GoAway = 6,
    /// Egress → edge, empty, first on its control stream (the
    /// unidirectional stream that later carries GOAWAY): the egress has
    /// accepted the edge's certificate. Sent only on connections that
    /// negotiated [`super::tls::ALPN_V3`].
    Ready = 7,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FrameKind::RequestHeader,
            2 => FrameKind::ResponseHeader,
            3 => FrameKind::Data,
            4 => FrameKind::Trailer,
            5 => FrameKind::Accepted,
            6 => FrameKind::GoAway,
            7 => FrameKind::Ready,
            _ => return None,
        })
    }
}

/// The whole ACCEPTED frame: it has no payload.
pub const ACCEPTED: [u8; 5] = [FrameKind::Accepted as u8, 0, 0, 0, 0];

/// The whole GOAWAY frame: it has no payload.
pub const GOAWAY: [u8; 5] = [FrameKind::GoAway as u8, 0, 0, 0, 0];

/// The whole READY frame: it has no payload.
pub const READY: [u8; 5] = [FrameKind::Ready as u8, 0, 0, 0, 0];

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer finished the stream cleanly where a frame could start.
    #[error("the stream ended")]
    Eof,
    #[error("the stream was reset by the peer (code {0})")]
    Reset(u64),
    #[error("the connection was lost: {0}")]
    Connection(quinn::ConnectionError),
    #[error("the stream ended inside a frame")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a {kind:?} frame of {len} bytes is over the limit of {limit}")]
    TooLarge {
        kind: FrameKind,
        len: usize,
        limit: usize,
    },
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected { expected: FrameKind, got: FrameKind },
    #[error("malformed {0:?} frame: {1}")]
    Decode(FrameKind, prost::DecodeError),
    #[error("the stream is closed")]
    Closed,
}

pub fn encode(kind: FrameKind, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind as u8);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf.freeze()
}

pub fn encode_message(kind: FrameKind, msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(kind as u8);
    buf.put_u32(len as u32);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// Only the 5-byte prefix of a data frame, so a chunk is written without
/// being copied into a new buffer.
pub fn data_prefix(len: usize) -> [u8; 5] {
    let mut p = [0u8; 5];
    p[0] = FrameKind::Data as u8;
    p[1..].copy_from_slice(&(len as u32).to_be_bytes());
    p
}

fn map_read(e: quinn::ReadError) -> FrameError {
    match e {
        quinn::ReadError::Reset(code) => FrameError::Reset(code.into_inner()),
        quinn::ReadError::ConnectionLost(c) => FrameError::Connection(c),
        quinn::ReadError::ClosedStream => FrameError::Closed,
        quinn::ReadError::ZeroRttRejected => FrameError::Closed,
        quinn::ReadError::IllegalOrderedRead => FrameError::Closed,
    }
}

fn map_exact(e: quinn::ReadExactError, started: bool) -> FrameError {
    match e {
        quinn::ReadExactError::FinishedEarly(0) if !started => FrameError::Eof,
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => map_read(e),
    }
}

/// Parses a frame prefix: its kind and payload length, refused when over
/// `max` before anything is allocated for it.
pub fn parse_prefix(head: [u8; 5], max: usize) -> Result<(FrameKind, usize), FrameError> {
    let kind = FrameKind::from_u8(head[0]).ok_or(FrameError::UnknownKind(head[0]))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            kind,
            len,
            limit: max,
        });
    }
    Ok((kind, len))
}

/// Reads the 5-byte prefix of the next frame (see [`parse_prefix`]).
pub async fn read_frame_prefix(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<(FrameKind, usize), FrameError> {
    let mut head = [0u8; 5];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| map_exact(e, false))?;
    parse_prefix(head, max)
}

/// The limit a frame of `kind` is held to.
pub fn limit_for(kind: FrameKind) -> usize {
    match kind {
        FrameKind::Data => MAX_DATA_FRAME,
        _ => MAX_HEADER_FRAME,
    }
}

/// A frame split off a buffer: its kind, its payload, the bytes after it.
pub type SplitFrame<'a> = (FrameKind, &'a [u8], &'a [u8]);

/// Splits the next frame off `buf`: its kind, its payload and the bytes
/// after it; `None` when `buf` is empty. Borrows, never copies.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<SplitFrame<'_>>, FrameError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let head: [u8; 5] = buf
        .get(..5)
        .and_then(|h| h.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let (kind, len) = parse_prefix(head, max)?;
    let rest = &buf[5..];
    if rest.len() < len {
        return Err(FrameError::Truncated);
    }
    let (payload, rest) = rest.split_at(len);
    Ok(Some((kind, payload, rest)))
}

/// Decodes a whole stream of frames the way the receiving end would, from
/// either direction: a request header (its body is everything after it,
/// rebuilt and validated like the egress does), response headers (errors
/// converted like the edge does), data frames, trailers (applied to fresh
/// stats) and ACCEPTED frames. Returns the kinds seen. For fuzzing: any
/// input must give `Ok` or a `FrameError`/`GatewayError`, never a panic, and
/// nothing is allocated beyond what the input's own bytes justify.
pub fn inspect(data: &[u8]) -> Result<Vec<FrameKind>, InspectError> {
    let mut kinds = Vec::new();
    let mut buf = data;
    // The first prefix decides the limit, like the readers on each end do.
    while let Some((kind, payload, rest)) = split_frame(buf, MAX_HEADER_FRAME.max(MAX_DATA_FRAME))?
    {
        if payload.len() > limit_for(kind) {
            return Err(FrameError::TooLarge {
                kind,
                len: payload.len(),
                limit: limit_for(kind),
            }
            .into());
        }
        kinds.push(kind);
        match kind {
            FrameKind::RequestHeader => {
                let header: wire::RequestHeader = decode(kind, payload)?;
                request_from_wire(header, Bytes::copy_from_slice(rest), Instant::now())?;
                return Ok(kinds);
            }
            FrameKind::ResponseHeader => {
                let head: wire::ResponseHeader = decode(kind, payload)?;
                if let Some(e) = head.error {
                    let e = error_from_wire(e);
                    // Whatever came over the wire renders in both shapes.
                    let _ = (e.to_openai_json(), e.to_anthropic_json(), e.status());
                }
            }
            FrameKind::Trailer => {
                let t: wire::Trailer = decode(kind, payload)?;
                apply_trailer(&t, &RequestStats::default());
            }
            FrameKind::Data | FrameKind::Accepted | FrameKind::GoAway | FrameKind::Ready => {}
        }
        buf = rest;
    }
    Ok(kinds)
}

/// Why [`inspect`] refused its input.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Request(#[from] GatewayError),
}

/// Reads the `len`-byte payload of a frame whose prefix was read.
pub async fn read_frame_payload(
    recv: &mut quinn::RecvStream,
    len: usize,
) -> Result<Bytes, FrameError> {
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .map_err(|e| map_exact(e, true))?;
    Ok(Bytes::from(payload))
}

/// Reads the next frame; `max` bounds its payload.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<(FrameKind, Bytes), FrameError> {
    let (kind, len) = read_frame_prefix(recv, max).await?;
    Ok((kind, read_frame_payload(recv, len).await?))
}

pub fn decode<M: Message + Default>(kind: FrameKind, payload: &[u8]) -> Result<M, FrameError> {
    M::decode(payload).map_err(|e| FrameError::Decode(kind, e))
}

/// Reads one frame that must be of `expected` kind.
pub async fn read_message<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    expected: FrameKind,
) -> Result<M, FrameError> {
    let (kind, payload) = read_frame(recv, MAX_HEADER_FRAME).await?;
    if kind != expected {
        return Err(FrameError::Unexpected {
            expected,
            got: kind,
        });
    }
    decode(kind, &payload)
}

fn fields(v: &[(String, String)]) -> Vec<wire::HeaderField> {
    v.iter()
        .map(|(name, value)| wire::HeaderField {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn pairs(v: Vec<wire::HeaderField>) -> Vec<(String, String)> {
    v.into_iter().map(|f| (f.name, f.value)).collect()
}

fn json_body(map: &serde_json::Map<String, serde_json::Value>) -> Bytes {
    // Serialising a map of JSON values cannot fail.
    Bytes::from(serde_json::to_vec(map).unwrap_or_default())
}

/// The request header and body bytes that carry `req` to an egress.
pub fn request_to_wire(req: &EgressRequest, deadline: Duration) -> (wire::RequestHeader, Bytes) {
    let mut header = wire::RequestHeader {
        version: PROTOCOL_VERSION,
        request_id: req.request_id.clone(),
        tenant: req.tenant.clone(),
        provider: req.target.provider.clone(),
        upstream_model: req.target.model.clone(),
        simulate: req.simulate.clone(),
        forward_headers: fields(&req.forward_headers),
        deadline_ms: deadline.as_millis() as u64,
        residency: req.residency.join(","),
        traceparent: req.trace.map(|t| t.header()).unwrap_or_default(),
        ..Default::default()
    };
    header.set_inbound(match req.inbound {
        Protocol::OpenAi => wire::InboundProtocol::Openai,
        Protocol::Anthropic => wire::InboundProtocol::Anthropic,
        Protocol::Gemini => wire::InboundProtocol::Gemini,
    });
    let (kind, body) = match &req.op {
        // The caller's bytes when the body is as they sent it.
        Operation::Chat(c) => (
            wire::OperationKind::Chat,
            c.raw().cloned().unwrap_or_else(|| json_body(c.body())),
        ),
        Operation::Embeddings(e) => (wire::OperationKind::Embeddings, json_body(&e.body)),
        Operation::Messages { body, .. } => (wire::OperationKind::Messages, json_body(body)),
        Operation::CountTokens { body } => (wire::OperationKind::CountTokens, json_body(body)),
        Operation::Responses(r) => (wire::OperationKind::Responses, json_body(&r.body)),
        Operation::Completions(c) => (wire::OperationKind::Completions, json_body(&c.body)),
        Operation::Generate(g) if g.stream => (
            wire::OperationKind::StreamGenerateContent,
            json_body(&g.body),
        ),
        Operation::Generate(g) => (wire::OperationKind::GenerateContent, json_body(&g.body)),
        Operation::GeminiEmbed(e) if e.batch => {
            (wire::OperationKind::BatchEmbedContents, json_body(&e.body))
        }
        Operation::GeminiEmbed(e) => (wire::OperationKind::EmbedContent, json_body(&e.body)),
        Operation::GeminiCountTokens { body, .. } => {
            (wire::OperationKind::GeminiCountTokens, json_body(body))
        }
        Operation::Raw(raw) => {
            header.raw_method = raw.method.clone();
            header.raw_path = raw.path.clone();
            header.raw_headers = fields(&raw.headers);
            (wire::OperationKind::Raw, raw.body.clone())
        }
    };
    header.set_operation(kind);
    (header, body)
}

/// What the egress learns from a request header besides the request itself.
pub struct RequestMeta {
    pub deadline: Duration,
    pub residency: String,
}

/// Rebuilds the request on the egress. The body is validated again: the
/// egress trusts the edge's identity (mTLS), not its parsing.
pub fn request_from_wire(
    header: wire::RequestHeader,
    body: Bytes,
    received_at: Instant,
) -> Result<(EgressRequest, RequestMeta), GatewayError> {
    if header.version != PROTOCOL_VERSION {
        return Err(GatewayError::new(
            ErrorKind::Internal,
            format!(
                "The egress speaks backhaul protocol {PROTOCOL_VERSION}, the edge sent {}.",
                header.version
            ),
        )
        // Nothing was started; an egress of the edge's version may take it.
        .with_source(Source::Egress)
        .with_retry(Retry::AnotherEgress));
    }
    let op = match header.operation() {
        wire::OperationKind::Chat => Operation::Chat(ChatRequest::parse_bytes(&body)?),
        wire::OperationKind::Embeddings => Operation::Embeddings(EmbeddingsRequest::parse(&body)?),
        wire::OperationKind::Messages => {
            let map = parse_json_object(&body)?;
            let chat = anthropic::messages_to_openai(map.clone())?;
            Operation::Messages { body: map, chat }
        }
        wire::OperationKind::CountTokens => Operation::CountTokens {
            body: parse_json_object(&body)?,
        },
        wire::OperationKind::Responses => {
            Operation::Responses(ResponsesRequest::from_map(parse_json_object(&body)?)?)
        }
        wire::OperationKind::Completions => {
            Operation::Completions(CompletionsRequest::from_map(parse_json_object(&body)?)?)
        }
        kind @ (wire::OperationKind::GenerateContent
        | wire::OperationKind::StreamGenerateContent) => {
            let stream = kind == wire::OperationKind::StreamGenerateContent;
            Operation::Generate(GenerateRequest::new(
                parse_json_object(&body)?,
                &header.upstream_model,
                stream,
            )?)
        }
        kind @ (wire::OperationKind::EmbedContent | wire::OperationKind::BatchEmbedContents) => {
            Operation::GeminiEmbed(EmbedRequest::new(
                parse_json_object(&body)?,
                &header.upstream_model,
                kind == wire::OperationKind::BatchEmbedContents,
            )?)
        }
        wire::OperationKind::GeminiCountTokens => Operation::GeminiCountTokens {
            model: header.upstream_model.clone(),
            body: parse_json_object(&body)?,
        },
        wire::OperationKind::Raw => Operation::Raw(RawRequest {
            method: header.raw_method.clone(),
            path: header.raw_path.clone(),
            headers: pairs(header.raw_headers.clone()),
            body,
        }),
        wire::OperationKind::Unspecified => {
            return Err(GatewayError::new(
                ErrorKind::Internal,
                "The backhaul request names no operation.",
            ))
        }
    };
    let inbound = match header.inbound() {
        wire::InboundProtocol::Openai => Protocol::OpenAi,
        wire::InboundProtocol::Anthropic => Protocol::Anthropic,
        wire::InboundProtocol::Gemini => Protocol::Gemini,
    };
    let meta = RequestMeta {
        deadline: Duration::from_millis(header.deadline_ms),
        residency: header.residency,
    };
    let req = EgressRequest {
        request_id: header.request_id,
        tenant: header.tenant,
        target: RouteTarget {
            provider: header.provider,
            model: header.upstream_model,
        },
        op,
        simulate: header.simulate,
        received_at,
        inbound,
        forward_headers: pairs(header.forward_headers),
        residency: split_residency(&meta.residency),
        // A malformed value is dropped, not refused: tracing is advisory.
        trace: crate::trace::TraceContext::parse(&header.traceparent),
    };
    Ok((req, meta))
}

/// The wire carries the jurisdiction set comma-separated.
pub fn split_residency(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|j| !j.is_empty())
        .map(str::to_string)
        .collect()
}

pub fn error_to_wire(e: &GatewayError) -> wire::Error {
    let kind = match e.kind {
        // Raised by the edge about its own client; never crosses the backhaul.
        ErrorKind::InvalidRequest | ErrorKind::RequestTimeout => wire::ErrorKind::InvalidRequest,
        ErrorKind::Unauthorized => wire::ErrorKind::Unauthorized,
        ErrorKind::Forbidden => wire::ErrorKind::Forbidden,
        ErrorKind::ModelNotFound => wire::ErrorKind::ModelNotFound,
        ErrorKind::NotFound => wire::ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed => wire::ErrorKind::MethodNotAllowed,
        ErrorKind::PayloadTooLarge => wire::ErrorKind::PayloadTooLarge,
        ErrorKind::RateLimited => wire::ErrorKind::RateLimited,
        ErrorKind::Upstream => wire::ErrorKind::Upstream,
        ErrorKind::Overloaded => wire::ErrorKind::Overloaded,
        ErrorKind::Timeout => wire::ErrorKind::Timeout,
        ErrorKind::Internal => wire::ErrorKind::Internal,
    };
    let mut w = wire::Error {
        message: e.message.clone(),
        code: e.code.map(str::to_string),
        param: e.param.clone(),
        retry_after: e.retry_after.clone(),
        ..Default::default()
    };
    w.set_kind(kind);
    w.set_source(match e.source {
        Source::Client => wire::ErrorSource::Client,
        Source::Policy => wire::ErrorSource::Policy,
        Source::Edge => wire::ErrorSource::Edge,
        Source::Backhaul => wire::ErrorSource::Backhaul,
        Source::Egress => wire::ErrorSource::Egress,
        Source::Provider => wire::ErrorSource::Provider,
        Source::Key => wire::ErrorSource::Key,
    });
    w.set_retry(match e.retry {
        Retry::Never => wire::RetryClass::Never,
        Retry::SameTargetAfterDelay => wire::RetryClass::SameTargetAfterDelay,
        Retry::AnotherKey => wire::RetryClass::AnotherKey,
        Retry::AnotherTarget => wire::RetryClass::AnotherTarget,
        Retry::AnotherEgress => wire::RetryClass::AnotherEgress,
    });
    w
}

pub fn error_from_wire(w: wire::Error) -> GatewayError {
    let kind = match w.kind() {
        wire::ErrorKind::InvalidRequest => ErrorKind::InvalidRequest,
        wire::ErrorKind::Unauthorized => ErrorKind::Unauthorized,
        wire::ErrorKind::Forbidden => ErrorKind::Forbidden,
        wire::ErrorKind::ModelNotFound => ErrorKind::ModelNotFound,
        wire::ErrorKind::NotFound => ErrorKind::NotFound,
        wire::ErrorKind::MethodNotAllowed => ErrorKind::MethodNotAllowed,
        wire::ErrorKind::PayloadTooLarge => ErrorKind::PayloadTooLarge,
        wire::ErrorKind::RateLimited => ErrorKind::RateLimited,
        wire::ErrorKind::Upstream => ErrorKind::Upstream,
        wire::ErrorKind::Overloaded => ErrorKind::Overloaded,
        wire::ErrorKind::Timeout => ErrorKind::Timeout,
        wire::ErrorKind::Internal | wire::ErrorKind::Unspecified => ErrorKind::Internal,
    };
    let (source, retry) = (w.source(), w.retry());
    let mut e = GatewayError::new(kind, w.message).with_retry_after(w.retry_after);
    // Unspecified (an older egress) keeps the defaults derived from the kind.
    match source {
        wire::ErrorSource::Unspecified => {}
        wire::ErrorSource::Client => e.source = Source::Client,
        wire::ErrorSource::Policy => e.source = Source::Policy,
        wire::ErrorSource::Edge => e.source = Source::Edge,
        wire::ErrorSource::Backhaul => e.source = Source::Backhaul,
        wire::ErrorSource::Egress => e.source = Source::Egress,
        wire::ErrorSource::Provider => e.source = Source::Provider,
        wire::ErrorSource::Key => e.source = Source::Key,
    }
    match retry {
        wire::RetryClass::Unspecified => {}
        wire::RetryClass::Never => e.retry = Retry::Never,
        wire::RetryClass::SameTargetAfterDelay => e.retry = Retry::SameTargetAfterDelay,
        wire::RetryClass::AnotherKey => e.retry = Retry::AnotherKey,
        wire::RetryClass::AnotherTarget => e.retry = Retry::AnotherTarget,
        wire::RetryClass::AnotherEgress => e.retry = Retry::AnotherEgress,
    }
    e.code = w.code.as_deref().map(known_code);
    e.param = w.param;
    e
}

/// Every error code an egress sends. `GatewayError` holds codes as
/// `&'static str` (a small vocabulary, a metric label); a code that came
/// over the wire is mapped onto this table instead of being allocated, so
/// a peer cannot grow the edge's memory with ever new codes. A test checks
/// that every code the egress's crates set is listed.
pub const KNOWN_CODES: &[&str] = &[
    "backhaul_failed",
    "backhaul_lost",
    "backhaul_timeout",
    "egress_draining",
    "egress_overloaded",
    "invalid_api_key",
    "invalid_model",
    "invalid_passthrough_path",
    "invalid_path",
    "invalid_simulate_header",
    "key_pool_exhausted",
    "method_not_allowed",
    "missing_api_key",
    "model_not_allowed",
    "model_not_found",
    "no_egress",
    "provider_not_found",
    "raw_protocol_mismatch",
    "request_too_large",
    "residency_blocked",
    "residency_violation",
    "unknown_tenant",
    "unknown_url",
    "unsupported_parameter",
    "upstream_auth_failed",
    "upstream_error",
    "upstream_stalled",
];

/// What a code the table does not know becomes.
pub const UNKNOWN_CODE: &str = "upstream_error";

fn known_code(code: &str) -> &'static str {
    KNOWN_CODES
        .iter()
        .copied()
        .find(|c| *c == code)
        .unwrap_or(UNKNOWN_CODE)
}

pub fn trailer_from_stats(
    stats: &RequestStats,
    target: &RouteTarget,
    region: &str,
) -> wire::Trailer {
    let usage = stats.usage();
    let (key_pool, key_id) = stats.key().unwrap_or_default();
    wire::Trailer {
        has_usage: usage.is_some(),
        prompt_tokens: usage.map_or(0, |u| u.prompt_tokens),
        completion_tokens: usage.map_or(0, |u| u.completion_tokens),
        cached_tokens: usage.map_or(0, |u| u.cached_tokens),
        ttft_us: stats.ttft_us().unwrap_or(0),
        stream_failed: stats.stream_failed(),
        provider: target.provider.clone(),
        model: target.model.clone(),
        egress_region: region.to_string(),
        egress_node: stats.egress_node().unwrap_or_default().to_string(),
        key_pool: key_pool.to_string(),
        key_id: key_id.to_string(),
        reasoning_tokens: usage.map_or(0, |u| u.reasoning_tokens),
        upstream_us: stats.upstream_us().unwrap_or(0),
    }
}

/// Copies what the trailer reports into the edge's stats. TTFT is not
/// copied: the edge measures its own, which includes the backhaul.
pub fn apply_trailer(t: &wire::Trailer, stats: &RequestStats) {
    if t.has_usage {
        stats.set_usage(Usage {
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            cached_tokens: t.cached_tokens,
            reasoning_tokens: t.reasoning_tokens,
        });
    }
    if t.stream_failed {
        stats.mark_stream_failed();
    }
    if t.upstream_us > 0 {
        stats.set_upstream_wait(Duration::from_micros(t.upstream_us));
    }
    // Bounded, as anything a peer sends: names, not payloads.
    let short = |s: &str| s.len() <= 256 && !s.is_empty();
    if short(&t.egress_node) {
        stats.set_egress_node(t.egress_node.as_str().into());
    }
    if short(&t.key_pool) && t.key_id.len() <= 256 {
        stats.set_key(t.key_pool.as_str().into(), t.key_id.as_str().into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat_request() -> EgressRequest {
        let body = json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
        EgressRequest {
            request_id: "req_1".into(),
            tenant: "t".into(),
            target: RouteTarget {
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
            },
            op: Operation::Chat(ChatRequest::parse(body.to_string().as_bytes()).unwrap()),
            simulate: Some("ttft_ms=5".into()),
            received_at: Instant::now(),
            inbound: Protocol::Anthropic,
            forward_headers: vec![("anthropic-version".into(), "2023-06-01".into())],
            residency: vec!["eu".into(), "ch".into()],
            trace: Some(crate::trace::TraceContext::start()),
        }
    }

    #[test]
    fn request_round_trips() {
        let req = chat_request();
        let (header, body) = request_to_wire(&req, Duration::from_millis(1500));
        let bytes = encode_message(FrameKind::RequestHeader, &header);
        assert_eq!(bytes[0], FrameKind::RequestHeader as u8);
        let decoded: wire::RequestHeader = decode(FrameKind::RequestHeader, &bytes[5..]).unwrap();
        let (back, meta) = request_from_wire(decoded, body, Instant::now()).unwrap();
        assert_eq!(meta.deadline, Duration::from_millis(1500));
        assert_eq!(meta.residency, "eu,ch");
        assert_eq!(back.residency, req.residency);
        assert_eq!(back.target, req.target);
        assert_eq!(back.inbound, Protocol::Anthropic);
        assert_eq!(back.simulate, req.simulate);
        assert_eq!(back.forward_headers, req.forward_headers);
        assert_eq!(back.trace, req.trace);
        match (back.op, req.op) {
            (Operation::Chat(a), Operation::Chat(b)) => {
                assert_eq!(a.body(), b.body());
                assert!(a.stream);
            }
            _ => panic!("operation changed"),
        }
    }

    /// Every inbound protocol's operation crosses the backhaul whole: the
    /// same kind, body, streaming and (for Gemini, whose model is in the
    /// URL) the target's model.
    #[test]
    fn new_protocol_operations_round_trip() {
        let map = |v: serde_json::Value| v.as_object().unwrap().clone();
        let contents = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
        let ops = [
            (
                Protocol::OpenAi,
                Operation::Responses(
                    ResponsesRequest::from_map(map(json!({"model": "fast", "input": "hi", "stream": true})))
                        .unwrap(),
                ),
            ),
            (
                Protocol::OpenAi,
                Operation::Completions(
                    CompletionsRequest::from_map(map(json!({"model": "fast", "prompt": "hi"}))).unwrap(),
                ),
            ),
            (
                Protocol::Gemini,
                Operation::Generate(GenerateRequest::new(map(contents.clone()), "fast", true).unwrap()),
            ),
            (
                Protocol::Gemini,
                Operation::Generate(GenerateRequest::new(map(contents.clone()), "fast", false).unwrap()),
            ),
            (
                Protocol::Gemini,
                Operation::GeminiCountTokens {
                    model: "fast".into(),
                    body: map(contents.clone()),
                },
            ),
            (
                Protocol::Gemini,
                Operation::GeminiEmbed(
                    EmbedRequest::new(
                        map(json!({"requests": [{"model": "models/fast", "content": {"parts": [{"text": "a"}]}}]})),
                        "fast",
                        true,
                    )
                    .unwrap(),
                ),
            ),
        ];
        for (inbound, op) in ops {
            let mut req = chat_request();
            req.inbound = inbound;
            req.op = op;
            let (header, body) = request_to_wire(&req, Duration::from_secs(1));
            let (back, _) = request_from_wire(header, body, Instant::now()).unwrap();
            assert_eq!(back.inbound, inbound);
            assert_eq!(back.op.is_stream(), req.op.is_stream());
            match (&back.op, &req.op) {
                (Operation::Responses(a), Operation::Responses(b)) => assert_eq!(a.body, b.body),
                (Operation::Completions(a), Operation::Completions(b)) => {
                    assert_eq!(a.body, b.body)
                }
                (Operation::Generate(a), Operation::Generate(b)) => {
                    assert_eq!((&a.body, a.stream), (&b.body, b.stream));
                    assert_eq!(a.model, "gpt-4o-mini", "the target's model");
                }
                (
                    Operation::GeminiCountTokens { body: a, .. },
                    Operation::GeminiCountTokens { body: b, .. },
                ) => assert_eq!(a, b),
                (Operation::GeminiEmbed(a), Operation::GeminiEmbed(b)) => {
                    assert_eq!((&a.body, a.batch), (&b.body, b.batch))
                }
                (a, b) => panic!("{a:?} came back as {b:?}"),
            }
        }
    }

    #[test]
    fn raw_request_keeps_method_path_headers() {
        let mut req = chat_request();
        req.op = Operation::Raw(RawRequest {
            method: "GET".into(),
            path: "models?x=1".into(),
            headers: vec![("accept".into(), "*/*".into())],
            body: Bytes::from_static(b"\x00\x01"),
        });
        let (header, body) = request_to_wire(&req, Duration::ZERO);
        let (back, _) = request_from_wire(header, body, Instant::now()).unwrap();
        let Operation::Raw(raw) = back.op else {
            panic!("not raw")
        };
        assert_eq!(
            (raw.method.as_str(), raw.path.as_str()),
            ("GET", "models?x=1")
        );
        assert_eq!(raw.body.as_ref(), b"\x00\x01");
        assert_eq!(raw.headers.len(), 1);
    }

    #[test]
    fn unknown_version_is_refused() {
        let (mut header, body) = request_to_wire(&chat_request(), Duration::ZERO);
        header.version = 9;
        assert!(request_from_wire(header, body, Instant::now()).is_err());
    }

    #[test]
    fn errors_round_trip_with_code() {
        let e = GatewayError::model_not_found("x/y").with_retry_after(Some("3".into()));
        let back = error_from_wire(error_to_wire(&e));
        assert_eq!(back, e);
    }

    #[test]
    fn errors_round_trip_with_source_and_retry_class() {
        let e = GatewayError::new(ErrorKind::Upstream, "key refused")
            .with_code("upstream_auth_failed")
            .with_source(Source::Key)
            .with_retry(Retry::AnotherKey);
        assert_eq!(error_from_wire(error_to_wire(&e)), e);
        let e = GatewayError::new(ErrorKind::Overloaded, "busy")
            .with_source(Source::Egress)
            .with_retry(Retry::AnotherEgress);
        assert_eq!(error_from_wire(error_to_wire(&e)), e);
    }

    #[test]
    fn an_older_egress_error_gets_the_kind_defaults() {
        let mut w = error_to_wire(&GatewayError::new(ErrorKind::Timeout, "slow"));
        w.source = 0;
        w.retry = 0;
        let back = error_from_wire(w);
        assert_eq!(back.source, Source::Provider);
        assert_eq!(back.retry, Retry::AnotherTarget);
    }

    #[test]
    fn unknown_codes_become_one_fixed_code() {
        for i in 0..10_000 {
            let w = wire::Error {
                code: Some(format!("made_up_{i}")),
                ..Default::default()
            };
            assert_eq!(error_from_wire(w).code, Some(UNKNOWN_CODE));
        }
        let w = wire::Error {
            code: Some("unknown_tenant".into()),
            ..Default::default()
        };
        assert_eq!(error_from_wire(w).code, Some("unknown_tenant"));
    }

    /// Every code set with a literal in the crates an egress runs is in
    /// [`KNOWN_CODES`], so none is lost crossing the backhaul.
    #[test]
    fn every_code_the_egress_sets_is_known() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut missing = Vec::new();
        let mut dirs = vec![
            root.join("backhaul/src"),
            root.join("proto/llm/src"),
            root.join("proto/src"),
        ];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for part in text.split("with_code(").skip(1) {
                    let part = part.trim_start();
                    let Some(lit) = part.strip_prefix('"') else {
                        continue;
                    };
                    let code = lit.split('"').next().unwrap_or_default();
                    let is_code = !code.is_empty()
                        && code
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if is_code && !KNOWN_CODES.contains(&code) {
                        missing.push(format!("{code} ({})", path.display()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "add to KNOWN_CODES: {missing:?}");
    }

    #[test]
    fn split_frame_refuses_a_huge_length_before_reading_it() {
        let mut huge = vec![FrameKind::Data as u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            split_frame(&huge, MAX_DATA_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            split_frame(&huge[..3], MAX_DATA_FRAME),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            split_frame(&[9, 0, 0, 0, 0], 10),
            Err(FrameError::UnknownKind(9))
        ));
    }

    #[test]
    fn inspect_reads_both_directions() {
        let (header, body) = request_to_wire(&chat_request(), Duration::from_millis(5));
        let mut up = encode_message(FrameKind::RequestHeader, &header).to_vec();
        up.extend_from_slice(&body);
        assert_eq!(inspect(&up).unwrap(), vec![FrameKind::RequestHeader]);

        let mut down = ACCEPTED.to_vec();
        down.extend_from_slice(&encode_message(
            FrameKind::ResponseHeader,
            &wire::ResponseHeader {
                status: 200,
                streaming: true,
                ..Default::default()
            },
        ));
        down.extend_from_slice(&encode(FrameKind::Data, b"data: {}\n\n"));
        down.extend_from_slice(&encode_message(
            FrameKind::Trailer,
            &wire::Trailer::default(),
        ));
        assert_eq!(
            inspect(&down).unwrap(),
            vec![
                FrameKind::Accepted,
                FrameKind::ResponseHeader,
                FrameKind::Data,
                FrameKind::Trailer
            ]
        );
    }

    #[test]
    fn trailer_carries_usage_and_failure() {
        let stats = RequestStats::default();
        stats.set_usage(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 1,
            reasoning_tokens: 2,
        });
        stats.mark_stream_failed();
        stats.set_key("pool-a".into(), "k2".into());
        stats.set_egress_node("egress-eu-1".into());
        stats.set_upstream_wait(Duration::from_millis(7));
        let target = RouteTarget {
            provider: "p".into(),
            model: "m".into(),
        };
        let t = trailer_from_stats(&stats, &target, "eu");
        let edge = RequestStats::default();
        apply_trailer(&t, &edge);
        assert_eq!(edge.usage().unwrap().completion_tokens, 4);
        assert_eq!(edge.usage().unwrap().reasoning_tokens, 2);
        assert_eq!(edge.key(), Some(("pool-a", "k2")));
        assert_eq!(edge.egress_node(), Some("egress-eu-1"));
        assert_eq!(edge.upstream_us(), Some(7000));
        assert!(edge.stream_failed());
        assert_eq!(t.egress_region, "eu");
    }

    #[test]
    fn data_prefix_matches_encode() {
        let framed = encode(FrameKind::Data, b"abc");
        assert_eq!(&framed[..5], &data_prefix(3));
    }
}
