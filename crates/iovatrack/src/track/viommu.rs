//! Dirty tracking behind a vIOMMU: device DMA logging in IOVA space, kept in step with the
//! guest's maps and unmaps, every bit translated IOVA→GPA with the mapping in force when
//! it was read.
//!
//! The guest programs its own DMA mappings, so the IOVAs a device writes change all through
//! pre-copy, while device DMA logging takes its ranges once, at START. [`IovaSpace`] is the
//! container's IOVA→GPA map as the VMM's vIOMMU sees it (caching mode: every guest map and
//! unmap reaches the VMM), and it owns every logging operation on the container's devices
//! so that the guest's vIOMMU thread and the migration's collect are serialised:
//!
//! * **START** plans ranges over the IOVAs mapped now plus a headroom window: from
//!   [`Headroom::below`] under the lowest mapped IOVA up to the DMA limit, because Linux
//!   allocates IOVAs top-down below the device's DMA mask and reuses recently freed ones
//!   (`alloc_iova_fast`, the rcaches), so new mappings mostly land in that window. The
//!   planner merges them to the device's range count and checks its limits (mlx5's span).
//! * **Map outside the logged ranges** ([`IovaSpace::map`]): the map is held (the guest
//!   waits on its invalidation) while the logging is re-armed: REPORT everything
//!   (translated with the map in force), STOP, START with a plan that covers the new
//!   mapping, and then mark dirty, in GPA, every page mapped during the STOP→START window.
//!   Only then is the mapping installed. Nothing the device wrote is lost: before the STOP
//!   it is in the REPORT; during the window the device can only reach pages mapped then
//!   (maps and unmaps wait on the same lock), which are marked after the START, so they are
//!   sent after any write of the window; after the START it is logged.
//! * **Unmap** ([`IovaSpace::unmap`]): the range is REPORTed and translated with the mapping
//!   still in force, then the host mapping goes, then the translation. A DMA holds the
//!   translation table's read lock from translation to log, so every write to the IOVA is
//!   in the device's log before the unmap can take the table.
//! * **Collect** ([`IovaSpace::collect`]): REPORT every logged range, translate each set bit
//!   through the table (every IOVA page of a device page; two IOVAs onto one GPA mark it
//!   once), then hand the dirt the vIOMMU thread gathered (unmap queries, re-arm windows)
//!   to the ledger.
//!
//! A failed REPORT re-arms the same way (the window and the lost log are both covered by
//! marking every mapped page; unmapped IOVAs were queried at their unmap). If no START
//! succeeds, the space degrades to marking: every mapped page at each collect and each
//! page at its unmap, which is lossless and never converges for a busy device.
//!
//! In IOMMU mode the container's IOMMU dirty bits are read per mapped run and translated
//! the same way; maps are never held (the IOMMU tracks whatever is mapped) and an unmap
//! reads the range before the host unmap drops its bits.

use super::collect::device_windows;
use super::{CollectStats, DirtLedger, TrackError, TrackingMode};
use crate::device::{DeviceError, DmaLogger, Errno, IommuDirtyTracker};
use crate::layout::{Layout, Section, SectionKind};
use crate::plan::limits::DeviceLimits;
use crate::plan::{Planner, Strategy};
use crate::range::IovaRange;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

/// The vIOMMU's page: the translation table is kept per 4 KiB page.
pub const VIOMMU_PAGE: u64 = 4096;
const SHIFT: u32 = 12;

/// Errors of the vIOMMU map.
#[derive(Debug, thiserror::Error)]
pub enum ViommuError {
    /// A map or unmap not aligned to 4 KiB, empty, or past the DMA limit.
    #[error("range {0} is empty, not 4 KiB aligned, or past the DMA limit")]
    BadRange(IovaRange),
    /// A map over an IOVA already mapped.
    #[error("IOVA {0:#x} is already mapped")]
    AlreadyMapped(u64),
    /// An unmap of an IOVA not mapped.
    #[error("IOVA {0:#x} is not mapped")]
    NotMapped(u64),
    /// The host side of the map (VFIO MAP/UNMAP) failed.
    #[error("host mapping: {0}")]
    Host(String),
}

/// The host side of the container's mappings: what VFIO MAP/UNMAP (or iommufd IOAS) do
/// when the vIOMMU maps or unmaps.
pub trait HostMapping: Send + Sync {
    /// Map `iova` onto guest physical `gpa`.
    fn map(&self, iova: IovaRange, gpa: u64) -> Result<(), String>;
    /// Unmap `iova` (its IOMMU dirty bits are gone after this).
    fn unmap(&self, iova: IovaRange) -> Result<(), String>;
}

impl HostMapping for crate::device::EmulatedIommu {
    fn map(&self, iova: IovaRange, _gpa: u64) -> Result<(), String> {
        crate::device::EmulatedIommu::map(self, iova).map_err(|e| e.to_string())
    }
    fn unmap(&self, iova: IovaRange) -> Result<(), String> {
        crate::device::EmulatedIommu::unmap(self, iova)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// How far ranges planned at START reach beyond what is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headroom {
    /// Bytes below the lowest mapped IOVA (the allocator grows down).
    pub below: u64,
}

impl Default for Headroom {
    fn default() -> Self {
        Headroom { below: 16 << 20 }
    }
}

/// Negative controls: each drops one rule, and a migration must catch the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Unmap without REPORTing the range first.
    pub no_unmap_query: bool,
    /// Re-arm (STOP, START) without marking the window's mapped pages.
    pub naive_rearm: bool,
    /// Take reported IOVAs as guest physical addresses.
    pub no_translate: bool,
}

/// Counters of an [`IovaSpace`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ViommuStats {
    /// Maps done.
    pub maps: u64,
    /// Unmaps done.
    pub unmaps: u64,
    /// Re-arms for a map outside the logged ranges (REPORT, STOP, START a new plan).
    pub rearms: u64,
    /// Re-arms after a failed REPORT.
    pub error_rearms: u64,
    /// REPORTs that failed, wherever (collect, unmap query, a re-arm's own REPORT): each
    /// one's log is lost and covered by marking every mapped page.
    pub report_errors: u64,
    /// Pages marked dirty to cover STOP→START windows.
    pub rearm_pages: u64,
    /// Maps held until logging covered them.
    pub held_maps: u64,
    /// Total time maps were held, ms.
    pub map_hold_ms: f64,
    /// Longest hold, ms.
    pub max_map_hold_ms: f64,
    /// REPORTs (or IOMMU reads) before an unmap.
    pub unmap_queries: u64,
    /// Unmaps while logging ran (each must have been queried).
    pub unmaps_while_logging: u64,
    /// Reported bits that translated to no mapping (an IOVA unmapped without a query).
    pub untranslated_bits: u64,
    /// Starts that fell back to marking (no START succeeded).
    pub degraded: u64,
}

/// What logging runs now.
#[derive(Clone, Debug)]
enum Logging {
    Off,
    Device {
        page_size: u64,
        ranges: Vec<IovaRange>,
        report_pages: Vec<u64>,
        device_page_sizes: Vec<u64>,
        replans: u32,
    },
    Iommu,
    /// No START succeeded: mark instead of logging.
    Marking,
}

struct Ctl {
    logging: Logging,
    planner: Planner,
    chunk_bits: u64,
    /// GPA pages found dirty outside a collect (unmap queries, re-arm windows): the
    /// ledger takes them at the next collect.
    pending: Vec<u64>,
    scratch: Vec<u64>,
    /// A failure in the vIOMMU thread that the next collect must return.
    failed: Option<String>,
    /// REPORT-error re-arms already counted by a collect (an unmap query may meet the
    /// error first: the next collect still reports it).
    counted_error_rearms: u64,
    counted_report_errors: u64,
}

type WindowHook = Box<dyn Fn() + Send + Sync>;

/// A container's IOVA space behind a vIOMMU. See the module documentation.
pub struct IovaSpace {
    name: String,
    dma_limit: u64,
    headroom: Headroom,
    devices: Vec<Arc<dyn DmaLogger>>,
    iommu: Option<Arc<dyn IommuDirtyTracker>>,
    host: Option<Arc<dyn HostMapping>>,
    controls: Controls,
    window_hook: Option<WindowHook>,
    /// IOVA page → GPA page: what the device's DMA goes through.
    table: RwLock<BTreeMap<u64, u64>>,
    ctl: Mutex<Ctl>,
    stats: Mutex<ViommuStats>,
    bits: AtomicU64,
}

impl std::fmt::Debug for IovaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovaSpace")
            .field("name", &self.name)
            .field("dma_limit", &self.dma_limit)
            .field("mapped_pages", &self.mapped_pages())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs of consecutive pages of `table` (page numbers), as byte ranges.
fn runs(table: &BTreeMap<u64, u64>) -> Vec<IovaRange> {
    let mut out: Vec<IovaRange> = Vec::new();
    for &p in table.keys() {
        match out.last_mut() {
            Some(r) if r.end() == (p << SHIFT) as u128 => r.length += VIOMMU_PAGE,
            _ => out.push(IovaRange::new(p << SHIFT, VIOMMU_PAGE)),
        }
    }
    out
}

fn covered(ranges: &[IovaRange], r: IovaRange) -> bool {
    ranges
        .iter()
        .any(|c| c.iova <= r.iova && c.end() >= r.end())
}

impl IovaSpace {
    /// An empty IOVA space for `devices` (and the container's `iommu`), IOVAs below
    /// `dma_limit` (the device's DMA mask + 1).
    pub fn new(
        name: impl Into<String>,
        dma_limit: u64,
        devices: Vec<Arc<dyn DmaLogger>>,
        iommu: Option<Arc<dyn IommuDirtyTracker>>,
    ) -> Self {
        IovaSpace {
            name: name.into(),
            dma_limit,
            headroom: Headroom::default(),
            devices,
            iommu,
            host: None,
            controls: Controls::default(),
            window_hook: None,
            table: RwLock::new(BTreeMap::new()),
            ctl: Mutex::new(Ctl {
                logging: Logging::Off,
                planner: Planner::new(),
                chunk_bits: super::REPORT_CHUNK_BITS,
                pending: Vec::new(),
                scratch: Vec::new(),
                failed: None,
                counted_error_rearms: 0,
                counted_report_errors: 0,
            }),
            stats: Mutex::new(ViommuStats::default()),
            bits: AtomicU64::new(0),
        }
    }

    /// The headroom policy of every plan.
    pub fn headroom(mut self, h: Headroom) -> Self {
        self.headroom = h;
        self
    }

    /// The host side that follows every map and unmap.
    pub fn host(mut self, host: Arc<dyn HostMapping>) -> Self {
        self.host = Some(host);
        self
    }

    /// Negative controls (tests and demos only).
    pub fn controls(mut self, c: Controls) -> Self {
        self.controls = c;
        self
    }

    /// Run `f` inside every STOP→START window (a harness makes the device DMA there, so a
    /// window that is not covered shows).
    pub fn window_hook(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.window_hook = Some(Box::new(f));
        self
    }

    /// The DMA limit.
    pub fn dma_limit(&self) -> u64 {
        self.dma_limit
    }

    /// Counters so far.
    pub fn stats(&self) -> ViommuStats {
        *lock(&self.stats)
    }

    /// Pages mapped now.
    pub fn mapped_pages(&self) -> u64 {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    /// The ranges the devices log now (empty unless device logging runs).
    pub fn logged_ranges(&self) -> Vec<IovaRange> {
        match &lock(&self.ctl).logging {
            Logging::Device { ranges, .. } => ranges.clone(),
            _ => Vec::new(),
        }
    }

    /// The device DMAs through the table: `f(gpa)` runs with the IOVA's translation held
    /// (write the data and log the IOVA inside `f`, so no unmap can pass between). `None`:
    /// the IOVA is not mapped, the DMA faults and `f` does not run.
    pub fn dma<R>(&self, iova: u64, f: impl FnOnce(u64) -> R) -> Option<R> {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let gpa = *t.get(&(iova >> SHIFT))?;
        Some(f((gpa << SHIFT) | (iova & (VIOMMU_PAGE - 1))))
    }

    /// The guest maps `iova` onto `gpa`. While device logging runs and `iova` is outside
    /// the logged ranges, the map is held until a re-arm covers it.
    pub fn map(&self, iova: IovaRange, gpa: u64) -> Result<(), ViommuError> {
        let asked = Instant::now();
        if iova.length == 0
            || !iova.is_aligned(VIOMMU_PAGE)
            || !gpa.is_multiple_of(VIOMMU_PAGE)
            || iova.end() > self.dma_limit as u128
        {
            return Err(ViommuError::BadRange(iova));
        }
        let mut ctl = lock(&self.ctl);
        let first = iova.iova >> SHIFT;
        let n = iova.length >> SHIFT;
        {
            let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((&p, _)) = t.range(first..first + n).next() {
                return Err(ViommuError::AlreadyMapped(p << SHIFT));
            }
        }
        let held = match &ctl.logging {
            Logging::Device { ranges, .. } if !covered(ranges, iova) => {
                self.rearm(&mut ctl, Some(iova), false);
                true
            }
            _ => false,
        };
        if let Some(h) = &self.host {
            h.map(iova, gpa).map_err(ViommuError::Host)?;
        }
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        for k in 0..n {
            t.insert(first + k, (gpa >> SHIFT) + k);
        }
        drop(t);
        drop(ctl);
        let mut s = lock(&self.stats);
        s.maps += 1;
        if held {
            let ms = asked.elapsed().as_secs_f64() * 1000.0;
            s.held_maps += 1;
            s.map_hold_ms += ms;
            s.max_map_hold_ms = s.max_map_hold_ms.max(ms);
        }
        Ok(())
    }

    /// The guest unmaps `iova`: its dirt is read and translated with the mapping still in
    /// force, then the host mapping and the translation go.
    pub fn unmap(&self, iova: IovaRange) -> Result<(), ViommuError> {
        let mut ctl = lock(&self.ctl);
        let first = iova.iova >> SHIFT;
        let n = iova.length.div_ceil(VIOMMU_PAGE);
        {
            let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
            if !(first..first + n).all(|p| t.contains_key(&p)) {
                return Err(ViommuError::NotMapped(iova.iova));
            }
        }
        let logging = !matches!(ctl.logging, Logging::Off);
        let queried = !self.controls.no_unmap_query && logging;
        if queried {
            self.query(&mut ctl, Some(iova));
        }
        if let Some(h) = &self.host {
            h.unmap(iova).map_err(ViommuError::Host)?;
        }
        let mut t = self.table.write().unwrap_or_else(PoisonError::into_inner);
        for p in first..first + n {
            t.remove(&p);
        }
        drop(t);
        drop(ctl);
        let mut s = lock(&self.stats);
        s.unmaps += 1;
        s.unmap_queries += u64::from(queried);
        s.unmaps_while_logging += u64::from(logging);
        Ok(())
    }

    /// Re-arm now with a plan over what is mapped (and the headroom): e.g. to shrink the
    /// logged window after a burst. The window is covered like any re-arm's. Nothing
    /// happens unless device logging runs.
    pub fn replan(&self) {
        let mut ctl = lock(&self.ctl);
        if matches!(ctl.logging, Logging::Device { .. }) {
            self.rearm(&mut ctl, None, false);
        }
    }

    /// Start logging with `planner`'s limits (`iommu`: IOMMU dirty tracking instead).
    /// Returns the mode as the tracker reports it.
    pub fn start(
        &self,
        planner: &Planner,
        chunk_bits: u64,
        iommu: bool,
    ) -> Result<TrackingMode, TrackError> {
        let mut ctl = lock(&self.ctl);
        ctl.planner = planner.clone();
        ctl.chunk_bits = chunk_bits;
        ctl.failed = None;
        if iommu {
            let Some(i) = &self.iommu else {
                return Err(TrackError::ModeUnavailable {
                    mode: "iommu",
                    reason: "the container has no IOMMU dirty tracking".into(),
                });
            };
            i.set_tracking(true)?;
            ctl.logging = Logging::Iommu;
        } else {
            self.start_devices(&mut ctl, None);
        }
        Ok(self.mode_of(&ctl))
    }

    /// The mode in force, as a [`TrackingMode`].
    pub fn mode(&self) -> TrackingMode {
        self.mode_of(&lock(&self.ctl))
    }

    fn mode_of(&self, ctl: &Ctl) -> TrackingMode {
        let address_space = format!("{} (vIOMMU)", self.name);
        match &ctl.logging {
            Logging::Device {
                page_size,
                ranges,
                device_page_sizes,
                replans,
                ..
            } => TrackingMode::Device {
                page_size: *page_size,
                ranges: ranges.clone(),
                device_page_sizes: device_page_sizes.clone(),
                replans: *replans,
            },
            Logging::Iommu => TrackingMode::Iommu {
                page_size: VIOMMU_PAGE,
                ranges: self.mapped_runs(),
                reason: super::FallbackReason::Forced,
            },
            Logging::Off | Logging::Marking => TrackingMode::AllDirty {
                ranges: self.mapped_runs(),
                reason: super::FallbackReason::Viommu { address_space },
                iommu_error: None,
            },
        }
    }

    fn mapped_runs(&self) -> Vec<IovaRange> {
        runs(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Stop logging. Uncollected dirt is dropped by the devices: collect first.
    pub fn stop(&self) {
        let mut ctl = lock(&self.ctl);
        self.stop_logging(&ctl.logging);
        ctl.logging = Logging::Off;
    }

    fn stop_logging(&self, logging: &Logging) {
        match logging {
            Logging::Device { .. } => {
                for d in &self.devices {
                    if let Err(e) = d.stop() {
                        log::warn!("{}: STOP failed: {e}", d.name());
                    }
                }
            }
            Logging::Iommu => {
                if let Some(i) = &self.iommu {
                    let _ = i.set_tracking(false);
                }
            }
            Logging::Off | Logging::Marking => {}
        }
    }

    /// Read everything logged into `ledger` (in GPA), with the dirt gathered since the last
    /// collect.
    pub fn collect(&self, ledger: &mut DirtLedger) -> Result<CollectStats, TrackError> {
        let mut ctl = lock(&self.ctl);
        if let Some(f) = ctl.failed.take() {
            return Err(TrackError::ModeUnavailable {
                mode: "device",
                reason: f,
            });
        }
        let bits0 = self.bits.load(Relaxed);
        let reports = self.query(&mut ctl, None);
        if matches!(ctl.logging, Logging::Marking) {
            self.mark_mapped(&mut ctl, None);
        }
        let mut st = CollectStats {
            reports,
            ..CollectStats::default()
        };
        let (total, errors) = {
            let s = lock(&self.stats);
            (s.error_rearms, s.report_errors)
        };
        st.rearms = total - ctl.counted_error_rearms;
        st.report_errors = errors - ctl.counted_report_errors;
        ctl.counted_error_rearms = total;
        ctl.counted_report_errors = errors;
        st.device_bits = self.bits.load(Relaxed) - bits0;
        let pending = std::mem::take(&mut ctl.pending);
        for p in &pending {
            if let Some(addr) = p.checked_mul(VIOMMU_PAGE) {
                st.newly_pending += ledger.mark_range(IovaRange::new(addr, VIOMMU_PAGE));
            }
        }
        ctl.pending = pending;
        ctl.pending.clear();
        Ok(st)
    }

    /// Read the logs (all, or the part overlapping `only`) and translate into
    /// `ctl.pending`; a failed REPORT re-arms. Returns the reads done.
    fn query(&self, ctl: &mut Ctl, only: Option<IovaRange>) -> u64 {
        match ctl.logging.clone() {
            Logging::Device {
                ranges,
                report_pages,
                ..
            } => {
                let mut reads = 0;
                for (d, &page) in self.devices.iter().zip(&report_pages) {
                    let windows =
                        device_windows(&d.report_granule(), &ranges, page, ctl.chunk_bits, only);
                    for w in windows {
                        match self.read(ctl, |bm| d.report(w, page, bm), w, page) {
                            Ok(()) => reads += 1,
                            Err(e) => {
                                log::warn!("{}: REPORT {w} failed ({e}): re-arming", d.name());
                                self.rearm(ctl, None, true);
                                return reads;
                            }
                        }
                    }
                }
                reads
            }
            Logging::Iommu => {
                let Some(iommu) = self.iommu.clone() else {
                    return 0;
                };
                let mut reads = 0;
                for run in self.mapped_runs() {
                    let w = match only {
                        None => Some(run),
                        Some(u) => super::span_of(run, u),
                    };
                    let Some(w) = w else { continue };
                    match self.read(
                        ctl,
                        |bm| iommu.read_dirty(w, VIOMMU_PAGE, bm, true),
                        w,
                        VIOMMU_PAGE,
                    ) {
                        Ok(()) => reads += 1,
                        Err(e) => {
                            log::warn!("{}: reading {w} failed ({e}): marking it", iommu.name());
                            self.mark_mapped(ctl, Some(w));
                        }
                    }
                }
                reads
            }
            Logging::Marking => {
                if let Some(u) = only {
                    self.mark_mapped(ctl, Some(u));
                }
                0
            }
            Logging::Off => 0,
        }
    }

    /// One read of window `w` at `page` by `read`, translated into `ctl.pending`.
    fn read(
        &self,
        ctl: &mut Ctl,
        read: impl FnOnce(&mut [u64]) -> Result<(), DeviceError>,
        w: IovaRange,
        page: u64,
    ) -> Result<(), DeviceError> {
        let bits = w.length.div_ceil(page);
        let words = bits.div_ceil(64) as usize;
        if ctl.scratch.len() < words {
            ctl.scratch.resize(words, 0);
        }
        let mut scratch = std::mem::take(&mut ctl.scratch);
        let bm = &mut scratch[..words];
        bm.fill(0);
        let res = read(bm);
        if res.is_ok() {
            self.translate(bm, w.iova, page, &mut ctl.pending);
        }
        ctl.scratch = scratch;
        res
    }

    /// Each set bit (one `page` from `base`) → the GPA pages of the IOVA pages it covers,
    /// through the table as it is now (the caller holds the control lock: no map changes).
    fn translate(&self, bm: &[u64], base: u64, page: u64, out: &mut Vec<u64>) {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let mut set = 0u64;
        let mut lost = 0u64;
        for (wi, &word) in bm.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let k = wi as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                set += 1;
                let a = base as u128 + k as u128 * page as u128;
                let lo = (a >> SHIFT) as u64;
                let hi = ((a + page as u128 - 1) >> SHIFT) as u64;
                if self.controls.no_translate {
                    out.extend(lo..=hi);
                    continue;
                }
                let before = out.len();
                out.extend(t.range(lo..=hi).map(|(_, &g)| g));
                if out.len() == before {
                    lost += 1;
                }
            }
        }
        self.bits.fetch_add(set, Relaxed);
        if lost > 0 {
            lock(&self.stats).untranslated_bits += lost;
        }
    }

    /// Every GPA page mapped now (inside `only`, if given) into `ctl.pending`. Returns how
    /// many.
    fn mark_mapped(&self, ctl: &mut Ctl, only: Option<IovaRange>) -> u64 {
        let t = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let before = ctl.pending.len();
        match only {
            None => ctl.pending.extend(t.values().copied()),
            Some(u) => {
                let lo = u.iova >> SHIFT;
                let hi = ((u.end() - 1) >> SHIFT) as u64;
                ctl.pending.extend(t.range(lo..=hi).map(|(_, &g)| g));
            }
        }
        (ctl.pending.len() - before) as u64
    }

    /// REPORT everything, STOP, START a plan covering what is mapped, `extra` and the
    /// headroom, then mark every page mapped during the window. `after_error`: a REPORT
    /// failed (its log is lost; marking the mapped pages covers it too).
    fn rearm(&self, ctl: &mut Ctl, extra: Option<IovaRange>, after_error: bool) {
        if !after_error {
            // Errors here re-enter with after_error, which restarts anyway: skip them.
            self.report_quietly(ctl);
        }
        let old = std::mem::replace(&mut ctl.logging, Logging::Off);
        self.stop_logging(&old);
        if let Some(f) = &self.window_hook {
            f();
        }
        self.start_devices(ctl, extra);
        let naive = self.controls.naive_rearm && !after_error;
        let pages = if naive {
            0
        } else {
            self.mark_mapped(ctl, None)
        };
        let mut s = lock(&self.stats);
        if after_error {
            s.error_rearms += 1;
            s.report_errors += 1;
        } else {
            s.rearms += 1;
        }
        s.rearm_pages += pages;
    }

    fn report_quietly(&self, ctl: &mut Ctl) {
        if let Logging::Device {
            ranges,
            report_pages,
            ..
        } = ctl.logging.clone()
        {
            for (d, &page) in self.devices.iter().zip(&report_pages) {
                for w in device_windows(&d.report_granule(), &ranges, page, ctl.chunk_bits, None) {
                    if self.read(ctl, |bm| d.report(w, page, bm), w, page).is_err() {
                        lock(&self.stats).report_errors += 1;
                        // Its log is lost: every mapped page is marked after the START.
                        self.mark_mapped(ctl, None);
                        break;
                    }
                }
            }
        }
    }

    /// The IOVA ranges to log: mapped runs, `extra`, and the window from the headroom under
    /// the lowest of them to the DMA limit.
    fn wanted(&self, extra: Option<IovaRange>, window: bool) -> Vec<IovaRange> {
        let mut want = self.mapped_runs();
        want.extend(extra);
        if !window {
            return want;
        }
        let lowest = want.iter().map(|r| r.iova).min();
        if let Some(lo) = lowest {
            let a = lo.saturating_sub(self.headroom.below) & !(VIOMMU_PAGE - 1);
            want.push(IovaRange::new(a, self.dma_limit - a));
        } else {
            let a = self
                .dma_limit
                .saturating_sub(self.headroom.below.max(VIOMMU_PAGE));
            want.push(IovaRange::new(a, self.dma_limit - a));
        }
        want
    }

    /// START every device with a plan over [`Self::wanted`], halving the range count on
    /// E2BIG. A window the device refuses (mlx5's span bound, say) is dropped for what is
    /// mapped alone (more re-arms, still lossless); with no START left to try, degrade to
    /// marking.
    fn start_devices(&self, ctl: &mut Ctl, extra: Option<IovaRange>) {
        if let Err(why) = self.try_start(ctl, extra, true) {
            log::info!(
                "{}: the headroom window cannot be logged ({why}): logging what is mapped",
                self.name
            );
            if let Err(why) = self.try_start(ctl, extra, false) {
                self.degrade(ctl, why);
            }
        }
    }

    fn try_start(
        &self,
        ctl: &mut Ctl,
        extra: Option<IovaRange>,
        window: bool,
    ) -> Result<(), String> {
        let want = self.wanted(extra, window);
        let sections = merge_ranges(&want)
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                Section::new(
                    r.iova,
                    (r.end() - 1) as u64,
                    SectionKind::Ram,
                    format!("iova{i}"),
                )
            })
            .collect();
        let layout =
            Layout::new(format!("{}-iova", self.name), sections).map_err(|e| e.to_string())?;
        let mut planner = ctl.planner.clone();
        let mut replans = 0u32;
        loop {
            let plan = planner.plan(&layout).map_err(|e| e.to_string())?;
            let mut sizes = Vec::new();
            let mut refused = None;
            for (i, d) in self.devices.iter().enumerate() {
                match d.start(plan.page_size, &plan.ranges) {
                    Ok(p) => sizes.push(p),
                    Err(e) => {
                        for s in &self.devices[..i] {
                            let _ = s.stop();
                        }
                        refused = Some(e);
                        break;
                    }
                }
            }
            match refused {
                None => {
                    let report_pages = sizes
                        .iter()
                        .map(|&p| super::report_page(p, plan.page_size))
                        .collect();
                    ctl.logging = Logging::Device {
                        page_size: plan.page_size,
                        ranges: plan.ranges.clone(),
                        report_pages,
                        device_page_sizes: sizes,
                        replans,
                    };
                    return Ok(());
                }
                Some(e) if e.errno == Errno::E2BIG && plan.ranges.len() > 1 => {
                    let cap = (plan.ranges.len() / 2).max(1) as u32;
                    planner = planner.strategy(Strategy::Optimal).max_ranges(cap);
                    replans += 1;
                }
                Some(e) => return Err(e.to_string()),
            }
        }
    }

    fn degrade(&self, ctl: &mut Ctl, why: String) {
        log::warn!(
            "{}: no START succeeded ({why}): marking mapped pages instead of logging",
            self.name
        );
        ctl.logging = Logging::Marking;
        self.mark_mapped(ctl, None);
        lock(&self.stats).degraded += 1;
    }
}

/// Merge overlapping or touching ranges, sorted.
fn merge_ranges(v: &[IovaRange]) -> Vec<IovaRange> {
    let mut v: Vec<(u128, u128)> = v.iter().map(|r| (r.iova as u128, r.end())).collect();
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter()
        .map(|(a, b)| IovaRange::new(a as u64, (b - a) as u64))
        .collect()
}

/// The limits a plan in IOVA space is held to: the device's own.
pub fn iova_planner(limits: DeviceLimits, max_ranges: u32) -> Planner {
    Planner::new()
        .max_ranges(max_ranges.min(limits.max_ranges))
        .device(limits)
}
