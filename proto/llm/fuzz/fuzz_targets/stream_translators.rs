//! Every stream translator must survive arbitrary upstream events: any bytes
//! decoded as SSE and fed event by event, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_llm::sse::SseDecoder;
use switchyard_llm::translate::{Chain, StreamTranslator};
use switchyard_llm::{anthropic, completions, gemini, gemini_native, passthrough, responses};

fuzz_target!(|data: &[u8]| {
    let mut events = Vec::new();
    let mut d = SseDecoder::new();
    let _ = d.push(data, &mut events);
    events.extend(d.finish());
    let translators: Vec<Box<dyn StreamTranslator>> = vec![
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
    ];
    for mut t in translators {
        let mut out = Vec::new();
        for ev in &events {
            if t.on_event(ev, &mut out).is_err() {
                break;
            }
        }
        t.finish(&mut out);
        let _ = t.usage();
    }
});
