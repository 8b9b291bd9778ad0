//! What the engine talks over: a [`Channel`] (a connected byte stream: TCP, TLS over TCP,
//! or whatever transport a VMM brings), and a [`Transport`] that turns a raw TCP
//! connection into one on each side (plain, or a handshake that authenticates the peer).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};

/// A connected, ordered, reliable byte stream to the peer.
pub trait Channel: Read + Write + Send {
    /// The TCP socket under the channel, if there is one: the engine sets its timeouts
    /// and dead-link detection, and shuts it down to end a connection at once.
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Channel for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl From<TcpStream> for Box<dyn Channel> {
    fn from(s: TcpStream) -> Self {
        Box::new(s)
    }
}

/// How a TCP connection becomes a [`Channel`] on each side.
pub trait Transport: Send + Sync {
    /// The source's side, on a socket connected to the destination.
    fn client(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>>;
    /// The destination's side, on an accepted socket. An error refuses the peer (it is
    /// counted and logged, and the destination keeps waiting for its source).
    fn server(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>>;
    /// A name for logs and reports (`tcp`, `tls`).
    fn name(&self) -> &'static str;
}

impl std::fmt::Debug for dyn Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transport({})", self.name())
    }
}

/// Plain TCP: anyone who can connect is taken at their word.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainTcp;

impl Transport for PlainTcp {
    fn client(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(tcp))
    }
    fn server(&self, tcp: TcpStream) -> io::Result<Box<dyn Channel>> {
        Ok(Box::new(tcp))
    }
    fn name(&self) -> &'static str {
        "tcp"
    }
}

/// Bytes [`Sniff`] keeps: a frame's magic, or a TLS record's header.
const SNIFF: usize = 5;

/// A reader that keeps the first bytes read through it, so that when they fail to parse
/// one can tell what the peer spoke instead: a TLS record where a frame was due (a plain
/// source at a TLS receiver), or an iovatrack frame where TLS was due (the reverse). The
/// bytes themselves go on to the parser untouched.
pub(crate) struct Sniff<R> {
    inner: R,
    head: [u8; SNIFF],
    len: usize,
}

impl<R> Sniff<R> {
    pub(crate) fn new(inner: R) -> Self {
        Sniff {
            inner,
            head: [0; SNIFF],
            len: 0,
        }
    }

    /// The first bytes read so far (up to five).
    pub(crate) fn head(&self) -> &[u8] {
        &self.head[..self.len]
    }

    pub(crate) fn get_ref(&self) -> &R {
        &self.inner
    }

    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Sniff<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let keep = n.min(SNIFF - self.len);
        self.head[self.len..self.len + keep].copy_from_slice(&buf[..keep]);
        self.len += keep;
        Ok(n)
    }
}

/// Whether `head` begins as a TLS handshake (ClientHello, ServerHello) or alert record
/// does: content type 22 or 21, then major version 3 (every TLS version's record layer).
/// iovatrack's frames begin with `IOVT`, so neither is ever a frame's first byte.
pub(crate) fn looks_like_tls(head: &[u8]) -> bool {
    matches!(head, [0x15 | 0x16, 0x03, ..])
}

/// Whether `head` begins as an iovatrack frame does (its magic), i.e. the peer speaks the
/// protocol in the clear.
pub(crate) fn looks_like_frame(head: &[u8]) -> bool {
    head.starts_with(&crate::migrate::wire::MAGIC)
}

/// One channel shared by a frame reader and a frame writer used on one thread: a TLS
/// session cannot be split into independent halves as a TCP socket can. The lock is
/// uncontended (taken once per buffered read or write of up to 1 MiB).
#[derive(Clone)]
pub(crate) struct Duplex(Arc<Mutex<Box<dyn Channel>>>);

impl Duplex {
    pub(crate) fn new(ch: Box<dyn Channel>) -> Self {
        Duplex(Arc::new(Mutex::new(ch)))
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Box<dyn Channel>>> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("channel lock poisoned by a panic"))
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.lock()?.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.lock()?.write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.lock()?.write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.lock()?.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_keeps_the_first_bytes_and_passes_all_on() {
        let data = b"\x15\x03\x03\x00\x02\x02\x32".to_vec();
        let mut r = Sniff::new(io::Cursor::new(data.clone()));
        let mut got = Vec::new();
        let mut one = [0u8; 3];
        // Reads of any size: the head is the stream's start, not the last read's.
        loop {
            let n = r.read(&mut one).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&one[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(r.head(), &data[..5]);
        assert!(looks_like_tls(r.head()));
        assert!(!looks_like_frame(r.head()));
    }

    #[test]
    fn tls_records_and_frames_are_told_apart() {
        // A ClientHello record (TLS 1.0 record version, as TLS 1.3 clients send).
        assert!(looks_like_tls(&[0x16, 0x03, 0x01, 0x01, 0x20]));
        // An alert (what a TLS receiver answers a plain Hello with).
        assert!(looks_like_tls(&[0x15, 0x03, 0x03]));
        assert!(looks_like_frame(b"IOVT\x03"));
        // Negative controls: a frame, garbage, too little to tell.
        assert!(!looks_like_tls(b"IOVT\x03"));
        assert!(!looks_like_tls(&[0x16, 0x01]));
        assert!(!looks_like_tls(&[0x16]));
        assert!(!looks_like_frame(b"IOV"));
        assert!(!looks_like_frame(&[0x16, 0x03, 0x01, 0x01, 0x20]));
    }
}
