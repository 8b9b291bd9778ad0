//! One connection: the handshake, the frames, verification and the Commit handover.

mod narrow;

use super::accept::Incoming;
use super::streams::{self, Gate, StreamMsg};
use super::{Destination, Refusal, READ_BUFFER};
use crate::device::MigState;
use crate::migrate::engine::channel::{looks_like_tls, Channel, Duplex, PlainTcp, Transport};
use crate::migrate::engine::{max_hashes, MigrateError, StateDigest, PAGE};
use crate::migrate::wire::{
    Frame, FrameReader, FrameWriter, MemoryLayout, OwnedFrame, PagesTarget, StreamState, Validator,
    WireError,
};
use std::borrow::Cow;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Arc};

/// The main channel's reader.
pub(super) type MainReader = FrameReader<io::BufReader<Duplex>>;

/// One connection's state.
pub(super) struct Session {
    pub(super) w: FrameWriter<Duplex>,
    /// The stream's validator, once Hello was accepted.
    pub(super) v: Option<Validator>,
    /// The memory's hashes when the source said Complete.
    at_complete: Option<Vec<u64>>,
    /// Devices that received state this session.
    resuming: Vec<bool>,
    /// Device-state bytes each device received this session.
    state_bytes: Vec<u64>,
    /// Every device state change and write so far succeeded.
    device_ok: bool,
    /// The device state given to the devices this session (the source compares it).
    state: StateDigest,
    /// The barrier's gate, which the extra streams wait at between passes.
    pub(super) gate: Arc<Gate>,
    /// What the extra streams report (none with one stream).
    pub(super) rx: Option<mpsc::Receiver<StreamMsg>>,
    /// Per extra stream (index − 1): passes it has ended, and why it is gone if it is.
    pub(super) ended: Vec<(u32, Option<String>)>,
}

/// What a frame leads to.
enum Step {
    Next,
    End(SessionEnd),
    AwaitCommit,
    /// The verdict named regions that differ: count their pages from the source's hashes.
    Narrow(Vec<u32>),
}

/// How a session ended.
pub(super) enum SessionEnd {
    /// Verified (or not) and, when verified, committed.
    Complete,
    /// The source went away or aborted: its next attempt continues into this memory.
    Interrupted(String),
    /// Not a source of ours, or one that broke the protocol or a limit.
    Refused(Refusal),
    /// After a good memory verdict the source refused the handover (its Abort says why,
    /// e.g. the device state received differs from what it sent).
    HandoverRefused(String),
}

impl From<Refusal> for SessionEnd {
    fn from(r: Refusal) -> Self {
        SessionEnd::Refused(r)
    }
}

impl Destination {
    /// One connection. What the peer does wrong is a refusal; only the destination's own
    /// failures (its memory, its socket options) are errors.
    pub(super) fn serve(
        &mut self,
        channel: Box<dyn Channel>,
        incoming: &mut dyn Incoming,
    ) -> Result<SessionEnd, MigrateError> {
        // The Hello comes within the Hello timeout (set by `Acceptor::open` for TCP; a
        // VMM's own channel brings its own bounds).
        let tcp = channel
            .tcp()
            .map(std::net::TcpStream::try_clone)
            .transpose()?;
        let duplex = Duplex::new(channel);
        let mut r = FrameReader::new(io::BufReader::with_capacity(READ_BUFFER, duplex.clone()));
        let mut s = Session {
            w: FrameWriter::new(duplex),
            v: None,
            at_complete: None,
            resuming: vec![false; self.devices.len()],
            state_bytes: vec![0; self.devices.len()],
            device_ok: true,
            state: StateDigest::new(),
            gate: Arc::default(),
            rx: None,
            ended: Vec::new(),
        };
        if let Some(end) = self.handshake(&mut r, &mut s)? {
            return Ok(end);
        }
        self.report.sessions += 1;
        if let Some(t) = &tcp {
            // Past Hello: a live source may be busy a while between frames (hashing a
            // large guest); a dead one is found by the dead-link detection.
            t.set_read_timeout(Some(self.limits.read_timeout))?;
            t.set_write_timeout(Some(self.limits.read_timeout))?;
        }
        // Nothing from an interrupted session counts for this one but the memory itself.
        self.vcpus.clear();
        self.report.device_state_restored = false;
        self.report.devices_restored = 0;
        self.report.streams = 1;
        self.sink.new_pass();
        // A session with several streams says so first, and they join before pass 0.
        let (joined, first) = match self.join_streams(&mut r, &mut s, incoming)? {
            Ok(j) => j,
            Err(end) => return Ok(end),
        };
        let (tx, rx) = mpsc::channel();
        s.rx = Some(rx);
        s.ended = vec![(0, None); joined.len()];
        let stream_tcp: Vec<TcpStream> = joined
            .iter()
            .filter_map(|j| j.tcp.as_ref().and_then(|t| t.try_clone().ok()))
            .collect();
        let sink = self.sink.clone();
        let gate = s.gate.clone();
        let end = std::thread::scope(|scope| {
            for j in joined {
                let (tx, sink, gate, main) = (tx.clone(), &*sink, &*gate, tcp.as_ref());
                scope.spawn(move || streams::receive(j, sink, gate, tx, main));
            }
            drop(tx);
            let end = self.frames(&mut r, &mut s, first);
            // The session is over: every stream stops (the scope waits for them), so none
            // writes a page after this session ends.
            s.gate.end();
            for t in &stream_tcp {
                let _ = t.shutdown(Shutdown::Both);
            }
            end
        });
        // A stream that broke the protocol makes the session a refusal, whatever the main
        // channel saw after it was shut down.
        let end = match (end, self.stream_failure(&mut s)) {
            (end @ Ok(SessionEnd::Complete), _) | (end, None) => end,
            (_, Some(Err(local))) => Err(local),
            (_, Some(Ok(why))) => Ok(SessionEnd::Refused(why)),
        };
        if !matches!(end, Ok(SessionEnd::Complete)) {
            // A device left RESUMING with a partial (or a stranger's) stream: STOP ends
            // that stream, so the next session's RESUMING starts a new one from the
            // start (best effort: a device may refuse to load a partial stream).
            for (d, _) in self
                .devices
                .iter_mut()
                .zip(&s.resuming)
                .filter(|(_, r)| **r)
            {
                if let Err(e) = d.set_state(MigState::Stop) {
                    log::info!("destination: device {} out of RESUMING: {e}", d.name());
                }
            }
        }
        end
    }

    /// The frames after Hello (and `first`, one read already), to the session's end.
    fn frames(
        &mut self,
        r: &mut MainReader,
        s: &mut Session,
        mut first: Option<OwnedFrame>,
    ) -> Result<SessionEnd, MigrateError> {
        loop {
            let f = match first.take() {
                Some(f) => f,
                None => match r.read_frame() {
                    Ok(f) => f,
                    Err(e) if is_disconnect(&e) => {
                        return Ok(SessionEnd::Interrupted(e.to_string()))
                    }
                    Err(e) => return Ok(refuse(s, e.into())),
                },
            };
            if let Frame::PassEnd { pass, .. } | Frame::PassCut { pass, .. } = f {
                // Every stream's share of the pass first: the counts below cover them all.
                if let Some(end) = self.barrier(s, pass)? {
                    return Ok(end);
                }
            }
            let v = s.v.as_mut().expect("set by the handshake");
            let target = match v.validate(&f) {
                Ok(t) => t,
                Err(e) => return Ok(refuse(s, e.into())),
            };
            match self.on_frame(s, f, target) {
                Ok(Step::Next) => {}
                Ok(Step::End(end)) => return Ok(end),
                Ok(Step::AwaitCommit) => return Ok(Self::await_commit(r, s)),
                Ok(Step::Narrow(regions)) => return self.narrow(r, s, &regions),
                Err(FrameError::Refused(why)) => return Ok(refuse(s, why)),
                Err(FrameError::Local(e)) => return Err(e),
            }
        }
    }

    /// Hello, checked against this destination's memory and vCPU kind; HelloAck with the
    /// memory's session id.
    fn handshake(
        &mut self,
        r: &mut MainReader,
        s: &mut Session,
    ) -> Result<Option<SessionEnd>, MigrateError> {
        let hello = match r.read_frame() {
            Ok(f) => f.into_owned(),
            Err(e) if is_disconnect(&e) => return Ok(Some(Refusal::NoHello(e).into())),
            // A source with TLS at a receiver without: say so rather than "bad magic".
            // (Through a TLS session these would be decrypted bytes: no such claim.)
            Err(WireError::BadMagic { found })
                if looks_like_tls(&found) && self.transport.name() == PlainTcp.name() =>
            {
                return Ok(Some(refuse(s, Refusal::TlsClientHello)))
            }
            Err(e) => return Ok(Some(refuse(s, e.into()))),
        };
        let Frame::Hello { guest_kind, .. } = &hello else {
            let e = WireError::UnexpectedFrame {
                frame: hello.kind(),
                state: StreamState::AwaitHello,
            };
            return Ok(Some(refuse(s, e.into())));
        };
        // A destination that states the kinds it can resume checks the source's against
        // them (a kind it lacks is compared with its first, and refused); one that does
        // not takes the source's word.
        let kind = match &self.vcpu_kinds {
            Some(k) if k.iter().any(|k| k == guest_kind) => guest_kind.to_string(),
            Some(k) => k.first().cloned().unwrap_or_default(),
            None => guest_kind.to_string(),
        };
        let regions = self.memory.regions().to_vec();
        let mut v = Validator::new(MemoryLayout::new(PAGE, kind, regions)?);
        if let Err(e) = v.validate(&hello) {
            return Ok(Some(refuse(s, e.into())));
        }
        let ack = Frame::HelloAck {
            session: self.session_id,
        };
        if let Err(e) = s.w.write_frame(&ack) {
            return Ok(Some(SessionEnd::Interrupted(format!(
                "sending HelloAck: {e}"
            ))));
        }
        s.v = Some(v);
        Ok(None)
    }

    /// One validated frame (`region`: where a Pages frame lands).
    fn on_frame(
        &mut self,
        s: &mut Session,
        f: Frame<'_>,
        region: Option<PagesTarget>,
    ) -> Result<Step, FrameError> {
        match f {
            Frame::Pages { gpa, count, data } => {
                let target = region.expect("validated Pages have a target");
                let _ = gpa;
                self.sink.write(target, count, &data)?;
            }
            Frame::PassEnd { pass, .. } | Frame::PassCut { pass, .. } => {
                // Pass complete on every stream: a new pass begins for the duplicate
                // check, and only now may the streams read on (then the source, acked).
                self.sink.new_pass();
                s.gate.complete(pass);
                if let Err(e) = s.w.write_frame(&Frame::Ack { pass }) {
                    return Ok(Step::End(SessionEnd::Interrupted(format!(
                        "sending Ack: {e}"
                    ))));
                }
            }
            Frame::DeviceState { name, bytes } => self.device_state(s, &name, &bytes)?,
            Frame::VcpuState { index, bytes } => {
                let limit = self.limits.vcpu_state_bytes;
                if bytes.len() as u64 > limit {
                    return Err(FrameError::Refused(Refusal::VcpuStateLimit {
                        index,
                        bytes: bytes.len() as u64,
                        limit,
                    }));
                }
                if self.vcpus.len() as u64 >= u64::from(self.limits.max_vcpus) {
                    return Err(FrameError::Refused(Refusal::TooManyVcpus {
                        limit: self.limits.max_vcpus,
                    }));
                }
                self.vcpus.push(bytes.into_owned())
            }
            Frame::Complete { .. } => {
                s.at_complete = Some(self.hashes()?);
                let resuming = std::mem::take(&mut s.resuming);
                self.restore_devices(&resuming, s.device_ok);
                s.resuming = resuming;
            }
            Frame::Verify {
                region_hashes: theirs,
                ..
            } => return Ok(self.verify(s, &theirs)?),
            Frame::Abort { reason } => {
                return Ok(Step::End(SessionEnd::Interrupted(format!(
                    "the source aborted: {reason}"
                ))))
            }
            _ => {}
        }
        Ok(Step::Next)
    }

    /// A device's first record of a session puts it in RESUMING; every record (pre-copy
    /// and stop-copy) goes to its data fd, within the session's limits (checked before the
    /// device sees the bytes).
    fn device_state(
        &mut self,
        s: &mut Session,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), FrameError> {
        let Some(i) = self.devices.iter().position(|d| d.name() == name) else {
            log::warn!("destination: state for unknown device {name:?}");
            s.device_ok = false;
            return Ok(());
        };
        let n = bytes.len() as u64;
        let device = s.state_bytes[i].saturating_add(n);
        let limit = self.limits.device_state_bytes;
        if device > limit {
            return Err(FrameError::Refused(Refusal::DeviceStateLimit {
                device: name.to_string(),
                bytes: device,
                limit,
            }));
        }
        let total = s.state_bytes.iter().sum::<u64>().saturating_add(n);
        let limit = self.limits.session_state_bytes;
        if total > limit {
            return Err(FrameError::Refused(Refusal::SessionStateLimit {
                bytes: total,
                limit,
            }));
        }
        s.state_bytes[i] = device;
        let d = &mut self.devices[i];
        if !s.resuming[i] {
            s.device_ok &= d.set_state(MigState::Resuming).is_ok();
            s.resuming[i] = true;
        }
        let delivered = d.write_data(bytes).is_ok();
        s.device_ok &= delivered;
        // Only what a device took counts: bytes it refused differ from what was sent.
        if delivered {
            s.state.add(name, bytes);
        }
        Ok(())
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
        // Per region (a guest too large for a frame of page hashes): the pages are
        // counted next, from the source's page hashes of those regions.
        let total_pages: u64 = self.memory.regions().iter().map(|r| r.length / PAGE).sum();
        let per_region = ours.len() as u64 != total_pages;
        self.report.mismatched_pages = if per_region {
            0
        } else {
            mismatched.len() as u64
        };
        self.verify_result = Some(ok);
        self.report.received_state_digest = s.state.value();
        let digest = self.verifier.as_ref().map_or(0, |v| v.digest(&ours));
        let verdict = Frame::VerifyResult {
            ok,
            digest,
            device_digest: self.report.received_state_digest,
            mismatched_regions: Cow::Borrowed(&mismatched),
        };
        if let Err(e) = s.w.write_frame(&verdict) {
            // The peer went away before hearing the verdict: a dropped connection (its
            // retry continues into this memory), not a failure of the destination.
            return Ok(Step::End(SessionEnd::Interrupted(format!(
                "sending VerifyResult: {e}"
            ))));
        }
        Ok(if ok {
            Step::AwaitCommit
        } else if per_region {
            Step::Narrow(mismatched)
        } else {
            Step::End(SessionEnd::Complete)
        })
    }

    /// After a good verdict: the guest is resumed here only once the source hands it
    /// over.
    fn await_commit(r: &mut MainReader, s: &mut Session) -> SessionEnd {
        let v = s.v.as_mut().expect("set by the handshake");
        match r.read_frame() {
            Ok(f @ Frame::Commit) if v.validate(&f).is_ok() => {
                // The guest is ours now: say so before resuming it, so the source knows
                // where it runs. A lost ack changes nothing here (the source committed).
                if let Err(e) = s.w.write_frame(&Frame::CommitAck) {
                    log::warn!("destination: CommitAck not sent ({e}); resuming anyway");
                }
                SessionEnd::Complete
            }
            // The source will not hand over (it says why): nothing to wait for.
            Ok(Frame::Abort { reason }) => SessionEnd::HandoverRefused(reason.into_owned()),
            Ok(other) => {
                SessionEnd::Interrupted(format!("expected Commit, got {:?}", other.kind()))
            }
            Err(e) => SessionEnd::Interrupted(format!("no Commit after the verdict: {e}")),
        }
    }

    /// The verifier's hashes of the received memory (none without a verifier).
    fn hashes(&self) -> Result<Vec<u64>, MigrateError> {
        match &self.verifier {
            Some(v) => Ok(v.hashes(self.memory.as_ref(), max_hashes())?),
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

/// A frame's outcome other than success.
enum FrameError {
    /// The peer did something a source of ours does not.
    Refused(Refusal),
    /// The destination itself failed.
    Local(MigrateError),
}

impl<E: Into<MigrateError>> From<E> for FrameError {
    fn from(e: E) -> Self {
        FrameError::Local(e.into())
    }
}

/// Tell the peer why (best effort) and end the session as refused.
pub(super) fn refuse(s: &mut Session, why: Refusal) -> SessionEnd {
    let _ = s.w.write_frame(&Frame::Abort {
        reason: Cow::Owned(why.to_string()),
    });
    SessionEnd::Refused(why)
}

pub(super) fn is_disconnect(e: &WireError) -> bool {
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
