//! The OpenAI Responses API (`/v1/responses`) ⇄ the chat-completions hub.
//!
//! OpenAI providers get Responses requests as they are (model rewritten,
//! see [`ResponsesPassthrough`] for accounting). Every other provider is
//! reached through the hub: [`to_chat`] maps the request to a chat
//! completion, [`from_chat_response`] maps the answer back, and
//! [`ResponsesStreamFromChat`] turns chat chunks into the Responses event
//! sequence (`response.created` … `response.completed`).
//!
//! Reasoning from the hub (`reasoning_content`, fed by Anthropic thinking and
//! Gemini thoughts) becomes a `reasoning` output item with a summary. When
//! Anthropic thinking blocks carry signatures, they travel in the item's
//! `encrypted_content` (the blocks as JSON) so that a later request replaying
//! the item (tool-use round trips with thinking) gives them back verbatim.
//!
//! Gemini's thought signatures (which Gemini 3 wants back with each function
//! call) have no place in a `function_call` item; they travel in a
//! reasoning item's `encrypted_content` as `{"gemini_signatures": {call_id:
//! signature}}`, and are put back on the calls when the items return.
//!
//! The gateway keeps no conversation state: `previous_response_id`,
//! `store: true`, `conversation`, `background` and `item_reference` inputs
//! only work with OpenAI providers; [`stateful_param`] names the one a
//! translated route must refuse.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::convert::{content_text, insert_opt, now_unix, short, str_field};
use crate::error::{ErrorKind, GatewayError};
use crate::openai::{ChatRequest, Usage};
use crate::sse::{encode_event, SseEvent};
use crate::translate::StreamTranslator;

/// A Responses request as the caller sent it, read enough to route it.
/// The hub translation is kept as a result: a request only OpenAI can serve
/// (built-in tools, stored items) is still valid for OpenAI providers, and
/// only a translated route reports why it cannot take it.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub chat: Result<ChatRequest, GatewayError>,
}

impl ResponsesRequest {
    pub fn from_map(body: Map<String, Value>) -> Result<Self, GatewayError> {
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => return Err(missing("model")),
            Some(_) => {
                return Err(invalid(
                    "model",
                    "Invalid type for 'model': expected a string.",
                ))
            }
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    "stream",
                    "Invalid type for 'stream': expected a boolean.",
                ))
            }
        };
        match body.get("input") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            // Stateful calls may continue a stored response with no new input.
            None | Some(Value::Null)
                if body
                    .get("previous_response_id")
                    .is_some_and(Value::is_string) => {}
            None | Some(Value::Null) => return Err(missing("input")),
            Some(_) => {
                return Err(invalid(
                    "input",
                    "Invalid type for 'input': expected a string or an array of input items.",
                ))
            }
        }
        let chat = to_chat(&body);
        Ok(ResponsesRequest {
            body,
            model,
            stream,
            chat,
        })
    }

    /// The hub translation, or why this request needs an OpenAI provider.
    pub fn chat_for(&self, provider: &str) -> Result<ChatRequest, GatewayError> {
        if let Some(param) = stateful_param(&self.body) {
            return Err(stateful_error(param, provider));
        }
        self.chat.clone()
    }
}

/// The first parameter of a Responses request that needs state kept by the
/// provider (so it cannot be served by translation), if any.
pub fn stateful_param(body: &Map<String, Value>) -> Option<&'static str> {
    let set = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    if set("previous_response_id") {
        return Some("previous_response_id");
    }
    if body.get("store") == Some(&Value::Bool(true)) {
        return Some("store");
    }
    if set("conversation") {
        return Some("conversation");
    }
    if body.get("background") == Some(&Value::Bool(true)) {
        return Some("background");
    }
    if let Some(Value::Array(items)) = body.get("input") {
        if items
            .iter()
            .any(|i| str_field(i, "type") == Some("item_reference"))
        {
            return Some("input");
        }
    }
    None
}

/// The error a translated route gives a stateful parameter.
pub fn stateful_error(param: &str, provider: &str) -> GatewayError {
    GatewayError::invalid(format!(
        "The parameter '{param}' needs conversation state kept by the provider; only OpenAI providers support it, and `{provider}` is not one. Send the whole conversation in 'input' instead (and leave 'store' unset or false)."
    ))
    .with_param(param)
    .with_code("unsupported_parameter")
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> GatewayError {
    let param = param.into();
    GatewayError::invalid(message).with_param(param)
}

fn missing(param: &str) -> GatewayError {
    invalid(param, format!("Missing required parameter: '{param}'."))
}

/// Validates a Responses request just enough to route it: the model, and
/// `input` present with a known shape. Field-by-field checks happen in
/// [`to_chat`], which every caller of this also runs.
pub fn to_chat(body: &Map<String, Value>) -> Result<ChatRequest, GatewayError> {
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(missing("model")),
        Some(_) => {
            return Err(invalid(
                "model",
                "Invalid type for 'model': expected a string.",
            ))
        }
    };
    let mut messages: Vec<Value> = Vec::new();
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => {
            return Err(invalid(
                "instructions",
                "Invalid type for 'instructions': expected a string.",
            ))
        }
    }
    match body.get("input") {
        None | Some(Value::Null) => return Err(missing("input")),
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            // Thinking blocks of a replayed reasoning item belong to the
            // assistant turn that follows it.
            let mut pending_thinking: Option<Value> = None;
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages, &mut pending_thinking)?;
            }
            restore_signatures(items, &mut messages);
        }
        Some(_) => {
            return Err(invalid(
                "input",
                "Invalid type for 'input': expected a string or an array of input items.",
            ))
        }
    }
    if messages.is_empty() {
        return Err(invalid(
            "input",
            "Invalid 'input': empty array. Expected at least one input item.",
        ));
    }

    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    match body.get("max_output_tokens") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                invalid(
                    "max_output_tokens",
                    "Invalid type for 'max_output_tokens': expected an integer.",
                )
            })?;
            out.insert("max_tokens".into(), json!(n));
        }
    }
    for k in ["temperature", "top_p", "parallel_tool_calls", "user"] {
        insert_opt(&mut out, k, body.get(k));
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        let tools = tools
            .as_array()
            .ok_or_else(|| invalid("tools", "Invalid type for 'tools': expected an array."))?;
        let mut list = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            match str_field(t, "type") {
                Some("function") => {}
                other => {
                    return Err(invalid(
                        format!("tools[{i}].type"),
                        format!(
                            "Tool type '{}' is only available with OpenAI providers; this route translates to another provider, which supports 'function' tools.",
                            other.unwrap_or("(missing)")
                        ),
                    ))
                }
            }
            let name = str_field(t, "name").ok_or_else(|| missing(&format!("tools[{i}].name")))?;
            let mut f = Map::new();
            f.insert("name".into(), json!(name));
            insert_opt(&mut f, "description", t.get("description"));
            f.insert(
                "parameters".into(),
                t.get("parameters")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            );
            insert_opt(&mut f, "strict", t.get("strict"));
            list.push(json!({"type": "function", "function": f}));
        }
        if !list.is_empty() {
            out.insert("tools".into(), Value::Array(list));
        }
    }
    match body.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => {
            out.insert("tool_choice".into(), json!(s));
        }
        Some(tc) if str_field(tc, "type") == Some("function") => {
            let name = str_field(tc, "name").ok_or_else(|| missing("tool_choice.name"))?;
            out.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": name}}),
            );
        }
        Some(_) => {
            return Err(invalid(
                "tool_choice",
                "Invalid 'tool_choice': expected 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}.",
            ))
        }
    }
    if let Some(format) = body.get("text").and_then(|t| t.get("format")) {
        match str_field(format, "type") {
            Some("text") | None => {}
            Some("json_object") => {
                out.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let schema = format
                    .get("schema")
                    .filter(|s| s.is_object())
                    .ok_or_else(|| missing("text.format.schema"))?;
                let mut js = Map::new();
                js.insert(
                    "name".into(),
                    json!(str_field(format, "name").unwrap_or("output")),
                );
                js.insert("schema".into(), schema.clone());
                insert_opt(&mut js, "strict", format.get("strict"));
                insert_opt(&mut js, "description", format.get("description"));
                out.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": js}),
                );
            }
            Some(other) => {
                return Err(invalid(
                    "text.format.type",
                    format!("Invalid 'text.format.type': '{other}'."),
                ))
            }
        }
    }
    if let Some(effort) = body
        .get("reasoning")
        .and_then(|r| str_field(r, "effort"))
        .filter(|e| *e != "none")
    {
        out.insert("reasoning_effort".into(), json!(effort));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(invalid(
                "stream",
                "Invalid type for 'stream': expected a boolean.",
            ))
        }
    };
    if stream {
        out.insert("stream".into(), json!(true));
        // `response.completed` carries usage: always ask the hub for it.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    ChatRequest::from_map(out)
}

fn input_item(
    item: &Value,
    i: usize,
    messages: &mut Vec<Value>,
    pending_thinking: &mut Option<Value>,
) -> Result<(), GatewayError> {
    if !item.is_object() {
        return Err(invalid(
            format!("input[{i}]"),
            format!("Invalid 'input[{i}]': expected an object."),
        ));
    }
    let kind = str_field(item, "type").unwrap_or("message");
    match kind {
        "message" => {
            let role = str_field(item, "role").ok_or_else(|| missing(&format!("input[{i}].role")))?;
            let chat_role = match role {
                "user" => "user",
                "system" => "system",
                "developer" => "system",
                "assistant" => "assistant",
                other => {
                    return Err(invalid(
                        format!("input[{i}].role"),
                        format!("Invalid 'input[{i}].role': '{other}'. Expected 'user', 'system', 'developer' or 'assistant'."),
                    ))
                }
            };
            if chat_role == "assistant" {
                let text = match item.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| str_field(p, "text").or_else(|| str_field(p, "refusal")))
                        .collect::<Vec<_>>()
                        .join(""),
                    _ => return Err(missing(&format!("input[{i}].content"))),
                };
                let mut m = Map::new();
                m.insert("role".into(), json!("assistant"));
                m.insert("content".into(), json!(text));
                attach_thinking(&mut m, pending_thinking.take());
                messages.push(Value::Object(m));
                return Ok(());
            }
            let content = match item.get("content") {
                Some(Value::String(s)) => json!(s),
                Some(Value::Array(parts)) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        out.push(input_part(p, i, j)?);
                    }
                    Value::Array(out)
                }
                _ => return Err(missing(&format!("input[{i}].content"))),
            };
            messages.push(json!({"role": chat_role, "content": content}));
        }
        "function_call" => {
            let call_id =
                str_field(item, "call_id").ok_or_else(|| missing(&format!("input[{i}].call_id")))?;
            let name = str_field(item, "name").ok_or_else(|| missing(&format!("input[{i}].name")))?;
            let arguments = match item.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => "{}".to_string(),
                Some(other) => other.to_string(),
            };
            let call = json!({
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            // Consecutive calls (and a text turn right before them) are one
            // assistant message in the chat shape.
            let joins = pending_thinking.is_none()
                && messages
                    .last()
                    .is_some_and(|m| str_field(m, "role") == Some("assistant"));
            if joins {
                if let Some(Value::Object(last)) = messages.last_mut() {
                    let calls = last
                        .entry("tool_calls")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(calls) = calls {
                        calls.push(call);
                    }
                    if last.get("content").is_some_and(|c| c.as_str() == Some("")) {
                        last.insert("content".into(), Value::Null);
                    }
                    return Ok(());
                }
            }
            let mut m = Map::new();
            m.insert("role".into(), json!("assistant"));
            m.insert("content".into(), Value::Null);
            m.insert("tool_calls".into(), json!([call]));
            attach_thinking(&mut m, pending_thinking.take());
            messages.push(Value::Object(m));
        }
        "function_call_output" => {
            let call_id =
                str_field(item, "call_id").ok_or_else(|| missing(&format!("input[{i}].call_id")))?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| str_field(p, "text"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                None | Some(Value::Null) => return Err(missing(&format!("input[{i}].output"))),
                Some(other) => other.to_string(),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        "reasoning" => {
            let summary = item
                .get("summary")
                .and_then(Value::as_array)
                .map(|s| {
                    s.iter()
                        .filter_map(|p| str_field(p, "text"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default();
            let blocks = str_field(item, "encrypted_content")
                .and_then(|e| serde_json::from_str::<Value>(e).ok())
                .filter(Value::is_array);
            *pending_thinking = Some(json!({"text": summary, "blocks": blocks}));
        }
        "item_reference" => {
            return Err(stateful_error("input", "this route"));
        }
        other => {
            return Err(invalid(
                format!("input[{i}].type"),
                format!("Input items of type '{other}' are only available with OpenAI providers; this route translates to another provider."),
            ))
        }
    }
    Ok(())
}

/// Puts Gemini thought signatures kept in reasoning items back on the
/// tool calls they belong to.
fn restore_signatures(items: &[Value], messages: &mut [Value]) {
    let mut sigs: Map<String, Value> = Map::new();
    for item in items
        .iter()
        .filter(|i| str_field(i, "type") == Some("reasoning"))
    {
        let kept = str_field(item, "encrypted_content")
            .and_then(|e| serde_json::from_str::<Value>(e).ok());
        if let Some(Value::Object(map)) = kept.as_ref().and_then(|k| k.get("gemini_signatures")) {
            sigs.extend(map.clone());
        }
    }
    if sigs.is_empty() {
        return;
    }
    for m in messages.iter_mut() {
        for call in m
            .get_mut("tool_calls")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let sig = str_field(call, "id").and_then(|id| sigs.get(id)).cloned();
            if let (Some(sig), Some(c)) = (sig, call.as_object_mut()) {
                c.insert(
                    "extra_content".into(),
                    json!({"google": {"thought_signature": sig}}),
                );
            }
        }
    }
}

/// The reasoning item that carries Gemini thought signatures of `calls`
/// (call id → signature), if any call had one.
fn signatures_item(id: &str, sigs: &Map<String, Value>) -> Option<Value> {
    if sigs.is_empty() {
        return None;
    }
    let kept = json!({"gemini_signatures": sigs});
    Some(
        json!({"id": id, "type": "reasoning", "summary": [], "encrypted_content": kept.to_string()}),
    )
}

fn call_signature(call: &Value) -> Option<&Value> {
    call.pointer("/extra_content/google/thought_signature")
}

fn attach_thinking(m: &mut Map<String, Value>, thinking: Option<Value>) {
    let Some(t) = thinking else { return };
    let text = str_field(&t, "text").unwrap_or("");
    if !text.is_empty() {
        m.insert("reasoning_content".into(), json!(text));
    }
    if let Some(blocks) = t.get("blocks").filter(|b| b.is_array()) {
        m.insert("reasoning_content".into(), json!(text));
        m.insert("thinking_blocks".into(), blocks.clone());
    }
}

fn input_part(p: &Value, i: usize, j: usize) -> Result<Value, GatewayError> {
    let param = || format!("input[{i}].content[{j}]");
    match str_field(p, "type") {
        Some("input_text") | Some("output_text") | Some("text") => {
            Ok(json!({"type": "text", "text": str_field(p, "text").unwrap_or("")}))
        }
        Some("input_image") => {
            let url = str_field(p, "image_url").ok_or_else(|| {
                invalid(
                    format!("{}.image_url", param()),
                    format!("Images by 'file_id' are only available with OpenAI providers; send 'image_url' (an https or data: URL) in '{}'.", param()),
                )
            })?;
            let mut image = Map::new();
            image.insert("url".into(), json!(url));
            insert_opt(&mut image, "detail", p.get("detail"));
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        Some("input_file") => {
            let data = str_field(p, "file_data").ok_or_else(|| {
                invalid(
                    format!("{}.file_data", param()),
                    format!("Files by 'file_id' or 'file_url' are only available with OpenAI providers; send 'file_data' in '{}'.", param()),
                )
            })?;
            let mut file = Map::new();
            file.insert("file_data".into(), json!(data));
            insert_opt(&mut file, "filename", p.get("filename"));
            Ok(json!({"type": "file", "file": file}))
        }
        other => Err(invalid(
            format!("{}.type", param()),
            format!(
                "Invalid content part type '{}' in '{}'.",
                other.unwrap_or("(missing)"),
                param()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------
// Responses usage and ids
// ---------------------------------------------------------------------------

/// The usage of a whole (non-streamed) Responses answer: only `usage` is
/// parsed (see [`crate::scan`]); an answer the scan cannot split is read
/// through the tree.
pub fn responses_answer_usage(body: &[u8]) -> Option<Usage> {
    let mut raw = None;
    let usage = if crate::scan::for_each_member(body, |key, value| {
        if key == b"usage" {
            raw = Some(value);
        }
    }) {
        serde_json::from_slice::<Value>(raw?).ok()?
    } else {
        serde_json::from_slice::<Value>(body)
            .ok()?
            .get_mut("usage")?
            .take()
    };
    usage_from_responses(&usage)
}

/// Usage of a Responses `usage` object in the hub's terms.
pub fn usage_from_responses(u: &Value) -> Option<Usage> {
    let input = u.get("input_tokens")?.as_u64()?;
    Some(Usage {
        prompt_tokens: input,
        completion_tokens: u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        cached_tokens: u
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        reasoning_tokens: u
            .pointer("/output_tokens_details/reasoning_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

fn usage_json(u: Usage, reasoning_tokens: u64) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// A response id from the hub's completion id, so both can be correlated
/// in logs.
fn response_id(chat_id: Option<&str>) -> String {
    match chat_id {
        Some(id) if !id.is_empty() => {
            let clean: String = id
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            format!("resp_{clean}")
        }
        _ => format!("resp_{:x}", now_unix()),
    }
}

/// The response object skeleton: the request's settings echoed back the
/// way OpenAI echoes them.
fn response_object(
    id: &str,
    created_at: u64,
    model: &str,
    request: &RequestEcho,
    status: &str,
) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("id".into(), json!(id));
    r.insert("object".into(), json!("response"));
    r.insert("created_at".into(), json!(created_at));
    r.insert("status".into(), json!(status));
    r.insert("background".into(), json!(false));
    r.insert("error".into(), Value::Null);
    r.insert("incomplete_details".into(), Value::Null);
    r.insert("instructions".into(), request.instructions.clone());
    r.insert(
        "max_output_tokens".into(),
        request.max_output_tokens.clone(),
    );
    r.insert("model".into(), json!(model));
    r.insert("output".into(), json!([]));
    r.insert(
        "parallel_tool_calls".into(),
        request.parallel_tool_calls.clone(),
    );
    r.insert("previous_response_id".into(), Value::Null);
    r.insert("reasoning".into(), request.reasoning.clone());
    r.insert("store".into(), json!(false));
    r.insert("temperature".into(), request.temperature.clone());
    r.insert("text".into(), request.text.clone());
    r.insert("tool_choice".into(), request.tool_choice.clone());
    r.insert("tools".into(), request.tools.clone());
    r.insert("top_p".into(), request.top_p.clone());
    r.insert("truncation".into(), json!("disabled"));
    r.insert("usage".into(), Value::Null);
    r.insert("user".into(), request.user.clone());
    r.insert("metadata".into(), request.metadata.clone());
    r
}

/// The request fields a response object repeats.
#[derive(Debug, Clone)]
pub struct RequestEcho {
    instructions: Value,
    max_output_tokens: Value,
    parallel_tool_calls: Value,
    reasoning: Value,
    temperature: Value,
    text: Value,
    tool_choice: Value,
    tools: Value,
    top_p: Value,
    user: Value,
    metadata: Value,
    /// The caller asked for `reasoning.encrypted_content`.
    include_encrypted: bool,
}

impl RequestEcho {
    pub fn new(body: &Map<String, Value>) -> Self {
        let get = |k: &str, default: Value| {
            body.get(k)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        let mut reasoning = json!({"effort": null, "summary": null});
        if let Some(r) = body.get("reasoning").filter(|r| r.is_object()) {
            reasoning["effort"] = r.get("effort").cloned().unwrap_or(Value::Null);
            reasoning["summary"] = r.get("summary").cloned().unwrap_or(Value::Null);
        }
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                Value::Array(
                    tools
                        .iter()
                        .map(|t| {
                            let mut t = t.clone();
                            if let Some(o) = t.as_object_mut() {
                                o.entry("strict").or_insert(json!(false));
                                o.entry("description").or_insert(Value::Null);
                            }
                            t
                        })
                        .collect(),
                )
            })
            .unwrap_or_else(|| json!([]));
        let include_encrypted = body
            .get("include")
            .and_then(Value::as_array)
            .is_some_and(|inc| {
                inc.iter()
                    .any(|v| v.as_str() == Some("reasoning.encrypted_content"))
            });
        RequestEcho {
            instructions: get("instructions", Value::Null),
            max_output_tokens: get("max_output_tokens", Value::Null),
            parallel_tool_calls: get("parallel_tool_calls", json!(true)),
            reasoning,
            temperature: get("temperature", json!(1.0)),
            text: get("text", json!({"format": {"type": "text"}})),
            tool_choice: get("tool_choice", json!("auto")),
            tools,
            top_p: get("top_p", json!(1.0)),
            user: get("user", Value::Null),
            metadata: get("metadata", json!({})),
            include_encrypted,
        }
    }
}

fn reasoning_item(id: &str, text: &str, blocks: Option<&Value>, include_encrypted: bool) -> Value {
    let summary = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "summary_text", "text": text}])
    };
    let mut item = json!({"id": id, "type": "reasoning", "summary": summary});
    // Signed thinking blocks must come back verbatim on a later turn; the
    // opaque field of a reasoning item is where the Responses API keeps them.
    if let Some(b) = blocks.filter(|b| b.as_array().is_some_and(|a| !a.is_empty())) {
        if include_encrypted || has_signature(b) {
            item["encrypted_content"] = json!(b.to_string());
        }
    }
    item
}

fn has_signature(blocks: &Value) -> bool {
    blocks.as_array().is_some_and(|a| {
        a.iter().any(|b| {
            str_field(b, "signature").is_some_and(|s| !s.is_empty())
                || str_field(b, "type") == Some("redacted_thinking")
        })
    })
}

fn message_item(id: &str, text: &str, refusal: bool, status: &str) -> Value {
    let part = if refusal {
        json!({"type": "refusal", "refusal": text})
    } else {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    };
    json!({"id": id, "type": "message", "status": status, "content": [part], "role": "assistant"})
}

fn function_call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
    })
}

fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

fn reasoning_tokens(usage: Option<&Value>) -> u64 {
    usage
        .and_then(|u| u.pointer("/completion_tokens_details/reasoning_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// A chat completion (hub shape) → a Responses `response` object.
pub fn from_chat_response(resp: &Value, model: &str, request: &RequestEcho) -> Value {
    let id = response_id(str_field(resp, "id"));
    let created = resp
        .get("created")
        .and_then(Value::as_u64)
        .unwrap_or_else(now_unix);
    let choice = resp
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let msg = choice.and_then(|c| c.get("message"));
    let mut output = Vec::new();
    let suffix = id.trim_start_matches("resp_");
    if let Some(m) = msg {
        let reasoning = str_field(m, "reasoning_content")
            .or_else(|| str_field(m, "reasoning"))
            .unwrap_or("");
        let blocks = m.get("thinking_blocks");
        if !reasoning.is_empty()
            || blocks.is_some_and(|b| b.as_array().is_some_and(|a| !a.is_empty()))
        {
            output.push(reasoning_item(
                &format!("rs_{suffix}"),
                reasoning,
                blocks,
                request.include_encrypted,
            ));
        }
        let text = content_text(m.get("content"));
        if !text.is_empty() {
            output.push(message_item(
                &format!("msg_{suffix}"),
                &text,
                false,
                "completed",
            ));
        } else if let Some(r) = str_field(m, "refusal").filter(|r| !r.is_empty()) {
            output.push(message_item(&format!("msg_{suffix}"), r, true, "completed"));
        }
        let mut sigs = Map::new();
        for (n, call) in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let (Some(id), Some(sig)) = (str_field(call, "id"), call_signature(call)) {
                sigs.insert(id.to_string(), sig.clone());
            }
            let f = call.get("function");
            output.push(function_call_item(
                &format!("fc_{suffix}_{n}"),
                str_field(call, "id").unwrap_or(""),
                f.and_then(|f| str_field(f, "name")).unwrap_or(""),
                f.and_then(|f| str_field(f, "arguments")).unwrap_or("{}"),
                "completed",
            ));
        }
        output.extend(signatures_item(&format!("rs_{suffix}_sig"), &sigs));
    }
    let (status, incomplete) = status_of(choice.and_then(|c| str_field(c, "finish_reason")));
    let mut r = response_object(&id, created, model, request, status);
    r.insert("incomplete_details".into(), incomplete);
    r.insert("output".into(), Value::Array(output));
    let usage = resp.get("usage");
    r.insert(
        "usage".into(),
        usage_json(
            usage.and_then(Usage::from_openai).unwrap_or_default(),
            reasoning_tokens(usage),
        ),
    );
    Value::Object(r)
}

// ---------------------------------------------------------------------------
// Streaming: chat chunks → Responses events
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Open {
    Reasoning {
        text: String,
        blocks: Vec<Value>,
    },
    Text {
        text: String,
        refusal: bool,
    },
    Call {
        index: u64,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// OpenAI `chat.completion.chunk` stream → the Responses event stream.
/// Only choice 0 is translated (a response has one output list).
#[derive(Debug)]
pub struct ResponsesStreamFromChat {
    model: String,
    request: RequestEcho,
    id: String,
    created_at: u64,
    sequence: u64,
    started: bool,
    open: Option<Open>,
    /// Finished output items, repeated in `response.completed` as the
    /// protocol requires.
    output: Vec<Value>,
    finish: Option<String>,
    usage: Option<Usage>,
    reasoning_tokens: u64,
    /// Gemini thought signatures of the calls so far (call id → signature).
    signatures: Map<String, Value>,
    ended: bool,
}

impl ResponsesStreamFromChat {
    pub fn new(model: &str, request: RequestEcho) -> Self {
        ResponsesStreamFromChat {
            model: model.to_string(),
            request,
            id: String::new(),
            created_at: 0,
            sequence: 0,
            started: false,
            open: None,
            output: Vec::new(),
            finish: None,
            usage: None,
            reasoning_tokens: 0,
            signatures: Map::new(),
            ended: false,
        }
    }

    fn send(&mut self, out: &mut Vec<Bytes>, name: &str, mut v: Value) {
        if let Some(o) = v.as_object_mut() {
            o.insert("type".into(), json!(name));
            o.insert("sequence_number".into(), json!(self.sequence));
        }
        self.sequence += 1;
        out.push(encode_event(Some(name), &v.to_string()));
    }

    fn snapshot(&self, status: &str) -> Value {
        let mut r = response_object(
            &self.id,
            self.created_at,
            &self.model,
            &self.request,
            status,
        );
        r.insert("output".into(), Value::Array(self.output.clone()));
        Value::Object(r)
    }

    fn start(&mut self, chat_id: Option<&str>, created: Option<u64>, out: &mut Vec<Bytes>) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = response_id(chat_id);
        self.created_at = created.unwrap_or_else(now_unix);
        let snap = self.snapshot("in_progress");
        self.send(out, "response.created", json!({"response": snap}));
        let snap = self.snapshot("in_progress");
        self.send(out, "response.in_progress", json!({"response": snap}));
    }

    fn output_index(&self) -> usize {
        self.output.len()
    }

    fn item_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}_{}_{}",
            self.id.trim_start_matches("resp_"),
            self.output.len()
        )
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        let Some(open) = self.open.take() else { return };
        let index = self.output_index();
        let item = match open {
            Open::Reasoning { text, blocks } => {
                let id = self.item_id("rs");
                self.send(
                    out,
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}),
                );
                self.send(
                    out,
                    "response.reasoning_summary_part.done",
                    json!({"item_id": id, "output_index": index, "summary_index": 0,
                           "part": {"type": "summary_text", "text": text}}),
                );
                let blocks = Value::Array(blocks);
                reasoning_item(&id, &text, Some(&blocks), self.request.include_encrypted)
            }
            Open::Text { text, refusal } => {
                let id = self.item_id("msg");
                if refusal {
                    self.send(
                        out,
                        "response.refusal.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "refusal": text}),
                    );
                    self.send(
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "part": {"type": "refusal", "refusal": text}}),
                    );
                } else {
                    self.send(
                        out,
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0, "logprobs": [], "text": text}),
                    );
                    self.send(
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": text}}),
                    );
                }
                message_item(&id, &text, refusal, "completed")
            }
            Open::Call {
                call_id,
                name,
                arguments,
                ..
            } => {
                let id = self.item_id("fc");
                self.send(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": arguments}),
                );
                function_call_item(&id, &call_id, &name, &arguments, "completed")
            }
        };
        self.send(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.output.push(item);
    }

    fn open_reasoning(&mut self, out: &mut Vec<Bytes>) {
        if matches!(self.open, Some(Open::Reasoning { .. })) {
            return;
        }
        self.close(out);
        let (id, index) = (self.item_id("rs"), self.output_index());
        self.send(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "reasoning", "summary": []}}),
        );
        self.send(
            out,
            "response.reasoning_summary_part.added",
            json!({"item_id": id, "output_index": index, "summary_index": 0,
                   "part": {"type": "summary_text", "text": ""}}),
        );
        self.open = Some(Open::Reasoning {
            text: String::new(),
            blocks: Vec::new(),
        });
    }

    fn open_text(&mut self, refusal: bool, out: &mut Vec<Bytes>) {
        if matches!(self.open, Some(Open::Text { refusal: r, .. }) if r == refusal) {
            return;
        }
        self.close(out);
        let (id, index) = (self.item_id("msg"), self.output_index());
        self.send(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": {"id": id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}}),
        );
        let part = if refusal {
            json!({"type": "refusal", "refusal": ""})
        } else {
            json!({"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        };
        self.send(
            out,
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        self.open = Some(Open::Text {
            text: String::new(),
            refusal,
        });
    }

    fn on_delta(&mut self, delta: &Value, out: &mut Vec<Bytes>) {
        let reasoning =
            str_field(delta, "reasoning_content").or_else(|| str_field(delta, "reasoning"));
        if let Some(r) = reasoning.filter(|r| !r.is_empty()) {
            self.open_reasoning(out);
            let (id, index) = (self.item_id("rs"), self.output_index());
            if let Some(Open::Reasoning { text, .. }) = &mut self.open {
                text.push_str(r);
            }
            self.send(
                out,
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": r}),
            );
        }
        if let Some(blocks) = delta.get("thinking_blocks").and_then(Value::as_array) {
            if !blocks.is_empty() {
                self.open_reasoning(out);
                if let Some(Open::Reasoning { blocks: kept, .. }) = &mut self.open {
                    for b in blocks {
                        merge_thinking_delta(kept, b);
                    }
                }
            }
        }
        for (field, refusal) in [("content", false), ("refusal", true)] {
            let Some(t) = str_field(delta, field).filter(|t| !t.is_empty()) else {
                continue;
            };
            self.open_text(refusal, out);
            let (id, index) = (self.item_id("msg"), self.output_index());
            if let Some(Open::Text { text, .. }) = &mut self.open {
                text.push_str(t);
            }
            let name = if refusal {
                "response.refusal.delta"
            } else {
                "response.output_text.delta"
            };
            let mut ev =
                json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t});
            if !refusal {
                ev["logprobs"] = json!([]);
            }
            self.send(out, name, ev);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function");
            if let Some(sig) = call_signature(call) {
                let id = str_field(call, "id")
                    .map(str::to_string)
                    .or_else(|| match &self.open {
                        Some(Open::Call { call_id, .. }) => Some(call_id.clone()),
                        _ => None,
                    });
                if let Some(id) = id {
                    self.signatures.insert(id, sig.clone());
                }
            }
            let same = matches!(&self.open, Some(Open::Call { index, .. }) if *index == n);
            let new_id = str_field(call, "id").filter(|id| !id.is_empty());
            let restart = matches!((&self.open, new_id), (Some(Open::Call { call_id, .. }), Some(id)) if same && call_id != id);
            if !same || restart {
                self.close(out);
                let name = f
                    .and_then(|f| str_field(f, "name"))
                    .unwrap_or("")
                    .to_string();
                let call_id = new_id.unwrap_or("").to_string();
                let (id, index) = (self.item_id("fc"), self.output_index());
                self.send(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index,
                           "item": function_call_item(&id, &call_id, &name, "", "in_progress")}),
                );
                self.open = Some(Open::Call {
                    index: n,
                    call_id,
                    name,
                    arguments: String::new(),
                });
            }
            if let Some(args) = f
                .and_then(|f| str_field(f, "arguments"))
                .filter(|a| !a.is_empty())
            {
                let (id, index) = (self.item_id("fc"), self.output_index());
                if let Some(Open::Call { arguments, .. }) = &mut self.open {
                    arguments.push_str(args);
                }
                self.send(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": index, "delta": args}),
                );
            }
        }
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if self.ended || self.finish.is_none() {
            return;
        }
        self.ended = true;
        self.start(None, None, out);
        self.close(out);
        let id = self.item_id("rs");
        if let Some(item) = signatures_item(&id, &self.signatures) {
            let index = self.output_index();
            self.send(
                out,
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            );
            self.send(
                out,
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
            self.output.push(item);
        }
        let (status, incomplete) = status_of(self.finish.as_deref());
        let mut snap = self.snapshot(status);
        snap["incomplete_details"] = incomplete;
        snap["usage"] = usage_json(self.usage.unwrap_or_default(), self.reasoning_tokens);
        let name = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.send(out, name, json!({"response": snap}));
    }
}

impl StreamTranslator for ResponsesStreamFromChat {
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
            let message = str_field(err, "message").unwrap_or("The upstream stream failed.");
            self.ended = true;
            return Err(GatewayError::new(ErrorKind::Upstream, short(message)));
        }
        self.start(
            str_field(&v, "id"),
            v.get("created").and_then(Value::as_u64),
            out,
        );
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Usage::from_openai(u);
            self.reasoning_tokens = reasoning_tokens(Some(u));
        }
        let choice = v.get("choices").and_then(Value::as_array).and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        });
        if let Some(c) = choice {
            if let Some(d) = c.get("delta") {
                self.on_delta(d, out);
            }
            if let Some(f) = str_field(c, "finish_reason") {
                self.finish = Some(f.to_string());
                self.close(out);
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

/// Streamed thinking blocks arrive as deltas with an `index` (text in
/// pieces, the signature last), merged the way clients merge tool calls.
fn merge_thinking_delta(kept: &mut Vec<Value>, delta: &Value) {
    let n = delta.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
    while kept.len() <= n {
        kept.push(json!({}));
    }
    let Some(block) = kept[n].as_object_mut() else {
        return;
    };
    for (k, v) in delta.as_object().into_iter().flatten() {
        match (k.as_str(), v) {
            ("index", _) => {}
            ("thinking", Value::String(piece)) => {
                let text = block.entry("thinking").or_insert_with(|| json!(""));
                if let Value::String(t) = text {
                    t.push_str(piece);
                }
            }
            _ => {
                block.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The `error` event a Responses stream ends with when it fails after it
/// started (the HTTP status is already sent).
pub fn error_event(e: &GatewayError) -> Bytes {
    let v = json!({
        "type": "error",
        "code": e.code.unwrap_or(e.kind.label()),
        "message": e.message,
        "param": e.param,
        "sequence_number": 0,
    });
    encode_event(Some("error"), &v.to_string())
}

// ---------------------------------------------------------------------------
// Same protocol: OpenAI Responses streams pass through
// ---------------------------------------------------------------------------

/// Responses events from an OpenAI provider, forwarded verbatim and read
/// for usage (`response.completed` / `response.incomplete` / `response.failed`).
#[derive(Debug, Default)]
pub struct ResponsesPassthrough {
    usage: Option<Usage>,
    ended: bool,
}

impl ResponsesPassthrough {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StreamTranslator for ResponsesPassthrough {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        let name = event.event.as_deref().unwrap_or("");
        let terminal = matches!(
            name,
            "response.completed" | "response.incomplete" | "response.failed" | "error"
        );
        if terminal {
            self.ended = true;
            if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
                if let Some(u) = v.pointer("/response/usage") {
                    self.usage = usage_from_responses(u).or(self.usage);
                }
            }
        }
        out.push(event.raw.clone());
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Bytes>) {}

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn completed(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseDecoder;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn request_maps_items_tools_and_format() {
        let body = map(json!({
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": true}},
            "reasoning": {"effort": "low"},
            "max_output_tokens": 50,
            "stream": true,
        }));
        let chat = to_chat(&body).unwrap();
        let m = chat.messages();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(
            m[1]["content"][1]["image_url"]["url"],
            "data:image/png;base64,AAAA"
        );
        assert_eq!(m[2]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(m[3]["tool_call_id"], "c1");
        assert_eq!(m[4]["content"], "two");
        assert_eq!(chat.body()["tools"][0]["function"]["name"], "f");
        assert_eq!(chat.body()["tool_choice"]["function"]["name"], "f");
        assert_eq!(
            chat.body()["response_format"]["json_schema"]["strict"],
            true
        );
        assert_eq!(chat.body()["reasoning_effort"], "low");
        assert_eq!(chat.max_tokens(), Some(50));
        assert!(chat.stream && chat.include_usage);
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let e = to_chat(&map(json!({"input": "x"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = to_chat(&map(json!({"model": "m"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        let e = to_chat(&map(
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].type"));
        let e = to_chat(&map(json!({"model": "m", "input": [{"type": "mystery"}]}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input[0].type"));
        assert_eq!(
            stateful_param(&map(json!({"previous_response_id": "resp_1"}))),
            Some("previous_response_id")
        );
        assert_eq!(stateful_param(&map(json!({"store": true}))), Some("store"));
        assert_eq!(stateful_param(&map(json!({"store": false}))), None);
    }

    #[test]
    fn chat_response_becomes_output_items() {
        let chat = json!({
            "id": "chatcmpl-1", "created": 5,
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "let me", "reasoning_content": "think",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        });
        let echo = RequestEcho::new(&map(
            json!({"model": "m", "input": "x", "metadata": {"k": "v"}}),
        ));
        let r = from_chat_response(&chat, "m", &echo);
        let out = r["output"].as_array().unwrap();
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["summary"][0]["text"], "think");
        assert_eq!(out[1]["content"][0]["text"], "let me");
        assert_eq!(out[2]["call_id"], "call_1");
        assert_eq!(r["usage"]["total_tokens"], 7);
        assert_eq!(r["status"], "completed");
        assert_eq!(r["metadata"]["k"], "v");
    }

    fn run(chunks: &str) -> (Vec<Value>, ResponsesStreamFromChat) {
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(chunks.as_bytes(), &mut evs).unwrap();
        let echo = RequestEcho::new(&map(json!({"model": "m", "input": "x"})));
        let mut t = ResponsesStreamFromChat::new("m", echo);
        let mut out = Vec::new();
        for e in &evs {
            t.on_event(e, &mut out).unwrap();
        }
        t.finish(&mut out);
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(&out.concat(), &mut evs).unwrap();
        let vals = evs
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                assert_eq!(e.event.as_deref(), v["type"].as_str());
                v
            })
            .collect();
        (vals, t)
    }

    #[test]
    fn stream_follows_the_event_sequence() {
        let (evs, t) = run(concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"po\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ng\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_9\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3,\"total_tokens\":5}}\n\n",
            "data: [DONE]\n\n",
        ));
        let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
        }
        let done = &evs.last().unwrap()["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "pong");
        assert_eq!(done["output"][1]["arguments"], "{}");
        assert_eq!(done["usage"]["output_tokens"], 3);
        assert!(t.completed());
        assert_eq!(t.usage().unwrap().prompt_tokens, 2);
    }
}
