//! Frame payload encoding and decoding, and whole-stream decoding.
//!
//! Fixed parts are the `zerocopy` layouts of [`super::body`]; variable parts (strings,
//! counted lists, bulk bytes) go through the shared [`le`] cursor, whose short
//! reads become [`Malformation::Short`] for the frame at hand.

use super::body::{CompleteBody, HelloPrefix, JoinBody, PagesPrefix, PassBody, RegionEntry};
use super::crc::Crc;
use super::error::{malformed, Malformation, WireError};
use super::frame::{Frame, FrameKind, OwnedFrame};
use super::header::{parse_header, Header, Limits, HEADER_LEN, TRAILER_LEN};
use super::le::{self, PutLe};
use crate::range::IovaRange;
use std::borrow::Cow;
use std::mem::size_of;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

fn put_str16(out: &mut Vec<u8>, kind: FrameKind, s: &str) -> Result<(), WireError> {
    let len = u16::try_from(s.len()).map_err(|_| malformed(kind, Malformation::FieldTooLong))?;
    out.put_u16(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}
fn put_count(out: &mut Vec<u8>, kind: FrameKind, n: usize) -> Result<(), WireError> {
    let n = u32::try_from(n).map_err(|_| malformed(kind, Malformation::FieldTooLong))?;
    out.put_u32(n);
    Ok(())
}

fn pass_body(pass: u32, pages: u64) -> PassBody {
    PassBody {
        pass: U32::new(pass),
        pages: U64::new(pages),
    }
}

/// Appends the frame's small fields to `out` and returns its bulk bytes (page data, state
/// blobs), which go on the wire right after `out` without being copied.
pub(super) fn encode_parts<'f>(
    frame: &'f Frame<'_>,
    out: &mut Vec<u8>,
) -> Result<&'f [u8], WireError> {
    let kind = frame.kind();
    Ok(match frame {
        Frame::Hello {
            version,
            guest_kind,
            page_size,
            regions,
            total_pages,
        } => {
            out.put(&HelloPrefix {
                version: (*version).into(),
                page_size: U64::new(*page_size),
                total_pages: U64::new(*total_pages),
            });
            put_str16(out, kind, guest_kind)?;
            put_count(out, kind, regions.len())?;
            for r in regions.iter() {
                out.put(&RegionEntry {
                    iova: U64::new(r.iova),
                    length: U64::new(r.length),
                });
            }
            &[]
        }
        Frame::HelloAck { session } => {
            out.put_u64(*session);
            &[]
        }
        Frame::Commit | Frame::CommitAck => &[],
        Frame::PassBegin { pass, pages } => {
            out.put(&pass_body(*pass, *pages));
            &[]
        }
        Frame::Pages { gpa, count, data } => {
            out.put(&PagesPrefix {
                gpa: U64::new(*gpa),
                count: U32::new(*count),
            });
            data
        }
        Frame::PassEnd { pass, pages_sent } | Frame::PassCut { pass, pages_sent } => {
            out.put(&pass_body(*pass, *pages_sent));
            &[]
        }
        Frame::DeviceState { name, bytes } => {
            put_str16(out, kind, name)?;
            bytes
        }
        Frame::VcpuState { index, bytes } => {
            out.put_u32(*index);
            bytes
        }
        Frame::Complete {
            total_pages,
            digest,
        } => {
            out.put(&CompleteBody {
                total_pages: U64::new(*total_pages),
                digest: U64::new(*digest),
            });
            &[]
        }
        Frame::Verify {
            digest,
            region_hashes,
        } => {
            out.put_u64(*digest);
            put_count(out, kind, region_hashes.len())?;
            for h in region_hashes.iter() {
                out.put_u64(*h);
            }
            &[]
        }
        Frame::VerifyResult {
            ok,
            digest,
            device_digest,
            mismatched_regions,
        } => {
            out.put_u8(u8::from(*ok));
            out.put_u64(*digest);
            out.put_u64(*device_digest);
            put_count(out, kind, mismatched_regions.len())?;
            for i in mismatched_regions.iter() {
                out.put_u32(*i);
            }
            &[]
        }
        Frame::Abort { reason } => reason.as_bytes(),
        Frame::Ack { pass } => {
            out.put_u32(*pass);
            &[]
        }
        Frame::VerifyPages {
            region,
            first,
            hashes,
        } => {
            out.put_u32(*region);
            out.put_u64(*first);
            put_count(out, kind, hashes.len())?;
            for h in hashes.iter() {
                out.put_u64(*h);
            }
            &[]
        }
        Frame::VerifyPagesResult {
            region,
            first,
            mismatched,
        } => {
            out.put_u32(*region);
            out.put_u64(*first);
            out.put_u64(*mismatched);
            &[]
        }
        Frame::Streams { count } => {
            out.put_u32(*count);
            &[]
        }
        Frame::Join { session, stream } => {
            out.put(&JoinBody {
                session: U64::new(*session),
                stream: U32::new(*stream),
            });
            &[]
        }
        Frame::StreamEnd { pass, pages } => {
            out.put(&pass_body(*pass, *pages));
            &[]
        }
    })
}

/// The shared little-endian cursor, reporting its errors as malformations of one frame kind.
struct Cursor<'a> {
    c: le::Cursor<'a>,
    kind: FrameKind,
}

impl<'a> Cursor<'a> {
    fn short(&self) -> impl Fn(le::Short) -> WireError {
        let kind = self.kind;
        move |_| malformed(kind, Malformation::Short)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.c.take(n).map_err(self.short())
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.c.u8().map_err(self.short())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.c.u16().map_err(self.short())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.c.u32().map_err(self.short())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.c.u64().map_err(self.short())
    }
    fn read<T: FromBytes + Unaligned>(&mut self) -> Result<T, WireError> {
        self.c.read().map_err(self.short())
    }
    fn str_of(&self, b: &'a [u8]) -> Result<&'a str, WireError> {
        std::str::from_utf8(b).map_err(|_| malformed(self.kind, Malformation::InvalidUtf8))
    }
    fn str16(&mut self) -> Result<&'a str, WireError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        self.str_of(b)
    }
    /// A u32 count of `T` items that must fill the rest of the payload exactly; the count is
    /// checked against the bytes present before anything is allocated.
    fn list<T>(&mut self) -> Result<&'a [T], WireError>
    where
        T: FromBytes + KnownLayout + Immutable + Unaligned,
    {
        let n = self.u32()? as u64;
        if n.checked_mul(size_of::<T>() as u64) != Some(self.c.remaining() as u64) {
            return Err(malformed(self.kind, Malformation::CountMismatch));
        }
        // The count fits the bytes present, so it fits a usize too.
        self.c.slice(n as usize).map_err(self.short())
    }
    fn rest(&mut self) -> &'a [u8] {
        self.c.rest()
    }
    fn end(&self) -> Result<(), WireError> {
        if self.c.remaining() == 0 {
            Ok(())
        } else {
            Err(malformed(self.kind, Malformation::Trailing))
        }
    }
}

fn decode_payload(kind: FrameKind, payload: &[u8]) -> Result<Frame<'_>, WireError> {
    let mut c = Cursor {
        c: le::Cursor::new(payload),
        kind,
    };
    let frame = match kind {
        FrameKind::Hello => {
            let fixed: HelloPrefix = c.read()?;
            let guest_kind = c.str16()?;
            let regions = c
                .list::<RegionEntry>()?
                .iter()
                .map(|r| IovaRange {
                    iova: r.iova.get(),
                    length: r.length.get(),
                })
                .collect();
            Frame::Hello {
                version: fixed.version.get(),
                guest_kind: Cow::Borrowed(guest_kind),
                page_size: fixed.page_size.get(),
                regions: Cow::Owned(regions),
                total_pages: fixed.total_pages.get(),
            }
        }
        FrameKind::HelloAck => Frame::HelloAck { session: c.u64()? },
        FrameKind::Commit => Frame::Commit,
        FrameKind::CommitAck => Frame::CommitAck,
        FrameKind::PassBegin => {
            let b: PassBody = c.read()?;
            Frame::PassBegin {
                pass: b.pass.get(),
                pages: b.pages.get(),
            }
        }
        FrameKind::Pages => {
            let p: PagesPrefix = c.read()?;
            Frame::Pages {
                gpa: p.gpa.get(),
                count: p.count.get(),
                data: Cow::Borrowed(c.rest()),
            }
        }
        FrameKind::PassEnd => {
            let b: PassBody = c.read()?;
            Frame::PassEnd {
                pass: b.pass.get(),
                pages_sent: b.pages.get(),
            }
        }
        FrameKind::PassCut => {
            let b: PassBody = c.read()?;
            Frame::PassCut {
                pass: b.pass.get(),
                pages_sent: b.pages.get(),
            }
        }
        FrameKind::DeviceState => Frame::DeviceState {
            name: Cow::Borrowed(c.str16()?),
            bytes: Cow::Borrowed(c.rest()),
        },
        FrameKind::VcpuState => Frame::VcpuState {
            index: c.u32()?,
            bytes: Cow::Borrowed(c.rest()),
        },
        FrameKind::Complete => {
            let b: CompleteBody = c.read()?;
            Frame::Complete {
                total_pages: b.total_pages.get(),
                digest: b.digest.get(),
            }
        }
        FrameKind::Verify => {
            let digest = c.u64()?;
            let hashes = c.list::<U64>()?;
            Frame::Verify {
                digest,
                region_hashes: Cow::Owned(hashes.iter().map(|h| h.get()).collect()),
            }
        }
        FrameKind::VerifyResult => {
            let ok = match c.u8()? {
                0 => false,
                1 => true,
                _ => return Err(malformed(kind, Malformation::BadBool)),
            };
            let digest = c.u64()?;
            let device_digest = c.u64()?;
            let mismatched = c.list::<U32>()?;
            Frame::VerifyResult {
                ok,
                digest,
                device_digest,
                mismatched_regions: Cow::Owned(mismatched.iter().map(|i| i.get()).collect()),
            }
        }
        FrameKind::Abort => {
            let rest = c.rest();
            Frame::Abort {
                reason: Cow::Borrowed(c.str_of(rest)?),
            }
        }
        FrameKind::Ack => Frame::Ack { pass: c.u32()? },
        FrameKind::VerifyPages => {
            let region = c.u32()?;
            let first = c.u64()?;
            let hashes = c.list::<U64>()?;
            Frame::VerifyPages {
                region,
                first,
                hashes: Cow::Owned(hashes.iter().map(|h| h.get()).collect()),
            }
        }
        FrameKind::VerifyPagesResult => Frame::VerifyPagesResult {
            region: c.u32()?,
            first: c.u64()?,
            mismatched: c.u64()?,
        },
        FrameKind::Streams => Frame::Streams { count: c.u32()? },
        FrameKind::Join => {
            let b: JoinBody = c.read()?;
            Frame::Join {
                session: b.session.get(),
                stream: b.stream.get(),
            }
        }
        FrameKind::StreamEnd => {
            let b: PassBody = c.read()?;
            Frame::StreamEnd {
                pass: b.pass.get(),
                pages: b.pages.get(),
            }
        }
    };
    c.end()?;
    Ok(frame)
}

/// Checks checksum, then sequence, then type, then parses: corruption anywhere in a frame
/// reports as a checksum error rather than as whatever the corrupt field happens to say.
pub(super) fn finish_frame<'p>(
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
