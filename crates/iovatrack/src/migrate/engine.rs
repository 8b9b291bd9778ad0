//! The pre-copy engine: a source that migrates a running guest with its DMA device in
//! flight, and a destination that receives, verifies and resumes it.
//!
//! Source, per attempt: start (or restart, with freshly planned ranges) dirty tracking;
//! pass 0 sends every non-zero page; each later pass sends the union of the KVM log and the
//! device's REPORTs (one bitmap per region: no page twice in a pass), until the estimated
//! downtime fits `downtime_ms` (or `max_iterations`, or the timeout forces it); then
//! stop-and-copy: pause the vCPU, put the device in STOP_COPY, take the final logs, send
//! them, the device state and the vCPU state; then page-level verification.
//!
//! Nothing is lost on failure: dirt read from KVM and the device stays in the ledger until
//! the destination acknowledges the pass that carried it; a dropped connection or a cancel
//! rolls the pass back, the source resumes, and a retry continues into the same
//! destination memory.

use super::dma::{DmaConfig, DmaSink, DmaWorkload};
use super::guest::{self, GuestConfig, GuestCpu, GuestError, GuestMemory};
use super::guest_regions;
use super::wire::{Frame, FrameReader, FrameWriter, Limits, MemoryLayout, Validator, WireError};
use crate::bitmap::DirtyBitmap;
use crate::device::{DmaLogger, EmulatedDevice, Errno, MigState};
use crate::layout::Layout;
use crate::plan::filter::{dma_able, FilterOptions};
use crate::plan::limits::DeviceLimits;
use crate::plan::Planner;
use crate::range::IovaRange;
use crate::track::{Container, DirtLedger, TrackError, Tracker};
use serde::Serialize;
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Pages per Pages frame (1 MiB).
const FRAME_PAGES: usize = 256;
/// The guest's own setup (page tables, code, stack) lives in the first MiB: no DMA there.
const RESERVED: u64 = guest::x86::RESERVED_BYTES;

/// What to do when pre-copy has not converged by the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    /// Give up: the source keeps running.
    Cancel,
    /// Go to stop-and-copy now, whatever the downtime.
    Force,
}

/// An injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The device's REPORT fails (EIO) while collecting for pass N.
    ReportFail(u32),
    /// The device refuses START with E2BIG unless given a single range.
    StartE2big,
    /// The connection drops in the middle of pass N (first attempt).
    DropAt(u32),
    /// The source cancels at pass N (first attempt), then retries.
    CancelAt(u32),
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let at = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("{s:?}: pass must be a number"))
        };
        match s.split_once('@') {
            Some(("report-fail", p)) => Ok(Fault::ReportFail(at(p)?)),
            Some(("drop", p)) => Ok(Fault::DropAt(at(p)?)),
            Some(("cancel", p)) => Ok(Fault::CancelAt(at(p)?)),
            None if s == "start-e2big" => Ok(Fault::StartE2big),
            _ => Err(format!(
                "unknown fault {s:?} (report-fail@N, start-e2big, drop@N, cancel@N)"
            )),
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::ReportFail(n) => write!(f, "report-fail@{n}"),
            Fault::StartE2big => write!(f, "start-e2big"),
            Fault::DropAt(n) => write!(f, "drop@{n}"),
            Fault::CancelAt(n) => write!(f, "cancel@{n}"),
        }
    }
}

/// Everything a migration needs to know.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    /// The guest's memory map.
    pub layout: Layout,
    /// Use KVM when `/dev/kvm` is there (else a software vCPU).
    pub use_kvm: bool,
    /// Guest dirty rate, pages per second (0 = as fast as the vCPU goes).
    pub cpu_rate: u64,
    /// The DMA device's workload.
    pub dma: DmaConfig,
    /// The emulated device's limits.
    pub device: DeviceLimits,
    /// Track device dirt (false: the negative control; DMA writes go unlogged).
    pub device_tracking: bool,
    /// Range cap for the planner.
    pub max_ranges: u32,
    /// Downtime budget.
    pub downtime_ms: u64,
    /// Most pre-copy passes before stop-and-copy is forced.
    pub max_iterations: u32,
    /// Pre-copy time limit.
    pub timeout: Duration,
    /// What the timeout does.
    pub timeout_action: TimeoutAction,
    /// Link cap in bytes per second (0 = none).
    pub bandwidth: u64,
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// Attempts after a failed one.
    pub retries: u32,
    /// How long the guest and the device run before migration starts.
    pub warmup: Duration,
}

impl MigrateConfig {
    /// Defaults for `layout`.
    pub fn new(layout: Layout) -> Self {
        MigrateConfig {
            layout,
            use_kvm: true,
            cpu_rate: 20_000,
            dma: DmaConfig::default(),
            device: DeviceLimits::mlx5(),
            device_tracking: true,
            max_ranges: 256,
            downtime_ms: 300,
            max_iterations: 30,
            timeout: Duration::from_secs(60),
            timeout_action: TimeoutAction::Force,
            bandwidth: 0,
            faults: Vec::new(),
            retries: 2,
            warmup: Duration::from_millis(300),
        }
    }
}

/// One pass, for progress output.
#[derive(Clone, Debug, Serialize)]
pub struct PassStats {
    /// Attempt number (0 first).
    pub attempt: u32,
    /// Pass number within the attempt.
    pub pass: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Seconds it took.
    pub secs: f64,
    /// Pages the CPU dirtied (KVM log) collected for it.
    pub cpu_dirty: u64,
    /// Pages the device reported for it.
    pub device_dirty: u64,
    /// Estimated downtime if stop-and-copy came next, ms.
    pub est_downtime_ms: f64,
    /// The stop-and-copy pass.
    pub final_pass: bool,
}

/// Progress events.
#[derive(Clone, Debug)]
pub enum Event {
    /// Tracking started (or restarted).
    Tracking {
        /// Mode name.
        mode: String,
        /// Ranges given to the device.
        ranges: Vec<IovaRange>,
        /// Why not device mode, if so.
        reason: Option<String>,
    },
    /// A pass begins.
    PassStart {
        /// Attempt.
        attempt: u32,
        /// Pass number.
        pass: u32,
        /// Pages to send.
        pages: u64,
        /// Stop-and-copy pass.
        final_pass: bool,
    },
    /// Pages of the current pass sent so far.
    PassProgress {
        /// Pages sent in this pass.
        sent: u64,
    },
    /// A pass ended.
    Pass(PassStats),
    /// An attempt failed and the migration retries.
    Retry {
        /// The next attempt.
        attempt: u32,
        /// What went wrong.
        reason: String,
    },
}

/// Why a migration could not run at all (failures mid-way are in [`Summary::aborted`]).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Guest setup failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// Dirty tracking failed.
    #[error("dirty tracking: {0}")]
    Track(#[from] TrackError),
    /// The protocol failed.
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// Networking failed.
    #[error("network: {0}")]
    Io(#[from] io::Error),
    /// The layout has no usable RAM for a guest.
    #[error("layout: {0}")]
    Layout(String),
    /// The destination received no complete migration.
    #[error("destination: {0}")]
    Destination(String),
}

/// The result of a migration: what `--json` prints.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Destination memory equals the source's at the pause, page for page, and the guest
    /// ran on at the destination.
    pub verified: bool,
    /// Pages whose contents differ (page-level hash comparison).
    pub mismatched_pages: u64,
    /// Passes over all attempts.
    pub passes: u32,
    /// Pages sent over all attempts.
    pub pages_sent: u64,
    /// Bytes on the wire over all attempts.
    pub bytes_sent: u64,
    /// Distinct pages sent: each had to travel at least once (non-zero at the start, or
    /// dirtied since), so `pages_sent / distinct_pages_sent` is the resend overhead.
    pub distinct_pages_sent: u64,
    /// Pages sent twice within one pass (must be 0).
    pub duplicate_pages_sent: u64,
    /// Guest pause to the destination holding everything, ms.
    pub downtime_ms: f64,
    /// Pages the CPU dirtied (KVM log bits) over all passes.
    pub cpu_dirty_pages: u64,
    /// Pages the device reported over all passes.
    pub device_dirty_pages: u64,
    /// DMA writes no tracker logged (must be 0 unless tracking is off).
    pub untracked_dma_writes: u64,
    /// `kvm` or `software`.
    pub guest: String,
    /// Tracking mode: `device`, `iommu`, `all-dirty`, or `none` (negative control).
    pub mode: String,
    /// Attempts made.
    pub attempts: u32,
    /// DMA writes the device made.
    pub dma_writes: u64,
    /// Pages the guest wrote on the source.
    pub guest_pages_written: u64,
    /// The guest reported progress after resuming on the destination.
    pub resumed_on_destination: bool,
    /// The device's migration state was restored on the destination (and, in one process,
    /// equals the source's).
    pub device_state_restored: bool,
    /// Hash of the source device's state at stop-and-copy.
    pub device_state_digest: u64,
    /// Ranges the device logged (last attempt).
    pub ranges: Vec<IovaRange>,
    /// REPORT failures turned into "whole range dirty".
    pub report_errors: u64,
    /// Faults injected.
    pub faults: Vec<String>,
    /// Why the migration gave up, if it did (the source kept running).
    pub aborted: Option<String>,
    /// The source guest still ran after an abort.
    pub source_running_after_abort: Option<bool>,
    /// Wall time, ms.
    pub total_ms: f64,
}

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
fn dma_targets(layout: &Layout, regions: &[IovaRange]) -> Vec<IovaRange> {
    let set = dma_able(layout, &FilterOptions::default());
    let mut out = Vec::new();
    for (_, r) in set.ranges {
        let mut a = r.iova as u128;
        let z = r.end();
        if a < RESERVED as u128 {
            a = RESERVED as u128;
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
        if regions.first().is_none_or(|r| r.0 != 0 || r.1 <= RESERVED) {
            return Err(MigrateError::Layout("the guest needs RAM at address 0 larger than 1 MiB (its page tables and code live there)".into()));
        }
        let memory = Arc::new(GuestMemory::new(&regions)?);
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
        let targets = dma_targets(&cfg.layout, memory.regions());
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
            region_hashes(&self.memory).map_err(|e| abort(&e))?
        };
        c.w.write_frame(&Frame::Verify {
            digest,
            region_hashes: Cow::Owned(hashes),
        })?;
        c.w.flush()?;
        let f = c.r.read_frame()?;
        match f {
            Frame::VerifyResult {
                ok,
                mismatched_regions,
                ..
            } => Ok(Verdict {
                ok,
                mismatched: mismatched_regions.len() as u64,
                downtime_ms,
            }),
            other => Err(AttemptEnd::Abort(format!(
                "expected VerifyResult, got {:?}",
                other.kind()
            ))),
        }
    }
}

/// One hash per page, regions in order: what page-level verification compares.
fn page_hashes(memory: &GuestMemory) -> Result<Vec<u64>, GuestError> {
    let mut out = Vec::new();
    for i in 0..memory.regions().len() {
        out.extend(memory.page_hashes(i)?);
    }
    Ok(out)
}

/// One hash per region, for guests too large for a frame of page hashes.
fn region_hashes(memory: &GuestMemory) -> Result<Vec<u64>, GuestError> {
    (0..memory.regions().len())
        .map(|i| Ok(guest::hash_words(memory.page_hashes(i)?)))
        .collect()
}

/// FNV-1a over arbitrary bytes (device state has any length).
fn hash_bytes(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
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
                        src.start_tracking(false, events)?;
                        continue;
                    }
                    AttemptEnd::Retry(r) | AttemptEnd::Abort(r) => r,
                };
                break Err(reason);
            }
        }
    };
    src.summary.attempts = attempt + 1;
    src.summary.distinct_pages_sent = src.touched.iter().map(DirtyBitmap::count_ones).sum();
    src.summary.dma_writes = src.dma.writes();
    src.summary.guest_pages_written = src.guest.progress().pages_written;
    src.summary.untracked_dma_writes = src.device.untracked_writes() + src.dma.unlogged_writes();
    match outcome {
        Ok(v) => {
            src.summary.verified = v.ok;
            src.summary.mismatched_pages = v.mismatched;
            src.summary.downtime_ms = v.downtime_ms;
        }
        Err(reason) => {
            let before = src.guest.progress().pages_written;
            std::thread::sleep(Duration::from_millis(200));
            src.summary.source_running_after_abort =
                Some(src.guest.progress().pages_written > before);
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
                state: super::wire::StreamState::AwaitHello,
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
                        mismatches(&region_hashes(&self.memory)?, &theirs)
                    };
                    let ok = mismatched.is_empty();
                    self.report.mismatched_pages = mismatched.len() as u64;
                    self.verify_result = Some(ok);
                    w.write_frame(&Frame::VerifyResult {
                        ok,
                        digest: guest::hash_words(ours.iter().copied()),
                        mismatched_regions: Cow::Owned(mismatched),
                    })?;
                    return Ok(SessionEnd::Complete);
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

/// Source and destination in one process over loopback TCP.
pub fn run_local(
    cfg: &MigrateConfig,
    events: &mut dyn FnMut(Event),
) -> Result<Summary, MigrateError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dest = Destination::new(&cfg.layout, cfg.device)?;
    let sessions = cfg.retries + 1;
    let give_up = dest.give_up_flag();
    let handle = std::thread::Builder::new()
        .name("destination".into())
        .spawn(move || dest.run(&listener, sessions, Duration::from_secs(120)))?;
    let summary = run_source(
        cfg,
        || TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        events,
    );
    give_up.store(true, SeqCst);
    let dest = handle
        .join()
        .map_err(|_| MigrateError::Destination("the destination thread panicked".into()))?;
    let mut summary = summary?;
    merge_destination(&mut summary, dest);
    Ok(summary)
}

/// Fold the destination's report into the source's summary: the destination's own
/// observations (mismatches, duplicates, resume) are the independent ones.
pub fn merge_destination(summary: &mut Summary, dest: Result<DestReport, MigrateError>) {
    match dest {
        Ok(d) => {
            summary.mismatched_pages = summary.mismatched_pages.max(d.mismatched_pages);
            summary.duplicate_pages_sent =
                summary.duplicate_pages_sent.max(d.duplicate_pages_received);
            summary.resumed_on_destination = d.resumed;
            summary.device_state_restored =
                d.device_state_restored && d.device_state_digest == summary.device_state_digest;
            summary.verified = summary.verified
                && d.verified
                && d.resumed
                && d.device_state_restored
                && summary.aborted.is_none();
        }
        Err(e) => {
            summary.verified = false;
            if summary.aborted.is_none() {
                summary.aborted = Some(format!("destination: {e}"));
            }
        }
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
fn detect_dead_link(stream: &TcpStream) -> io::Result<()> {
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

/// Connect to `addr`, for [`run_source`]: each call keeps trying, with backoff, for up to
/// 15 s, so a retry after a dropped link reconnects once the link is back.
pub fn connector(addr: impl ToSocketAddrs) -> io::Result<impl FnMut() -> io::Result<TcpStream>> {
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
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last);
            }
            log::info!("connect: {last}; trying again in {backoff:?}");
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    })
}
