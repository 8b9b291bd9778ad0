//! The fixed frame header and trailer, and the bounds on a frame's payload.

use super::error::WireError;
use super::frame::FrameKind;
use std::mem::size_of;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"IOVT";
/// The protocol version this code speaks; peers must match exactly (3: VerifyResult carries
/// the device-state digest; VerifyPages and VerifyPagesResult; pages over several streams,
/// with the Streams, Join and StreamEnd frames. 4: the frames are 3's; the page hashes in
/// Verify and VerifyPages are four FNV-1a lanes, so a version-3 peer would see every page
/// differ instead of being refused by version).
pub const PROTOCOL_VERSION: u16 = 4;
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

/// The frame header as it is on the wire: little-endian fields, no padding, any alignment
/// (it sits at the start of a byte buffer). Parsing is a copy; meaning is checked by
/// [`FrameHeader::check`].
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct FrameHeader {
    magic: [u8; 4],
    version: U16,
    ty: U16,
    len: U32,
    seq: U64,
}

// The layout is the documented header; a field added or resized breaks the build here.
const _: () = assert!(size_of::<FrameHeader>() == HEADER_LEN);

/// A parsed header whose magic, version and length bound are already checked.
pub(super) struct Header {
    pub(super) ty: u16,
    pub(super) len: u32,
    pub(super) seq: u64,
}

impl FrameHeader {
    /// The header of frame `seq` of type `kind` with a `len`-byte payload.
    pub(super) fn new(kind: FrameKind, len: u32, seq: u64) -> Self {
        Self {
            magic: MAGIC,
            version: U16::new(PROTOCOL_VERSION),
            ty: U16::new(kind as u16),
            len: U32::new(len),
            seq: U64::new(seq),
        }
    }

    /// Reinterprets received bytes; the sizes are checked at compile time.
    pub(super) fn from_raw(raw: &[u8; HEADER_LEN]) -> Self {
        zerocopy::transmute!(*raw)
    }

    /// Checks magic, version and the length bound, in that order (the type is checked
    /// only after the CRC, so corruption reports as a checksum error).
    pub(super) fn check(&self, limits: &Limits) -> Result<Header, WireError> {
        if self.magic != MAGIC {
            return Err(WireError::BadMagic { found: self.magic });
        }
        let version = self.version.get();
        if version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let len = self.len.get();
        if len > limits.max_payload {
            return Err(WireError::FrameTooLarge {
                len: len as u64,
                max: limits.max_payload,
            });
        }
        Ok(Header {
            ty: self.ty.get(),
            len,
            seq: self.seq.get(),
        })
    }
}

/// Parses and checks a received header.
pub(super) fn parse_header(raw: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header, WireError> {
    FrameHeader::from_raw(raw).check(limits)
}
