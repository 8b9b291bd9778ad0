//! Every way a frame, a stream or a layout is rejected.

use super::frame::FrameKind;
use super::validator::StreamState;
use crate::range::IovaRange;
use std::io;

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
    /// The frame does not start with [`MAGIC`](super::MAGIC).
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// A payload length over [`Limits::max_payload`](super::Limits::max_payload).
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
    /// The local layout given to [`MemoryLayout::new`](super::MemoryLayout::new) is unusable.
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
    /// A VerifyPages run that is empty or not inside its region.
    #[error("VerifyPages: {count} page hashes from page {first} of region {region} are not inside that region")]
    VerifyPagesOutside {
        /// Region index.
        region: u32,
        /// First page.
        first: u64,
        /// Hashes in the run.
        count: u64,
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
    /// A Streams frame announcing no stream at all.
    #[error("a session needs at least one stream, Streams says {count}")]
    StreamCount {
        /// The count announced.
        count: u32,
    },
    /// An extra channel joins a memory session other than the destination's.
    #[error("Join names session {theirs:#x}, the destination's is {ours:#x}")]
    WrongSession {
        /// The destination's session id.
        ours: u64,
        /// The one the Join names.
        theirs: u64,
    },
    /// An extra channel's stream index is 0 (the main channel's) or past the count.
    #[error("Join as stream {stream} of a session with {streams} stream(s)")]
    StreamIndex {
        /// The index in the Join.
        stream: u32,
        /// Streams of the session.
        streams: u32,
    },
    /// A stream's StreamEnd disagrees with the pages it carried.
    #[error(
        "stream {stream}, pass {pass}: received {received} pages, StreamEnd reports {reported}"
    )]
    StreamPages {
        /// The stream.
        stream: u32,
        /// Pass number.
        pass: u32,
        /// Pages counted on the stream.
        received: u64,
        /// From StreamEnd.
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

pub(super) fn malformed(frame: FrameKind, problem: Malformation) -> WireError {
    WireError::Malformed { frame, problem }
}
