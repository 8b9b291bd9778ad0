//! Fixed-size frame bodies, and the fixed parts before a body's variable fields, as they
//! are on the wire: `zerocopy` structs of little-endian integers, packed and unaligned.
//!
//! Not here, on purpose:
//! * bodies that are one integer (Ack's pass, VcpuState's index, Verify's digest) are read
//!   and written as that integer: a one-field struct would say nothing more;
//! * VerifyResult's `ok` byte and digests: the byte is checked (0 or 1) before the digests
//!   are read, so a bad byte reports as such even in a short payload, and a struct read
//!   would turn that into "too short";
//! * VerifyPages and VerifyPagesResult: a region and a first page before a list or a
//!   count, read field by field like VerifyResult;
//! * strings and counted lists have no fixed size and stay with the cursor in the codec.

use super::header::PAGES_PREFIX_LEN;
use std::mem::size_of;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// PassBegin, PassEnd, PassCut and StreamEnd: the pass number, then a page count (announced or sent).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct PassBody {
    pub(super) pass: U32,
    pub(super) pages: U64,
}

/// Join: the destination's session id, then the stream index.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct JoinBody {
    pub(super) session: U64,
    pub(super) stream: U32,
}

/// Complete: pages sent over all passes, then the memory digest.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct CompleteBody {
    pub(super) total_pages: U64,
    pub(super) digest: U64,
}

/// Pages, before the page data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct PagesPrefix {
    pub(super) gpa: U64,
    pub(super) count: U32,
}

/// Hello, before the guest kind string and the region list.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct HelloPrefix {
    pub(super) version: U16,
    pub(super) page_size: U64,
    pub(super) total_pages: U64,
}

/// One entry of Hello's region list.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct RegionEntry {
    pub(super) iova: U64,
    pub(super) length: U64,
}

// Sizes as documented by the protocol; a changed field breaks the build here.
const _: () = {
    assert!(size_of::<PassBody>() == 12);
    assert!(size_of::<JoinBody>() == 12);
    assert!(size_of::<CompleteBody>() == 16);
    assert!(size_of::<PagesPrefix>() == PAGES_PREFIX_LEN);
    assert!(size_of::<HelloPrefix>() == 18);
    assert!(size_of::<RegionEntry>() == 16);
};
