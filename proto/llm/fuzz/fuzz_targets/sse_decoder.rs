//! The SSE decoder must accept any bytes, split anywhere, without panicking,
//! and give the same events however the input is split, copied or owned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_llm::sse::SseDecoder;

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    let body = data.get(1..).unwrap_or_default();

    let mut whole = Vec::new();
    let mut d = SseDecoder::new();
    let _ = d.push(body, &mut whole);
    whole.extend(d.finish());

    let mut pieces = Vec::new();
    let mut d = SseDecoder::new();
    for chunk in body.chunks(split) {
        let _ = d.push(chunk, &mut pieces);
    }
    pieces.extend(d.finish());
    assert_eq!(whole, pieces);

    // Owned chunks are cut without a copy, with the same result.
    let mut owned = Vec::new();
    let mut d = SseDecoder::new();
    for chunk in body.chunks(split) {
        let _ = d.push_bytes(bytes::Bytes::copy_from_slice(chunk), &mut owned);
    }
    owned.extend(d.finish());
    assert_eq!(whole, owned);
});
