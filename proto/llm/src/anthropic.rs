//! Anthropic Messages API (`/v1/messages`) ⇄ OpenAI chat completions.
//!
//! Outbound (OpenAI caller, Anthropic upstream): [`chat_request`],
//! [`chat_response`], [`ChatStream`], [`error_from_upstream`].
//! Inbound (the gateway's own Anthropic-compatible endpoint, any upstream):
//! [`messages_to_openai`], [`openai_response_to_messages`],
//! [`MessagesStreamFromOpenAi`].
//!
//! Extended thinking survives the round trip: Anthropic thinking blocks are
//! surfaced as `reasoning_content` (joined text) plus `thinking_blocks` (the
//! raw blocks with their signatures), and `thinking_blocks` on an assistant
//! message in a later request are replayed verbatim as the leading blocks of
//! that turn, which Anthropic requires when tools and thinking are combined.
//!
//! JSON mode: `json_object` becomes a system instruction. `json_schema`
//! becomes a forced tool named [`JSON_TOOL`] whose `input_schema` is the
//! caller's schema (Anthropic's most reliable way to get schema-conformant
//! JSON without a beta header); responses and streams turn that tool call back
//! into plain message content. When the caller also sends tools or enables
//! thinking (which forbids forced tool use) the schema goes into a system
//! instruction instead.

use std::collections::HashMap;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::convert::{
    chunk, content_text, done_frame, effort_budget, frame, image_url_of, insert_opt, is_http_url,
    now_unix, parse_data_url, short, stop_sequences, str_field, tool_call_function, u64_field,
};
use crate::error::{ErrorKind, GatewayError};
use crate::openai::{ChatRequest, Usage};
use crate::sse::{encode_event, SseEvent};
use crate::translate::StreamTranslator;

/// Value of the `anthropic-version` header.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// Name of the forced tool that carries `json_schema` structured output.
pub const JSON_TOOL: &str = "switchyard_json_output";

const JSON_OBJECT_INSTRUCTION: &str = "Respond only with a single valid JSON object. \
Do not wrap it in Markdown code fences and do not add any text before or after it.";

/// Anthropic requires `max_tokens`; OpenAI callers rarely send it. These are
/// comfortable defaults that every model of the family accepts.
pub fn default_max_tokens(model: &str) -> u64 {
    let m = model.to_ascii_lowercase();
    let has = |s: &str| m.contains(s);
    if has("claude-3-5") || has("claude-3.5") || has("claude-3-7") || has("claude-3.7") {
        8192
    } else if has("claude-3") || has("claude-2") || has("claude-instant") {
        4096
    } else if has("claude") {
        // Claude 4.x and later: the smallest output ceiling among them is 32k.
        16384
    } else {
        4096
    }
}

// ---------------------------------------------------------------------------
// OpenAI request → Anthropic request
// ---------------------------------------------------------------------------

pub fn chat_request(req: &ChatRequest, upstream_model: &str) -> Result<Value, GatewayError> {
    let body = req.body();
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(GatewayError::invalid(
            "Invalid 'n': this model returns a single choice; n must be 1.",
        )
        .with_param("n"));
    }

    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in req.messages().iter().enumerate() {
        let role = str_field(m, "role").unwrap_or("");
        match role {
            "system" | "developer" => system.extend(system_blocks(m.get("content"), i)?),
            "user" => push_turn(&mut turns, "user", user_blocks(m.get("content"), i)?),
            "assistant" => push_turn(&mut turns, "assistant", assistant_blocks(m, i)?),
            "tool" => push_turn(&mut turns, "user", vec![tool_result_block(m, i)?]),
            other => {
                return Err(GatewayError::invalid(format!(
                    "Invalid value for 'messages[{i}].role': '{other}' is not supported for this model."
                ))
                .with_param(format!("messages[{i}].role")))
            }
        }
    }
    // Anthropic wants tool results before any other content of a user turn.
    for (role, blocks) in &mut turns {
        if *role == "user" {
            blocks.sort_by_key(|b| str_field(b, "type") != Some("tool_result"));
        }
    }
    // A conversation made only of system/developer text (seen in the wild)
    // has no message for Anthropic; send that text as the user turn instead.
    if turns.is_empty() && !system.is_empty() {
        turns.push(("user", std::mem::take(&mut system)));
    }

    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));

    let caller_max = req.max_tokens();
    let mut max_tokens = caller_max.unwrap_or_else(|| default_max_tokens(upstream_model));
    let thinking = thinking_config(body, caller_max, &mut max_tokens);
    let thinking_on = thinking
        .as_ref()
        .is_some_and(|t| str_field(t, "type") != Some("disabled"));

    let mut tools: Vec<Value> = Vec::new();
    if let Some(list) = body.get("tools").and_then(Value::as_array) {
        for (i, t) in list.iter().enumerate() {
            tools.push(tool_def(t, i)?);
        }
    }
    let mut tool_choice = tool_choice(body.get("tool_choice"))?;

    match body.get("response_format") {
        Some(rf) if str_field(rf, "type") == Some("json_object") => {
            system.push(text_block(JSON_OBJECT_INSTRUCTION));
        }
        Some(rf) if str_field(rf, "type") == Some("json_schema") => {
            let spec = rf.get("json_schema");
            let schema = spec
                .and_then(|s| s.get("schema"))
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            let object_schema = str_field(&schema, "type") == Some("object");
            if tools.is_empty() && !thinking_on && object_schema {
                let mut def = Map::new();
                def.insert("name".into(), json!(JSON_TOOL));
                let description = spec
                    .and_then(|s| str_field(s, "description"))
                    .unwrap_or("Return the final answer as JSON matching this schema.");
                def.insert("description".into(), json!(description));
                def.insert("input_schema".into(), schema);
                tools.push(Value::Object(def));
                tool_choice = Some(json!({"type": "tool", "name": JSON_TOOL}));
            } else {
                system.push(text_block(&format!(
                    "{JSON_OBJECT_INSTRUCTION} The JSON must conform to this JSON Schema: {schema}"
                )));
            }
        }
        _ => {}
    }

    if !system.is_empty() {
        let cached = system.iter().any(|b| b.get("cache_control").is_some());
        if cached {
            out.insert("system".into(), Value::Array(system));
        } else {
            let text = system
                .iter()
                .filter_map(|b| str_field(b, "text"))
                .collect::<Vec<_>>()
                .join("\n\n");
            out.insert("system".into(), json!(text));
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(max_tokens));

    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if body.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let tc = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if str_field(tc, "type") != Some("none") {
            if let Some(o) = tc.as_object_mut() {
                o.insert("disable_parallel_tool_use".into(), json!(true));
            }
        }
    }
    if let Some(tc) = tool_choice {
        // tool_choice without tools is rejected upstream; "none" likewise.
        if out.contains_key("tools") {
            out.insert("tool_choice".into(), tc);
        }
    }
    if let Some(stops) = stop_sequences(body.get("stop")) {
        out.insert("stop_sequences".into(), Value::Array(stops));
    }
    if thinking_on {
        // Anthropic rejects sampling parameters other than the defaults while
        // thinking, so they are dropped rather than failing the request.
    } else {
        insert_opt(&mut out, "temperature", body.get("temperature"));
        insert_opt(&mut out, "top_p", body.get("top_p"));
        insert_opt(&mut out, "top_k", body.get("top_k"));
    }
    if let Some(t) = thinking {
        out.insert("thinking".into(), t);
    }
    if let Some(user) = body.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if req.stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// The Anthropic `thinking` object: a passthrough `thinking` field wins,
/// otherwise `reasoning_effort` picks a budget. `max_tokens` must exceed the
/// budget, so one of the two is adjusted when the caller did not pin it.
fn thinking_config(
    body: &Map<String, Value>,
    caller_max: Option<u64>,
    max_tokens: &mut u64,
) -> Option<Value> {
    if let Some(t @ Value::Object(_)) = body.get("thinking") {
        if let Some(budget) = t.get("budget_tokens").and_then(Value::as_u64) {
            if caller_max.is_none() && *max_tokens <= budget {
                *max_tokens += budget;
            }
        }
        return Some(t.clone());
    }
    let effort = body.get("reasoning_effort").and_then(Value::as_str)?;
    let mut budget = effort_budget(effort)?;
    if *max_tokens <= budget {
        if caller_max.is_none() {
            *max_tokens += budget;
        } else if *max_tokens > 1024 {
            budget = (*max_tokens / 2).max(1024);
        } else {
            return None;
        }
    }
    Some(json!({"type": "enabled", "budget_tokens": budget}))
}

fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((last, content)) if *last == role => content.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

fn text_block_from_part(part: &Value) -> Option<Value> {
    let text = str_field(part, "text").or_else(|| str_field(part, "refusal"))?;
    if text.is_empty() {
        return None;
    }
    let mut b = text_block(text);
    if let (Some(cc), Some(o)) = (part.get("cache_control"), b.as_object_mut()) {
        o.insert("cache_control".into(), cc.clone());
    }
    Some(b)
}

fn system_blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, GatewayError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => Ok(parts.iter().filter_map(text_block_from_part).collect()),
        Some(_) => Err(invalid_content(i)),
    }
}

fn invalid_content(i: usize) -> GatewayError {
    GatewayError::invalid(format!(
        "Invalid type for 'messages[{i}].content': expected a string or an array of content parts."
    ))
    .with_param(format!("messages[{i}].content"))
}

fn user_blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![text_block(s)]),
        Some(Value::Array(parts)) => parts,
        Some(_) => return Err(invalid_content(i)),
    };
    let mut blocks = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        match str_field(part, "type") {
            Some("text") => blocks.extend(text_block_from_part(part)),
            Some("image_url") => {
                let url = image_url_of(part).ok_or_else(|| {
                    GatewayError::invalid(format!(
                        "Missing required parameter: '{param}.image_url.url'."
                    ))
                    .with_param(param.clone())
                })?;
                blocks.push(media_block(url, &param)?);
            }
            Some("file") => {
                let data = part
                    .get("file")
                    .and_then(|f| str_field(f, "file_data"))
                    .ok_or_else(|| {
                        GatewayError::invalid(format!(
                            "Invalid '{param}': only inline 'file_data' files are supported for this model."
                        ))
                        .with_param(param.clone())
                    })?;
                blocks.push(media_block(data, &param)?);
            }
            other => {
                return Err(GatewayError::invalid(format!(
                    "Invalid '{param}.type': '{}' content is not supported for this model.",
                    other.unwrap_or("(missing)")
                ))
                .with_param(param))
            }
        }
    }
    Ok(blocks)
}

/// An image or document block from a data URL or an http(s) URL.
fn media_block(url: &str, param: &str) -> Result<Value, GatewayError> {
    if let Some((media_type, data)) = parse_data_url(url) {
        let kind = if media_type == "application/pdf" {
            "document"
        } else {
            "image"
        };
        return Ok(json!({
            "type": kind,
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }));
    }
    if is_http_url(url) {
        let kind = if url.to_ascii_lowercase().ends_with(".pdf") {
            "document"
        } else {
            "image"
        };
        return Ok(json!({"type": kind, "source": {"type": "url", "url": url}}));
    }
    Err(GatewayError::invalid(format!(
        "Invalid '{param}': expected a base64 data URL or an http(s) URL."
    ))
    .with_param(param))
}

fn assistant_blocks(m: &Value, i: usize) -> Result<Vec<Value>, GatewayError> {
    let mut blocks = Vec::new();
    // Signed thinking blocks must lead the turn, exactly as they were
    // received; unsigned ones cannot be verified upstream and are dropped.
    if let Some(list) = m.get("thinking_blocks").and_then(Value::as_array) {
        for b in list {
            match str_field(b, "type") {
                Some("thinking") => {
                    if let (Some(t), Some(sig)) =
                        (str_field(b, "thinking"), str_field(b, "signature"))
                    {
                        if !sig.is_empty() {
                            blocks
                                .push(json!({"type": "thinking", "thinking": t, "signature": sig}));
                        }
                    }
                }
                Some("redacted_thinking") => {
                    if let Some(data) = str_field(b, "data") {
                        blocks.push(json!({"type": "redacted_thinking", "data": data}));
                    }
                }
                _ => {}
            }
        }
    }
    match m.get("content") {
        Some(Value::String(s)) if !s.is_empty() => blocks.push(text_block(s)),
        Some(Value::Array(parts)) => blocks.extend(parts.iter().filter_map(text_block_from_part)),
        _ => {}
    }
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        for (j, call) in calls.iter().enumerate() {
            let param = format!("messages[{i}].tool_calls[{j}]");
            let id = str_field(call, "id").ok_or_else(|| {
                GatewayError::invalid(format!("Missing required parameter: '{param}.id'."))
                    .with_param(format!("{param}.id"))
            })?;
            let (name, input) = tool_call_function(call, &param)?;
            blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        }
    }
    Ok(blocks)
}

fn tool_result_block(m: &Value, i: usize) -> Result<Value, GatewayError> {
    let id = str_field(m, "tool_call_id").ok_or_else(|| {
        GatewayError::invalid(format!(
            "Missing required parameter: 'messages[{i}].tool_call_id'."
        ))
        .with_param(format!("messages[{i}].tool_call_id"))
    })?;
    let content = match m.get("content") {
        Some(Value::Array(parts)) => {
            Value::Array(parts.iter().filter_map(text_block_from_part).collect())
        }
        other => json!(content_text(other)),
    };
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// Anthropic server tools (`web_search_20250305`, ...) have a versioned type
/// of their own; they reach the hub only through the gateway's
/// `/v1/messages` endpoint and are forwarded untouched.
fn is_server_tool(t: &Value) -> bool {
    str_field(t, "type").is_some_and(|k| k != "function" && k != "custom")
        && str_field(t, "name").is_some()
}

fn tool_def(t: &Value, i: usize) -> Result<Value, GatewayError> {
    if is_server_tool(t) {
        return Ok(t.clone());
    }
    let kind = str_field(t, "type").unwrap_or("function");
    let f = t.get("function").filter(|_| kind == "function");
    let name = f.and_then(|f| str_field(f, "name")).ok_or_else(|| {
        GatewayError::invalid(format!(
            "Invalid 'tools[{i}]': only function tools with a name are supported for this model."
        ))
        .with_param(format!("tools[{i}]"))
    })?;
    let mut def = Map::new();
    def.insert("name".into(), json!(name));
    if let Some(d) = f.and_then(|f| str_field(f, "description")) {
        def.insert("description".into(), json!(d));
    }
    let schema = f
        .and_then(|f| f.get("parameters"))
        .filter(|p| p.is_object())
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    def.insert("input_schema".into(), schema);
    insert_opt(&mut def, "cache_control", t.get("cache_control"));
    Ok(Value::Object(def))
}

fn tool_choice(tc: Option<&Value>) -> Result<Option<Value>, GatewayError> {
    let bad = || {
        GatewayError::invalid(
            "Invalid 'tool_choice': expected 'auto', 'none', 'required' or a function object.",
        )
        .with_param("tool_choice")
    };
    Ok(match tc {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            _ => return Err(bad()),
        },
        Some(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| str_field(f, "name"))
                .ok_or_else(bad)?;
            Some(json!({"type": "tool", "name": name}))
        }
    })
}

// ---------------------------------------------------------------------------
// Anthropic response → OpenAI response
// ---------------------------------------------------------------------------

fn finish_reason(stop_reason: Option<&str>, has_tool_calls: bool) -> &'static str {
    match stop_reason {
        Some("max_tokens") | Some("model_context_window_exceeded") => "length",
        Some("tool_use") if has_tool_calls => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

fn usage_from(u: Option<&Value>) -> Usage {
    let input = u64_field(u, "input_tokens");
    let read = u64_field(u, "cache_read_input_tokens");
    let write = u64_field(u, "cache_creation_input_tokens");
    Usage {
        prompt_tokens: input + read + write,
        completion_tokens: u64_field(u, "output_tokens"),
        cached_tokens: read,
        // Anthropic counts thinking inside `output_tokens` without a split.
        reasoning_tokens: 0,
    }
}

/// OpenAI usage JSON plus the cache-write count, which OpenAI has no field
/// for but billing downstream wants.
fn usage_json(usage: Usage, cache_write: u64) -> Value {
    let mut v = usage.to_openai();
    if cache_write > 0 {
        if let Some(o) = v.as_object_mut() {
            o.insert("cache_creation_input_tokens".into(), json!(cache_write));
        }
    }
    v
}

fn upstream_shape_error() -> GatewayError {
    GatewayError::new(
        ErrorKind::Upstream,
        "The upstream provider returned a response the gateway could not understand.",
    )
}

pub fn chat_response(body: &Value, model: &str) -> Result<(Value, Usage), GatewayError> {
    if str_field(body, "type") == Some("error") {
        return Err(error_from_value(0, body, None));
    }
    let blocks = body
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(upstream_shape_error)?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut thinking_blocks = Vec::new();
    let mut tool_calls = Vec::new();
    for b in blocks {
        match str_field(b, "type") {
            Some("text") => text.push_str(str_field(b, "text").unwrap_or("")),
            Some("thinking") => {
                let t = str_field(b, "thinking").unwrap_or("");
                reasoning.push_str(t);
                thinking_blocks.push(json!({
                    "type": "thinking",
                    "thinking": t,
                    "signature": str_field(b, "signature").unwrap_or(""),
                }));
            }
            Some("redacted_thinking") => thinking_blocks.push(json!({
                "type": "redacted_thinking",
                "data": str_field(b, "data").unwrap_or(""),
            })),
            Some("tool_use") => {
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                if str_field(b, "name") == Some(JSON_TOOL) {
                    text.push_str(&input.to_string());
                    continue;
                }
                tool_calls.push(json!({
                    "id": str_field(b, "id").unwrap_or(""),
                    "type": "function",
                    "function": {
                        "name": str_field(b, "name").unwrap_or(""),
                        "arguments": input.to_string(),
                    },
                }));
            }
            // Server tools (web search, code execution) run upstream; their
            // results are reflected in the text that follows.
            _ => {}
        }
    }
    let stop_reason = str_field(body, "stop_reason");
    let finish = finish_reason(stop_reason, !tool_calls.is_empty());
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        json!(text)
    };
    message.insert("content".into(), content);
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    if !thinking_blocks.is_empty() {
        message.insert("reasoning_content".into(), json!(reasoning));
        message.insert("thinking_blocks".into(), Value::Array(thinking_blocks));
    }
    let u = body.get("usage");
    let usage = usage_from(u);
    let resp = json!({
        "id": str_field(body, "id").unwrap_or("msg"),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": Value::Object(message),
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": usage_json(usage, u64_field(u, "cache_creation_input_tokens")),
    });
    Ok((resp, usage))
}

// ---------------------------------------------------------------------------
// Anthropic SSE → OpenAI chunks
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Text,
    /// Thinking block, numbered in order of appearance for `thinking_blocks`.
    Thinking(u64),
    /// Client tool call with its OpenAI `tool_calls` index.
    Tool(u64),
    /// The structured-output tool: its arguments are the message content.
    JsonTool,
    Ignored,
}

/// Anthropic stream → OpenAI `chat.completion.chunk` frames.
///
/// Thinking is streamed both as `reasoning_content` text and as
/// `thinking_blocks` deltas carrying an `index`; merging the deltas by index
/// (as clients already do for `tool_calls`) rebuilds each block with its
/// signature, ready to be sent back.
#[derive(Debug)]
pub struct ChatStream {
    model: String,
    include_usage: bool,
    id: String,
    created: u64,
    role_sent: bool,
    blocks: HashMap<u64, Block>,
    next_tool: u64,
    /// Tool calls that received argument text; a tool without parameters
    /// streams only empty `partial_json`, and OpenAI clients expect `{}`.
    tools_with_args: std::collections::HashSet<u64>,
    next_thinking: u64,
    usage: Option<Usage>,
    cache_write: u64,
    finish: Option<&'static str>,
    stopped: bool,
    failed: bool,
}

impl ChatStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        ChatStream {
            model: model.to_string(),
            include_usage,
            id: "msg".to_string(),
            created: now_unix(),
            role_sent: false,
            blocks: HashMap::new(),
            next_tool: 0,
            tools_with_args: Default::default(),
            next_thinking: 0,
            usage: None,
            cache_write: 0,
            finish: None,
            stopped: false,
            failed: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<Bytes>, mut delta: Value, finish: Option<&str>) {
        if !self.role_sent {
            self.role_sent = true;
            if let Some(o) = delta.as_object_mut() {
                o.insert("role".into(), json!("assistant"));
            }
        }
        out.push(frame(&chunk(
            &self.id,
            self.created,
            &self.model,
            0,
            delta,
            finish,
        )));
    }

    fn merge_usage(&mut self, u: Option<&Value>) {
        let Some(u) = u.filter(|u| u.is_object()) else {
            return;
        };
        let mut cur = self.usage.unwrap_or_default();
        // message_delta usage is cumulative and, since 2025, may repeat the
        // input counts; only fields present overwrite what we have.
        let has = |k: &str| u.get(k).and_then(Value::as_u64).is_some();
        if has("input_tokens")
            || has("cache_read_input_tokens")
            || has("cache_creation_input_tokens")
        {
            let fresh = usage_from(Some(u));
            cur.prompt_tokens = fresh.prompt_tokens;
            cur.cached_tokens = fresh.cached_tokens;
            self.cache_write = u64_field(Some(u), "cache_creation_input_tokens");
        }
        if has("output_tokens") {
            cur.completion_tokens = u64_field(Some(u), "output_tokens");
        }
        self.usage = Some(cur);
    }
}

/// Anthropic `error.type` → our class.
fn kind_for_error_type(t: &str) -> Option<ErrorKind> {
    Some(match t {
        "invalid_request_error" => ErrorKind::InvalidRequest,
        "authentication_error" | "permission_error" => ErrorKind::Upstream,
        "not_found_error" => ErrorKind::ModelNotFound,
        "request_too_large" => ErrorKind::PayloadTooLarge,
        "rate_limit_error" => ErrorKind::RateLimited,
        "overloaded_error" => ErrorKind::Overloaded,
        "timeout_error" => ErrorKind::Timeout,
        "api_error" => ErrorKind::Upstream,
        _ => return None,
    })
}

impl StreamTranslator for ChatStream {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if self.failed || self.stopped {
            return Ok(());
        }
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            // Keep-alives and comments carry no JSON.
            return Ok(());
        };
        let kind = str_field(&data, "type")
            .map(str::to_string)
            .or_else(|| event.event.clone())
            .unwrap_or_default();
        match kind.as_str() {
            "message_start" => {
                let msg = data.get("message");
                if let Some(id) = msg.and_then(|m| str_field(m, "id")) {
                    self.id = id.to_string();
                }
                self.merge_usage(msg.and_then(|m| m.get("usage")));
                self.emit(out, json!({"content": ""}), None);
            }
            "content_block_start" => {
                let index = u64_field(Some(&data), "index");
                let cb = data.get("content_block").cloned().unwrap_or(Value::Null);
                let block = match str_field(&cb, "type") {
                    Some("text") => {
                        let t = str_field(&cb, "text").unwrap_or("");
                        if !t.is_empty() {
                            self.emit(out, json!({"content": t}), None);
                        }
                        Block::Text
                    }
                    Some("thinking") => {
                        let n = self.next_thinking;
                        self.next_thinking += 1;
                        Block::Thinking(n)
                    }
                    Some("redacted_thinking") => {
                        let n = self.next_thinking;
                        self.next_thinking += 1;
                        let d = str_field(&cb, "data").unwrap_or("");
                        self.emit(
                            out,
                            json!({"thinking_blocks": [{"index": n, "type": "redacted_thinking", "data": d}]}),
                            None,
                        );
                        Block::Ignored
                    }
                    Some("tool_use") if str_field(&cb, "name") == Some(JSON_TOOL) => {
                        Block::JsonTool
                    }
                    Some("tool_use") => {
                        let n = self.next_tool;
                        self.next_tool += 1;
                        let delta = json!({"tool_calls": [{
                            "index": n,
                            "id": str_field(&cb, "id").unwrap_or(""),
                            "type": "function",
                            "function": {"name": str_field(&cb, "name").unwrap_or(""), "arguments": ""},
                        }]});
                        self.emit(out, delta, None);
                        Block::Tool(n)
                    }
                    _ => Block::Ignored,
                };
                self.blocks.insert(index, block);
            }
            "content_block_delta" => {
                let index = u64_field(Some(&data), "index");
                let block = self.blocks.get(&index).copied().unwrap_or(Block::Ignored);
                let d = data.get("delta").cloned().unwrap_or(Value::Null);
                let delta = match (str_field(&d, "type"), block) {
                    (Some("text_delta"), _) => str_field(&d, "text").map(|t| json!({"content": t})),
                    (Some("thinking_delta"), Block::Thinking(n)) => str_field(&d, "thinking").map(|t| {
                        json!({
                            "reasoning_content": t,
                            "thinking_blocks": [{"index": n, "type": "thinking", "thinking": t}],
                        })
                    }),
                    (Some("signature_delta"), Block::Thinking(n)) => str_field(&d, "signature").map(|s| {
                        json!({"thinking_blocks": [{"index": n, "type": "thinking", "signature": s}]})
                    }),
                    (Some("input_json_delta"), Block::Tool(n)) => str_field(&d, "partial_json")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            self.tools_with_args.insert(n);
                            json!({"tool_calls": [{"index": n, "function": {"arguments": p}}]})
                        }),
                    (Some("input_json_delta"), Block::JsonTool) => str_field(&d, "partial_json")
                        .filter(|p| !p.is_empty())
                        .map(|p| json!({"content": p})),
                    _ => None,
                };
                if let Some(delta) = delta {
                    self.emit(out, delta, None);
                }
            }
            "message_delta" => {
                self.merge_usage(data.get("usage"));
                let stop = data.get("delta").and_then(|d| str_field(d, "stop_reason"));
                if stop.is_some() {
                    let finish = finish_reason(stop, self.next_tool > 0);
                    self.finish = Some(finish);
                    self.emit(out, json!({}), Some(finish));
                }
            }
            "content_block_stop" => {
                let index = u64_field(Some(&data), "index");
                if let Some(Block::Tool(n)) = self.blocks.get(&index).copied() {
                    if !self.tools_with_args.contains(&n) {
                        let delta =
                            json!({"tool_calls": [{"index": n, "function": {"arguments": "{}"}}]});
                        self.emit(out, delta, None);
                    }
                }
            }
            "message_stop" => self.stopped = true,
            "error" => {
                // Status 0: a mid-stream error has only its type to go by.
                // Returned, not framed here: the stream layer renders it in
                // the caller's protocol and records the failure.
                self.failed = true;
                return Err(error_from_value(0, &data, None));
            }
            // ping, content_block_stop and future event types carry nothing
            // an OpenAI client needs.
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.failed {
            return;
        }
        if self.include_usage {
            if let Some(u) = self.usage {
                out.push(frame(&json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_json(u, self.cache_write),
                })));
            }
        }
        out.push(done_frame());
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn completed(&self) -> bool {
        self.finish.is_some()
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

pub fn error_from_upstream(status: u16, body: &[u8], retry_after: Option<String>) -> GatewayError {
    let parsed = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    error_from_value(status, &parsed, retry_after)
}

/// Maps an Anthropic error document (or `Null` when the body was not JSON).
fn error_from_value(status: u16, v: &Value, retry_after: Option<String>) -> GatewayError {
    let err = v.get("error");
    let etype = err.and_then(|e| str_field(e, "type")).unwrap_or("");
    let upstream_msg = err.and_then(|e| str_field(e, "message")).map(short);
    let kind = match status {
        401 | 403 => ErrorKind::Upstream,
        529 => ErrorKind::Overloaded,
        _ if etype == "authentication_error" || etype == "permission_error" => ErrorKind::Upstream,
        _ if etype == "overloaded_error" => ErrorKind::Overloaded,
        429 => ErrorKind::RateLimited,
        400 | 422 => ErrorKind::InvalidRequest,
        404 => ErrorKind::ModelNotFound,
        413 => ErrorKind::PayloadTooLarge,
        s if (500..600).contains(&s) && s != 503 && s != 504 => ErrorKind::Upstream,
        _ => kind_for_error_type(etype)
            .unwrap_or_else(|| GatewayError::kind_for_upstream_status(status)),
    };
    let detail = |fallback: &str| upstream_msg.clone().unwrap_or_else(|| fallback.to_string());
    match kind {
        // The text may quote part of the key; never pass it on.
        ErrorKind::Upstream
            if matches!(status, 401 | 403)
                || etype == "authentication_error"
                || etype == "permission_error" =>
        {
            GatewayError::new(
                ErrorKind::Upstream,
                "The upstream provider rejected the gateway's credentials.",
            )
        }
        ErrorKind::Overloaded => GatewayError::new(
            kind,
            format!(
                "The upstream provider is overloaded: {}",
                detail("please retry later.")
            ),
        )
        .with_retry_after(retry_after),
        ErrorKind::RateLimited => GatewayError::new(
            kind,
            detail("The upstream provider rate limited the request."),
        )
        .with_retry_after(retry_after),
        ErrorKind::ModelNotFound => GatewayError::new(kind, detail("The model does not exist."))
            .with_code("model_not_found")
            .with_param("model"),
        ErrorKind::InvalidRequest | ErrorKind::PayloadTooLarge => {
            GatewayError::new(kind, detail("The upstream provider rejected the request."))
        }
        _ => GatewayError::new(
            kind,
            match (upstream_msg, status) {
                (Some(m), 0) => format!("The upstream provider failed: {m}"),
                (Some(m), _) => format!("The upstream provider failed (HTTP {status}): {m}"),
                (None, 0) => "The upstream provider failed.".to_string(),
                (None, _) => format!("The upstream provider failed with HTTP {status}."),
            },
        )
        .with_retry_after(retry_after),
    }
}

// ---------------------------------------------------------------------------
// Inbound: Anthropic request → OpenAI request
// ---------------------------------------------------------------------------

fn field_required(field: &str) -> GatewayError {
    GatewayError::invalid(format!("{field}: Field required")).with_param(field)
}

pub fn messages_to_openai(body: Map<String, Value>) -> Result<ChatRequest, GatewayError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        None | Some(Value::Null) => return Err(field_required("model")),
        Some(_) => {
            return Err(
                GatewayError::invalid("model: Input should be a valid string").with_param("model"),
            )
        }
    }
    let max_tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => return Err(field_required("max_tokens")),
        Some(v) => v.as_u64().ok_or_else(|| {
            GatewayError::invalid("max_tokens: Input should be a valid integer")
                .with_param("max_tokens")
        })?,
    };
    let messages = match body.get("messages") {
        None | Some(Value::Null) => return Err(field_required("messages")),
        Some(Value::Array(m)) => m,
        Some(_) => {
            return Err(
                GatewayError::invalid("messages: Input should be a valid list")
                    .with_param("messages"),
            )
        }
    };

    let mut out_msgs: Vec<Value> = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out_msgs.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let parts: Vec<Value> = blocks
                .iter()
                .filter(|b| str_field(b, "type") == Some("text"))
                .map(openai_text_part)
                .collect();
            out_msgs.push(json!({"role": "system", "content": parts}));
        }
        Some(_) => {
            return Err(GatewayError::invalid(
                "system: Input should be a valid string or list of text blocks",
            )
            .with_param("system"))
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if !m.is_object() {
            return Err(GatewayError::invalid(format!(
                "messages.{i}: Input should be a valid dictionary"
            ))
            .with_param(format!("messages.{i}")));
        }
        let role = str_field(m, "role");
        let content = m.get("content");
        match role {
            Some("user") => inbound_user(content, i, &mut out_msgs)?,
            Some("assistant") => out_msgs.push(inbound_assistant(content, i)?),
            _ => {
                return Err(GatewayError::invalid(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                ))
                .with_param(format!("messages.{i}.role")))
            }
        }
    }

    let mut out = Map::new();
    out.insert(
        "model".into(),
        body.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(out_msgs));
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(stops) = stop_sequences(body.get("stop_sequences")) {
        out.insert("stop".into(), Value::Array(stops));
    }
    for k in ["temperature", "top_p", "top_k"] {
        insert_opt(&mut out, k, body.get(k));
    }
    if let Some(t) = body.get("thinking").filter(|t| t.is_object()) {
        // Passed through in Anthropic's own shape: the Anthropic adapter uses
        // it as-is and other adapters may derive an effort from it.
        out.insert("thinking".into(), t.clone());
    }
    if let Some(of) = body
        .get("output_format")
        .filter(|f| str_field(f, "type") == Some("json_schema"))
    {
        let schema = of
            .get("schema")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object"}));
        out.insert(
            "response_format".into(),
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}),
        );
    }
    if let Some(user) = body.get("metadata").and_then(|m| str_field(m, "user_id")) {
        out.insert("user".into(), json!(user));
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let mut list = Vec::new();
        for (i, t) in tools.iter().enumerate() {
            if is_server_tool(t) {
                list.push(t.clone());
                continue;
            }
            let name =
                str_field(t, "name").ok_or_else(|| field_required(&format!("tools.{i}.name")))?;
            let mut f = Map::new();
            f.insert("name".into(), json!(name));
            insert_opt(&mut f, "description", t.get("description"));
            f.insert(
                "parameters".into(),
                t.get("input_schema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            );
            list.push(json!({"type": "function", "function": Value::Object(f)}));
        }
        if !list.is_empty() {
            out.insert("tools".into(), Value::Array(list));
        }
    }
    if let Some(tc) = body.get("tool_choice").filter(|v| v.is_object()) {
        let mapped = match str_field(tc, "type") {
            Some("auto") => Some(json!("auto")),
            Some("any") => Some(json!("required")),
            Some("none") => Some(json!("none")),
            Some("tool") => {
                str_field(tc, "name").map(|n| json!({"type": "function", "function": {"name": n}}))
            }
            _ => None,
        };
        if let Some(m) = mapped {
            out.insert("tool_choice".into(), m);
        }
        if tc.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if body.get("stream") == Some(&Value::Bool(true)) {
        out.insert("stream".into(), json!(true));
        // The Anthropic stream ends with output token counts, so ask for them.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    ChatRequest::from_map(out)
}

fn openai_text_part(b: &Value) -> Value {
    let mut p = json!({"type": "text", "text": str_field(b, "text").unwrap_or("")});
    if let (Some(cc), Some(o)) = (b.get("cache_control"), p.as_object_mut()) {
        o.insert("cache_control".into(), cc.clone());
    }
    p
}

fn anthropic_source_url(source: Option<&Value>) -> Option<String> {
    let s = source?;
    match str_field(s, "type")? {
        "base64" => Some(format!(
            "data:{};base64,{}",
            str_field(s, "media_type")?,
            str_field(s, "data")?
        )),
        "url" => str_field(s, "url").map(str::to_string),
        _ => None,
    }
}

fn inbound_block_error(i: usize, j: usize, what: &str) -> GatewayError {
    GatewayError::invalid(format!("messages.{i}.content.{j}: {what}"))
        .with_param(format!("messages.{i}.content.{j}"))
}

fn inbound_user(
    content: Option<&Value>,
    i: usize,
    out: &mut Vec<Value>,
) -> Result<(), GatewayError> {
    let blocks = match content {
        Some(Value::String(s)) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Some(Value::Array(b)) => b,
        _ => return Err(field_required(&format!("messages.{i}.content"))),
    };
    let mut parts = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match str_field(b, "type") {
            Some("text") => parts.push(openai_text_part(b)),
            Some("image") => {
                let url = anthropic_source_url(b.get("source"))
                    .ok_or_else(|| inbound_block_error(i, j, "unsupported image source"))?;
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            Some("document") => {
                let url = anthropic_source_url(b.get("source"))
                    .ok_or_else(|| inbound_block_error(i, j, "unsupported document source"))?;
                parts.push(json!({"type": "file", "file": {"file_data": url}}));
            }
            Some("tool_result") => {
                let id = str_field(b, "tool_use_id")
                    .ok_or_else(|| inbound_block_error(i, j, "tool_use_id: Field required"))?;
                let content = match b.get("content") {
                    Some(Value::Array(items)) => items
                        .iter()
                        .filter_map(|x| str_field(x, "text"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                };
                let content = if b.get("is_error") == Some(&Value::Bool(true)) {
                    format!("Error: {content}")
                } else {
                    content
                };
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            other => {
                return Err(inbound_block_error(
                    i,
                    j,
                    &format!(
                        "content block type '{}' is not supported",
                        other.unwrap_or("(missing)")
                    ),
                ))
            }
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn inbound_assistant(content: Option<&Value>, i: usize) -> Result<Value, GatewayError> {
    let blocks = match content {
        Some(Value::String(s)) => return Ok(json!({"role": "assistant", "content": s})),
        Some(Value::Array(b)) => b,
        _ => return Err(field_required(&format!("messages.{i}.content"))),
    };
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut thinking_blocks = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match str_field(b, "type") {
            Some("text") => text.push_str(str_field(b, "text").unwrap_or("")),
            Some("thinking") => {
                reasoning.push_str(str_field(b, "thinking").unwrap_or(""));
                thinking_blocks.push(b.clone());
            }
            Some("redacted_thinking") => thinking_blocks.push(b.clone()),
            Some("tool_use") => tool_calls.push(json!({
                "id": str_field(b, "id").unwrap_or(""),
                "type": "function",
                "function": {
                    "name": str_field(b, "name").unwrap_or(""),
                    "arguments": b.get("input").cloned().unwrap_or_else(|| json!({})).to_string(),
                },
            })),
            other => {
                return Err(inbound_block_error(
                    i,
                    j,
                    &format!(
                        "content block type '{}' is not supported",
                        other.unwrap_or("(missing)")
                    ),
                ))
            }
        }
    }
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        json!(text)
    };
    m.insert("content".into(), content);
    if !tool_calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(tool_calls));
    }
    if !thinking_blocks.is_empty() {
        m.insert("reasoning_content".into(), json!(reasoning));
        m.insert("thinking_blocks".into(), Value::Array(thinking_blocks));
    }
    Ok(Value::Object(m))
}

// ---------------------------------------------------------------------------
// Inbound: OpenAI response → Anthropic message
// ---------------------------------------------------------------------------

fn stop_reason_from_finish(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn anthropic_message_id(id: Option<&str>) -> String {
    match id {
        Some(id) if id.starts_with("msg_") => id.to_string(),
        Some(id) if !id.is_empty() => format!("msg_{id}"),
        _ => format!("msg_{}", now_unix()),
    }
}

fn anthropic_usage(u: Option<&Value>) -> Value {
    let usage = u.and_then(Usage::from_openai).unwrap_or_default();
    json!({
        "input_tokens": usage.prompt_tokens.saturating_sub(usage.cached_tokens),
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

pub fn openai_response_to_messages(resp: &Value, model: &str) -> Value {
    let choice = resp
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let msg = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    if let Some(m) = msg {
        match m.get("thinking_blocks").and_then(Value::as_array) {
            Some(blocks) if !blocks.is_empty() => content.extend(blocks.iter().cloned()),
            _ => {
                let r = str_field(m, "reasoning_content").unwrap_or("");
                if !r.is_empty() {
                    content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
                }
            }
        }
        let text = content_text(m.get("content"));
        let text = if text.is_empty() {
            str_field(m, "refusal").unwrap_or("").to_string()
        } else {
            text
        };
        if !text.is_empty() {
            content.push(text_block(&text));
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = call.get("function");
            let args = f.and_then(|f| str_field(f, "arguments")).unwrap_or("");
            let input = serde_json::from_str::<Value>(args)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            content.push(json!({
                "type": "tool_use",
                "id": str_field(call, "id").unwrap_or(""),
                "name": f.and_then(|f| str_field(f, "name")).unwrap_or(""),
                "input": input,
            }));
        }
    }
    json!({
        "id": anthropic_message_id(str_field(resp, "id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason_from_finish(choice.and_then(|c| str_field(c, "finish_reason"))),
        "stop_sequence": null,
        "usage": anthropic_usage(resp.get("usage")),
    })
}

// ---------------------------------------------------------------------------
// Inbound: OpenAI chunks → Anthropic SSE
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpenBlock {
    Text,
    Thinking,
    Tool(u64),
}

/// OpenAI `chat.completion.chunk` stream → Anthropic Messages event stream.
/// Only choice 0 is translated: Anthropic has no notion of several choices.
#[derive(Debug)]
pub struct MessagesStreamFromOpenAi {
    model: String,
    started: bool,
    open: Option<OpenBlock>,
    next_index: u64,
    finish: Option<String>,
    usage: Option<Usage>,
    ended: bool,
}

impl MessagesStreamFromOpenAi {
    pub fn new(model: &str) -> Self {
        MessagesStreamFromOpenAi {
            model: model.to_string(),
            started: false,
            open: None,
            next_index: 0,
            finish: None,
            usage: None,
            ended: false,
        }
    }

    fn send(out: &mut Vec<Bytes>, name: &str, v: Value) {
        out.push(encode_event(Some(name), &v.to_string()));
    }

    fn start(&mut self, id: Option<&str>, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        Self::send(
            out,
            "message_start",
            json!({"type": "message_start", "message": {
                "id": anthropic_message_id(id),
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        );
    }

    fn close_block(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            let index = self.next_index - 1;
            Self::send(
                out,
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Makes `want` the open block, starting it with `start_block` if needed;
    /// returns its Anthropic index.
    fn ensure_block(&mut self, want: OpenBlock, start_block: Value, out: &mut Vec<Bytes>) -> u64 {
        if self.open != Some(want) {
            self.close_block(out);
            let index = self.next_index;
            self.next_index += 1;
            Self::send(
                out,
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": start_block}),
            );
            self.open = Some(want);
        }
        self.next_index - 1
    }

    fn delta(out: &mut Vec<Bytes>, index: u64, delta: Value) {
        Self::send(
            out,
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if self.ended || self.finish.is_none() {
            return;
        }
        self.ended = true;
        self.start(None, out);
        self.close_block(out);
        let usage = self.usage.unwrap_or_default();
        Self::send(
            out,
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason_from_finish(self.finish.as_deref()),
                    "stop_sequence": null,
                },
                "usage": {
                    "input_tokens": usage.prompt_tokens.saturating_sub(usage.cached_tokens),
                    "cache_read_input_tokens": usage.cached_tokens,
                    "output_tokens": usage.completion_tokens,
                },
            }),
        );
        Self::send(out, "message_stop", json!({"type": "message_stop"}));
    }

    fn on_delta(&mut self, delta: &Value, out: &mut Vec<Bytes>) {
        let reasoning =
            str_field(delta, "reasoning_content").or_else(|| str_field(delta, "reasoning"));
        if let Some(r) = reasoning.filter(|r| !r.is_empty()) {
            let i = self.ensure_block(
                OpenBlock::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            Self::delta(out, i, json!({"type": "thinking_delta", "thinking": r}));
        }
        for b in delta
            .get("thinking_blocks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(sig) = str_field(b, "signature").filter(|s| !s.is_empty()) {
                if self.open == Some(OpenBlock::Thinking) {
                    Self::delta(
                        out,
                        self.next_index - 1,
                        json!({"type": "signature_delta", "signature": sig}),
                    );
                }
            }
        }
        let text = str_field(delta, "content")
            .or_else(|| str_field(delta, "refusal"))
            .filter(|t| !t.is_empty());
        if let Some(t) = text {
            let i = self.ensure_block(OpenBlock::Text, json!({"type": "text", "text": ""}), out);
            Self::delta(out, i, json!({"type": "text_delta", "text": t}));
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function");
            if self.open != Some(OpenBlock::Tool(n)) || call.get("id").is_some_and(Value::is_string)
            {
                if self.open == Some(OpenBlock::Tool(n)) {
                    self.close_block(out);
                }
                self.ensure_block(
                    OpenBlock::Tool(n),
                    json!({
                        "type": "tool_use",
                        "id": str_field(call, "id").unwrap_or(""),
                        "name": f.and_then(|f| str_field(f, "name")).unwrap_or(""),
                        "input": {},
                    }),
                    out,
                );
            }
            if let Some(args) = f
                .and_then(|f| str_field(f, "arguments"))
                .filter(|a| !a.is_empty())
            {
                Self::delta(
                    out,
                    self.next_index - 1,
                    json!({"type": "input_json_delta", "partial_json": args}),
                );
            }
        }
    }
}

impl StreamTranslator for MessagesStreamFromOpenAi {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if self.ended {
            return Ok(());
        }
        if event.is_done() {
            self.end(out);
            return Ok(());
        }
        let Ok(v) = serde_json::from_str::<Value>(&event.data) else {
            return Ok(());
        };
        if let Some(err) = v.get("error") {
            let kind = str_field(err, "type")
                .and_then(kind_for_error_type)
                .unwrap_or(ErrorKind::Upstream);
            let message = str_field(err, "message").unwrap_or("The upstream stream failed.");
            self.ended = true;
            return Err(GatewayError::new(kind, short(message)));
        }
        self.start(str_field(&v, "id"), out);
        if let Some(u) = v.get("usage").and_then(Usage::from_openai) {
            self.usage = Some(u);
        }
        let choice = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| u64_field(Some(c), "index") == 0));
        if let Some(c) = choice {
            if let Some(d) = c.get("delta") {
                self.on_delta(d, out);
            }
            if let Some(f) = str_field(c, "finish_reason") {
                self.finish = Some(f.to_string());
                self.close_block(out);
            }
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.end(out);
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn completed(&self) -> bool {
        self.finish.is_some()
    }
}
