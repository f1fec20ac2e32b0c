//! The access log: one JSON line per request.
//!
//! Through `tracing`'s JSON formatter a line cost about an eighth of the
//! edge's instructions per small request (field visitors, `fmt` machinery,
//! a write to stderr under its lock on the request's own thread). When the
//! binary logs JSON it installs [`install_json_writer`]: the line is then
//! serialised straight from the request's fields into one buffer and
//! written to stderr in one call. The line has the
//! same fields as the `tracing` one (`timestamp`, `level`, `target`,
//! `message` and the request's fields), so readers of the log see no
//! difference. Without it (pretty logs, tests, embedders) the line goes
//! through `tracing` as before.

use std::io::Write;
use std::sync::OnceLock;

use serde::Serialize;

/// What one request's access line says. Prompt and completion text are
/// never part of it.
#[derive(Serialize)]
pub(crate) struct AccessLine<'a> {
    pub request_id: &'a str,
    /// W3C trace id (the caller's when it sent a `traceparent`).
    pub trace_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub tenant: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub status: u16,
    pub stream: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    pub attempts: usize,
    /// The egress node that served the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<&'a str>,
    /// USD at the served target's prices (0 when unpriced or unserved).
    pub cost_usd: f64,
    /// The virtual key's id, when the caller used one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub client_gone: bool,
}

static JSON_LINES: OnceLock<()> = OnceLock::new();

/// Writes access lines as JSON straight to stderr. Called once by a binary
/// that logs JSON.
pub fn install_json_writer() {
    let _ = JSON_LINES.set(());
}

/// Logs one request's line.
pub(crate) fn emit(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "switchyard::access", tracing::Level::INFO) {
        return;
    }
    if JSON_LINES.get().is_some() {
        if let Some(bytes) = json_line(line) {
            // One write of a whole line on the request's own thread: a
            // writer thread cost a cross-thread wake-up per request, more
            // than the write itself when requests come one at a time.
            if std::io::stderr().lock().write_all(&bytes).is_ok() {
                return;
            }
        }
    }
    via_tracing(line);
}

fn json_line(line: &AccessLine<'_>) -> Option<Vec<u8>> {
    // Written field by field: serde's derive with `flatten` went through a
    // map serialiser per field and chrono's RFC 3339 formatting through
    // `fmt`, together about 5 % of a small request's instructions.
    let mut out = JsonLine(Vec::with_capacity(448));
    out.raw("{\"timestamp\":\"");
    timestamp(&mut out.0, chrono::Utc::now());
    out.raw("\",\"level\":\"INFO\",\"message\":\"request\"");
    out.field("request_id", line.request_id)?;
    out.field("trace_id", line.trace_id)?;
    out.field("method", line.method)?;
    out.field("path", line.path)?;
    out.field("tenant", line.tenant)?;
    out.field("model", line.model)?;
    out.field("provider", line.provider)?;
    out.field("status", line.status)?;
    out.field("stream", line.stream)?;
    out.field("latency_ms", line.latency_ms)?;
    if let Some(v) = line.ttft_ms {
        out.field("ttft_ms", v)?;
    }
    if let Some(v) = line.prompt_tokens {
        out.field("prompt_tokens", v)?;
    }
    if let Some(v) = line.completion_tokens {
        out.field("completion_tokens", v)?;
    }
    out.field("attempts", line.attempts)?;
    if let Some(v) = line.egress {
        out.field("egress", v)?;
    }
    out.field("cost_usd", line.cost_usd)?;
    if let Some(v) = line.key {
        out.field("key", v)?;
    }
    if let Some(v) = line.error {
        out.field("error", v)?;
    }
    out.field("client_gone", line.client_gone)?;
    out.raw(",\"target\":\"switchyard::access\"}\n");
    Some(out.0)
}

/// A JSON object being written; values go through serde_json, so strings
/// are escaped and numbers formatted as everywhere else in the log.
struct JsonLine(Vec<u8>);

impl JsonLine {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn key(&mut self, name: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn field(&mut self, name: &str, value: impl Serialize) -> Option<()> {
        self.key(name);
        serde_json::to_writer(&mut self.0, &value).ok()
    }
}

/// `2026-11-29T16:27:13.123456Z`, as `to_rfc3339_opts(Micros, true)` writes it.
fn timestamp(out: &mut Vec<u8>, now: chrono::DateTime<chrono::Utc>) {
    use chrono::{Datelike, Timelike};
    fn digits(out: &mut Vec<u8>, mut v: u32, width: usize) {
        let start = out.len();
        out.resize(start + width, b'0');
        for slot in out[start..].iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let year = now.year();
    // Years outside four digits and leap seconds are chrono's to write.
    if !(0..=9999).contains(&year) || now.nanosecond() >= 1_000_000_000 {
        out.extend_from_slice(
            now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .as_bytes(),
        );
        return;
    }
    digits(out, year as u32, 4);
    out.push(b'-');
    digits(out, now.month(), 2);
    out.push(b'-');
    digits(out, now.day(), 2);
    out.push(b'T');
    digits(out, now.hour(), 2);
    out.push(b':');
    digits(out, now.minute(), 2);
    out.push(b':');
    digits(out, now.second(), 2);
    out.push(b'.');
    digits(out, now.nanosecond() / 1000, 6);
    out.push(b'Z');
}

fn via_tracing(line: &AccessLine<'_>) {
    tracing::info!(
        target: "switchyard::access",
        request_id = line.request_id,
        trace_id = line.trace_id,
        method = line.method,
        path = line.path,
        tenant = line.tenant,
        model = line.model,
        provider = line.provider,
        status = line.status,
        stream = line.stream,
        latency_ms = line.latency_ms,
        ttft_ms = line.ttft_ms,
        prompt_tokens = line.prompt_tokens,
        completion_tokens = line.completion_tokens,
        attempts = line.attempts,
        egress = line.egress,
        cost_usd = line.cost_usd,
        key = line.key,
        error = line.error,
        client_gone = line.client_gone,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_line_has_the_tracing_line_fields() {
        let line = AccessLine {
            request_id: "r\"1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            method: "POST",
            path: "/v1/chat/completions",
            tenant: "t",
            model: "m",
            provider: "p",
            status: 200,
            stream: false,
            latency_ms: 1.5,
            ttft_ms: None,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            attempts: 1,
            egress: Some("egress-eu-1"),
            cost_usd: 0.25,
            key: Some("vk_1"),
            error: None,
            client_gone: false,
        };
        let bytes = json_line(&line).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["target"], "switchyard::access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["prompt_tokens"], 3);
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["egress"], "egress-eu-1");
        assert_eq!(
            (v["cost_usd"].as_f64(), v["key"].as_str()),
            (Some(0.25), Some("vk_1"))
        );
        assert!(v.get("ttft_ms").is_none() && v.get("error").is_none());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(bytes.starts_with(b"{\"timestamp\":\""));
    }

    #[test]
    fn the_timestamp_is_written_as_chrono_writes_it() {
        use chrono::TimeZone;
        for t in [
            chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            chrono::Utc
                .with_ymd_and_hms(1999, 12, 31, 23, 59, 59)
                .unwrap()
                + chrono::Duration::microseconds(123_456),
            chrono::Utc::now(),
        ] {
            let mut out = Vec::new();
            timestamp(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }
    }
}
