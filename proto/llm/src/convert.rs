//! Small helpers shared by the provider adapters.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::error::GatewayError;
use crate::sse::{encode_event, DONE_EVENT};

/// Seconds since the Unix epoch for the `created` field. Reading the clock is
/// not I/O in the sense that matters here: nothing blocks and nothing fails.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Splits `data:<media-type>;base64,<payload>` into media type and payload.
/// Non-base64 data URLs are rejected: every provider wants base64.
pub(crate) fn parse_data_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    let media_type = if media_type.is_empty() {
        "application/octet-stream"
    } else {
        media_type
    };
    Some((media_type.to_string(), data.to_string()))
}

pub(crate) fn is_http_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The URL of an OpenAI `image_url` part, which may be an object or, in
/// older clients, a bare string.
pub(crate) fn image_url_of(part: &Value) -> Option<&str> {
    match part.get("image_url")? {
        Value::String(s) => Some(s),
        other => other.get("url")?.as_str(),
    }
}

/// Text of an OpenAI `content` that is a string or an array of text parts.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// OpenAI `stop`: a string or an array of strings.
pub(crate) fn stop_sequences(v: Option<&Value>) -> Option<Vec<Value>> {
    match v? {
        Value::String(s) => Some(vec![Value::String(s.clone())]),
        Value::Array(items) => {
            let seqs: Vec<Value> = items.iter().filter(|s| s.is_string()).cloned().collect();
            (!seqs.is_empty()).then_some(seqs)
        }
        _ => None,
    }
}

/// Tool-call arguments arrive as a JSON string; providers want the object.
/// The function name and parsed arguments of an OpenAI tool call at
/// `param` (e.g. `messages[2].tool_calls[0]`), with errors naming the field.
pub(crate) fn tool_call_function<'a>(
    call: &'a Value,
    param: &str,
) -> Result<(&'a str, Value), GatewayError> {
    let f = call.get("function");
    let name = f.and_then(|f| str_field(f, "name")).ok_or_else(|| {
        GatewayError::invalid(format!(
            "Missing required parameter: '{param}.function.name'."
        ))
        .with_param(format!("{param}.function.name"))
    })?;
    let args = parse_arguments(
        f.and_then(|f| f.get("arguments")),
        &format!("{param}.function.arguments"),
    )?;
    Ok((name, args))
}

pub(crate) fn parse_arguments(args: Option<&Value>, param: &str) -> Result<Value, GatewayError> {
    match args {
        None | Some(Value::Null) => Ok(json!({})),
        Some(Value::Object(o)) => Ok(Value::Object(o.clone())),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(json!({})),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(GatewayError::invalid(format!(
                "Invalid '{param}': tool call arguments must be a JSON object encoded as a string."
            ))
            .with_param(param)),
        },
        Some(_) => Err(GatewayError::invalid(format!(
            "Invalid type for '{param}': expected a string."
        ))
        .with_param(param)),
    }
}

pub(crate) fn chunk(
    id: &str,
    created: u64,
    model: &str,
    index: u64,
    delta: Value,
    finish_reason: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": index,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
    })
}

pub(crate) fn frame(v: &Value) -> Bytes {
    encode_event(None, &v.to_string())
}

pub(crate) fn done_frame() -> Bytes {
    Bytes::from_static(DONE_EVENT)
}

pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

pub(crate) fn u64_field(v: Option<&Value>, key: &str) -> u64 {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

pub(crate) fn insert_opt(map: &mut Map<String, Value>, key: &str, v: Option<&Value>) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        map.insert(key.to_string(), v.clone());
    }
}

/// Mapping from OpenAI `reasoning_effort` to a thinking token budget.
pub(crate) fn effort_budget(effort: &str) -> Option<u64> {
    match effort {
        "minimal" => Some(1024),
        "low" => Some(2048),
        "medium" => Some(8192),
        "high" => Some(16384),
        _ => None,
    }
}

/// The part of a provider error message safe to show callers. Bodies can be
/// large HTML pages; keep the answer short.
pub(crate) fn short(s: &str) -> String {
    const MAX: usize = 500;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls() {
        assert_eq!(
            parse_data_url("data:image/png;base64,AAAA"),
            Some(("image/png".into(), "AAAA".into()))
        );
        assert_eq!(parse_data_url("data:text/plain,hello"), None);
        assert_eq!(parse_data_url("https://x"), None);
        assert!(is_http_url("HTTPS://example.com/a.png"));
        assert!(!is_http_url("ftp://x"));
    }

    #[test]
    fn arguments() {
        assert_eq!(parse_arguments(Some(&json!("")), "p").unwrap(), json!({}));
        assert_eq!(
            parse_arguments(Some(&json!("{\"a\":1}")), "p").unwrap(),
            json!({"a":1})
        );
        assert!(parse_arguments(Some(&json!("[1]")), "p").is_err());
        assert!(parse_arguments(Some(&json!("{oops")), "p").is_err());
    }

    #[test]
    fn shortening_respects_char_boundaries() {
        let s = "é".repeat(400);
        assert!(short(&s).ends_with('…'));
    }
}
