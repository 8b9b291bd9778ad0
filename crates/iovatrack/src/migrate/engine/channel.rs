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
