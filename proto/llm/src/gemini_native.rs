//! Gemini's own API as an inbound protocol (`google-genai` clients):
//! `generateContent` / `streamGenerateContent` bodies ⇄ the chat hub.
//!
//! Gemini providers get the body as sent (the model lives in the URL).
//! Other providers are reached through the hub: [`to_chat`] maps contents,
//! system instruction, generation config, function declarations and tool
//! config to a chat request; [`from_chat_response`] and
//! [`GenerateStreamFromChat`] map answers back, with reasoning as `thought`
//! parts and tool calls as `functionCall` parts.
//!
//! Gemini function calls have no required id: a `functionResponse` is
//! matched to the oldest unanswered call of the same name, and the ids the
//! hub needs are made up (`call_<n>`) when the caller sent none.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::convert::{content_text, frame, insert_opt, short, str_field};
use crate::error::{ErrorKind, GatewayError};
use crate::openai::{ChatRequest, Usage};
use crate::sse::SseEvent;
use crate::translate::StreamTranslator;

/// A `generateContent` call; the model and streaming come from the URL.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub chat: Result<ChatRequest, GatewayError>,
}

impl GenerateRequest {
    pub fn new(body: Map<String, Value>, model: &str, stream: bool) -> Result<Self, GatewayError> {
        match body.get("contents") {
            Some(Value::Array(c)) if !c.is_empty() => {}
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                return Err(invalid(
                    "contents",
                    "* GenerateContentRequest.contents: contents is not specified",
                ))
            }
            Some(_) => {
                return Err(invalid(
                    "contents",
                    "Invalid value at 'contents': expected a list of Content.",
                ))
            }
        }
        let chat = to_chat(&body, model, stream);
        Ok(GenerateRequest {
            body,
            model: model.to_string(),
            stream,
            chat,
        })
    }
}

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(message).with_param(param)
}

/// Gemini schemas may spell types in upper case (`OBJECT`, `STRING`), the
/// OpenAPI subset's style; JSON Schema wants lower case.
fn json_schema(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("type", Value::String(t)) => json!(t.to_ascii_lowercase()),
                        _ => json_schema(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(json_schema).collect()),
        other => other.clone(),
    }
}

fn effort_for_budget(budget: i64) -> Option<&'static str> {
    match budget {
        0 => None,
        b if b < 0 => Some("medium"),
        b if b <= 2048 => Some("low"),
        b if b <= 8192 => Some("medium"),
        _ => Some("high"),
    }
}

/// The Gemini request → a hub chat request for `model`.
pub fn to_chat(
    body: &Map<String, Value>,
    model: &str,
    stream: bool,
) -> Result<ChatRequest, GatewayError> {
    let mut messages: Vec<Value> = Vec::new();
    let system = body
        .get("systemInstruction")
        .or_else(|| body.get("system_instruction"));
    if let Some(sys) = system.filter(|s| !s.is_null()) {
        let text = parts_text(sys.get("parts"));
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    // Calls not answered yet, oldest first: (id, name).
    let mut open_calls: Vec<(String, String)> = Vec::new();
    let mut next_call = 0u64;
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (i, c) in contents.iter().enumerate() {
        let role = str_field(c, "role").unwrap_or("user");
        let parts = c.get("parts").and_then(Value::as_array).ok_or_else(|| {
            invalid(&format!("contents[{i}].parts"), format!("* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."))
        })?;
        match role {
            "model" => {
                let mut text = String::new();
                let mut reasoning = String::new();
                let mut calls = Vec::new();
                for p in parts {
                    if let Some(fc) = p.get("functionCall") {
                        let name = str_field(fc, "name").unwrap_or("");
                        let id = match str_field(fc, "id") {
                            Some(id) if !id.is_empty() => id.to_string(),
                            _ => {
                                next_call += 1;
                                format!("call_{next_call}")
                            }
                        };
                        open_calls.push((id.clone(), name.to_string()));
                        let mut call = json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": fc.get("args").cloned().unwrap_or_else(|| json!({})).to_string()},
                        });
                        if let Some(sig) = str_field(p, "thoughtSignature") {
                            call["extra_content"] = json!({"google": {"thought_signature": sig}});
                        }
                        calls.push(call);
                    } else if let Some(t) = str_field(p, "text") {
                        if p.get("thought") == Some(&Value::Bool(true)) {
                            reasoning.push_str(t);
                        } else {
                            text.push_str(t);
                        }
                    }
                }
                let mut m = Map::new();
                m.insert("role".into(), json!("assistant"));
                m.insert(
                    "content".into(),
                    if text.is_empty() && !calls.is_empty() {
                        Value::Null
                    } else {
                        json!(text)
                    },
                );
                if !calls.is_empty() {
                    m.insert("tool_calls".into(), Value::Array(calls));
                }
                if !reasoning.is_empty() {
                    m.insert("reasoning_content".into(), json!(reasoning));
                }
                messages.push(Value::Object(m));
            }
            "user" | "function" | "tool" => {
                let mut content = Vec::new();
                for (j, p) in parts.iter().enumerate() {
                    if let Some(fr) = p.get("functionResponse") {
                        let name = str_field(fr, "name").unwrap_or("");
                        let id = match str_field(fr, "id") {
                            Some(id) if !id.is_empty() => {
                                open_calls.retain(|(open, _)| open != id);
                                id.to_string()
                            }
                            _ => match open_calls.iter().position(|(_, n)| n == name) {
                                Some(k) => open_calls.remove(k).0,
                                None => {
                                    return Err(invalid(
                                        &format!("contents[{i}].parts[{j}].functionResponse"),
                                        format!("The function response for '{name}' answers no earlier function call."),
                                    ))
                                }
                            },
                        };
                        let response = fr.get("response").cloned().unwrap_or_else(|| json!({}));
                        messages.push(json!({"role": "tool", "tool_call_id": id, "content": response.to_string()}));
                    } else if let Some(t) = str_field(p, "text") {
                        content.push(json!({"type": "text", "text": t}));
                    } else if let Some(d) = p.get("inlineData").or_else(|| p.get("inline_data")) {
                        let mime = str_field(d, "mimeType")
                            .or_else(|| str_field(d, "mime_type"))
                            .unwrap_or("application/octet-stream");
                        let url =
                            format!("data:{mime};base64,{}", str_field(d, "data").unwrap_or(""));
                        if mime.starts_with("image/") {
                            content.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        } else {
                            content.push(json!({"type": "file", "file": {"file_data": url}}));
                        }
                    } else if let Some(f) = p.get("fileData").or_else(|| p.get("file_data")) {
                        let uri = str_field(f, "fileUri")
                            .or_else(|| str_field(f, "file_uri"))
                            .unwrap_or("");
                        content.push(json!({"type": "image_url", "image_url": {"url": uri}}));
                    } else {
                        return Err(invalid(
                            &format!("contents[{i}].parts[{j}]"),
                            format!("This part of contents[{i}] is only understood by Gemini providers; the model is served by translation."),
                        ));
                    }
                }
                if !content.is_empty() {
                    let only_text = content.iter().all(|p| p["type"] == "text");
                    let content = if only_text {
                        json!(content
                            .iter()
                            .filter_map(|p| p["text"].as_str())
                            .collect::<Vec<_>>()
                            .join(""))
                    } else {
                        Value::Array(content)
                    };
                    messages.push(json!({"role": "user", "content": content}));
                }
            }
            other => {
                return Err(invalid(
                    &format!("contents[{i}].role"),
                    format!("Please use a valid role: user, model. Got '{other}'."),
                ))
            }
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    if let Some(gc) = body
        .get("generationConfig")
        .or_else(|| body.get("generation_config"))
        .filter(|g| g.is_object())
    {
        insert_opt(&mut out, "temperature", gc.get("temperature"));
        insert_opt(&mut out, "top_p", gc.get("topP"));
        insert_opt(&mut out, "max_tokens", gc.get("maxOutputTokens"));
        insert_opt(&mut out, "stop", gc.get("stopSequences"));
        insert_opt(&mut out, "n", gc.get("candidateCount"));
        insert_opt(&mut out, "seed", gc.get("seed"));
        insert_opt(&mut out, "presence_penalty", gc.get("presencePenalty"));
        insert_opt(&mut out, "frequency_penalty", gc.get("frequencyPenalty"));
        if str_field(gc, "responseMimeType") == Some("application/json") {
            let schema = gc
                .get("responseJsonSchema")
                .or_else(|| gc.get("responseSchema"));
            let format = match schema {
                Some(s) => {
                    json!({"type": "json_schema", "json_schema": {"name": "response", "schema": json_schema(s)}})
                }
                None => json!({"type": "json_object"}),
            };
            out.insert("response_format".into(), format);
        }
        if let Some(effort) = gc
            .get("thinkingConfig")
            .and_then(|t| t.get("thinkingBudget"))
            .and_then(Value::as_i64)
            .and_then(effort_for_budget)
        {
            out.insert("reasoning_effort".into(), json!(effort));
        }
    }
    let mut tools = Vec::new();
    for (i, t) in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let decls = t
            .get("functionDeclarations")
            .or_else(|| t.get("function_declarations"))
            .and_then(Value::as_array)
            .ok_or_else(|| {
                invalid(
                    &format!("tools[{i}]"),
                    format!("tools[{i}] is a Gemini built-in tool, only available with Gemini providers; this model is served by translation, which supports functionDeclarations."),
                )
            })?;
        for d in decls {
            let mut f = Map::new();
            f.insert("name".into(), json!(str_field(d, "name").unwrap_or("")));
            insert_opt(&mut f, "description", d.get("description"));
            let params = d
                .get("parametersJsonSchema")
                .or_else(|| d.get("parameters"))
                .map(json_schema)
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            f.insert("parameters".into(), params);
            tools.push(json!({"type": "function", "function": f}));
        }
    }
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(fcc) = body
        .get("toolConfig")
        .and_then(|t| t.get("functionCallingConfig"))
    {
        let allowed = fcc.get("allowedFunctionNames").and_then(Value::as_array);
        let choice = match str_field(fcc, "mode") {
            Some("NONE") => Some(json!("none")),
            Some("AUTO") => Some(json!("auto")),
            Some("ANY") => match allowed.map(Vec::as_slice) {
                Some([one]) => one
                    .as_str()
                    .map(|n| json!({"type": "function", "function": {"name": n}})),
                _ => Some(json!("required")),
            },
            _ => None,
        };
        if let Some(c) = choice {
            out.insert("tool_choice".into(), c);
        }
    }
    if stream {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    ChatRequest::from_map(out)
}

fn parts_text(parts: Option<&Value>) -> String {
    parts
        .and_then(Value::as_array)
        .map(|p| {
            p.iter()
                .filter_map(|p| str_field(p, "text"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// All text of a Gemini request (system, contents, tool declarations), for
/// local token counting.
pub fn request_text(body: &Map<String, Value>) -> String {
    let mut out = String::new();
    let inner = body
        .get("generateContentRequest")
        .and_then(Value::as_object)
        .unwrap_or(body);
    if let Some(sys) = inner.get("systemInstruction") {
        out.push_str(&parts_text(sys.get("parts")));
        out.push('\n');
    }
    for c in inner
        .get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for p in c
            .get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = str_field(p, "text") {
                out.push_str(t);
            } else if let Some(fc) = p.get("functionCall").or_else(|| p.get("functionResponse")) {
                out.push_str(&fc.to_string());
            }
            out.push('\n');
        }
    }
    if let Some(t) = inner.get("tools") {
        out.push_str(&t.to_string());
    }
    out
}

fn finish_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "MAX_TOKENS",
        Some("content_filter") => "SAFETY",
        _ => "STOP",
    }
}

fn usage_metadata(u: Usage, thoughts: u64) -> Value {
    let mut m = json!({
        "promptTokenCount": u.prompt_tokens,
        "candidatesTokenCount": u.completion_tokens.saturating_sub(thoughts),
        "totalTokenCount": u.prompt_tokens + u.completion_tokens,
    });
    if u.cached_tokens > 0 {
        m["cachedContentTokenCount"] = json!(u.cached_tokens);
    }
    if thoughts > 0 {
        m["thoughtsTokenCount"] = json!(thoughts);
    }
    m
}

fn reasoning_tokens(usage: Option<&Value>) -> u64 {
    usage
        .and_then(|u| u.pointer("/completion_tokens_details/reasoning_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn call_part(call: &Value) -> Value {
    let f = call.get("function");
    let args = f
        .and_then(|f| str_field(f, "arguments"))
        .and_then(|a| serde_json::from_str::<Value>(a).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    let mut fc = json!({"name": f.and_then(|f| str_field(f, "name")).unwrap_or(""), "args": args});
    if let Some(id) = str_field(call, "id").filter(|id| !id.is_empty()) {
        fc["id"] = json!(id);
    }
    let mut part = json!({"functionCall": fc});
    if let Some(sig) = call.pointer("/extra_content/google/thought_signature") {
        part["thoughtSignature"] = sig.clone();
    }
    part
}

/// A chat completion (hub shape) → a `GenerateContentResponse`.
pub fn from_chat_response(resp: &Value, model: &str) -> Value {
    let candidates: Vec<Value> = resp
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let m = c.get("message");
            let mut parts = Vec::new();
            if let Some(r) = m
                .and_then(|m| {
                    str_field(m, "reasoning_content").or_else(|| str_field(m, "reasoning"))
                })
                .filter(|r| !r.is_empty())
            {
                parts.push(json!({"text": r, "thought": true}));
            }
            let text = content_text(m.and_then(|m| m.get("content")));
            if !text.is_empty() {
                parts.push(json!({"text": text}));
            }
            for call in m
                .and_then(|m| m.get("tool_calls"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                parts.push(call_part(call));
            }
            json!({
                "content": {"role": "model", "parts": parts},
                "finishReason": finish_reason(str_field(c, "finish_reason")),
                "index": c.get("index").and_then(Value::as_u64).unwrap_or(0),
            })
        })
        .collect();
    let usage = resp.get("usage");
    json!({
        "candidates": candidates,
        "usageMetadata": usage_metadata(usage.and_then(Usage::from_openai).unwrap_or_default(), reasoning_tokens(usage)),
        "modelVersion": model,
        "responseId": str_field(resp, "id").unwrap_or(""),
    })
}

#[derive(Debug, Default)]
struct PendingCall {
    id: String,
    name: String,
    arguments: String,
    extra: Option<Value>,
}

/// Chat chunks → `streamGenerateContent?alt=sse` chunks. Text and thoughts
/// go out as they arrive; a function call goes out whole once its
/// arguments are complete (Gemini never splits one), and the last chunk
/// carries the finish reason and usage.
#[derive(Debug)]
pub struct GenerateStreamFromChat {
    model: String,
    response_id: String,
    calls: Vec<PendingCall>,
    finish: Option<String>,
    usage: Option<Usage>,
    thoughts: u64,
    ended: bool,
}

impl GenerateStreamFromChat {
    pub fn new(model: &str) -> Self {
        GenerateStreamFromChat {
            model: model.to_string(),
            response_id: String::new(),
            calls: Vec::new(),
            finish: None,
            usage: None,
            thoughts: 0,
            ended: false,
        }
    }

    fn chunk(&self, parts: Vec<Value>, last: bool) -> Bytes {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        let mut v =
            json!({"candidates": [], "modelVersion": self.model, "responseId": self.response_id});
        if last {
            candidate["finishReason"] = json!(finish_reason(self.finish.as_deref()));
            v["usageMetadata"] = usage_metadata(self.usage.unwrap_or_default(), self.thoughts);
        }
        v["candidates"] = json!([candidate]);
        frame(&v)
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if self.ended || self.finish.is_none() {
            return;
        }
        self.ended = true;
        let parts: Vec<Value> = self
            .calls
            .drain(..)
            .map(|c| {
                let mut call =
                    json!({"id": c.id, "function": {"name": c.name, "arguments": c.arguments}});
                if let Some(e) = c.extra {
                    call["extra_content"] = e;
                }
                call_part(&call)
            })
            .collect();
        out.push(self.chunk(parts, true));
    }
}

impl StreamTranslator for GenerateStreamFromChat {
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
        if self.response_id.is_empty() {
            self.response_id = str_field(&v, "id").unwrap_or("").to_string();
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Usage::from_openai(u);
            self.thoughts = reasoning_tokens(Some(u));
        }
        let choice = v.get("choices").and_then(Value::as_array).and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        });
        if let Some(c) = choice {
            let mut parts = Vec::new();
            if let Some(d) = c.get("delta") {
                if let Some(r) = str_field(d, "reasoning_content")
                    .or_else(|| str_field(d, "reasoning"))
                    .filter(|r| !r.is_empty())
                {
                    parts.push(json!({"text": r, "thought": true}));
                }
                if let Some(t) = str_field(d, "content").filter(|t| !t.is_empty()) {
                    parts.push(json!({"text": t}));
                }
                for call in d
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let n = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                    while self.calls.len() <= n {
                        self.calls.push(PendingCall::default());
                    }
                    let pending = &mut self.calls[n];
                    if let Some(id) = str_field(call, "id") {
                        pending.id = id.to_string();
                    }
                    if let Some(f) = call.get("function") {
                        if let Some(name) = str_field(f, "name") {
                            pending.name.push_str(name);
                        }
                        if let Some(a) = str_field(f, "arguments") {
                            pending.arguments.push_str(a);
                        }
                    }
                    if let Some(e) = call.get("extra_content") {
                        pending.extra = Some(e.clone());
                    }
                }
            }
            if !parts.is_empty() {
                out.push(self.chunk(parts, false));
            }
            if let Some(f) = str_field(c, "finish_reason") {
                self.finish = Some(f.to_string());
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

// ---------------------------------------------------------------------------
// embedContent / batchEmbedContents
// ---------------------------------------------------------------------------

/// An `embedContent` (one) or `batchEmbedContents` (`requests`) call.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub batch: bool,
    /// The texts, in order: one per request of a batch.
    pub texts: Vec<String>,
    pub dimensions: Option<u64>,
}

impl EmbedRequest {
    pub fn new(body: Map<String, Value>, model: &str, batch: bool) -> Result<Self, GatewayError> {
        let one = |r: &Value, param: &str| -> Result<String, GatewayError> {
            let parts = r
                .get("content")
                .and_then(|c| c.get("parts"))
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(param, format!("* {param}: content.parts is required.")))?;
            Ok(parts
                .iter()
                .filter_map(|p| str_field(p, "text"))
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let (texts, dimensions) = if batch {
            let requests = body
                .get("requests")
                .and_then(Value::as_array)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "requests",
                        "* BatchEmbedContentsRequest.requests: at least one request is required.",
                    )
                })?;
            let texts = requests
                .iter()
                .enumerate()
                .map(|(i, r)| one(r, &format!("requests[{i}].content")))
                .collect::<Result<Vec<_>, _>>()?;
            let dims = requests
                .first()
                .and_then(|r| r.get("outputDimensionality"))
                .and_then(Value::as_u64);
            (texts, dims)
        } else {
            let text = one(&Value::Object(body.clone()), "content")?;
            (
                vec![text],
                body.get("outputDimensionality").and_then(Value::as_u64),
            )
        };
        Ok(EmbedRequest {
            body,
            model: model.to_string(),
            batch,
            texts,
            dimensions,
        })
    }

    /// The body for a Gemini provider: each request of a batch must name
    /// the model of the URL, which is the provider's, not the caller's.
    pub fn upstream_body(&self, upstream_model: &str) -> Map<String, Value> {
        let mut body = self.body.clone();
        if let Some(Value::Array(requests)) = body.get_mut("requests") {
            for r in requests.iter_mut().filter_map(Value::as_object_mut) {
                r.insert("model".into(), json!(format!("models/{upstream_model}")));
            }
        }
        body
    }

    /// The hub (OpenAI embeddings) request body.
    pub fn to_openai(&self, model: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("model".into(), json!(model));
        m.insert("input".into(), json!(self.texts));
        if let Some(d) = self.dimensions {
            m.insert("dimensions".into(), json!(d));
        }
        m
    }
}

/// OpenAI embeddings → `{"embedding": ...}` or `{"embeddings": [...]}`.
pub fn embed_from_openai(v: &Value, batch: bool) -> Value {
    let mut data: Vec<&Value> = v
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    data.sort_by_key(|d| d.get("index").and_then(Value::as_u64).unwrap_or(0));
    let values: Vec<Value> = data
        .iter()
        .map(|d| json!({"values": d.get("embedding").cloned().unwrap_or_else(|| json!([]))}))
        .collect();
    if batch {
        json!({"embeddings": values})
    } else {
        json!({"embedding": values.into_iter().next().unwrap_or_else(|| json!({"values": []}))})
    }
}

/// Usage of a Gemini `usageMetadata` in the hub's terms.
pub fn usage_from_metadata(m: &Value) -> Option<Usage> {
    let prompt = m.get("promptTokenCount")?.as_u64()?;
    let get = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: get("candidatesTokenCount") + get("thoughtsTokenCount"),
        cached_tokens: get("cachedContentTokenCount"),
        reasoning_tokens: get("thoughtsTokenCount"),
    })
}

/// Gemini streams from a Gemini provider, forwarded verbatim and read for
/// usage and the finish reason.
#[derive(Debug, Default)]
pub struct GeminiPassthrough {
    usage: Option<Usage>,
    finished: bool,
}

impl GeminiPassthrough {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StreamTranslator for GeminiPassthrough {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
            if let Some(u) = v.get("usageMetadata").and_then(usage_from_metadata) {
                self.usage = Some(u);
            }
            let finished = v
                .get("candidates")
                .and_then(Value::as_array)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.get("finishReason").is_some_and(Value::is_string))
                });
            self.finished |= finished || v.get("error").is_some();
        }
        out.push(event.raw.clone());
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Bytes>) {}

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn completed(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseDecoder;

    #[test]
    fn contents_tools_and_config_map_to_chat() {
        let body: Map<String, Value> = serde_json::from_value(json!({
            "systemInstruction": {"parts": [{"text": "be brief"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "weather?"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "sig"}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 20}}}]},
            ],
            "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
            "generationConfig": {"maxOutputTokens": 20, "temperature": 0.5, "responseMimeType": "application/json"},
        })).unwrap();
        let chat = to_chat(&body, "m", true).unwrap();
        let m = chat.messages();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[2]["tool_calls"][0]["id"], "call_1");
        assert_eq!(
            m[2]["tool_calls"][0]["extra_content"]["google"]["thought_signature"],
            "sig"
        );
        assert_eq!(m[3]["tool_call_id"], "call_1");
        assert_eq!(
            chat.body()["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(chat.body()["tool_choice"], "required");
        assert_eq!(chat.body()["response_format"]["type"], "json_object");
        assert_eq!(chat.max_tokens(), Some(20));
        assert!(chat.stream);
        let bad: Map<String, Value> = serde_json::from_value(
            json!({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "x"}}]}]}),
        )
        .unwrap();
        assert!(to_chat(&bad, "m", false).is_err());
        let search: Map<String, Value> = serde_json::from_value(
            json!({"contents": [{"parts": [{"text": "x"}]}], "tools": [{"googleSearch": {}}]}),
        )
        .unwrap();
        assert_eq!(
            to_chat(&search, "m", false).unwrap_err().param.as_deref(),
            Some("tools[0]")
        );
    }

    #[test]
    fn embeddings_both_ways() {
        let body: Map<String, Value> = serde_json::from_value(json!({"requests": [
            {"model": "models/openai/text-embedding-3-small", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 8},
            {"model": "models/openai/text-embedding-3-small", "content": {"parts": [{"text": "b"}]}},
        ]})).unwrap();
        let e = EmbedRequest::new(body, "openai/text-embedding-3-small", true).unwrap();
        assert_eq!(e.texts, ["a", "b"]);
        assert_eq!(e.to_openai("te3")["dimensions"], 8);
        assert_eq!(
            e.upstream_body("g-emb")["requests"][1]["model"],
            "models/g-emb"
        );
        let v = embed_from_openai(
            &json!({"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]}),
            true,
        );
        assert_eq!(v["embeddings"][0]["values"][0], 1.0);
        let one: Map<String, Value> =
            serde_json::from_value(json!({"content": {"parts": [{"text": "x"}]}})).unwrap();
        let e = EmbedRequest::new(one, "m", false).unwrap();
        assert!(!e.batch && e.texts == ["x"]);
        assert_eq!(
            embed_from_openai(&json!({"data": [{"embedding": [3.0]}]}), false)["embedding"]
                ["values"][0],
            3.0
        );
        assert!(EmbedRequest::new(Map::new(), "m", true).is_err());
    }

    #[test]
    fn chat_stream_becomes_gemini_chunks() {
        let wire = concat!(
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":6}}\n\n",
            "data: [DONE]\n\n",
        );
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(wire.as_bytes(), &mut evs).unwrap();
        let mut t = GenerateStreamFromChat::new("m");
        let mut out = Vec::new();
        for e in &evs {
            t.on_event(e, &mut out).unwrap();
        }
        t.finish(&mut out);
        let mut d = SseDecoder::new();
        let mut got = Vec::new();
        d.push(&out.concat(), &mut got).unwrap();
        let vals: Vec<Value> = got
            .iter()
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect();
        assert_eq!(vals.len(), 2);
        assert_eq!(
            vals[0]["candidates"][0]["content"]["parts"][0]["text"],
            "Hel"
        );
        let last = &vals[1]["candidates"][0];
        assert_eq!(last["content"]["parts"][0]["functionCall"]["args"]["a"], 1);
        assert_eq!(last["finishReason"], "STOP");
        assert_eq!(vals[1]["usageMetadata"]["totalTokenCount"], 10);
        assert!(t.completed());
    }
}
