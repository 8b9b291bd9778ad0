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
    /// Source → destination: after a good verdict, the source hands the guest over and
    /// will not run it again; only now may the destination resume it.
    Commit = 13,
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
            13 => Commit,
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
        /// One hash per region in [`Frame::Hello`] order, or one per page (regions in
        /// order, pages ascending) for page-level verification.
        region_hashes: Cow<'a, [u64]>,
    },
    /// The destination's verdict on a [`Frame::Verify`].
    VerifyResult {
        /// Whether everything matched.
        ok: bool,
        /// The destination's whole-memory digest.
        digest: u64,
        /// Indices (regions, or pages for page-level verification) whose hash differed.
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
    /// The source hands the guest over (after a good [`Frame::VerifyResult`]).
    Commit,
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
            Frame::Commit => FrameKind::Commit,
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
            Frame::Commit => Frame::Commit,
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
    /// After Verify; only Commit (or Abort) may come.
    Verified,
    /// After Commit; nothing may come.
    Committed,
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
    #[error(
        "checksum mismatch in frame {seq}: computed {computed:#010x}, received {received:#010x}"
    )]
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
        Frame::HelloAck | Frame::Commit => &[],
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
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
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
        FrameKind::Commit => Frame::Commit,
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
    let seq = u64::from_le_bytes([h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]]);
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
        self.seq = self.seq.wrapping_add(1);
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
        self.seq = self.seq.wrapping_add(1);
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
                // Saturating: a sum past u64::MAX is past any announcement too.
                let received = self.received.saturating_add(u64::from(*count));
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
                // One hash per region, or (page-level verification) one per page.
                let n = region_hashes.len();
                if n != self.layout.regions.len() && n as u64 != self.layout.total_pages() {
                    return Err(WireError::LayoutMismatch(LayoutDiff::RegionCount {
                        ours: self.layout.regions.len(),
                        theirs: region_hashes.len(),
                    }));
                }
                self.state = Verified;
            }
            (Verified, Frame::Commit) => self.state = Committed,
            (state, _) => return unexpected(state),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{TcpListener, TcpStream};

    const PAGE: u64 = 4096;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(
            PAGE,
            "emulated",
            vec![
                IovaRange::new(0, 0x8000_0000),
                IovaRange::new(0x1_0000_0000, 0x4000_0000),
                // Ends exactly at 2^64: end arithmetic must not overflow.
                IovaRange::new(u64::MAX - 0xF_FFFF, 0x10_0000),
            ],
        )
        .unwrap()
    }

    fn b(s: &[u8]) -> Cow<'_, [u8]> {
        Cow::Borrowed(s)
    }

    /// One frame of every type.
    fn every_frame() -> Vec<OwnedFrame> {
        let l = layout();
        vec![
            l.hello().into_owned(),
            Frame::HelloAck,
            Frame::PassBegin { pass: 0, pages: 3 },
            Frame::Pages {
                gpa: 0x2000,
                count: 2,
                data: Cow::Owned((0..2 * PAGE).map(|i| i as u8).collect()),
            },
            Frame::PassEnd {
                pass: 7,
                pages_sent: u64::MAX,
            },
            Frame::DeviceState {
                name: Cow::Owned("0000:3b:00.0 mlx5 ✓".into()),
                bytes: Cow::Owned(vec![1, 2, 3, 0, 255]),
            },
            Frame::DeviceState {
                name: Cow::Owned(String::new()),
                bytes: Cow::Owned(vec![]),
            },
            Frame::VcpuState {
                index: 3,
                bytes: Cow::Owned(vec![9; 1000]),
            },
            Frame::Complete {
                total_pages: 12345,
                digest: 0xdead_beef_cafe_f00d,
            },
            Frame::Verify {
                digest: 1,
                region_hashes: Cow::Owned(vec![2, 3, u64::MAX]),
            },
            Frame::VerifyResult {
                ok: false,
                digest: 5,
                mismatched_regions: Cow::Owned(vec![0, 2]),
            },
            Frame::VerifyResult {
                ok: true,
                digest: 5,
                mismatched_regions: Cow::Owned(vec![]),
            },
            Frame::Abort {
                reason: Cow::Owned("device refused STOP_COPY".into()),
            },
            Frame::Ack { pass: u32::MAX },
        ]
    }

    fn encode(frames: &[OwnedFrame]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for f in frames {
            w.write_frame(f).unwrap();
        }
        w.into_inner()
    }

    /// A frame with arbitrary header fields and a correct CRC, to test checks behind the CRC.
    fn raw_frame(version: u16, ty: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(payload);
        let c = crc32c(&v);
        v.extend_from_slice(&c.to_le_bytes());
        v
    }

    fn bitwise_crc32c(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ CRC32C_POLY
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 / the standard check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn round_trip_every_frame_type() {
        let frames = every_frame();
        let kinds: std::collections::HashSet<_> = frames.iter().map(|f| f.kind()).collect();
        assert_eq!(kinds.len(), 12, "every frame kind is covered");
        let bytes = encode(&frames);
        assert_eq!(decode_all(&bytes, &Limits::default()).unwrap(), frames);
        // And through the streaming reader, which borrows its buffer.
        let mut r = FrameReader::new(&bytes[..]);
        for f in &frames {
            assert_eq!(&r.read_frame().unwrap(), f);
        }
        assert_eq!(r.next_seq(), frames.len() as u64);
        assert!(matches!(r.read_frame(), Err(WireError::Closed)));
    }

    #[test]
    fn header_layout_is_as_documented() {
        let bytes = encode(&[Frame::Ack { pass: 0x0102_0304 }]);
        assert_eq!(&bytes[0..4], b"IOVT");
        assert_eq!(&bytes[4..6], &PROTOCOL_VERSION.to_le_bytes());
        assert_eq!(&bytes[6..8], &(FrameKind::Ack as u16).to_le_bytes());
        assert_eq!(&bytes[8..12], &4u32.to_le_bytes());
        assert_eq!(&bytes[12..20], &0u64.to_le_bytes());
        assert_eq!(&bytes[20..24], &[4, 3, 2, 1]);
        assert_eq!(bytes.len(), HEADER_LEN + 4 + TRAILER_LEN);
        let crc = crc32c(&bytes[..24]).to_le_bytes();
        assert_eq!(&bytes[24..], &crc);
    }

    #[test]
    fn header_rejections() {
        let l = Limits::default();
        let good = encode(&[Frame::HelloAck]);

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_all(&bad, &l),
            Err(WireError::BadMagic { found }) if found == *b"XOVT"
        ));

        let v2 = raw_frame(2, FrameKind::HelloAck as u16, 0, &[]);
        assert!(matches!(
            decode_all(&v2, &l),
            Err(WireError::VersionMismatch { ours: 1, theirs: 2 })
        ));

        let unknown = raw_frame(PROTOCOL_VERSION, 99, 0, &[]);
        assert!(matches!(
            decode_all(&unknown, &l),
            Err(WireError::UnknownFrameType { ty: 99 })
        ));
        let zero = raw_frame(PROTOCOL_VERSION, 0, 0, &[]);
        assert!(matches!(
            decode_all(&zero, &l),
            Err(WireError::UnknownFrameType { ty: 0 })
        ));

        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            decode_all(&bad, &l),
            Err(WireError::Checksum { seq: 0, .. })
        ));

        // Two streams each starting at 0, glued: the second frame is a replay.
        let mut glued = good.clone();
        glued.extend_from_slice(&good);
        assert!(matches!(
            decode_all(&glued, &l),
            Err(WireError::SequenceGap {
                expected: 1,
                got: 0
            })
        ));
        let skip = [good.clone(), raw_frame(PROTOCOL_VERSION, 2, 2, &[])].concat();
        assert!(matches!(
            decode_all(&skip, &l),
            Err(WireError::SequenceGap {
                expected: 1,
                got: 2
            })
        ));

        assert!(matches!(
            decode_all(&good[..good.len() - 1], &l),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_all(&good[..5], &l),
            Err(WireError::Truncated)
        ));
        assert!(decode_all(&[], &l).unwrap().is_empty());
    }

    #[test]
    fn hostile_length_rejected_before_allocation() {
        let limits = Limits {
            max_payload: 1 << 20,
        };
        let mut hdr = raw_frame(PROTOCOL_VERSION, FrameKind::Pages as u16, 0, &[]);
        hdr.truncate(HEADER_LEN);
        hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_all(&hdr, &limits),
            Err(WireError::FrameTooLarge { len, max }) if len == u32::MAX as u64 && max == 1 << 20
        ));
        let mut r = FrameReader::with_limits(&hdr[..], limits);
        assert!(matches!(
            r.read_frame(),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert_eq!(
            r.buf.capacity(),
            0,
            "nothing allocated for a refused length"
        );

        // Within the limit but the bytes never come: the buffer only grows with the data.
        hdr[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let mut stream = hdr.clone();
        stream.extend_from_slice(&[0u8; 100]);
        let mut r = FrameReader::with_limits(&stream[..], limits);
        assert!(matches!(r.read_frame(), Err(WireError::Truncated)));
        assert!(r.buf.capacity() < 4096, "capacity {}", r.buf.capacity());
        assert!(matches!(
            decode_all(&stream, &limits),
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn reader_closed_versus_truncated() {
        let bytes = encode(&[Frame::HelloAck]);
        let mut r = FrameReader::new(&bytes[..]);
        r.read_frame().unwrap();
        assert!(matches!(r.read_frame(), Err(WireError::Closed)));
        for cut in 1..bytes.len() {
            let mut r = FrameReader::new(&bytes[..cut]);
            assert!(
                matches!(r.read_frame(), Err(WireError::Truncated)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn malformed_payloads() {
        let l = Limits::default();
        let check = |ty: FrameKind, payload: &[u8], want: Malformation| {
            let bytes = raw_frame(PROTOCOL_VERSION, ty as u16, 0, payload);
            match decode_all(&bytes, &l) {
                Err(WireError::Malformed { frame, problem }) => {
                    assert_eq!((frame, problem), (ty, want), "{payload:?}")
                }
                other => panic!("{ty:?} {payload:?}: {other:?}"),
            }
        };
        check(FrameKind::Ack, &[1, 2, 3], Malformation::Short);
        check(FrameKind::Ack, &[1, 2, 3, 4, 5], Malformation::Trailing);
        check(FrameKind::HelloAck, &[0], Malformation::Trailing);
        check(FrameKind::Pages, &[0; 11], Malformation::Short);
        check(FrameKind::Abort, &[0xff, 0xfe], Malformation::InvalidUtf8);
        check(
            FrameKind::DeviceState,
            &[2, 0, 0xc3, 0x28],
            Malformation::InvalidUtf8,
        );
        check(FrameKind::DeviceState, &[5, 0, b'a'], Malformation::Short);
        let mut vr = vec![2u8];
        vr.extend_from_slice(&[0; 12]);
        check(FrameKind::VerifyResult, &vr, Malformation::BadBool);
        // A hostile list count: claims 2^32 − 1 hashes, carries one.
        let mut v = vec![0u8; 8];
        v.extend_from_slice(&u32::MAX.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        check(FrameKind::Verify, &v, Malformation::CountMismatch);
        // And one that claims fewer than it carries.
        let mut v = vec![0u8; 8];
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&[0; 16]);
        check(FrameKind::Verify, &v, Malformation::CountMismatch);
        let mut h = Vec::new();
        h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h.extend_from_slice(&[0; 16]);
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&[0; 15]);
        check(FrameKind::Hello, &h, Malformation::CountMismatch);
    }

    #[test]
    fn writer_refuses_oversized_frames_before_writing() {
        let limits = Limits { max_payload: 64 };
        let mut w = FrameWriter::with_limits(Vec::new(), limits);
        let data = [0u8; 64 - PAGES_PREFIX_LEN];
        w.write_pages(0, 1, &data).unwrap();
        let written = w.get_ref().len();
        let too_big = [0u8; 64 - PAGES_PREFIX_LEN + 1];
        assert!(matches!(
            w.write_pages(0, 1, &too_big),
            Err(WireError::FrameTooLarge { len: 65, max: 64 })
        ));
        assert_eq!(w.get_ref().len(), written);
        assert_eq!(w.next_seq(), 1);
        let long_name = "x".repeat(70_000);
        let mut w = FrameWriter::new(Vec::new());
        assert!(matches!(
            w.write_frame(&Frame::DeviceState {
                name: Cow::Borrowed(&long_name),
                bytes: b(&[]),
            }),
            Err(WireError::Malformed {
                problem: Malformation::FieldTooLong,
                ..
            })
        ));
        assert_eq!(Limits::default().max_pages_per_frame(4096), 16383);
        assert_eq!(limits.max_pages_per_frame(4096), 0);
        assert_eq!(limits.max_pages_per_frame(0), 0);
    }

    #[test]
    fn buffers_are_reused_once_warm() {
        let data = vec![7u8; 4 * PAGE as usize];
        let mut w = FrameWriter::new(Vec::with_capacity(1 << 20));
        w.write_pages(0, 4, &data).unwrap();
        let scratch = (w.scratch.as_ptr(), w.scratch.capacity());
        for i in 0..50u32 {
            let n = i % 4 + 1;
            w.write_pages(u64::from(i) * PAGE, n, &data[..(n as u64 * PAGE) as usize])
                .unwrap();
        }
        assert_eq!((w.scratch.as_ptr(), w.scratch.capacity()), scratch);

        let bytes = w.into_inner();
        let mut r = FrameReader::new(&bytes[..]);
        r.read_frame().unwrap();
        let buf = (r.buf.as_ptr(), r.buf.capacity());
        for _ in 0..50 {
            let f = r.read_frame().unwrap();
            let Frame::Pages { data, .. } = f else {
                panic!("not pages")
            };
            assert!(matches!(data, Cow::Borrowed(_)), "pages borrow the buffer");
        }
        assert_eq!((r.buf.as_ptr(), r.buf.capacity()), buf);
    }

    // --- Validation -------------------------------------------------------------------

    #[test]
    fn layout_construction_rules() {
        let bad = |p, regions: Vec<IovaRange>| {
            assert!(matches!(
                MemoryLayout::new(PAGE, "k", regions),
                Err(WireError::InvalidLayout(q)) if q == p
            ));
        };
        assert!(matches!(
            MemoryLayout::new(3000, "k", vec![]),
            Err(WireError::InvalidLayout(LayoutProblem::PageSize(3000)))
        ));
        bad(LayoutProblem::EmptyRegion(0), vec![IovaRange::new(0, 0)]);
        bad(LayoutProblem::Misaligned(0), vec![IovaRange::new(1, PAGE)]);
        bad(LayoutProblem::Misaligned(0), vec![IovaRange::new(0, 1)]);
        bad(
            LayoutProblem::Overlap(1),
            vec![IovaRange::new(0, 2 * PAGE), IovaRange::new(PAGE, PAGE)],
        );
        bad(
            LayoutProblem::Overlap(1),
            vec![IovaRange::new(PAGE, PAGE), IovaRange::new(0, PAGE)],
        );
        bad(
            LayoutProblem::Overflow(0),
            vec![IovaRange::new(u64::MAX - PAGE + 1, 2 * PAGE)],
        );
        let l = layout();
        assert_eq!(
            l.total_pages(),
            (0x8000_0000 + 0x4000_0000 + 0x10_0000) / PAGE
        );
    }

    #[test]
    fn hello_must_match_layout() {
        let ours = layout();
        assert!(ours.check_hello(&ours.hello()).is_ok());
        let mismatch = |l: MemoryLayout| {
            let e = ours.check_hello(&l.hello()).unwrap_err();
            match e {
                WireError::LayoutMismatch(d) => d,
                e => panic!("{e:?}"),
            }
        };
        let regions = ours.regions().to_vec();
        assert!(matches!(
            mismatch(MemoryLayout::new(8192, "emulated", vec![IovaRange::new(0, 8192)]).unwrap()),
            LayoutDiff::PageSize {
                ours: 4096,
                theirs: 8192
            }
        ));
        assert!(matches!(
            mismatch(MemoryLayout::new(PAGE, "kvm", regions.clone()).unwrap()),
            LayoutDiff::GuestKind { .. }
        ));
        assert!(matches!(
            mismatch(MemoryLayout::new(PAGE, "emulated", regions[..2].to_vec()).unwrap()),
            LayoutDiff::RegionCount { ours: 3, theirs: 2 }
        ));
        let mut r2 = regions.clone();
        r2[1].length += PAGE;
        assert!(matches!(
            mismatch(MemoryLayout::new(PAGE, "emulated", r2).unwrap()),
            LayoutDiff::Region { index: 1, .. }
        ));
        // A Hello whose total disagrees with its own regions.
        let Frame::Hello {
            guest_kind,
            regions: rs,
            ..
        } = ours.hello()
        else {
            unreachable!()
        };
        let lying = Frame::Hello {
            version: PROTOCOL_VERSION,
            guest_kind,
            page_size: PAGE,
            regions: rs.clone(),
            total_pages: 1,
        };
        assert!(matches!(
            ours.check_hello(&lying),
            Err(WireError::LayoutMismatch(LayoutDiff::TotalPages {
                theirs: 1,
                ..
            }))
        ));
        let old = Frame::Hello {
            version: 0,
            guest_kind: Cow::Borrowed("emulated"),
            page_size: PAGE,
            regions: rs,
            total_pages: ours.total_pages(),
        };
        assert!(matches!(
            ours.check_hello(&old),
            Err(WireError::VersionMismatch { ours: 1, theirs: 0 })
        ));
    }

    #[test]
    fn pages_rules() {
        let l = layout();
        let page = vec![0u8; PAGE as usize];
        let two = vec![0u8; 2 * PAGE as usize];
        assert_eq!(
            l.locate(0x1000, 1, page.len()).unwrap(),
            PagesTarget {
                region: 0,
                offset: 0x1000
            }
        );
        assert_eq!(
            l.locate(0x1_0000_2000, 2, two.len()).unwrap(),
            PagesTarget {
                region: 1,
                offset: 0x2000
            }
        );
        // Last page of the space, ending at exactly 2^64.
        assert_eq!(
            l.locate(u64::MAX - PAGE + 1, 1, page.len()).unwrap(),
            PagesTarget {
                region: 2,
                offset: 0x10_0000 - PAGE
            }
        );
        // Last page of region 0.
        assert!(l.locate(0x8000_0000 - PAGE, 1, page.len()).is_ok());

        assert!(matches!(
            l.locate(0x1000, 0, 0),
            Err(WireError::PagesEmpty { gpa: 0x1000 })
        ));
        assert!(matches!(
            l.locate(0x1001, 1, page.len()),
            Err(WireError::PagesMisaligned {
                gpa: 0x1001,
                page_size: PAGE
            })
        ));
        assert!(matches!(
            l.locate(0x1000, 2, page.len()),
            Err(WireError::PagesLength {
                expected: 8192,
                got: 4096,
                ..
            })
        ));
        assert!(matches!(
            l.locate(0x1000, 1, two.len()),
            Err(WireError::PagesLength { .. })
        ));
        let outside = |gpa, count: u32| {
            let len = (count as u64 * PAGE) as usize;
            matches!(
                l.locate(gpa, count, len),
                Err(WireError::PagesOutsideGuest { gpa: g, count: c }) if g == gpa && c == count
            )
        };
        // Straddles the end of region 0.
        assert!(outside(0x8000_0000 - PAGE, 2));
        // In the hole between regions.
        assert!(outside(0x8000_0000, 1));
        assert!(outside(0xFFFF_F000, 1));
        // Spans region 0's end, the hole and region 1's start.
        assert!(outside(0x7FFF_F000, 0x2_0000));
        // Beyond the last region: u64 overflow would wrap without u128.
        assert!(outside(u64::MAX - PAGE + 1, 2));
        // Past region 1.
        assert!(outside(0x1_4000_0000, 1));
        // A huge count whose byte length overflows u64: the length check fires first and
        // must not overflow either.
        assert!(matches!(
            l.locate(0, u32::MAX, 0),
            Err(WireError::PagesLength { expected, .. }) if expected == u32::MAX as u64 * PAGE
        ));
        let big = MemoryLayout::new(1 << 40, "k", vec![IovaRange::new(0, 1 << 40)]).unwrap();
        assert!(matches!(
            big.locate(0, u32::MAX, 0),
            Err(WireError::PagesLength {
                expected: u64::MAX,
                ..
            })
        ));
    }

    fn pages(gpa: u64, count: u32, data: &[u8]) -> Frame<'_> {
        Frame::Pages {
            gpa,
            count,
            data: Cow::Borrowed(&data[..(count as u64 * PAGE) as usize]),
        }
    }

    #[test]
    fn validator_accepts_a_full_migration() {
        let l = layout();
        let hello = l.hello().into_owned();
        let mut v = Validator::new(l);
        let data = vec![0u8; 4 * PAGE as usize];
        assert_eq!(v.state(), StreamState::AwaitHello);
        v.validate(&hello).unwrap();
        v.validate(&Frame::PassBegin { pass: 0, pages: 3 }).unwrap();
        assert_eq!(
            v.validate(&pages(0, 2, &data)).unwrap(),
            Some(PagesTarget {
                region: 0,
                offset: 0
            })
        );
        v.validate(&pages(0x1_0000_0000, 1, &data)).unwrap();
        v.validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 3,
        })
        .unwrap();
        v.validate(&Frame::PassBegin { pass: 1, pages: 0 }).unwrap();
        v.validate(&Frame::PassEnd {
            pass: 1,
            pages_sent: 0,
        })
        .unwrap();
        v.validate(&Frame::PassBegin { pass: 2, pages: 1 }).unwrap();
        v.validate(&pages(0, 1, &data)).unwrap();
        v.validate(&Frame::PassEnd {
            pass: 2,
            pages_sent: 1,
        })
        .unwrap();
        v.validate(&Frame::DeviceState {
            name: "nic".into(),
            bytes: b(&[1]),
        })
        .unwrap();
        v.validate(&Frame::VcpuState {
            index: 0,
            bytes: b(&[2]),
        })
        .unwrap();
        v.validate(&Frame::Complete {
            total_pages: 4,
            digest: 9,
        })
        .unwrap();
        v.validate(&Frame::Verify {
            digest: 9,
            region_hashes: Cow::Owned(vec![1, 2, 3]),
        })
        .unwrap();
        assert_eq!(v.state(), StreamState::Verified);
        assert!(v
            .validate(&Frame::Verify {
                digest: 9,
                region_hashes: Cow::Owned(vec![1, 2, 3]),
            })
            .is_err());
        v.validate(&Frame::Commit).unwrap();
        assert_eq!(v.state(), StreamState::Committed);
        assert!(v.validate(&Frame::Commit).is_err());
        assert_eq!(v.pages_received(), 4);
    }

    #[test]
    fn validator_rejections() {
        let l = layout();
        let hello = l.hello().into_owned();
        let data = vec![0u8; 4 * PAGE as usize];
        let fresh = || Validator::new(layout());
        let in_pass = |announced| {
            let mut v = fresh();
            v.validate(&hello).unwrap();
            v.validate(&Frame::PassBegin {
                pass: 0,
                pages: announced,
            })
            .unwrap();
            v
        };
        let unexpected = |r: Result<_, WireError>, f, s| matches!(r, Err(WireError::UnexpectedFrame { frame, state }) if frame == f && state == s);

        // Anything before Hello.
        assert!(unexpected(
            fresh().validate(&Frame::PassBegin { pass: 0, pages: 0 }),
            FrameKind::PassBegin,
            StreamState::AwaitHello
        ));
        // A second Hello.
        let mut v = fresh();
        v.validate(&hello).unwrap();
        assert!(unexpected(
            v.validate(&hello),
            FrameKind::Hello,
            StreamState::Idle
        ));
        // Destination-only frames.
        for f in [
            Frame::HelloAck,
            Frame::Ack { pass: 0 },
            Frame::VerifyResult {
                ok: true,
                digest: 0,
                mismatched_regions: Cow::Borrowed(&[]),
            },
        ] {
            assert!(unexpected(v.validate(&f), f.kind(), StreamState::Idle));
        }
        // Pages outside a pass.
        assert!(unexpected(
            v.validate(&pages(0, 1, &data)),
            FrameKind::Pages,
            StreamState::Idle
        ));
        // Pass numbering.
        assert!(matches!(
            v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
            Err(WireError::PassOrder {
                expected: 0,
                got: 1
            })
        ));
        let mut v = in_pass(1);
        assert!(matches!(
            v.validate(&Frame::PassEnd {
                pass: 5,
                pages_sent: 0
            }),
            Err(WireError::PassOrder {
                expected: 0,
                got: 5
            })
        ));
        // State inside a pass, a nested pass.
        assert!(unexpected(
            v.validate(&Frame::VcpuState {
                index: 0,
                bytes: b(&[])
            }),
            FrameKind::VcpuState,
            StreamState::InPass
        ));
        assert!(unexpected(
            v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
            FrameKind::PassBegin,
            StreamState::InPass
        ));
        // Bad pages are refused by the validator too.
        assert!(matches!(
            v.validate(&pages(0x8000_0000, 1, &data)),
            Err(WireError::PagesOutsideGuest { .. })
        ));
        // More pages than announced.
        let mut v = in_pass(1);
        assert!(matches!(
            v.validate(&pages(0, 2, &data)),
            Err(WireError::PassCount {
                announced: 1,
                received: 2,
                ..
            })
        ));
        // Fewer pages than announced, or a wrong report.
        let mut v = in_pass(2);
        v.validate(&pages(0, 1, &data)).unwrap();
        assert!(matches!(
            v.validate(&Frame::PassEnd {
                pass: 0,
                pages_sent: 1
            }),
            Err(WireError::PassCount {
                announced: 2,
                received: 1,
                reported: 1,
                ..
            })
        ));
        let mut v = in_pass(1);
        v.validate(&pages(0, 1, &data)).unwrap();
        assert!(matches!(
            v.validate(&Frame::PassEnd {
                pass: 0,
                pages_sent: 2
            }),
            Err(WireError::PassCount { reported: 2, .. })
        ));
        v.validate(&Frame::PassEnd {
            pass: 0,
            pages_sent: 1,
        })
        .unwrap();
        // Complete with a wrong total.
        assert!(matches!(
            v.validate(&Frame::Complete {
                total_pages: 2,
                digest: 0
            }),
            Err(WireError::TotalPages {
                reported: 2,
                received: 1
            })
        ));
        // Verify before Complete; then a wrong region count; then nothing after Complete.
        let verify = |n: usize| Frame::Verify {
            digest: 0,
            region_hashes: Cow::Owned(vec![0; n]),
        };
        assert!(unexpected(
            v.validate(&verify(3)),
            FrameKind::Verify,
            StreamState::Idle
        ));
        v.validate(&Frame::Complete {
            total_pages: 1,
            digest: 0,
        })
        .unwrap();
        assert!(matches!(
            v.validate(&verify(2)),
            Err(WireError::LayoutMismatch(LayoutDiff::RegionCount {
                ours: 3,
                theirs: 2
            }))
        ));
        assert!(unexpected(
            v.validate(&Frame::PassBegin { pass: 1, pages: 0 }),
            FrameKind::PassBegin,
            StreamState::Completed
        ));
        // Abort anywhere, then nothing.
        v.validate(&Frame::Abort {
            reason: "bye".into(),
        })
        .unwrap();
        assert!(unexpected(
            v.validate(&verify(3)),
            FrameKind::Verify,
            StreamState::Aborted
        ));
        let mut v = in_pass(5);
        v.validate(&Frame::Abort { reason: "".into() }).unwrap();
        assert_eq!(v.state(), StreamState::Aborted);
        // A mismatched Hello.
        let other = MemoryLayout::new(PAGE, "kvm", layout().regions().to_vec()).unwrap();
        assert!(matches!(
            fresh().validate(&other.hello()),
            Err(WireError::LayoutMismatch(_))
        ));
    }

    // --- Loopback TCP ----------------------------------------------------------------

    /// Deterministic page contents, so the receiver can check every byte.
    fn fill_page(gpa: u64, pass: u32, out: &mut [u8]) {
        let seed = gpa ^ (u64::from(pass) << 56);
        for (i, w) in out.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64).to_le_bytes());
        }
    }

    #[test]
    fn loopback_tcp_stream_of_pages() {
        const FRAMES: u32 = 3000;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();

        let dest = std::thread::spawn(move || -> Result<(u64, u32), WireError> {
            let (sock, _) = listener.accept()?;
            let mut reader = FrameReader::new(std::io::BufReader::new(sock.try_clone()?));
            let mut writer = FrameWriter::new(sock);
            let mut v = Validator::new(layout());
            let mut expect = vec![0u8; 4 * PAGE as usize];
            let mut frames = 0u32;
            let mut pass = 0;
            loop {
                let frame = reader.read_frame()?;
                let target = v.validate(&frame)?;
                match &frame {
                    Frame::Hello { .. } => {
                        writer.write_frame(&Frame::HelloAck)?;
                    }
                    Frame::PassBegin { pass: p, .. } => pass = *p,
                    Frame::Pages { gpa, count, data } => {
                        assert!(target.is_some());
                        for k in 0..u64::from(*count) {
                            let page = &mut expect[..PAGE as usize];
                            fill_page(gpa + k * PAGE, pass, page);
                            let at = (k * PAGE) as usize;
                            assert_eq!(&data[at..at + PAGE as usize], &page[..]);
                        }
                        frames += 1;
                    }
                    Frame::PassEnd { pass, .. } => {
                        writer.write_frame(&Frame::Ack { pass: *pass })?;
                    }
                    Frame::Complete { .. } => {
                        writer.write_frame(&Frame::VerifyResult {
                            ok: true,
                            digest: 0,
                            mismatched_regions: Cow::Borrowed(&[]),
                        })?;
                        return Ok((v.pages_received(), frames));
                    }
                    _ => {}
                }
            }
        });

        let sock = TcpStream::connect(addr).unwrap();
        let mut reader = FrameReader::new(sock.try_clone().unwrap());
        let mut writer = FrameWriter::new(sock);
        let l = layout();
        writer.write_frame(&l.hello()).unwrap();
        assert_eq!(reader.read_frame().unwrap(), Frame::HelloAck);
        let mut data = vec![0u8; 4 * PAGE as usize];
        let mut total = 0u64;
        let passes = 2;
        for pass in 0..passes {
            let n = FRAMES / passes;
            let runs: Vec<(u64, u32)> = (0..n)
                .map(|i| {
                    // Alternate between regions 0 and 1, runs of 1–4 pages.
                    let base = if i % 2 == 0 { 0 } else { 0x1_0000_0000 };
                    (base + u64::from(i) * 8 * PAGE, i % 4 + 1)
                })
                .collect();
            let pages: u64 = runs.iter().map(|r| u64::from(r.1)).sum();
            writer
                .write_frame(&Frame::PassBegin { pass, pages })
                .unwrap();
            for &(gpa, count) in &runs {
                let buf = &mut data[..(u64::from(count) * PAGE) as usize];
                for (k, page) in buf.chunks_exact_mut(PAGE as usize).enumerate() {
                    fill_page(gpa + k as u64 * PAGE, pass, page);
                }
                writer.write_pages(gpa, count, buf).unwrap();
            }
            writer
                .write_frame(&Frame::PassEnd {
                    pass,
                    pages_sent: pages,
                })
                .unwrap();
            // Dirt stays pending until this Ack arrives.
            assert_eq!(reader.read_frame().unwrap(), Frame::Ack { pass });
            total += pages;
        }
        writer
            .write_frame(&Frame::Complete {
                total_pages: total,
                digest: 0,
            })
            .unwrap();
        assert!(matches!(
            reader.read_frame().unwrap(),
            Frame::VerifyResult { ok: true, .. }
        ));
        let (received, frames) = dest.join().unwrap().unwrap();
        assert_eq!(received, total);
        assert_eq!(frames, FRAMES);
    }

    // --- Properties ------------------------------------------------------------------

    fn arb_frame() -> impl Strategy<Value = OwnedFrame> {
        let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
        prop_oneof![
            (
                any::<u16>(),
                ".{0,12}",
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..5),
                any::<u64>()
            )
                .prop_map(|(version, k, page_size, rs, total_pages)| Frame::Hello {
                    version,
                    guest_kind: Cow::Owned(k),
                    page_size,
                    regions: Cow::Owned(
                        rs.into_iter().map(|(a, b)| IovaRange::new(a, b)).collect()
                    ),
                    total_pages,
                }),
            Just(Frame::HelloAck),
            (any::<u32>(), any::<u64>()).prop_map(|(pass, pages)| Frame::PassBegin { pass, pages }),
            (any::<u64>(), any::<u32>(), bytes(300)).prop_map(|(gpa, count, d)| Frame::Pages {
                gpa,
                count,
                data: Cow::Owned(d)
            }),
            (any::<u32>(), any::<u64>())
                .prop_map(|(pass, pages_sent)| Frame::PassEnd { pass, pages_sent }),
            (".{0,12}", bytes(64)).prop_map(|(n, d)| Frame::DeviceState {
                name: Cow::Owned(n),
                bytes: Cow::Owned(d)
            }),
            (any::<u32>(), bytes(64)).prop_map(|(index, d)| Frame::VcpuState {
                index,
                bytes: Cow::Owned(d)
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(total_pages, digest)| Frame::Complete {
                total_pages,
                digest
            }),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..6)).prop_map(
                |(digest, h)| Frame::Verify {
                    digest,
                    region_hashes: Cow::Owned(h)
                }
            ),
            (
                any::<bool>(),
                any::<u64>(),
                proptest::collection::vec(any::<u32>(), 0..6)
            )
                .prop_map(|(ok, digest, m)| Frame::VerifyResult {
                    ok,
                    digest,
                    mismatched_regions: Cow::Owned(m)
                }),
            ".{0,20}".prop_map(|r| Frame::Abort {
                reason: Cow::Owned(r)
            }),
            any::<u32>().prop_map(|pass| Frame::Ack { pass }),
        ]
    }

    fn frame_ends(frames: &[OwnedFrame]) -> Vec<usize> {
        let mut w = FrameWriter::new(Vec::new());
        frames
            .iter()
            .map(|f| {
                w.write_frame(f).unwrap();
                w.get_ref().len()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn crc_table_matches_bitwise_and_hardware(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            split in 0usize..200,
        ) {
            let want = bitwise_crc32c(&data);
            prop_assert_eq!(!crc32c_update_table(!0, &data), want);
            prop_assert_eq!(crc32c(&data), want);
            // Running over two pieces equals one pass.
            let split = split.min(data.len());
            let mut c = Crc::new();
            c.update(&data[..split]);
            c.update(&data[split..]);
            prop_assert_eq!(c.finish(), want);
        }

        #[test]
        fn hand_written_crc_agrees_with_crc32c_crate(
            data in proptest::collection::vec(any::<u8>(), 0..4200),
            split in 0usize..4200,
        ) {
            // The hand-written slice-by-8 table and SSE4.2 paths are about to give way to
            // the `crc32c` crate: both must agree with it on every length and alignment.
            let want = ::crc32c::crc32c(&data);
            prop_assert_eq!(!crc32c_update_table(!0, &data), want);
            prop_assert_eq!(crc32c(&data), want);
            let split = split.min(data.len());
            let appended = ::crc32c::crc32c_append(::crc32c::crc32c(&data[..split]), &data[split..]);
            prop_assert_eq!(appended, want);
            for off in 0..8.min(data.len()) {
                prop_assert_eq!(crc32c(&data[off..]), ::crc32c::crc32c(&data[off..]));
            }
        }

        #[test]
        fn stream_round_trips(frames in proptest::collection::vec(arb_frame(), 0..8)) {
            let bytes = encode(&frames);
            prop_assert_eq!(&decode_all(&bytes, &Limits::default()).unwrap(), &frames);
            let mut r = FrameReader::new(&bytes[..]);
            for f in &frames {
                prop_assert_eq!(&r.read_frame().unwrap(), f);
            }
            prop_assert!(matches!(r.read_frame(), Err(WireError::Closed)));
        }

        #[test]
        fn any_single_byte_flip_is_rejected(
            frames in proptest::collection::vec(arb_frame(), 1..6),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut bytes = encode(&frames);
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            prop_assert!(decode_all(&bytes, &Limits::default()).is_err());
            let mut r = FrameReader::new(&bytes[..]);
            let mut failed = false;
            for _ in 0..frames.len() + 1 {
                match r.read_frame() {
                    Ok(_) => {}
                    Err(WireError::Closed) => break,
                    Err(_) => { failed = true; break; }
                }
            }
            prop_assert!(failed, "flip at {} of {} accepted", i, bytes.len());
        }

        #[test]
        fn truncation_yields_a_prefix_or_truncated(
            frames in proptest::collection::vec(arb_frame(), 1..6),
            at in any::<prop::sample::Index>(),
        ) {
            let bytes = encode(&frames);
            let cut = at.index(bytes.len());
            let ends = frame_ends(&frames);
            match decode_all(&bytes[..cut], &Limits::default()) {
                Ok(got) => {
                    let k = got.len();
                    prop_assert_eq!(&got[..], &frames[..k]);
                    prop_assert_eq!(if k == 0 { 0 } else { ends[k - 1] }, cut);
                }
                Err(WireError::Truncated) => prop_assert!(!ends.contains(&cut) && cut != 0),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            max in 0u32..1024,
        ) {
            let limits = Limits { max_payload: max };
            let _ = decode_all(&bytes, &limits);
            let mut r = FrameReader::with_limits(&bytes[..], limits);
            while r.read_frame().is_ok() {}
        }

        #[test]
        fn arbitrary_payloads_behind_a_valid_crc_never_panic(
            ty in 0u16..14,
            payload in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let bytes = raw_frame(PROTOCOL_VERSION, ty, 0, &payload);
            if let Ok(frames) = decode_all(&bytes, &Limits::default()) {
                // Whatever parsed re-encodes to the same bytes: no two encodings per frame.
                prop_assert_eq!(encode(&frames), bytes);
            }
        }

        #[test]
        fn locate_matches_brute_force(
            gpa_page in 0u64..64,
            off in prop_oneof![Just(0u64), 1u64..PAGE],
            count in 0u32..20,
            extra in prop_oneof![Just(0usize), 1usize..3],
        ) {
            // Small layout: pages [4, 10) and [16, 20) and [30, 31).
            let regions = vec![
                IovaRange::new(4 * PAGE, 6 * PAGE),
                IovaRange::new(16 * PAGE, 4 * PAGE),
                IovaRange::new(30 * PAGE, PAGE),
            ];
            let l = MemoryLayout::new(PAGE, "k", regions.clone()).unwrap();
            let gpa = gpa_page * PAGE + off;
            let len = count as usize * PAGE as usize + extra;
            let got = l.locate(gpa, count, len);
            // Oracle: every page of the run is in the same region.
            let region_of = |p: u64| regions.iter().position(|r| r.contains(p * PAGE));
            let want_region = (0..u64::from(count))
                .map(|k| region_of(gpa_page + k))
                .collect::<Vec<_>>();
            let same = !want_region.is_empty()
                && want_region.iter().all(|r| r.is_some() && *r == want_region[0]);
            match got {
                Ok(t) => {
                    prop_assert!(off == 0 && count > 0 && extra == 0 && same);
                    prop_assert_eq!(Some(t.region), want_region[0]);
                    prop_assert_eq!(t.offset, gpa - regions[t.region].iova);
                }
                Err(WireError::PagesEmpty { .. }) => prop_assert_eq!(count, 0),
                Err(WireError::PagesMisaligned { .. }) => prop_assert!(off != 0 && count > 0),
                Err(WireError::PagesLength { .. }) => prop_assert!(extra != 0 && off == 0),
                Err(WireError::PagesOutsideGuest { .. }) => prop_assert!(!same && off == 0 && extra == 0),
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }
    }
}
