//! The destination's surroundings under the fuzzer: an in-memory channel standing for the
//! peer, and devices that measure what the destination makes them hold.

use iovatrack::device::{DeviceError, EmulatedDevice, MigFlags, MigState};
use iovatrack::migrate::engine::{Channel, DestLimits};
use iovatrack::migrate::seams::{DeviceMigration, EmulatedMigration};
use iovatrack::plan::limits::DeviceLimits;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

/// How one session's connection behaves besides the bytes the peer sends.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    /// The destination's writes fail from its n-th frame on (0: the first): the peer
    /// closed or reset its side.
    pub fail_writes_from: Option<u32>,
    /// After the peer's bytes, reads fail with a reset instead of a clean end.
    pub reset_at_end: bool,
}

/// The peer as a [`Channel`]: reads come from the bytes it sends, writes go to `out`.
pub struct Peer {
    input: io::Cursor<Vec<u8>>,
    link: Link,
    /// Frames the destination tried to write.
    writes: u32,
    out: Arc<Mutex<Vec<u8>>>,
}

impl Peer {
    pub fn new(input: Vec<u8>, link: Link, out: Arc<Mutex<Vec<u8>>>) -> Self {
        Peer {
            input: io::Cursor::new(input),
            link,
            writes: 0,
            out,
        }
    }

    /// One write call is one frame: the frame writer hands a whole frame to one
    /// `write_vectored`, which takes all of it here.
    fn take(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.writes;
        self.writes += 1;
        if self.link.fail_writes_from.is_some_and(|k| n >= k) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut len = 0;
        for b in bufs {
            out.extend_from_slice(b);
            len += b.len();
        }
        Ok(len)
    }
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        if n == 0 && !buf.is_empty() && self.link.reset_at_end {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        Ok(n)
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.take(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.take(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Channel for Peer {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// What the destination made its devices hold.
#[derive(Debug, Default)]
pub struct Meter {
    /// Per device: in RESUMING (as far as the destination asked), and the bytes written
    /// since it entered it (what the device buffers).
    resuming: Vec<bool>,
    held: Vec<u64>,
    /// Device-state bytes written in the current session, all devices.
    pub session: u64,
}

/// An emulated device whose data writes are checked against the destination's limits
/// as they happen: holding more than [`DestLimits`] allow panics (a finding).
pub struct Metered {
    inner: EmulatedMigration,
    index: usize,
    meter: Arc<Mutex<Meter>>,
    limits: DestLimits,
}

impl Metered {
    pub fn new(
        name: &str,
        index: usize,
        meter: Arc<Mutex<Meter>>,
        limits: DestLimits,
    ) -> (Self, Arc<EmulatedDevice>) {
        let device = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).named(name));
        {
            let mut m = meter.lock().unwrap();
            m.resuming.resize(index + 1, false);
            m.held.resize(index + 1, 0);
        }
        let inner = EmulatedMigration::new(name, device.clone());
        (
            Metered {
                inner,
                index,
                meter,
                limits,
            },
            device,
        )
    }
}

impl DeviceMigration for Metered {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn flags(&self) -> Result<MigFlags, DeviceError> {
        self.inner.flags()
    }
    fn set_state(&mut self, state: MigState) -> Result<(), DeviceError> {
        let r = self.inner.set_state(state);
        let mut m = self.meter.lock().unwrap();
        let i = self.index;
        let now = state == MigState::Resuming && r.is_ok();
        if now && !m.resuming[i] {
            m.held[i] = 0;
        }
        m.resuming[i] = now;
        r
    }
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.inner.read_data(buf)
    }
    fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
        {
            let mut m = self.meter.lock().unwrap();
            let i = self.index;
            m.held[i] += buf.len() as u64;
            m.session += buf.len() as u64;
            assert!(
                m.held[i] <= self.limits.device_state_bytes,
                "device {i} holds {} bytes of state, over the limit of {}",
                m.held[i],
                self.limits.device_state_bytes
            );
            assert!(
                m.session <= self.limits.session_state_bytes,
                "devices received {} bytes of state this session, over the limit of {}",
                m.session,
                self.limits.session_state_bytes
            );
        }
        self.inner.write_data(buf)
    }
    fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError> {
        self.inner.precopy_info()
    }
}
