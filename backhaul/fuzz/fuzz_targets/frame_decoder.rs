//! Backhaul frame decoding must take any bytes from a peer, in either
//! direction, without panicking, and refuse an oversized frame from its
//! 5-byte prefix before anything is allocated for it.
//!
//! `cargo +nightly fuzz run frame_decoder` from `backhaul/`. The bounded
//! in-suite version is `backhaul/tests/frame_robustness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_backhaul::tunnel::frame::{self, FrameError, InspectError};

fuzz_target!(|data: &[u8]| {
    match frame::inspect(data) {
        Ok(kinds) => assert!(kinds.len() * 5 <= data.len()),
        Err(InspectError::Frame(FrameError::TooLarge { len, limit, .. })) => assert!(len > limit),
        Err(_) => {}
    }
    // The prefix alone decides, whatever follows.
    if let Some(head) = data.get(..5).and_then(|h| <[u8; 5]>::try_from(h).ok()) {
        if let Ok((_, len)) = frame::parse_prefix(head, frame::MAX_DATA_FRAME) {
            assert!(len <= frame::MAX_DATA_FRAME);
        }
    }
});
