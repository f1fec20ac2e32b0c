//! A bounded, deterministic fuzz run that is part of the normal test suite:
//! recorded provider streams and bodies, mutated at random (bytes flipped,
//! cut, duplicated, split anywhere), go through the SSE decoder and every
//! translator. Nothing may panic. The open-ended version of this lives in
//! `fuzz/` (cargo-fuzz).

use std::path::PathBuf;

use serde_json::Value;
use switchyard_llm::openai::ChatRequest;
use switchyard_llm::sse::SseDecoder;
use switchyard_llm::translate::{Chain, StreamTranslator};
use switchyard_llm::{
    anthropic, completions, gemini, gemini_native, passthrough, responses, tokens,
};

/// xorshift64*: a seeded generator, so a failure reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut out = Vec::new();
    for provider in ["openai", "anthropic", "gemini"] {
        let Ok(dir) = std::fs::read_dir(root.join(provider)) else {
            continue;
        };
        for case in dir.flatten() {
            for file in ["response.json", "request.json"] {
                let Ok(text) = std::fs::read_to_string(case.path().join(file)) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(sse) = v["body_sse"].as_str() {
                    out.push(sse.as_bytes().to_vec());
                }
                if let Some(body) = v.get("body") {
                    out.push(serde_json::to_vec(body).unwrap());
                }
            }
        }
    }
    out
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if data.is_empty() {
            break;
        }
        let i = rng.below(data.len());
        match rng.below(5) {
            0 => data[i] = rng.next() as u8,
            1 => data.truncate(i),
            2 => {
                let end = (i + rng.below(64)).min(data.len());
                let copy = data[i..end].to_vec();
                data.splice(i..i, copy);
            }
            3 => {
                let special = [b'{', b'}', b'"', b'\n', b':', b'[', b']', 0xff];
                data.insert(i, special[rng.below(special.len())]);
            }
            _ => {
                let end = (i + rng.below(32)).min(data.len());
                data.drain(i..end);
            }
        }
    }
    data
}

fn translators() -> Vec<Box<dyn StreamTranslator>> {
    vec![
        Box::new(anthropic::ChatStream::new("m", true)),
        Box::new(gemini::ChatStream::new("m", true)),
        Box::new(anthropic::MessagesStreamFromOpenAi::new("m")),
        Box::new(passthrough::OpenAiPassthrough::new(false)),
        Box::new(passthrough::AnthropicPassthrough::new()),
        Box::new(Chain::new(
            Box::new(passthrough::OpenAiPassthrough::new(true)),
            Box::new(anthropic::MessagesStreamFromOpenAi::new("m")),
        )),
        Box::new(responses::ResponsesStreamFromChat::new(
            "m",
            responses::RequestEcho::new(&serde_json::Map::new()),
        )),
        Box::new(responses::ResponsesPassthrough::new()),
        Box::new(completions::CompletionsStreamFromChat::new("m", true)),
        Box::new(gemini_native::GenerateStreamFromChat::new("m")),
        Box::new(gemini_native::GeminiPassthrough::new()),
        Box::new(Chain::new(
            Box::new(anthropic::ChatStream::new("m", true)),
            Box::new(responses::ResponsesStreamFromChat::new(
                "m",
                responses::RequestEcho::new(&serde_json::Map::new()),
            )),
        )),
        Box::new(Chain::new(
            Box::new(gemini::ChatStream::new("m", true)),
            Box::new(gemini_native::GenerateStreamFromChat::new("m")),
        )),
    ]
}

#[test]
fn mutated_recordings_never_panic() {
    let corpus = corpus();
    assert!(corpus.len() > 100, "fixtures missing");
    let mut rng = Rng(0x5eed_5717_c4a1_0001);
    for _ in 0..3000 {
        let pick = rng.below(corpus.len());
        let input = mutate(&mut rng, &corpus[pick]);
        let split = 1 + rng.below(97);
        let mut events = Vec::new();
        let mut d = SseDecoder::new();
        for chunk in input.chunks(split) {
            let _ = d.push(chunk, &mut events);
        }
        events.extend(d.finish());
        // Owned chunks, cut without a copy, decode to the same events.
        let mut owned = Vec::new();
        let mut d = SseDecoder::new();
        for chunk in input.chunks(split) {
            let _ = d.push_bytes(bytes::Bytes::copy_from_slice(chunk), &mut owned);
        }
        owned.extend(d.finish());
        assert_eq!(owned, events);
        for mut t in translators() {
            let mut out = Vec::new();
            for ev in &events {
                if t.on_event(ev, &mut out).is_err() {
                    break;
                }
            }
            t.finish(&mut out);
        }
        if let Ok(req) = ChatRequest::parse(&input) {
            let _ = anthropic::chat_request(&req, "m");
            let _ = gemini::chat_request(&req, "m");
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&input) {
            let _ = anthropic::chat_response(&v, "m");
            let _ = gemini::chat_response(&v, "m");
            let _ = anthropic::openai_response_to_messages(&v, "m");
            let _ = responses::from_chat_response(
                &v,
                "m",
                &responses::RequestEcho::new(&Default::default()),
            );
            let _ = completions::from_chat_response(&v, "m");
            let _ = gemini_native::from_chat_response(&v, "m");
            if let Value::Object(map) = v {
                let _ = tokens::anthropic_input_tokens(&map);
                let _ = tokens::gemini_input_tokens(&map);
                let _ = responses::RequestEcho::new(&map);
                let _ = responses::ResponsesRequest::from_map(map.clone()).map(|r| r.chat_for("p"));
                let _ = completions::CompletionsRequest::from_map(map.clone());
                let _ = gemini_native::GenerateRequest::new(map.clone(), "m", true);
                let _ = anthropic::messages_to_openai(map);
            }
        }
        let _ = anthropic::error_from_upstream(400, &input, None);
        let _ = gemini::error_from_upstream(400, &input, None);
    }
}
