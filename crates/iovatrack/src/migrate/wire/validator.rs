//! The destination's side: its memory layout and its check of the source's frame stream.

use super::error::{LayoutDiff, LayoutProblem, WireError};
use super::frame::Frame;
use super::header::PROTOCOL_VERSION;
use crate::range::{is_pow2, IovaRange};
use std::borrow::Cow;

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
    /// After Verify; only Commit, VerifyPages (after a verdict that found regions
    /// different) or Abort may come.
    Verified,
    /// After a VerifyPages; only more VerifyPages (or Abort) may come: no Commit follows
    /// a verdict that found differences.
    Narrowing,
    /// After Commit; nothing may come.
    Committed,
    /// After Abort; nothing may come.
    Aborted,
    /// An extra channel before its Join: only Join may come.
    AwaitJoin,
    /// An extra channel past its Join: Pages, StreamEnd, or Abort.
    Joined,
}

/// The destination's check of the source's frame stream, in order: Hello first and matching
/// our layout; passes numbered 0, 1, 2, …; Pages only inside a pass, each run valid
/// ([`MemoryLayout::locate`]); a pass's announced, received and reported page counts equal;
/// device and vCPU state between passes; Complete's total equal to all pages received; then
/// only Verify, then Commit or runs of VerifyPages inside one region each. Abort is accepted
/// anywhere and ends the stream. Frames only the destination sends (HelloAck, Ack,
/// VerifyResult, VerifyPagesResult) are rejected, and so are those of extra channels (Join,
/// StreamEnd). Which regions the VerifyPages runs must cover is the destination's verdict,
/// checked by the destination itself.
///
/// With several streams (a Streams frame before pass 0), the pages other channels carried
/// in a pass are added with [`Validator::add_stream_pages`] before its PassEnd is
/// validated: the counts then cover every stream.
#[derive(Clone, Debug)]
pub struct Validator {
    layout: MemoryLayout,
    state: StreamState,
    next_pass: u32,
    announced: u64,
    received: u64,
    total_received: u64,
    streams: Option<u32>,
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
            streams: None,
        }
    }

    /// Channels carrying pages in this session (1 unless a Streams frame said more).
    pub fn streams(&self) -> u32 {
        self.streams.unwrap_or(1)
    }

    /// The pass in progress (inside a pass) or due next (between passes).
    pub fn pass(&self) -> u32 {
        self.next_pass
    }

    /// Adds `pages` that another stream carried in pass `pass` (from its StreamEnd) to the
    /// pass's count. Only inside that pass, and never past what its PassBegin announced.
    pub fn add_stream_pages(&mut self, pass: u32, pages: u64) -> Result<(), WireError> {
        if self.state != StreamState::InPass {
            return Err(WireError::UnexpectedFrame {
                frame: super::FrameKind::StreamEnd,
                state: self.state,
            });
        }
        if pass != self.next_pass {
            return Err(WireError::PassOrder {
                expected: self.next_pass,
                got: pass,
            });
        }
        let received = self.received.saturating_add(pages);
        if received > self.announced {
            return Err(WireError::PassCount {
                pass,
                announced: self.announced,
                received,
                reported: received,
            });
        }
        self.received = received;
        Ok(())
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
            // Once, before the first pass: a stream count fixed for the whole session.
            (Idle, Frame::Streams { count }) if self.next_pass == 0 && self.streams.is_none() => {
                if *count == 0 {
                    return Err(WireError::StreamCount { count: *count });
                }
                self.streams = Some(*count);
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
            (
                InPass,
                f @ (Frame::PassEnd { pass, pages_sent } | Frame::PassCut { pass, pages_sent }),
            ) => {
                if *pass != self.next_pass {
                    return Err(WireError::PassOrder {
                        expected: self.next_pass,
                        got: *pass,
                    });
                }
                // A cut pass ends early, but still says exactly what it sent.
                let whole = matches!(f, Frame::PassEnd { .. });
                if *pages_sent != self.received || (whole && self.announced != self.received) {
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
            (
                Verified | Narrowing,
                Frame::VerifyPages {
                    region,
                    first,
                    hashes,
                },
            ) => {
                let n = hashes.len() as u64;
                let pages = self
                    .layout
                    .regions
                    .get(*region as usize)
                    .map(|r| r.length / self.layout.page_size);
                let inside = pages
                    .is_some_and(|p| n > 0 && first.checked_add(n).is_some_and(|end| end <= p));
                if !inside {
                    return Err(WireError::VerifyPagesOutside {
                        region: *region,
                        first: *first,
                        count: n,
                    });
                }
                self.state = Narrowing;
            }
            (state, _) => return unexpected(state),
        }
        Ok(None)
    }
}

/// What a frame on an extra channel amounts to, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStep {
    /// Pages to write there.
    Pages(PagesTarget),
    /// The stream's share of pass `pass` is complete: `pages` pages.
    PassDone {
        /// Pass number.
        pass: u32,
        /// Pages the stream carried in it.
        pages: u64,
    },
    /// The source gave up on this stream.
    Aborted,
}

/// The destination's check of one extra channel of a session: a Join naming the
/// destination's session id and a stream index below the session's stream count, then for
/// each pass in order its Pages and a StreamEnd that counts them, or Abort. A stream's
/// share of one pass never exceeds the guest's page count (a page goes to one stream once
/// per pass). Whether the shares add up to the pass is checked on the main channel
/// ([`Validator::add_stream_pages`]).
#[derive(Clone, Debug)]
pub struct StreamValidator {
    layout: MemoryLayout,
    stream: u32,
    pass: u32,
    received: u64,
    aborted: bool,
}

impl StreamValidator {
    /// Checks an extra channel's first frame: a Join for memory session `session` of a
    /// session with `streams` streams, as stream 1 ..< `streams`.
    pub fn join(
        layout: MemoryLayout,
        first: &Frame<'_>,
        session: u64,
        streams: u32,
    ) -> Result<Self, WireError> {
        let Frame::Join {
            session: theirs,
            stream,
        } = first
        else {
            return Err(WireError::UnexpectedFrame {
                frame: first.kind(),
                state: StreamState::AwaitJoin,
            });
        };
        if *theirs != session {
            return Err(WireError::WrongSession {
                ours: session,
                theirs: *theirs,
            });
        }
        if *stream == 0 || *stream >= streams {
            return Err(WireError::StreamIndex {
                stream: *stream,
                streams,
            });
        }
        Ok(Self {
            layout,
            stream: *stream,
            pass: 0,
            received: 0,
            aborted: false,
        })
    }

    /// The stream's index.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// The pass whose share this stream carries now.
    pub fn pass(&self) -> u32 {
        self.pass
    }

    /// Checks the next frame on this stream. After an error the stream should be dropped.
    pub fn validate(&mut self, frame: &Frame<'_>) -> Result<StreamStep, WireError> {
        let unexpected = |state| WireError::UnexpectedFrame {
            frame: frame.kind(),
            state,
        };
        if self.aborted {
            return Err(unexpected(StreamState::Aborted));
        }
        match frame {
            Frame::Pages { gpa, count, data } => {
                let target = self.layout.locate(*gpa, *count, data.len())?;
                let received = self.received.saturating_add(u64::from(*count));
                if received > self.layout.total_pages() {
                    return Err(WireError::PassCount {
                        pass: self.pass,
                        announced: self.layout.total_pages(),
                        received,
                        reported: received,
                    });
                }
                self.received = received;
                Ok(StreamStep::Pages(target))
            }
            Frame::StreamEnd { pass, pages } => {
                if *pass != self.pass {
                    return Err(WireError::PassOrder {
                        expected: self.pass,
                        got: *pass,
                    });
                }
                if *pages != self.received {
                    return Err(WireError::StreamPages {
                        stream: self.stream,
                        pass: *pass,
                        received: self.received,
                        reported: *pages,
                    });
                }
                self.pass = self.pass.wrapping_add(1);
                self.received = 0;
                Ok(StreamStep::PassDone {
                    pass: *pass,
                    pages: *pages,
                })
            }
            Frame::Abort { .. } => {
                self.aborted = true;
                Ok(StreamStep::Aborted)
            }
            _ => Err(unexpected(StreamState::Joined)),
        }
    }
}
