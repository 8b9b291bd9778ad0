//! [`FrameWriter`]: whole frames onto a byte stream.

use super::body::PagesPrefix;
use super::codec::encode_parts;
use super::crc::Crc;
use super::error::WireError;
use super::frame::{Frame, FrameKind};
use super::header::{FrameHeader, Limits, HEADER_LEN, PAGES_PREFIX_LEN, TRAILER_LEN};
use std::borrow::Cow;
use std::io::{self, IoSlice, Write};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

/// Writes whole frames to a byte stream, numbering them from 0.
///
/// Unbuffered ([`FrameWriter::new`]): each frame goes to the stream in one vectored write,
/// bulk data (page runs, state blobs) straight from the caller's slice; only the small
/// fields pass through a reused scratch buffer, so a warmed-up writer does not allocate.
///
/// Buffered ([`FrameWriter::buffered`]): frames gather in a reused send buffer, written in
/// one call once it holds a batch, or at [`FrameWriter::flush`]. [`FrameWriter::write_pages_with`]
/// builds a Pages frame in place there: the caller copies the pages straight into the
/// frame, so page data is copied once before the socket's own copy, however small the
/// frames, and many small frames cost one system call.
///
/// Call [`FrameWriter::flush`] when the peer must see what was written (dropping a
/// buffered writer loses what it holds).
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    pub(super) scratch: Vec<u8>,
    /// The send buffer of a buffered writer: frames in `out[..used]`, the rest reused
    /// space (never shrunk, so building a frame in it writes no byte twice).
    pub(super) out: Vec<u8>,
    used: usize,
    /// Write the send buffer once it holds this many bytes (0: unbuffered).
    batch: usize,
    seq: u64,
    limits: Limits,
}

impl<W: Write> FrameWriter<W> {
    /// An unbuffered writer with the default [`Limits`].
    pub fn new(inner: W) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    /// An unbuffered writer that refuses frames over `limits`.
    pub fn with_limits(inner: W, limits: Limits) -> Self {
        Self {
            inner,
            scratch: Vec::with_capacity(256),
            out: Vec::new(),
            used: 0,
            batch: 0,
            seq: 0,
            limits,
        }
    }

    /// A buffered writer (default [`Limits`]) that writes its frames once they add up to
    /// `batch` bytes (at least 1), or at [`FrameWriter::flush`].
    pub fn buffered(inner: W, batch: usize) -> Self {
        Self {
            batch: batch.max(1),
            ..Self::new(inner)
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
        let len = self.check_len(len)?;
        let header = FrameHeader::new(frame.kind(), len, self.seq);
        self.scratch[..HEADER_LEN].copy_from_slice(header.as_bytes());
        let mut crc = Crc::new();
        crc.update(&self.scratch);
        crc.update(bulk);
        let trailer = crc.finish().to_le_bytes();
        if self.batch > 0 && bulk.len() < self.batch {
            // Small enough to gather: one copy into the send buffer.
            let at = self.reserve(self.scratch.len() + bulk.len() + TRAILER_LEN);
            let parts: [&[u8]; 3] = [&self.scratch, bulk, &trailer];
            let mut end = at;
            for p in parts {
                self.out[end..end + p.len()].copy_from_slice(p);
                end += p.len();
            }
            self.commit(end - at)?;
        } else {
            // Unbuffered, or a blob as large as a batch: what is gathered goes first,
            // then the frame straight from the caller's slice.
            self.write_out()?;
            write_all_vectored(
                &mut self.inner,
                &mut [
                    IoSlice::new(&self.scratch),
                    IoSlice::new(bulk),
                    IoSlice::new(&trailer),
                ],
            )?;
        }
        Ok(self.advance())
    }

    /// Writes a [`Frame::Pages`] straight from `data` (unbuffered: no copy, no allocation).
    pub fn write_pages(&mut self, gpa: u64, count: u32, data: &[u8]) -> Result<u64, WireError> {
        self.write_frame(&Frame::Pages {
            gpa,
            count,
            data: Cow::Borrowed(data),
        })
    }

    /// Writes a [`Frame::Pages`] of `count` pages at `gpa` whose `len` data bytes `fill`
    /// puts straight into the frame's place in the send buffer (the only copy of the pages
    /// before the socket's); the CRC is computed after `fill` returns, over what it wrote.
    /// If `fill` fails, no frame is written and its error is returned. An unbuffered
    /// writer builds the frame the same way and writes it at once.
    pub fn write_pages_with<E: From<WireError>>(
        &mut self,
        gpa: u64,
        count: u32,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let payload = self.check_len(PAGES_PREFIX_LEN as u64 + len as u64)?;
        let total = HEADER_LEN + payload as usize + TRAILER_LEN;
        let at = self.reserve(total);
        let frame = &mut self.out[at..at + total];
        let (head, rest) = frame.split_at_mut(HEADER_LEN + PAGES_PREFIX_LEN);
        let (data, trailer) = rest.split_at_mut(len);
        fill(data)?;
        let header = FrameHeader::new(FrameKind::Pages, payload, self.seq);
        let prefix = PagesPrefix {
            gpa: U64::new(gpa),
            count: U32::new(count),
        };
        head[..HEADER_LEN].copy_from_slice(header.as_bytes());
        head[HEADER_LEN..].copy_from_slice(prefix.as_bytes());
        let mut crc = Crc::new();
        crc.update(head);
        crc.update(data);
        trailer.copy_from_slice(&crc.finish().to_le_bytes());
        self.commit(total)?;
        Ok(self.advance())
    }

    /// Writes what is buffered and flushes the underlying stream.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.write_out()?;
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

    /// Gives the underlying stream back (what a buffered writer holds is lost: flush
    /// first).
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// The payload length as the header's u32, within the limits.
    fn check_len(&self, len: u64) -> Result<u32, WireError> {
        if len > self.limits.max_payload as u64 {
            return Err(WireError::FrameTooLarge {
                len,
                max: self.limits.max_payload,
            });
        }
        // Lossless: len ≤ max_payload, a u32.
        Ok(len as u32)
    }

    /// Room for a `n`-byte frame at the end of the send buffer; returns where it starts.
    /// The buffer only grows (zeroed once), so reused space is overwritten, never cleared.
    fn reserve(&mut self, n: usize) -> usize {
        if self.used + n > self.out.len() {
            self.out.resize(self.used + n, 0);
        }
        self.used
    }

    /// Takes the `n` bytes just built into the send buffer; writes them out at once when
    /// unbuffered, or when a batch is full.
    fn commit(&mut self, n: usize) -> Result<(), WireError> {
        self.used += n;
        if self.used >= self.batch {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes the send buffer's frames to the stream.
    fn write_out(&mut self) -> Result<(), WireError> {
        if self.used > 0 {
            let n = std::mem::take(&mut self.used);
            self.inner.write_all(&self.out[..n])?;
        }
        Ok(())
    }

    /// The frame is written: its number, and the next.
    fn advance(&mut self) -> u64 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        seq
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
