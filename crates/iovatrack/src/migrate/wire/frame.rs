//! The protocol's frames: their header type codes and their decoded contents.

use crate::range::IovaRange;
use std::borrow::Cow;

/// The type field of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Source → destination: protocol version and guest memory layout.
    Hello = 1,
    /// Destination → source: the layout matches, go ahead; names the destination's memory.
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
    /// Source → destination: a pass ends early (its deadline passed) after `pages_sent`
    /// of the pages it announced; the rest is sent later.
    PassCut = 14,
    /// Destination → source: the destination took the guest over after Commit (sent
    /// before it resumes the guest).
    CommitAck = 15,
    /// Source → destination, after a verdict that found regions different: per-page
    /// hashes of one run of a mismatched region, so the count is in pages.
    VerifyPages = 16,
    /// Destination → source: how many pages of that run differ.
    VerifyPagesResult = 17,
    /// Source → destination, on the main channel right after HelloAck: pages travel over
    /// `count` channels, this one and `count - 1` that join the session.
    Streams = 18,
    /// Source → destination, the first frame of an extra channel: it joins a session as
    /// one of its streams.
    Join = 19,
    /// Source → destination, on an extra channel: its share of a pass is all sent.
    StreamEnd = 20,
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
            14 => PassCut,
            15 => CommitAck,
            16 => VerifyPages,
            17 => VerifyPagesResult,
            18 => Streams,
            19 => Join,
            20 => StreamEnd,
            _ => return None,
        })
    }
}

/// One protocol frame. Byte and string fields borrow when they can (page data written from
/// guest memory, or read from a [`FrameReader`](super::FrameReader)'s buffer) and own otherwise;
/// [`OwnedFrame`] is the `'static`, fully owned form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The source's protocol version and guest memory layout; the destination checks that it
    /// matches its own memory exactly.
    Hello {
        /// The sender's [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
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
    HelloAck {
        /// The destination's memory session: a random id chosen when its memory was
        /// created (and chosen again when a refused peer may have written to it). A source
        /// whose earlier passes went to another session id must start over with pass 0.
        session: u64,
    },
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
    /// Pass `pass` ends early after `pages_sent` pages (fewer than announced).
    PassCut {
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
        /// The destination's digest of the device state it received this session (see
        /// `engine::StateDigest`); the source compares it with what it sent.
        device_digest: u64,
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
    /// The destination owns the guest (after a [`Frame::Commit`]).
    CommitAck,
    /// After a [`Frame::VerifyResult`] that found regions different (region-level
    /// verification, for guests too large for a frame of page hashes): the hashes of
    /// `hashes.len()` pages of region `region` from its page `first`. The source sends
    /// every page of each mismatched region, in order, in runs that fit a frame.
    VerifyPages {
        /// Region index, in [`Frame::Hello`] order.
        region: u32,
        /// First page of the run, counted from the region's start.
        first: u64,
        /// One hash per page.
        hashes: Cow<'a, [u64]>,
    },
    /// The destination's count of pages that differ in one [`Frame::VerifyPages`] run.
    VerifyPagesResult {
        /// The run's region.
        region: u32,
        /// The run's first page.
        first: u64,
        /// Pages of the run whose hash differed.
        mismatched: u64,
    },
    /// Pages of this session travel over `count` channels: the main one (this) and
    /// `count - 1` extra ones that join with [`Frame::Join`]. Sent once, before pass 0;
    /// without it a session has one channel.
    Streams {
        /// Channels carrying pages, the main one included (≥ 1).
        count: u32,
    },
    /// The first frame of an extra channel: it joins the destination's memory session
    /// `session` (as in [`Frame::HelloAck`]) as stream `stream`.
    Join {
        /// The destination's session id.
        session: u64,
        /// This channel's index, 1 ..< the [`Frame::Streams`] count (the main channel is 0).
        stream: u32,
    },
    /// An extra channel's share of pass `pass` is on the wire: `pages` pages. Every
    /// stream ends every pass with one (a share may be empty); the destination
    /// acknowledges a pass only when every stream has ended it.
    StreamEnd {
        /// Pass number.
        pass: u32,
        /// Pages this stream carried in this pass.
        pages: u64,
    },
}

/// A frame that owns all its data (as returned by [`decode_all`](super::decode_all)).
pub type OwnedFrame = Frame<'static>;

fn owned<T: ToOwned + ?Sized>(c: Cow<'_, T>) -> Cow<'static, T> {
    Cow::Owned(c.into_owned())
}

impl Frame<'_> {
    /// The header type of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello { .. } => FrameKind::Hello,
            Frame::HelloAck { .. } => FrameKind::HelloAck,
            Frame::Commit => FrameKind::Commit,
            Frame::CommitAck => FrameKind::CommitAck,
            Frame::PassBegin { .. } => FrameKind::PassBegin,
            Frame::Pages { .. } => FrameKind::Pages,
            Frame::PassEnd { .. } => FrameKind::PassEnd,
            Frame::PassCut { .. } => FrameKind::PassCut,
            Frame::DeviceState { .. } => FrameKind::DeviceState,
            Frame::VcpuState { .. } => FrameKind::VcpuState,
            Frame::Complete { .. } => FrameKind::Complete,
            Frame::Verify { .. } => FrameKind::Verify,
            Frame::VerifyResult { .. } => FrameKind::VerifyResult,
            Frame::Abort { .. } => FrameKind::Abort,
            Frame::Ack { .. } => FrameKind::Ack,
            Frame::VerifyPages { .. } => FrameKind::VerifyPages,
            Frame::VerifyPagesResult { .. } => FrameKind::VerifyPagesResult,
            Frame::Streams { .. } => FrameKind::Streams,
            Frame::Join { .. } => FrameKind::Join,
            Frame::StreamEnd { .. } => FrameKind::StreamEnd,
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
            Frame::HelloAck { session } => Frame::HelloAck { session },
            Frame::Commit => Frame::Commit,
            Frame::CommitAck => Frame::CommitAck,
            Frame::PassBegin { pass, pages } => Frame::PassBegin { pass, pages },
            Frame::Pages { gpa, count, data } => Frame::Pages {
                gpa,
                count,
                data: owned(data),
            },
            Frame::PassEnd { pass, pages_sent } => Frame::PassEnd { pass, pages_sent },
            Frame::PassCut { pass, pages_sent } => Frame::PassCut { pass, pages_sent },
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
                device_digest,
                mismatched_regions,
            } => Frame::VerifyResult {
                ok,
                digest,
                device_digest,
                mismatched_regions: owned(mismatched_regions),
            },
            Frame::Abort { reason } => Frame::Abort {
                reason: owned(reason),
            },
            Frame::Ack { pass } => Frame::Ack { pass },
            Frame::VerifyPages {
                region,
                first,
                hashes,
            } => Frame::VerifyPages {
                region,
                first,
                hashes: owned(hashes),
            },
            Frame::VerifyPagesResult {
                region,
                first,
                mismatched,
            } => Frame::VerifyPagesResult {
                region,
                first,
                mismatched,
            },
            Frame::Streams { count } => Frame::Streams { count },
            Frame::Join { session, stream } => Frame::Join { session, stream },
            Frame::StreamEnd { pass, pages } => Frame::StreamEnd { pass, pages },
        }
    }
}
