//! The source side: pre-copy passes, stop-and-copy, retries.

use super::{
    detect_dead_link, hash_bytes, page_hashes, region_hashes, Event, Fault, MigrateConfig,
    MigrateError, PassStats, Summary, TimeoutAction, FRAME_PAGES, PAGE, WRITE_TIMEOUT,
};
use crate::bitmap::DirtyBitmap;
use crate::device::{DmaLogger, EmulatedDevice, Errno, MigState};
use crate::layout::Layout;
use crate::migrate::dma::{DmaSink, DmaWorkload};
use crate::migrate::guest::{self, GuestConfig, GuestCpu, GuestMemory};
use crate::migrate::guest_regions;
use crate::migrate::wire::{Frame, FrameReader, FrameWriter, Limits, MemoryLayout, WireError};
use crate::plan::filter::{dma_able, FilterOptions};
use crate::plan::Planner;
use crate::range::IovaRange;
use crate::track::{Container, DirtLedger, TrackError, Tracker};
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A writer that counts bytes and caps the rate.
struct Link<W> {
    inner: W,
    bytes: u64,
    cap: u64,
    started: Instant,
}

impl<W: Write> Link<W> {
    fn pace(&mut self, n: usize) {
        self.bytes += n as u64;
        if self.cap > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.cap as f64);
            let el = self.started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
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

/// Why an attempt ended early.
enum AttemptEnd {
    /// Retry (connection dropped, cancelled).
    Retry(String),
    /// Give up cleanly.
    Abort(String),
    /// The Commit may or may not have reached the destination: the source must not run
    /// the guest again (it might be running there), nor claim success.
    Uncertain(String),
}

impl From<WireError> for AttemptEnd {
    fn from(e: WireError) -> Self {
        AttemptEnd::Retry(format!("connection: {e}"))
    }
}

impl From<io::Error> for AttemptEnd {
    fn from(e: io::Error) -> Self {
        AttemptEnd::Retry(format!("connection: {e}"))
    }
}

/// One connection to the destination.
struct Conn {
    w: FrameWriter<Link<io::BufWriter<TcpStream>>>,
    r: FrameReader<TcpStream>,
    stream: TcpStream,
}

/// What kind of pass to send.
#[derive(Clone, Copy)]
struct PassKind {
    /// Leave zero pages out (pass 0: the destination starts zeroed).
    skip_zero: bool,
    /// Injected fault: drop the connection half-way through.
    drop_midway: bool,
    /// The stop-and-copy pass.
    final_pass: bool,
}

/// The destination's verdict, as the source heard it.
struct Verdict {
    ok: bool,
    mismatched: u64,
    downtime_ms: f64,
}

/// The source side.
struct Source<'a> {
    cfg: &'a MigrateConfig,
    memory: Arc<GuestMemory>,
    guest: Box<dyn GuestCpu>,
    device: Arc<EmulatedDevice>,
    tracker: Tracker,
    dma: DmaWorkload,
    ledger: DirtLedger,
    kvm_log: Vec<Vec<u64>>,
    sent: Vec<DirtyBitmap>,
    /// Every page sent at least once: the lower bound on pages any migration must send.
    touched: Vec<DirtyBitmap>,
    page_buf: Vec<u8>,
    summary: Summary,
    bandwidth: f64,
    /// Pages sent on the current connection (its Complete frame reports them).
    conn_pages: u64,
    /// The injected REPORT failure has happened.
    report_fault_fired: bool,
}

/// The device's DMA-able memory: the planner's filter over the layout, minus the guest's
/// reserved setup area, inside guest RAM.
fn dma_targets(layout: &Layout, regions: &[IovaRange], reserved: IovaRange) -> Vec<IovaRange> {
    let set = dma_able(layout, &FilterOptions::default());
    let mut out = Vec::new();
    for (_, r) in set.ranges {
        let mut a = r.iova as u128;
        let z = r.end();
        // The reserved area starts the first region, which starts at 0 (checked).
        if a < reserved.end() {
            a = reserved.end();
        }
        for g in regions {
            let (ga, gz) = (g.iova as u128, g.end());
            let (lo, hi) = (a.max(ga), z.min(gz));
            if lo < hi {
                out.push(IovaRange::new(lo as u64, (hi - lo) as u64));
            }
        }
    }
    out.sort_unstable();
    out
}

impl<'a> Source<'a> {
    fn new(cfg: &'a MigrateConfig) -> Result<Self, MigrateError> {
        let regions = guest_regions(&cfg.layout);
        if regions.first().is_none_or(|r| r.0 != 0) {
            return Err(MigrateError::Layout(
                "the guest needs RAM at address 0 (its page tables and code live there)".into(),
            ));
        }
        let memory = Arc::new(GuestMemory::new(&regions)?);
        // The guest's own setup (page tables, code, stack): no DMA there.
        let reserved = guest::x86::SetupLayout::for_memory(&memory)?.reserved;
        let gcfg = GuestConfig {
            rate_pages_per_sec: cfg.cpu_rate,
            ..GuestConfig::default()
        };
        let guest = guest::start_guest(memory.clone(), &gcfg, cfg.use_kvm)?;
        let device = Arc::new(EmulatedDevice::new(cfg.device).named("dma0"));
        if cfg.faults.contains(&Fault::StartE2big) {
            device.refuse_start(Errno::E2BIG, Some(1));
        }
        let planner = Planner::new().max_ranges(cfg.max_ranges).device(cfg.device);
        let tracker = Tracker::new(
            Container::new("container0").device(device.clone() as Arc<dyn DmaLogger>),
            planner,
        );
        let targets = dma_targets(&cfg.layout, memory.regions(), reserved);
        // Writes before migration starts are covered by pass 0; only the negative control
        // counts writes as unlogged (from when tracking would have started).
        let dma = DmaWorkload::start(
            memory.clone(),
            vec![device.clone() as Arc<dyn DmaSink>],
            targets,
            cfg.dma,
        );
        let ledger = DirtLedger::new(memory.regions(), PAGE)?;
        let kvm_log = (0..memory.regions().len())
            .map(|i| vec![0u64; memory.bitmap_words(i).unwrap_or(0)])
            .collect();
        let sent: Vec<DirtyBitmap> = memory
            .regions()
            .iter()
            .map(|r| DirtyBitmap::new(r.length / PAGE))
            .collect();
        let touched = sent.clone();
        let summary = Summary {
            guest: guest.kind().to_string(),
            faults: cfg.faults.iter().map(|f| f.to_string()).collect(),
            ..Summary::default()
        };
        Ok(Source {
            cfg,
            memory,
            guest,
            device,
            tracker,
            dma,
            ledger,
            kvm_log,
            sent,
            touched,
            page_buf: vec![0; FRAME_PAGES * PAGE as usize],
            summary,
            bandwidth: 0.0,
            conn_pages: 0,
            report_fault_fired: false,
        })
    }

    /// (Re)start dirty tracking with ranges planned from the layout as it is now.
    fn start_tracking(
        &mut self,
        first: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<(), MigrateError> {
        if !self.cfg.device_tracking {
            self.summary.mode = "none".into();
            self.dma.set_logged(false);
            return Ok(());
        }
        let mode = if first {
            self.tracker.start(&self.cfg.layout)?
        } else {
            // A retry plans again from the layout as it is now. Same ranges: logging simply
            // goes on. Different ranges: collect what is logged, restart, and count every
            // DMA-able page dirty, since writes between STOP and START are logged nowhere.
            let planner = Planner::new()
                .max_ranges(self.cfg.max_ranges)
                .device(self.cfg.device);
            let fresh = planner.plan(&self.cfg.layout).map_err(TrackError::from)?;
            let same = self
                .tracker
                .mode()
                .is_some_and(|m| m.ranges() == fresh.ranges.as_slice());
            if same {
                self.tracker.mode().expect("checked above")
            } else {
                self.tracker.finish(&mut self.ledger)?;
                for r in &fresh.dma {
                    self.ledger.mark_range(*r);
                }
                self.tracker.start(&self.cfg.layout)?
            }
        };
        self.summary.mode = mode.name().to_string();
        self.summary.ranges = mode.ranges().to_vec();
        events(Event::Tracking {
            mode: mode.name().to_string(),
            ranges: mode.ranges().to_vec(),
            reason: mode.reason().map(|r| r.to_string()),
        });
        self.dma.set_logged(true);
        Ok(())
    }

    /// KVM's log and the tracker's, into the ledger. Returns (cpu pages, device pages).
    fn collect(&mut self) -> Result<(u64, u64), MigrateError> {
        let mut cpu = 0;
        for (slot, buf) in self.kvm_log.iter_mut().enumerate() {
            self.guest.dirty_log(slot, buf)?;
            cpu += buf.iter().map(|w| w.count_ones() as u64).sum::<u64>();
            self.ledger.or_region_words(slot, buf)?;
        }
        let mut dev = 0;
        if self.cfg.device_tracking {
            let st = self.tracker.collect(&mut self.ledger)?;
            dev = st.device_bits;
            self.summary.report_errors += st.report_errors;
        }
        self.summary.cpu_dirty_pages += cpu;
        self.summary.device_dirty_pages += dev;
        Ok((cpu, dev))
    }

    /// Send the in-flight pages of the ledger as pass `pass`.
    fn send_pass(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        pass: u32,
        how: PassKind,
        events: &mut dyn FnMut(Event),
    ) -> Result<(u64, u64, f64), AttemptEnd> {
        let PassKind {
            skip_zero,
            drop_midway,
            final_pass,
        } = how;
        let w = &mut c.w;
        let started = Instant::now();
        let bytes0 = w.get_ref().bytes;
        // Zero pages need not travel on pass 0: the destination's memory starts zeroed.
        let mut pages: Vec<(usize, u64, u64)> = Vec::new(); // (region, first bit, count)
        let mut total = 0u64;
        for region in 0..self.memory.regions().len() {
            let base = self.memory.regions()[region].iova;
            // Pages never written need not even be read (pagemap says so).
            let never = if skip_zero {
                self.memory.never_written(region)
            } else {
                None
            };
            let untouched = |b: u64| {
                never
                    .as_ref()
                    .is_some_and(|w| w[(b / 64) as usize] >> (b % 64) & 1 == 1)
            };
            for (first, len) in self.ledger.inflight(region).runs() {
                if !skip_zero {
                    pages.push((region, first, len));
                    total += len;
                    continue;
                }
                let mut run: Option<(u64, u64)> = None;
                for b in first..first + len {
                    let zero =
                        untouched(b) || self.memory.is_zero_page(base + b * PAGE).unwrap_or(false);
                    match (&mut run, zero) {
                        (Some(r), false) => r.1 += 1,
                        (None, false) => run = Some((b, 1)),
                        (Some(r), true) => {
                            pages.push((region, r.0, r.1));
                            total += r.1;
                            run = None;
                        }
                        (None, true) => {}
                    }
                }
                if let Some(r) = run {
                    pages.push((region, r.0, r.1));
                    total += r.1;
                }
            }
        }
        events(Event::PassStart {
            attempt,
            pass,
            pages: total,
            final_pass,
        });
        w.write_frame(&Frame::PassBegin { pass, pages: total })?;
        for s in &mut self.sent {
            s.clear();
        }
        let mut sent = 0u64;
        for (region, first, len) in pages {
            let base = self.memory.regions()[region].iova;
            let mut at = first;
            while at < first + len {
                let n = (first + len - at).min(FRAME_PAGES as u64);
                for i in 0..n {
                    let bit = at + i;
                    if self.sent[region].is_set(bit) {
                        self.summary.duplicate_pages_sent += 1;
                    }
                    let _ = self.sent[region].set(bit);
                    let _ = self.touched[region].set(bit);
                    let off = (i * PAGE) as usize;
                    self.memory
                        .read_page(
                            base + bit * PAGE,
                            &mut self.page_buf[off..off + PAGE as usize],
                        )
                        .map_err(|e| AttemptEnd::Abort(format!("reading guest memory: {e}")))?;
                }
                w.write_pages(
                    base + at * PAGE,
                    n as u32,
                    &self.page_buf[..(n * PAGE) as usize],
                )?;
                sent += n;
                at += n;
                if sent.is_multiple_of(8192) || at == first + len {
                    events(Event::PassProgress { sent });
                }
                if drop_midway && sent * 2 >= total {
                    // The injected fault: the link goes down half-way through the pass.
                    let _ = c.stream.shutdown(Shutdown::Both);
                    return Err(AttemptEnd::Retry(format!(
                        "connection dropped during pass {pass} (injected)"
                    )));
                }
            }
        }
        if drop_midway {
            // A pass too small to drop half-way through drops before its end.
            let _ = c.stream.shutdown(Shutdown::Both);
            return Err(AttemptEnd::Retry(format!(
                "connection dropped during pass {pass} (injected)"
            )));
        }
        w.write_frame(&Frame::PassEnd {
            pass,
            pages_sent: sent,
        })?;
        let secs = started.elapsed().as_secs_f64();
        let bytes = w.get_ref().bytes - bytes0;
        if bytes > 1 << 20 && secs > 0.0 {
            self.bandwidth = bytes as f64 / secs;
        }
        self.summary.pages_sent += sent;
        self.summary.passes += 1;
        self.conn_pages += sent;
        Ok((sent, bytes, secs))
    }

    /// Read the device's migration data fd: in PRE_COPY what is available now (up to
    /// ENOMSG), in STOP_COPY everything (up to end of stream).
    fn drain_device_state(&self) -> Result<Vec<u8>, crate::device::DeviceError> {
        let mut state = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.device.migration().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => state.extend_from_slice(&buf[..n]),
                Err(e) if e.errno == Errno::ENOMSG => break,
                Err(e) => return Err(e),
            }
        }
        Ok(state)
    }

    /// Arm the injected REPORT failure (EIO on the next REPORT) once, on the first attempt.
    fn inject_report_fault(&mut self, attempt: u32, when: impl Fn(u32) -> bool) {
        let due = self
            .cfg
            .faults
            .iter()
            .any(|f| matches!(f, Fault::ReportFail(n) if when(*n)));
        if attempt == 0 && due && !self.report_fault_fired {
            self.device.fail_report(1, Errno::EIO);
            self.report_fault_fired = true;
        }
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

    /// One attempt over one connection. `first` marks everything dirty for pass 0.
    fn attempt(
        &mut self,
        stream: TcpStream,
        attempt: u32,
        started: Instant,
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        stream.set_nodelay(true)?;
        detect_dead_link(&stream)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        // A backstop: a dead link fails the write via TCP_USER_TIMEOUT first.
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let link = Link {
            inner: io::BufWriter::with_capacity(1 << 20, stream.try_clone()?),
            bytes: 0,
            cap: self.cfg.bandwidth,
            started: Instant::now(),
        };
        let mut c = Conn {
            w: FrameWriter::new(link),
            r: FrameReader::new(stream.try_clone()?),
            stream,
        };
        self.conn_pages = 0;
        let regions = self.memory.regions().to_vec();
        let layout = MemoryLayout::new(PAGE, self.guest.kind(), regions)
            .map_err(|e| AttemptEnd::Abort(e.to_string()))?;
        c.w.write_frame(&layout.hello())?;
        c.w.flush()?;
        expect(&mut c.r, "HelloAck", |f| matches!(f, Frame::HelloAck))?;
        let result = self.precopy(&mut c, attempt, started, events);
        self.summary.bytes_sent += c.w.get_ref().bytes;
        if result.is_err() {
            // Dropping the BufWriter flushes it: on a dead link that would block for another
            // write timeout before the retry could start.
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        result
    }

    fn precopy(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        started: Instant,
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        // The device enters PRE_COPY: its initial state travels while the guest runs.
        self.device
            .migration()
            .set_state(MigState::PreCopy)
            .map_err(|e| AttemptEnd::Abort(e.to_string()))?;
        let mut pass = 0u32;
        loop {
            let (cpu, dev) = if pass == 0 && attempt == 0 {
                (0, 0)
            } else {
                self.inject_report_fault(attempt, |n| n == pass);
                self.collect()
                    .map_err(|e| AttemptEnd::Abort(e.to_string()))?
            };
            if attempt == 0 && self.cfg.faults.contains(&Fault::CancelAt(pass)) {
                let _ = c.w.write_frame(&Frame::Abort {
                    reason: Cow::Borrowed("cancelled"),
                });
                let _ = c.w.flush();
                return Err(AttemptEnd::Retry(format!(
                    "cancelled at pass {pass} (injected)"
                )));
            }
            if pass > 0 {
                let est = self.est_downtime_ms();
                let timed_out = started.elapsed() >= self.cfg.timeout;
                if timed_out && self.cfg.timeout_action == TimeoutAction::Cancel {
                    let _ = c.w.write_frame(&Frame::Abort {
                        reason: Cow::Borrowed("timeout"),
                    });
                    let _ = c.w.flush();
                    return Err(AttemptEnd::Abort(format!(
                        "pre-copy did not converge within {:?} (timeout action: cancel)",
                        self.cfg.timeout
                    )));
                }
                if est <= self.cfg.downtime_ms as f64
                    || pass >= self.cfg.max_iterations
                    || timed_out
                {
                    let drop = attempt == 0 && self.cfg.faults.contains(&Fault::DropAt(pass));
                    return self.stop_and_copy(c, attempt, pass, (cpu, dev), drop, events);
                }
            }
            self.ledger
                .begin_pass()
                .map_err(|e| AttemptEnd::Abort(e.to_string()))?;
            let how = PassKind {
                skip_zero: pass == 0 && attempt == 0,
                drop_midway: attempt == 0 && self.cfg.faults.contains(&Fault::DropAt(pass)),
                final_pass: false,
            };
            let (pages, bytes, secs) = self.send_pass(c, attempt, pass, how, events)?;
            c.w.flush()?;
            expect(
                &mut c.r,
                "Ack",
                |f| matches!(f, Frame::Ack { pass: p } if *p == pass),
            )?;
            self.ledger.ack();
            if pass == 0 {
                let initial = self
                    .drain_device_state()
                    .map_err(|e| AttemptEnd::Abort(e.to_string()))?;
                if !initial.is_empty() {
                    c.w.write_frame(&Frame::DeviceState {
                        name: Cow::Borrowed("dma0"),
                        bytes: Cow::Owned(initial),
                    })?;
                }
            }
            // What this pass would have cost as the stop-and-copy pass.
            let est = if self.bandwidth > 0.0 {
                bytes as f64 / self.bandwidth * 1000.0
            } else {
                0.0
            };
            events(Event::Pass(PassStats {
                attempt,
                pass,
                pages,
                bytes,
                secs,
                cpu_dirty: cpu,
                device_dirty: dev,
                est_downtime_ms: est,
                final_pass: false,
            }));
            pass += 1;
        }
    }

    fn stop_and_copy(
        &mut self,
        c: &mut Conn,
        attempt: u32,
        pass: u32,
        collected: (u64, u64),
        drop: bool,
        events: &mut dyn FnMut(Event),
    ) -> Result<Verdict, AttemptEnd> {
        let abort = |e: &dyn std::fmt::Display| AttemptEnd::Abort(e.to_string());
        let paused_at = Instant::now();
        self.guest.pause().map_err(|e| abort(&e))?;
        self.dma.pause();
        self.device
            .migration()
            .set_data(format!("dma0 writes={} ", self.dma.writes()).into_bytes());
        self.device
            .migration()
            .set_state(MigState::StopCopy)
            .map_err(|e| abort(&e))?;
        // A REPORT fault planned for a pass the migration did not reach hits the final one.
        self.inject_report_fault(attempt, |n| n >= pass);
        let (cpu, dev) = self.collect().map_err(|e| abort(&e))?;
        self.ledger.begin_pass().map_err(|e| abort(&e))?;
        let how = PassKind {
            skip_zero: false,
            drop_midway: drop,
            final_pass: true,
        };
        let (pages, bytes, secs) = self.send_pass(c, attempt, pass, how, events)?;
        // Device state: the rest of the data fd's stream (STOP_COPY runs to its end).
        let state = self.drain_device_state().map_err(|e| abort(&e))?;
        self.summary.device_state_digest = hash_bytes(self.device.migration().data());
        c.w.write_frame(&Frame::DeviceState {
            name: Cow::Borrowed("dma0"),
            bytes: Cow::Owned(state),
        })?;
        let vcpu = self.guest.state_bytes().map_err(|e| abort(&e))?;
        c.w.write_frame(&Frame::VcpuState {
            index: 0,
            bytes: Cow::Owned(vcpu),
        })?;
        c.w.flush()?;
        expect(
            &mut c.r,
            "Ack",
            |f| matches!(f, Frame::Ack { pass: p } if *p == pass),
        )?;
        self.ledger.ack();
        let downtime_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
        events(Event::Pass(PassStats {
            attempt,
            pass,
            pages,
            bytes,
            secs,
            cpu_dirty: cpu + collected.0,
            device_dirty: dev + collected.1,
            est_downtime_ms: downtime_ms,
            final_pass: true,
        }));
        // Verification: one hash per page where it fits a frame, else one per region.
        let page_hashes = page_hashes(&self.memory).map_err(|e| abort(&e))?;
        let digest = guest::hash_words(page_hashes.iter().copied());
        c.w.write_frame(&Frame::Complete {
            total_pages: self.conn_pages,
            digest,
        })?;
        let max_hashes = (Limits::default().max_payload as usize - 64) / 8;
        let hashes = if page_hashes.len() <= max_hashes {
            page_hashes
        } else {
            region_hashes(&self.memory, &page_hashes)
        };
        c.w.write_frame(&Frame::Verify {
            digest,
            region_hashes: Cow::Owned(hashes),
        })?;
        c.w.flush()?;
        let f = c.r.read_frame()?;
        let (ok, mismatched) = match f {
            Frame::VerifyResult {
                ok,
                mismatched_regions,
                ..
            } => (ok, mismatched_regions.len() as u64),
            other => {
                return Err(AttemptEnd::Abort(format!(
                    "expected VerifyResult, got {:?}",
                    other.kind()
                )))
            }
        };
        if ok && attempt == 0 && self.cfg.faults.contains(&Fault::DropBeforeCommit) {
            let _ = c.stream.shutdown(Shutdown::Both);
            return Err(AttemptEnd::Retry(
                "connection dropped before Commit (injected)".into(),
            ));
        }
        if ok {
            // Hand the guest over. Until Commit the destination does not run it, so any
            // failure before this point lets the source resume safely; after a failed
            // Commit nobody can tell, and the guest stays paused here.
            let sent = c.w.write_frame(&Frame::Commit).and_then(|_| c.w.flush());
            if let Err(e) = sent {
                return Err(AttemptEnd::Uncertain(format!(
                    "sending Commit failed ({e}): the destination may be running the guest, so the source stays paused"
                )));
            }
        }
        Ok(Verdict {
            ok,
            mismatched,
            downtime_ms,
        })
    }
}

/// Read one frame and check it is the one expected.
fn expect<R: Read>(
    r: &mut FrameReader<R>,
    what: &str,
    ok: impl Fn(&Frame<'_>) -> bool,
) -> Result<(), AttemptEnd> {
    let f = r.read_frame()?;
    if ok(&f) {
        return Ok(());
    }
    match f {
        Frame::Abort { reason } => Err(AttemptEnd::Abort(format!(
            "the destination aborted: {reason}"
        ))),
        other => Err(AttemptEnd::Abort(format!(
            "expected {what} from the destination, got {:?}",
            other.kind()
        ))),
    }
}

/// Run the source: migrate to whatever `connect` returns, retrying after a dropped
/// connection or a cancel up to `cfg.retries` times.
pub fn run_source(
    cfg: &MigrateConfig,
    mut connect: impl FnMut() -> io::Result<TcpStream>,
    events: &mut dyn FnMut(Event),
) -> Result<Summary, MigrateError> {
    let t0 = Instant::now();
    let mut src = Source::new(cfg)?;
    std::thread::sleep(cfg.warmup);
    // Everything dirtied before pass 0 is covered by pass 0: drop what KVM logged so far.
    for (slot, buf) in src.kvm_log.iter_mut().enumerate() {
        src.guest.dirty_log(slot, buf)?;
    }
    src.start_tracking(true, events)?;
    src.ledger.mark_all();
    let mut attempt = 0u32;
    let outcome = loop {
        let started = Instant::now();
        let res = match connect() {
            Ok(stream) => src.attempt(stream, attempt, started, events),
            Err(e) => Err(AttemptEnd::Retry(format!("cannot connect: {e}"))),
        };
        match res {
            Ok(v) => break Ok(v),
            Err(AttemptEnd::Uncertain(reason)) => break Err((reason, false)),
            Err(end) => {
                // Nothing read from KVM or the device is lost: the pass in flight goes back.
                src.ledger.rollback();
                // Back to running: the source owns the guest until the destination has it.
                let _ = src.device.migration().set_state(MigState::Running);
                let _ = src.guest.resume();
                src.dma.resume();
                let reason = match end {
                    AttemptEnd::Retry(r) if attempt < cfg.retries => {
                        attempt += 1;
                        events(Event::Retry {
                            attempt,
                            reason: r.clone(),
                        });
                        // The layout may have changed meanwhile: plan again.
                        match src.start_tracking(false, events) {
                            Ok(()) => continue,
                            Err(e) => {
                                break Err((
                                    format!("{r}; then restarting dirty tracking failed: {e}"),
                                    true,
                                ))
                            }
                        }
                    }
                    AttemptEnd::Retry(r) | AttemptEnd::Abort(r) | AttemptEnd::Uncertain(r) => r,
                };
                break Err((reason, true));
            }
        }
    };
    src.summary.attempts = attempt + 1;
    src.summary.distinct_pages_sent = src.touched.iter().map(DirtyBitmap::count_ones).sum();
    src.summary.dma_writes = src.dma.writes();
    src.summary.guest_pages_written = src.guest.progress().pages_written;
    src.summary.untracked_dma_writes = src.device.untracked_writes() + src.dma.unlogged_writes();
    // A destination that verified wrong memory keeps nothing running there: the source
    // takes its guest back.
    let outcome = match outcome {
        Ok(v) if !v.ok => {
            src.summary.mismatched_pages = v.mismatched;
            let _ = src.device.migration().set_state(MigState::Running);
            let _ = src.guest.resume();
            src.dma.resume();
            Err((format!("the destination's memory differs in {} page(s) (or regions): the source resumed", v.mismatched), true))
        }
        other => other,
    };
    match outcome {
        Ok(v) => {
            src.summary.verified = v.ok;
            src.summary.mismatched_pages = v.mismatched;
            src.summary.downtime_ms = v.downtime_ms;
        }
        Err((reason, resumed)) => {
            let before = src.guest.progress().pages_written;
            std::thread::sleep(Duration::from_millis(200));
            src.summary.source_running_after_abort =
                Some(resumed && src.guest.progress().pages_written > before);
            src.summary.aborted = Some(reason);
        }
    }
    src.tracker.stop();
    let mut summary = std::mem::take(&mut src.summary);
    let Source { dma, guest, .. } = src;
    dma.stop();
    guest.stop()?;
    summary.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    Ok(summary)
}
