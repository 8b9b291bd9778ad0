//! The fixed frame header and trailer, and the bounds on a frame's payload.

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"IOVT";
/// The protocol version this code speaks; peers must match exactly.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes before the payload: magic, version, type, length, sequence.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload: the CRC-32C.
pub const TRAILER_LEN: usize = 4;
/// Bytes of a [`Frame::Pages`](super::Frame::Pages) payload before the page data: `gpa` u64, `count` u32.
pub const PAGES_PREFIX_LEN: usize = 12;
/// Default bound on a frame's payload: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 << 20;

/// Bounds applied to every frame read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted or produced, in bytes.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl Limits {
    /// Most pages of `page_size` bytes one [`Frame::Pages`](super::Frame::Pages) may carry under these limits
    /// (0 if not even one fits, or `page_size` is 0).
    pub fn max_pages_per_frame(&self, page_size: u64) -> u32 {
        if page_size == 0 {
            return 0;
        }
        let room = (self.max_payload as u64).saturating_sub(PAGES_PREFIX_LEN as u64);
        (room / page_size).min(u32::MAX as u64) as u32
    }
}
