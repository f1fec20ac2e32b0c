//! W3C Trace Context (`traceparent`) for one request across the fleet.
//!
//! The edge continues a caller's trace (or starts one), each attempt is a
//! child span whose context crosses the backhaul in the request header,
//! and the egress sends a child of that to the provider: one trace id from
//! the caller's SDK to the provider's logs. Only the version-00 format is
//! produced; a later version is read for its first four fields, as the
//! specification asks. `tracestate` is not carried.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// This span's id: the parent of whatever is sent onwards with it.
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// Reads a `traceparent` header; `None` when it is malformed or uses
    /// the all-zero ids the specification forbids.
    pub fn parse(header: &str) -> Option<Self> {
        // Every request's header is read here (the edge's caller's, the
        // egress's from the backhaul): byte slices and fixed arrays, no
        // splitting iterators or allocations.
        let h = header.trim().as_bytes();
        // version "-" trace(32) "-" span(16) "-" flags(2), then for a later
        // version possibly "-" and more.
        if h.len() < 55 || h[2] != b'-' || h[35] != b'-' || h[52] != b'-' {
            return None;
        }
        let [version] = decode_hex::<1>(&h[..2])?;
        if version == 0xff || (version == 0 && h.len() != 55) || (h.len() > 55 && h[55] != b'-') {
            return None;
        }
        let trace_id = decode_hex::<16>(&h[3..35])?;
        let span_id = decode_hex::<8>(&h[36..52])?;
        let [flags] = decode_hex::<1>(&h[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A new trace (the caller sent none, or an invalid one).
    pub fn start() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&nonzero_u64().to_be_bytes());
        trace_id[8..].copy_from_slice(&fastrand::u64(..).to_be_bytes());
        TraceContext {
            trace_id,
            span_id: nonzero_u64().to_be_bytes(),
            sampled: true,
        }
    }

    /// A span inside this one: same trace, new span id.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: nonzero_u64().to_be_bytes(),
            ..*self
        }
    }

    /// The `traceparent` value that names this span as the parent.
    pub fn header(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }

    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    pub fn span_id_hex(&self) -> String {
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.span_id);
        s
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

/// `N` bytes from `2 * N` lower-case hex digits (upper case is invalid in
/// a traceparent).
fn decode_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_specifications_example_and_round_trips() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(h).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id_hex(), "00f067aa0ba902b7");
        assert!(t.sampled);
        assert_eq!(t.header(), h);
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        // A later version may carry more fields.
        assert!(TraceContext::parse(&format!("01-{}-x", &h[3..])).is_some());
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736000f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0-04bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let t = TraceContext::start();
        assert_eq!(TraceContext::parse(&t.header()), Some(t));
    }
}
