//! Accepting connections: the listener, the accepted socket's options and the
//! transport's handshake, for a session's main channel and for its extra streams alike.

use super::{DestLimits, Refusal};
use crate::migrate::engine::channel::{Channel, Transport};
use crate::migrate::engine::link::detect_dead_link;
use crate::migrate::engine::MigrateError;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// A connection as accepted: the peer's address, and the channel the transport opened
/// (or why its handshake refused the peer).
pub(super) type Opened = (String, Result<Box<dyn Channel>, Refusal>);

/// Where a session's extra streams come from.
pub(super) trait Incoming {
    /// The next connection, opened, by `deadline`; `None` past it (or when no more can
    /// come).
    fn next(&mut self, deadline: Instant) -> Result<Option<Opened>, MigrateError>;
    /// Whether more connections can come at all.
    fn accepts(&self) -> bool {
        true
    }
}

/// No way to accept more: a session on a channel the VMM opened itself takes one stream.
pub(super) struct NoIncoming;

impl Incoming for NoIncoming {
    fn next(&mut self, _deadline: Instant) -> Result<Option<Opened>, MigrateError> {
        Ok(None)
    }
    fn accepts(&self) -> bool {
        false
    }
}

/// Connections from a listener, each opened through the transport.
pub(super) struct Acceptor<'a> {
    pub(super) listener: &'a TcpListener,
    pub(super) transport: &'a dyn Transport,
    pub(super) limits: DestLimits,
    pub(super) give_up: &'a AtomicBool,
}

impl Acceptor<'_> {
    /// The next accepted socket by `deadline` (`None` past it).
    pub(super) fn accept(
        &self,
        deadline: Instant,
    ) -> Result<Option<(TcpStream, SocketAddr)>, MigrateError> {
        loop {
            match self.listener.accept() {
                Ok((tcp, peer)) => {
                    tcp.set_nonblocking(false)?;
                    return Ok(Some((tcp, peer)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.give_up.load(SeqCst) => {
                    return Err(MigrateError::Destination(
                        "the source gave up before connecting".into(),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                // A connection reset while in the backlog, and the like: the next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// An accepted socket's options (a peer that sends nothing is bounded by the Hello
    /// timeout; a dead link ends the session within the dead-link time), then the
    /// transport's handshake.
    pub(super) fn open(&self, tcp: TcpStream) -> Result<Box<dyn Channel>, Refusal> {
        let setup = || -> io::Result<()> {
            tcp.set_read_timeout(Some(self.limits.hello_timeout))?;
            tcp.set_write_timeout(Some(self.limits.hello_timeout))?;
            tcp.set_nodelay(true)?;
            detect_dead_link(&tcp)
        };
        let handshake = |error| Refusal::Handshake {
            transport: self.transport.name(),
            error,
        };
        setup().map_err(handshake)?;
        self.transport.server(tcp).map_err(handshake)
    }
}

impl Incoming for Acceptor<'_> {
    fn next(&mut self, deadline: Instant) -> Result<Option<Opened>, MigrateError> {
        Ok(self
            .accept(deadline)?
            .map(|(tcp, peer)| (peer.to_string(), self.open(tcp))))
    }
}
