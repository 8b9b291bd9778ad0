//! [`FrameWriter`]: whole frames onto a byte stream.

use super::codec::encode_parts;
use super::crc::Crc;
use super::error::WireError;
use super::frame::Frame;
use super::header::{FrameHeader, Limits, HEADER_LEN};
use std::borrow::Cow;
use std::io::{self, IoSlice, Write};
use zerocopy::IntoBytes;

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
    pub(super) scratch: Vec<u8>,
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
        // Room for the header, written once the payload length is known.
        self.scratch.resize(HEADER_LEN, 0);
        let bulk = encode_parts(frame, &mut self.scratch)?;
        let len = (self.scratch.len() - HEADER_LEN) as u64 + bulk.len() as u64;
        if len > self.limits.max_payload as u64 {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.limits.max_payload,
            });
        }
        // Lossless: len ≤ max_payload, a u32.
        let header = FrameHeader::new(frame.kind(), len as u32, self.seq);
        self.scratch[..HEADER_LEN].copy_from_slice(header.as_bytes());
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
