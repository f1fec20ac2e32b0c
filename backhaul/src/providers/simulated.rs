//! The built-in simulated provider: deterministic completions with realistic
//! timing, real usage numbers and injectable faults, so `switchyard dev`
//! works offline and tests can exercise every failure path.
//!
//! It emits exactly what an OpenAI-protocol upstream would (JSON bodies, SSE
//! chunks with a usage chunk and `[DONE]`), and goes through the same
//! pass-through translator, timeouts and accounting as a real provider.
//!
//! Per-request behaviour comes from the `x-switchyard-simulate` header, a
//! comma-separated list such as `status=429,retry_after=2`, `hang`,
//! `drop_after=3`, `ttft_ms=100`, `tps=50`, `tokens=12`, `rate=0.5`. Every
//! value must be a finite number within bounds (see [`MAX_TOKENS`]); the edge
//! forwards the header only in `switchyard dev` or where the policy sets
//! `simulated.allow_header`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_llm::passthrough::OpenAiPassthrough;
use switchyard_llm::sse::{encode_event, DONE_EVENT};
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::{FaultMode, SimulatedFault, SimulatedProfile};

use super::{CallContext, Provider, ProviderReply};
use crate::request::Operation;

pub struct SimulatedAdapter;

const WORDS: &[&str] = &[
    "switchyard",
    "routes",
    "every",
    "token",
    "through",
    "the",
    "nearest",
    "edge",
    "while",
    "quic",
    "tunnels",
    "carry",
    "streams",
    "to",
    "regional",
    "egress",
    "nodes",
    "that",
    "hold",
    "provider",
    "keys",
    "and",
    "translate",
    "protocols",
    "latency",
    "stays",
    "low",
    "because",
    "connections",
    "remain",
    "warm",
    "across",
    "requests",
    "policy",
    "decides",
    "which",
    "model",
    "answers",
    "residency",
    "rules",
    "keep",
    "data",
    "inside",
    "its",
    "jurisdiction",
    "budgets",
    "cap",
    "spending",
    "fallbacks",
    "absorb",
    "failures",
    "before",
    "first",
    "byte",
    "reaches",
    "client",
    "so",
    "users",
    "see",
    "fast",
    "steady",
    "answers",
    "today",
    "again",
];

#[derive(Debug, Default, Clone)]
pub(crate) struct Directives {
    pub(crate) ttft_ms: Option<u64>,
    tps: Option<f64>,
    tokens: Option<u32>,
    pub(crate) fault: Option<SimulatedFault>,
}

/// Bounds of every `x-switchyard-simulate` value: a directive outside them
/// is refused, so one header cannot make the gateway build a huge answer,
/// sleep for days or divide by zero.
pub const MAX_TOKENS: u32 = 8192;
const MAX_TTFT_MS: u64 = 60_000;
const MIN_TPS: f64 = 0.1;
const MAX_TPS: f64 = 100_000.0;
const MAX_RETRY_AFTER: u32 = 3600;
/// The header is refused above this length before any parsing.
const MAX_HEADER_LEN: usize = 256;

pub(crate) fn parse_directives(header: &str) -> Result<Directives, GatewayError> {
    let mut d = Directives::default();
    let mut rate = 1.0;
    let mut mode = None;
    let mut retry_after = None;
    let bad = |item: &str, why: &str| {
        GatewayError::invalid(format!(
            "Invalid x-switchyard-simulate directive {item:?}: {why}; expected e.g. status=429,retry_after=2 | hang | drop_after=3 | ttft_ms=100 | tps=50 | tokens=12 | rate=0.5"
        ))
        .with_code("invalid_simulate_header")
    };
    if header.len() > MAX_HEADER_LEN {
        return Err(bad("…", "the header is too long"));
    }
    for item in header
        .split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (k, v) = item.split_once('=').unwrap_or((item, ""));
        // Finite, within [min, max]; NaN and infinities never get through.
        let num = |min: f64, max: f64| {
            let n = v
                .trim()
                .parse::<f64>()
                .map_err(|_| bad(item, "not a number"))?;
            if !n.is_finite() || n < min || n > max {
                return Err(bad(item, &format!("must be a number from {min} to {max}")));
            }
            Ok(n)
        };
        let int = |min: u64, max: u64| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| bad(item, &format!("must be a whole number from {min} to {max}")))
        };
        match k.trim() {
            "status" => mode = Some(int(400, 599)? as u16),
            "retry_after" => retry_after = Some(int(0, MAX_RETRY_AFTER as u64)? as u32),
            "hang" => {
                d.fault = Some(SimulatedFault {
                    rate: 1.0,
                    mode: FaultMode::Hang,
                })
            }
            "drop_after" => {
                d.fault = Some(SimulatedFault {
                    rate: 1.0,
                    mode: FaultMode::DropAfter {
                        chunks: int(0, MAX_TOKENS as u64)? as u32,
                    },
                })
            }
            "ttft_ms" => d.ttft_ms = Some(int(0, MAX_TTFT_MS)?),
            "tps" => d.tps = Some(num(MIN_TPS, MAX_TPS)?),
            "tokens" => d.tokens = Some(int(0, MAX_TOKENS as u64)? as u32),
            "rate" => rate = num(0.0, 1.0)?,
            _ => return Err(bad(item, "unknown directive")),
        }
    }
    if let Some(status) = mode {
        d.fault = Some(SimulatedFault {
            rate,
            mode: FaultMode::Status {
                status,
                retry_after,
            },
        });
    } else if let Some(f) = &mut d.fault {
        f.rate = rate;
    }
    Ok(d)
}

/// Time between two streamed tokens; also bounds what a policy can ask for
/// (a rate so small that its inverse is not a `Duration` would panic).
fn token_gap(tokens_per_second: f64) -> Duration {
    let tps = if tokens_per_second.is_nan() {
        MIN_TPS
    } else {
        tokens_per_second.clamp(MIN_TPS, MAX_TPS)
    };
    Duration::from_secs_f64(1.0 / tps)
}

fn effective_profile(base: &SimulatedProfile, d: &Directives) -> SimulatedProfile {
    let mut p = base.clone();
    if let Some(ms) = d.ttft_ms {
        p.ttft = Duration::from_millis(ms);
    }
    if let Some(tps) = d.tps {
        p.tokens_per_second = tps;
    }
    if let Some(n) = d.tokens {
        p.output_tokens = n;
    }
    // A policy is trusted more than a header, but a typo there must not
    // build an answer without bound either.
    p.output_tokens = p.output_tokens.min(MAX_TOKENS);
    p.ttft = p.ttft.min(Duration::from_millis(MAX_TTFT_MS));
    if d.fault.is_some() {
        p.fault = d.fault.clone();
    }
    p
}

#[async_trait]
impl Provider for SimulatedAdapter {
    async fn call(&self, ctx: CallContext<'_>) -> Result<ProviderReply, GatewayError> {
        let settings = ctx.provider.simulated.clone().unwrap_or_default();
        let directives = match &ctx.request.simulate {
            Some(h) => parse_directives(h)?,
            None => Directives::default(),
        };
        let model = &ctx.request.target.model;
        let profile = effective_profile(settings.profile(model), &directives);
        let mut drop_after = None;
        if let Some(fault) = &profile.fault {
            if super::faults::fires(fault) {
                match &fault.mode {
                    FaultMode::Status {
                        status,
                        retry_after,
                    } => {
                        tokio::time::sleep(profile.ttft).await;
                        return Err(injected_error("simulated", *status, *retry_after));
                    }
                    // The egress's upstream timeout ends this, as it would a real hang.
                    FaultMode::Hang => futures::future::pending::<()>().await,
                    FaultMode::DropAfter { chunks } => drop_after = Some(*chunks),
                }
            }
        }
        match &ctx.request.op {
            // Other protocols reach this provider through the hub, as chat.
            Operation::Messages { .. }
            | Operation::CountTokens { .. }
            | Operation::Responses(_)
            | Operation::Completions(_)
            | Operation::Generate(_)
            | Operation::GeminiCountTokens { .. }
            | Operation::GeminiEmbed(_)
            | Operation::Raw(_) => Err(super::unsupported(ctx.provider, "this endpoint")),
            Operation::Embeddings(e) => {
                tokio::time::sleep(profile.ttft).await;
                Ok(ProviderReply::Json {
                    body: Bytes::from(embeddings(e, model).to_string()),
                    usage: None,
                })
            }
            Operation::Chat(chat) => {
                if chat.body().get("n").and_then(Value::as_u64).unwrap_or(1) != 1 {
                    return Err(
                        GatewayError::invalid("The simulated provider supports n=1 only.")
                            .with_param("n"),
                    );
                }
                let plan = plan_completion(chat, model, &profile);
                if chat.stream {
                    Ok(ProviderReply::Stream {
                        upstream: stream_completion(plan, &profile, drop_after),
                        translator: Box::new(OpenAiPassthrough::new(chat.include_usage)),
                    })
                } else {
                    let gen_time = token_gap(profile.tokens_per_second) * plan.tokens as u32;
                    tokio::time::sleep(profile.ttft + gen_time).await;
                    let body = plan.to_completion();
                    Ok(ProviderReply::Json {
                        body: Bytes::from(body.to_string()),
                        usage: Some(plan.usage),
                    })
                }
            }
        }
    }
}

pub(crate) fn injected_error(
    provider: &str,
    status: u16,
    retry_after: Option<u32>,
) -> GatewayError {
    let kind = GatewayError::kind_for_upstream_status(status);
    let mut e = GatewayError::new(
        kind,
        format!("The provider `{provider}` answered HTTP {status} (injected fault)."),
    );
    if kind == ErrorKind::ModelNotFound {
        e = e.with_code("model_not_found");
    }
    e.with_retry_after(retry_after.map(|s| s.to_string()))
}

/// FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Rough token count (≈4 characters per token, at least one per word run).
fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    (text.chars().count() as u64).div_ceil(4)
}

fn message_text(m: &Value) -> String {
    match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn prompt_tokens(chat: &ChatRequest) -> u64 {
    let mut n = 0;
    for m in chat.messages() {
        n += 4 + count_tokens(&message_text(m));
        if let Some(Value::Array(parts)) = m.get("content") {
            // Images are billed as a flat block, as the real APIs roughly do.
            n += 85
                * parts
                    .iter()
                    .filter(|p| p.get("image_url").is_some())
                    .count() as u64;
        }
        if let Some(calls) = m.get("tool_calls") {
            n += count_tokens(&calls.to_string());
        }
    }
    if let Some(tools) = chat.body().get("tools") {
        n += count_tokens(&tools.to_string());
    }
    n + 3
}

struct Plan {
    id: String,
    model: String,
    created: u64,
    /// Content pieces, one per output token.
    pieces: Vec<String>,
    tool_calls: Vec<(String, String, String)>,
    finish_reason: &'static str,
    tokens: u64,
    usage: Usage,
}

fn plan_completion(chat: &ChatRequest, model: &str, profile: &SimulatedProfile) -> Plan {
    let messages = chat.messages();
    let seed_text = serde_json::to_string(messages).unwrap_or_default();
    let seed = fnv(seed_text.as_bytes()) ^ fnv(model.as_bytes());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let limit = chat.max_tokens().unwrap_or(u64::MAX);
    let wanted = profile.output_tokens as u64;
    let last = messages.last();
    let last_role = last.and_then(|m| m.get("role")).and_then(Value::as_str);
    let tools: Vec<&Value> = chat
        .body()
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| t.iter().collect())
        .unwrap_or_default();
    let choice = chat.body().get("tool_choice");
    let tools_off = matches!(choice, Some(Value::String(s)) if s == "none");

    let mut tool_calls = Vec::new();
    if !tools.is_empty() && !tools_off && last_role != Some("tool") {
        let user_text = last.map(message_text).unwrap_or_default().to_lowercase();
        let named = |t: &&Value| {
            t.pointer("/function/name")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let forced = choice
            .and_then(|c| c.pointer("/function/name"))
            .and_then(Value::as_str);
        let chosen: Vec<&Value> = match forced {
            Some(name) => tools
                .iter()
                .copied()
                .filter(|t| named(t).as_deref() == Some(name))
                .collect(),
            None => {
                let parallel = chat
                    .body()
                    .get("parallel_tool_calls")
                    .and_then(Value::as_bool)
                    != Some(false);
                let mentioned: Vec<&Value> = tools
                    .iter()
                    .copied()
                    .filter(|t| named(t).is_some_and(|n| user_text.contains(&n.to_lowercase())))
                    .collect();
                match (mentioned.len(), parallel) {
                    (0, _) => vec![tools[0]],
                    (_, true) => mentioned,
                    (_, false) => vec![mentioned[0]],
                }
            }
        };
        for (i, tool) in chosen.iter().enumerate() {
            let name = named(tool).unwrap_or_else(|| "tool".into());
            let schema = tool
                .pointer("/function/parameters")
                .cloned()
                .unwrap_or(json!({}));
            let args = example_for_schema(&schema, seed.wrapping_add(i as u64), 0);
            let id = format!("call_sim{:016x}{i}", seed);
            tool_calls.push((id, name, args.to_string()));
        }
    }

    let (pieces, finish_reason, tokens) = if !tool_calls.is_empty() {
        let n: u64 = tool_calls
            .iter()
            .map(|(_, n, a)| count_tokens(n) + count_tokens(a))
            .sum();
        (Vec::new(), "tool_calls", n)
    } else {
        let response_format = chat.body().get("response_format");
        let format_type = response_format
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str);
        let n = wanted.min(limit);
        let mut words: Vec<String> = (0..n)
            .map(|i| {
                let h = fnv(&(seed.wrapping_add(i)).to_le_bytes());
                WORDS[(h % WORDS.len() as u64) as usize].to_string()
            })
            .collect();
        if last_role == Some("tool") {
            let result = last.map(message_text).unwrap_or_default();
            let short: String = result.chars().take(60).collect();
            words.insert(0, format!("The tool returned {short}."));
        }
        let pieces: Vec<String> = match format_type {
            Some("json_object") | Some("json_schema") => {
                let schema = response_format
                    .and_then(|f| f.pointer("/json_schema/schema"))
                    .cloned();
                let doc = match schema {
                    Some(s) => example_for_schema(&s, seed, 0),
                    None => json!({ "answer": words.join(" ") }),
                };
                split_json(&doc.to_string())
            }
            _ => words
                .iter()
                .enumerate()
                .map(|(i, w)| if i == 0 { w.clone() } else { format!(" {w}") })
                .collect(),
        };
        let finish = if wanted > limit { "length" } else { "stop" };
        let tokens = pieces.len() as u64;
        (pieces, finish, tokens)
    };
    Plan {
        id: format!("chatcmpl-sim{:016x}", seed),
        model: model.to_string(),
        created,
        pieces,
        tool_calls,
        finish_reason,
        tokens,
        usage: Usage {
            prompt_tokens: prompt_tokens(chat),
            completion_tokens: tokens,
            cached_tokens: 0,
            reasoning_tokens: 0,
        },
    }
}

/// Splits a JSON text into token-sized pieces that concatenate back to it.
fn split_json(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(4).map(|c| c.iter().collect()).collect()
}

/// A deterministic value satisfying a (simple) JSON schema.
fn example_for_schema(schema: &Value, seed: u64, depth: u32) -> Value {
    if depth > 6 {
        return Value::Null;
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        return options.first().cloned().unwrap_or(Value::Null);
    }
    let word = WORDS[(fnv(&seed.to_le_bytes()) % WORDS.len() as u64) as usize];
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match ty {
        "object" => {
            let mut out = Map::new();
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (i, (k, v)) in props.iter().enumerate() {
                    out.insert(
                        k.clone(),
                        example_for_schema(v, seed.wrapping_add(i as u64 + 1), depth + 1),
                    );
                }
            }
            Value::Object(out)
        }
        "array" => {
            let item = schema.get("items").cloned().unwrap_or(json!({}));
            Value::Array(vec![example_for_schema(
                &item,
                seed.wrapping_add(7),
                depth + 1,
            )])
        }
        "integer" => json!(42),
        "number" => json!(4.2),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => json!(word),
    }
}

impl Plan {
    fn to_completion(&self) -> Value {
        let content: String = self.pieces.concat();
        let mut message = json!({ "role": "assistant", "content": if self.tool_calls.is_empty() { json!(content) } else { Value::Null } });
        if !self.tool_calls.is_empty() {
            message["tool_calls"] = Value::Array(
                self.tool_calls
                    .iter()
                    .map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}))
                    .collect(),
            );
        }
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": self.finish_reason }],
            "usage": self.usage.to_openai(),
            "system_fingerprint": "fp_switchyard_sim",
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let body = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_switchyard_sim",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        encode_event(None, &body.to_string())
    }

    /// Every SSE frame the simulated upstream sends, in order.
    fn frames(&self) -> Vec<Bytes> {
        let mut frames = vec![self.chunk(json!({"role": "assistant", "content": ""}), None)];
        for p in &self.pieces {
            frames.push(self.chunk(json!({ "content": p }), None));
        }
        for (i, (id, name, args)) in self.tool_calls.iter().enumerate() {
            frames.push(self.chunk(
                json!({"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            for piece in split_json(args) {
                frames.push(self.chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                    None,
                ));
            }
        }
        frames.push(self.chunk(json!({}), Some(self.finish_reason)));
        let usage = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [], "usage": self.usage.to_openai(),
        });
        frames.push(encode_event(None, &usage.to_string()));
        frames.push(Bytes::from_static(DONE_EVENT));
        frames
    }
}

struct SimStream {
    frames: std::vec::IntoIter<Bytes>,
    index: usize,
    ttft: Duration,
    gap: Duration,
    /// Frame index at which the connection is cut (injected fault).
    cut_at: Option<usize>,
    cut: bool,
}

fn stream_completion(
    plan: Plan,
    profile: &SimulatedProfile,
    drop_after: Option<u32>,
) -> crate::stream::UpstreamBytes {
    let state = SimStream {
        frames: plan.frames().into_iter(),
        index: 0,
        ttft: profile.ttft,
        gap: token_gap(profile.tokens_per_second),
        // Frame 0 is the role chunk; `drop_after` counts content frames.
        cut_at: drop_after.map(|n| n as usize + 1),
        cut: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.cut {
            return None;
        }
        let frame = s.frames.next()?;
        let i = s.index;
        s.index += 1;
        if Some(i) == s.cut_at {
            s.cut = true;
            let e = GatewayError::new(
                ErrorKind::Upstream,
                "The connection to the provider `simulated` was cut (injected fault).",
            );
            return Some((Err(e), s));
        }
        let wait = match i {
            0 => s.ttft,
            // The role chunk and the first token leave together.
            1 => Duration::ZERO,
            _ => s.gap,
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Some((Ok(frame), s))
    })
    .boxed()
}

fn embeddings(req: &EmbeddingsRequest, model: &str) -> Value {
    let dims = req
        .body
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(256)
        .clamp(1, 4096) as usize;
    let inputs = req.inputs();
    let mut total = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            total += count_tokens(text).max(1);
            let seed = fnv(text.as_bytes());
            let mut v: Vec<f64> = (0..dims)
                .map(|d| {
                    let h =
                        fnv(&(seed ^ (d as u64).wrapping_mul(0x9e3779b97f4a7c15)).to_le_bytes());
                    (h as f64 / u64::MAX as f64) * 2.0 - 1.0
                })
                .collect();
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
                .max(f64::EPSILON);
            v.iter_mut().for_each(|x| *x /= norm);
            json!({ "object": "embedding", "index": i, "embedding": v })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": total, "total_tokens": total },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> ChatRequest {
        ChatRequest::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn directives_parse_and_reject() {
        let d = parse_directives("status=429, retry_after=3").unwrap();
        assert!(matches!(
            d.fault.unwrap().mode,
            FaultMode::Status {
                status: 429,
                retry_after: Some(3)
            }
        ));
        let d = parse_directives("drop_after=2;rate=0.5;ttft_ms=5").unwrap();
        assert_eq!(d.fault.as_ref().unwrap().rate, 0.5);
        assert_eq!(d.ttft_ms, Some(5));
        assert!(parse_directives("status=200").is_err());
        assert!(parse_directives("explode").is_err());
        for bad in [
            "tps=NaN",
            "tps=nan",
            "tps=inf",
            "tps=-inf",
            "tps=-5",
            "tps=0",
            "tps=1e-300",
            "tokens=20000000",
            "tokens=-1",
            "tokens=1.5",
            "ttft_ms=99999999999",
            "retry_after=1e12",
            "drop_after=-3",
            "rate=NaN",
            "rate=2",
            "status=429.5",
        ] {
            let e = parse_directives(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert_eq!(e.status(), 400, "{bad}");
        }
        assert!(parse_directives(&"hang,".repeat(100)).is_err());
        let d = parse_directives("tokens=8192,tps=100000").unwrap();
        assert_eq!((d.tokens, d.tps), (Some(MAX_TOKENS), Some(MAX_TPS)));
    }

    #[test]
    fn profiles_cannot_ask_for_unbounded_answers() {
        let base = SimulatedProfile {
            output_tokens: u32::MAX,
            tokens_per_second: f64::MIN_POSITIVE,
            ..Default::default()
        };
        let p = effective_profile(&base, &Directives::default());
        assert_eq!(p.output_tokens, MAX_TOKENS);
        assert!(token_gap(p.tokens_per_second) <= Duration::from_secs(10));
        assert!(token_gap(f64::NAN) <= Duration::from_secs(10));
    }

    #[test]
    fn completions_are_deterministic_and_accounted() {
        let req = chat(json!({"model":"m","messages":[{"role":"user","content":"hello there"}]}));
        let p = SimulatedProfile {
            output_tokens: 5,
            ..Default::default()
        };
        let a = plan_completion(&req, "m", &p);
        let b = plan_completion(&req, "m", &p);
        assert_eq!(a.pieces, b.pieces);
        assert_eq!(a.usage.completion_tokens, 5);
        assert!(a.usage.prompt_tokens > 0);
        assert_eq!(a.finish_reason, "stop");
        let limited = chat(
            json!({"model":"m","max_tokens":2,"messages":[{"role":"user","content":"hello there"}]}),
        );
        let c = plan_completion(&limited, "m", &p);
        assert_eq!((c.tokens, c.finish_reason), (2, "length"));
    }

    #[test]
    fn tools_and_json_mode() {
        let req = chat(
            json!({"model":"m","messages":[{"role":"user","content":"weather and time in Paris"}],
            "tools":[
              {"type":"function","function":{"name":"weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city"]}}},
              {"type":"function","function":{"name":"time","parameters":{"type":"object","properties":{"tz":{"type":"string","enum":["UTC"]}}}}},
              {"type":"function","function":{"name":"unused","parameters":{}}}]}),
        );
        let p = plan_completion(&req, "m", &SimulatedProfile::default());
        let names: Vec<_> = p.tool_calls.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(names, ["weather", "time"]);
        let args: Value = serde_json::from_str(&p.tool_calls[0].2).unwrap();
        assert_eq!(args["days"], 42);
        assert_eq!(p.finish_reason, "tool_calls");

        let json_req = chat(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "response_format":{"type":"json_schema","json_schema":{"name":"r","schema":{"type":"object","properties":{"ok":{"type":"boolean"}}}}}}),
        );
        let p = plan_completion(&json_req, "m", &SimulatedProfile::default());
        let doc: Value = serde_json::from_str(&p.pieces.concat()).unwrap();
        assert_eq!(doc, json!({"ok": true}));
    }
}
