#![no_main]
//! Migration byte stream → frames. A CRC-32C guards every frame, so random mutations rarely
//! get past it: when the first byte is odd, the target re-computes each frame's CRC before
//! decoding, so mutations reach the payload decoders too.

use iovatrack::migrate::wire::{crc32c, decode_all, Limits, HEADER_LEN, TRAILER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        fix_crcs(&mut bytes);
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

/// Walks frames by their length field and writes a correct CRC into each trailer.
fn fix_crcs(bytes: &mut [u8]) {
    let mut at = 0usize;
    while at + HEADER_LEN <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        let Some(end) = at.checked_add(HEADER_LEN + len) else {
            return;
        };
        if end + TRAILER_LEN > bytes.len() {
            return;
        }
        let crc = crc32c(&bytes[at..end]);
        bytes[end..end + TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
        at = end + TRAILER_LEN;
    }
}
