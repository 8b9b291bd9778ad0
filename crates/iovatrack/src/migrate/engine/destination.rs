//! The destination side: receive into the VMM's guest RAM, restore its devices, verify,
//! and hand the vCPU states back once the source commits.

use super::hooks::Verifier;
use super::link::detect_dead_link;
use super::{MigrateError, PAGE};
use crate::bitmap::DirtyBitmap;
use crate::device::MigState;
use crate::migrate::seams::{DeviceMigration, GuestRam};
use crate::migrate::wire::{
    Frame, FrameReader, FrameWriter, Limits, MemoryLayout, StreamState, Validator, WireError,
};
use serde::Serialize;
use std::borrow::Cow;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the destination saw and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DestReport {
    /// Connections accepted.
    pub sessions: u32,
    /// A session completed and the memory matched.
    pub verified: bool,
    /// Pages (or regions) whose hash differed from the source's.
    pub mismatched_pages: u64,
    /// Pages received more than once within one pass.
    pub duplicate_pages_received: u64,
    /// Pages received over all sessions.
    pub pages_received: u64,
    /// The guest ran on after resuming here (set by whoever resumes it).
    pub resumed: bool,
    /// The guest's counter when it resumed here, and a moment later (demo guests).
    pub counter: (u64, u64),
    /// Every device that sent state was restored (RESUMING → RUNNING with its bytes).
    pub device_state_restored: bool,
    /// Devices restored.
    pub devices_restored: u32,
    /// Hash of the restored device state (demo devices).
    pub device_state_digest: u64,
    /// Why sessions ended early, in order.
    pub interrupted: Vec<String>,
}

/// A completed, verified and committed migration: what the VMM resumes from.
pub struct Received {
    /// What happened.
    pub report: DestReport,
    /// The vCPU states, in vCPU order (resume the guest from these).
    pub vcpu_states: Vec<Vec<u8>>,
}

/// One connection's state.
struct Session {
    w: FrameWriter<TcpStream>,
    /// The stream's validator, once Hello was accepted.
    v: Option<Validator>,
    /// The memory's hashes when the source said Complete.
    at_complete: Option<Vec<u64>>,
    /// Devices that received state this session.
    resuming: Vec<bool>,
    /// Every device state change and write so far succeeded.
    device_ok: bool,
}

/// What a frame leads to.
enum Step {
    Next,
    End(SessionEnd),
    AwaitCommit,
}

/// How a session ended.
enum SessionEnd {
    Complete,
    Interrupted(String),
}

/// The destination: receives into `memory` over connections from a listener until one
/// completes (a retry after a dropped or cancelled session continues into the same
/// memory), restores the devices, verifies, and waits for the source's Commit.
pub struct Destination {
    memory: Arc<dyn GuestRam>,
    devices: Vec<Box<dyn DeviceMigration>>,
    verifier: Option<Arc<dyn Verifier>>,
    /// The vCPU kind this destination can resume (`None`: any).
    vcpu_kind: Option<String>,
    vcpus: Vec<Vec<u8>>,
    report: DestReport,
    seen: Vec<DirtyBitmap>,
    verify_result: Option<bool>,
    /// Set by a source in the same process that failed before connecting.
    give_up: Arc<AtomicBool>,
}

impl Destination {
    /// A destination receiving into `memory`, restoring `devices` (matched by name).
    pub fn new(memory: Arc<dyn GuestRam>, devices: Vec<Box<dyn DeviceMigration>>) -> Self {
        let seen = memory
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new(r.length / PAGE))
            .collect();
        Destination {
            memory,
            devices,
            verifier: None,
            vcpu_kind: None,
            vcpus: Vec::new(),
            report: DestReport::default(),
            seen,
            verify_result: None,
            give_up: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Verify with `verifier` (the source must use the same one).
    pub fn verifier(mut self, verifier: Arc<dyn Verifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Accept only vCPU state of this kind.
    pub fn vcpu_kind(mut self, kind: impl Into<String>) -> Self {
        self.vcpu_kind = Some(kind.into());
        self
    }

    /// A flag that makes [`Destination::run`] stop waiting for a connection.
    pub fn give_up_flag(&self) -> Arc<AtomicBool> {
        self.give_up.clone()
    }

    /// The received memory.
    pub fn memory(&self) -> &Arc<dyn GuestRam> {
        &self.memory
    }

    /// The devices (after [`Destination::run`], restored).
    pub fn devices(&self) -> &[Box<dyn DeviceMigration>] {
        &self.devices
    }

    /// Serve sessions until one completes, `max_sessions` were tried, or no source
    /// connects within `accept_timeout`. A verified, committed session returns the vCPU
    /// states; a session whose memory did not match returns with `verified: false` and
    /// none.
    pub fn run(
        &mut self,
        listener: &TcpListener,
        max_sessions: u32,
        accept_timeout: Duration,
    ) -> Result<Received, MigrateError> {
        listener.set_nonblocking(true)?;
        while self.report.sessions < max_sessions {
            let stream = self.accept(listener, accept_timeout)?;
            stream.set_nonblocking(false)?;
            self.report.sessions += 1;
            match self.session(stream)? {
                SessionEnd::Complete => {
                    self.report.verified = self.verify_result == Some(true);
                    return Ok(Received {
                        report: self.report.clone(),
                        vcpu_states: std::mem::take(&mut self.vcpus),
                    });
                }
                SessionEnd::Interrupted(why) => {
                    log::info!(
                        "destination: session {} interrupted: {why}; keeping memory for a retry",
                        self.report.sessions
                    );
                    self.report.interrupted.push(why);
                }
            }
        }
        Err(MigrateError::Destination(format!(
            "no session completed in {max_sessions} tries: {}",
            self.report.interrupted.join("; ")
        )))
    }

    fn accept(
        &self,
        listener: &TcpListener,
        accept_timeout: Duration,
    ) -> Result<TcpStream, MigrateError> {
        let deadline = Instant::now() + accept_timeout;
        loop {
            match listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.give_up.load(SeqCst) => {
                    return Err(MigrateError::Destination(
                        "the source gave up before connecting".into(),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(MigrateError::Destination(format!(
                        "no source connected within {accept_timeout:?} ({} session(s) before)",
                        self.report.sessions
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One connection. Hostile or corrupt input is an error (the stream is refused and
    /// nothing is claimed); a connection that just ends is an interruption.
    fn session(&mut self, stream: TcpStream) -> Result<SessionEnd, MigrateError> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        // A source behind a dead link ends the session within the dead-link time, so the
        // retry's connection (waiting in the listen backlog) is served; a source that is
        // merely busy (hashing memory before Complete) still answers keepalives.
        detect_dead_link(&stream)?;
        let mut r = FrameReader::new(io::BufReader::with_capacity(1 << 20, stream.try_clone()?));
        let mut s = Session {
            w: FrameWriter::new(stream),
            v: None,
            at_complete: None,
            resuming: vec![false; self.devices.len()],
            device_ok: true,
        };
        if let Some(end) = self.handshake(&mut r, &mut s)? {
            return Ok(end);
        }
        // Nothing from an interrupted session counts for this one but the memory itself.
        self.vcpus.clear();
        self.report.device_state_restored = false;
        self.report.devices_restored = 0;
        loop {
            let f = match r.read_frame() {
                Ok(f) => f,
                Err(e) if is_disconnect(&e) => return Ok(SessionEnd::Interrupted(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            let v = s.v.as_mut().expect("set by the handshake");
            let target = match v.validate(&f) {
                Ok(t) => t,
                Err(e) => {
                    let _ = s.w.write_frame(&Frame::Abort {
                        reason: Cow::Owned(e.to_string()),
                    });
                    return Err(e.into());
                }
            };
            let region = target.map(|t| t.region);
            match self.on_frame(&mut s, f, region)? {
                Step::Next => {}
                Step::End(end) => return Ok(end),
                Step::AwaitCommit => return Ok(Self::await_commit(&mut r, &mut s)),
            }
        }
    }

    /// Hello, checked against this destination's memory and vCPU kind; HelloAck.
    fn handshake(
        &mut self,
        r: &mut FrameReader<io::BufReader<TcpStream>>,
        s: &mut Session,
    ) -> Result<Option<SessionEnd>, MigrateError> {
        let hello = match r.read_frame() {
            Ok(f) => f.into_owned(),
            Err(e) if is_disconnect(&e) => {
                return Ok(Some(SessionEnd::Interrupted(format!("before Hello: {e}"))))
            }
            Err(e) => return Err(e.into()),
        };
        let Frame::Hello { guest_kind, .. } = &hello else {
            return Err(WireError::UnexpectedFrame {
                frame: hello.kind(),
                state: StreamState::AwaitHello,
            }
            .into());
        };
        let kind = self
            .vcpu_kind
            .clone()
            .unwrap_or_else(|| guest_kind.to_string());
        let regions = self.memory.regions().to_vec();
        let mut v = Validator::new(MemoryLayout::new(PAGE, kind, regions)?);
        if let Err(e) = v.validate(&hello) {
            let _ = s.w.write_frame(&Frame::Abort {
                reason: Cow::Owned(e.to_string()),
            });
            return Err(e.into());
        }
        s.w.write_frame(&Frame::HelloAck)?;
        s.v = Some(v);
        Ok(None)
    }

    /// One validated frame (`region`: the RAM region a Pages frame targets).
    fn on_frame(
        &mut self,
        s: &mut Session,
        f: Frame<'_>,
        region: Option<usize>,
    ) -> Result<Step, MigrateError> {
        match f {
            Frame::Pages { gpa, count, data } => {
                let region = region.expect("validated Pages have a target");
                self.write_pages(region, gpa, count, &data)?;
            }
            Frame::PassBegin { .. } => {
                for b in &mut self.seen {
                    b.clear();
                }
            }
            Frame::PassEnd { pass, .. } | Frame::PassCut { pass, .. } => {
                s.w.write_frame(&Frame::Ack { pass })?;
            }
            Frame::DeviceState { name, bytes } => self.device_state(s, &name, &bytes),
            Frame::VcpuState { bytes, .. } => self.vcpus.push(bytes.into_owned()),
            Frame::Complete { .. } => {
                s.at_complete = Some(self.hashes()?);
                let resuming = std::mem::take(&mut s.resuming);
                self.restore_devices(&resuming, s.device_ok);
                s.resuming = resuming;
            }
            Frame::Verify {
                region_hashes: theirs,
                ..
            } => return self.verify(s, &theirs),
            Frame::Abort { reason } => {
                return Ok(Step::End(SessionEnd::Interrupted(format!(
                    "the source aborted: {reason}"
                ))))
            }
            _ => {}
        }
        Ok(Step::Next)
    }

    fn write_pages(
        &mut self,
        region: usize,
        gpa: u64,
        count: u32,
        data: &[u8],
    ) -> Result<(), MigrateError> {
        let base = self.memory.regions()[region].iova;
        for i in 0..count as u64 {
            let page = gpa + i * PAGE;
            let bit = (page - base) / PAGE;
            if self.seen[region].is_set(bit) {
                self.report.duplicate_pages_received += 1;
            }
            let _ = self.seen[region].set(bit);
            let off = (i * PAGE) as usize;
            self.memory
                .write_page(page, &data[off..off + PAGE as usize])?;
        }
        self.report.pages_received += count as u64;
        Ok(())
    }

    /// A device's first record of a session puts it in RESUMING; every record (pre-copy
    /// and stop-copy) goes to its data fd.
    fn device_state(&mut self, s: &mut Session, name: &str, bytes: &[u8]) {
        match self.devices.iter().position(|d| d.name() == name) {
            Some(i) => {
                let d = &mut self.devices[i];
                if !s.resuming[i] {
                    s.device_ok &= d.set_state(MigState::Resuming).is_ok();
                    s.resuming[i] = true;
                }
                s.device_ok &= d.write_data(bytes).is_ok();
            }
            None => {
                log::warn!("destination: state for unknown device {name:?}");
                s.device_ok = false;
            }
        }
    }

    /// Compare with the source's hashes and answer.
    fn verify(&mut self, s: &mut Session, theirs: &[u64]) -> Result<Step, MigrateError> {
        let ours = match s.at_complete.take() {
            Some(h) => h,
            None => self.hashes()?,
        };
        let mismatched = match &self.verifier {
            Some(_) => mismatches(&ours, theirs),
            None => Vec::new(),
        };
        let ok = mismatched.is_empty();
        self.report.mismatched_pages = mismatched.len() as u64;
        self.verify_result = Some(ok);
        let digest = self.verifier.as_ref().map_or(0, |v| v.digest(&ours));
        s.w.write_frame(&Frame::VerifyResult {
            ok,
            digest,
            mismatched_regions: Cow::Owned(mismatched),
        })?;
        Ok(if ok {
            Step::AwaitCommit
        } else {
            Step::End(SessionEnd::Complete)
        })
    }

    /// After a good verdict: the guest is resumed here only once the source hands it
    /// over.
    fn await_commit(r: &mut FrameReader<io::BufReader<TcpStream>>, s: &mut Session) -> SessionEnd {
        let v = s.v.as_mut().expect("set by the handshake");
        match r.read_frame() {
            Ok(f @ Frame::Commit) if v.validate(&f).is_ok() => SessionEnd::Complete,
            Ok(other) => {
                SessionEnd::Interrupted(format!("expected Commit, got {:?}", other.kind()))
            }
            Err(e) => SessionEnd::Interrupted(format!("no Commit after the verdict: {e}")),
        }
    }

    /// The verifier's hashes of the received memory (none without a verifier).
    fn hashes(&self) -> Result<Vec<u64>, MigrateError> {
        let max_hashes = (Limits::default().max_payload as usize - 64) / 8;
        match &self.verifier {
            Some(v) => Ok(v.hashes(self.memory.as_ref(), max_hashes)?),
            None => Ok(Vec::new()),
        }
    }

    /// The devices that received state go RESUMING → RUNNING (through RUNNING_P2P when
    /// several: none may DMA into a peer still resuming).
    fn restore_devices(&mut self, resuming: &[bool], mut ok: bool) {
        let several = self.devices.len() > 1;
        for step in [MigState::RunningP2p, MigState::Running] {
            if step == MigState::RunningP2p && !several {
                continue;
            }
            for (d, _) in self.devices.iter_mut().zip(resuming).filter(|(_, r)| **r) {
                ok &= d.set_state(step).is_ok();
            }
        }
        let restored = resuming.iter().filter(|r| **r).count() as u32;
        self.report.devices_restored = if ok { restored } else { 0 };
        self.report.device_state_restored =
            ok && restored as usize == self.devices.len() && restored > 0;
    }
}

fn is_disconnect(e: &WireError) -> bool {
    matches!(
        e,
        WireError::Closed | WireError::Truncated | WireError::Io(_)
    )
}

/// Indices where two hash lists differ (a length difference counts as a mismatch of
/// every index past the shorter list).
fn mismatches(ours: &[u64], theirs: &[u64]) -> Vec<u32> {
    let n = ours.len().max(theirs.len());
    (0..n)
        .filter(|&i| ours.get(i) != theirs.get(i))
        .map(|i| i as u32)
        .collect()
}
