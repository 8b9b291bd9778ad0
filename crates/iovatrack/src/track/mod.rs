//! Dirty tracking for one VFIO container: which mode, START with re-plan and fallback,
//! collecting dirt into a [`DirtLedger`] without ever dropping it.
//!
//! Mode choice (QEMU master's, reference/qemu-upstream.md §3 and §5):
//! 1. **Device DMA logging** when every device of the container supports it. The ranges
//!    come from the [`Planner`]; every device gets the same ones. A START refused with
//!    `E2BIG` (too many ranges) re-plans with half as many ranges (optimal strategy), down
//!    to one. One refused with `EOPNOTSUPP` (too many tracked bytes: mlx5's bound is on
//!    the sum of the merged lengths, gaps included, so fewer ranges only make it worse;
//!    pds with no regions never takes any) re-plans only if the optimal plan for the same
//!    range cap tracks fewer bytes, and otherwise falls back at once. Any other refusal
//!    falls back. When one device fails, the devices already started are stopped.
//! 2. **IOMMU dirty tracking** (iommufd HWPT, type1) when the container has it.
//! 3. **All dirty**: every DMA-able page is marked pending on every collect (never
//!    converges for a busy guest, but loses nothing).
//!
//! With a vIOMMU the device's mappings change at run time, so no range set given at START
//! covers them: where device logging would be used, IOMMU tracking is used instead, and
//! without one [`Tracker::start`] returns the migration blocker [`TrackError::Viommu`]
//! (QEMU master blocks in exactly that case). A container with no devices has nothing
//! that DMA-writes: it runs in device mode with no ranges and `collect` does nothing.
//!
//! [`Tracker::force_mode`] skips the choice: a forced mode that cannot run fails `start`.
//!
//! Reading never loses what a source acknowledged (the `collect` module has the rules): a
//! device is queried in the granules it states ([`crate::device::ReportGranule`]), an
//! IOMMU per mapped run, never across a hole.
//!
//! Failure rules: a failed REPORT means the device's log can no longer be trusted (the
//! uAPI says so, and mlx5 fails every later REPORT until STOP and START). The tracker reads
//! what the other devices still report, then **re-arms** the failed device: STOP, START
//! with the same ranges, and marks the whole tracked set pending, which covers both the
//! lost log and the STOP→START window. If re-arming is refused it falls back to IOMMU
//! tracking (or all dirty) and says so ([`CollectStats::rearms`], [`CollectStats::fallbacks`],
//! [`Tracker::mode`]). A failed IOMMU read marks its window pending. Dirt read from a
//! source is cleared there, so it stays in the ledger until the caller acknowledges the
//! pass ([`DirtLedger::ack`]). Before a range is unmapped while logging,
//! [`Tracker::unmap`] reads its dirt.
//!
//! Note: STOP discards a device's uncollected log, and nothing logs between a STOP and the
//! next START. Call [`Tracker::collect`] (or use [`Tracker::finish`]) before stopping, and
//! treat DMA-able memory as dirty across a [`Tracker::restart`] of a running guest.
//!
//! ```
//! use iovatrack::device::{DmaLogger, EmulatedDevice};
//! use iovatrack::layout::{Layout, Section, SectionKind};
//! use iovatrack::plan::{limits::DeviceLimits, Planner};
//! use iovatrack::range::IovaRange;
//! use iovatrack::track::{Container, DirtLedger, Tracker, TrackingMode};
//! use std::sync::Arc;
//!
//! let ram = [IovaRange::new(0, 1 << 30), IovaRange::new(1 << 32, 1 << 30)];
//! let layout = Layout::new("memory", vec![
//!     Section::new(0, (1 << 30) - 1, SectionKind::Ram, "low"),
//!     Section::new(1 << 32, (1 << 32) + (1 << 30) - 1, SectionKind::Ram, "high"),
//! ])?;
//! let nic = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
//! let mut tracker = Tracker::new(Container::new("c0").device(nic.clone()), Planner::new());
//! assert!(matches!(tracker.start(&layout)?, TrackingMode::Device { .. }));
//!
//! let mut ledger = DirtLedger::new(&ram, 4096)?;
//! nic.dma_write(1 << 32, 10);
//! tracker.collect(&mut ledger)?;
//! assert_eq!(ledger.begin_pass()?, 1); // send ledger.inflight(1).runs() ...
//! ledger.ack(); // ... and the destination confirmed
//! tracker.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod collect;
#[cfg(test)]
mod harsh_tests;
mod ledger;
mod mode;
mod rearm;
#[cfg(test)]
mod tests;
pub mod viommu;
#[cfg(test)]
mod viommu_tests;

pub use collect::CollectStats;
pub use ledger::{DirtLedger, RegionProblem};
pub use mode::{Container, FallbackReason, ModeChoice, TrackingMode};

use crate::bitmap::BitmapError;
use crate::device::{DeviceError, Errno};
use crate::layout::Layout;
use crate::plan::{Plan, PlanError, Planner, Strategy};
use crate::range::{is_pow2, IovaRange};
use collect::{iommu_windows, read_chunk, Source};
use std::fmt;

/// Bits per REPORT (or IOMMU read) by default: 8 Mi bits = a 1 MiB scratch bitmap, 32 GiB
/// of IOVA at 4 KiB.
pub const REPORT_CHUNK_BITS: u64 = 8 << 20;

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The planner could not plan the layout.
    #[error("planning failed: {0}")]
    Plan(#[from] PlanError),
    /// Migration blocker: device logging would be used behind a vIOMMU and the container
    /// has no IOMMU dirty tracking.
    #[error("migration blocker: container {container:?} is behind a vIOMMU (address space {address_space:?}): its DMA mappings change at run time, so device DMA logging, which fixes its ranges at start, cannot cover them, and the container has no IOMMU dirty tracking (QEMU refuses too)")]
    Viommu {
        /// The container.
        container: String,
        /// The translated address space.
        address_space: String,
    },
    /// A device or IOMMU operation failed where no fallback applies.
    #[error("{0}")]
    Device(#[from] DeviceError),
    /// A bitmap was refused.
    #[error("{0}")]
    Bitmap(#[from] BitmapError),
    /// A forced mode ([`Tracker::force_mode`]) cannot run.
    #[error("tracking mode {mode} was forced but cannot run: {reason}")]
    ModeUnavailable {
        /// The forced mode.
        mode: &'static str,
        /// Why not.
        reason: String,
    },
    /// Collect or unmap before start.
    #[error("dirty tracking is not started")]
    NotStarted,
    /// Start while running (use restart).
    #[error("dirty tracking is already started")]
    AlreadyStarted,
    /// A pass begun while the previous one is neither acknowledged nor rolled back.
    #[error("a pass is in flight: acknowledge or roll it back first")]
    PassInFlight,
    /// A ledger region refused.
    #[error("region {index} {range} {problem}")]
    Region {
        /// Its index.
        index: usize,
        /// The region.
        range: IovaRange,
        /// What is wrong.
        problem: RegionProblem,
    },
    /// A region index past the ledger's regions.
    #[error("region {region} does not exist (the ledger has {regions})")]
    NoSuchRegion {
        /// Index asked for.
        region: usize,
        /// Regions in the ledger.
        regions: usize,
    },
}

struct Active {
    mode: TrackingMode,
    plan: Option<Plan>,
    /// Device mode: the REPORT page size per device (its own page size when the REPORT
    /// accepts it, else the requested one: the bitmap granularity is the caller's choice).
    report_pages: Vec<u64>,
    scratch: Vec<u64>,
}

/// A REPORT needs a power of two of at least 4 KiB; a device that claims another page
/// size is reported at the requested one.
fn report_page(device: u64, requested: u64) -> u64 {
    if is_pow2(device) && device >= 4096 {
        device
    } else {
        requested
    }
}

/// Dirty tracking of one container. See the module documentation.
pub struct Tracker {
    container: Container,
    planner: Planner,
    chunk_bits: u64,
    force: ModeChoice,
    active: Option<Active>,
    /// Behind a vIOMMU: logging runs in this IOVA space (see [`viommu`]).
    viommu: Option<std::sync::Arc<viommu::IovaSpace>>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("container", &self.container)
            .field("force", &self.force)
            .field("mode", &self.mode())
            .finish()
    }
}

impl Tracker {
    /// A tracker for `container`, planning with `planner` (its `max_ranges` is the first
    /// START's cap).
    pub fn new(container: Container, planner: Planner) -> Self {
        Self {
            container,
            planner,
            chunk_bits: REPORT_CHUNK_BITS,
            force: ModeChoice::Auto,
            active: None,
            viommu: None,
        }
    }

    /// Track in `space`, the container's IOVA space behind a vIOMMU: ranges planned there,
    /// every bit translated to guest physical pages (see [`viommu`]). The layout given to
    /// [`Tracker::start`] then only matters to a forced all-dirty mode. Takes effect at the
    /// next start.
    pub fn viommu(mut self, space: std::sync::Arc<viommu::IovaSpace>) -> Self {
        self.viommu = Some(space);
        self
    }

    /// The IOVA space tracked behind a vIOMMU, if any.
    pub fn iova_space(&self) -> Option<&std::sync::Arc<viommu::IovaSpace>> {
        self.viommu.as_ref()
    }

    /// Whether this run tracks in the vIOMMU's IOVA space.
    fn in_iova_space(&self) -> bool {
        self.viommu.is_some() && self.force != ModeChoice::AllDirty
    }

    /// Bits per REPORT / IOMMU read (rounded up to a multiple of 64; default
    /// [`REPORT_CHUNK_BITS`]). Takes effect at the next start.
    pub fn chunk_bits(mut self, bits: u64) -> Self {
        self.chunk_bits = bits.max(1).div_ceil(64) * 64;
        self
    }

    /// The planner its ranges come from.
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Run `choice` instead of choosing by the rules (default [`ModeChoice::Auto`]). A
    /// forced mode that cannot run makes [`Tracker::start`] fail with
    /// [`TrackError::ModeUnavailable`]. Takes effect at the next start.
    pub fn force_mode(mut self, choice: ModeChoice) -> Self {
        self.force = choice;
        self
    }

    /// The forced mode, or [`ModeChoice::Auto`].
    pub fn mode_choice(&self) -> ModeChoice {
        self.force
    }

    /// The container.
    pub fn container(&self) -> &Container {
        &self.container
    }

    /// Choose the mode and start tracking; says which mode runs. See the module docs.
    pub fn start(&mut self, layout: &Layout) -> Result<&TrackingMode, TrackError> {
        if self.active.is_some() {
            return Err(TrackError::AlreadyStarted);
        }
        let active = self.choose(layout)?;
        log::info!("container {}: {}", self.container.name, active.mode);
        Ok(&self.active.insert(active).mode)
    }

    fn host_page(&self) -> u64 {
        self.planner.filter().host_page_size
    }

    fn unavailable(&self, reason: impl ToString) -> TrackError {
        TrackError::ModeUnavailable {
            mode: self.force.name(),
            reason: reason.to_string(),
        }
    }

    fn choose(&self, layout: &Layout) -> Result<Active, TrackError> {
        let c = &self.container;
        if let (Some(space), true) = (&self.viommu, self.in_iova_space()) {
            let iommu = self.force == ModeChoice::Iommu;
            let mode = space.start(&self.planner, self.chunk_bits, iommu)?;
            return Ok(Active {
                mode,
                plan: None,
                report_pages: Vec::new(),
                scratch: Vec::new(),
            });
        }
        match self.force {
            ModeChoice::Iommu | ModeChoice::AllDirty => {
                return self.fallback(layout, FallbackReason::Forced)
            }
            ModeChoice::Auto | ModeChoice::Device => {}
        }
        if c.devices.is_empty() {
            return Ok(Active {
                mode: TrackingMode::Device {
                    page_size: self.host_page(),
                    ranges: Vec::new(),
                    device_page_sizes: Vec::new(),
                    replans: 0,
                },
                plan: None,
                report_pages: Vec::new(),
                scratch: Vec::new(),
            });
        }
        let no_logging = c.devices.iter().find_map(|d| {
            d.probe()
                .err()
                .map(|error| FallbackReason::NoDeviceLogging {
                    device: d.name().to_string(),
                    error,
                })
        });
        let reason = match no_logging {
            Some(r) => r,
            None if layout.viommu() => {
                if c.iommu.is_none() || self.force == ModeChoice::Device {
                    return Err(TrackError::Viommu {
                        container: c.name.clone(),
                        address_space: layout.address_space().to_string(),
                    });
                }
                FallbackReason::Viommu {
                    address_space: layout.address_space().to_string(),
                }
            }
            None => match self.start_devices(layout)? {
                Ok(active) => return Ok(active),
                Err(reason) => reason,
            },
        };
        if self.force == ModeChoice::Device {
            return Err(self.unavailable(reason));
        }
        self.fallback(layout, reason)
    }

    /// START every device with the same plan, re-planning on E2BIG (fewer ranges) and
    /// EOPNOTSUPP (fewer tracked bytes, if any plan has them). `Ok(Err(reason))`: every
    /// attempt refused, nothing left started.
    fn start_devices(&self, layout: &Layout) -> Result<Result<Active, FallbackReason>, TrackError> {
        let mut plan = self.planner.plan(layout)?;
        let mut replans = 0u32;
        let mut cap = plan.ranges.len().max(1) as u32;
        loop {
            let (device, error) = match self.start_all(&plan) {
                Ok(device_page_sizes) => {
                    let report_pages: Vec<u64> = device_page_sizes
                        .iter()
                        .map(|&p| report_page(p, plan.page_size))
                        .collect();
                    return Ok(Ok(Active {
                        mode: TrackingMode::Device {
                            page_size: plan.page_size,
                            ranges: plan.ranges.clone(),
                            device_page_sizes,
                            replans,
                        },
                        plan: Some(plan),
                        report_pages,
                        scratch: Vec::new(),
                    }));
                }
                Err(refused) => refused,
            };
            // The next plan, if one can help: E2BIG is about the count, EOPNOTSUPP about
            // the bytes (fewer ranges only add gaps to them).
            let next = match error.errno {
                Errno::E2BIG if plan.ranges.len() > 1 => {
                    cap = (plan.ranges.len() / 2).max(1) as u32;
                    Some(self.optimal(layout, cap)?)
                }
                Errno::EOPNOTSUPP => {
                    let p = self.optimal(layout, cap)?;
                    (p.tracked_bytes < plan.tracked_bytes).then_some(p)
                }
                _ => None,
            };
            log::warn!(
                "container {}: {device} refused START with {} range(s) ({}): {error}{}",
                self.container.name,
                plan.ranges.len(),
                crate::range::human_bytes(plan.tracked_bytes),
                if next.is_some() {
                    "; re-planning"
                } else {
                    "; no plan can help"
                }
            );
            let Some(next) = next else {
                return Ok(Err(FallbackReason::StartRefused {
                    device,
                    error,
                    ranges: plan.ranges.len(),
                    replans,
                }));
            };
            plan = next;
            replans += 1;
        }
    }

    /// The minimum-bytes plan for at most `cap` ranges (only `optimal` honours a cap).
    fn optimal(&self, layout: &Layout, cap: u32) -> Result<Plan, TrackError> {
        Ok(self
            .planner
            .clone()
            .strategy(Strategy::Optimal)
            .max_ranges(cap)
            .plan(layout)?)
    }

    /// START each device in order; on a refusal stop the ones started and say who refused.
    fn start_all(&self, plan: &Plan) -> Result<Vec<u64>, (String, DeviceError)> {
        let mut sizes = Vec::with_capacity(self.container.devices.len());
        for (i, d) in self.container.devices.iter().enumerate() {
            match d.start(plan.page_size, &plan.ranges) {
                Ok(ps) => sizes.push(ps),
                Err(e) => {
                    for s in &self.container.devices[..i] {
                        if let Err(se) = s.stop() {
                            log::warn!("{}: STOP failed: {se}", s.name());
                        }
                    }
                    return Err((d.name().to_string(), e));
                }
            }
        }
        Ok(sizes)
    }

    fn fallback(&self, layout: &Layout, reason: FallbackReason) -> Result<Active, TrackError> {
        // The DMA-able set; behind a vIOMMU its IOMMU regions count whole.
        let plan = self.planner.clone().allow_viommu(true).plan(layout)?;
        let active = iommu_or_all_dirty(
            &self.container,
            self.force,
            plan.dma,
            self.host_page(),
            reason,
        );
        match (&active.mode, self.force) {
            (TrackingMode::AllDirty { iommu_error, .. }, ModeChoice::Iommu) => Err(self
                .unavailable(match iommu_error {
                    Some(e) => e.to_string(),
                    None => "the container has no IOMMU dirty tracking".to_string(),
                })),
            _ => Ok(active),
        }
    }

    /// The mode in force, if started.
    pub fn mode(&self) -> Option<&TrackingMode> {
        self.active.as_ref().map(|a| &a.mode)
    }

    /// The plan in force (device mode).
    pub fn plan(&self) -> Option<&Plan> {
        self.active.as_ref().and_then(|a| a.plan.as_ref())
    }

    /// Read the dirt logged since the last collect into `ledger`'s pending pages. A failed
    /// read marks its whole range pending and collection goes on; a device whose REPORT
    /// failed is re-armed (see the module documentation).
    pub fn collect(&mut self, ledger: &mut DirtLedger) -> Result<CollectStats, TrackError> {
        self.query(None, ledger)
    }

    /// Read the dirt of the tracked parts of `range` into `ledger` before the caller
    /// unmaps it (after the unmap the device or IOMMU forgets it). IOMMU mode reads without
    /// clearing (`NO_CLEAR`, the kernel's final read before unmap), then clears. Outside
    /// logging: nothing.
    pub fn unmap(
        &mut self,
        range: IovaRange,
        ledger: &mut DirtLedger,
    ) -> Result<CollectStats, TrackError> {
        if self.active.is_none() || range.length == 0 {
            return Ok(CollectStats::default());
        }
        self.query(Some(range), ledger)
    }

    /// Collect, or with `only`, query the parts overlapping it.
    fn query(
        &mut self,
        only: Option<IovaRange>,
        ledger: &mut DirtLedger,
    ) -> Result<CollectStats, TrackError> {
        if let (Some(space), true) = (&self.viommu, self.in_iova_space()) {
            let Some(a) = self.active.as_mut() else {
                return Err(TrackError::NotStarted);
            };
            // Unmaps go through the space itself, which queries before each one.
            if only.is_some() {
                return Ok(CollectStats::default());
            }
            let stats = space.collect(ledger)?;
            // A re-arm may have changed the ranges.
            a.mode = space.mode();
            return Ok(stats);
        }
        let chunk_bits = self.chunk_bits;
        let ctx = rearm::Ctx {
            container: &self.container,
            force: self.force,
            host_page: self.planner.filter().host_page_size,
            chunk_bits,
        };
        let Some(a) = self.active.as_mut() else {
            return Err(TrackError::NotStarted);
        };
        let mut stats = CollectStats::default();
        match &a.mode {
            TrackingMode::Device { .. } => {
                rearm::query_devices(&ctx, a, only, ledger, &mut stats)?;
            }
            TrackingMode::Iommu {
                page_size, ranges, ..
            } => {
                let Some(iommu) = &self.container.iommu else {
                    return Err(TrackError::NotStarted);
                };
                // Unmap: a final read without clearing, then a clearing one so a later
                // mapping at this IOVA starts clean. Where every read clears (type1), the
                // one clearing read is the final read: the caller unmaps right after.
                let passes: &[bool] = if only.is_some() && !iommu.clears_on_every_read() {
                    &[false, true]
                } else {
                    &[true]
                };
                let mapped = iommu.mapped_areas();
                for (w, page) in
                    iommu_windows(mapped.as_deref(), ranges, *page_size, chunk_bits, only)
                {
                    for &clear in passes {
                        let src = Source::Iommu(iommu.as_ref(), clear);
                        if let Err(e) =
                            read_chunk(src, w, page, &mut a.scratch, ledger, &mut stats)?
                        {
                            log::warn!(
                                "{}: reading {w} failed ({e}): marking it dirty",
                                src.name()
                            );
                            stats.newly_pending += ledger.mark_range(w);
                            break;
                        }
                    }
                }
            }
            TrackingMode::AllDirty { ranges, .. } => {
                for &r in ranges {
                    let part = match only {
                        None => Some(r),
                        Some(u) => span_of(r, u),
                    };
                    if let Some(p) = part {
                        stats.newly_pending += ledger.mark_range(p);
                    }
                }
            }
        }
        Ok(stats)
    }

    /// A final collect, then stop: nothing logged so far is lost.
    pub fn finish(&mut self, ledger: &mut DirtLedger) -> Result<CollectStats, TrackError> {
        let stats = self.collect(ledger);
        self.stop();
        stats
    }

    /// Stop tracking on every device (or the IOMMU). Idempotent. Uncollected device dirt
    /// is discarded by STOP: collect first.
    pub fn stop(&mut self) {
        let Some(a) = self.active.take() else { return };
        if let (Some(space), true) = (&self.viommu, self.in_iova_space()) {
            space.stop();
        }
        stop_mode(&self.container, &a.mode);
        log::info!("container {}: dirty tracking stopped", self.container.name);
    }

    /// Stop, then start again with ranges planned from `layout` (which may have changed).
    /// The ledger is not touched: its pending dirt stays for the retry.
    pub fn restart(&mut self, layout: &Layout) -> Result<&TrackingMode, TrackError> {
        self.stop();
        self.start(layout)
    }
}

/// The overlap of `r` and `u`, if any.
fn span_of(r: IovaRange, u: IovaRange) -> Option<IovaRange> {
    let a = (r.iova as u128).max(u.iova as u128);
    let b = r.end().min(u.end());
    (a < b).then(|| IovaRange::new(a as u64, (b - a) as u64))
}

/// Stop what `mode` runs on the container.
fn stop_mode(c: &Container, mode: &TrackingMode) {
    match mode {
        TrackingMode::Device { .. } => {
            for d in &c.devices {
                if let Err(e) = d.stop() {
                    log::warn!("{}: STOP failed: {e}", d.name());
                }
            }
        }
        TrackingMode::Iommu { .. } => {
            if let Some(i) = &c.iommu {
                if let Err(e) = i.set_tracking(false) {
                    log::warn!("{}: disabling dirty tracking failed: {e}", i.name());
                }
            }
        }
        TrackingMode::AllDirty { .. } => {}
    }
}

/// IOMMU tracking over `dma` if the container has it (and device mode is not forced),
/// else all dirty.
fn iommu_or_all_dirty(
    c: &Container,
    force: ModeChoice,
    dma: Vec<IovaRange>,
    page: u64,
    reason: FallbackReason,
) -> Active {
    let use_iommu = matches!(force, ModeChoice::Auto | ModeChoice::Iommu);
    let iommu_error = match &c.iommu {
        Some(iommu) if use_iommu => match iommu.set_tracking(true) {
            Ok(()) => {
                return Active {
                    mode: TrackingMode::Iommu {
                        page_size: page,
                        ranges: dma,
                        reason,
                    },
                    plan: None,
                    report_pages: Vec::new(),
                    scratch: Vec::new(),
                };
            }
            Err(e) => Some(e),
        },
        _ => None,
    };
    Active {
        mode: TrackingMode::AllDirty {
            ranges: dma,
            reason,
            iommu_error,
        },
        plan: None,
        report_pages: Vec::new(),
        scratch: Vec::new(),
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
    }
}
