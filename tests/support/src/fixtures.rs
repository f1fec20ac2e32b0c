//! Access to the recorded provider payloads in `tests/fixtures/`.

use std::path::PathBuf;

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A recorded case: `provider/case`.
#[derive(Debug, Clone)]
pub struct Case {
    pub request: Value,
    pub response: Value,
}

impl Case {
    pub fn load(provider: &str, case: &str) -> Option<Case> {
        let dir = root().join(provider).join(case);
        let read = |f: &str| -> Option<Value> {
            let text = std::fs::read_to_string(dir.join(f)).ok()?;
            serde_json::from_str(&text).ok()
        };
        Some(Case {
            request: read("request.json")?,
            response: read("response.json")?,
        })
    }

    pub fn status(&self) -> u16 {
        self.response["status"].as_u64().unwrap_or(200) as u16
    }

    pub fn content_type(&self) -> String {
        self.response["headers"]["content-type"]
            .as_str()
            .unwrap_or("application/json")
            .to_string()
    }

    /// The raw SSE text of a streamed response.
    pub fn sse(&self) -> Option<&str> {
        self.response["body_sse"].as_str()
    }

    /// The response body as bytes (JSON re-serialised, or the raw text).
    pub fn body_bytes(&self) -> Vec<u8> {
        if let Some(t) = self.response["body_text"].as_str() {
            if self.response.get("body").is_none() {
                return t.as_bytes().to_vec();
            }
        }
        match self.response.get("body") {
            Some(b) => serde_json::to_vec(b).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match &self.response["headers"][name] {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    }

    /// Every recorded response header whose name starts with one of
    /// `prefixes`.
    pub fn headers_with_prefixes(&self, prefixes: &[&str]) -> Vec<(String, String)> {
        let Some(map) = self.response["headers"].as_object() else {
            return Vec::new();
        };
        map.iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect()
    }
}

/// Splits recorded SSE text into its events, each with its blank line, so a
/// replay can send them one at a time.
pub fn split_events(sse: &str) -> Vec<String> {
    let normalized_sep = if sse.contains("\r\n\r\n") {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    sse.split_inclusive(normalized_sep)
        .filter(|e| !e.trim().is_empty())
        .map(str::to_string)
        .collect()
}
