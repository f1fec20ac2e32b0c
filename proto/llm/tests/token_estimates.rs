//! How close the local token estimate (o200k_base) comes to what Anthropic
//! and Gemini counted themselves, over every recorded fixture whose request
//! is plain text (images and documents are counted by their providers in
//! ways a text tokenizer cannot know). Prints the figures; fails if the
//! estimate drifts far from them.

use std::path::PathBuf;

use serde_json::{Map, Value};
use switchyard_llm::tokens::{anthropic_input_tokens, gemini_input_tokens};

fn fixtures(provider: &str) -> Vec<(String, Value, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(provider);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let read = |f: &str| -> Option<Value> {
            serde_json::from_str(&std::fs::read_to_string(path.join(f)).ok()?).ok()
        };
        let (Some(req), Some(resp)) = (read("request.json"), read("response.json")) else {
            continue;
        };
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        out.push((name, req, resp));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn text_only(body: &Value) -> bool {
    let s = body.to_string();
    ![
        "\"image\"",
        "\"document\"",
        "inlineData",
        "inline_data",
        "fileData",
        "base64",
    ]
    .iter()
    .any(|m| s.contains(m))
}

/// Reported prompt tokens: a JSON body's usage, or the first SSE event that has it.
fn reported(resp: &Value, pointer: &[&str]) -> Option<u64> {
    if let Some(b) = resp.get("body") {
        return pointer
            .iter()
            .find_map(|p| b.pointer(p))
            .and_then(Value::as_u64);
    }
    let sse = resp.get("body_sse")?.as_str()?;
    sse.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find_map(|v| {
            pointer
                .iter()
                .find_map(|p| v.pointer(p))
                .and_then(Value::as_u64)
        })
}

fn check(label: &str, rows: Vec<(String, u64, u64)>) {
    assert!(rows.len() >= 5, "{label}: too few fixtures");
    let mut ratios: Vec<f64> = rows.iter().map(|(_, e, r)| *e as f64 / *r as f64).collect();
    for (name, est, rep) in &rows {
        println!(
            "{label:9} {name:45} estimate {est:5} reported {rep:5} ratio {:.2}",
            *est as f64 / *rep as f64
        );
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = ratios[ratios.len() / 2];
    let mean_abs: f64 = ratios.iter().map(|r| (r - 1.0).abs()).sum::<f64>() / ratios.len() as f64;
    println!(
        "{label}: {} fixtures, median ratio {median:.2}, mean |error| {:.0}%",
        rows.len(),
        mean_abs * 100.0
    );
    // An estimate, not a count: it must stay in the same range as the
    // vendor's own number, not match it.
    assert!(
        (0.6..=1.4).contains(&median),
        "{label}: median ratio {median}"
    );
}

#[test]
fn anthropic_estimates_track_reported_input_tokens() {
    let rows = fixtures("anthropic")
        .into_iter()
        .filter_map(|(name, req, resp)| {
            let body: Map<String, Value> = req.get("body")?.as_object()?.clone();
            if !text_only(&req["body"]) || resp["status"] != 200 {
                return None;
            }
            let rep = reported(
                &resp,
                &["/usage/input_tokens", "/message/usage/input_tokens"],
            )?;
            let cached = reported(
                &resp,
                &[
                    "/usage/cache_read_input_tokens",
                    "/message/usage/cache_read_input_tokens",
                ],
            )
            .unwrap_or(0)
                + reported(
                    &resp,
                    &[
                        "/usage/cache_creation_input_tokens",
                        "/message/usage/cache_creation_input_tokens",
                    ],
                )
                .unwrap_or(0);
            // Server tools add a hidden system prompt no client can see.
            if body
                .get("tools")
                .is_some_and(|t| t.to_string().contains("web_search"))
            {
                return None;
            }
            Some((name, anthropic_input_tokens(&body), rep + cached))
        })
        .collect();
    check("anthropic", rows);
}

#[test]
fn gemini_estimates_track_reported_prompt_tokens() {
    let rows = fixtures("gemini")
        .into_iter()
        .filter_map(|(name, req, resp)| {
            let body: Map<String, Value> = req.get("body")?.as_object()?.clone();
            if !text_only(&req["body"]) || resp["status"] != 200 || body.get("contents").is_none() {
                return None;
            }
            let rep = reported(&resp, &["/usageMetadata/promptTokenCount", "/totalTokens"])?;
            Some((name, gemini_input_tokens(&body), rep))
        })
        .collect();
    check("gemini", rows);
}
