//! OpenAI chat-completions and embeddings: the hub shape of the gateway.
//!
//! Requests stay a JSON object map so same-protocol routes forward every field
//! the caller sent (including ones we do not know) with only `model` changed.
//! What routing and accounting need is read out once into typed fields.

use std::sync::OnceLock;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::{quick_chat, scan};

/// Parses a request body, naming the position of a syntax error the way a
/// human reads it (line and column).
pub fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    if body.is_empty() {
        return Err(GatewayError::invalid(
            "The request body is empty; expected a JSON object.",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(GatewayError::invalid(
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(GatewayError::invalid(format!(
            "We could not parse the JSON body of your request: {} (line {}, column {}).",
            describe_json_error(&e),
            e.line(),
            e.column()
        ))),
    }
}

fn describe_json_error(e: &serde_json::Error) -> String {
    // serde_json appends " at line X column Y" to its Display; we state the
    // position ourselves so keep only the reason.
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// A validated chat-completions request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The body as a tree: made when the request is built from one, or on
    /// first use from `raw` (a same-protocol call never needs it).
    body: OnceLock<Map<String, Value>>,
    /// The body as the caller sent it, kept while the body is unchanged, so
    /// a same-protocol call forwards these bytes with only `model` replaced
    /// rather than serialising a tree again; and the prompt-size estimate
    /// the quick reading of them worked out. Set only when no top-level key
    /// repeats (what is checked is what is sent); [`Self::body_mut`] drops it.
    caller: Option<(Bytes, u64)>,
    pub model: String,
    pub stream: bool,
    /// The caller asked for the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
}

impl ChatRequest {
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        Self::from_map(parse_json_object(body)?)
    }

    /// [`Self::parse`], keeping the bytes to forward (see [`Self::raw`]).
    /// A body of the plain shape is read in one pass without building its
    /// tree ([`crate::quick_chat`]); any other goes through [`Self::parse`],
    /// which gives the exact error.
    pub fn parse_bytes(body: &Bytes) -> Result<Self, GatewayError> {
        match quick_chat::read(body) {
            Some(q) => Ok(ChatRequest {
                body: OnceLock::new(),
                caller: Some((body.clone(), q.prompt_estimate)),
                model: q.model,
                stream: q.stream,
                include_usage: q.include_usage,
            }),
            None => Self::parse(body),
        }
    }

    pub fn body(&self) -> &Map<String, Value> {
        self.body
            .get_or_init(|| tree_of(self.raw().map(|b| &b[..])))
    }

    /// The body to change; the caller's bytes no longer stand for it.
    pub fn body_mut(&mut self) -> &mut Map<String, Value> {
        let tree = std::mem::take(&mut self.body)
            .into_inner()
            .unwrap_or_else(|| tree_of(self.raw().map(|b| &b[..])));
        self.caller = None;
        self.body = OnceLock::from(tree);
        match self.body.get_mut() {
            Some(tree) => tree,
            None => unreachable!("a OnceLock made from a value holds it"),
        }
    }

    /// The prompt-size estimate worked out while reading the caller's bytes.
    pub fn prompt_estimate(&self) -> Option<u64> {
        self.caller.as_ref().map(|(_, estimate)| *estimate)
    }

    /// The body as the caller sent it, while [`Self::body`] is unchanged.
    pub fn raw(&self) -> Option<&Bytes> {
        self.caller.as_ref().map(|(bytes, _)| bytes)
    }

    pub fn from_map(body: Map<String, Value>) -> Result<Self, GatewayError> {
        let model = required_model(&body)?;
        match body.get("messages") {
            None | Some(Value::Null) => {
                return Err(
                    GatewayError::invalid("Missing required parameter: 'messages'.")
                        .with_param("messages"),
                )
            }
            Some(Value::Array(messages)) => {
                if messages.is_empty() {
                    return Err(GatewayError::invalid(
                        "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                    )
                    .with_param("messages"));
                }
                for (i, m) in messages.iter().enumerate() {
                    let role = m.get("role").and_then(Value::as_str);
                    if role.is_none() {
                        return Err(GatewayError::invalid(format!(
                            "Missing required parameter: 'messages[{i}].role'."
                        ))
                        .with_param(format!("messages[{i}].role")));
                    }
                }
            }
            Some(_) => {
                return Err(GatewayError::invalid(
                    "Invalid type for 'messages': expected an array of message objects.",
                )
                .with_param("messages"))
            }
        }
        let stream = optional_bool(&body, "stream")?;
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ChatRequest {
            body: OnceLock::from(body),
            caller: None,
            model,
            stream,
            include_usage,
        })
    }

    pub fn messages(&self) -> &[Value] {
        self.body()
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// `max_completion_tokens` wins over the deprecated `max_tokens`, as in OpenAI's API.
    pub fn max_tokens(&self) -> Option<u64> {
        let body = self.body();
        body.get("max_completion_tokens")
            .and_then(Value::as_u64)
            .or_else(|| body.get("max_tokens").and_then(Value::as_u64))
    }
}

/// A validated embeddings request.
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    pub body: Map<String, Value>,
    pub model: String,
}

impl EmbeddingsRequest {
    pub fn parse(body: &[u8]) -> Result<Self, GatewayError> {
        let body = parse_json_object(body)?;
        let model = required_model(&body)?;
        match body.get("input") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            None | Some(Value::Null) => {
                return Err(
                    GatewayError::invalid("Missing required parameter: 'input'.")
                        .with_param("input"),
                )
            }
            Some(_) => {
                return Err(GatewayError::invalid(
                    "Invalid type for 'input': expected a string or an array.",
                )
                .with_param("input"))
            }
        }
        Ok(EmbeddingsRequest { body, model })
    }

    /// Inputs as texts; token-id arrays are rendered as space-joined numbers
    /// (enough for counting and for the simulated provider).
    pub fn inputs(&self) -> Vec<String> {
        fn one(v: &Value) -> String {
            match v {
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            }
        }
        match self.body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                vec![one(&Value::Array(items.clone()))]
            }
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            _ => Vec::new(),
        }
    }
}

/// The tree of bytes the quick reading accepted, so valid JSON objects
/// (empty only if that ever failed to hold).
fn tree_of(raw: Option<&[u8]>) -> Map<String, Value> {
    raw.and_then(|r| serde_json::from_slice(r).ok())
        .unwrap_or_default()
}

fn required_model(body: &Map<String, Value>) -> Result<String, GatewayError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(GatewayError::invalid("You must provide a model parameter.").with_param("model"))
        }
        Some(_) => Err(
            GatewayError::invalid("Invalid type for 'model': expected a string.")
                .with_param("model"),
        ),
    }
}

fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<bool, GatewayError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(GatewayError::invalid(format!(
            "Invalid type for '{field}': expected a boolean."
        ))
        .with_param(field)),
    }
}

/// Token accounting in OpenAI's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Of the completion tokens, those spent thinking (OpenAI
    /// `completion_tokens_details.reasoning_tokens`, Responses
    /// `output_tokens_details.reasoning_tokens`, Gemini `thoughtsTokenCount`).
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn from_openai(v: &Value) -> Option<Usage> {
        let u = v.as_object()?;
        let get = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Usage {
            prompt_tokens: get("prompt_tokens"),
            completion_tokens: get("completion_tokens"),
            cached_tokens: u
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
            reasoning_tokens: u
                .get("completion_tokens_details")
                .and_then(|d| d.get("reasoning_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })
    }

    pub fn to_openai(self) -> Value {
        let mut v = serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
        });
        // Only when there were any: answers of models that do not reason
        // keep the shape they always had.
        if self.reasoning_tokens > 0 {
            v["completion_tokens_details"] =
                serde_json::json!({ "reasoning_tokens": self.reasoning_tokens });
        }
        v
    }
}

/// OpenAI's `usage` object, the fields [`Usage`] keeps; deserialised
/// without building a tree. `null` counts as absent, as it does in
/// [`Usage::from_openai`].
#[derive(Deserialize)]
pub struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<TokenDetails>,
    #[serde(default)]
    completion_tokens_details: Option<TokenDetails>,
}

#[derive(Deserialize)]
struct TokenDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<OpenAiUsage> for Usage {
    fn from(u: OpenAiUsage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or(0),
            completion_tokens: u.completion_tokens.unwrap_or(0),
            cached_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning_tokens: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// A raw `usage` value: `Some(None)` for `null`, `None` when neither reader
/// below can take it (the caller reads the tree).
fn read_usage(raw: &[u8]) -> Option<Option<Usage>> {
    if raw == b"null" {
        return Some(None);
    }
    if let Some(u) = CountsReader::usage(raw) {
        return Some(Some(u));
    }
    // Only an object goes to serde, which would read an array positionally
    // where the tree sees no usage.
    if !raw.starts_with(b"{") {
        return None;
    }
    serde_json::from_slice::<OpenAiUsage>(raw)
        .ok()
        .map(|u| Some(Usage::from(u)))
}

/// OpenAI's usage as providers send it, read in one pass: objects whose
/// members are plain integer counts, `null` or such objects again. Anything
/// else (a string, a fraction, an escaped key) is left to serde's typed view
/// and the tree. serde's derive took ~5k instructions for this ~250-byte
/// object on every answer; this takes a fraction of that.
struct CountsReader<'a> {
    b: &'a [u8],
    i: usize,
}

impl CountsReader<'_> {
    fn usage(raw: &[u8]) -> Option<Usage> {
        let mut r = CountsReader { b: raw, i: 0 };
        let mut u = Usage::default();
        r.object(|r, key| {
            match key {
                b"prompt_tokens" => u.prompt_tokens = r.count()?,
                b"completion_tokens" => u.completion_tokens = r.count()?,
                b"prompt_tokens_details" => u.cached_tokens = r.detail(b"cached_tokens")?,
                b"completion_tokens_details" => {
                    u.reasoning_tokens = r.detail(b"reasoning_tokens")?
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        r.ws();
        (r.i == r.b.len()).then_some(u)
    }

    fn ws(&mut self) {
        self.i = scan::skip_ws(self.b, self.i);
    }

    /// Skips whitespace, then takes `c` if it comes next.
    fn take(&mut self, c: u8) -> bool {
        self.ws();
        let found = self.b.get(self.i) == Some(&c);
        self.i += usize::from(found);
        found
    }

    /// An object's members, each value left to `member`.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        if !self.take(b'{') {
            return None;
        }
        if self.take(b'}') {
            return Some(());
        }
        loop {
            if !self.take(b'"') {
                return None;
            }
            let start = self.i;
            let len = memchr::memchr2(b'"', b'\\', &self.b[start..])?;
            if self.b[start + len] != b'"' {
                return None;
            }
            self.i = start + len + 1;
            if !self.take(b':') {
                return None;
            }
            member(self, &self.b[start..start + len])?;
            if self.take(b'}') {
                return Some(());
            }
            if !self.take(b',') {
                return None;
            }
        }
    }

    /// `null` (0) or a plain integer that fits in a `u64`, as the tree
    /// reads it with `as_u64`.
    fn count(&mut self) -> Option<u64> {
        self.ws();
        let rest = &self.b[self.i..];
        if rest.starts_with(b"null") {
            self.i += 4;
            return Some(0);
        }
        let len = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        // A leading zero is not JSON; a fraction or exponent is not a count.
        if len == 0
            || (len > 1 && rest[0] == b'0')
            || matches!(rest.get(len), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        let mut n: u64 = 0;
        for &d in &rest[..len] {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.i += len;
        Some(n)
    }

    /// A details object's `wanted` count (0 when absent or `null`).
    fn detail(&mut self, wanted: &[u8]) -> Option<u64> {
        self.ws();
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(0);
        }
        let mut n = 0;
        self.object(|r, key| {
            if key == wanted {
                n = r.count()?;
            } else {
                r.skip()?;
            }
            Some(())
        })?;
        Some(n)
    }

    /// A member this reader does not keep: a count or an object of them.
    fn skip(&mut self) -> Option<()> {
        self.ws();
        if self.b.get(self.i) == Some(&b'{') {
            self.object(|r, _| r.skip())
        } else {
            self.count().map(|_| ())
        }
    }
}

/// What a streamed chat chunk means for the pass-through: its usage, and
/// whether it is the usage-only chunk OpenAI sends last when asked.
#[derive(Debug, Default, PartialEq)]
pub struct ChunkInfo {
    pub usage: Option<Usage>,
    pub usage_only: bool,
    pub has_content: bool,
    /// A choice carried a `finish_reason`.
    pub finished: bool,
}

pub fn inspect_chunk(data: &str) -> ChunkInfo {
    // Every chunk of every stream passes here: split out `usage` and
    // `choices` and look only at them (a whole `Value` tree per chunk was a
    // third of a stream's CPU, and serde skipping the other members still
    // most of what was left). A chunk the scan cannot split, or a usage of
    // an unexpected shape, gets the tree. `choices` is walked where it
    // stands, in the same pass, rather than skipped and walked again: a
    // chunk is mostly its choices.
    let b = data.as_bytes();
    let (mut usage, mut has_content, mut finished) = (None, false, false);
    let split = scan::whole(b, |start| {
        scan::walk_object(b, start, |key, at| match key {
            b"usage" => {
                let end = scan::value_end(b, at)?;
                usage = Some(&b[at..end]);
                Some(end)
            }
            b"choices" => {
                // A repeated `choices` counts as its last, as a parser keeps it.
                (has_content, finished) = (false, false);
                if b.get(at) != Some(&b'[') {
                    let end = scan::value_end(b, at)?;
                    return (&b[at..end] == b"null").then_some(end);
                }
                scan::walk_array(b, at, |choice| {
                    has_content = true;
                    let mut reason = None;
                    let end = scan::walk_object(b, choice, |key, at| {
                        let end = scan::value_end(b, at)?;
                        if key == b"finish_reason" {
                            reason = Some(&b[at..end]);
                        }
                        Some(end)
                    })?;
                    finished |= reason.is_some_and(|r| r != b"null");
                    Some(end)
                })
            }
            _ => scan::value_end(b, at),
        })
    });
    if !split {
        return inspect_chunk_tree(data);
    }
    let usage = match usage.map(read_usage) {
        None => None,
        Some(Some(u)) => u,
        Some(None) => return inspect_chunk_tree(data),
    };
    ChunkInfo {
        usage,
        usage_only: usage.is_some() && !has_content,
        has_content,
        finished,
    }
}

/// The usage of a whole (non-streamed) OpenAI answer: chat, completions or
/// embeddings. Only `usage` is parsed; the answer itself is passed on as
/// bytes. An answer the scan cannot split, or a usage of an unexpected
/// shape, is read through the tree.
pub fn answer_usage(body: &[u8]) -> Option<Usage> {
    // OpenAI puts `usage` at the end of an answer, where it is found
    // without walking the rest; otherwise the members are split in order.
    let raw = scan::trailing_member(body, "usage").map(Some).or_else(|| {
        let mut raw = None;
        let split = scan::for_each_member(body, |key, value| {
            if key == b"usage" {
                raw = Some(Some(value));
            }
        });
        if split {
            raw.or(Some(None))
        } else {
            None
        }
    });
    match raw {
        Some(None) => return None,
        Some(Some(raw)) => {
            if let Some(u) = read_usage(raw) {
                return u;
            }
        }
        None => {}
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .as_ref()
        .and_then(|v| v.get("usage"))
        .and_then(Usage::from_openai)
}

fn inspect_chunk_tree(data: &str) -> ChunkInfo {
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return ChunkInfo::default();
    };
    let usage = v.get("usage").and_then(Usage::from_openai);
    let choices_empty = v
        .get("choices")
        .and_then(Value::as_array)
        .is_none_or(|c| c.is_empty());
    let finished = v.get("choices").and_then(Value::as_array).is_some_and(|c| {
        c.iter()
            .any(|ch| ch.get("finish_reason").is_some_and(|f| !f.is_null()))
    });
    ChunkInfo {
        usage,
        usage_only: usage.is_some() && choices_empty,
        has_content: !choices_empty,
        finished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasoning tokens as each provider reports them (shapes from the
    /// recorded fixtures), and OpenAI's usage keeps its shape without any.
    /// The scanned reader reads usage as the tree does, shape by shape, in
    /// chunks and in whole answers.
    #[test]
    fn scanned_usage_agrees_with_the_tree() {
        for raw in [
            r#"{"prompt_tokens":12,"completion_tokens":140,"total_tokens":152,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":100}}"#,
            r#"{"prompt_tokens":1}"#,
            r#"{"prompt_tokens":null,"completion_tokens":5,"prompt_tokens_details":null}"#,
            r#"{"prompt_tokens":1.5,"completion_tokens":5}"#,
            r#"{"prompt_tokens":2,"prompt_tokens":7}"#,
            r#"{"prompt_tokens":"9","completion_tokens":5}"#,
            r#"{}"#,
            r#"null"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":-1}}"#,
            r#"{"prompt_tokens":5,"prompt_tokens":null}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens":1e3}"#,
            r#"{"prompt_tokens":2,"prompt_tokens_details":5}"#,
            r#"{"prompt_tokens":2,"prompt_tokens_details":{"cached_tokens":4},"prompt_tokens_details":{}}"#,
            r#"{"completion_tokens_details":{"reasoning_tokens":7,"reasoning_tokens":null}}"#,
            r#"{"completion_tokens_details":[1]}"#,
            r#"[]"#,
            r#"5"#,
            r#"{"prompt_tokens":1,"x":{"y":{"z":2}},"completion_tokens":3}"#,
            r#"{"prompt_tokens":1,"model":"m","completion_tokens":3}"#,
            r#"{ "prompt_tokens" : 4 , "prompt_tokens_details" : { "cached_tokens" : 2 } }"#,
            r#"{"prompt_tokens":0,"completion_tokens":10}"#,
            r#"{"prompt_tokens":12.0}"#,
            r#"{"prompt_tokens":-3}"#,
        ] {
            let answer = format!(r#"{{"id":"x","usage":{raw}}}"#);
            assert_eq!(
                answer_usage(answer.as_bytes()),
                serde_json::from_str::<Value>(&answer)
                    .unwrap()
                    .get("usage")
                    .and_then(Usage::from_openai),
                "{raw}"
            );
            let chunk = format!(r#"{{"choices":[],"usage":{raw}}}"#);
            assert_eq!(
                inspect_chunk(&chunk).usage,
                inspect_chunk_tree(&chunk).usage,
                "{raw}"
            );
        }
    }

    /// Chunks mutated byte by byte (brackets, quotes, escapes, commas and
    /// keys moved in and out): whenever the result is still JSON, the
    /// one-pass scan reads it exactly as the tree does.
    #[test]
    fn mutated_chunks_read_as_the_tree_reads_them() {
        const BASES: [&str; 6] = [
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"a \"b\" [c] {d}"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"},{"index":1,"delta":{"content":"x"},"finish_reason":null}]}"#,
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"q\":[1,2]}"}}]},"finish_reason":"tool_calls"}],"usage":null,"obfuscation":"xy"}"#,
            "{ \"choices\" : [ { \"finish_reason\" : null } ] ,\n \"usage\" : { \"prompt_tokens\" : 3 } }",
            r#"{"choices":null,"usage":{"completion_tokens":4}}"#,
        ];
        const BYTES: &[u8] = br#"{}[]",:\ 0na"#;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut checked, mut tried) = (0, 0);
        for base in BASES {
            assert_eq!(inspect_chunk(base), inspect_chunk_tree(base), "{base}");
            for _ in 0..4000 {
                let mut b = base.as_bytes().to_vec();
                for _ in 0..1 + next(3) {
                    let at = next(b.len());
                    match next(3) {
                        0 => b[at] = BYTES[next(BYTES.len())],
                        1 => b.insert(at, BYTES[next(BYTES.len())]),
                        _ => {
                            b.remove(at);
                        }
                    }
                }
                tried += 1;
                let Ok(text) = std::str::from_utf8(&b) else {
                    continue;
                };
                if serde_json::from_str::<Value>(text).is_err() {
                    continue;
                }
                checked += 1;
                assert_eq!(inspect_chunk(text), inspect_chunk_tree(text), "{text}");
            }
        }
        // Enough of the mutants stay JSON for the comparison to mean something.
        assert!(checked * 20 > tried, "{checked} of {tried}");
    }

    /// The caller's bytes stand for the body only until it is changed.
    #[test]
    fn a_changed_body_drops_the_caller_bytes() {
        let bytes =
            Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let mut chat = ChatRequest::parse_bytes(&bytes).unwrap();
        assert_eq!(chat.raw(), Some(&bytes));
        assert_eq!(ChatRequest::parse(&bytes).unwrap().raw(), None);
        chat.body_mut().insert("n".into(), Value::from(2));
        assert_eq!(chat.raw(), None);
        assert_eq!(chat.body()["n"], 2);
    }

    /// Chunks and answers the scan cannot split are read through the tree,
    /// with the same result.
    #[test]
    fn what_the_scan_refuses_the_tree_reads() {
        for chunk in [
            r#"{"choices":[],"\u0075sage":{"prompt_tokens":2}}"#,
            r#"{"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":2},"usage":{"prompt_tokens":3}}"#,
            r#"{"choices":[{"finish_r\u0065ason":"stop"}]}"#,
            r#"{"choices":[null],"usage":null}"#,
            r#"{"choices":"x","usage":{"prompt_tokens":4}}"#,
            r#"{"choices":[], "usage": {"prompt_tokens": 1}"#,
            // A repeated `choices` is read as its last, whatever came first.
            r#"{"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}],"choices":null}"#,
            r#"{"choices":null,"choices":[{"finish_reason":null,"finish_reason":"length"}]}"#,
            r#"{"choices":[{"finish_reason":"stop"}],"choices":[{"delta":{}}]}"#,
            r#"{"choices":{"finish_reason":"stop"}}"#,
            r#"{"choices":[{"finish_reason":"stop"},2]}"#,
            r#"{"choices":[{"finish_reason":"stop"} {"x":1}]}"#,
        ] {
            assert_eq!(inspect_chunk(chunk), inspect_chunk_tree(chunk), "{chunk}");
        }
        let escaped = br#"{"id":"x","\u0075sage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        assert_eq!(answer_usage(escaped).map(|u| u.prompt_tokens), Some(5));
        assert_eq!(answer_usage(br#"{"id":"x"}"#), None);
        // A usage of the wrong shape is still usage, read as the tree reads it.
        let odd = answer_usage(br#"{"usage":{"prompt_tokens":"9","completion_tokens":2}}"#);
        assert_eq!(
            odd.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((0, 2))
        );
    }

    #[test]
    fn reasoning_tokens_from_every_usage_shape() {
        let openai = serde_json::json!({"prompt_tokens": 12, "completion_tokens": 140,
            "completion_tokens_details": {"reasoning_tokens": 100}});
        let u = Usage::from_openai(&openai).unwrap();
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (140, 100));
        assert_eq!(
            u.to_openai()["completion_tokens_details"]["reasoning_tokens"],
            100
        );
        let plain = Usage::from_openai(&serde_json::json!({"prompt_tokens": 1})).unwrap();
        assert!(plain.to_openai().get("completion_tokens_details").is_none());
        let responses = serde_json::json!({"input_tokens": 9, "output_tokens": 300,
            "output_tokens_details": {"reasoning_tokens": 256}});
        let u = crate::responses::usage_from_responses(&responses).unwrap();
        assert_eq!(u.reasoning_tokens, 256);
        let gemini = serde_json::json!({"promptTokenCount": 8, "candidatesTokenCount": 20,
            "thoughtsTokenCount": 1754});
        let u = crate::gemini_native::usage_from_metadata(&gemini).unwrap();
        assert_eq!((u.completion_tokens, u.reasoning_tokens), (1774, 1754));
    }

    #[test]
    fn json_errors_name_the_position() {
        let e = ChatRequest::parse(b"{\n  \"model\": \"x\",\n  oops\n}").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.message.contains("line 3"), "{}", e.message);
        assert!(e.message.contains("column"), "{}", e.message);
    }

    #[test]
    fn missing_fields() {
        let e =
            ChatRequest::parse(br#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = ChatRequest::parse(br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = ChatRequest::parse(br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = ChatRequest::parse(br#"{"model":"m","messages":[{"content":"x"}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = ChatRequest::parse(br#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream"));
        assert!(ChatRequest::parse(b"[1]").is_err());
        assert!(ChatRequest::parse(b"").is_err());
    }

    #[test]
    fn the_typed_chunk_view_reads_what_the_tree_reads() {
        let chunks = [
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi \"x\""},"finish_reason":null}],"usage":null}"#,
            r#"{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#,
            r#"{"choices":[{"finish_reason":"length"},{"finish_reason":null}]}"#,
            r#"{"choices":"odd","usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[],"choices":[{"finish_reason":"stop"}]}"#,
            r#"not json"#,
        ];
        for c in chunks {
            assert_eq!(inspect_chunk(c), inspect_chunk_tree(c), "{c}");
        }
        let last = inspect_chunk(chunks[2]);
        assert!(last.usage_only && !last.has_content);
        assert_eq!(last.usage.map(|u| u.cached_tokens), Some(2));
        assert!(inspect_chunk(chunks[1]).finished);
    }

    #[test]
    fn reads_stream_options_and_limits() {
        let r = ChatRequest::parse(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,
                "stream_options":{"include_usage":true},"max_tokens":5,"max_completion_tokens":7,"x_unknown":1}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens(), Some(7));
        assert_eq!(r.body()["x_unknown"], 1);
    }

    #[test]
    fn embeddings_inputs() {
        let r = EmbeddingsRequest::parse(br#"{"model":"m","input":["a","b"]}"#).unwrap();
        assert_eq!(r.inputs(), ["a", "b"]);
        let r = EmbeddingsRequest::parse(br#"{"model":"m","input":[1,2]}"#).unwrap();
        assert_eq!(r.inputs().len(), 1);
        assert!(EmbeddingsRequest::parse(br#"{"model":"m"}"#).is_err());
    }

    #[test]
    fn chunk_inspection() {
        let c = inspect_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        assert!(c.usage_only);
        assert_eq!(c.usage.unwrap().completion_tokens, 4);
        let c = inspect_chunk(r#"{"choices":[{"delta":{"content":"x"}}]}"#);
        assert!(!c.usage_only && c.has_content);
    }
}
