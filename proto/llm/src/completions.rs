//! Legacy OpenAI completions (`/v1/completions`) ⇄ the chat hub.
//!
//! OpenAI providers get the request as it is. Elsewhere the prompt becomes
//! one user message, and answers come back as `text_completion` objects and
//! chunks. What has no chat equivalent (`echo`, `suffix`, `logprobs`,
//! `best_of` > 1, several prompts) is refused with the parameter named, not
//! silently dropped.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::convert::{content_text, frame, insert_opt, now_unix, short, str_field};
use crate::error::{ErrorKind, GatewayError};
use crate::openai::{parse_json_object, ChatRequest, Usage};
use crate::sse::{SseEvent, DONE_EVENT};
use crate::translate::StreamTranslator;

/// OpenAI's documented default for `max_tokens` on this endpoint; applied
/// when translating so answers are as long as the caller would get from
/// OpenAI.
pub const DEFAULT_MAX_TOKENS: u64 = 16;

#[derive(Debug, Clone)]
pub struct CompletionsRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// The hub translation, or why only an OpenAI provider can serve it.
    pub chat: Result<ChatRequest, GatewayError>,
}

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(message).with_param(param)
}

impl CompletionsRequest {
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        Self::from_map(parse_json_object(body)?)
    }

    pub fn from_map(body: Map<String, Value>) -> Result<Self, GatewayError> {
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(invalid("model", "You must provide a model parameter."))
            }
            Some(_) => {
                return Err(invalid(
                    "model",
                    "Invalid type for 'model': expected a string.",
                ))
            }
        };
        match body.get("prompt") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            None | Some(Value::Null) => {
                return Err(invalid("prompt", "Missing required parameter: 'prompt'."))
            }
            Some(_) => {
                return Err(invalid(
                    "prompt",
                    "Invalid type for 'prompt': expected a string or an array.",
                ))
            }
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
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let chat = to_chat(&body, &model, stream);
        Ok(CompletionsRequest {
            body,
            model,
            stream,
            include_usage,
            chat,
        })
    }
}

fn untranslatable(param: &str, what: &str) -> GatewayError {
    invalid(
        param,
        format!("'{param}' ({what}) is only available with OpenAI providers; this model is served by translation to chat."),
    )
    .with_code("unsupported_parameter")
}

fn prompt_text(prompt: Option<&Value>) -> Result<String, GatewayError> {
    match prompt {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [] => Err(invalid("prompt", "Invalid 'prompt': empty array.")),
            items if items.iter().all(Value::is_number) => {
                Err(untranslatable("prompt", "token ids"))
            }
            [_] => Err(untranslatable("prompt", "token ids")),
            _ => Err(untranslatable("prompt", "several prompts in one request")),
        },
        _ => Err(invalid("prompt", "Missing required parameter: 'prompt'.")),
    }
}

fn to_chat(
    body: &Map<String, Value>,
    model: &str,
    stream: bool,
) -> Result<ChatRequest, GatewayError> {
    let prompt = prompt_text(body.get("prompt"))?;
    if body.get("echo") == Some(&Value::Bool(true)) {
        return Err(untranslatable("echo", "the prompt repeated in the answer"));
    }
    if body
        .get("suffix")
        .is_some_and(|s| s.as_str().is_some_and(|s| !s.is_empty()))
    {
        return Err(untranslatable("suffix", "fill-in-the-middle"));
    }
    if body.get("logprobs").is_some_and(|l| !l.is_null()) {
        return Err(untranslatable("logprobs", "token log probabilities"));
    }
    if body
        .get("best_of")
        .and_then(Value::as_u64)
        .is_some_and(|b| b > 1)
    {
        return Err(untranslatable("best_of", "server-side candidates"));
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert(
        "messages".into(),
        json!([{"role": "user", "content": prompt}]),
    );
    let max_tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => DEFAULT_MAX_TOKENS,
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(
                "max_tokens",
                "Invalid type for 'max_tokens': expected an integer.",
            )
        })?,
    };
    out.insert("max_tokens".into(), json!(max_tokens));
    for k in [
        "temperature",
        "top_p",
        "n",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "user",
        "logit_bias",
    ] {
        insert_opt(&mut out, k, body.get(k));
    }
    if stream {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    ChatRequest::from_map(out)
}

fn completion_id(chat_id: Option<&str>) -> String {
    match chat_id {
        Some(id) if id.starts_with("cmpl-") => id.to_string(),
        Some(id) if !id.is_empty() => format!("cmpl-{}", id.trim_start_matches("chatcmpl-")),
        _ => format!("cmpl-{:x}", now_unix()),
    }
}

/// A chat completion (hub shape) → a `text_completion`.
pub fn from_chat_response(resp: &Value, model: &str) -> Value {
    let choices: Vec<Value> = resp
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            json!({
                "text": content_text(c.get("message").and_then(|m| m.get("content"))),
                "index": c.get("index").and_then(Value::as_u64).unwrap_or(0),
                "logprobs": null,
                "finish_reason": str_field(c, "finish_reason").map(legacy_finish),
            })
        })
        .collect();
    let usage = resp
        .get("usage")
        .and_then(Usage::from_openai)
        .unwrap_or_default();
    json!({
        "id": completion_id(str_field(resp, "id")),
        "object": "text_completion",
        "created": resp.get("created").and_then(Value::as_u64).unwrap_or_else(now_unix),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    })
}

/// Completions know `stop`, `length` and `content_filter` only.
fn legacy_finish(reason: &str) -> &str {
    match reason {
        "length" | "content_filter" => reason,
        _ => "stop",
    }
}

/// Chat chunks → `text_completion` chunks, `data: [DONE]` last.
#[derive(Debug)]
pub struct CompletionsStreamFromChat {
    model: String,
    caller_wants_usage: bool,
    id: Option<String>,
    created: u64,
    usage: Option<Usage>,
    finished: bool,
    done: bool,
}

impl CompletionsStreamFromChat {
    pub fn new(model: &str, caller_wants_usage: bool) -> Self {
        CompletionsStreamFromChat {
            model: model.to_string(),
            caller_wants_usage,
            id: None,
            created: 0,
            usage: None,
            finished: false,
            done: false,
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id.as_deref().unwrap_or("cmpl-0"),
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if self.done || !self.finished {
            return;
        }
        self.done = true;
        if self.caller_wants_usage {
            let u = self.usage.unwrap_or_default();
            let mut c = self.chunk(json!([]));
            c["usage"] = json!({
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            });
            out.push(frame(&c));
        }
        out.push(Bytes::from_static(DONE_EVENT));
    }
}

impl StreamTranslator for CompletionsStreamFromChat {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<Bytes>) -> Result<(), GatewayError> {
        if self.done {
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
            self.done = true;
            return Err(GatewayError::new(ErrorKind::Upstream, short(message)));
        }
        if self.id.is_none() {
            self.id = Some(completion_id(str_field(&v, "id")));
            self.created = v
                .get("created")
                .and_then(Value::as_u64)
                .unwrap_or_else(now_unix);
        }
        if let Some(u) = v.get("usage").and_then(Usage::from_openai) {
            self.usage = Some(u);
        }
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = c
                .get("delta")
                .and_then(|d| str_field(d, "content"))
                .unwrap_or("");
            let finish = str_field(c, "finish_reason").map(legacy_finish);
            if text.is_empty() && finish.is_none() {
                continue;
            }
            if finish.is_some() {
                self.finished = true;
            }
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            out.push(frame(&self.chunk(json!([{
                "text": text,
                "index": index,
                "logprobs": null,
                "finish_reason": finish,
            }]))));
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
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseDecoder;

    #[test]
    fn prompt_becomes_one_user_message_with_the_legacy_default_length() {
        let r = CompletionsRequest::parse(
            br#"{"model":"m","prompt":"Say this is a test","stream":true}"#,
        )
        .unwrap();
        let chat = r.chat.unwrap();
        assert_eq!(chat.messages()[0]["content"], "Say this is a test");
        assert_eq!(chat.max_tokens(), Some(DEFAULT_MAX_TOKENS));
        assert!(chat.include_usage && r.stream && !r.include_usage);
        let r = CompletionsRequest::parse(br#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.chat.unwrap_err().param.as_deref(), Some("prompt"));
        let r = CompletionsRequest::parse(br#"{"model":"m","prompt":"a","echo":true}"#).unwrap();
        assert_eq!(r.chat.unwrap_err().param.as_deref(), Some("echo"));
        let e = CompletionsRequest::parse(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn chat_answers_become_text_completions() {
        let v = from_chat_response(
            &json!({"id": "chatcmpl-9", "created": 3, "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "This is a test."}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5}}),
            "m",
        );
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["id"], "cmpl-9");
        assert_eq!(v["choices"][0]["text"], "This is a test.");
        assert_eq!(v["usage"]["total_tokens"], 10);

        let wire = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"created\":1,\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        let mut d = SseDecoder::new();
        let mut evs = Vec::new();
        d.push(wire.as_bytes(), &mut evs).unwrap();
        let mut t = CompletionsStreamFromChat::new("m", true);
        let mut out = Vec::new();
        for e in &evs {
            t.on_event(e, &mut out).unwrap();
        }
        t.finish(&mut out);
        let text = String::from_utf8(out.concat().to_vec()).unwrap();
        assert_eq!(out.len(), 4, "{text}");
        assert!(text.contains("\"text\":\"Hi\""));
        assert!(text.contains("\"finish_reason\":\"stop\""));
        assert!(text.contains("\"total_tokens\":3"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(t.completed());
    }
}
