//! Every recorded OpenAI case goes through the path the gateway gives it:
//! chat and embeddings requests through validation, responses through usage
//! accounting, streams through the byte-exact pass-through, Responses API
//! traffic through raw passthrough framing, and errors through the error
//! mapping (status, retry-after, no upstream text for auth failures).

use serde_json::Value;
use switchyard_backhaul::providers::openai::error_from_upstream;
use switchyard_llm::openai::{inspect_chunk, ChatRequest, EmbeddingsRequest, Usage};
use switchyard_llm::passthrough::OpenAiPassthrough;
use switchyard_llm::sse::SseDecoder;
use switchyard_llm::translate::StreamTranslator;
use switchyard_proto::Secret;
use switchyard_testkit::fixtures::{root, Case};

fn cases() -> Vec<(String, Case)> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("openai"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let c = Case::load("openai", &n).unwrap();
            (n, c)
        })
        .collect()
}

fn request_path(c: &Case) -> String {
    c.request["path"].as_str().unwrap_or("").to_string()
}

fn passthrough(sse: &str, wants_usage: bool, chunk: usize) -> (Vec<u8>, OpenAiPassthrough) {
    let mut t = OpenAiPassthrough::new(wants_usage);
    let mut d = SseDecoder::new();
    let (mut events, mut out) = (Vec::new(), Vec::new());
    for piece in sse.as_bytes().chunks(chunk) {
        d.push(piece, &mut events).unwrap();
        for e in events.drain(..) {
            t.on_event(&e, &mut out).unwrap();
        }
    }
    if let Some(e) = d.finish() {
        t.on_event(&e, &mut out).unwrap();
    }
    t.finish(&mut out);
    (out.concat(), t)
}

#[test]
fn every_openai_case_takes_its_path() {
    let keys = [Secret::new("sk-proj-fixture-key")];
    let mut seen = 0;
    for (name, case) in cases() {
        seen += 1;
        let path = request_path(&case);
        let body = &case.request["body"];
        let status = case.status();
        let body_bytes = serde_json::to_vec(body).unwrap();

        // Requests: what the edge validates before routing.
        if path.ends_with("/chat/completions") {
            let parsed = ChatRequest::parse(&body_bytes);
            if name == "error-400-empty-messages" {
                // We refuse it ourselves, as OpenAI did, before any upstream call.
                assert_eq!(parsed.unwrap_err().status(), 400, "{name}");
            } else {
                let r = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(!r.model.is_empty(), "{name}");
            }
        } else if path.ends_with("/embeddings") {
            EmbeddingsRequest::parse(&body_bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            assert!(
                path.ends_with("/responses"),
                "{name}: unexpected endpoint {path}"
            );
        }

        if status >= 400 {
            let retry_after = case.header("retry-after");
            let e = error_from_upstream(
                "openai",
                status,
                &case.body_bytes(),
                retry_after.clone(),
                &keys,
            );
            let expected = match status {
                400 => 400,
                401 | 403 => 502,
                404 => 404,
                429 => 429,
                503 => 503,
                other => panic!("{name}: no expectation for {other}"),
            };
            assert_eq!(e.status(), expected, "{name}");
            assert_eq!(e.retry_after, retry_after, "{name}: retry-after lost");
            if status == 401 {
                assert!(
                    !e.message.contains("Incorrect API key"),
                    "{name}: upstream auth text leaked"
                );
            }
            if status == 404 {
                assert_eq!(e.code, Some("model_not_found"), "{name}");
            }
            continue;
        }

        if let Some(sse) = case.sse() {
            // Same-protocol streams are forwarded byte for byte, however
            // the bytes arrive, and accounted from the usage chunk.
            for chunk in [1, 7, sse.len()] {
                let (out, t) = passthrough(sse, true, chunk);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    sse,
                    "{name}: stream altered"
                );
                if path.ends_with("/chat/completions") {
                    assert!(t.completed(), "{name}: not seen as complete");
                }
            }
            let has_usage_chunk = sse
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .any(|d| inspect_chunk(d).usage_only);
            let (out, t) = passthrough(sse, false, 13);
            if has_usage_chunk {
                assert!(
                    t.usage().is_some_and(|u| u.completion_tokens > 0),
                    "{name}: usage not accounted"
                );
                assert!(
                    out.len() < sse.len(),
                    "{name}: unrequested usage chunk forwarded"
                );
            }
            continue;
        }

        let resp: Value = serde_json::from_slice(&case.body_bytes()).unwrap();
        if path.ends_with("/responses") {
            // Raw passthrough: answered as recorded; nothing to translate.
            assert!(
                resp.get("output").is_some() || resp.get("id").is_some(),
                "{name}"
            );
            continue;
        }
        let usage =
            Usage::from_openai(&resp["usage"]).unwrap_or_else(|| panic!("{name}: no usage"));
        assert!(usage.prompt_tokens > 0, "{name}");
        if path.ends_with("/chat/completions") {
            assert!(usage.completion_tokens > 0, "{name}");
        }
    }
    assert!(seen >= 48, "fixtures missing: {seen}");
}
