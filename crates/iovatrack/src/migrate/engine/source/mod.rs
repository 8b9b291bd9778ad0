//! The source side: attempts, pre-copy passes, stop-and-copy, retries.

mod converge;
mod devices;
mod harvest;
mod pass;
mod sent;
mod stop;
mod verify;

pub use converge::Switchover;

use super::channel::{looks_like_tls, Channel, Duplex, Sniff};
use super::hooks::{Checkpoint, Control, SourceHooks, Verifier};
use super::link::{prepare_source_socket, Link, Pacer};
use super::tls::is_permanent;
use super::{
    AttemptError, DeviceReport, EngineConfig, Event, Handover, MigrateError, PassStats,
    SourceReport, StateDigest, TimeoutAction, PAGE, SEND_BATCH,
};
use crate::bitmap::DirtyBitmap;
use crate::layout::Layout;
use crate::migrate::seams::{CpuDirtyLog, DeviceMigration, GuestRam, Vcpus};
use crate::migrate::wire::{Frame, FrameReader, FrameWriter, MemoryLayout};
use crate::range::IovaRange;
use crate::track::{DirtLedger, Tracker};
use std::borrow::Cow;
use std::io::{self, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Instant;

/// What the source engine migrates: the VMM's parts, lent for the migration.
pub struct SourceVm<'a> {
    /// The guest's memory map as the devices see it (ranges are planned from it).
    pub layout: &'a Layout,
    /// Guest RAM.
    pub memory: &'a dyn GuestRam,
    /// The vCPUs.
    pub vcpus: &'a dyn Vcpus,
    /// The CPU's dirty log, one slot per RAM region.
    pub cpu_log: &'a dyn CpuDirtyLog,
    /// One tracker per container (its devices' DMA logging). Empty: device DMA is not
    /// tracked at all (only a negative control does that).
    pub containers: &'a mut [Tracker],
    /// Every migrating device with the index of its container.
    pub devices: &'a mut [(usize, Box<dyn DeviceMigration>)],
    /// Verification before the handover (`None`: the destination takes the guest
    /// unverified).
    pub verifier: Option<&'a dyn Verifier>,
}

/// How an attempt ended early.
enum AttemptEnd {
    /// Retry (connection dropped, cancelled).
    Retry(AttemptError),
    /// Give up cleanly: the source resumes.
    Abort(AttemptError),
    /// The Commit may or may not have reached the destination: the source must not run
    /// the guest again (it might be running there), nor claim success.
    Uncertain(AttemptError),
}

impl<E: Into<AttemptError>> From<E> for AttemptEnd {
    /// Connection-level failures are retried; anything else ends the migration.
    fn from(e: E) -> Self {
        match e.into() {
            e @ (AttemptError::Wire(_) | AttemptError::Io(_)) => AttemptEnd::Retry(e),
            e => AttemptEnd::Abort(e),
        }
    }
}

/// A connection that could not be opened: retried (a link down, a receiver not yet
/// listening), unless the handshake says the next attempt would fail the same way.
fn connect_failed(e: io::Error) -> AttemptEnd {
    if is_permanent(&e) {
        AttemptEnd::Abort(AttemptError::Handshake(e))
    } else {
        AttemptEnd::Retry(AttemptError::Connect(e))
    }
}

/// One attempt's connections to the destination: the main channel, and the extra streams
/// of a multi-stream session.
struct Conn {
    w: FrameWriter<Link<Duplex>>,
    /// Its first bytes kept: a TLS record where the HelloAck was due is a TLS receiver.
    r: FrameReader<Sniff<Duplex>>,
    /// The TCP socket under the main channel, if any, to end the connection at once.
    tcp: Option<TcpStream>,
    /// The extra channels, until the final pass is sent.
    streams: Vec<Stream>,
    /// The TCP sockets under the extra channels (kept apart so a sender thread may end
    /// them all while others write).
    stream_tcp: Vec<TcpStream>,
    /// Bytes the extra channels wrote before they were closed.
    closed_bytes: u64,
    /// Bytes written up to what the destination last acknowledged.
    acked_bytes: u64,
}

/// An extra channel: written by its own sender thread during a pass, never read.
struct Stream {
    w: FrameWriter<Link<Box<dyn Channel>>>,
}

impl Conn {
    /// Drop the link as a failure would (an injected fault, or before a retry).
    fn drop_link(&self) {
        shutdown(self.tcp.as_ref(), &self.stream_tcp);
    }

    /// Every byte written on every channel of this attempt.
    fn bytes(&self) -> u64 {
        let streams: u64 = self.streams.iter().map(|s| s.w.get_ref().bytes).sum();
        self.w.get_ref().bytes + streams + self.closed_bytes
    }

    /// After the final pass: the extra channels have nothing more to carry.
    fn close_streams(&mut self) {
        self.closed_bytes += self
            .streams
            .iter()
            .map(|s| s.w.get_ref().bytes)
            .sum::<u64>();
        self.streams.clear();
        self.stream_tcp.clear();
    }

    /// Tell the destination this attempt ends, best effort.
    fn abort(&mut self, reason: &'static str) {
        let _ = self.w.write_frame(&Frame::Abort {
            reason: Cow::Borrowed(reason),
        });
        let _ = self.w.flush();
    }
}

/// End every connection of an attempt at once (a failure on one fails them all).
fn shutdown(main: Option<&TcpStream>, streams: &[TcpStream]) {
    for t in main.into_iter().chain(streams) {
        let _ = t.shutdown(Shutdown::Both);
    }
}

/// The destination's verdict, as the source heard it.
struct Verdict {
    /// Memory and device state matched: the handover may go ahead.
    ok: bool,
    handover: Handover,
    heard: verify::Heard,
    downtime_ms: f64,
}

/// The source engine's state over all attempts.
struct Source<'a, 'h> {
    cfg: &'a EngineConfig,
    vm: SourceVm<'a>,
    hooks: &'h mut dyn SourceHooks,
    ledger: DirtLedger,
    cpu_log: Vec<Vec<u64>>,
    /// Pages sent in the current pass (no page twice in a pass).
    sent: Vec<DirtyBitmap>,
    /// Every page sent at least once: the lower bound on pages any migration must send.
    touched: Vec<DirtyBitmap>,
    /// Pages sent to the destination's current memory session (the others are zero
    /// there).
    at_dest: Vec<DirtyBitmap>,
    /// The destination memory's session id (from its HelloAck) the ledger's acknowledged
    /// passes went to.
    dest_session: Option<u64>,
    report: SourceReport,
    bandwidth: f64,
    /// Pages sent on the current connection (its Complete frame reports them).
    conn_pages: u64,
    /// The device state sent on the current connection (the destination's digest of what
    /// it received must equal it).
    sent_state: StateDigest,
    /// Auto-converge.
    throttle: converge::Throttle,
    /// The CPU dirty rate over pre-copy.
    rate: harvest::DirtyRate,
    /// Pages the CPU log newly made pending at reads during a pass, for the dirt counted
    /// when the next pass begins (kept over a failed attempt: those pages are still
    /// pending).
    mid_pass_new: u64,
}

impl<'a, 'h> Source<'a, 'h> {
    fn new(
        cfg: &'a EngineConfig,
        vm: SourceVm<'a>,
        hooks: &'h mut dyn SourceHooks,
    ) -> Result<Self, MigrateError> {
        let regions = vm.memory.regions().to_vec();
        let ledger = DirtLedger::new(&regions, PAGE)?;
        let bitmaps: Vec<DirtyBitmap> = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.length / PAGE))
            .collect();
        let cpu_log = regions
            .iter()
            .map(|r| vec![0u64; (r.length / PAGE).div_ceil(64) as usize])
            .collect();
        devices::check_p2p(vm.devices)?;
        Ok(Source {
            cfg,
            vm,
            hooks,
            ledger,
            cpu_log,
            touched: bitmaps.clone(),
            at_dest: bitmaps.clone(),
            dest_session: None,
            sent: bitmaps,
            report: SourceReport::default(),
            bandwidth: 0.0,
            conn_pages: 0,
            sent_state: StateDigest::new(),
            throttle: converge::Throttle::default(),
            rate: harvest::DirtyRate::new(),
            mid_pass_new: 0,
        })
    }

    /// (Re)start dirty tracking on every container with ranges planned from the layout
    /// as it is now.
    fn start_tracking(
        &mut self,
        first: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), MigrateError> {
        if self.vm.containers.is_empty() {
            self.report.mode = "none".into();
            self.hooks.tracking_started(false);
            self.report_devices();
            return Ok(());
        }
        for (i, tracker) in self.vm.containers.iter_mut().enumerate() {
            let mode = if first {
                tracker.start(self.vm.layout)?.clone()
            } else {
                // A retry plans again from the layout as it is now. Same ranges: logging
                // simply goes on. Different ranges: collect what is logged, restart, and
                // count every DMA-able page dirty, since writes between STOP and START are
                // logged nowhere.
                let fresh = tracker
                    .planner()
                    .plan(self.vm.layout)
                    .map_err(crate::track::TrackError::from)?;
                // Compare with what the devices accepted, not with what a fresh plan
                // would ask: after an E2BIG fallback the devices log one wider range,
                // which still covers a fresh plan's DMA-able set when the layout did not
                // change, and restarting would mark all DMA-able memory dirty for nothing.
                let same = tracker.mode().is_some_and(|m| {
                    m.ranges() == fresh.ranges.as_slice()
                        || (matches!(m, crate::track::TrackingMode::Device { .. })
                            && fresh.dma.iter().all(|d| covered(m.ranges(), d)))
                });
                if !same {
                    tracker.finish(&mut self.ledger)?;
                    for r in &fresh.dma {
                        self.ledger.mark_range(*r);
                    }
                    tracker.start(self.vm.layout)?;
                }
                tracker.mode().expect("started above").clone()
            };
            if i == 0 {
                self.report.mode = mode.name().to_string();
                self.report.ranges = mode.ranges().to_vec();
            }
            events(Event::Tracking {
                container: tracker.container().name.clone(),
                mode: mode.name().to_string(),
                ranges: mode.ranges().to_vec(),
                reason: mode.reason().map(|r| r.to_string()),
            });
        }
        self.hooks.tracking_started(true);
        self.report_devices();
        Ok(())
    }

    /// The per-device lines of the report, with their containers' modes.
    fn report_devices(&mut self) {
        let containers = &self.vm.containers;
        self.report.devices = self
            .vm
            .devices
            .iter()
            .map(|(c, d)| {
                let (container, mode) = containers.get(*c).map_or_else(
                    || ("-".to_string(), "none".to_string()),
                    |t| {
                        (
                            t.container().name.clone(),
                            t.mode().map_or("none", |m| m.name()).to_string(),
                        )
                    },
                );
                DeviceReport {
                    name: d.name().to_string(),
                    container,
                    mode,
                    state_bytes: 0,
                }
            })
            .collect();
    }

    /// The CPU's log and every container's, into the ledger. Returns what the CPU log's
    /// read found and the device pages.
    fn collect(&mut self) -> Result<(harvest::Harvest, u64), AttemptError> {
        let cpu = harvest::harvest(self.vm.cpu_log, &mut self.cpu_log, &mut self.ledger)?;
        let mut dev = 0;
        for tracker in self.vm.containers.iter_mut() {
            let st = tracker.collect(&mut self.ledger)?;
            dev += st.device_bits;
            self.report.report_errors += st.report_errors;
            self.report.rearms += st.rearms;
            self.report.fallbacks += st.fallbacks;
        }
        if self.vm.containers.iter().any(|t| t.mode().is_some()) {
            // A failed re-arm may have changed a container's mode.
            self.report_devices();
            if let Some(m) = self.vm.containers.first().and_then(Tracker::mode) {
                self.report.mode = m.name().to_string();
            }
        }
        self.report.cpu_dirty_pages += cpu.bits;
        self.report.device_dirty_pages += dev;
        Ok((cpu, dev))
    }

    fn est_downtime_ms(&self) -> f64 {
        let bw = if self.bandwidth > 0.0 {
            self.bandwidth
        } else if self.cfg.bandwidth > 0 {
            self.cfg.bandwidth as f64
        } else {
            1e9
        };
        self.ledger.pending_pages() as f64 * (PAGE as f64 + 12.0) / bw * 1000.0
    }

    /// One attempt over a connection from `connect` (and, with several streams, as many
    /// more).
    fn attempt(
        &mut self,
        connect: &mut dyn FnMut() -> io::Result<Box<dyn Channel>>,
        attempt: u32,
        started: Instant,
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        let channel = connect().map_err(connect_failed)?;
        let tcp = channel.tcp().map(TcpStream::try_clone).transpose()?;
        if let Some(t) = &tcp {
            prepare_source_socket(t)?;
            t.set_read_timeout(Some(self.cfg.read_timeout))?;
        }
        let duplex = Duplex::new(channel);
        let pacer = Pacer::new(self.cfg.bandwidth);
        let mut c = Conn {
            w: FrameWriter::buffered(Link::new(duplex.clone(), pacer.clone()), SEND_BATCH),
            r: FrameReader::new(Sniff::new(duplex)),
            tcp,
            streams: Vec::new(),
            stream_tcp: Vec::new(),
            closed_bytes: 0,
            acked_bytes: 0,
        };
        self.conn_pages = 0;
        // A new connection is a new destination session: its device streams start over.
        self.sent_state.clear();
        let regions = self.vm.memory.regions().to_vec();
        let layout = MemoryLayout::new(PAGE, self.vm.vcpus.kind(), regions)
            .map_err(|e| AttemptEnd::Abort(AttemptError::Layout(e)))?;
        c.w.write_frame(&layout.hello())?;
        c.w.flush()?;
        // (Owned: the reader's first bytes are looked at when it failed.)
        let answer = match c.r.read_frame().map(Frame::into_owned) {
            // A TLS receiver answers a Hello in the clear with an alert, then closes:
            // "truncated frame" would hide why, and retrying cannot help.
            Err(_) if looks_like_tls(c.r.get_ref().head()) => {
                return Err(AttemptEnd::Abort(AttemptError::DestinationSpeaksTls))
            }
            answer => answer?,
        };
        let session = match answer {
            Frame::HelloAck { session } => session,
            Frame::Abort { reason } => {
                return Err(AttemptEnd::Abort(AttemptError::DestinationAborted(
                    reason.into_owned(),
                )))
            }
            other => {
                return Err(AttemptEnd::Abort(AttemptError::Unexpected {
                    expected: "HelloAck",
                    got: other.kind(),
                }))
            }
        };
        self.join_session(session);
        let result = match self.open_streams(&mut c, session, connect, &pacer) {
            Ok(()) => self.precopy(&mut c, attempt, started, events),
            Err(e) => Err(e),
        };
        self.report.bytes_on_wire += c.bytes();
        self.report.bytes_sent += c.acked_bytes;
        if result.is_err() {
            // Whatever is still queued on a dead link would otherwise hold the close up.
            c.drop_link();
        }
        result
    }

    /// With several streams: say how many on the main channel, then open the others
    /// through `connect` (the same transport) and have each join `session`.
    fn open_streams(
        &mut self,
        c: &mut Conn,
        session: u64,
        connect: &mut dyn FnMut() -> io::Result<Box<dyn Channel>>,
        pacer: &Arc<Pacer>,
    ) -> Result<(), AttemptEnd> {
        let count = self.cfg.streams.max(1);
        self.report.streams = count;
        if count == 1 {
            return Ok(());
        }
        c.w.write_frame(&Frame::Streams { count })?;
        c.w.flush()?;
        for stream in 1..count {
            let ch = connect().map_err(connect_failed)?;
            if let Some(t) = ch.tcp() {
                prepare_source_socket(t)?;
                c.stream_tcp.push(t.try_clone()?);
            }
            let mut w = FrameWriter::buffered(Link::new(ch, pacer.clone()), SEND_BATCH);
            w.write_frame(&Frame::Join { session, stream })?;
            w.flush()?;
            c.streams.push(Stream { w });
        }
        Ok(())
    }

    /// A destination memory session other than the one the ledger's acknowledged passes
    /// went to (a restarted receiver, or one that reset its memory after a stranger wrote
    /// to it) holds none of them: everything is dirty again, and nothing is there but
    /// zeros.
    fn join_session(&mut self, session: u64) {
        match self.dest_session {
            Some(prev) if prev != session => {
                log::warn!(
                    "the destination's memory session changed ({prev:#x} -> {session:#x}): a new destination, starting over with pass 0"
                );
                self.ledger.mark_all();
                for b in &mut self.at_dest {
                    b.clear();
                }
                self.report.new_destination_sessions += 1;
            }
            _ => {}
        }
        self.dest_session = Some(session);
    }

    fn precopy(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        started: Instant,
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        // The devices enter PRE_COPY: their initial state travels while the guest runs.
        self.devices_to_precopy()?;
        let deadline = started + self.cfg.timeout;
        let mut pass = 0u32;
        let mut last_bytes = 0u64;
        let mut cut = false;
        loop {
            let (cpu, dev) = if pass == 0 && attempt == 0 {
                (0, 0)
            } else {
                self.hooks.at(Checkpoint::Collect {
                    attempt,
                    pass,
                    final_pass: false,
                });
                let (read, dev) = self.collect()?;
                self.rate.close(read.bits);
                // The pages the CPU dirtied since the last pass began, each once (QEMU's
                // `num_dirty_pages_period`): newly pending at a read during that pass or
                // now. A page rewritten in every window is one page to resend, not many.
                let cpu = read.new + std::mem::take(&mut self.mid_pass_new);
                if let Some(pct) = self.throttle.observe(self.cfg, cpu * PAGE, last_bytes) {
                    self.vm.vcpus.throttle(pct)?;
                    self.report.throttle_pct = pct;
                    events(Event::Throttle { pct });
                }
                (cpu, dev)
            };
            let forced = match self.hooks.at(Checkpoint::PassStart { attempt, pass }) {
                Control::Continue => false,
                Control::Switchover => true,
                Control::Cancel => {
                    c.abort("cancelled");
                    return Err(AttemptEnd::Retry(AttemptError::Cancelled { pass }));
                }
                Control::DropLink => {
                    c.drop_link();
                    return Err(AttemptEnd::Retry(AttemptError::Dropped { pass }));
                }
            };
            if pass > 0 || forced {
                let timed_out = cut || Instant::now() >= deadline;
                if timed_out && self.cfg.timeout_action == TimeoutAction::Cancel {
                    c.abort("timeout");
                    return Err(AttemptEnd::Abort(AttemptError::Timeout(self.cfg.timeout)));
                }
                let why = if forced {
                    Some(Switchover::Forced)
                } else if timed_out {
                    Some(Switchover::Timeout)
                } else if self.est_downtime_ms() <= self.cfg.downtime_ms as f64 {
                    Some(Switchover::Converged)
                } else if pass >= self.cfg.max_iterations {
                    Some(Switchover::MaxIterations)
                } else {
                    None
                };
                if let Some(reason) = why {
                    self.report.switchover_reason = reason;
                    events(Event::Switchover { reason });
                    return self.stop_and_copy(c, attempt, pass, (cpu, dev), events);
                }
            }
            self.ledger
                .begin_pass()
                .map_err(|e| AttemptEnd::Abort(e.into()))?;
            // Every pass, pass 0 included, ends by the deadline: a pass cut short sends
            // what it has, and the rest goes back to pending for stop-and-copy.
            let sent = self.send_pass(c, attempt, pass, Some(deadline), events)?;
            expect(
                &mut c.r,
                "Ack",
                |f| matches!(f, Frame::Ack { pass: p } if *p == pass),
            )?;
            if sent.cut {
                self.ledger
                    .ack_delivered(&self.sent)
                    .map_err(|e| AttemptEnd::Abort(e.into()))?;
                self.report.passes_cut += 1;
                cut = true;
            } else {
                self.ledger.ack();
            }
            c.acked_bytes = c.bytes();
            self.report.pages_sent += sent.pages;
            self.report.passes += 1;
            last_bytes = sent.bytes;
            if pass == 0 {
                self.send_device_states(c)?;
            }
            // What this pass would have cost as the stop-and-copy pass.
            let est = if self.bandwidth > 0.0 {
                sent.bytes as f64 / self.bandwidth * 1000.0
            } else {
                0.0
            };
            events(Event::Pass(PassStats {
                attempt,
                pass,
                pages: sent.pages,
                bytes: sent.bytes,
                secs: sent.secs,
                cpu_dirty: cpu,
                device_dirty: dev,
                est_downtime_ms: est,
                final_pass: false,
            }));
            pass += 1;
        }
    }

    /// After a failed attempt: the pass in flight goes back into the ledger, and the
    /// devices and vCPUs run again (the source owns the guest until the destination has
    /// it).
    fn take_back(&mut self) {
        self.ledger.rollback();
        self.devices_to_running();
        self.report.source_resumed = self.vm.vcpus.resume().is_ok();
    }
}

/// Whether the union of `ranges` holds all of `r`.
fn covered(ranges: &[IovaRange], r: &IovaRange) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|x| x.iova);
    let mut at = r.iova as u128;
    for x in &sorted {
        if at >= r.end() {
            break;
        }
        if (x.iova as u128) <= at && x.end() > at {
            at = x.end();
        }
    }
    at >= r.end()
}

/// Read one frame and check it is the one expected.
fn expect<R: Read>(
    r: &mut FrameReader<R>,
    expected: &'static str,
    ok: impl Fn(&Frame<'_>) -> bool,
) -> Result<(), AttemptEnd> {
    let f = r.read_frame()?;
    if ok(&f) {
        return Ok(());
    }
    Err(AttemptEnd::Abort(match f {
        Frame::Abort { reason } => AttemptError::DestinationAborted(reason.into_owned()),
        other => AttemptError::Unexpected {
            expected,
            got: other.kind(),
        },
    }))
}

/// Migrate `vm` to whatever `connect` returns, retrying after a dropped connection or a
/// cancel up to `cfg.retries` times. With `cfg.streams` N > 1 each attempt calls
/// `connect` N times: the main channel, then N − 1 that join its session. Tracking starts
/// here (nothing is spent on it before), and is stopped on return. On success the
/// source's vCPUs stay paused (the guest runs at the destination); after a clean failure
/// they run again.
pub fn run_source<C: Into<Box<dyn Channel>>>(
    cfg: &EngineConfig,
    vm: SourceVm<'_>,
    hooks: &mut dyn SourceHooks,
    mut connect: impl FnMut() -> io::Result<C>,
    events: &mut dyn FnMut(Event),
) -> Result<SourceReport, MigrateError> {
    let mut src = Source::new(cfg, vm, hooks)?;
    // The main channel and every extra stream open through this one `connect`.
    let mut connect = move || -> io::Result<Box<dyn Channel>> { connect().map(Into::into) };
    // Everything dirtied before pass 0 is covered by pass 0: drop what the CPU log holds.
    for (slot, buf) in src.cpu_log.iter_mut().enumerate() {
        src.vm.cpu_log.read_and_clear(slot, buf)?;
    }
    // The dirty rate's first window opens with the log empty.
    src.rate.open();
    src.start_tracking(true, events)?;
    src.ledger.mark_all();
    let mut attempt = 0u32;
    let outcome = loop {
        let started = Instant::now();
        let res = src.attempt(&mut connect, attempt, started, events);
        match res {
            Ok(v) if v.ok => break Ok(v),
            Ok(v) => {
                // A destination that verified wrong memory or device state keeps nothing
                // running there: the source takes its guest back.
                src.report.mismatched_pages = v.heard.mismatched;
                src.report.device_state_matched = v.heard.device_state_matched();
                src.report.sent_state_digest = v.heard.device_digests.0;
                // The guest was paused that long, whatever the verdict.
                src.report.downtime_ms = v.downtime_ms;
                src.take_back();
                let e = v.heard.failure().unwrap_or(AttemptError::Mismatch(0));
                break Err(e);
            }
            Err(AttemptEnd::Uncertain(e)) => break Err(e),
            Err(AttemptEnd::Retry(e)) if attempt < cfg.retries => {
                src.take_back();
                attempt += 1;
                events(Event::Retry {
                    attempt,
                    reason: e.to_string(),
                });
                // The layout may have changed meanwhile: plan again.
                if let Err(t) = src.start_tracking(false, events) {
                    src.report.aborted =
                        Some(format!("{e}; then restarting dirty tracking failed: {t}"));
                    break Err(e);
                }
            }
            Err(AttemptEnd::Retry(e) | AttemptEnd::Abort(e)) => {
                src.take_back();
                break Err(e);
            }
        }
    };
    src.report.attempts = attempt + 1;
    src.report.cpu_dirty_bytes_per_s = src.rate.bytes_per_s(PAGE);
    if src.report.throttle_pct > 0 {
        // Full speed again, wherever the guest runs on.
        let _ = src.vm.vcpus.throttle(0);
    }
    src.report.distinct_pages_sent = src.touched.iter().map(DirtyBitmap::count_ones).sum();
    match outcome {
        Ok(v) => {
            src.report.verified = v.ok;
            src.report.handover = v.handover;
            if v.handover == Handover::Unacknowledged {
                src.report.aborted = Some(
                    "Commit was sent but the destination never acknowledged it: the guest stays paused here and the destination's state is unknown (check it before resuming either side)".into(),
                );
            }
            src.report.mismatched_pages = v.heard.mismatched;
            src.report.device_state_matched = v.heard.device_state_matched();
            src.report.sent_state_digest = v.heard.device_digests.0;
            src.report.downtime_ms = v.downtime_ms;
            src.report.downtime_exceeded = v.downtime_ms > cfg.downtime_ms as f64;
        }
        Err(e) => {
            if src.report.aborted.is_none() {
                src.report.aborted = Some(e.to_string());
            }
        }
    }
    for t in src.vm.containers.iter_mut() {
        t.stop();
    }
    Ok(src.report)
}
