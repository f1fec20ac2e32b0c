//! Google Gemini (`generateContent`, `streamGenerateContent?alt=sse`,
//! `batchEmbedContents`) ⇄ OpenAI chat completions and embeddings.
//!
//! Tool and response schemas are sent as `parametersJsonSchema` /
//! `responseJsonSchema`, which take standard JSON Schema, so callers' schemas
//! need no rewriting into Gemini's OpenAPI subset.
//!
//! Gemini has no tool-call ids: calls get `call_<n>` (n counting function
//! calls within a candidate) unless the response carries an id, and a later
//! `tool` message finds its function name through the assistant message that
//! issued the id. A call's `thoughtSignature` travels with the OpenAI tool
//! call as `extra_content.google.thought_signature` and is restored on the
//! way back, which Gemini 3 requires for function calling.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::convert::{
    chunk, content_text, done_frame, effort_budget, frame, image_url_of, insert_opt, is_http_url,
    now_unix, parse_data_url, short, stop_sequences, str_field, tool_call_function, u64_field,
};
use crate::error::{ErrorKind, GatewayError};
use crate::openai::{ChatRequest, EmbeddingsRequest, Usage};
use crate::sse::SseEvent;
use crate::translate::StreamTranslator;

// ---------------------------------------------------------------------------
// OpenAI request → generateContent body
// ---------------------------------------------------------------------------

pub fn chat_request(req: &ChatRequest, upstream_model: &str) -> Result<Value, GatewayError> {
    // The model goes into the URL path, not the body.
    let _ = upstream_model;
    let body = req.body();
    let mut system: Vec<String> = Vec::new();
    let mut contents: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let mut call_names: HashMap<String, String> = HashMap::new();

    for (i, m) in req.messages().iter().enumerate() {
        match str_field(m, "role").unwrap_or("") {
            "system" | "developer" => {
                let t = content_text(m.get("content"));
                if !t.is_empty() {
                    system.push(t);
                }
            }
            "user" => push_content(&mut contents, "user", user_parts(m.get("content"), i)?),
            "assistant" => {
                let parts = model_parts(m, i, &mut call_names)?;
                push_content(&mut contents, "model", parts);
            }
            "tool" => {
                let part = function_response(m, i, &call_names)?;
                push_content(&mut contents, "user", vec![part]);
            }
            other => {
                return Err(GatewayError::invalid(format!(
                    "Invalid value for 'messages[{i}].role': '{other}' is not supported for this model."
                ))
                .with_param(format!("messages[{i}].role")))
            }
        }
    }
    if contents.is_empty() && !system.is_empty() {
        let parts = std::mem::take(&mut system)
            .into_iter()
            .map(|t| json!({"text": t}))
            .collect();
        contents.push(("user", parts));
    }

    let mut out = Map::new();
    out.insert(
        "contents".into(),
        Value::Array(
            contents
                .into_iter()
                .map(|(role, parts)| json!({"role": role, "parts": parts}))
                .collect(),
        ),
    );
    if !system.is_empty() {
        out.insert(
            "systemInstruction".into(),
            json!({"parts": [{"text": system.join("\n\n")}]}),
        );
    }

    if let Some(list) = body.get("tools").and_then(Value::as_array) {
        let mut decls = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let f = t
                .get("function")
                .filter(|_| matches!(str_field(t, "type"), None | Some("function")));
            let name = f.and_then(|f| str_field(f, "name")).ok_or_else(|| {
                GatewayError::invalid(format!(
                    "Invalid 'tools[{i}]': only function tools with a name are supported for this model."
                ))
                .with_param(format!("tools[{i}]"))
            })?;
            let mut d = Map::new();
            d.insert("name".into(), json!(name));
            insert_opt(&mut d, "description", f.and_then(|f| f.get("description")));
            if let Some(p) = f
                .and_then(|f| f.get("parameters"))
                .filter(|p| p.is_object())
            {
                d.insert("parametersJsonSchema".into(), p.clone());
            }
            decls.push(Value::Object(d));
        }
        if !decls.is_empty() {
            out.insert("tools".into(), json!([{"functionDeclarations": decls}]));
        }
    }
    if let Some(cfg) = tool_config(body.get("tool_choice"))? {
        if out.contains_key("tools") {
            out.insert("toolConfig".into(), cfg);
        }
    }

    let mut gen = Map::new();
    insert_opt(&mut gen, "temperature", body.get("temperature"));
    insert_opt(&mut gen, "topP", body.get("top_p"));
    insert_opt(&mut gen, "topK", body.get("top_k"));
    insert_opt(&mut gen, "presencePenalty", body.get("presence_penalty"));
    insert_opt(&mut gen, "frequencyPenalty", body.get("frequency_penalty"));
    insert_opt(&mut gen, "seed", body.get("seed"));
    if let Some(max) = req.max_tokens() {
        gen.insert("maxOutputTokens".into(), json!(max));
    }
    if let Some(stops) = stop_sequences(body.get("stop")) {
        gen.insert("stopSequences".into(), Value::Array(stops));
    }
    if let Some(n) = body.get("n").and_then(Value::as_u64).filter(|n| *n > 1) {
        gen.insert("candidateCount".into(), json!(n));
    }
    if let Some(rf) = body.get("response_format") {
        match str_field(rf, "type") {
            Some("json_object") => {
                gen.insert("responseMimeType".into(), json!("application/json"));
            }
            Some("json_schema") => {
                gen.insert("responseMimeType".into(), json!("application/json"));
                if let Some(schema) = rf.get("json_schema").and_then(|s| s.get("schema")) {
                    gen.insert("responseJsonSchema".into(), schema.clone());
                }
            }
            _ => {}
        }
    }
    if let Some(t) = thinking_config(body) {
        gen.insert("thinkingConfig".into(), t);
    }
    if !gen.is_empty() {
        out.insert("generationConfig".into(), Value::Object(gen));
    }
    Ok(Value::Object(out))
}

fn thinking_config(body: &Map<String, Value>) -> Option<Value> {
    // An Anthropic-shaped `thinking` (from the gateway's /v1/messages
    // endpoint) is honoured too, so a budget survives a cross-provider route.
    if let Some(t) = body.get("thinking").filter(|t| t.is_object()) {
        return match str_field(t, "type") {
            Some("disabled") => Some(json!({"thinkingBudget": 0})),
            _ => match t.get("budget_tokens").and_then(Value::as_u64) {
                Some(b) => Some(json!({"thinkingBudget": b, "includeThoughts": true})),
                None => Some(json!({"includeThoughts": true})),
            },
        };
    }
    let effort = body.get("reasoning_effort").and_then(Value::as_str)?;
    if effort == "none" {
        return Some(json!({"thinkingBudget": 0}));
    }
    let budget = effort_budget(effort)?;
    Some(json!({"thinkingBudget": budget, "includeThoughts": true}))
}

fn push_content(
    contents: &mut Vec<(&'static str, Vec<Value>)>,
    role: &'static str,
    parts: Vec<Value>,
) {
    if parts.is_empty() {
        return;
    }
    match contents.last_mut() {
        Some((last, p)) if *last == role => p.extend(parts),
        _ => contents.push((role, parts)),
    }
}

fn guess_mime(url: &str) -> &'static str {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .to_ascii_lowercase();
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "mp3" => "audio/mp3",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        _ => "image/jpeg",
    }
}

fn media_part(url: &str, param: &str) -> Result<Value, GatewayError> {
    if let Some((mime, data)) = parse_data_url(url) {
        return Ok(json!({"inlineData": {"mimeType": mime, "data": data}}));
    }
    if is_http_url(url) {
        return Ok(json!({"fileData": {"mimeType": guess_mime(url), "fileUri": url}}));
    }
    Err(GatewayError::invalid(format!(
        "Invalid '{param}': expected a base64 data URL or an http(s) URL."
    ))
    .with_param(param))
}

fn user_parts(content: Option<&Value>, i: usize) -> Result<Vec<Value>, GatewayError> {
    let parts = match content {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![json!({"text": s})]),
        Some(Value::Array(p)) => p,
        Some(_) => {
            return Err(GatewayError::invalid(format!(
                "Invalid type for 'messages[{i}].content': expected a string or an array of content parts."
            ))
            .with_param(format!("messages[{i}].content")))
        }
    };
    let mut out = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let param = format!("messages[{i}].content[{j}]");
        match str_field(p, "type") {
            Some("text") => out.push(json!({"text": str_field(p, "text").unwrap_or("")})),
            Some("image_url") => {
                let url = image_url_of(p).unwrap_or("");
                out.push(media_part(url, &param)?);
            }
            Some("file") => {
                let data = p
                    .get("file")
                    .and_then(|f| str_field(f, "file_data"))
                    .unwrap_or("");
                out.push(media_part(data, &param)?);
            }
            Some("input_audio") => {
                let a = p.get("input_audio");
                let data = a.and_then(|a| str_field(a, "data")).unwrap_or("");
                let format = a.and_then(|a| str_field(a, "format")).unwrap_or("wav");
                out.push(
                    json!({"inlineData": {"mimeType": format!("audio/{format}"), "data": data}}),
                );
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
    Ok(out)
}

fn model_parts(
    m: &Value,
    i: usize,
    call_names: &mut HashMap<String, String>,
) -> Result<Vec<Value>, GatewayError> {
    let mut parts = Vec::new();
    let text = content_text(m.get("content"));
    if !text.is_empty() {
        parts.push(json!({"text": text}));
    }
    for (j, call) in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let param = format!("messages[{i}].tool_calls[{j}]");
        let (name, args) = tool_call_function(call, &param)?;
        if let Some(id) = str_field(call, "id") {
            call_names.insert(id.to_string(), name.to_string());
        }
        let mut part = Map::new();
        part.insert("functionCall".into(), json!({"name": name, "args": args}));
        let sig = call
            .get("extra_content")
            .and_then(|e| e.get("google"))
            .and_then(|g| str_field(g, "thought_signature"));
        if let Some(sig) = sig {
            part.insert("thoughtSignature".into(), json!(sig));
        }
        parts.push(Value::Object(part));
    }
    Ok(parts)
}

fn function_response(
    m: &Value,
    i: usize,
    call_names: &HashMap<String, String>,
) -> Result<Value, GatewayError> {
    let id = str_field(m, "tool_call_id").unwrap_or("");
    let name = call_names
        .get(id)
        .map(String::as_str)
        .or_else(|| str_field(m, "name"))
        .ok_or_else(|| {
            GatewayError::invalid(format!(
                "Invalid 'messages[{i}].tool_call_id': no earlier assistant tool call has the id '{id}'."
            ))
            .with_param(format!("messages[{i}].tool_call_id"))
        })?;
    let text = content_text(m.get("content"));
    // Gemini wants an object; a JSON object result is passed as is, anything
    // else goes under "output", the key Gemini documents for results.
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"output": text}),
    };
    Ok(json!({"functionResponse": {"name": name, "response": response}}))
}

fn tool_config(tc: Option<&Value>) -> Result<Option<Value>, GatewayError> {
    let mode = |m: &str| json!({"functionCallingConfig": {"mode": m}});
    Ok(match tc {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(mode("AUTO")),
            "required" => Some(mode("ANY")),
            "none" => Some(mode("NONE")),
            _ => return Err(GatewayError::invalid(
                "Invalid 'tool_choice': expected 'auto', 'none', 'required' or a function object.",
            )
            .with_param("tool_choice")),
        },
        Some(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| str_field(f, "name"))
                .ok_or_else(|| {
                    GatewayError::invalid("Invalid 'tool_choice': missing function name.")
                        .with_param("tool_choice")
                })?;
            Some(json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}))
        }
    })
}

// ---------------------------------------------------------------------------
// generateContent response → OpenAI
// ---------------------------------------------------------------------------

fn finish_reason(reason: &str, has_calls: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if has_calls => "tool_calls",
        _ => "stop",
    }
}

fn usage_from(meta: Option<&Value>) -> Usage {
    Usage {
        prompt_tokens: u64_field(meta, "promptTokenCount"),
        completion_tokens: u64_field(meta, "candidatesTokenCount")
            + u64_field(meta, "thoughtsTokenCount"),
        cached_tokens: u64_field(meta, "cachedContentTokenCount"),
        reasoning_tokens: u64_field(meta, "thoughtsTokenCount"),
    }
}

fn usage_json(meta: Option<&Value>) -> Value {
    let mut v = usage_from(meta).to_openai();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "completion_tokens_details".into(),
            json!({"reasoning_tokens": u64_field(meta, "thoughtsTokenCount")}),
        );
    }
    v
}

fn tool_call(fc: &Value, sig: Option<&str>, n: u64) -> Value {
    let id = str_field(fc, "id")
        .map(str::to_string)
        .unwrap_or_else(|| format!("call_{n}"));
    let args = fc.get("args").cloned().unwrap_or_else(|| json!({}));
    let mut call = json!({
        "id": id,
        "type": "function",
        "function": {"name": str_field(fc, "name").unwrap_or(""), "arguments": args.to_string()},
    });
    if let (Some(sig), Some(o)) = (sig, call.as_object_mut()) {
        o.insert(
            "extra_content".into(),
            json!({"google": {"thought_signature": sig}}),
        );
    }
    call
}

/// What one candidate's parts amount to in OpenAI terms.
#[derive(Default)]
struct Parts {
    text: String,
    reasoning: String,
    calls: Vec<Value>,
}

fn read_parts(candidate: &Value, next_call: &mut u64) -> Parts {
    let mut p = Parts::default();
    let parts = candidate
        .get("content")
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array);
    for part in parts.into_iter().flatten() {
        if let Some(fc) = part.get("functionCall") {
            p.calls.push(tool_call(
                fc,
                str_field(part, "thoughtSignature"),
                *next_call,
            ));
            *next_call += 1;
        } else if let Some(t) = str_field(part, "text") {
            if part.get("thought") == Some(&Value::Bool(true)) {
                p.reasoning.push_str(t);
            } else {
                p.text.push_str(t);
            }
        }
    }
    p
}

pub fn chat_response(body: &Value, model: &str) -> Result<(Value, Usage), GatewayError> {
    if body.get("error").is_some() {
        return Err(error_from_value(0, body, None));
    }
    let candidates = body.get("candidates").and_then(Value::as_array);
    let mut choices = Vec::new();
    for (pos, c) in candidates.into_iter().flatten().enumerate() {
        let mut next_call = 0;
        let p = read_parts(c, &mut next_call);
        let reason = str_field(c, "finishReason").unwrap_or("STOP");
        let mut message = Map::new();
        message.insert("role".into(), json!("assistant"));
        let content = if p.text.is_empty() && !p.calls.is_empty() {
            Value::Null
        } else {
            json!(p.text)
        };
        message.insert("content".into(), content);
        if !p.reasoning.is_empty() {
            message.insert("reasoning_content".into(), json!(p.reasoning));
        }
        let has_calls = !p.calls.is_empty();
        if has_calls {
            message.insert("tool_calls".into(), Value::Array(p.calls));
        }
        choices.push(json!({
            "index": c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64),
            "message": Value::Object(message),
            "logprobs": null,
            "finish_reason": finish_reason(reason, has_calls),
        }));
    }
    if choices.is_empty() {
        // A blocked prompt comes back with promptFeedback and no candidates.
        if body
            .get("promptFeedback")
            .and_then(|f| f.get("blockReason"))
            .is_some()
        {
            choices.push(json!({
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": "content_filter",
            }));
        } else {
            return Err(GatewayError::new(
                ErrorKind::Upstream,
                "The upstream provider returned a response without candidates.",
            ));
        }
    }
    let meta = body.get("usageMetadata");
    let usage = usage_from(meta);
    let resp = json!({
        "id": str_field(body, "responseId").map(|id| format!("chatcmpl-{id}")).unwrap_or_else(|| "chatcmpl-gemini".into()),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": choices,
        "usage": usage_json(meta),
    });
    Ok((resp, usage))
}

// ---------------------------------------------------------------------------
// streamGenerateContent?alt=sse → OpenAI chunks
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct CandidateState {
    role_sent: bool,
    next_call: u64,
    finished: bool,
}

/// Gemini SSE stream → OpenAI chunks. Every Gemini event is a complete
/// `GenerateContentResponse` holding only the new parts, so each one maps to
/// chunks directly.
#[derive(Debug)]
pub struct ChatStream {
    model: String,
    include_usage: bool,
    id: String,
    created: u64,
    candidates: BTreeMap<u64, CandidateState>,
    usage_meta: Option<Value>,
    finished: bool,
    failed: bool,
}

impl ChatStream {
    pub fn new(model: &str, include_usage: bool) -> Self {
        ChatStream {
            model: model.to_string(),
            include_usage,
            id: "chatcmpl-gemini".to_string(),
            created: now_unix(),
            candidates: BTreeMap::new(),
            usage_meta: None,
            finished: false,
            failed: false,
        }
    }
}

impl StreamTranslator for ChatStream {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if self.failed {
            return Ok(());
        }
        let Ok(v) = serde_json::from_str::<Value>(&event.data) else {
            return Ok(());
        };
        if v.get("error").is_some() {
            self.failed = true;
            return Err(error_from_value(0, &v, None));
        }
        if let Some(id) = str_field(&v, "responseId") {
            self.id = format!("chatcmpl-{id}");
        }
        if let Some(meta) = v.get("usageMetadata").filter(|m| m.is_object()) {
            self.usage_meta = Some(meta.clone());
        }
        let candidates = v.get("candidates").and_then(Value::as_array);
        for (pos, c) in candidates.into_iter().flatten().enumerate() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(pos as u64);
            let st = self.candidates.entry(index).or_default();
            let p = read_parts(c, &mut st.next_call);
            let mut deltas = Vec::new();
            if !p.reasoning.is_empty() {
                deltas.push(json!({"reasoning_content": p.reasoning}));
            }
            if !p.text.is_empty() {
                deltas.push(json!({"content": p.text}));
            }
            if !p.calls.is_empty() {
                let base = st.next_call - p.calls.len() as u64;
                let calls: Vec<Value> = p
                    .calls
                    .into_iter()
                    .enumerate()
                    .map(|(k, mut call)| {
                        if let Some(o) = call.as_object_mut() {
                            o.insert("index".into(), json!(base + k as u64));
                        }
                        call
                    })
                    .collect();
                deltas.push(json!({"tool_calls": calls}));
            }
            if !st.role_sent {
                st.role_sent = true;
                match deltas.first_mut().and_then(Value::as_object_mut) {
                    Some(d) => {
                        d.insert("role".into(), json!("assistant"));
                    }
                    None => deltas.push(json!({"role": "assistant", "content": ""})),
                }
            }
            for d in deltas {
                out.push(frame(&chunk(
                    &self.id,
                    self.created,
                    &self.model,
                    index,
                    d,
                    None,
                )));
            }
            if let Some(reason) = str_field(c, "finishReason") {
                if !st.finished {
                    st.finished = true;
                    let f = finish_reason(reason, st.next_call > 0);
                    out.push(frame(&chunk(
                        &self.id,
                        self.created,
                        &self.model,
                        index,
                        json!({}),
                        Some(f),
                    )));
                    self.finished = true;
                }
            }
        }
        if candidates.is_none_or(|c| c.is_empty())
            && v.get("promptFeedback")
                .and_then(|f| f.get("blockReason"))
                .is_some()
        {
            let d = json!({"role": "assistant", "content": ""});
            out.push(frame(&chunk(
                &self.id,
                self.created,
                &self.model,
                0,
                d,
                Some("content_filter"),
            )));
            self.finished = true;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.failed {
            return;
        }
        if self.include_usage {
            if let Some(meta) = &self.usage_meta {
                out.push(frame(&json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_json(Some(meta)),
                })));
            }
        }
        out.push(done_frame());
    }

    fn usage(&self) -> Option<Usage> {
        self.usage_meta.as_ref().map(|m| usage_from(Some(m)))
    }

    fn completed(&self) -> bool {
        self.finished
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

pub fn error_from_upstream(status: u16, body: &[u8], retry_after: Option<String>) -> GatewayError {
    let parsed = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    error_from_value(status, &parsed, retry_after)
}

/// `RetryInfo.retryDelay` ("7s", "0.5s") as whole seconds, rounded up.
fn retry_delay(details: Option<&Vec<Value>>) -> Option<String> {
    details?.iter().find_map(|d| {
        let delay = str_field(d, "retryDelay")?;
        let secs: f64 = delay.strip_suffix('s')?.parse().ok()?;
        Some(format!("{}", secs.max(0.0).ceil() as u64))
    })
}

fn error_from_value(status: u16, v: &Value, retry_after: Option<String>) -> GatewayError {
    // alt=sse and the JSON-array stream wrap the error document in an array.
    let doc = match v {
        Value::Array(items) => items.first().unwrap_or(&Value::Null),
        other => other,
    };
    let err = doc.get("error");
    let rpc_status = err.and_then(|e| str_field(e, "status")).unwrap_or("");
    let status = match (
        status,
        err.and_then(|e| e.get("code")).and_then(Value::as_u64),
    ) {
        (0, Some(code)) => u16::try_from(code).unwrap_or(0),
        (s, _) => s,
    };
    let details = err.and_then(|e| e.get("details")).and_then(Value::as_array);
    let key_problem = details.into_iter().flatten().any(|d| {
        matches!(
            str_field(d, "reason"),
            Some("API_KEY_INVALID" | "API_KEY_EXPIRED" | "API_KEY_SERVICE_BLOCKED")
        )
    });
    let upstream_msg = err.and_then(|e| str_field(e, "message")).map(short);
    let credentials = key_problem
        || matches!(rpc_status, "UNAUTHENTICATED" | "PERMISSION_DENIED")
        || matches!(status, 401 | 403);
    let kind = if credentials {
        ErrorKind::Upstream
    } else {
        match rpc_status {
            "RESOURCE_EXHAUSTED" => ErrorKind::RateLimited,
            "NOT_FOUND" => ErrorKind::ModelNotFound,
            "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => {
                ErrorKind::InvalidRequest
            }
            "UNAVAILABLE" => ErrorKind::Overloaded,
            "DEADLINE_EXCEEDED" => ErrorKind::Timeout,
            "INTERNAL" | "UNKNOWN" | "ABORTED" | "DATA_LOSS" => ErrorKind::Upstream,
            _ => GatewayError::kind_for_upstream_status(status),
        }
    };
    let detail = |fallback: &str| upstream_msg.clone().unwrap_or_else(|| fallback.to_string());
    match kind {
        // The message of a key error can quote the key; never pass it on.
        ErrorKind::Upstream if credentials => GatewayError::new(
            ErrorKind::Upstream,
            "The upstream provider rejected the gateway's credentials.",
        ),
        ErrorKind::RateLimited => {
            let retry = retry_after.or_else(|| retry_delay(details));
            GatewayError::new(
                kind,
                detail("The upstream provider rate limited the request."),
            )
            .with_retry_after(retry)
        }
        ErrorKind::ModelNotFound => GatewayError::new(kind, detail("The model does not exist."))
            .with_code("model_not_found")
            .with_param("model"),
        ErrorKind::InvalidRequest | ErrorKind::PayloadTooLarge => {
            GatewayError::new(kind, detail("The upstream provider rejected the request."))
        }
        ErrorKind::Overloaded => GatewayError::new(
            kind,
            format!(
                "The upstream provider is overloaded: {}",
                detail("please retry later.")
            ),
        )
        .with_retry_after(retry_after),
        ErrorKind::Timeout => {
            GatewayError::new(kind, "The upstream provider did not answer in time.")
        }
        _ => GatewayError::new(
            kind,
            match upstream_msg {
                Some(m) => format!("The upstream provider failed: {m}"),
                None => format!("The upstream provider failed with HTTP {status}."),
            },
        )
        .with_retry_after(retry_after),
    }
}

// ---------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------

pub fn embed_request(req: &EmbeddingsRequest, upstream_model: &str) -> Value {
    let model = if upstream_model.starts_with("models/") {
        upstream_model.to_string()
    } else {
        format!("models/{upstream_model}")
    };
    let dims = req.body.get("dimensions").and_then(Value::as_u64);
    let requests: Vec<Value> = req
        .inputs()
        .into_iter()
        .map(|text| {
            let mut r = json!({"model": model, "content": {"parts": [{"text": text}]}});
            if let (Some(d), Some(o)) = (dims, r.as_object_mut()) {
                o.insert("outputDimensionality".into(), json!(d));
            }
            r
        })
        .collect();
    json!({"requests": requests})
}

pub fn embed_response(
    body: &Value,
    model: &str,
    prompt_tokens: u64,
) -> Result<Value, GatewayError> {
    if body.get("error").is_some() {
        return Err(error_from_value(0, body, None));
    }
    let shape_error = || {
        GatewayError::new(
            ErrorKind::Upstream,
            "The upstream provider returned an embeddings response the gateway could not understand.",
        )
    };
    let list: Vec<&Value> = match (body.get("embeddings"), body.get("embedding")) {
        (Some(Value::Array(items)), _) => items.iter().collect(),
        (_, Some(single)) => vec![single],
        _ => return Err(shape_error()),
    };
    let mut data = Vec::with_capacity(list.len());
    for (i, e) in list.into_iter().enumerate() {
        let values = e
            .get("values")
            .filter(|v| v.is_array())
            .ok_or_else(shape_error)?;
        data.push(json!({"object": "embedding", "index": i, "embedding": values}));
    }
    Ok(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
}
