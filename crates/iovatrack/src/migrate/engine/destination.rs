//! The destination side: receive, verify, restore the device, resume the guest.

use super::{detect_dead_link, hash_bytes, page_hashes, region_hashes, MigrateError, PAGE};
use crate::bitmap::DirtyBitmap;
use crate::device::{EmulatedDevice, MigState};
use crate::layout::Layout;
use crate::migrate::guest::{self, GuestConfig, GuestMemory};
use crate::migrate::guest_regions;
use crate::migrate::wire::{Frame, FrameReader, FrameWriter, MemoryLayout, Validator, WireError};
use crate::plan::limits::DeviceLimits;
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
    /// Pages whose hash differed from the source's.
    pub mismatched_pages: u64,
    /// Pages received more than once within one pass.
    pub duplicate_pages_received: u64,
    /// Pages received over all sessions.
    pub pages_received: u64,
    /// The guest ran on after resuming here.
    pub resumed: bool,
    /// The guest's counter when it resumed here, and a moment later.
    pub counter: (u64, u64),
    /// The device state was restored (RESUMING → RUNNING with the source's bytes).
    pub device_state_restored: bool,
    /// Hash of the restored device state.
    pub device_state_digest: u64,
    /// Why sessions ended early, in order.
    pub interrupted: Vec<String>,
}

/// How a session ended.
enum SessionEnd {
    Complete,
    Interrupted(String),
}

/// The destination: receives into `memory` over connections from `listener` until one
/// completes (a retry after a dropped or cancelled session continues into the same
/// memory), verifies, restores the device and resumes the guest.
pub struct Destination {
    memory: Arc<GuestMemory>,
    device: EmulatedDevice,
    vcpu: Option<Vec<u8>>,
    report: DestReport,
    seen: Vec<DirtyBitmap>,
    verify_result: Option<bool>,
    /// Set by a source in the same process that failed before connecting.
    give_up: Arc<AtomicBool>,
}

impl Destination {
    /// Guest memory laid out from `layout`, and an emulated device with `device` limits.
    pub fn new(layout: &Layout, device: DeviceLimits) -> Result<Self, MigrateError> {
        let regions = guest_regions(layout);
        let memory = Arc::new(GuestMemory::new(&regions)?);
        let seen = memory
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new(r.length / PAGE))
            .collect();
        Ok(Destination {
            memory,
            device: EmulatedDevice::new(device).named("dma0"),
            vcpu: None,
            report: DestReport::default(),
            seen,
            verify_result: None,
            give_up: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag that makes [`Destination::run`] stop waiting for a connection.
    pub fn give_up_flag(&self) -> Arc<AtomicBool> {
        self.give_up.clone()
    }

    /// The received memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Serve sessions until one completes, `max_sessions` were tried, or no source
    /// connects within `accept_timeout`.
    pub fn run(
        mut self,
        listener: &TcpListener,
        max_sessions: u32,
        accept_timeout: Duration,
    ) -> Result<DestReport, MigrateError> {
        listener.set_nonblocking(true)?;
        while self.report.sessions < max_sessions {
            let deadline = Instant::now() + accept_timeout;
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock && self.give_up.load(SeqCst) =>
                    {
                        return Err(MigrateError::Destination(
                            "the source gave up before connecting".into(),
                        ))
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                    {
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
            };
            stream.set_nonblocking(false)?;
            self.report.sessions += 1;
            match self.session(stream)? {
                SessionEnd::Complete => return self.finish(),
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

    /// One connection. Hostile or corrupt input is an error (the stream is refused and
    /// nothing is claimed); a connection that just ends is an interruption.
    fn session(&mut self, stream: TcpStream) -> Result<SessionEnd, MigrateError> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        // A source behind a dead link ends the session within DEAD_LINK, so the retry's
        // connection (waiting in the listen backlog) is served; a source that is merely busy
        // (hashing memory before Complete) still answers keepalives.
        detect_dead_link(&stream)?;
        let mut r = FrameReader::new(io::BufReader::with_capacity(1 << 20, stream.try_clone()?));
        let mut w = FrameWriter::new(stream);
        let regions = self.memory.regions().to_vec();
        let hello = match r.read_frame() {
            Ok(f) => f.into_owned(),
            Err(e) if is_disconnect(&e) => {
                return Ok(SessionEnd::Interrupted(format!("before Hello: {e}")))
            }
            Err(e) => return Err(e.into()),
        };
        let Frame::Hello { guest_kind, .. } = &hello else {
            return Err(WireError::UnexpectedFrame {
                frame: hello.kind(),
                state: crate::migrate::wire::StreamState::AwaitHello,
            }
            .into());
        };
        let kind = guest_kind.to_string();
        let mut v = Validator::new(MemoryLayout::new(PAGE, kind, regions)?);
        if let Err(e) = v.validate(&hello) {
            let _ = w.write_frame(&Frame::Abort {
                reason: Cow::Owned(e.to_string()),
            });
            return Err(e.into());
        }
        w.write_frame(&Frame::HelloAck)?;
        // Nothing from an interrupted session counts for this one but the memory itself.
        self.vcpu = None;
        self.report.device_state_restored = false;
        let mut at_complete: Option<Vec<u64>> = None;
        let (mut resuming, mut device_ok) = (false, false);
        loop {
            let f = match r.read_frame() {
                Ok(f) => f,
                Err(e) if is_disconnect(&e) => return Ok(SessionEnd::Interrupted(e.to_string())),
                Err(e) => return Err(e.into()),
            };
            let target = match v.validate(&f) {
                Ok(t) => t,
                Err(e) => {
                    let _ = w.write_frame(&Frame::Abort {
                        reason: Cow::Owned(e.to_string()),
                    });
                    return Err(e.into());
                }
            };
            match f {
                Frame::Pages { gpa, count, data } => {
                    let t = target.expect("validated Pages have a target");
                    let base = self.memory.regions()[t.region].iova;
                    for i in 0..count as u64 {
                        let page = gpa + i * PAGE;
                        let bit = (page - base) / PAGE;
                        if self.seen[t.region].is_set(bit) {
                            self.report.duplicate_pages_received += 1;
                        }
                        let _ = self.seen[t.region].set(bit);
                        let off = (i * PAGE) as usize;
                        self.memory
                            .write_page(page, &data[off..off + PAGE as usize])?;
                    }
                    self.report.pages_received += count as u64;
                }
                Frame::PassBegin { .. } => {
                    for s in &mut self.seen {
                        s.clear();
                    }
                }
                Frame::PassEnd { pass, .. } => {
                    w.write_frame(&Frame::Ack { pass })?;
                }
                Frame::DeviceState { bytes, .. } => {
                    // The first record of a session puts the device in RESUMING; every
                    // record (pre-copy and stop-copy) goes to its data fd.
                    let mut m = self.device.migration();
                    if !resuming {
                        m.reset();
                        device_ok = m.set_state(MigState::Resuming).is_ok();
                        resuming = true;
                    }
                    device_ok &= m.write(&bytes).is_ok();
                }
                Frame::VcpuState { bytes, .. } => self.vcpu = Some(bytes.into_owned()),
                Frame::Complete { .. } => {
                    at_complete = Some(page_hashes(&self.memory)?);
                    if resuming {
                        let mut m = self.device.migration();
                        device_ok &= m.set_state(MigState::Running).is_ok();
                        self.report.device_state_restored = device_ok && !m.data().is_empty();
                        self.report.device_state_digest = hash_bytes(m.data());
                    }
                }
                Frame::Verify {
                    region_hashes: theirs,
                    ..
                } => {
                    let ours = match at_complete.take() {
                        Some(h) => h,
                        None => page_hashes(&self.memory)?,
                    };
                    // Page-level when the source sent one hash per page; else per region
                    // (then the count below is of regions).
                    let mismatched = if theirs.len() as u64 == self.memory.total_bytes() / PAGE {
                        mismatches(&ours, &theirs)
                    } else {
                        mismatches(&region_hashes(&self.memory, &ours), &theirs)
                    };
                    let ok = mismatched.is_empty();
                    self.report.mismatched_pages = mismatched.len() as u64;
                    self.verify_result = Some(ok);
                    w.write_frame(&Frame::VerifyResult {
                        ok,
                        digest: guest::hash_words(ours.iter().copied()),
                        mismatched_regions: Cow::Owned(mismatched),
                    })?;
                    if !ok {
                        return Ok(SessionEnd::Complete);
                    }
                    // Resume only once the source hands the guest over.
                    return match r.read_frame() {
                        Ok(f @ Frame::Commit) if v.validate(&f).is_ok() => Ok(SessionEnd::Complete),
                        Ok(other) => Ok(SessionEnd::Interrupted(format!(
                            "expected Commit, got {:?}",
                            other.kind()
                        ))),
                        Err(e) => Ok(SessionEnd::Interrupted(format!(
                            "no Commit after the verdict: {e}"
                        ))),
                    };
                }
                Frame::Abort { reason } => {
                    return Ok(SessionEnd::Interrupted(format!(
                        "the source aborted: {reason}"
                    )))
                }
                _ => {}
            }
        }
    }

    /// After a verified session: resume the guest here and see it make progress.
    fn finish(mut self) -> Result<DestReport, MigrateError> {
        self.report.verified = self.verify_result == Some(true);
        if !self.report.verified {
            return Ok(self.report);
        }
        let Some(state) = self.vcpu.take() else {
            return Err(MigrateError::Destination(
                "the source sent no vCPU state".into(),
            ));
        };
        let g = guest::resume_guest(self.memory.clone(), &state, &GuestConfig::default())?;
        let c0 = g.progress().counter;
        let deadline = Instant::now() + Duration::from_secs(5);
        while g.progress().counter <= c0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let c1 = g.progress().counter;
        g.stop()?;
        self.report.counter = (c0, c1);
        self.report.resumed = c1 > c0;
        Ok(self.report)
    }
}

fn is_disconnect(e: &WireError) -> bool {
    matches!(
        e,
        WireError::Closed | WireError::Truncated | WireError::Io(_)
    )
}

/// Indices where two hash lists differ.
fn mismatches(ours: &[u64], theirs: &[u64]) -> Vec<u32> {
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i as u32)
        .collect()
}
