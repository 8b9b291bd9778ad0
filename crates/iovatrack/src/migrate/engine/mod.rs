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

use crate::layout::Layout;
use crate::migrate::dma::DmaConfig;
use crate::migrate::guest::{self, GuestError, GuestMemory};
use crate::migrate::wire::WireError;
use crate::plan::limits::DeviceLimits;
use crate::range::IovaRange;
use crate::track::TrackError;
use serde::Serialize;
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

mod destination;
mod source;

pub use destination::{DestReport, Destination};
pub use source::run_source;

const PAGE: u64 = 4096;
/// Pages per Pages frame (1 MiB).
const FRAME_PAGES: usize = 256;

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
    /// The connection drops after a good verdict, before the source's Commit (first
    /// attempt): the destination must not resume, the source resumes and retries.
    DropBeforeCommit,
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
            None if s == "drop-before-commit" => Ok(Fault::DropBeforeCommit),
            _ => Err(format!(
                "unknown fault {s:?} (report-fail@N, start-e2big, drop@N, cancel@N, drop-before-commit)"
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
            Fault::DropBeforeCommit => write!(f, "drop-before-commit"),
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

/// One hash per page, regions in order: what page-level verification compares.
fn page_hashes(memory: &GuestMemory) -> Result<Vec<u64>, GuestError> {
    let mut out = Vec::new();
    for i in 0..memory.regions().len() {
        out.extend(memory.page_hashes(i)?);
    }
    Ok(out)
}

/// One hash per region, for guests too large for a frame of page hashes: each is the hash
/// of that region's run in `pages` (from [`page_hashes`]), so no memory is read twice.
fn region_hashes(memory: &GuestMemory, pages: &[u64]) -> Vec<u64> {
    let mut at = 0;
    memory
        .regions()
        .iter()
        .map(|r| {
            let n = (r.length / PAGE) as usize;
            let h = guest::hash_words(pages[at..at + n].iter().copied());
            at += n;
            h
        })
        .collect()
}

/// FNV-1a over arbitrary bytes (device state has any length).
fn hash_bytes(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_hashes_fold_the_page_hashes_per_region() {
        let m = GuestMemory::new(&[(0, 64 << 10), (1 << 32, 16 << 10)]).unwrap();
        m.write_u64(0x2000, 5).unwrap();
        m.write_u64((1 << 32) + 0x1000, 6).unwrap();
        let pages = page_hashes(&m).unwrap();
        let want: Vec<u64> = (0..2)
            .map(|i| guest::hash_words(m.page_hashes(i).unwrap()))
            .collect();
        assert_eq!(region_hashes(&m, &pages), want);
        // a change in the second region changes only its hash
        m.write_u64((1 << 32) + 0x3000, 7).unwrap();
        let again = region_hashes(&m, &page_hashes(&m).unwrap());
        assert_eq!(again[0], want[0]);
        assert_ne!(again[1], want[1]);
    }
}
