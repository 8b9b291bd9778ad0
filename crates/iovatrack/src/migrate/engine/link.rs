//! The source's TCP link: a rate cap, dead-link detection, and a connector that keeps
//! trying while a link is briefly down.

use super::channel::{Channel, Transport};
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The rate cap all of an attempt's streams share: bytes written over all of them since
/// the attempt began, against the cap.
pub(super) struct Pacer {
    cap: u64,
    started: Instant,
    bytes: AtomicU64,
}

impl Pacer {
    /// A cap of `cap` bytes per second (0: none).
    pub(super) fn new(cap: u64) -> Arc<Self> {
        Arc::new(Pacer {
            cap,
            started: Instant::now(),
            bytes: AtomicU64::new(0),
        })
    }

    fn pace(&self, n: usize) {
        let total = self.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if self.cap > 0 {
            let due = Duration::from_secs_f64(total as f64 / self.cap as f64);
            let el = self.started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
}

/// A writer that counts its bytes and keeps to the shared cap.
pub(super) struct Link<W> {
    pub(super) inner: W,
    pub(super) bytes: u64,
    pacer: Arc<Pacer>,
}

impl<W: Write> Link<W> {
    pub(super) fn new(inner: W, pacer: Arc<Pacer>) -> Self {
        Link {
            inner,
            bytes: 0,
            pacer,
        }
    }

    fn pace(&mut self, n: usize) {
        self.bytes += n as u64;
        self.pacer.pace(n);
    }
}

impl<W: Write> Write for Link<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.pace(n);
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.pace(n);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How long a connection may go without the peer acknowledging anything before it is
/// declared dead (TCP_USER_TIMEOUT, and keepalive probes for an idle reader).
const DEAD_LINK: Duration = Duration::from_secs(10);
/// Source socket write timeout: a backstop behind [`DEAD_LINK`].
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`connector`] keeps trying (a link that is briefly down, a receiver not yet
/// listening).
const CONNECT_WINDOW: Duration = Duration::from_secs(15);

/// Make a dead link fail the connection within [`DEAD_LINK`] on either side, without
/// read timeouts that would also fire on a peer that is alive but busy: unacknowledged
/// data times out (TCP_USER_TIMEOUT), and an idle reader probes its peer (keepalive every
/// second after 2 s idle, 8 probes).
pub(super) fn detect_dead_link(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: `fd` is a live socket owned by `stream` for this call; the option value
        // is a c_int on the stack whose size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let idle = 2;
    let count = 8;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
    set(
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        DEAD_LINK.as_millis() as libc::c_int,
    )
}

/// The source's socket options, before any byte (a TLS handshake included) crosses: no
/// Nagle delay, dead-link detection, and a write timeout behind it.
pub(super) fn prepare_source_socket(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    detect_dead_link(tcp)?;
    tcp.set_write_timeout(Some(WRITE_TIMEOUT))
}

/// Connect to `addr` over `transport`, for [`super::run_source`]: each call keeps trying,
/// with backoff, for up to 15 s, so a retry after a dropped link reconnects once the link
/// is back. Each failed try is logged as a warning (an operator watching a source that
/// waits for its destination sees why).
pub fn connector(
    addr: impl ToSocketAddrs,
    transport: Arc<dyn Transport>,
) -> io::Result<impl FnMut() -> io::Result<Box<dyn Channel>>> {
    let addrs: Vec<_> = addr.to_socket_addrs()?.collect();
    Ok(move || {
        let deadline = Instant::now() + CONNECT_WINDOW;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = left.clamp(Duration::from_millis(100), Duration::from_secs(5));
                match TcpStream::connect_timeout(a, wait) {
                    Ok(s) => {
                        prepare_source_socket(&s)?;
                        return transport.client(s);
                    }
                    Err(e) => last = io::Error::new(e.kind(), format!("{a}: {e}")),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            log::warn!(
                "connect {last}; trying again in {backoff:?} (giving up in {:.0?})",
                left
            );
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}
