//! [`FrameReader`]: whole frames off a byte stream.

use super::codec::finish_frame;
use super::error::WireError;
use super::frame::Frame;
use super::header::{parse_header, Limits, HEADER_LEN, TRAILER_LEN};
use std::io::{self, Read};

/// Reads whole frames from a byte stream, checking magic, version, length bound, checksum,
/// sequence and payload structure. The payload buffer is reused and grows only as bytes
/// actually arrive, so a hostile length costs no more memory than the bytes sent.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
    pub(super) buf: Vec<u8>,
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
