//! Incremental Server-Sent Events codec.
//!
//! Upstream bytes arrive in arbitrary pieces; the decoder keeps only the tail
//! of an unfinished event, so memory stays bounded by the largest single event
//! and every complete event is handed on as soon as its blank line arrives.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// One decoded event. `raw` is the exact bytes of the event including its
/// terminating blank line, so a pass-through can forward it untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub raw: Bytes,
}

impl SseEvent {
    /// OpenAI's end-of-stream sentinel.
    pub fn is_done(&self) -> bool {
        self.data.trim() == "[DONE]"
    }
}

/// Largest single event accepted; an upstream that never ends an event must
/// not grow our memory without bound.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("server-sent event larger than {MAX_EVENT_BYTES} bytes")]
    EventTooLarge,
}

#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already scanned without finding an event end.
    scanned: usize,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes and appends every event completed by them to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        self.buf.extend_from_slice(chunk);
        loop {
            match find_event_end(&self.buf, self.scanned.saturating_sub(3)) {
                Some(end) => {
                    let raw = self.buf.split_to(end).freeze();
                    self.scanned = 0;
                    if let Some(ev) = parse_event(raw) {
                        out.push(ev);
                    }
                }
                None => {
                    if self.buf.is_empty() {
                        // Nothing held between events: an open stream spends
                        // most of its life waiting for the next one, and the
                        // next chunk makes a buffer of its own size anyway.
                        self.buf = BytesMut::new();
                    }
                    self.scanned = self.buf.len();
                    if self.buf.len() > MAX_EVENT_BYTES {
                        return Err(SseError::EventTooLarge);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// As [`push`](Self::push), for a chunk the caller owns: while nothing
    /// is held from earlier chunks, its events are cut out of it without a
    /// copy (each event's `raw` shares the chunk), and only an unfinished
    /// tail is kept.
    pub fn push_bytes(
        &mut self,
        mut chunk: Bytes,
        out: &mut Vec<SseEvent>,
    ) -> Result<(), SseError> {
        if !self.buf.is_empty() {
            return self.push(&chunk, out);
        }
        while let Some(end) = find_event_end(&chunk, 0) {
            if let Some(ev) = parse_event(chunk.split_to(end)) {
                out.push(ev);
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        self.push(&chunk, out)
    }

    /// Flushes a final event that the upstream ended without a blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            self.buf.clear();
            return None;
        }
        let raw = std::mem::take(&mut self.buf).freeze();
        self.scanned = 0;
        parse_event(raw)
    }
}

/// Index just past the blank line that ends the first event, accepting the
/// three line endings the SSE spec allows (`\n`, `\r\n`, `\r`).
fn find_event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let pos = memchr::memchr2(b'\n', b'\r', &buf[i..])? + i;
        let after = line_break_len(buf, pos)?;
        let next = pos + after;
        if next >= buf.len() {
            return None;
        }
        if buf[next] == b'\n' || buf[next] == b'\r' {
            let after2 = line_break_len(buf, next)?;
            return Some(next + after2);
        }
        i = next;
    }
    None
}

/// Length of the line break at `pos`, or None when a `\r` is the last byte
/// seen and the next chunk may still bring its `\n`.
fn line_break_len(buf: &[u8], pos: usize) -> Option<usize> {
    if buf[pos] == b'\r' {
        match buf.get(pos + 1) {
            Some(b'\n') => Some(2),
            Some(_) => Some(1),
            None => None,
        }
    } else {
        Some(1)
    }
}

fn parse_event(raw: Bytes) -> Option<SseEvent> {
    // Byte-wise with memchr: splitting the decoded text on a char set went
    // through it one char at a time, and this runs for every event.
    let mut event = None;
    let mut data: Option<String> = None;
    let mut rest: &[u8] = &raw;
    while !rest.is_empty() {
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => event = Some(text(value).into_owned()),
            b"data" => match &mut data {
                None => data = Some(text(value).into_owned()),
                Some(d) => {
                    d.push('\n');
                    d.push_str(&text(value));
                }
            },
            _ => {}
        }
    }
    if data.is_none() && event.is_none() {
        return None;
    }
    Some(SseEvent {
        event,
        data: data.unwrap_or_default(),
        raw,
    })
}

/// A field's value as text, invalid UTF-8 replaced. `str::from_utf8` first:
/// it checks ASCII a word at a time, where `from_utf8_lossy` walks every
/// byte, and a stream's events are nearly always valid.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Frames one `data:` event (and optional `event:` name) for the wire.
pub fn encode_event(event: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 16);
    if let Some(name) = event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c, &mut out).unwrap();
        }
        out.extend(d.finish());
        out
    }

    #[test]
    fn events_split_across_chunks_in_every_way() {
        let wire = b"event: a\ndata: {\"x\":1}\n\ndata: line1\ndata: line2\r\n\r\n: comment\n\ndata: [DONE]\n\n";
        let whole = decode_all(&[wire]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0].event.as_deref(), Some("a"));
        assert_eq!(whole[0].data, "{\"x\":1}");
        assert_eq!(whole[1].data, "line1\nline2");
        assert!(whole[2].is_done());
        for split in 1..wire.len() {
            let parts = decode_all(&[&wire[..split], &wire[split..]]);
            assert_eq!(parts, whole, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytewise), whole);
    }

    /// Owned chunks, cut without copying, give the same events as copied
    /// ones, however the wire is split.
    #[test]
    fn owned_chunks_decode_as_borrowed_ones() {
        let wire: &[u8] = b"event: a\ndata: {\"x\":1}\n\ndata: line1\ndata: line2\r\n\r\n: comment\n\ndata: x\r\rdata: [DONE]\n\n";
        let whole = decode_all(&[wire]);
        let owned = |chunks: &[&[u8]]| {
            let mut d = SseDecoder::new();
            let mut out = Vec::new();
            for c in chunks {
                d.push_bytes(Bytes::copy_from_slice(c), &mut out).unwrap();
            }
            out.extend(d.finish());
            out
        };
        assert_eq!(owned(&[wire]), whole);
        for a in 0..wire.len() {
            for b in a..wire.len() {
                let parts = owned(&[&wire[..a], &wire[a..b], &wire[b..]]);
                assert_eq!(parts, whole, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn raw_bytes_are_forwardable_verbatim() {
        let wire = b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n";
        let evs = decode_all(&[wire]);
        let joined: Vec<u8> = evs.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(joined, wire);
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let evs = decode_all(&[b"data: a\r\n\r\ndata: b\r\rdata: c"]);
        let data: Vec<_> = evs.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["a", "b", "c"]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let evs = decode_all(&[b"event: n\xffx\ndata: caf\xc3\xa9 \xc3\ndata: ok\n\n"]);
        assert_eq!(evs[0].event.as_deref(), Some("n\u{fffd}x"));
        assert_eq!(evs[0].data, "caf\u{e9} \u{fffd}\nok");
    }

    #[test]
    fn encode_round_trips() {
        let wire = encode_event(Some("message_start"), "{\"k\":\"v\"}\nsecond");
        let evs = decode_all(&[&wire]);
        assert_eq!(evs[0].event.as_deref(), Some("message_start"));
        assert_eq!(evs[0].data, "{\"k\":\"v\"}\nsecond");
    }
}
