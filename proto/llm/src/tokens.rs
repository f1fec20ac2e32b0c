//! Local token counts for providers without a counting endpoint.
//!
//! Counts use OpenAI's `o200k_base` BPE (the `tiktoken-rs` crate, the
//! vocabulary compiled in). Other vendors' tokenizers differ, so for them a
//! count is an estimate; `proto/llm/tests/token_estimates.rs` measures how
//! far it lands from what Anthropic and Gemini reported on the recorded
//! fixtures. Counting happens off the request path of normal calls: only
//! `count_tokens` / `:countTokens` requests pay for it.

use serde_json::{Map, Value};

use crate::convert::str_field;

/// Tokens each message adds for its role and framing (OpenAI's published
/// accounting for chat formats).
const PER_MESSAGE: u64 = 3;

/// The system prompt Anthropic adds when tools are declared (its
/// documented count for current models with `tool_choice` auto/none).
const ANTHROPIC_TOOL_PROMPT: u64 = 346;

pub fn count_text(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

fn content_text(content: Option<&Value>, out: &mut String) {
    match content {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(blocks)) => {
            for b in blocks {
                // Anthropic drops thinking blocks of earlier turns from the
                // context, so they are not counted.
                if let Some(t) = str_field(b, "text") {
                    out.push_str(t);
                } else if let Some(input) = b.get("input") {
                    out.push_str(&input.to_string());
                } else if b.get("content").is_some() {
                    content_text(b.get("content"), out);
                }
                out.push('\n');
            }
        }
        _ => {}
    }
}

/// Input tokens of an Anthropic Messages request (`count_tokens` body):
/// system, messages and tool definitions.
pub fn anthropic_input_tokens(body: &Map<String, Value>) -> u64 {
    let mut text = String::new();
    content_text(body.get("system"), &mut text);
    let messages = body.get("messages").and_then(Value::as_array);
    for m in messages.into_iter().flatten() {
        content_text(m.get("content"), &mut text);
        text.push('\n');
    }
    let mut hidden = 0;
    if let Some(tools) = body
        .get("tools")
        .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()))
    {
        text.push_str(&tools.to_string());
        hidden = ANTHROPIC_TOOL_PROMPT;
    }
    let n = messages.map_or(0, |m| m.len() as u64);
    count_text(&text) + PER_MESSAGE * n + hidden
}

/// Input tokens of a Gemini `countTokens` / `generateContent` body.
pub fn gemini_input_tokens(body: &Map<String, Value>) -> u64 {
    let text = crate::gemini_native::request_text(body);
    let inner = body
        .get("generateContentRequest")
        .and_then(Value::as_object)
        .unwrap_or(body);
    let n = inner
        .get("contents")
        .and_then(Value::as_array)
        .map_or(0, |c| c.len() as u64);
    count_text(&text) + PER_MESSAGE * n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_a_real_bpe() {
        // "Hello, world!" is 4 tokens in o200k_base.
        assert_eq!(count_text("Hello, world!"), 4);
        assert_eq!(count_text(""), 0);
        let body: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]}],
        }))
        .unwrap();
        assert!(anthropic_input_tokens(&body) >= 4 + 2 + PER_MESSAGE);
    }
}
