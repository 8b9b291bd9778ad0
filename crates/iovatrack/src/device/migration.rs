//! VFIO migration v2 state machine (`vfio_mig_get_next_state`, drivers/vfio/vfio_main.c)
//! and a device-state stream for the emulated device.
//!
//! The device moves between states only along the arcs its migration flags allow; a request
//! for a distant state is walked one arc at a time, each next arc taken from the kernel's
//! `TABLE` with unsupported optional states skipped.

use super::{DeviceError, DeviceOp, Errno, Rule};

/// `VFIO_MIG_GET_PRECOPY_INFO` = `_IO(';', 100 + 21)` on the migration data fd (6.2+).
pub const VFIO_MIG_GET_PRECOPY_INFO: u64 = 0x3B79;

/// `enum vfio_device_mig_state`, with the kernel's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum MigState {
    /// The device failed; only a reset leaves it.
    Error = 0,
    /// Stopped, no DMA, no state change.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, the final state is readable.
    StopCopy = 3,
    /// Stopped, accepting a state stream.
    Resuming = 4,
    /// Running but not initiating P2P DMA (needs `P2P`).
    RunningP2p = 5,
    /// Running while the initial state is readable (needs `PRE_COPY`, kernel 6.2+).
    PreCopy = 6,
    /// PRE_COPY without P2P DMA (needs `P2P | PRE_COPY`, kernel 6.2+).
    PreCopyP2p = 7,
}

impl MigState {
    /// All states, by number.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The state with kernel number `n`.
    pub fn from_u32(n: u32) -> Option<MigState> {
        Self::ALL.get(n as usize).copied()
    }

    /// Whether this is a saving-group state (PRE_COPY, PRE_COPY_P2P, STOP_COPY): it may be
    /// only the first or last state of a path.
    pub fn is_saving(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
        )
    }

    /// The flags a device needs to support this state (`~0` for ERROR: never supported).
    fn required(self) -> u32 {
        const SC: u32 = MigFlags::STOP_COPY.0;
        const P2P: u32 = MigFlags::P2P.0;
        const PC: u32 = MigFlags::PRE_COPY.0;
        match self {
            MigState::Error => !0,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => SC,
            MigState::RunningP2p => SC | P2P,
            MigState::PreCopy => SC | PC,
            MigState::PreCopyP2p => SC | P2P | PC,
        }
    }
}

/// `VFIO_MIGRATION_*` flags a device reports in `vfio_device_feature_migration`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigFlags(pub u32);

impl MigFlags {
    /// `VFIO_MIGRATION_STOP_COPY`: STOP, STOP_COPY, RESUMING (mandatory).
    pub const STOP_COPY: MigFlags = MigFlags(1 << 0);
    /// `VFIO_MIGRATION_P2P`: RUNNING_P2P.
    pub const P2P: MigFlags = MigFlags(1 << 1);
    /// `VFIO_MIGRATION_PRE_COPY` (6.2): PRE_COPY.
    pub const PRE_COPY: MigFlags = MigFlags(1 << 2);
    /// All three.
    pub const ALL: MigFlags = MigFlags(0b111);

    /// Whether the device supports `state`.
    pub fn supports(self, state: MigState) -> bool {
        let req = state.required();
        req & self.0 == req
    }
}

impl std::ops::BitOr for MigFlags {
    type Output = MigFlags;
    fn bitor(self, rhs: MigFlags) -> MigFlags {
        MigFlags(self.0 | rhs.0)
    }
}

/// The kernel's `vfio_from_fsm_table[cur][new]` (row = current, column = target).
const TABLE: [[MigState; 8]; 8] = {
    use MigState::{
        Error as E, PreCopy as PC, PreCopyP2p as PCP, Resuming as RE, Running as RU,
        RunningP2p as RP, Stop as S, StopCopy as SC,
    };
    // Columns: ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P.
    [
        /* ERROR */ [E, E, E, E, E, E, E, E],
        /* STOP */ [E, S, RP, SC, RE, RP, RP, RP],
        /* RUNNING */ [E, RP, RU, RP, RP, RP, PC, RP],
        /* STOP_COPY */ [E, S, S, SC, S, S, E, E],
        /* RESUMING */ [E, S, S, S, RE, S, S, S],
        /* RUNNING_P2P */ [E, S, RU, S, S, RP, RU, PCP],
        /* PRE_COPY */ [E, RU, RU, PCP, RU, RU, PC, PCP],
        /* PRE_COPY_P2P */ [E, RP, RP, SC, RP, RP, PC, PCP],
    ]
};

/// `vfio_mig_get_next_state`: the next single arc from `cur` toward `new`.
///
/// EINVAL if `cur` or `new` is unsupported (ERROR is never a valid target) or the pair is
/// forbidden. Unlike the kernel loop, STOP_COPY → PRE_COPY* returns EINVAL instead of
/// looping on ERROR forever.
pub fn next_state(flags: MigFlags, cur: MigState, new: MigState) -> Result<MigState, Rule> {
    if !flags.supports(cur) {
        return Err(Rule::UnsupportedState { state: cur });
    }
    if !flags.supports(new) {
        return Err(Rule::UnsupportedState { state: new });
    }
    let mut next = TABLE[cur as usize][new as usize];
    // Skip optional states the device lacks; ERROR ends the walk (it is never supported).
    while next != MigState::Error && !flags.supports(next) {
        next = TABLE[next as usize][new as usize];
    }
    if next == MigState::Error {
        return Err(Rule::NoPath { from: cur, to: new });
    }
    Ok(next)
}

/// The whole path from `cur` to `new` (excluding `cur`), as a driver walks it
/// (`while cur != new`: asking for the current state is a no-op, even ERROR).
pub fn path(flags: MigFlags, cur: MigState, new: MigState) -> Result<Vec<MigState>, Rule> {
    let mut out = Vec::new();
    let mut at = cur;
    while at != new {
        at = next_state(flags, at, new)?;
        out.push(at);
        if out.len() > MigState::ALL.len() {
            // Unreachable with the kernel table; a guard against a table typo looping.
            return Err(Rule::NoPath { from: cur, to: new });
        }
    }
    Ok(out)
}

/// The saving stream framing: records `[u64 LE length][bytes]`; the last complete record
/// is the device state. PRE_COPY sends the state at PRE_COPY entry; STOP_COPY appends the
/// final state if it changed since, so a resumed device ends with the newest one.
fn frame(data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
}

fn last_record(stream: &[u8]) -> Option<&[u8]> {
    let mut rest = stream;
    let mut last = None;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        if tail.len() < len {
            return None;
        }
        last = Some(&tail[..len]);
        rest = &tail[len..];
    }
    last
}

/// A migratable device's state machine and its opaque state (`Vec<u8>`).
#[derive(Clone, Debug)]
pub struct MigrationDevice {
    flags: MigFlags,
    state: MigState,
    data: Vec<u8>,
    /// Saving stream of the current saving session, and how much was read.
    out: Vec<u8>,
    read_pos: usize,
    /// State the saving session snapshotted (to know whether STOP_COPY must resend).
    snap: Vec<u8>,
    /// RESUMING: bytes received.
    incoming: Vec<u8>,
}

impl MigrationDevice {
    /// A running device supporting `flags` with an empty state.
    pub fn new(flags: MigFlags) -> Self {
        Self {
            flags,
            state: MigState::Running,
            data: Vec::new(),
            out: Vec::new(),
            read_pos: 0,
            snap: Vec::new(),
            incoming: Vec::new(),
        }
    }

    /// The migration flags (`VFIO_DEVICE_FEATURE_MIGRATION` GET).
    pub fn flags(&self) -> MigFlags {
        self.flags
    }

    /// The current state (`MIG_DEVICE_STATE` GET).
    pub fn state(&self) -> MigState {
        self.state
    }

    /// The device's internal state.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Replace the device's internal state (what the device does while running).
    pub fn set_data(&mut self, data: Vec<u8>) {
        self.data = data;
    }

    /// `VFIO_DEVICE_RESET`: back to RUNNING from any state, streams dropped.
    pub fn reset(&mut self) {
        self.state = MigState::Running;
        self.out.clear();
        self.read_pos = 0;
        self.incoming.clear();
    }

    /// `MIG_DEVICE_STATE` SET: walk arc by arc to `target`; returns the states passed
    /// through (ending with `target`). On a failed arc the device stops in ERROR.
    pub fn set_state(&mut self, target: MigState) -> Result<Vec<MigState>, DeviceError> {
        let err = |rule| DeviceError::new(DeviceOp::SetState, Errno::EINVAL, rule);
        let mut walked = Vec::new();
        while self.state != target {
            let next = next_state(self.flags, self.state, target).map_err(err)?;
            self.arc(next).map_err(|rule| {
                self.state = MigState::Error;
                err(rule)
            })?;
            walked.push(next);
        }
        Ok(walked)
    }

    /// Take one arc: what the driver does on each transition.
    fn arc(&mut self, next: MigState) -> Result<(), Rule> {
        let cur = self.state;
        match (cur, next) {
            // Entering the saving group starts a stream from the state as it is now.
            (c, MigState::PreCopy | MigState::StopCopy) if !c.is_saving() => {
                self.out.clear();
                self.read_pos = 0;
                self.snap = self.data.clone();
                frame(&self.snap, &mut self.out);
            }
            // PRE_COPY* -> STOP_COPY: the stream goes on; send the final state if it moved.
            (MigState::PreCopy | MigState::PreCopyP2p, MigState::StopCopy)
                if self.snap != self.data =>
            {
                self.snap = self.data.clone();
                frame(&self.snap, &mut self.out);
            }
            (_, MigState::Resuming) => self.incoming.clear(),
            (MigState::Resuming, _) => {
                let data = if self.incoming.is_empty() {
                    None
                } else {
                    last_record(&self.incoming)
                        .map(<[u8]>::to_vec)
                        .ok_or(Rule::BadStream {
                            bytes: self.incoming.len(),
                        })
                        .map(Some)?
                };
                if let Some(d) = data {
                    self.data = d;
                }
                self.incoming.clear();
            }
            _ => {}
        }
        if !next.is_saving() {
            self.out.clear();
            self.read_pos = 0;
        }
        self.state = next;
        Ok(())
    }

    /// `read()` on the data fd: in STOP_COPY 0 at the end; in PRE_COPY* `ENOMSG` when all
    /// that is available now was read; EINVAL in any other state.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let err = |errno, rule| DeviceError::new(DeviceOp::ReadState, errno, rule);
        if !self.state.is_saving() {
            return Err(err(Errno::EINVAL, Rule::WrongState { state: self.state }));
        }
        let avail = &self.out[self.read_pos..];
        if avail.is_empty() && self.state != MigState::StopCopy && !buf.is_empty() {
            return Err(err(Errno::ENOMSG, Rule::EndOfPrecopy));
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.read_pos += n;
        Ok(n)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO`: `(initial_bytes, dirty_bytes)` still to read; PRE_COPY*
    /// only. The emulated stream has no separate dirty part.
    pub fn precopy_info(&self) -> Result<(u64, u64), DeviceError> {
        if !matches!(self.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(DeviceError::new(
                DeviceOp::PrecopyInfo,
                Errno::EINVAL,
                Rule::WrongState { state: self.state },
            ));
        }
        Ok(((self.out.len() - self.read_pos) as u64, 0))
    }

    /// `write()` on the data fd: RESUMING only.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        if self.state != MigState::Resuming {
            return Err(DeviceError::new(
                DeviceOp::WriteState,
                Errno::EINVAL,
                Rule::WrongState { state: self.state },
            ));
        }
        self.incoming.extend_from_slice(buf);
        Ok(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use MigState::*;

    /// The arcs a driver must implement for `flags` (uAPI comment in vfio.h).
    fn arcs(flags: MigFlags) -> Vec<(MigState, MigState)> {
        let p2p = flags.0 & MigFlags::P2P.0 != 0;
        let pc = flags.0 & MigFlags::PRE_COPY.0 != 0;
        let mut a = vec![
            (Resuming, Stop),
            (Stop, Resuming),
            (Stop, StopCopy),
            (StopCopy, Stop),
        ];
        if p2p {
            a.extend([(Running, RunningP2p), (RunningP2p, Running)]);
            a.extend([(RunningP2p, Stop), (Stop, RunningP2p)]);
        }
        // "If precopy and P2P are supported together then the driver must support these
        // additional arcs beyond the P2P arcs" (vfio_main.c): PRE_COPY -> STOP_COPY is then
        // *not* an arc, the walk goes through PRE_COPY_P2P.
        if pc && !p2p {
            a.extend([(Running, PreCopy), (PreCopy, Running), (PreCopy, StopCopy)]);
        }
        if p2p && pc {
            a.extend([(PreCopy, Running), (Running, PreCopy)]);
            a.extend([(PreCopy, PreCopyP2p), (PreCopyP2p, PreCopy)]);
            a.extend([(PreCopyP2p, RunningP2p), (PreCopyP2p, StopCopy)]);
            a.push((RunningP2p, PreCopyP2p));
        }
        // Without P2P (with or without PRE_COPY) RUNNING <-> STOP is the way down and up.
        if !p2p {
            a.extend([(Running, Stop), (Stop, Running)]);
        }
        a
    }

    /// Independent oracle: BFS over the allowed arcs. Saving-group states may appear only
    /// at the ends of a path: a saving prefix (from a saving start) or a saving suffix (into
    /// a saving target), never both around a non-saving middle, which is what blocks
    /// STOP_COPY -> PRE_COPY*. ERROR is never a target.
    fn bfs(flags: MigFlags, cur: MigState, new: MigState) -> Option<usize> {
        if cur == new {
            return Some(0); // drivers loop `while cur != new`: nothing to do
        }
        if !flags.supports(cur) || !flags.supports(new) {
            return None;
        }
        // Phase: 0 saving prefix, 1 non-saving middle, 2 saving suffix.
        let start_phase = if cur.is_saving() { 0 } else { 1 };
        let arcs = arcs(flags);
        let mut dist = [[usize::MAX; 3]; 8];
        dist[cur as usize][start_phase] = 0;
        let mut q = VecDeque::from([(cur, start_phase)]);
        while let Some((s, ph)) = q.pop_front() {
            let d = dist[s as usize][ph];
            if s == new {
                return Some(d);
            }
            for &(a, b) in &arcs {
                if a != s {
                    continue;
                }
                let next_ph = match (ph, b.is_saving()) {
                    (0, true) => 0,
                    (0, false) | (1, false) => 1,
                    (1, true) if !cur.is_saving() => 2,
                    (2, true) => 2,
                    _ => continue,
                };
                if dist[b as usize][next_ph] == usize::MAX {
                    dist[b as usize][next_ph] = d + 1;
                    q.push_back((b, next_ph));
                }
            }
        }
        None
    }

    #[test]
    fn table_matches_bfs_for_every_flag_set_and_pair() {
        for f in 0..8u32 {
            let flags = MigFlags(f);
            let allowed = arcs(flags);
            for cur in MigState::ALL {
                for new in MigState::ALL {
                    let got = path(flags, cur, new);
                    match (bfs(flags, cur, new), got) {
                        (None, Err(_)) => {}
                        (Some(d), Ok(p)) => {
                            assert_eq!(p.len(), d, "{flags:?} {cur:?}->{new:?}: {p:?}");
                            let mut at = cur;
                            for &s in &p {
                                assert!(
                                    allowed.contains(&(at, s)),
                                    "{flags:?} {cur:?}->{new:?}: arc {at:?}->{s:?} not allowed"
                                );
                                at = s;
                            }
                        }
                        (o, g) => panic!("{flags:?} {cur:?}->{new:?}: oracle {o:?}, table {g:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn example_paths_from_the_reference() {
        let all = MigFlags::ALL;
        assert_eq!(
            path(all, Running, StopCopy).unwrap(),
            vec![RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            path(all, PreCopy, StopCopy).unwrap(),
            vec![PreCopyP2p, StopCopy]
        );
        assert_eq!(
            path(all, Stop, PreCopy).unwrap(),
            vec![RunningP2p, Running, PreCopy]
        );
        assert_eq!(
            path(all, Resuming, PreCopyP2p).unwrap(),
            vec![Stop, RunningP2p, PreCopyP2p]
        );
        assert_eq!(
            path(MigFlags::STOP_COPY, Running, StopCopy).unwrap(),
            vec![Stop, StopCopy]
        );
        assert_eq!(
            next_state(all, StopCopy, PreCopy),
            Err(Rule::NoPath {
                from: StopCopy,
                to: PreCopy
            })
        );
        assert!(next_state(all, StopCopy, PreCopyP2p).is_err());
        assert_eq!(
            next_state(all, Running, Error),
            Err(Rule::UnsupportedState { state: Error })
        );
        assert!(next_state(MigFlags::STOP_COPY, Running, RunningP2p).is_err());
        assert!(next_state(MigFlags(0), Running, Stop).is_err());
    }

    #[test]
    fn stream_round_trip_with_precopy() {
        let mut src = MigrationDevice::new(MigFlags::ALL);
        src.set_data(b"initial".to_vec());
        let mut buf = [0u8; 4];
        assert_eq!(src.read(&mut buf).unwrap_err().errno, Errno::EINVAL);
        assert_eq!(src.precopy_info().unwrap_err().errno, Errno::EINVAL);
        assert_eq!(src.set_state(PreCopy).unwrap(), vec![PreCopy]);
        assert_eq!(src.precopy_info().unwrap(), (15, 0));
        let mut stream = Vec::new();
        loop {
            match src.read(&mut buf) {
                Ok(n) => stream.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(e.errno, Errno::ENOMSG);
                    break;
                }
            }
        }
        src.set_data(b"final state".to_vec()); // the device kept running
        assert_eq!(src.set_state(StopCopy).unwrap(), vec![PreCopyP2p, StopCopy]);
        loop {
            let n = src.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            stream.extend_from_slice(&buf[..n]);
        }
        let mut dst = MigrationDevice::new(MigFlags::ALL);
        assert_eq!(dst.write(&stream).unwrap_err().errno, Errno::EINVAL);
        dst.set_state(Resuming).unwrap();
        dst.write(&stream[..5]).unwrap();
        dst.write(&stream[5..]).unwrap();
        dst.set_state(Running).unwrap();
        assert_eq!(dst.data(), b"final state");
        // A torn stream puts the destination in ERROR; reset recovers.
        let mut bad = MigrationDevice::new(MigFlags::STOP_COPY);
        bad.set_state(Resuming).unwrap();
        bad.write(&stream[..stream.len() - 1]).unwrap();
        let e = bad.set_state(Running).unwrap_err();
        assert!(matches!(e.rule, Rule::BadStream { .. }));
        assert_eq!(bad.state(), Error);
        assert!(bad.set_state(Running).is_err());
        bad.reset();
        assert_eq!(bad.state(), Running);
    }

    #[test]
    fn stop_copy_only_device() {
        let mut d = MigrationDevice::new(MigFlags::STOP_COPY);
        d.set_data(vec![1, 2, 3]);
        assert_eq!(d.set_state(StopCopy).unwrap(), vec![Stop, StopCopy]);
        let mut buf = [0u8; 64];
        assert_eq!(d.read(&mut buf).unwrap(), 11);
        assert_eq!(d.read(&mut buf).unwrap(), 0);
        assert_eq!(d.set_state(PreCopy).unwrap_err().errno, Errno::EINVAL);
        d.set_state(Running).unwrap();
        assert_eq!(d.read(&mut buf).unwrap_err().errno, Errno::EINVAL);
    }
}
