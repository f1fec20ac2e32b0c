//! The Responses API, Gemini's own API and legacy completions as inbound
//! protocols, checked against recorded real payloads (`tests/fixtures/`):
//! recorded requests translate, recorded Responses streams pass through
//! with their usage read, and the event streams the gateway makes from the
//! hub follow the grammar of the recorded OpenAI Responses streams.

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use switchyard_llm::gemini_native::{self, GenerateStreamFromChat};
use switchyard_llm::responses::{
    self, RequestEcho, ResponsesPassthrough, ResponsesRequest, ResponsesStreamFromChat,
};
use switchyard_llm::sse::{SseDecoder, SseEvent};
use switchyard_llm::translate::{Chain, StreamTranslator};
use switchyard_llm::{anthropic, gemini};

fn case(provider: &str, name: &str) -> (Value, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(provider)
        .join(name);
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    (read("request.json"), read("response.json"))
}

fn cases_named(provider: &str, prefix: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(provider);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn decode(wire: &[u8]) -> Vec<SseEvent> {
    let mut d = SseDecoder::new();
    let mut evs = Vec::new();
    // Small pieces: events split anywhere must still come out whole.
    for piece in wire.chunks(7) {
        d.push(piece, &mut evs).unwrap();
    }
    evs.extend(d.finish());
    evs
}

fn run(t: &mut dyn StreamTranslator, wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in decode(wire) {
        t.on_event(&ev, &mut out).unwrap();
    }
    t.finish(&mut out);
    out.concat()
}

/// The event types of a Responses stream, runs of the same type folded
/// into one, with `response.in_progress` dropped (both are legal).
fn grammar(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let t = e["type"].as_str().unwrap().to_string();
        if out.last() != Some(&t) {
            out.push(t);
        }
    }
    out
}

fn json_events(wire: &[u8]) -> Vec<Value> {
    decode(wire)
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            assert_eq!(e.event.as_deref(), v["type"].as_str(), "event name = type");
            v
        })
        .collect()
}

fn sse_of(resp: &Value) -> &[u8] {
    resp["body_sse"].as_str().unwrap().as_bytes()
}

fn echo() -> RequestEcho {
    RequestEcho::new(&Map::new())
}

#[test]
fn recorded_responses_requests_translate_to_chat() {
    let names = cases_named("openai", "responses-");
    assert!(names.len() >= 5);
    for name in names {
        let (req, _) = case("openai", &name);
        let body = req["body"].as_object().unwrap().clone();
        let r = ResponsesRequest::from_map(body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let chat = r
            .chat_for("anthropic")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!chat.messages().is_empty(), "{name}");
        assert_eq!(chat.stream, r.stream, "{name}");
        if let Some(tools) = req["body"]["tools"].as_array() {
            assert_eq!(
                chat.body()["tools"][0]["function"]["name"],
                tools[0]["name"],
                "{name}"
            );
        }
    }
}

#[test]
fn recorded_responses_streams_pass_through_with_their_usage() {
    for name in cases_named("openai", "responses-") {
        let (_, resp) = case("openai", &name);
        let Some(sse) = resp["body_sse"].as_str() else {
            continue;
        };
        let mut t = ResponsesPassthrough::new();
        let out = run(&mut t, sse.as_bytes());
        assert_eq!(out, sse.as_bytes(), "{name}: forwarded byte for byte");
        assert!(t.completed(), "{name}");
        let done = json_events(sse.as_bytes()).pop().unwrap();
        let u = t.usage().unwrap();
        assert_eq!(
            u.prompt_tokens,
            done["response"]["usage"]["input_tokens"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            u.completion_tokens,
            done["response"]["usage"]["output_tokens"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn translated_text_streams_follow_the_recorded_grammar() {
    let (_, recorded) = case("openai", "responses-stream");
    let expected = grammar(&json_events(sse_of(&recorded)));
    let (_, chat) = case("openai", "chat-stream-include-usage");
    let mut t = ResponsesStreamFromChat::new("m", echo());
    let ours = json_events(&run(&mut t, sse_of(&chat)));
    assert_eq!(grammar(&ours), expected);
    for (i, e) in ours.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64);
    }
    let done = &ours.last().unwrap()["response"];
    let text: String = ours
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn translated_tool_streams_follow_the_recorded_grammar() {
    let (_, recorded) = case("openai", "responses-tool-use-stream");
    let expected = grammar(&json_events(sse_of(&recorded)));
    let (_, chat) = case("openai", "chat-tools-stream-single");
    let mut t = ResponsesStreamFromChat::new("m", echo());
    let ours = json_events(&run(&mut t, sse_of(&chat)));
    assert_eq!(grammar(&ours), expected);
    let item = &ours
        .iter()
        .find(|e| e["type"] == "response.output_item.done")
        .unwrap()["item"];
    let recorded_item = &json_events(sse_of(&recorded))
        .into_iter()
        .find(|e| e["type"] == "response.output_item.done")
        .unwrap()["item"];
    for key in ["type", "status"] {
        assert_eq!(item[key], recorded_item[key]);
    }
    assert!(
        serde_json::from_str::<Value>(item["arguments"].as_str().unwrap())
            .unwrap()
            .is_object()
    );
}

#[test]
fn anthropic_thinking_becomes_a_reasoning_summary_like_openais() {
    let (_, recorded) = case("openai", "responses-reasoning-stream");
    let rec = grammar(&json_events(sse_of(&recorded)));
    let (_, thinking) = case("anthropic", "thinking-stream");
    let mut t = Chain::new(
        Box::new(anthropic::ChatStream::new("m", true)),
        Box::new(ResponsesStreamFromChat::new("m", echo())),
    );
    let ours_events = json_events(&run(&mut t, sse_of(&thinking)));
    let g = grammar(&ours_events);
    // The reasoning item's own events, in the recorded order.
    let reasoning = |g: &[String]| -> Vec<String> {
        g.iter()
            .filter(|t| t.contains("reasoning_summary"))
            .cloned()
            .collect()
    };
    // OpenAI splits a summary into several parts; one part is the same
    // cycle of events.
    let ours = reasoning(&g);
    assert_eq!(ours[..], reasoning(&rec)[..ours.len()]);
    assert_eq!(ours.len(), 4);
    let done = &ours_events.last().unwrap()["response"];
    assert_eq!(done["output"][0]["type"], "reasoning");
    let summary = done["output"][0]["summary"][0]["text"].as_str().unwrap();
    assert!(!summary.is_empty());
    // The signed thinking block rides along for the next turn.
    let blocks: Value =
        serde_json::from_str(done["output"][0]["encrypted_content"].as_str().unwrap()).unwrap();
    assert!(blocks[0]["signature"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(done["output"][1]["type"], "message");

    // Replayed as input, the block goes back to Anthropic verbatim.
    let body = json!({"model": "m", "input": [
        {"role": "user", "content": "q"},
        done["output"][0].clone(),
        {"type": "function_call", "call_id": "toolu_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "ok"},
    ]});
    let chat = responses::to_chat(body.as_object().unwrap()).unwrap();
    let out = anthropic::chat_request(&chat, "claude").unwrap();
    assert_eq!(out["messages"][1]["content"][0], blocks[0]);
}

#[test]
fn recorded_gemini_requests_translate_to_chat() {
    let mut n = 0;
    for name in cases_named("gemini", "") {
        let (req, _) = case("gemini", &name);
        let Some(body) = req["body"].as_object() else {
            continue;
        };
        if !body.contains_key("contents") {
            continue;
        }
        let chat =
            gemini_native::to_chat(body, "m", false).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!chat.messages().is_empty(), "{name}");
        // Back out to Gemini: the same number of turns.
        let again = gemini::chat_request(&chat, "m").unwrap();
        assert_eq!(
            again["contents"].as_array().unwrap().len(),
            body["contents"].as_array().unwrap().len(),
            "{name}"
        );
        n += 1;
    }
    assert!(n >= 10, "{n} recorded Gemini requests");
}

#[test]
fn thoughts_and_calls_reach_gemini_callers_as_parts() {
    // Anthropic thinking (non-streamed) → thought part first.
    let (_, resp) = case("anthropic", "thinking-nonstream");
    let (chat, _) = anthropic::chat_response(&resp["body"], "m").unwrap();
    let g = gemini_native::from_chat_response(&chat, "m");
    let parts = g["candidates"][0]["content"]["parts"].as_array().unwrap();
    assert_eq!(parts[0]["thought"], true);
    assert!(parts
        .iter()
        .any(|p| p.get("thought").is_none() && p["text"].is_string()));

    // A recorded Gemini thinking stream through the hub and back.
    let (_, resp) = case("gemini", "thinking-stream-sse");
    let mut t = Chain::new(
        Box::new(gemini::ChatStream::new("m", true)),
        Box::new(GenerateStreamFromChat::new("m")),
    );
    let out = run(&mut t, sse_of(&resp));
    let chunks: Vec<Value> = decode(&out)
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .any(|c| c["candidates"][0]["content"]["parts"][0]["thought"] == true));
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert!(
        last["usageMetadata"]["thoughtsTokenCount"]
            .as_u64()
            .unwrap_or(0)
            > 0
            || last["usageMetadata"]["candidatesTokenCount"]
                .as_u64()
                .unwrap()
                > 0
    );

    // Streamed Anthropic tool calls come out whole, as Gemini sends them.
    let (_, resp) = case("anthropic", "tools-stream-haiku-1-tool-use");
    let mut t = Chain::new(
        Box::new(anthropic::ChatStream::new("m", true)),
        Box::new(GenerateStreamFromChat::new("m")),
    );
    let out = run(&mut t, sse_of(&resp));
    let last: Value = serde_json::from_str(&decode(&out).last().unwrap().data).unwrap();
    let calls: Vec<&Value> = last["candidates"][0]["content"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.get("functionCall"))
        .collect();
    assert_eq!(calls.len(), 2);
    assert!(calls
        .iter()
        .all(|c| c["args"].is_object() && c["id"].as_str().unwrap().starts_with("toolu_")));
}

#[test]
fn gemini_thought_signatures_survive_a_responses_round_trip() {
    // A recorded Gemini 3 function call with its thought signature.
    let (_, resp) = case("gemini", "tools-stream-thought-signature-2");
    let (_, first) = case("gemini", "tools-parallel-stream-1-function-call");
    for (label, wire) in [("first", sse_of(&first)), ("second", sse_of(&resp))] {
        let mut t = Chain::new(
            Box::new(gemini::ChatStream::new("m", true)),
            Box::new(ResponsesStreamFromChat::new("m", echo())),
        );
        let events = json_events(&run(&mut t, wire));
        let done = &events.last().unwrap()["response"];
        let calls: Vec<&Value> = done["output"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["type"] == "function_call")
            .collect();
        let recorded_sigs = String::from_utf8_lossy(wire)
            .matches("thoughtSignature")
            .count();
        let kept = done["output"].as_array().unwrap().iter().find(|i| {
            i["type"] == "reasoning"
                && i["encrypted_content"]
                    .as_str()
                    .is_some_and(|e| e.contains("gemini_signatures"))
        });
        if recorded_sigs == 0 || calls.is_empty() {
            assert!(kept.is_none(), "{label}");
            continue;
        }
        let kept = kept.unwrap_or_else(|| panic!("{label}: signatures kept"));
        // Sent back as input items, each call gets its signature again and
        // Gemini receives it on the functionCall part.
        let mut input = vec![json!({"role": "user", "content": "q"})];
        input.extend(done["output"].as_array().unwrap().iter().cloned());
        for c in &calls {
            input.push(
                json!({"type": "function_call_output", "call_id": c["call_id"], "output": "ok"}),
            );
        }
        let chat =
            responses::to_chat(json!({"model": "m", "input": input}).as_object().unwrap()).unwrap();
        let body = gemini::chat_request(&chat, "m").unwrap();
        let sent: Vec<&Value> = body["contents"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["parts"].as_array().unwrap())
            .filter(|p| p.get("functionCall").is_some())
            .collect();
        let kept: Value =
            serde_json::from_str(kept["encrypted_content"].as_str().unwrap()).unwrap();
        assert!(!sent.is_empty(), "{label}");
        // Gemini signs the first call of a parallel group only: exactly the
        // signatures it sent come back, on calls.
        let mut back: Vec<&str> = sent
            .iter()
            .filter_map(|p| p["thoughtSignature"].as_str())
            .collect();
        let mut expected: Vec<&str> = kept["gemini_signatures"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_str)
            .collect();
        back.sort();
        expected.sort();
        assert!(!expected.is_empty(), "{label}");
        assert_eq!(back, expected, "{label}");
    }
}
