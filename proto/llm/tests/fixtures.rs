//! Provider translation checked against recorded real payloads
//! (`tests/fixtures/`, see its README.md and PROVENANCE.md).
//!
//! Expected values are computed from the recordings themselves with a
//! deliberately naive reading of each provider format, then compared with
//! what the adapters produce in the OpenAI shape.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Map, Value};
use switchyard_llm::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_llm::sse::{SseDecoder, SseEvent};
use switchyard_llm::translate::StreamTranslator;
use switchyard_llm::{anthropic, gemini, ErrorKind, GatewayError};

// ---------------------------------------------------------------------------
// Fixture access
// ---------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Case {
    provider: String,
    name: String,
    request: Value,
    response: Value,
}

impl Case {
    fn load(provider: &str, name: &str) -> Case {
        let dir = root().join(provider).join(name);
        Case {
            provider: provider.into(),
            name: name.into(),
            request: read_json(dir.join("request.json")),
            response: read_json(dir.join("response.json")),
        }
    }

    fn status(&self) -> u16 {
        self.response["status"].as_u64().unwrap() as u16
    }

    fn req_body(&self) -> &Value {
        &self.request["body"]
    }

    fn body(&self) -> &Value {
        &self.response["body"]
    }

    fn sse(&self) -> Option<&str> {
        self.response["body_sse"].as_str()
    }

    /// The response body as the bytes an upstream would have sent.
    fn raw_body(&self) -> Vec<u8> {
        if let Some(s) = self.sse() {
            return s.as_bytes().to_vec();
        }
        if let Some(s) = self.response["body_text"].as_str() {
            if self.response.get("body").is_none() {
                return s.as_bytes().to_vec();
            }
        }
        serde_json::to_vec(self.body()).unwrap()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.response["headers"][name].as_str().map(str::to_string)
    }

    fn label(&self) -> String {
        format!("{}/{}", self.provider, self.name)
    }
}

fn all_cases(provider: &str) -> Vec<Case> {
    let index = read_json(root().join("index.json"));
    let cases: Vec<Case> = index
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["provider"] == provider)
        .map(|c| Case::load(provider, c["case"].as_str().unwrap()))
        .collect();
    assert!(!cases.is_empty());
    cases
}

fn chat_request(body: &Value) -> ChatRequest {
    ChatRequest::from_map(body.as_object().unwrap().clone()).unwrap()
}

// ---------------------------------------------------------------------------
// Streaming helpers
// ---------------------------------------------------------------------------

fn decode(wire: &[u8], chunk: usize) -> Vec<SseEvent> {
    let mut d = SseDecoder::new();
    let mut evs = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        d.push(piece, &mut evs).unwrap();
    }
    evs.extend(d.finish());
    evs
}

/// Feeds `wire` through the decoder in `chunk`-byte pieces and the
/// translator, returning the translator's output decoded again.
fn run_stream(t: &mut dyn StreamTranslator, wire: &[u8], chunk: usize) -> Vec<SseEvent> {
    run_stream_with(t, wire, chunk, |e| {
        switchyard_llm::sse::encode_event(None, &e.to_openai_json().to_string())
    })
}

/// Like the gateway's stream layer: an error a translator returns is
/// rendered in the caller's protocol by `render` and ends the stream.
fn run_stream_with(
    t: &mut dyn StreamTranslator,
    wire: &[u8],
    chunk: usize,
    render: fn(&switchyard_llm::GatewayError) -> bytes::Bytes,
) -> Vec<SseEvent> {
    let mut d = SseDecoder::new();
    let mut out = Vec::new();
    let mut evs = Vec::new();
    let mut failed = false;
    'feed: for piece in wire.chunks(chunk.max(1)) {
        d.push(piece, &mut evs).unwrap();
        for ev in evs.drain(..) {
            if let Err(e) = t.on_event(&ev, &mut out) {
                out.push(render(&e));
                failed = true;
                break 'feed;
            }
        }
    }
    if !failed {
        if let Some(ev) = d.finish() {
            if let Err(e) = t.on_event(&ev, &mut out) {
                out.push(render(&e));
                failed = true;
            }
        }
    }
    if !failed {
        t.finish(&mut out);
    }
    let bytes: Vec<u8> = out.iter().flat_map(|b| b.to_vec()).collect();
    decode(&bytes, bytes.len())
}

/// An OpenAI stream folded back into one message, the way clients merge
/// deltas, with the framing rules checked on the way.
#[derive(Debug, Default)]
struct Assembled {
    role: Option<String>,
    text: String,
    reasoning: String,
    /// index → (id, name, arguments, extra_content)
    tool_calls: BTreeMap<u64, (String, String, String, Value)>,
    /// index → merged thinking block
    thinking: BTreeMap<u64, Map<String, Value>>,
    finish: Option<String>,
    usage: Option<Value>,
    error: Option<Value>,
    done: bool,
}

fn assemble(frames: &[SseEvent]) -> Assembled {
    let mut a = Assembled::default();
    for (i, f) in frames.iter().enumerate() {
        assert!(!a.done, "frame after [DONE]: {}", f.data);
        if f.is_done() {
            a.done = true;
            continue;
        }
        assert!(a.error.is_none(), "frame after error: {}", f.data);
        let v: Value = serde_json::from_str(&f.data).unwrap();
        if let Some(e) = v.get("error") {
            a.error = Some(e.clone());
            continue;
        }
        assert_eq!(v["object"], "chat.completion.chunk");
        assert!(v["created"].is_u64());
        let choices = v["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert!(a.usage.is_none(), "two usage chunks");
            a.usage = Some(v["usage"].clone());
            continue;
        }
        assert!(a.usage.is_none(), "choice chunk after the usage chunk");
        for c in choices.iter().filter(|c| c["index"] == 0) {
            let d = &c["delta"];
            if i == 0 {
                assert_eq!(d["role"], "assistant", "first chunk must carry the role");
            }
            if let Some(r) = d["role"].as_str() {
                a.role = Some(r.into());
            }
            a.text.push_str(d["content"].as_str().unwrap_or(""));
            a.reasoning
                .push_str(d["reasoning_content"].as_str().unwrap_or(""));
            for tc in d["tool_calls"].as_array().into_iter().flatten() {
                let e = a
                    .tool_calls
                    .entry(tc["index"].as_u64().unwrap())
                    .or_default();
                if let Some(id) = tc["id"].as_str() {
                    assert!(e.0.is_empty(), "tool call id sent twice");
                    e.0 = id.into();
                }
                if let Some(n) = tc["function"]["name"].as_str() {
                    e.1.push_str(n);
                }
                e.2.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
                if tc.get("extra_content").is_some() {
                    e.3 = tc["extra_content"].clone();
                }
            }
            for tb in d["thinking_blocks"].as_array().into_iter().flatten() {
                let e = a.thinking.entry(tb["index"].as_u64().unwrap()).or_default();
                for (k, val) in tb.as_object().unwrap() {
                    match (k.as_str(), val.as_str(), e.get_mut(k)) {
                        ("index", _, _) => {}
                        ("thinking", Some(s), Some(Value::String(cur))) => cur.push_str(s),
                        _ => {
                            e.insert(k.clone(), val.clone());
                        }
                    }
                }
            }
            if let Some(fr) = c["finish_reason"].as_str() {
                assert!(a.finish.is_none(), "finish_reason sent twice");
                a.finish = Some(fr.into());
            }
        }
    }
    a
}

// ---------------------------------------------------------------------------
// Naive readings of the provider formats (the expected values)
// ---------------------------------------------------------------------------

#[derive(Debug, Default, PartialEq)]
struct Expected {
    text: String,
    reasoning: String,
    /// (id, name, input)
    tools: Vec<(String, String, Value)>,
    /// signatures of thinking blocks, redacted data for redacted ones
    signatures: Vec<String>,
    stop: String,
    input_tokens: u64,
    output_tokens: u64,
    cache_read: u64,
    cache_write: u64,
}

fn anthropic_expected_body(b: &Value) -> Expected {
    let mut e = Expected::default();
    for block in b["content"].as_array().unwrap() {
        match block["type"].as_str().unwrap() {
            "text" => e.text.push_str(block["text"].as_str().unwrap()),
            "thinking" => {
                e.reasoning.push_str(block["thinking"].as_str().unwrap());
                e.signatures
                    .push(block["signature"].as_str().unwrap().into());
            }
            "redacted_thinking" => e.signatures.push(block["data"].as_str().unwrap().into()),
            "tool_use" => e.tools.push((
                block["id"].as_str().unwrap().into(),
                block["name"].as_str().unwrap().into(),
                block["input"].clone(),
            )),
            _ => {}
        }
    }
    e.stop = b["stop_reason"].as_str().unwrap().into();
    let u = &b["usage"];
    e.input_tokens = u["input_tokens"].as_u64().unwrap();
    e.output_tokens = u["output_tokens"].as_u64().unwrap();
    e.cache_read = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    e.cache_write = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
    e
}

fn anthropic_expected_sse(sse: &str) -> Expected {
    let mut e = Expected::default();
    let mut kinds: BTreeMap<u64, String> = BTreeMap::new();
    let mut partial: BTreeMap<u64, String> = BTreeMap::new();
    for ev in decode(sse.as_bytes(), sse.len()) {
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        let idx = v["index"].as_u64().unwrap_or(0);
        match v["type"].as_str().unwrap() {
            "message_start" => {
                let u = &v["message"]["usage"];
                e.input_tokens = u["input_tokens"].as_u64().unwrap();
                e.output_tokens = u["output_tokens"].as_u64().unwrap();
                e.cache_read = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
                e.cache_write = u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
            }
            "content_block_start" => {
                let cb = &v["content_block"];
                let kind = cb["type"].as_str().unwrap().to_string();
                match kind.as_str() {
                    "text" => e.text.push_str(cb["text"].as_str().unwrap()),
                    "tool_use" => e.tools.push((
                        cb["id"].as_str().unwrap().into(),
                        cb["name"].as_str().unwrap().into(),
                        Value::Null,
                    )),
                    "redacted_thinking" => e.signatures.push(cb["data"].as_str().unwrap().into()),
                    _ => {}
                }
                kinds.insert(idx, kind);
            }
            "content_block_delta" => {
                let d = &v["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => e.text.push_str(d["text"].as_str().unwrap()),
                    "thinking_delta" => e.reasoning.push_str(d["thinking"].as_str().unwrap()),
                    "signature_delta" => e.signatures.push(d["signature"].as_str().unwrap().into()),
                    "input_json_delta" if kinds[&idx] == "tool_use" => partial
                        .entry(idx)
                        .or_default()
                        .push_str(d["partial_json"].as_str().unwrap()),
                    _ => {}
                }
            }
            "message_delta" => {
                e.stop = v["delta"]["stop_reason"].as_str().unwrap().into();
                let u = &v["usage"];
                e.output_tokens = u["output_tokens"].as_u64().unwrap();
                // Server tools make the final input count larger than the
                // one announced in message_start; the last word wins.
                if let Some(n) = u["input_tokens"].as_u64() {
                    e.input_tokens = n;
                }
                if let Some(n) = u["cache_read_input_tokens"].as_u64() {
                    e.cache_read = n;
                }
                if let Some(n) = u["cache_creation_input_tokens"].as_u64() {
                    e.cache_write = n;
                }
            }
            _ => {}
        }
    }
    let inputs: Vec<Value> = kinds
        .iter()
        .filter(|(_, k)| k.as_str() == "tool_use")
        .map(|(i, _)| {
            let p = partial.get(i).map(String::as_str).unwrap_or("");
            if p.is_empty() {
                json!({})
            } else {
                serde_json::from_str(p).unwrap()
            }
        })
        .collect();
    for (t, input) in e.tools.iter_mut().zip(inputs) {
        t.2 = input;
    }
    e
}

fn anthropic_finish(stop: &str, has_tools: bool) -> &'static str {
    match stop {
        "max_tokens" => "length",
        "tool_use" if has_tools => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

fn check_anthropic_against(label: &str, e: &Expected, a: &Assembled) {
    assert_eq!(a.text, e.text, "{label}: text");
    assert_eq!(a.reasoning, e.reasoning, "{label}: reasoning");
    let calls: Vec<(String, String, Value)> = a
        .tool_calls
        .values()
        .map(|(id, name, args, _)| {
            let input = if args.is_empty() {
                json!({})
            } else {
                serde_json::from_str(args).unwrap()
            };
            (id.clone(), name.clone(), input)
        })
        .collect();
    assert_eq!(calls, e.tools, "{label}: tool calls");
    let sigs: Vec<String> = a
        .thinking
        .values()
        .map(|b| {
            b.get("signature")
                .or_else(|| b.get("data"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(sigs, e.signatures, "{label}: thinking signatures");
    assert_eq!(
        a.finish.as_deref(),
        Some(anthropic_finish(&e.stop, !e.tools.is_empty())),
        "{label}: finish_reason"
    );
}

fn check_usage_json(label: &str, u: &Value, e: &Expected) {
    assert_eq!(
        u["prompt_tokens"].as_u64(),
        Some(e.input_tokens + e.cache_read + e.cache_write),
        "{label}: prompt_tokens"
    );
    assert_eq!(
        u["completion_tokens"].as_u64(),
        Some(e.output_tokens),
        "{label}"
    );
    assert_eq!(
        u["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(e.cache_read),
        "{label}: cached"
    );
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(e.input_tokens + e.cache_read + e.cache_write + e.output_tokens)
    );
}

/// Non-streamed OpenAI message folded into the same shape as a stream.
fn assemble_message(resp: &Value) -> Assembled {
    assert_eq!(resp["object"], "chat.completion");
    assert!(resp["created"].is_u64());
    let c = &resp["choices"][0];
    let m = &c["message"];
    let mut a = Assembled {
        role: m["role"].as_str().map(str::to_string),
        text: m["content"].as_str().unwrap_or("").into(),
        reasoning: m["reasoning_content"].as_str().unwrap_or("").into(),
        finish: c["finish_reason"].as_str().map(str::to_string),
        usage: Some(resp["usage"].clone()),
        done: true,
        ..Default::default()
    };
    for (i, tc) in m["tool_calls"].as_array().into_iter().flatten().enumerate() {
        assert_eq!(tc["type"], "function");
        a.tool_calls.insert(
            i as u64,
            (
                tc["id"].as_str().unwrap().into(),
                tc["function"]["name"].as_str().unwrap().into(),
                tc["function"]["arguments"].as_str().unwrap().into(),
                tc.get("extra_content").cloned().unwrap_or(Value::Null),
            ),
        );
    }
    for (i, b) in m["thinking_blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        a.thinking.insert(i as u64, b.as_object().unwrap().clone());
    }
    a
}

// ---------------------------------------------------------------------------
// Anthropic: every recorded case
// ---------------------------------------------------------------------------

#[test]
fn anthropic_every_success_response() {
    let mut seen = 0;
    for case in all_cases("anthropic").iter().filter(|c| c.status() == 200) {
        let label = case.label();
        let model = "claude-test";
        if let Some(sse) = case.sse() {
            let e = anthropic_expected_sse(sse);
            for chunk in [1, 7, 64, sse.len()] {
                let mut t = anthropic::ChatStream::new(model, true);
                let frames = run_stream(&mut t, sse.as_bytes(), chunk);
                let a = assemble(&frames);
                assert!(a.done && a.error.is_none(), "{label}");
                assert_eq!(a.role.as_deref(), Some("assistant"));
                check_anthropic_against(&label, &e, &a);
                check_usage_json(&label, a.usage.as_ref().expect("usage chunk"), &e);
                assert!(t.completed(), "{label}");
                let u = t.usage().unwrap();
                assert_eq!(u.completion_tokens, e.output_tokens);
                assert_eq!(u.cached_tokens, e.cache_read);
            }
            // Without include_usage there is no choices:[] chunk.
            let mut t = anthropic::ChatStream::new(model, false);
            let a = assemble(&run_stream(&mut t, sse.as_bytes(), 13));
            assert!(a.usage.is_none() && a.done, "{label}");
        } else {
            let e = anthropic_expected_body(case.body());
            let (resp, usage) = anthropic::chat_response(case.body(), model).unwrap();
            assert_eq!(resp["model"], model);
            assert_eq!(resp["id"], case.body()["id"]);
            let a = assemble_message(&resp);
            check_anthropic_against(&label, &e, &a);
            check_usage_json(&label, &resp["usage"], &e);
            assert_eq!(
                usage.prompt_tokens,
                e.input_tokens + e.cache_read + e.cache_write
            );
            assert_eq!(usage.cached_tokens, e.cache_read);
            if !e.tools.is_empty() && e.text.is_empty() {
                assert!(resp["choices"][0]["message"]["content"].is_null());
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 26);
}

#[test]
fn anthropic_cache_usage_is_counted_in_prompt() {
    let write = Case::load("anthropic", "prompt-caching-write");
    let read = Case::load("anthropic", "prompt-caching-read");
    let (w, wu) = anthropic::chat_response(write.body(), "m").unwrap();
    let (_, ru) = anthropic::chat_response(read.body(), "m").unwrap();
    let wb = &write.body()["usage"];
    assert!(wb["cache_creation_input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        w["usage"]["cache_creation_input_tokens"],
        wb["cache_creation_input_tokens"]
    );
    assert_eq!(wu.cached_tokens, 0);
    let rb = &read.body()["usage"];
    assert!(ru.cached_tokens > 0);
    assert_eq!(
        ru.cached_tokens,
        rb["cache_read_input_tokens"].as_u64().unwrap()
    );
}

#[test]
fn anthropic_every_error_response() {
    let mut seen = 0;
    for case in all_cases("anthropic").iter().filter(|c| c.status() >= 400) {
        let label = case.label();
        let raw = case.raw_body();
        let upstream_msg = case.body()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        let e = anthropic::error_from_upstream(case.status(), &raw, case.header("retry-after"));
        match case.status() {
            401 => {
                assert_eq!(e.kind, ErrorKind::Upstream, "{label}");
                assert_eq!(e.status(), 502);
                assert!(
                    !e.message.contains(&upstream_msg),
                    "{label} echoes upstream text"
                );
                assert!(!e.message.contains("x-api-key"));
            }
            404 => {
                assert_eq!(e.kind, ErrorKind::ModelNotFound, "{label}");
                assert_eq!(e.code, Some("model_not_found"));
                assert_eq!(e.to_openai_json()["error"]["code"], "model_not_found");
            }
            429 => {
                assert_eq!(e.kind, ErrorKind::RateLimited, "{label}");
                assert_eq!(e.retry_after.as_deref(), Some("7"));
            }
            400 => {
                assert_eq!(e.kind, ErrorKind::InvalidRequest, "{label}");
                assert!(e.message.contains(&upstream_msg));
            }
            500 => assert_eq!(e.kind, ErrorKind::Upstream, "{label}"),
            s => panic!("{label}: unexpected status {s}"),
        }
        seen += 1;
    }
    assert_eq!(seen, 8);

    let e = anthropic::error_from_upstream(
        529,
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        Some("3".into()),
    );
    assert_eq!((e.kind, e.status()), (ErrorKind::Overloaded, 503));
    assert_eq!(e.retry_after.as_deref(), Some("3"));
    let e = anthropic::error_from_upstream(502, b"<html>bad gateway</html>", None);
    assert_eq!(e.kind, ErrorKind::Upstream);
    assert!(!e.message.contains("html"));
    let e = anthropic::error_from_upstream(403, br#"{"type":"error","error":{"type":"permission_error","message":"key sk-ant-abc disabled"}}"#, None);
    assert_eq!(e.kind, ErrorKind::Upstream);
    assert!(!e.message.contains("sk-ant"));
    let e = anthropic::error_from_upstream(413, b"", None);
    assert_eq!(e.kind, ErrorKind::PayloadTooLarge);
}

#[test]
fn anthropic_mid_stream_error_event_ends_the_stream() {
    let wire = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n\
event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n";
    let mut t = anthropic::ChatStream::new("m", true);
    let a = assemble(&run_stream(&mut t, wire.as_bytes(), 5));
    assert_eq!(a.text, "Hel");
    let err = a.error.expect("error frame");
    assert_eq!(err["type"], "overloaded_error");
    assert!(!a.done, "no [DONE] after an error");
    assert!(!t.completed());
}

#[test]
fn anthropic_every_recorded_request_maps_inbound() {
    let mut seen = 0;
    for case in all_cases("anthropic") {
        let label = case.label();
        let body = case.req_body().as_object().unwrap().clone();
        let result = anthropic::messages_to_openai(body.clone());
        if case.name == "error-400-invalid-request-shape" {
            // The recorded request is the malformed one Anthropic rejected.
            let e = result.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert_eq!(e.param.as_deref(), Some("messages.0"));
            seen += 1;
            continue;
        }
        let req = result.unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(req.model, body["model"].as_str().unwrap());
        assert_eq!(
            req.stream,
            body.get("stream") == Some(&json!(true)),
            "{label}"
        );
        assert_eq!(req.max_tokens(), body["max_tokens"].as_u64());
        if body.contains_key("system") {
            assert_eq!(req.messages()[0]["role"], "system", "{label}");
        }
        // Back out to Anthropic: ids, signatures and tools must survive.
        let again =
            anthropic::chat_request(&req, &req.model).unwrap_or_else(|e| panic!("{label}: {e}"));
        let ids = |v: &Value, key: &str| -> Vec<String> {
            v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
                .filter_map(|b| b[key].as_str().map(str::to_string))
                .collect()
        };
        for key in ["id", "tool_use_id", "signature", "data"] {
            assert_eq!(
                ids(&again, key),
                ids(case.req_body(), key),
                "{label}: {key}"
            );
        }
        assert_eq!(
            again["messages"].as_array().unwrap().len(),
            body["messages"].as_array().unwrap().len(),
            "{label}: turns"
        );
        // Structured output (`output_format`) travels as the JSON tool.
        let names = |v: &Value| -> Vec<Value> {
            v["tools"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["name"].clone())
                .filter(|n| n != anthropic::JSON_TOOL)
                .collect()
        };
        assert_eq!(names(&again), names(case.req_body()), "{label}: tools");
        assert_eq!(again.get("thinking"), body.get("thinking"), "{label}");
        if let Some(tc) = body.get("tool_choice") {
            assert_eq!(&again["tool_choice"], tc, "{label}");
        }
        seen += 1;
    }
    assert_eq!(seen, 34);
}

#[test]
fn anthropic_inbound_validation_messages() {
    let e = anthropic::messages_to_openai(Map::new()).unwrap_err();
    assert_eq!(e.message, "model: Field required");
    let m = json!({"model": "claude", "messages": []})
        .as_object()
        .unwrap()
        .clone();
    let e = anthropic::messages_to_openai(m).unwrap_err();
    assert_eq!(e.message, "max_tokens: Field required");
    let m = json!({"model": "claude", "max_tokens": 5})
        .as_object()
        .unwrap()
        .clone();
    let e = anthropic::messages_to_openai(m).unwrap_err();
    assert_eq!(e.message, "messages: Field required");
    assert_eq!(
        e.to_anthropic_json()["error"]["type"],
        "invalid_request_error"
    );
}

// ---------------------------------------------------------------------------
// OpenAI requests → both providers
// ---------------------------------------------------------------------------

#[test]
fn every_openai_chat_request_translates() {
    let mut seen = 0;
    for case in all_cases("openai") {
        if !case.name.starts_with("chat-") {
            continue;
        }
        let label = case.label();
        let req = chat_request(case.req_body());
        let g = gemini::chat_request(&req, "gemini-2.5-flash")
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(!g["contents"].as_array().unwrap().is_empty(), "{label}");
        match anthropic::chat_request(&req, "claude-sonnet-4-5") {
            Ok(a) => {
                assert!(!a["messages"].as_array().unwrap().is_empty(), "{label}");
                assert!(a["max_tokens"].as_u64().unwrap() > 0);
                assert_eq!(a["stream"].as_bool().unwrap_or(false), req.stream);
                let roles: Vec<&str> = a["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["role"].as_str().unwrap())
                    .collect();
                assert!(
                    roles.windows(2).all(|w| w[0] != w[1]),
                    "{label}: roles must alternate"
                );
            }
            Err(e) => {
                // Documented opt-out: the Messages API has one choice.
                assert_eq!(case.name, "chat-n2-multiple-choices", "{label}: {e}");
                assert_eq!(e.param.as_deref(), Some("n"));
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 24);
}

#[test]
fn openai_request_details_map_to_anthropic() {
    let req = chat_request(&json!({
        "model": "gpt", "user": "u-1", "stop": "END", "temperature": 0.2, "top_p": 0.9,
        "max_completion_tokens": 99, "parallel_tool_calls": false, "tool_choice": "required",
        "stream": true,
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": [{"type": "text", "text": "and kind"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}
            ]},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                {"id": "t2", "type": "function", "function": {"name": "f", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "t1", "content": "r1"},
            {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "r2"}]},
            {"role": "user", "content": "thanks"}
        ]
    }));
    let a = anthropic::chat_request(&req, "claude-haiku-4-5").unwrap();
    assert_eq!(a["system"], "be brief\n\nand kind");
    assert_eq!(a["stop_sequences"], json!(["END"]));
    assert_eq!(a["max_tokens"], 99);
    assert_eq!(a["metadata"]["user_id"], "u-1");
    assert_eq!(a["stream"], true);
    assert_eq!(
        a["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        a["tools"][0],
        json!({"name": "f", "description": "d", "input_schema": {"type": "object"}})
    );
    let msgs = a["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(
        msgs[0]["content"].as_array().unwrap().len(),
        4,
        "consecutive users merge"
    );
    assert_eq!(
        msgs[0]["content"][1]["source"],
        json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
    );
    assert_eq!(
        msgs[0]["content"][2]["source"],
        json!({"type": "url", "url": "https://x.test/a.jpg"})
    );
    assert_eq!(
        msgs[1]["content"][0],
        json!({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}})
    );
    assert_eq!(msgs[1]["content"][1]["input"], json!({}));
    let user = msgs[2]["content"].as_array().unwrap();
    assert_eq!(
        user[0],
        json!({"type": "tool_result", "tool_use_id": "t1", "content": "r1"})
    );
    assert_eq!(user[1]["content"], json!([{"type": "text", "text": "r2"}]));
    assert_eq!(user[2]["text"], "thanks");

    let mut tc = req.body().clone();
    for (choice, expect) in [
        (json!("auto"), json!({"type": "auto"})),
        (json!("none"), json!({"type": "none"})),
        (
            json!({"type": "function", "function": {"name": "f"}}),
            json!({"type": "tool", "name": "f"}),
        ),
    ] {
        tc.insert("tool_choice".into(), choice);
        tc.remove("parallel_tool_calls");
        let a =
            anthropic::chat_request(&ChatRequest::from_map(tc.clone()).unwrap(), "claude").unwrap();
        assert_eq!(a["tool_choice"], expect);
    }

    let bad = chat_request(&json!({"model": "m", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{oops"}}]}
    ]}));
    let e = anthropic::chat_request(&bad, "claude").unwrap_err();
    assert_eq!(
        e.param.as_deref(),
        Some("messages[0].tool_calls[0].function.arguments")
    );
    assert!(gemini::chat_request(&bad, "g").is_err());
}

#[test]
fn anthropic_json_mode_and_thinking_config() {
    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]});
    let req = chat_request(
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}),
    );
    let a = anthropic::chat_request(&req, "claude-sonnet-4-5").unwrap();
    assert_eq!(
        a["tool_choice"],
        json!({"type": "tool", "name": anthropic::JSON_TOOL})
    );
    assert_eq!(a["tools"][0]["input_schema"], schema);
    // The forced tool comes back as content, in one piece and streamed.
    let upstream = json!({"id": "msg_1", "content": [{"type": "tool_use", "id": "toolu_1",
        "name": anthropic::JSON_TOOL, "input": {"answer": 42}}], "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 4}});
    let (resp, _) = anthropic::chat_response(&upstream, "m").unwrap();
    assert_eq!(resp["choices"][0]["message"]["content"], "{\"answer\":42}");
    assert_eq!(resp["choices"][0]["finish_reason"], "stop");
    assert!(resp["choices"][0]["message"].get("tool_calls").is_none());
    let wire = format!(
        "event: message_start\ndata: {}\n\nevent: content_block_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\nevent: message_delta\ndata: {}\n\n",
        json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": anthropic::JSON_TOOL, "input": {}}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"answer\": 42}"}}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
    );
    let a = assemble(&run_stream(
        &mut anthropic::ChatStream::new("m", false),
        wire.as_bytes(),
        9,
    ));
    assert_eq!(a.text, "{\"answer\": 42}");
    assert_eq!(a.finish.as_deref(), Some("stop"));
    assert!(a.tool_calls.is_empty());

    let req = chat_request(
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"}, "reasoning_effort": "medium", "temperature": 0.3}),
    );
    let a = anthropic::chat_request(&req, "claude-sonnet-4-5").unwrap();
    assert!(a["system"].as_str().unwrap().contains("JSON"));
    assert_eq!(
        a["thinking"],
        json!({"type": "enabled", "budget_tokens": 8192})
    );
    assert!(a["max_tokens"].as_u64().unwrap() > 8192);
    assert!(
        a.get("temperature").is_none(),
        "sampling params are dropped while thinking"
    );

    assert_eq!(
        anthropic::default_max_tokens("claude-3-haiku-20240307"),
        4096
    );
    assert_eq!(
        anthropic::default_max_tokens("claude-3-5-sonnet-latest"),
        8192
    );
    assert!(anthropic::default_max_tokens("claude-opus-4-1") >= 8192);
    assert!(anthropic::default_max_tokens("claude-haiku-4-5") >= 8192);
    assert_eq!(anthropic::DEFAULT_VERSION, "2023-06-01");
}

// ---------------------------------------------------------------------------
// Thinking round trip
// ---------------------------------------------------------------------------

#[test]
fn anthropic_thinking_round_trip_keeps_signature_first() {
    let step1 = Case::load("anthropic", "thinking-nonstream");
    let step2 = Case::load("anthropic", "thinking-nonstream-2-history");
    let (resp, _) = anthropic::chat_response(step1.body(), "claude-sonnet-4-0").unwrap();
    let assistant = resp["choices"][0]["message"].clone();
    assert!(!assistant["reasoning_content"].as_str().unwrap().is_empty());

    let recorded = step2.req_body();
    let first_user = recorded["messages"][0]["content"].clone();
    let next_user = recorded["messages"][2]["content"][0]["text"].clone();
    let req = chat_request(&json!({
        "model": "claude-sonnet-4-0",
        "max_tokens": 16000,
        "thinking": recorded["thinking"],
        "messages": [
            {"role": "user", "content": first_user},
            assistant,
            {"role": "user", "content": next_user},
        ],
    }));
    let out = anthropic::chat_request(&req, "claude-sonnet-4-0").unwrap();
    let turn = &out["messages"][1];
    assert_eq!(turn["role"], "assistant");
    let want = &recorded["messages"][1]["content"][0];
    assert_eq!(want["type"], "thinking");
    assert_eq!(turn["content"][0]["type"], "thinking");
    assert_eq!(turn["content"][0]["thinking"], want["thinking"]);
    assert_eq!(turn["content"][0]["signature"], want["signature"]);
    assert_eq!(
        turn["content"][1]["text"],
        recorded["messages"][1]["content"][1]["text"]
    );
    assert_eq!(out["thinking"], recorded["thinking"]);
    assert_eq!(out["max_tokens"], 16000);
}

#[test]
fn anthropic_streamed_thinking_can_be_sent_back() {
    for name in ["thinking-stream", "thinking-redacted-stream"] {
        let case = Case::load("anthropic", name);
        let sse = case.sse().unwrap();
        let a = assemble(&run_stream(
            &mut anthropic::ChatStream::new("m", false),
            sse.as_bytes(),
            33,
        ));
        let blocks: Vec<Value> = a
            .thinking
            .values()
            .map(|b| Value::Object(b.clone()))
            .collect();
        assert!(!blocks.is_empty(), "{name}");
        let req = chat_request(&json!({"model": "m", "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": a.text, "reasoning_content": a.reasoning, "thinking_blocks": blocks},
            {"role": "user", "content": "next"},
        ]}));
        let out = anthropic::chat_request(&req, "claude-sonnet-4-5").unwrap();
        let content = out["messages"][1]["content"].as_array().unwrap();
        let expected = anthropic_expected_sse(sse);
        for (i, sig) in expected.signatures.iter().enumerate() {
            let b = &content[i];
            let got = b["signature"]
                .as_str()
                .or_else(|| b["data"].as_str())
                .unwrap();
            assert_eq!(got, sig, "{name}: block {i}");
        }
        if !expected.reasoning.is_empty() {
            let joined: String = content
                .iter()
                .filter_map(|b| b["thinking"].as_str())
                .collect();
            assert_eq!(joined, expected.reasoning, "{name}");
        }
    }
}

// ---------------------------------------------------------------------------
// Inbound Anthropic endpoint fed by OpenAI-shaped upstreams
// ---------------------------------------------------------------------------

/// Checks the Anthropic event grammar and returns (text, tool calls as
/// (id, name, args), stop_reason, output_tokens).
fn check_anthropic_events(
    label: &str,
    evs: &[SseEvent],
) -> (String, Vec<(String, String, String)>, String, u64) {
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{label}");
    assert_eq!(names.last(), Some(&"message_stop"), "{label}");
    assert_eq!(names[names.len() - 2], "message_delta", "{label}");
    let mut open: Option<u64> = None;
    let mut next = 0;
    let mut text = String::new();
    let mut tools: Vec<(String, String, String)> = Vec::new();
    let mut stop = String::new();
    let mut out_tokens = 0;
    for ev in evs {
        let v: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(
            v["type"].as_str(),
            ev.event.as_deref(),
            "{label}: event name = data.type"
        );
        match ev.event.as_deref().unwrap() {
            "message_start" => assert_eq!(v["message"]["role"], "assistant"),
            "content_block_start" => {
                assert!(open.is_none(), "{label}: nested block");
                assert_eq!(v["index"], next, "{label}: block index order");
                open = Some(next);
                next += 1;
                let cb = &v["content_block"];
                if cb["type"] == "tool_use" {
                    tools.push((
                        cb["id"].as_str().unwrap().into(),
                        cb["name"].as_str().unwrap().into(),
                        String::new(),
                    ));
                }
            }
            "content_block_delta" => {
                assert_eq!(
                    v["index"].as_u64(),
                    open,
                    "{label}: delta outside its block"
                );
                let d = &v["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => text.push_str(d["text"].as_str().unwrap()),
                    "input_json_delta" => tools
                        .last_mut()
                        .unwrap()
                        .2
                        .push_str(d["partial_json"].as_str().unwrap()),
                    "thinking_delta" | "signature_delta" => {}
                    other => panic!("{label}: delta type {other}"),
                }
            }
            "content_block_stop" => {
                assert_eq!(v["index"].as_u64(), open, "{label}");
                open = None;
            }
            "message_delta" => {
                assert!(open.is_none(), "{label}: message_delta inside a block");
                stop = v["delta"]["stop_reason"].as_str().unwrap().into();
                out_tokens = v["usage"]["output_tokens"].as_u64().unwrap();
            }
            "message_stop" => {}
            other => panic!("{label}: unexpected event {other}"),
        }
    }
    (text, tools, stop, out_tokens)
}

#[test]
fn openai_streams_become_valid_anthropic_streams() {
    for name in [
        "chat-stream-include-usage",
        "chat-stream-include-usage-gpt4o-mini",
        "chat-stream-no-usage",
        "chat-max-tokens-length-stream",
        "chat-stream-reasoning-tokens",
        "chat-tools-stream-single",
        "chat-tools-parallel-stream-2-result",
    ] {
        let case = Case::load("openai", name);
        let sse = case.sse().unwrap();
        let original = assemble(&decode(sse.as_bytes(), sse.len()));
        for chunk in [3, sse.len()] {
            let mut t = anthropic::MessagesStreamFromOpenAi::new("gpt-4o");
            let evs = run_stream(&mut t, sse.as_bytes(), chunk);
            let (text, tools, stop, out_tokens) = check_anthropic_events(name, &evs);
            assert_eq!(text, original.text, "{name}");
            let want: Vec<(String, String, String)> = original
                .tool_calls
                .values()
                .map(|(i, n, a, _)| (i.clone(), n.clone(), a.clone()))
                .collect();
            assert_eq!(tools, want, "{name}");
            let want_stop = match original.finish.as_deref() {
                Some("length") => "max_tokens",
                Some("tool_calls") => "tool_use",
                _ => "end_turn",
            };
            assert_eq!(stop, want_stop, "{name}");
            let want_tokens = original
                .usage
                .as_ref()
                .and_then(|u| u["completion_tokens"].as_u64())
                .unwrap_or(0);
            assert_eq!(out_tokens, want_tokens, "{name}");
            assert!(t.completed());

            // And back again through the outbound Anthropic translator.
            let wire: Vec<u8> = evs.iter().flat_map(|e| e.raw.to_vec()).collect();
            let back = assemble(&run_stream(
                &mut anthropic::ChatStream::new("m", true),
                &wire,
                11,
            ));
            assert_eq!(back.text, original.text, "{name}: double translation");
            assert_eq!(back.finish, original.finish, "{name}");
        }
    }
}

#[test]
fn anthropic_streams_survive_the_hub_and_back() {
    // Anthropic SSE → OpenAI chunks → Anthropic SSE: what an Anthropic client
    // of the gateway sees when the route ends at Anthropic via the hub.
    for case in all_cases("anthropic")
        .iter()
        .filter(|c| c.status() == 200 && c.sse().is_some())
    {
        let label = case.label();
        let sse = case.sse().unwrap();
        let expected = anthropic_expected_sse(sse);
        let mut hub = anthropic::ChatStream::new("m", true);
        let chunks = run_stream(&mut hub, sse.as_bytes(), 17);
        let wire: Vec<u8> = chunks.iter().flat_map(|e| e.raw.to_vec()).collect();
        let evs = run_stream(
            &mut anthropic::MessagesStreamFromOpenAi::new("m"),
            &wire,
            29,
        );
        let (text, tools, stop, out_tokens) = check_anthropic_events(&label, &evs);
        assert_eq!(text, expected.text, "{label}");
        assert_eq!(tools.len(), expected.tools.len(), "{label}");
        assert_eq!(out_tokens, expected.output_tokens, "{label}");
        let want_stop = match expected.stop.as_str() {
            "tool_use" if expected.tools.is_empty() => "end_turn",
            "stop_sequence" | "pause_turn" => "end_turn",
            s => s,
        };
        assert_eq!(stop, want_stop, "{label}");
        let sigs: Vec<String> = evs
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter_map(|v| v["delta"]["signature"].as_str().map(str::to_string))
            .collect();
        let plain: Vec<String> = {
            // Redacted blocks have no streamed counterpart in OpenAI deltas
            // Anthropic clients could replay, so only signatures are compared.
            let mut s = Vec::new();
            for ev in decode(sse.as_bytes(), sse.len()) {
                let v: Value = serde_json::from_str(&ev.data).unwrap();
                if let Some(sig) = v["delta"]["signature"].as_str() {
                    s.push(sig.to_string());
                }
            }
            s
        };
        assert_eq!(sigs, plain, "{label}");
    }
}

#[test]
fn openai_error_frame_becomes_anthropic_error_event() {
    let wire = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n\
data: {\"error\":{\"message\":\"Rate limit reached\",\"type\":\"rate_limit_error\",\"param\":null,\"code\":null}}\n\n";
    let mut t = anthropic::MessagesStreamFromOpenAi::new("m");
    let evs = run_stream_with(&mut t, wire.as_bytes(), 4, |e| {
        switchyard_llm::sse::encode_event(Some("error"), &e.to_anthropic_json().to_string())
    });
    let last = evs.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    let v: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(!evs
        .iter()
        .any(|e| e.event.as_deref() == Some("message_stop")));
}

#[test]
fn openai_responses_become_anthropic_messages() {
    for name in [
        "chat-basic",
        "chat-tools-parallel-1-call",
        "chat-max-tokens-length",
        "chat-usage-cached-tokens",
        "chat-refusal-structured",
    ] {
        let case = Case::load("openai", name);
        let body = case.body();
        let m = anthropic::openai_response_to_messages(body, "claude-alias");
        assert_eq!(m["type"], "message");
        assert_eq!(m["model"], "claude-alias");
        assert!(m["id"].as_str().unwrap().starts_with("msg_"));
        let msg = &body["choices"][0]["message"];
        let content = m["content"].as_array().unwrap();
        let text: String = content.iter().filter_map(|b| b["text"].as_str()).collect();
        let want = msg["content"]
            .as_str()
            .or_else(|| msg["refusal"].as_str())
            .unwrap_or("");
        assert_eq!(text, want, "{name}");
        let calls = msg["tool_calls"].as_array().cloned().unwrap_or_default();
        let uses: Vec<&Value> = content.iter().filter(|b| b["type"] == "tool_use").collect();
        assert_eq!(uses.len(), calls.len());
        for (u, c) in uses.iter().zip(&calls) {
            assert_eq!(u["id"], c["id"]);
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(u["input"], args);
        }
        let stop = match body["choices"][0]["finish_reason"].as_str().unwrap() {
            "length" => "max_tokens",
            "tool_calls" => "tool_use",
            _ => "end_turn",
        };
        assert_eq!(m["stop_reason"], stop, "{name}");
        let u = Usage::from_openai(&body["usage"]).unwrap();
        assert_eq!(m["usage"]["output_tokens"], u.completion_tokens);
        assert_eq!(
            m["usage"]["input_tokens"].as_u64().unwrap()
                + m["usage"]["cache_read_input_tokens"].as_u64().unwrap(),
            u.prompt_tokens
        );
    }
}

// ---------------------------------------------------------------------------
// Gemini: every recorded case
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct GeminiExpected {
    text: String,
    thought: String,
    calls: Vec<(String, Value, Option<String>)>,
    finish: Option<String>,
    usage: Value,
}

fn gemini_expected(events: &[Value]) -> GeminiExpected {
    let mut e = GeminiExpected::default();
    for v in events {
        let c = &v["candidates"][0];
        for p in c["content"]["parts"].as_array().into_iter().flatten() {
            if let Some(fc) = p.get("functionCall") {
                e.calls.push((
                    fc["name"].as_str().unwrap().into(),
                    fc["args"].clone(),
                    p["thoughtSignature"].as_str().map(str::to_string),
                ));
            } else if let Some(t) = p["text"].as_str() {
                if p["thought"] == true {
                    e.thought.push_str(t);
                } else {
                    e.text.push_str(t);
                }
            }
        }
        if let Some(f) = c["finishReason"].as_str() {
            e.finish = Some(f.into());
        }
        if v.get("usageMetadata").is_some() {
            e.usage = v["usageMetadata"].clone();
        }
    }
    e
}

fn check_gemini_against(label: &str, e: &GeminiExpected, a: &Assembled) {
    assert_eq!(a.text, e.text, "{label}: text");
    assert_eq!(a.reasoning, e.thought, "{label}: thoughts");
    let calls: Vec<(String, Value, Option<String>)> = a
        .tool_calls
        .values()
        .map(|(_, name, args, extra)| {
            (
                name.clone(),
                serde_json::from_str(args).unwrap(),
                extra["google"]["thought_signature"]
                    .as_str()
                    .map(str::to_string),
            )
        })
        .collect();
    assert_eq!(calls, e.calls, "{label}: calls");
    let ids: Vec<&str> = a.tool_calls.values().map(|t| t.0.as_str()).collect();
    let want_ids: Vec<String> = (0..ids.len()).map(|n| format!("call_{n}")).collect();
    assert_eq!(ids, want_ids, "{label}: ids");
    let finish = match e.finish.as_deref() {
        Some("MAX_TOKENS") => "length",
        Some("SAFETY") | Some("RECITATION") => "content_filter",
        _ if !e.calls.is_empty() => "tool_calls",
        _ => "stop",
    };
    assert_eq!(a.finish.as_deref(), Some(finish), "{label}: finish");
    let u = a.usage.as_ref().expect("usage");
    let m = &e.usage;
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    assert_eq!(
        u["prompt_tokens"].as_u64(),
        Some(n("promptTokenCount")),
        "{label}"
    );
    assert_eq!(
        u["completion_tokens"].as_u64(),
        Some(n("candidatesTokenCount") + n("thoughtsTokenCount")),
        "{label}"
    );
    assert_eq!(
        u["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(n("cachedContentTokenCount"))
    );
    assert_eq!(
        u["completion_tokens_details"]["reasoning_tokens"].as_u64(),
        Some(n("thoughtsTokenCount"))
    );
}

#[test]
fn gemini_every_success_response() {
    let mut seen = 0;
    for case in all_cases("gemini").iter().filter(|c| c.status() == 200) {
        let label = case.label();
        let model = "gemini-test";
        match case.name.as_str() {
            "embeddings-batch-768" | "embeddings-batch-multi" => {
                let req = EmbeddingsRequest::parse(
                    &serde_json::to_vec(&json!({
                        "model": "e",
                        "input": case.req_body()["requests"].as_array().unwrap().iter()
                            .map(|r| r["content"]["parts"][0]["text"].clone()).collect::<Vec<_>>(),
                        "dimensions": 768,
                    }))
                    .unwrap(),
                )
                .unwrap();
                let upstream = case.req_body()["requests"][0]["model"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("models/");
                assert_eq!(
                    &gemini::embed_request(&req, upstream),
                    case.req_body(),
                    "{label}"
                );
                let out = gemini::embed_response(case.body(), "emb", 7).unwrap();
                let data = out["data"].as_array().unwrap();
                let recorded = case.body()["embeddings"].as_array().unwrap();
                assert_eq!(data.len(), recorded.len());
                for (i, (d, r)) in data.iter().zip(recorded).enumerate() {
                    assert_eq!(d["index"], i);
                    assert_eq!(d["embedding"], r["values"]);
                }
                assert_eq!(out["usage"]["prompt_tokens"], 7);
                assert_eq!(out["model"], "emb");
            }
            "count-tokens" | "models-list" => {
                // Not chat responses: the translator must refuse them cleanly.
                let e = gemini::chat_response(case.body(), model).unwrap_err();
                assert_eq!(e.kind, ErrorKind::Upstream, "{label}");
                assert!(gemini::embed_response(case.body(), model, 0).is_err());
            }
            "stream-json-array-no-sse" => {
                // Without alt=sse Gemini sends a JSON array of the same
                // objects; framed as events they must translate identically.
                let items = case.body().as_array().unwrap();
                let wire: String = items.iter().map(|v| format!("data: {v}\r\n\r\n")).collect();
                let e = gemini_expected(items);
                let mut t = gemini::ChatStream::new(model, true);
                let a = assemble(&run_stream(&mut t, wire.as_bytes(), 10));
                check_gemini_against(&label, &e, &a);
                let raw: Value =
                    serde_json::from_str(case.response["body_text"].as_str().unwrap()).unwrap();
                assert_eq!(&raw, case.body());
            }
            _ if case.sse().is_some() => {
                let sse = case.sse().unwrap();
                let events: Vec<Value> = decode(sse.as_bytes(), sse.len())
                    .iter()
                    .map(|e| serde_json::from_str(&e.data).unwrap())
                    .collect();
                assert!(!events.is_empty());
                let e = gemini_expected(&events);
                for chunk in [1, 9, sse.len()] {
                    let mut t = gemini::ChatStream::new(model, true);
                    let a = assemble(&run_stream(&mut t, sse.as_bytes(), chunk));
                    assert!(a.done, "{label}");
                    check_gemini_against(&label, &e, &a);
                    assert!(t.completed());
                    let u = t.usage().unwrap();
                    assert_eq!(
                        u.prompt_tokens,
                        e.usage["promptTokenCount"].as_u64().unwrap()
                    );
                }
            }
            _ => {
                let e = gemini_expected(std::slice::from_ref(case.body()));
                let (resp, usage) = gemini::chat_response(case.body(), model).unwrap();
                assert_eq!(resp["model"], model);
                let a = assemble_message(&resp);
                check_gemini_against(&label, &e, &a);
                assert_eq!(
                    usage.cached_tokens,
                    e.usage["cachedContentTokenCount"].as_u64().unwrap_or(0)
                );
            }
        }
        seen += 1;
    }
    assert_eq!(seen, 22);
}

#[test]
fn gemini_every_error_response() {
    let mut seen = 0;
    for case in all_cases("gemini").iter().filter(|c| c.status() >= 400) {
        let label = case.label();
        let raw = case.raw_body();
        let doc: Value = serde_json::from_slice(&raw).unwrap();
        let upstream_msg = doc["error"]["message"].as_str().unwrap().to_string();
        let e = gemini::error_from_upstream(case.status(), &raw, case.header("retry-after"));
        if case.name.contains("api-key-invalid") {
            assert_eq!(e.kind, ErrorKind::Upstream, "{label}");
            assert!(
                !e.message.contains(&upstream_msg),
                "{label} echoes upstream text"
            );
        } else if case.status() == 404 {
            assert_eq!(e.kind, ErrorKind::ModelNotFound, "{label}");
            assert_eq!(e.code, Some("model_not_found"));
            assert!(e.message.contains("not found"));
        } else {
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{label}");
            assert!(e.message.contains("temperature"));
        }
        seen += 1;
    }
    assert_eq!(seen, 6);

    let kind = |status: u16, body: &str| gemini::error_from_upstream(status, body.as_bytes(), None);
    let e = kind(
        429,
        r#"[{"error":{"code":429,"message":"Resource exhausted.","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"6.2s"}]}}]"#,
    );
    assert_eq!(e.kind, ErrorKind::RateLimited);
    assert_eq!(e.retry_after.as_deref(), Some("7"));
    assert_eq!(
        kind(
            503,
            r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#
        )
        .kind,
        ErrorKind::Overloaded
    );
    assert_eq!(
        kind(
            504,
            r#"{"error":{"code":504,"message":"slow","status":"DEADLINE_EXCEEDED"}}"#
        )
        .kind,
        ErrorKind::Timeout
    );
    assert_eq!(
        kind(
            500,
            r#"{"error":{"code":500,"message":"x","status":"INTERNAL"}}"#
        )
        .kind,
        ErrorKind::Upstream
    );
    let e = kind(
        403,
        r#"{"error":{"code":403,"message":"key AIza123 blocked","status":"PERMISSION_DENIED"}}"#,
    );
    assert_eq!(e.kind, ErrorKind::Upstream);
    assert!(!e.message.contains("AIza"));
    assert_eq!(kind(502, "<html>").kind, ErrorKind::Upstream);
    assert_eq!(kind(400, "").kind, ErrorKind::InvalidRequest);
}

#[test]
fn gemini_stream_error_event() {
    let wire = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}],\"role\":\"model\"},\"index\":0}]}\r\n\r\n\
data: {\"error\":{\"code\":429,\"message\":\"Resource exhausted\",\"status\":\"RESOURCE_EXHAUSTED\"}}\r\n\r\n";
    let mut t = gemini::ChatStream::new("m", true);
    let a = assemble(&run_stream(&mut t, wire.as_bytes(), 6));
    assert_eq!(a.text, "Hi");
    assert_eq!(a.error.unwrap()["type"], "rate_limit_error");
    assert!(!a.done && !t.completed());
}

#[test]
fn gemini_requests_match_recorded_shapes() {
    // The same conversation recorded against OpenAI and Gemini: translating
    // the OpenAI request must give the structure Gemini was actually sent.
    for (openai_case, gemini_case) in [
        (
            "chat-tools-parallel-2-result",
            "tools-parallel-2-function-response",
        ),
        (
            "chat-tools-parallel-1-call",
            "tools-parallel-1-function-call",
        ),
        ("chat-basic", "generate-basic"),
        ("chat-vision-base64", "vision-inline-image"),
        ("chat-pdf-file-part", "document-pdf-inline"),
    ] {
        let o = Case::load("openai", openai_case);
        let g = Case::load("gemini", gemini_case);
        let ours = gemini::chat_request(&chat_request(o.req_body()), "gemini-2.5-flash").unwrap();
        let theirs = g.req_body();
        let shape = |v: &Value| -> Vec<(String, Vec<String>)> {
            v["contents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let keys = c["parts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| {
                            let mut k: Vec<&String> = p
                                .as_object()
                                .unwrap()
                                .keys()
                                .filter(|k| *k != "thoughtSignature")
                                .collect();
                            k.sort();
                            k.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("+")
                        })
                        .collect();
                    (c["role"].as_str().unwrap().to_string(), keys)
                })
                .collect()
        };
        assert_eq!(
            shape(&ours),
            shape(theirs),
            "{openai_case} vs {gemini_case}"
        );
        assert_eq!(
            ours.get("systemInstruction")
                .map(|s| s["parts"][0]["text"].clone()),
            theirs
                .get("systemInstruction")
                .map(|s| s["parts"][0]["text"].clone()),
            "{gemini_case}"
        );
        let fr = |v: &Value| -> Vec<Value> {
            v["contents"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["parts"].as_array().unwrap().clone())
                .filter_map(|p| p.get("functionResponse").cloned())
                .collect()
        };
        assert_eq!(fr(&ours), fr(theirs), "{gemini_case}: function responses");
        // The google-genai SDK sends URL-safe base64; the bytes are equal.
        let inline = |v: &Value| -> Vec<(String, String)> {
            v["contents"][0]["parts"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p.get("inlineData"))
                .map(|d| {
                    let data = d["data"]
                        .as_str()
                        .unwrap()
                        .replace('_', "/")
                        .replace('-', "+");
                    (d["mimeType"].as_str().unwrap().to_string(), data)
                })
                .collect()
        };
        assert_eq!(inline(&ours), inline(theirs), "{gemini_case}: inline data");
    }
}

#[test]
fn gemini_thought_signature_round_trip() {
    let step1 = Case::load("gemini", "tools-parallel-1-function-call");
    let step2 = Case::load("gemini", "tools-parallel-2-function-response");
    let (resp, _) = gemini::chat_response(step1.body(), "g").unwrap();
    let assistant = resp["choices"][0]["message"].clone();
    let calls = assistant["tool_calls"].as_array().unwrap().clone();
    let req = chat_request(&json!({"model": "g", "messages": [
        {"role": "system", "content": "Use parallel tool calling."},
        {"role": "user", "content": "Please retrieve the secrets associated with each of these passwords: mellon,radiance"},
        assistant,
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Welcome to Moria!"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "Life before Death"},
    ]}));
    let ours = gemini::chat_request(&req, "gemini-2.5-flash").unwrap();
    let theirs = step2.req_body();
    // The SDK echoed the signature in URL-safe base64; the bytes are equal.
    let norm = |s: &str| s.replace('_', "/").replace('-', "+");
    let sig = |v: &Value, i: usize| {
        v["contents"][1]["parts"][i]["thoughtSignature"]
            .as_str()
            .map(norm)
    };
    assert!(sig(&ours, 0).is_some());
    assert_eq!(sig(&ours, 0), sig(theirs, 0));
    assert_eq!(sig(&ours, 1), sig(theirs, 1));
    assert_eq!(ours["contents"], {
        let mut c = theirs["contents"].clone();
        c[1]["parts"][0]["thoughtSignature"] =
            ours["contents"][1]["parts"][0]["thoughtSignature"].clone();
        c
    });

    // Streamed Gemini 3 call with signature → next request restores it.
    let s2 = Case::load("gemini", "tools-stream-thought-signature-2");
    let recorded_call = &s2.req_body()["contents"][1]["parts"][0];
    let fake = json!({"candidates": [{"content": {"role": "model", "parts": [recorded_call]}, "finishReason": "STOP"}]});
    let wire = format!("data: {fake}\r\n\r\n");
    let a = assemble(&run_stream(
        &mut gemini::ChatStream::new("g", false),
        wire.as_bytes(),
        64,
    ));
    let (id, name, args, extra) = a.tool_calls[&0].clone();
    assert_eq!(id, recorded_call["functionCall"]["id"]);
    let req = chat_request(&json!({"model": "g", "messages": [
        {"role": "user", "content": "What is the capital of the user country? Call the tool"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": id, "type": "function", "function": {"name": name, "arguments": args}, "extra_content": extra}]},
        {"role": "tool", "tool_call_id": id, "content": "{\"return_value\": \"Mexico\"}"},
    ]}));
    let out = gemini::chat_request(&req, "gemini-3-pro-preview").unwrap();
    assert_eq!(
        out["contents"][1]["parts"][0]["thoughtSignature"],
        recorded_call["thoughtSignature"]
    );
    assert_eq!(
        out["contents"][2]["parts"][0]["functionResponse"]["response"],
        s2.req_body()["contents"][2]["parts"][0]["functionResponse"]["response"]
    );
}

#[test]
fn gemini_generation_config_and_tools() {
    let req = chat_request(&json!({
        "model": "g", "temperature": 0.5, "top_p": 0.8, "max_tokens": 50, "stop": ["x", "y"], "n": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "additionalProperties": false}}}],
        "reasoning_effort": "low",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/cat.png?s=1"}}]}]
    }));
    let g = gemini::chat_request(&req, "gemini-2.5-pro").unwrap();
    let c = &g["generationConfig"];
    assert_eq!(c["temperature"], 0.5);
    assert_eq!(c["topP"], 0.8);
    assert_eq!(c["maxOutputTokens"], 50);
    assert_eq!(c["stopSequences"], json!(["x", "y"]));
    assert_eq!(c["candidateCount"], 2);
    assert_eq!(c["responseMimeType"], "application/json");
    assert_eq!(c["responseJsonSchema"], json!({"type": "object"}));
    assert_eq!(c["thinkingConfig"]["thinkingBudget"], 2048);
    assert_eq!(
        g["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}})
    );
    assert_eq!(
        g["tools"][0]["functionDeclarations"][0]["parametersJsonSchema"]["additionalProperties"],
        false
    );
    assert_eq!(
        g["contents"][0]["parts"][0],
        json!({"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/cat.png?s=1"}})
    );
    let unknown = chat_request(&json!({"model": "g", "messages": [
        {"role": "tool", "tool_call_id": "nope", "content": "x"}]}));
    assert_eq!(
        gemini::chat_request(&unknown, "g")
            .unwrap_err()
            .param
            .as_deref(),
        Some("messages[0].tool_call_id")
    );
    let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}});
    let (r, u) = gemini::chat_response(&blocked, "g").unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(u.prompt_tokens, 4);
    let single = gemini::embed_response(&json!({"embedding": {"values": [0.5]}}), "e", 1).unwrap();
    assert_eq!(single["data"][0]["embedding"], json!([0.5]));
}

// ---------------------------------------------------------------------------
// Conformance matrix: capability × provider
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Text,
    Stream,
    Tools,
    ParallelTools,
    Images,
    JsonMode,
    Usage,
    Errors,
    Thinking,
    MultipleChoices,
}

const CAPS: [Cap; 10] = [
    Cap::Text,
    Cap::Stream,
    Cap::Tools,
    Cap::ParallelTools,
    Cap::Images,
    Cap::JsonMode,
    Cap::Usage,
    Cap::Errors,
    Cap::Thinking,
    Cap::MultipleChoices,
];

type ReqFn = fn(&ChatRequest, &str) -> Result<Value, GatewayError>;
type RespFn = fn(&Value, &str) -> Result<(Value, Usage), GatewayError>;
type ErrFn = fn(u16, &[u8], Option<String>) -> GatewayError;

struct Adapter {
    name: &'static str,
    request: ReqFn,
    response: RespFn,
    stream: fn() -> Box<dyn StreamTranslator>,
    error: ErrFn,
    /// Recorded cases for each capability; streams are the `*stream*` ones.
    cases: &'static [(Cap, &'static str)],
}

fn adapters() -> Vec<Adapter> {
    vec![
        Adapter {
            name: "anthropic",
            request: anthropic::chat_request,
            response: anthropic::chat_response,
            stream: || Box::new(anthropic::ChatStream::new("m", true)),
            error: anthropic::error_from_upstream,
            cases: &[
                (Cap::Text, "messages-basic"),
                (Cap::Stream, "messages-stream"),
                (Cap::Tools, "tools-stream-haiku-1-tool-use"),
                (Cap::ParallelTools, "tools-parallel-1-tool-use"),
                (Cap::Images, "vision-base64"),
                (Cap::Usage, "prompt-caching-read"),
                (Cap::Errors, "error-404-model-not-found"),
                (Cap::Thinking, "thinking-stream"),
            ],
        },
        Adapter {
            name: "gemini",
            request: gemini::chat_request,
            response: gemini::chat_response,
            stream: || Box::new(gemini::ChatStream::new("m", true)),
            error: gemini::error_from_upstream,
            cases: &[
                (Cap::Text, "generate-basic"),
                (Cap::Stream, "stream-sse-basic"),
                (Cap::Tools, "tools-stream-gemini2-flash"),
                (Cap::ParallelTools, "tools-parallel-1-function-call"),
                (Cap::Images, "vision-inline-image"),
                (Cap::JsonMode, "generate-structured-output"),
                (Cap::Usage, "generate-usage-cached-content-tokens"),
                (Cap::Errors, "error-404-model-not-found"),
                (Cap::Thinking, "thinking-nonstream"),
            ],
        },
    ]
}

/// Capabilities a provider does not have, with the reason. The matrix
/// asserts these really fail, so the table cannot go stale silently.
const OPT_OUT: &[(&str, Cap, &str)] = &[(
    "anthropic",
    Cap::MultipleChoices,
    "the Messages API returns one choice; chat_request rejects n > 1",
)];

/// The provider's response for a recorded case, as one OpenAI message.
fn openai_view(ad: &Adapter, case: &str) -> Result<Assembled, String> {
    let c = Case::load(ad.name, case);
    if let Some(sse) = c.sse() {
        let mut t = (ad.stream)();
        let a = assemble(&run_stream(t.as_mut(), sse.as_bytes(), 16));
        if !t.completed() {
            return Err("stream did not complete".into());
        }
        Ok(a)
    } else {
        (ad.response)(c.body(), "m")
            .map(|(r, _)| assemble_message(&r))
            .map_err(|e| e.to_string())
    }
}

fn check_capability(ad: &Adapter, cap: Cap) -> Result<(), String> {
    let case = ad.cases.iter().find(|(c, _)| *c == cap).map(|(_, n)| *n);
    let ensure = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
    let translate = |openai_case: &str| -> Result<Value, String> {
        let o = Case::load("openai", openai_case);
        (ad.request)(&chat_request(o.req_body()), "model-x").map_err(|e| e.to_string())
    };
    match cap {
        Cap::Text => {
            translate("chat-basic")?;
            let a = openai_view(ad, case.ok_or("no case")?)?;
            ensure(
                !a.text.is_empty() && a.finish.as_deref() == Some("stop"),
                "text + stop",
            )
        }
        Cap::Stream => {
            let c = case.ok_or("no case")?;
            ensure(
                Case::load(ad.name, c).sse().is_some(),
                "case must be a stream",
            )?;
            let a = openai_view(ad, c)?;
            ensure(
                a.done && !a.text.is_empty() && a.finish.is_some(),
                "streamed text",
            )
        }
        Cap::Tools | Cap::ParallelTools => {
            let r = translate(if cap == Cap::Tools {
                "chat-tools-parallel-1-call"
            } else {
                "chat-tools-parallel-2-result"
            })?;
            ensure(r.get("tools").is_some(), "tools in request")?;
            let a = openai_view(ad, case.ok_or("no case")?)?;
            let want = if cap == Cap::Tools { 1 } else { 2 };
            ensure(a.tool_calls.len() >= want, "tool calls")?;
            let mut ids: Vec<&String> = a.tool_calls.values().map(|t| &t.0).collect();
            ids.dedup();
            ensure(ids.len() == a.tool_calls.len(), "distinct ids")?;
            ensure(
                a.tool_calls.values().all(|t| {
                    !t.1.is_empty()
                        && serde_json::from_str::<Value>(if t.2.is_empty() { "{}" } else { &t.2 })
                            .is_ok()
                }),
                "names and JSON arguments",
            )?;
            ensure(
                a.finish.as_deref() == Some("tool_calls"),
                "finish tool_calls",
            )
        }
        Cap::Images => {
            let r = translate("chat-vision-base64")?;
            let o = Case::load("openai", "chat-vision-base64");
            let url = o.req_body()["messages"][0]["content"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|p| p["image_url"]["url"].as_str())
                .unwrap()
                .to_string();
            let payload = url.split_once(',').unwrap().1;
            ensure(r.to_string().contains(payload), "image bytes forwarded")?;
            translate("chat-vision-https-url")?;
            let a = openai_view(ad, case.ok_or("no case")?)?;
            ensure(!a.text.is_empty(), "answer about the image")
        }
        Cap::JsonMode => {
            let r = translate("chat-structured-output-json-schema")?;
            let o = Case::load("openai", "chat-structured-output-json-schema");
            let schema = &o.req_body()["response_format"]["json_schema"]["schema"];
            ensure(
                r.to_string().contains(&schema.to_string()),
                "schema forwarded",
            )?;
            translate("chat-json-object")?;
            if let Some(c) = case {
                let a = openai_view(ad, c)?;
                ensure(
                    serde_json::from_str::<Value>(&a.text).is_ok(),
                    "JSON content",
                )?;
            }
            Ok(())
        }
        Cap::Usage => {
            let a = openai_view(ad, case.ok_or("no case")?)?;
            let u = a.usage.ok_or("usage")?;
            ensure(u["prompt_tokens"].as_u64() > Some(0), "prompt tokens")?;
            ensure(
                u["completion_tokens"].as_u64() > Some(0),
                "completion tokens",
            )?;
            ensure(
                u["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(0),
                "cached tokens",
            )
        }
        Cap::Errors => {
            let c = Case::load(ad.name, case.ok_or("no case")?);
            let e = (ad.error)(c.status(), &c.raw_body(), None);
            ensure(
                e.kind == ErrorKind::ModelNotFound && e.status() == 404,
                "404 → model_not_found",
            )?;
            let e = (ad.error)(
                401,
                b"{\"error\":{\"message\":\"secret-key-fragment\"}}",
                None,
            );
            ensure(
                e.status() == 502 && !e.message.contains("secret"),
                "401 hidden",
            )?;
            let e = (ad.error)(429, b"not json", Some("2".into()));
            ensure(
                e.kind == ErrorKind::RateLimited && e.retry_after.as_deref() == Some("2"),
                "429 retry-after",
            )
        }
        Cap::Thinking => {
            let a = openai_view(ad, case.ok_or("no case")?)?;
            ensure(!a.reasoning.is_empty(), "reasoning_content")?;
            let mut body = Case::load("openai", "chat-basic").req_body().clone();
            body["reasoning_effort"] = json!("high");
            let r = (ad.request)(&chat_request(&body), "model-x").map_err(|e| e.to_string())?;
            ensure(r.to_string().contains("16384"), "effort → budget")
        }
        Cap::MultipleChoices => {
            let r = translate("chat-n2-multiple-choices")?;
            ensure(r.to_string().contains('2'), "n forwarded")
        }
    }
}

#[test]
fn conformance_matrix() {
    let mut report = Vec::new();
    for ad in adapters() {
        for cap in CAPS {
            let opted_out = OPT_OUT.iter().find(|(p, c, _)| *p == ad.name && *c == cap);
            let result = check_capability(&ad, cap);
            match (opted_out, result) {
                (None, Ok(())) => report.push(format!("{:>9} {cap:?}: ok", ad.name)),
                (None, Err(e)) => panic!("{} {cap:?} failed: {e}", ad.name),
                (Some((_, _, why)), Err(_)) => {
                    report.push(format!("{:>9} {cap:?}: opted out ({why})", ad.name))
                }
                (Some(_), Ok(())) => panic!("{} {cap:?} passes but is listed in OPT_OUT", ad.name),
            }
        }
    }
    assert_eq!(report.len(), 2 * CAPS.len());
    println!("{}", report.join("\n"));
}

// ---------------------------------------------------------------------------
// Robustness: no panics on any recorded body fed to any translator
// ---------------------------------------------------------------------------

#[test]
fn no_translator_panics_on_any_recorded_body() {
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for p in ["openai", "anthropic", "gemini"] {
        for c in all_cases(p) {
            bodies.push(c.raw_body());
            bodies.push(serde_json::to_vec(c.req_body()).unwrap());
        }
    }
    bodies.push(b"data: {\"type\":\"content_block_delta\",\"index\":99}\n\n".to_vec());
    bodies.push(b"\xff\xfe garbage \n\n".to_vec());
    for raw in &bodies {
        let v: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
        let _ = anthropic::chat_response(&v, "m");
        let _ = gemini::chat_response(&v, "m");
        let _ = gemini::embed_response(&v, "m", 0);
        let _ = anthropic::openai_response_to_messages(&v, "m");
        let _ = anthropic::error_from_upstream(500, raw, None);
        let _ = gemini::error_from_upstream(500, raw, None);
        if let Value::Object(map) = &v {
            let _ = anthropic::messages_to_openai(map.clone());
            if let Ok(req) = ChatRequest::from_map(map.clone()) {
                let _ = anthropic::chat_request(&req, "m");
                let _ = gemini::chat_request(&req, "m");
            }
        }
        let translators: Vec<Box<dyn StreamTranslator>> = vec![
            Box::new(anthropic::ChatStream::new("m", true)),
            Box::new(gemini::ChatStream::new("m", true)),
            Box::new(anthropic::MessagesStreamFromOpenAi::new("m")),
        ];
        for mut t in translators {
            let mut d = SseDecoder::new();
            let mut evs = Vec::new();
            let _ = d.push(raw, &mut evs);
            evs.extend(d.finish());
            let mut out = Vec::new();
            for ev in &evs {
                let _ = t.on_event(ev, &mut out);
            }
            t.finish(&mut out);
        }
    }
}

#[test]
fn anthropic_tool_without_parameters_streams_an_empty_object() {
    // Recorded: tools with no parameters stream only empty `partial_json`.
    let case = Case::load("anthropic", "tools-stream-haiku-1-tool-use");
    let wire = case.response["body_sse"].as_str().unwrap();
    let mut t = anthropic::ChatStream::new("m", false);
    let a = assemble(&run_stream(&mut t, wire.as_bytes(), 7));
    assert!(!a.tool_calls.is_empty());
    for call in a.tool_calls.values() {
        let args: Value = serde_json::from_str(&call.2).expect("arguments are JSON");
        assert!(args.is_object());
    }
}

// ---------------------------------------------------------------------------
// Usage read by splitting the answer (`scan`), against the tree
// ---------------------------------------------------------------------------

/// Every recorded OpenAI answer and stream chunk, compact and pretty-printed:
/// the usage (and a chunk's choices) read from the split-out members is what
/// the whole tree says.
#[test]
fn usage_read_by_scan_agrees_with_the_tree() {
    use switchyard_llm::openai::{answer_usage, inspect_chunk};
    use switchyard_llm::responses::{responses_answer_usage, usage_from_responses};
    let (mut chunks, mut answers) = (0, 0);
    for case in all_cases("openai") {
        let label = case.label();
        if let Some(sse) = case.sse() {
            if case.request["path"] == "/v1/responses" {
                continue;
            }
            for data in sse
                .split("\n\n")
                .filter_map(|e| e.trim().strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
            {
                let v: Value = serde_json::from_str(data).unwrap();
                let choices = v.get("choices").and_then(Value::as_array);
                let pretty = serde_json::to_string_pretty(&v).unwrap();
                for text in [data, pretty.as_str()] {
                    let info = inspect_chunk(text);
                    assert_eq!(
                        info.usage,
                        v.get("usage").and_then(Usage::from_openai),
                        "{label}: {text}"
                    );
                    assert_eq!(info.has_content, choices.is_some_and(|c| !c.is_empty()));
                    assert_eq!(
                        info.finished,
                        choices.is_some_and(|c| c.iter().any(|ch| !ch["finish_reason"].is_null())),
                        "{label}: {text}"
                    );
                }
                chunks += 1;
            }
            continue;
        }
        if case.status() != 200 || !case.body().is_object() {
            continue;
        }
        for raw in [
            serde_json::to_vec(case.body()).unwrap(),
            serde_json::to_vec_pretty(case.body()).unwrap(),
        ] {
            if case.request["path"] == "/v1/responses" {
                assert_eq!(
                    responses_answer_usage(&raw),
                    usage_from_responses(&case.body()["usage"]),
                    "{label}"
                );
            } else {
                let want = case.body().get("usage").and_then(Usage::from_openai);
                assert_eq!(answer_usage(&raw), want, "{label}");
            }
        }
        answers += 1;
    }
    assert!(
        chunks > 50 && answers > 10,
        "{chunks} chunks, {answers} answers"
    );
}
