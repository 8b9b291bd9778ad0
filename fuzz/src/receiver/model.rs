//! What the destination must do with a session's bytes, worked out independently of its
//! code: the oracle the target compares the real destination with after every session.
//!
//! The model reads the bytes with the real frame reader and checks order with the real
//! [`Validator`] (both fuzzed and tested on their own); what it adds is the destination's
//! own rules, from the protocol's documentation: which end a session comes to, what lands
//! in memory, the device and vCPU limits, the refusal accounting and memory reset, the
//! devices' restored state, and the verdict.

use crate::fixture::{self, DEVICES, PAGE, REGIONS};
use crate::receiver::peer::Link;
use iovatrack::migrate::engine::DestLimits;
use iovatrack::migrate::guest::hash_page_bytes;
use iovatrack::migrate::wire::{Frame, FrameReader, Validator, WireError};
use std::collections::{BTreeMap, BTreeSet};

/// How a session ends, as the model predicts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Verified (or not); when verified, committed. With the session's vCPU states.
    Complete { verified: bool, vcpus: Vec<Vec<u8>> },
    /// The peer went away or aborted.
    Interrupted,
    /// Refused and counted.
    Refused,
    /// Refused, and that refusal is over the budget: `serve_channel` returns an error.
    GaveUp,
}

/// The destination as it should be between sessions.
#[derive(Clone, Debug)]
pub struct Model {
    limits: DestLimits,
    /// Guest memory: pages not here are zero.
    pub pages: BTreeMap<u64, Vec<u8>>,
    pub sessions: u32,
    pub refused: u32,
    pub resets: u32,
    pub pages_received: u64,
    pub duplicates: u64,
    /// Pages received in the current pass (kept across sessions, as the destination's).
    seen: BTreeSet<u64>,
    pub verified: bool,
    pub mismatched: u64,
    /// What each emulated device holds as its state.
    pub device_data: Vec<Vec<u8>>,
    pub devices_restored: u32,
    pub device_state_restored: bool,
    /// A verified session was committed: the guest runs here now.
    pub committed: bool,
    pub interrupted: usize,
}

/// A device during one session.
#[derive(Clone, Default)]
struct Dev {
    /// In RESUMING (entered this session and not left).
    resuming: bool,
    /// Received this session (it entered RESUMING).
    received: bool,
    stream: Vec<u8>,
    bytes: u64,
}

/// One session's working state.
struct Session {
    link: Link,
    writes: u32,
    devs: Vec<Dev>,
    device_ok: bool,
    vcpus: Vec<Vec<u8>>,
}

impl Session {
    /// The destination writes a frame: whether it reached the peer.
    fn write(&mut self) -> bool {
        let n = self.writes;
        self.writes += 1;
        self.link.fail_writes_from.is_none_or(|k| n < k)
    }
}

fn is_disconnect(e: &WireError) -> bool {
    matches!(
        e,
        WireError::Closed | WireError::Truncated | WireError::Io(_)
    )
}

/// The device state the emulated device keeps when it leaves RESUMING: the last complete
/// `[u64 LE length][bytes]` record of its stream (`Some(None)`: an empty stream, the state
/// is unchanged), `None` for a stream that is not whole records.
fn last_record(stream: &[u8]) -> Option<Option<&[u8]>> {
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
    Some(last)
}

impl Model {
    pub fn new(limits: DestLimits) -> Self {
        Model {
            limits,
            pages: BTreeMap::new(),
            sessions: 0,
            refused: 0,
            resets: 0,
            pages_received: 0,
            duplicates: 0,
            seen: BTreeSet::new(),
            verified: false,
            mismatched: 0,
            device_data: vec![Vec::new(); DEVICES.len()],
            devices_restored: 0,
            device_state_restored: false,
            committed: false,
            interrupted: 0,
        }
    }

    /// The page hashes the destination's verifier computes (one per page, regions in
    /// order).
    pub fn hashes(&self) -> Vec<u64> {
        // Most pages are zero: their hash once, not once a page.
        static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let zero = *ZERO.get_or_init(|| hash_page_bytes(&[0u8; PAGE as usize]));
        REGIONS
            .iter()
            .flat_map(|&(a, n)| (0..n / PAGE).map(move |p| a + p * PAGE))
            .map(|gpa| self.pages.get(&gpa).map_or(zero, |d| hash_page_bytes(d)))
            .collect()
    }

    /// Serve one session's bytes as the destination must, and say how it ends.
    pub fn session(&mut self, bytes: &[u8], link: Link) -> Outcome {
        let mut s = Session {
            link,
            writes: 0,
            devs: vec![Dev::default(); DEVICES.len()],
            device_ok: true,
            vcpus: Vec::new(),
        };
        let wrote_before = self.pages_received;
        let end = if self.committed {
            // The guest runs here: nobody may write its memory any more.
            Outcome::Refused
        } else {
            self.serve(&mut s, bytes)
        };
        if !matches!(end, Outcome::Complete { .. }) {
            // Devices still resuming are stopped, which makes them load what they got.
            for (i, d) in s.devs.iter().enumerate() {
                if d.resuming {
                    if let Some(Some(rec)) = last_record(&d.stream) {
                        self.device_data[i] = rec.to_vec();
                    }
                }
            }
        }
        match end {
            Outcome::Refused => {
                self.refused += 1;
                if self.pages_received > wrote_before {
                    self.pages.clear();
                    self.resets += 1;
                }
                if self.refused > self.limits.max_refused {
                    return Outcome::GaveUp;
                }
            }
            Outcome::Interrupted => self.interrupted += 1,
            Outcome::Complete { verified, .. } => {
                self.verified = verified;
                self.committed = verified;
            }
            Outcome::GaveUp => unreachable!("decided above"),
        }
        end
    }

    fn serve(&mut self, s: &mut Session, bytes: &[u8]) -> Outcome {
        let mut r = FrameReader::new(bytes);
        let mut v = Validator::new(fixture::layout());
        match r.read_frame() {
            Ok(hello @ Frame::Hello { .. }) => {
                if v.validate(&hello).is_err() {
                    return Outcome::Refused;
                }
            }
            // Anything else first, garbage, or nothing at all.
            _ => return Outcome::Refused,
        }
        if !s.write() {
            return Outcome::Interrupted;
        }
        self.sessions += 1;
        self.devices_restored = 0;
        self.device_state_restored = false;
        loop {
            let f = match r.read_frame() {
                Ok(f) => f,
                Err(e) if is_disconnect(&e) => return Outcome::Interrupted,
                Err(_) => return Outcome::Refused,
            };
            if v.validate(&f).is_err() {
                return Outcome::Refused;
            }
            match f {
                Frame::Pages { gpa, count, data } => {
                    for i in 0..u64::from(count) {
                        let page = gpa + i * PAGE;
                        if !self.seen.insert(page) {
                            self.duplicates += 1;
                        }
                        let at = (i * PAGE) as usize;
                        self.pages
                            .insert(page, data[at..at + PAGE as usize].to_vec());
                    }
                    self.pages_received += u64::from(count);
                }
                Frame::PassBegin { .. } => self.seen.clear(),
                Frame::PassEnd { .. } | Frame::PassCut { .. } => {
                    if !s.write() {
                        return Outcome::Interrupted;
                    }
                }
                Frame::DeviceState { name, bytes } => {
                    let Some(i) = DEVICES.iter().position(|d| *d == name) else {
                        s.device_ok = false;
                        continue;
                    };
                    let n = bytes.len() as u64;
                    let device = s.devs[i].bytes + n;
                    let total = s.devs.iter().map(|d| d.bytes).sum::<u64>() + n;
                    if device > self.limits.device_state_bytes
                        || total > self.limits.session_state_bytes
                    {
                        return Outcome::Refused;
                    }
                    let d = &mut s.devs[i];
                    d.bytes = device;
                    if !d.received {
                        d.received = true;
                        d.resuming = true;
                    }
                    d.stream.extend_from_slice(&bytes);
                }
                Frame::VcpuState { bytes, .. } => {
                    if bytes.len() as u64 > self.limits.vcpu_state_bytes
                        || s.vcpus.len() as u64 >= u64::from(self.limits.max_vcpus)
                    {
                        return Outcome::Refused;
                    }
                    s.vcpus.push(bytes.into_owned());
                }
                Frame::Complete { .. } => self.restore(s),
                Frame::Verify { region_hashes, .. } => {
                    let ours = self.hashes();
                    let n = ours.len().max(region_hashes.len());
                    let mismatched = (0..n)
                        .filter(|&i| ours.get(i) != region_hashes.get(i))
                        .count() as u64;
                    self.mismatched = mismatched;
                    if !s.write() {
                        // The peer is gone before the verdict reached it.
                        return Outcome::Interrupted;
                    }
                    if mismatched > 0 {
                        return Outcome::Complete {
                            verified: false,
                            vcpus: std::mem::take(&mut s.vcpus),
                        };
                    }
                    // Only a Commit hands the guest over; a lost CommitAck changes nothing.
                    return match r.read_frame() {
                        Ok(Frame::Commit) => {
                            s.write();
                            Outcome::Complete {
                                verified: true,
                                vcpus: std::mem::take(&mut s.vcpus),
                            }
                        }
                        _ => Outcome::Interrupted,
                    };
                }
                Frame::Abort { .. } => return Outcome::Interrupted,
                _ => {}
            }
        }
    }

    /// Complete: the devices that received state go RESUMING → (RUNNING_P2P →) RUNNING,
    /// each loading the last record of its stream.
    fn restore(&mut self, s: &mut Session) {
        let mut ok = s.device_ok;
        let mut restored = 0;
        for (i, d) in s.devs.iter_mut().enumerate() {
            if !d.received {
                continue;
            }
            restored += 1;
            if d.resuming {
                d.resuming = false;
                match last_record(&d.stream) {
                    Some(Some(rec)) => self.device_data[i] = rec.to_vec(),
                    Some(None) => {}
                    None => ok = false,
                }
            }
        }
        self.devices_restored = if ok { restored } else { 0 };
        self.device_state_restored = ok && restored as usize == DEVICES.len() && restored > 0;
    }
}
