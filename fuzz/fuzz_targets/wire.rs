#![no_main]
//! Migration byte stream → frames. A CRC-32C guards every frame, so random mutations rarely
//! get past it: when the first byte is odd, the target re-computes each frame's CRC before
//! decoding, so mutations reach the payload decoders too.

use iovatrack::migrate::wire::{decode_all, Limits, HEADER_LEN, TRAILER_LEN};
use iovatrack_fuzz::receiver::fix_frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        fix_frames(&mut bytes, true, false);
    }
    // A small payload bound too, so the length checks are exercised at both sizes.
    let limits = if mode & 2 == 2 {
        Limits { max_payload: 4096 }
    } else {
        Limits::default()
    };
    if let Ok(frames) = decode_all(&bytes, &limits) {
        // Every decoded frame was complete: at least a header and a trailer each.
        assert!(frames.len() * (HEADER_LEN + TRAILER_LEN) <= bytes.len());
    }
});
