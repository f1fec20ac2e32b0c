//! OpenAI and every OpenAI-compatible provider: same protocol, so the body
//! passes through with only `model` rewritten.

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use switchyard_llm::openai::answer_usage;
use switchyard_llm::passthrough::OpenAiPassthrough;
use switchyard_llm::responses::{responses_answer_usage, ResponsesPassthrough};
use switchyard_llm::scan;
use switchyard_llm::translate::StreamTranslator;
use switchyard_llm::{ErrorKind, GatewayError};
use switchyard_proto::Secret;

use super::{byte_stream, post_payload, scrub, unsupported, CallContext, Provider, ProviderReply};
use crate::request::Operation;

pub struct OpenAiAdapter;

#[async_trait]
impl Provider for OpenAiAdapter {
    async fn call(&self, ctx: CallContext<'_>) -> Result<ProviderReply, GatewayError> {
        let target = &ctx.request.target;
        // The caller's chat bytes are used as they came when they can be;
        // the tree is only made (and serialised) when they cannot.
        let caller_bytes = match &ctx.request.op {
            Operation::Chat(chat) => chat.raw(),
            _ => None,
        };
        let (path, stream, caller_wants_usage) = match &ctx.request.op {
            Operation::Chat(chat) => ("chat/completions", chat.stream, chat.include_usage),
            Operation::Embeddings(_) => ("embeddings", false, false),
            Operation::Completions(c) => ("completions", c.stream, c.include_usage),
            Operation::Responses(r) => ("responses", r.stream, true),
            _ => return Err(unsupported(ctx.provider, "this endpoint")),
        };
        let responses = matches!(ctx.request.op, Operation::Responses(_));
        // Responses streams always end with usage; the field does not exist there.
        let force_usage = stream && !responses;
        let from_caller =
            caller_bytes.and_then(|raw| rewrite_caller_bytes(raw, &target.model, force_usage));
        let payload = match from_caller {
            Some(payload) => payload,
            None => {
                let body = match &ctx.request.op {
                    Operation::Chat(chat) => chat.body(),
                    Operation::Embeddings(e) => &e.body,
                    Operation::Completions(c) => &c.body,
                    Operation::Responses(r) => &r.body,
                    _ => return Err(unsupported(ctx.provider, "this endpoint")),
                };
                let body = Rewritten {
                    body,
                    model: &target.model,
                    force_usage,
                };
                serde_json::to_vec(&body)
                    .map_err(|e| GatewayError::new(ErrorKind::Internal, e.to_string()))?
            }
        };
        let url = super::provider_url(ctx.provider, path)?;
        // Concatenated, not `format!`ed: this runs on every request.
        let auth = ctx.key.map(|k| ["Bearer ", k.expose()].concat());
        let headers: Vec<(http::HeaderName, &str)> = auth
            .as_deref()
            .map(|a| (http::header::AUTHORIZATION, a))
            .into_iter()
            .collect();
        let provider = &ctx.provider.name;
        let keys = &ctx.provider.keys;
        let resp = post_payload(&ctx, url, payload, &headers, stream, |status, body, ra| {
            error_from_upstream(provider, status, body, ra, keys)
        })
        .await?;
        if stream {
            let translator: Box<dyn StreamTranslator> = if responses {
                Box::new(ResponsesPassthrough::new())
            } else {
                Box::new(OpenAiPassthrough::new(caller_wants_usage))
            };
            return Ok(ProviderReply::Stream {
                upstream: byte_stream(resp, provider),
                translator,
            });
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| super::transport_error(provider, &e))?;
        let usage = if responses {
            responses_answer_usage(&body)
        } else {
            answer_usage(&body)
        };
        Ok(ProviderReply::Json { body, usage })
    }
}

/// The caller's body with only `model` replaced (and, for streams, usage
/// asked for), serialised straight from the borrowed map: the hot path never
/// deep-copies a request to change one field.
struct Rewritten<'a> {
    body: &'a Map<String, Value>,
    model: &'a str,
    /// Always ask for usage so the request can be accounted; the
    /// pass-through withholds that chunk if the caller did not ask.
    force_usage: bool,
}

/// [`Rewritten`] written over the bytes the caller sent: each member copied
/// as it came, `model` replaced (and `stream_options` when usage is forced).
/// Copying skips serialising a tree, the larger cost for a long
/// conversation. `raw` comes from `ChatRequest::raw`, which is only set
/// when no top-level key repeats, so every member sent is one that was
/// checked. None when the bytes cannot be split member by member (an
/// escaped key): the caller serialises the tree then.
fn rewrite_caller_bytes(raw: &[u8], model: &str, force_usage: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len() + model.len() + 48);
    out.extend_from_slice(b"{\"model\":");
    serde_json::to_writer(&mut out, model).ok()?;
    let mut wrote_options = false;
    let split = scan::for_each_member(raw, |key, value| {
        if key == b"model" {
            return;
        }
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key);
        out.extend_from_slice(b"\":");
        if force_usage && key == b"stream_options" {
            let given = serde_json::from_slice::<Value>(value).ok();
            let _ = serde_json::to_writer(&mut out, &usage_options(given.as_ref()));
            wrote_options = true;
        } else {
            out.extend_from_slice(value);
        }
    });
    if !split {
        return None;
    }
    if force_usage && !wrote_options {
        out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    }
    out.push(b'}');
    Some(out)
}

/// The caller's `stream_options` with usage asked for.
fn usage_options(given: Option<&Value>) -> Map<String, Value> {
    let mut opts = given
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    opts.insert("include_usage".into(), Value::Bool(true));
    opts
}

impl serde::Serialize for Rewritten<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        let mut wrote_options = false;
        for (k, v) in self.body {
            match k.as_str() {
                "model" => {}
                "stream_options" if self.force_usage => {
                    map.serialize_entry(k, &usage_options(Some(v)))?;
                    wrote_options = true;
                }
                _ => map.serialize_entry(k, v)?,
            }
        }
        if self.force_usage && !wrote_options {
            map.serialize_entry("stream_options", &json!({ "include_usage": true }))?;
        }
        map.end()
    }
}

/// OpenAI's error body is `{"error": {"message", "type", "param", "code"}}`.
pub fn error_from_upstream(
    provider: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<String>,
    keys: &[impl AsRef<Secret>],
) -> GatewayError {
    let kind = GatewayError::kind_for_upstream_status(status);
    if status == 401 || status == 403 {
        // The provider refused the gateway's own credential; its message
        // often quotes part of the key, so none of it is passed on.
        return GatewayError::new(
            kind,
            format!(
                "The provider `{provider}` rejected the gateway's credentials (HTTP {status})."
            ),
        )
        .with_code("upstream_auth_failed");
    }
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let upstream_msg = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message").or(Some(e)))
        .and_then(Value::as_str)
        .map(str::to_string);
    let message = match upstream_msg {
        Some(m) => format!("{} (from provider `{provider}`)", scrub(&m, keys)),
        None => format!("The provider `{provider}` answered HTTP {status}."),
    };
    let mut err = GatewayError::new(kind, message).with_retry_after(retry_after);
    if kind == ErrorKind::ModelNotFound {
        err = err.with_code("model_not_found");
    }
    if let Some(param) = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/param"))
        .and_then(Value::as_str)
    {
        err = err.with_param(param);
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_changes_only_model_and_usage_flag() {
        let body: Map<String, Value> = serde_json::from_value(json!({
            "model": "fast", "x_vendor": {"a": [1, 2]}, "stream": true,
            "stream_options": {"include_usage": false, "other": 1}
        }))
        .unwrap();
        let out = serde_json::to_value(Rewritten {
            body: &body,
            model: "gpt-4o",
            force_usage: true,
        })
        .unwrap();
        assert_eq!(out["model"], "gpt-4o");
        assert_eq!(out["x_vendor"], json!({"a": [1, 2]}));
        assert_eq!(
            out["stream_options"],
            json!({"include_usage": true, "other": 1})
        );
        let plain: Map<String, Value> =
            serde_json::from_value(json!({"model": "m", "input": "x"})).unwrap();
        let out = serde_json::to_value(Rewritten {
            body: &plain,
            model: "e",
            force_usage: false,
        })
        .unwrap();
        assert_eq!(out, json!({"model": "e", "input": "x"}));
    }

    /// Written over the caller's bytes, the body says what the tree says,
    /// in the caller's member order; an escaped key is left to the tree.
    #[test]
    fn caller_bytes_are_forwarded_with_only_model_and_usage_changed() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"h\u00e9 \"x\""}],"model":"fast","z":{"a":[1,2]}}"#,
                false,
            ),
            (
                r#"{ "model" : "fast", "stream": true, "stream_options": {"other": 1} }"#,
                true,
            ),
            (r#"{"model":"fast","stream":true}"#, true),
            (
                r#"{"model":"fast","stream":true,"stream_options":null}"#,
                true,
            ),
        ];
        for (raw, force_usage) in cases {
            let body: Map<String, Value> = serde_json::from_str(raw).unwrap();
            let model = "gpt-\"4o";
            let bytes = rewrite_caller_bytes(raw.as_bytes(), model, force_usage).unwrap();
            let sent: Value = serde_json::from_slice(&bytes).unwrap();
            let tree = Rewritten {
                body: &body,
                model,
                force_usage,
            };
            assert_eq!(sent, serde_json::to_value(&tree).unwrap(), "{raw}");
        }
        // The caller's order is kept (serde_json's map would sort it).
        assert_eq!(
            rewrite_caller_bytes(br#"{"z":1,"model":"m","a":2}"#, "n", false).unwrap(),
            br#"{"model":"n","z":1,"a":2}"#
        );
        assert!(rewrite_caller_bytes(br#"{"model":"m","\u006dessages":[]}"#, "n", false).is_none());
    }

    #[test]
    fn upstream_errors_map_and_scrub() {
        let keys = vec![Secret::new("sk-test-SECRET")];
        let e = error_from_upstream(
            "openai",
            401,
            br#"{"error":{"message":"Incorrect API key provided: sk-test-SECRET"}}"#,
            None,
            &keys,
        );
        assert_eq!(e.status(), 502);
        assert!(!e.message.contains("SECRET"));
        let e = error_from_upstream(
            "openai",
            400,
            br#"{"error":{"message":"bad sk-test-SECRET thing","param":"messages"}}"#,
            None,
            &keys,
        );
        assert_eq!(e.status(), 400);
        assert!(!e.message.contains("SECRET"));
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = error_from_upstream("openai", 429, b"{}", Some("7".into()), &keys);
        assert_eq!((e.status(), e.retry_after.as_deref()), (429, Some("7")));
        let e = error_from_upstream("openai", 503, b"upstream connect error", None, &keys);
        assert_eq!(e.status(), 503);
        let e = error_from_upstream("openai", 500, b"<html>", None, &keys);
        assert_eq!(e.status(), 502);
    }
}
