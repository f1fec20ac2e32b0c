//! Request and response translation must reject bad JSON shapes with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_llm::openai::ChatRequest;
use switchyard_llm::{anthropic, completions, gemini, gemini_native, responses, tokens};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = ChatRequest::parse(data) {
        let _ = anthropic::chat_request(&req, "m");
        let _ = gemini::chat_request(&req, "m");
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(data) {
        let _ = responses::RequestEcho::new(&map);
        let _ = responses::ResponsesRequest::from_map(map.clone()).map(|r| r.chat_for("p"));
        let _ = completions::CompletionsRequest::from_map(map.clone());
        let _ = gemini_native::GenerateRequest::new(map.clone(), "m", false);
        let _ = tokens::gemini_input_tokens(&map);
        let _ = tokens::anthropic_input_tokens(&map);
        let _ = anthropic::messages_to_openai(map);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
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
        let _ = anthropic::error_from_upstream(429, data, None);
        let _ = gemini::error_from_upstream(400, data, None);
    }
});
