//! The migration wire protocol: framed, versioned, checksummed frames from source to
//! destination (and acknowledgements back) over any byte stream, usually TCP.
//!
//! Every frame is, little-endian:
//!
//! ```text
//! magic "IOVT" | version u16 | type u16 | payload length u32 | sequence u64 | payload | CRC-32C u32
//! ```
//!
//! The CRC-32C (Castagnoli) covers header and payload, so any single corrupted byte (indeed
//! any burst up to 32 bits) is detected. Each direction numbers its frames from 0, strictly
//! by one. Lengths are bounded by [`Limits`] and checked before anything is allocated.
//!
//! [`FrameWriter`] and [`FrameReader`] move whole frames and reuse their buffers: once warmed
//! up, neither allocates per [`Frame::Pages`] frame, and page data is neither copied on write
//! (it is written straight from the caller's slice) nor on read (the frame borrows the
//! reader's buffer). [`Validator`] is the destination's check of what the source sends:
//! layout, page runs inside one guest region, pass bookkeeping and frame order.
//!
//! Any error leaves the stream at an unknown position: the connection must be dropped.

use crate::range::{is_pow2, IovaRange};
use std::borrow::Cow;
use std::io::{self, IoSlice, Read, Write};

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"IOVT";
/// The protocol version this code speaks; peers must match exactly.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes before the payload: magic, version, type, length, sequence.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload: the CRC-32C.
pub const TRAILER_LEN: usize = 4;
/// Bytes of a [`Frame::Pages`] payload before the page data: `gpa` u64, `count` u32.
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
    /// Most pages of `page_size` bytes one [`Frame::Pages`] may carry under these limits
    /// (0 if not even one fits, or `page_size` is 0).
    pub fn max_pages_per_frame(&self, page_size: u64) -> u32 {
        if page_size == 0 {
            return 0;
        }
        let room = (self.max_payload as u64).saturating_sub(PAGES_PREFIX_LEN as u64);
        (room / page_size).min(u32::MAX as u64) as u32
    }
}

/// The type field of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Source → destination: protocol version and guest memory layout.
    Hello = 1,
    /// Destination → source: the layout matches, go ahead.
    HelloAck = 2,
    /// Source → destination: a pre-copy pass starts.
    PassBegin = 3,
    /// Source → destination: a run of contiguous guest pages.
    Pages = 4,
    /// Source → destination: a pass ends.
    PassEnd = 5,
    /// Source → destination: one device's migration state.
    DeviceState = 6,
    /// Source → destination: one vCPU's state.
    VcpuState = 7,
    /// Source → destination: all memory and state sent.
    Complete = 8,
    /// Source → destination: the source's memory hashes, to compare.
    Verify = 9,
    /// Destination → source: the comparison's outcome.
    VerifyResult = 10,
    /// Either way: the sender gives up.
    Abort = 11,
    /// Destination → source: a pass was received in full.
    Ack = 12,
}

impl FrameKind {
    /// The kind for a header's type field, if known.
    pub fn from_u16(ty: u16) -> Option<Self> {
        use FrameKind::*;
        Some(match ty {
            1 => Hello,
            2 => HelloAck,
            3 => PassBegin,
            4 => Pages,
            5 => PassEnd,
            6 => DeviceState,
            7 => VcpuState,
            8 => Complete,
            9 => Verify,
            10 => VerifyResult,
            11 => Abort,
            12 => Ack,
            _ => return None,
        })
    }
}

/// One protocol frame. Byte and string fields borrow when they can (page data written from
/// guest memory, or read from a [`FrameReader`]'s buffer) and own otherwise;
/// [`OwnedFrame`] is the `'static`, fully owned form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The source's protocol version and guest memory layout; the destination checks that it
    /// matches its own memory exactly.
    Hello {
        /// The sender's [`PROTOCOL_VERSION`].
        version: u16,
        /// What kind of guest (e.g. `"kvm"`, `"emulated"`); vCPU state only fits the same kind.
        guest_kind: Cow<'a, str>,
        /// Guest page size in bytes; every [`Frame::Pages`] is in these units.
        page_size: u64,
        /// Guest RAM regions (`iova` is the guest physical address), sorted and disjoint.
        regions: Cow<'a, [IovaRange]>,
        /// Sum of the regions' sizes in pages.
        total_pages: u64,
    },
    /// The destination accepts the Hello.
    HelloAck,
    /// Pass `pass` (0, 1, 2, … in order) begins and will send exactly `pages` pages.
    PassBegin {
        /// Pass number.
        pass: u32,
        /// Pages this pass sends.
        pages: u64,
    },
    /// `count` contiguous pages starting at guest physical address `gpa`.
    Pages {
        /// Guest physical address of the first page (page-aligned).
        gpa: u64,
        /// Number of pages (> 0).
        count: u32,
        /// Page contents: exactly `count * page_size` bytes.
        data: Cow<'a, [u8]>,
    },
    /// Pass `pass` ends after sending `pages_sent` pages.
    PassEnd {
        /// Pass number, as in its [`Frame::PassBegin`].
        pass: u32,
        /// Pages sent in this pass.
        pages_sent: u64,
    },
    /// Opaque migration state of the device `name`.
    DeviceState {
        /// Device name (at most 65535 bytes of UTF-8).
        name: Cow<'a, str>,
        /// The device's state blob.
        bytes: Cow<'a, [u8]>,
    },
    /// Opaque state of vCPU `index`.
    VcpuState {
        /// vCPU index.
        index: u32,
        /// The vCPU's state blob.
        bytes: Cow<'a, [u8]>,
    },
    /// Everything is sent.
    Complete {
        /// Pages sent over all passes.
        total_pages: u64,
        /// Digest of the source's whole guest memory at the end.
        digest: u64,
    },
    /// The source's memory hashes, for the destination to compare with its own.
    Verify {
        /// Digest of the whole guest memory.
        digest: u64,
        /// One hash per region, in [`Frame::Hello`] order.
        region_hashes: Cow<'a, [u64]>,
    },
    /// The destination's verdict on a [`Frame::Verify`].
    VerifyResult {
        /// Whether everything matched.
        ok: bool,
        /// The destination's whole-memory digest.
        digest: u64,
        /// Indices of regions whose hash differed.
        mismatched_regions: Cow<'a, [u32]>,
    },
    /// The sender gives up; the migration is cancelled.
    Abort {
        /// Why, for logs.
        reason: Cow<'a, str>,
    },
    /// The destination received pass `pass` in full.
    Ack {
        /// Pass number.
        pass: u32,
    },
}

/// A frame that owns all its data (as returned by [`decode_all`]).
pub type OwnedFrame = Frame<'static>;

fn owned<T: ToOwned + ?Sized>(c: Cow<'_, T>) -> Cow<'static, T> {
    Cow::Owned(c.into_owned())
}

impl Frame<'_> {
    /// The header type of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello { .. } => FrameKind::Hello,
            Frame::HelloAck => FrameKind::HelloAck,
            Frame::PassBegin { .. } => FrameKind::PassBegin,
            Frame::Pages { .. } => FrameKind::Pages,
            Frame::PassEnd { .. } => FrameKind::PassEnd,
            Frame::DeviceState { .. } => FrameKind::DeviceState,
            Frame::VcpuState { .. } => FrameKind::VcpuState,
            Frame::Complete { .. } => FrameKind::Complete,
            Frame::Verify { .. } => FrameKind::Verify,
            Frame::VerifyResult { .. } => FrameKind::VerifyResult,
            Frame::Abort { .. } => FrameKind::Abort,
            Frame::Ack { .. } => FrameKind::Ack,
        }
    }

    /// The same frame owning all its data.
    pub fn into_owned(self) -> OwnedFrame {
        match self {
            Frame::Hello {
                version,
                guest_kind,
                page_size,
                regions,
                total_pages,
            } => Frame::Hello {
                version,
                guest_kind: owned(guest_kind),
                page_size,
                regions: owned(regions),
                total_pages,
            },
            Frame::HelloAck => Frame::HelloAck,
            Frame::PassBegin { pass, pages } => Frame::PassBegin { pass, pages },
            Frame::Pages { gpa, count, data } => Frame::Pages {
                gpa,
                count,
                data: owned(data),
            },
            Frame::PassEnd { pass, pages_sent } => Frame::PassEnd { pass, pages_sent },
            Frame::DeviceState { name, bytes } => Frame::DeviceState {
                name: owned(name),
                bytes: owned(bytes),
            },
            Frame::VcpuState { index, bytes } => Frame::VcpuState {
                index,
                bytes: owned(bytes),
            },
            Frame::Complete {
                total_pages,
                digest,
            } => Frame::Complete {
                total_pages,
                digest,
            },
            Frame::Verify {
                digest,
                region_hashes,
            } => Frame::Verify {
                digest,
                region_hashes: owned(region_hashes),
            },
            Frame::VerifyResult {
                ok,
                digest,
                mismatched_regions,
            } => Frame::VerifyResult {
                ok,
                digest,
                mismatched_regions: owned(mismatched_regions),
            },
            Frame::Abort { reason } => Frame::Abort {
                reason: owned(reason),
            },
            Frame::Ack { pass } => Frame::Ack { pass },
        }
    }
}

/// What is wrong inside a frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    /// The payload ends before a field.
    #[error("payload too short")]
    Short,
    /// Bytes remain after the last field.
    #[error("trailing bytes after the last field")]
    Trailing,
    /// A string field is not UTF-8.
    #[error("string is not UTF-8")]
    InvalidUtf8,
    /// A boolean byte is neither 0 nor 1.
    #[error("boolean byte is neither 0 nor 1")]
    BadBool,
    /// A list's count disagrees with the bytes that follow.
    #[error("list count disagrees with the payload length")]
    CountMismatch,
    /// A string is longer than its length prefix can say (writing only).
    #[error("field longer than its length prefix allows")]
    FieldTooLong,
}

/// How the source's Hello differs from the destination's memory.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutDiff {
    /// Different guest page sizes.
    #[error("page size: ours {ours:#x}, theirs {theirs:#x}")]
    PageSize {
        /// Destination's.
        ours: u64,
        /// Source's.
        theirs: u64,
    },
    /// Different guest kinds.
    #[error("guest kind: ours {ours:?}, theirs {theirs:?}")]
    GuestKind {
        /// Destination's.
        ours: String,
        /// Source's.
        theirs: String,
    },
    /// Different numbers of regions.
    #[error("region count: ours {ours}, theirs {theirs}")]
    RegionCount {
        /// Destination's.
        ours: usize,
        /// Source's.
        theirs: usize,
    },
    /// Region `index` differs.
    #[error("region {index}: ours {ours}, theirs {theirs}")]
    Region {
        /// Position in the region list.
        index: usize,
        /// Destination's.
        ours: IovaRange,
        /// Source's.
        theirs: IovaRange,
    },
    /// Different total page counts.
    #[error("total pages: ours {ours}, theirs {theirs}")]
    TotalPages {
        /// Destination's.
        ours: u64,
        /// Source's.
        theirs: u64,
    },
}

/// Why a local memory layout cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutProblem {
    /// The page size is not a power of two.
    #[error("page size {0:#x} is not a power of two")]
    PageSize(u64),
    /// Region `index` is empty.
    #[error("region {0} is empty")]
    EmptyRegion(usize),
    /// Region `index` is not page-aligned.
    #[error("region {0} is not page-aligned")]
    Misaligned(usize),
    /// Region `index` starts before the end of the previous one (unsorted or overlapping).
    #[error("region {0} is unsorted or overlaps the previous one")]
    Overlap(usize),
    /// Region `index` reaches past 2^64 − 1.
    #[error("region {0} runs past the end of the address space")]
    Overflow(usize),
}

/// Where the protocol stands, as seen by a [`Validator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Nothing received yet; only Hello (or Abort) may come.
    AwaitHello,
    /// Between passes.
    Idle,
    /// Inside a pass.
    InPass,
    /// After Complete; only Verify (or Abort) may come.
    Completed,
    /// After Abort; nothing may come.
    Aborted,
}

/// Every way a frame or stream is rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The underlying stream failed.
    #[error("migration stream i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream cleanly between two frames.
    #[error("peer closed the migration stream")]
    Closed,
    /// The stream ended inside a frame.
    #[error("migration stream truncated inside a frame")]
    Truncated,
    /// The frame does not start with [`MAGIC`].
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`].
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// A payload length over [`Limits::max_payload`].
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Declared (or, writing, needed) payload length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A frame type this version does not know.
    #[error("unknown frame type {ty}")]
    UnknownFrameType {
        /// The type field.
        ty: u16,
    },
    /// Header and payload do not match their CRC-32C.
    #[error("checksum mismatch in frame {seq}: computed {computed:#010x}, received {received:#010x}")]
    Checksum {
        /// Sequence number as received (itself possibly corrupt).
        seq: u64,
        /// CRC of what arrived.
        computed: u32,
        /// CRC in the trailer.
        received: u32,
    },
    /// Sequence numbers must go up by exactly one.
    #[error("sequence gap: expected frame {expected}, got {got}")]
    SequenceGap {
        /// The next number due.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// A payload that does not parse as its frame type.
    #[error("malformed {frame:?} payload: {problem}")]
    Malformed {
        /// The frame type.
        frame: FrameKind,
        /// What is wrong.
        problem: Malformation,
    },
    /// The source's Hello does not describe the destination's memory.
    #[error("guest memory layout mismatch: {0}")]
    LayoutMismatch(LayoutDiff),
    /// The local layout given to [`MemoryLayout::new`] is unusable.
    #[error("invalid local memory layout: {0}")]
    InvalidLayout(LayoutProblem),
    /// A Pages frame with a count of zero.
    #[error("empty Pages frame at {gpa:#x}")]
    PagesEmpty {
        /// Its address.
        gpa: u64,
    },
    /// A Pages frame whose address is not page-aligned.
    #[error("Pages frame at {gpa:#x} is not aligned to the page size {page_size:#x}")]
    PagesMisaligned {
        /// Its address.
        gpa: u64,
        /// The guest page size.
        page_size: u64,
    },
    /// A run of pages not wholly inside one guest region.
    #[error("{count} pages at {gpa:#x} are not inside one guest memory region")]
    PagesOutsideGuest {
        /// First address.
        gpa: u64,
        /// Page count.
        count: u32,
    },
    /// Page data whose length is not `count * page_size`.
    #[error("{count} pages at {gpa:#x} need {expected} bytes, frame has {got}")]
    PagesLength {
        /// First address.
        gpa: u64,
        /// Page count.
        count: u32,
        /// `count * page_size`.
        expected: u64,
        /// Bytes carried.
        got: u64,
    },
    /// A frame that may not come now (or may not come in this direction).
    #[error("unexpected {frame:?} frame in state {state:?}")]
    UnexpectedFrame {
        /// The frame's type.
        frame: FrameKind,
        /// The protocol state.
        state: StreamState,
    },
    /// A pass number out of order.
    #[error("pass {got} out of order: expected pass {expected}")]
    PassOrder {
        /// The pass due.
        expected: u32,
        /// The pass received.
        got: u32,
    },
    /// A pass whose page counts disagree (announced, received, reported at its end).
    #[error("pass {pass}: announced {announced} pages, received {received}, reported {reported}")]
    PassCount {
        /// Pass number.
        pass: u32,
        /// From PassBegin.
        announced: u64,
        /// Counted from Pages frames so far.
        received: u64,
        /// From PassEnd (or the running count when more arrived than announced).
        reported: u64,
    },
    /// Complete's page total disagrees with the pages received.
    #[error("Complete reports {reported} pages sent, {received} received")]
    TotalPages {
        /// From Complete.
        reported: u64,
        /// Counted.
        received: u64,
    },
}

fn malformed(frame: FrameKind, problem: Malformation) -> WireError {
    WireError::Malformed { frame, problem }
}

// ---------------------------------------------------------------------------------------
// CRC-32C

const CRC32C_POLY: u32 = 0x82F6_3B78; // Castagnoli, reflected

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    // Slice-by-8: t[s][b] is the CRC of byte b followed by s zero bytes.
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// Table-driven (slice-by-8) CRC-32C update on the raw (non-inverted) state.
fn crc32c_update_table(mut crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ b as u32) & 0xff) as usize];
    }
    crc
}

/// The SSE4.2 `crc32` instruction computes exactly CRC-32C; same state convention.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_update_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = crc as u64;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let w = u64::from_le_bytes([ch[0], ch[1], ch[2], ch[3], ch[4], ch[5], ch[6], ch[7]]);
        c = _mm_crc32_u64(c, w);
    }
    let mut c = c as u32;
    for &b in chunks.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    c
}

fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE4.2, checked just above; the function only reads
            // `data` through a safe slice.
            return unsafe { crc32c_update_sse42(crc, data) };
        }
    }
    crc32c_update_table(crc, data)
}

/// Running CRC-32C over several pieces.
#[derive(Clone, Copy)]
struct Crc(u32);

impl Crc {
    fn new() -> Self {
        Crc(!0)
    }
    fn update(&mut self, data: &[u8]) {
        self.0 = crc32c_update(self.0, data);
    }
    fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32C (Castagnoli, as iSCSI/ext4/SSE4.2) of `data`; the frame trailer's checksum.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc::new();
    c.update(data);
    c.finish()
}

// ---------------------------------------------------------------------------------------
// Encoding

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str16(out: &mut Vec<u8>, kind: FrameKind, s: &str) -> Result<(), WireError> {
    let len = u16::try_from(s.len()).map_err(|_| malformed(kind, Malformation::FieldTooLong))?;
    put_u16(out, len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}
fn put_count(out: &mut Vec<u8>, kind: FrameKind, n: usize) -> Result<(), WireError> {
    let n = u32::try_from(n).map_err(|_| malformed(kind, Malformation::FieldTooLong))?;
    put_u32(out, n);
    Ok(())
}

/// Appends the frame's small fields to `out` and returns its bulk bytes (page data, state
/// blobs), which go on the wire right after `out` without being copied.
fn encode_parts<'f>(frame: &'f Frame<'_>, out: &mut Vec<u8>) -> Result<&'f [u8], WireError> {
    let kind = frame.kind();
    Ok(match frame {
        Frame::Hello {
            version,
            guest_kind,
            page_size,
            regions,
            total_pages,
        } => {
            put_u16(out, *version);
            put_u64(out, *page_size);
            put_u64(out, *total_pages);
            put_str16(out, kind, guest_kind)?;
            put_count(out, kind, regions.len())?;
            for r in regions.iter() {
                put_u64(out, r.iova);
                put_u64(out, r.length);
            }
            &[]
        }
        Frame::HelloAck => &[],
        Frame::PassBegin { pass, pages } => {
            put_u32(out, *pass);
            put_u64(out, *pages);
            &[]
        }
        Frame::Pages { gpa, count, data } => {
            put_u64(out, *gpa);
            put_u32(out, *count);
            data
        }
        Frame::PassEnd { pass, pages_sent } => {
            put_u32(out, *pass);
            put_u64(out, *pages_sent);
            &[]
        }
        Frame::DeviceState { name, bytes } => {
            put_str16(out, kind, name)?;
            bytes
        }
        Frame::VcpuState { index, bytes } => {
            put_u32(out, *index);
            bytes
        }
        Frame::Complete {
            total_pages,
            digest,
        } => {
            put_u64(out, *total_pages);
            put_u64(out, *digest);
            &[]
        }
        Frame::Verify {
            digest,
            region_hashes,
        } => {
            put_u64(out, *digest);
            put_count(out, kind, region_hashes.len())?;
            for h in region_hashes.iter() {
                put_u64(out, *h);
            }
            &[]
        }
        Frame::VerifyResult {
            ok,
            digest,
            mismatched_regions,
        } => {
            out.push(u8::from(*ok));
            put_u64(out, *digest);
            put_count(out, kind, mismatched_regions.len())?;
            for i in mismatched_regions.iter() {
                put_u32(out, *i);
            }
            &[]
        }
        Frame::Abort { reason } => reason.as_bytes(),
        Frame::Ack { pass } => {
            put_u32(out, *pass);
            &[]
        }
    })
}

// ---------------------------------------------------------------------------------------
// Decoding

/// A bounds-checked little-endian cursor over a payload.
struct Cursor<'a> {
    b: &'a [u8],
    kind: FrameKind,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(malformed(self.kind, Malformation::Short));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
    fn str_of(&self, b: &'a [u8]) -> Result<&'a str, WireError> {
        std::str::from_utf8(b).map_err(|_| malformed(self.kind, Malformation::InvalidUtf8))
    }
    fn str16(&mut self) -> Result<&'a str, WireError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        self.str_of(b)
    }
    /// A u32 count of `elem`-byte items that must fill the rest of the payload exactly; the
    /// count is checked against the bytes present before anything is allocated.
    fn list(&mut self, elem: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as u64;
        if n.checked_mul(elem as u64) != Some(self.b.len() as u64) {
            return Err(malformed(self.kind, Malformation::CountMismatch));
        }
        Ok(self.rest())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.kind, Malformation::Trailing))
        }
    }
}

fn le_u64s(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8).map(|c| {
        u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
    })
}

fn decode_payload(kind: FrameKind, payload: &[u8]) -> Result<Frame<'_>, WireError> {
    let mut c = Cursor { b: payload, kind };
    let frame = match kind {
        FrameKind::Hello => {
            let version = c.u16()?;
            let page_size = c.u64()?;
            let total_pages = c.u64()?;
            let guest_kind = c.str16()?;
            let raw = c.list(16)?;
            let mut it = le_u64s(raw);
            let mut regions = Vec::with_capacity(raw.len() / 16);
            while let (Some(iova), Some(length)) = (it.next(), it.next()) {
                regions.push(IovaRange { iova, length });
            }
            Frame::Hello {
                version,
                guest_kind: Cow::Borrowed(guest_kind),
                page_size,
                regions: Cow::Owned(regions),
                total_pages,
            }
        }
        FrameKind::HelloAck => Frame::HelloAck,
        FrameKind::PassBegin => Frame::PassBegin {
            pass: c.u32()?,
            pages: c.u64()?,
        },
        FrameKind::Pages => Frame::Pages {
            gpa: c.u64()?,
            count: c.u32()?,
            data: Cow::Borrowed(c.rest()),
        },
        FrameKind::PassEnd => Frame::PassEnd {
            pass: c.u32()?,
            pages_sent: c.u64()?,
        },
        FrameKind::DeviceState => Frame::DeviceState {
            name: Cow::Borrowed(c.str16()?),
            bytes: Cow::Borrowed(c.rest()),
        },
        FrameKind::VcpuState => Frame::VcpuState {
            index: c.u32()?,
            bytes: Cow::Borrowed(c.rest()),
        },
        FrameKind::Complete => Frame::Complete {
            total_pages: c.u64()?,
            digest: c.u64()?,
        },
        FrameKind::Verify => {
            let digest = c.u64()?;
            let raw = c.list(8)?;
            Frame::Verify {
                digest,
                region_hashes: Cow::Owned(le_u64s(raw).collect()),
            }
        }
        FrameKind::VerifyResult => {
            let ok = match c.u8()? {
                0 => false,
                1 => true,
                _ => return Err(malformed(kind, Malformation::BadBool)),
            };
            let digest = c.u64()?;
            let raw = c.list(4)?;
            Frame::VerifyResult {
                ok,
                digest,
                mismatched_regions: Cow::Owned(
                    raw.chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
            }
        }
        FrameKind::Abort => {
            let rest = c.rest();
            Frame::Abort {
                reason: Cow::Borrowed(c.str_of(rest)?),
            }
        }
        FrameKind::Ack => Frame::Ack { pass: c.u32()? },
    };
    c.end()?;
    Ok(frame)
}

/// A parsed header whose magic, version and length bound are already checked.
struct Header {
    ty: u16,
    len: u32,
    seq: u64,
}

fn parse_header(h: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header, WireError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    let ty = u16::from_le_bytes([h[6], h[7]]);
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > limits.max_payload {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max: limits.max_payload,
        });
    }
    let seq = u64::from_le_bytes([
        h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19],
    ]);
    Ok(Header { ty, len, seq })
}

/// Checks checksum, then sequence, then type, then parses: corruption anywhere in a frame
/// reports as a checksum error rather than as whatever the corrupt field happens to say.
fn finish_frame<'p>(
    raw_header: &[u8; HEADER_LEN],
    header: &Header,
    payload: &'p [u8],
    trailer: [u8; TRAILER_LEN],
    expected_seq: u64,
) -> Result<Frame<'p>, WireError> {
    let mut crc = Crc::new();
    crc.update(raw_header);
    crc.update(payload);
    let computed = crc.finish();
    let received = u32::from_le_bytes(trailer);
    if computed != received {
        return Err(WireError::Checksum {
            seq: header.seq,
            computed,
            received,
        });
    }
    if header.seq != expected_seq {
        return Err(WireError::SequenceGap {
            expected: expected_seq,
            got: header.seq,
        });
    }
    let kind =
        FrameKind::from_u16(header.ty).ok_or(WireError::UnknownFrameType { ty: header.ty })?;
    decode_payload(kind, payload)
}

/// Decodes a whole byte stream of frames (sequence numbers from 0), as a receiver would:
/// every frame must be complete and valid, and the bytes must end at a frame boundary.
/// The entry point for fuzzing; never panics, never allocates more than the input's size
/// (plus small per-frame bookkeeping).
pub fn decode_all(bytes: &[u8], limits: &Limits) -> Result<Vec<OwnedFrame>, WireError> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut seq = 0u64;
    while !rest.is_empty() {
        let Some((raw_header, after)) = rest.split_first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Truncated);
        };
        let header = parse_header(raw_header, limits)?;
        let len = header.len as usize;
        if after.len() < len + TRAILER_LEN {
            return Err(WireError::Truncated);
        }
        let (payload, after) = after.split_at(len);
        let (trailer, after) = after.split_at(TRAILER_LEN);
        let trailer = [trailer[0], trailer[1], trailer[2], trailer[3]];
        let frame = finish_frame(raw_header, &header, payload, trailer, seq)?;
        frames.push(frame.into_owned());
        seq = seq.wrapping_add(1);
        rest = after;
    }
    Ok(frames)
}

// ---------------------------------------------------------------------------------------
// Writer and reader

/// Writes whole frames to a byte stream, numbering them from 0.
///
/// Bulk data (page runs, state blobs) goes to the stream straight from the caller's slice in
/// one vectored write with the header and CRC; only the small fields pass through an internal
/// scratch buffer that is reused, so a warmed-up writer does not allocate. It does not
/// buffer: wrap slow writers in a `BufWriter` if frames are small, and call
/// [`FrameWriter::flush`] when the peer must see what was written.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    scratch: Vec<u8>,
    seq: u64,
    limits: Limits,
}

impl<W: Write> FrameWriter<W> {
    /// A writer with the default [`Limits`].
    pub fn new(inner: W) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    /// A writer that refuses frames over `limits`.
    pub fn with_limits(inner: W, limits: Limits) -> Self {
        Self {
            inner,
            scratch: Vec::with_capacity(256),
            seq: 0,
            limits,
        }
    }

    /// Writes one frame and returns its sequence number. On error nothing is known about
    /// what reached the stream (except for [`WireError::FrameTooLarge`] and
    /// [`WireError::Malformed`], checked before writing anything).
    pub fn write_frame(&mut self, frame: &Frame<'_>) -> Result<u64, WireError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&MAGIC);
        put_u16(&mut self.scratch, PROTOCOL_VERSION);
        put_u16(&mut self.scratch, frame.kind() as u16);
        put_u32(&mut self.scratch, 0); // length, patched below
        put_u64(&mut self.scratch, self.seq);
        let bulk = encode_parts(frame, &mut self.scratch)?;
        let len = (self.scratch.len() - HEADER_LEN) as u64 + bulk.len() as u64;
        if len > self.limits.max_payload as u64 {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.limits.max_payload,
            });
        }
        self.scratch[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = Crc::new();
        crc.update(&self.scratch);
        crc.update(bulk);
        let trailer = crc.finish().to_le_bytes();
        write_all_vectored(
            &mut self.inner,
            &mut [
                IoSlice::new(&self.scratch),
                IoSlice::new(bulk),
                IoSlice::new(&trailer),
            ],
        )?;
        let seq = self.seq;
        self.seq += 1;
        Ok(seq)
    }

    /// Writes a [`Frame::Pages`] straight from `data` (no copy, no allocation).
    pub fn write_pages(&mut self, gpa: u64, count: u32, data: &[u8]) -> Result<u64, WireError> {
        self.write_frame(&Frame::Pages {
            gpa,
            count,
            data: Cow::Borrowed(data),
        })
    }

    /// Flushes the underlying stream.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.inner.flush()?;
        Ok(())
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The underlying stream, mutably (writing to it directly breaks the framing).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Gives the underlying stream back.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// `Write::write_all_vectored` is unstable; this is the same loop on stable.
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0); // skip leading empty slices
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads whole frames from a byte stream, checking magic, version, length bound, checksum,
/// sequence and payload structure. The payload buffer is reused and grows only as bytes
/// actually arrive, so a hostile length costs no more memory than the bytes sent.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    seq: u64,
    limits: Limits,
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default [`Limits`].
    pub fn new(inner: R) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    /// A reader that refuses frames over `limits`.
    pub fn with_limits(inner: R, limits: Limits) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            seq: 0,
            limits,
        }
    }

    /// Reads the next frame. [`WireError::Closed`] if the stream ends cleanly before it,
    /// [`WireError::Truncated`] if it ends inside it. The frame borrows the reader's buffer.
    pub fn read_frame(&mut self) -> Result<Frame<'_>, WireError> {
        let mut raw_header = [0u8; HEADER_LEN];
        match read_full(&mut self.inner, &mut raw_header)? {
            0 => return Err(WireError::Closed),
            HEADER_LEN => {}
            _ => return Err(WireError::Truncated),
        }
        let header = parse_header(&raw_header, &self.limits)?;
        let want = header.len as u64 + TRAILER_LEN as u64;
        self.buf.clear();
        // `take` + `read_to_end` fills the reused capacity and only grows it while data
        // keeps coming, never to the declared length up front.
        (&mut self.inner).take(want).read_to_end(&mut self.buf)?;
        if (self.buf.len() as u64) < want {
            return Err(WireError::Truncated);
        }
        let (payload, trailer) = self.buf.split_at(header.len as usize);
        let trailer = [trailer[0], trailer[1], trailer[2], trailer[3]];
        let frame = finish_frame(&raw_header, &header, payload, trailer, self.seq)?;
        self.seq += 1;
        Ok(frame)
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably (reading from it directly breaks the framing).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives the underlying stream back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

// ---------------------------------------------------------------------------------------
// Layout and destination-side validation

/// A guest memory layout as the protocol sees it: page size, guest kind and RAM regions
/// (sorted, disjoint, non-empty, page-aligned). The source announces it in its Hello; the
/// destination checks that Hello against its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    page_size: u64,
    guest_kind: String,
    regions: Vec<IovaRange>,
    total_pages: u64,
}

/// Where a validated run of pages lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesTarget {
    /// Index of the region in the layout.
    pub region: usize,
    /// Byte offset of the first page inside that region.
    pub offset: u64,
}

impl MemoryLayout {
    /// Checks and builds a layout; regions must already be sorted by address.
    pub fn new(
        page_size: u64,
        guest_kind: impl Into<String>,
        regions: Vec<IovaRange>,
    ) -> Result<Self, WireError> {
        let bad = |p| Err(WireError::InvalidLayout(p));
        if !is_pow2(page_size) {
            return bad(LayoutProblem::PageSize(page_size));
        }
        let mut total_pages = 0u64;
        let mut prev_end = 0u128;
        for (i, r) in regions.iter().enumerate() {
            if r.length == 0 {
                return bad(LayoutProblem::EmptyRegion(i));
            }
            if !r.is_aligned(page_size) {
                return bad(LayoutProblem::Misaligned(i));
            }
            if i > 0 && (r.iova as u128) < prev_end {
                return bad(LayoutProblem::Overlap(i));
            }
            if r.end() > u64::MAX as u128 + 1 {
                return bad(LayoutProblem::Overflow(i));
            }
            prev_end = r.end();
            // Disjoint regions in a 2^64 space hold at most 2^64 / page_size pages in total,
            // which fits a u64 for any page size ≥ 2; a page size of 1 could reach 2^64.
            total_pages = total_pages
                .checked_add(r.length / page_size)
                .ok_or(WireError::InvalidLayout(LayoutProblem::Overflow(i)))?;
        }
        Ok(Self {
            page_size,
            guest_kind: guest_kind.into(),
            regions,
            total_pages,
        })
    }

    /// Guest page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Guest kind.
    pub fn guest_kind(&self) -> &str {
        &self.guest_kind
    }

    /// RAM regions, sorted.
    pub fn regions(&self) -> &[IovaRange] {
        &self.regions
    }

    /// Sum of region sizes in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// The Hello frame announcing this layout.
    pub fn hello(&self) -> Frame<'_> {
        Frame::Hello {
            version: PROTOCOL_VERSION,
            guest_kind: Cow::Borrowed(&self.guest_kind),
            page_size: self.page_size,
            regions: Cow::Borrowed(&self.regions),
            total_pages: self.total_pages,
        }
    }

    /// Checks a Hello against this layout, field by field.
    pub fn check_hello(&self, hello: &Frame<'_>) -> Result<(), WireError> {
        let Frame::Hello {
            version,
            guest_kind,
            page_size,
            regions,
            total_pages,
        } = hello
        else {
            return Err(WireError::UnexpectedFrame {
                frame: hello.kind(),
                state: StreamState::AwaitHello,
            });
        };
        let diff = |d| Err(WireError::LayoutMismatch(d));
        if *version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: *version,
            });
        }
        if *page_size != self.page_size {
            return diff(LayoutDiff::PageSize {
                ours: self.page_size,
                theirs: *page_size,
            });
        }
        if **guest_kind != *self.guest_kind {
            return diff(LayoutDiff::GuestKind {
                ours: self.guest_kind.clone(),
                theirs: guest_kind.to_string(),
            });
        }
        if regions.len() != self.regions.len() {
            return diff(LayoutDiff::RegionCount {
                ours: self.regions.len(),
                theirs: regions.len(),
            });
        }
        for (index, (ours, theirs)) in self.regions.iter().zip(regions.iter()).enumerate() {
            if ours != theirs {
                return diff(LayoutDiff::Region {
                    index,
                    ours: *ours,
                    theirs: *theirs,
                });
            }
        }
        if *total_pages != self.total_pages {
            return diff(LayoutDiff::TotalPages {
                ours: self.total_pages,
                theirs: *total_pages,
            });
        }
        Ok(())
    }

    /// Checks a run of `count` pages at `gpa` carrying `data_len` bytes: page-aligned,
    /// non-empty, exactly `count * page_size` bytes, wholly inside one region. Returns where
    /// it lands.
    pub fn locate(&self, gpa: u64, count: u32, data_len: usize) -> Result<PagesTarget, WireError> {
        if count == 0 {
            return Err(WireError::PagesEmpty { gpa });
        }
        if gpa & (self.page_size - 1) != 0 {
            return Err(WireError::PagesMisaligned {
                gpa,
                page_size: self.page_size,
            });
        }
        // u128: count * page_size and gpa + bytes can both exceed u64.
        let bytes = count as u128 * self.page_size as u128;
        if data_len as u128 != bytes {
            return Err(WireError::PagesLength {
                gpa,
                count,
                expected: u64::try_from(bytes).unwrap_or(u64::MAX),
                got: data_len as u64,
            });
        }
        let outside = WireError::PagesOutsideGuest { gpa, count };
        // The only region that can hold gpa is the last one starting at or below it.
        let idx = self.regions.partition_point(|r| r.iova <= gpa);
        let Some(region) = idx.checked_sub(1).map(|i| (i, &self.regions[i])) else {
            return Err(outside);
        };
        let (region, r) = region;
        if gpa as u128 + bytes > r.end() {
            return Err(outside);
        }
        Ok(PagesTarget {
            region,
            offset: gpa - r.iova,
        })
    }
}

/// The destination's check of the source's frame stream, in order: Hello first and matching
/// our layout; passes numbered 0, 1, 2, …; Pages only inside a pass, each run valid
/// ([`MemoryLayout::locate`]); a pass's announced, received and reported page counts equal;
/// device and vCPU state between passes; Complete's total equal to all pages received; then
/// only Verify. Abort is accepted anywhere and ends the stream. Frames only the destination
/// sends (HelloAck, Ack, VerifyResult) are rejected.
#[derive(Clone, Debug)]
pub struct Validator {
    layout: MemoryLayout,
    state: StreamState,
    next_pass: u32,
    announced: u64,
    received: u64,
    total_received: u64,
}

impl Validator {
    /// A validator for a destination with memory `layout`.
    pub fn new(layout: MemoryLayout) -> Self {
        Self {
            layout,
            state: StreamState::AwaitHello,
            next_pass: 0,
            announced: 0,
            received: 0,
            total_received: 0,
        }
    }

    /// The destination's layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Where the stream stands.
    pub fn state(&self) -> StreamState {
        self.state
    }

    /// Pages received over all passes so far.
    pub fn pages_received(&self) -> u64 {
        self.total_received
    }

    /// Checks the next frame from the source. For a Pages frame, returns where its data goes.
    /// After an error the validator's state is unchanged, but the stream should be dropped.
    pub fn validate(&mut self, frame: &Frame<'_>) -> Result<Option<PagesTarget>, WireError> {
        use StreamState::*;
        let unexpected = |state| {
            Err(WireError::UnexpectedFrame {
                frame: frame.kind(),
                state,
            })
        };
        match (self.state, frame) {
            (Aborted, _) => return unexpected(Aborted),
            (_, Frame::Abort { .. }) => self.state = Aborted,
            (AwaitHello, Frame::Hello { .. }) => {
                self.layout.check_hello(frame)?;
                self.state = Idle;
            }
            (Idle, Frame::PassBegin { pass, pages }) => {
                if *pass != self.next_pass {
                    return Err(WireError::PassOrder {
                        expected: self.next_pass,
                        got: *pass,
                    });
                }
                self.announced = *pages;
                self.received = 0;
                self.state = InPass;
            }
            (InPass, Frame::Pages { gpa, count, data }) => {
                let target = self.layout.locate(*gpa, *count, data.len())?;
                let received = self.received + *count as u64;
                if received > self.announced {
                    return Err(WireError::PassCount {
                        pass: self.next_pass,
                        announced: self.announced,
                        received,
                        reported: received,
                    });
                }
                self.received = received;
                return Ok(Some(target));
            }
            (InPass, Frame::PassEnd { pass, pages_sent }) => {
                if *pass != self.next_pass {
                    return Err(WireError::PassOrder {
                        expected: self.next_pass,
                        got: *pass,
                    });
                }
                if *pages_sent != self.received || self.announced != self.received {
                    return Err(WireError::PassCount {
                        pass: *pass,
                        announced: self.announced,
                        received: self.received,
                        reported: *pages_sent,
                    });
                }
                // Pages of one pass may repeat across passes, so the total can exceed the
                // guest's page count; saturating keeps a hostile stream from wrapping it.
                self.total_received = self.total_received.saturating_add(self.received);
                self.next_pass = self.next_pass.wrapping_add(1);
                self.state = Idle;
            }
            (Idle, Frame::DeviceState { .. } | Frame::VcpuState { .. }) => {}
            (Idle, Frame::Complete { total_pages, .. }) => {
                if *total_pages != self.total_received {
                    return Err(WireError::TotalPages {
                        reported: *total_pages,
                        received: self.total_received,
                    });
                }
                self.state = Completed;
            }
            (Completed, Frame::Verify { region_hashes, .. }) => {
                if region_hashes.len() != self.layout.regions.len() {
                    return Err(WireError::LayoutMismatch(LayoutDiff::RegionCount {
                        ours: self.layout.regions.len(),
                        theirs: region_hashes.len(),
                    }));
                }
            }
            (state, _) => return unexpected(state),
        }
        Ok(None)
    }
}
