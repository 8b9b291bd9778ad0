//! Frame payload encoding and decoding, header parsing and whole-stream decoding.

use super::crc::Crc;
use super::error::{malformed, Malformation, WireError};
use super::frame::{Frame, FrameKind, OwnedFrame};
use super::header::{Limits, HEADER_LEN, MAGIC, PROTOCOL_VERSION, TRAILER_LEN};
use crate::range::IovaRange;
use std::borrow::Cow;

pub(super) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(super) fn put_u64(out: &mut Vec<u8>, v: u64) {
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
pub(super) struct Header {
    pub(super) ty: u16,
    pub(super) len: u32,
    pub(super) seq: u64,
}

pub(super) fn parse_header(h: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header, WireError> {
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
