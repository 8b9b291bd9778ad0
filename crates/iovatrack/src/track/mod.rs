//! Dirty tracking for one VFIO container: which mode, START with re-plan and fallback,
//! collecting dirt into a [`DirtLedger`] without ever dropping it.
//!
//! Mode choice (QEMU master's, reference/qemu-upstream.md §3 and §5):
//! 1. **Device DMA logging** when every device of the container supports it. The ranges
//!    come from the [`Planner`]; every device gets the same ones. A START refused with
//!    `E2BIG` or `EOPNOTSUPP` re-plans with half as many ranges (optimal strategy), down to
//!    one; any other refusal, or one range refused, falls back. When one device fails, the
//!    devices already started are stopped.
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
//! Failure rules: a failed REPORT (or IOMMU read) marks the whole tracked range pending and
//! collection carries on. Dirt read from a source is cleared there, so it stays in the
//! ledger until the caller acknowledges the pass ([`DirtLedger::ack`]). Before a range is
//! unmapped while logging, [`Tracker::unmap`] reads its dirt.
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

mod ledger;
#[cfg(test)]
mod tests;

pub use ledger::{DirtLedger, RegionProblem};

use crate::bitmap::{BitmapError, Geometry};
use crate::device::{DeviceError, DmaLogger, Errno, IommuDirtyTracker};
use crate::layout::Layout;
use crate::plan::{Plan, PlanError, Planner, Strategy};
use crate::range::{align_down, align_up, human_bytes, is_pow2, IovaRange};
use std::fmt;
use std::sync::Arc;

/// Bits per REPORT (or IOMMU read) by default: 8 Mi bits = a 1 MiB scratch bitmap, 32 GiB
/// of IOVA at 4 KiB.
pub const REPORT_CHUNK_BITS: u64 = 8 << 20;

/// One VFIO container: the devices attached to it and its IOMMU's dirty tracking, if any.
#[derive(Clone)]
pub struct Container {
    /// A name for messages.
    pub name: String,
    /// The devices (each may or may not support DMA logging).
    pub devices: Vec<Arc<dyn DmaLogger>>,
    /// IOMMU dirty tracking of the container, if the IOMMU has it.
    pub iommu: Option<Arc<dyn IommuDirtyTracker>>,
}

impl Container {
    /// A container with no devices and no IOMMU tracking.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            devices: Vec::new(),
            iommu: None,
        }
    }

    /// Add a device.
    pub fn device(mut self, device: Arc<dyn DmaLogger>) -> Self {
        self.devices.push(device);
        self
    }

    /// Set the IOMMU dirty tracker.
    pub fn iommu(mut self, iommu: Arc<dyn IommuDirtyTracker>) -> Self {
        self.iommu = Some(iommu);
        self
    }
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .field(
                "devices",
                &self.devices.iter().map(|d| d.name()).collect::<Vec<_>>(),
            )
            .field("iommu", &self.iommu.as_ref().map(|i| i.name()))
            .finish()
    }
}

/// Why device DMA logging is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// A device has no DMA logging (its probe failed).
    NoDeviceLogging {
        /// The device.
        device: String,
        /// The probe's error.
        error: DeviceError,
    },
    /// A device refused START, even after re-planning (or with an errno re-planning
    /// cannot help).
    StartRefused {
        /// The device.
        device: String,
        /// Its last START error.
        error: DeviceError,
        /// Ranges in the last attempt.
        ranges: usize,
        /// Re-plans tried.
        replans: u32,
    },
    /// The container is behind a vIOMMU: device logging cannot cover dynamic mappings.
    Viommu {
        /// The translated address space.
        address_space: String,
    },
}

impl fmt::Display for FallbackReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackReason::NoDeviceLogging { device, error } => {
                write!(f, "device {device} has no DMA logging ({error})")
            }
            FallbackReason::StartRefused {
                device,
                error,
                ranges,
                replans,
            } => write!(
                f,
                "device {device} refused DMA logging of {ranges} range(s) after {replans} re-plan(s) ({error})"
            ),
            FallbackReason::Viommu { address_space } => write!(
                f,
                "address space {address_space:?} is behind a vIOMMU, whose mappings no fixed device range set covers"
            ),
        }
    }
}

/// The tracking mode in force, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrackingMode {
    /// Every device logs its own DMA writes in `ranges`.
    Device {
        /// The page size requested at START.
        page_size: u64,
        /// The ranges every device was given (empty: no devices, nothing to track).
        ranges: Vec<IovaRange>,
        /// The page size each device chose, in the container's device order.
        device_page_sizes: Vec<u64>,
        /// Re-plans with fewer ranges before START succeeded.
        replans: u32,
    },
    /// The IOMMU tracks dirt on its page tables.
    Iommu {
        /// The page size of the reads.
        page_size: u64,
        /// The DMA-able ranges read each collect.
        ranges: Vec<IovaRange>,
        /// Why device logging is not used.
        reason: FallbackReason,
    },
    /// No tracking: every DMA-able page is pending after every collect.
    AllDirty {
        /// The DMA-able ranges marked each collect.
        ranges: Vec<IovaRange>,
        /// Why device logging is not used.
        reason: FallbackReason,
        /// Why IOMMU tracking is not used: its error, or `None` when there is none.
        iommu_error: Option<DeviceError>,
    },
}

impl TrackingMode {
    /// A short name: `device`, `iommu` or `all-dirty`.
    pub fn name(&self) -> &'static str {
        match self {
            TrackingMode::Device { .. } => "device",
            TrackingMode::Iommu { .. } => "iommu",
            TrackingMode::AllDirty { .. } => "all-dirty",
        }
    }

    /// Why device logging is not used (`None` in device mode).
    pub fn reason(&self) -> Option<&FallbackReason> {
        match self {
            TrackingMode::Device { .. } => None,
            TrackingMode::Iommu { reason, .. } | TrackingMode::AllDirty { reason, .. } => {
                Some(reason)
            }
        }
    }

    /// The ranges tracked (device mode) or read/marked (other modes).
    pub fn ranges(&self) -> &[IovaRange] {
        match self {
            TrackingMode::Device { ranges, .. }
            | TrackingMode::Iommu { ranges, .. }
            | TrackingMode::AllDirty { ranges, .. } => ranges,
        }
    }
}

fn bytes(ranges: &[IovaRange]) -> String {
    human_bytes(ranges.iter().map(|r| r.length as u128).sum())
}

impl fmt::Display for TrackingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrackingMode::Device {
                ranges,
                device_page_sizes,
                ..
            } if device_page_sizes.is_empty() => {
                let _ = ranges;
                write!(f, "device DMA logging: no devices, nothing to track")
            }
            TrackingMode::Device {
                page_size,
                ranges,
                device_page_sizes,
                replans,
            } => {
                write!(
                    f,
                    "device DMA logging: {} device(s), {} range(s) ({}) at {}",
                    device_page_sizes.len(),
                    ranges.len(),
                    bytes(ranges),
                    human_bytes(*page_size as u128)
                )?;
                if device_page_sizes.iter().any(|p| p != page_size) {
                    let ps: Vec<String> = device_page_sizes
                        .iter()
                        .map(|&p| human_bytes(p as u128))
                        .collect();
                    write!(f, ", device pages {}", ps.join(", "))?;
                }
                if *replans > 0 {
                    write!(f, ", after {replans} re-plan(s)")?;
                }
                Ok(())
            }
            TrackingMode::Iommu {
                page_size,
                ranges,
                reason,
            } => write!(
                f,
                "IOMMU dirty tracking: {} range(s) ({}) at {}, because {reason}",
                ranges.len(),
                bytes(ranges),
                human_bytes(*page_size as u128)
            ),
            TrackingMode::AllDirty {
                ranges,
                reason,
                iommu_error,
            } => {
                write!(
                    f,
                    "all dirty: every DMA-able page ({}) re-sent each pass, because {reason}",
                    bytes(ranges)
                )?;
                match iommu_error {
                    Some(e) => write!(f, ", and IOMMU dirty tracking failed ({e})"),
                    None => write!(f, ", and the container has no IOMMU dirty tracking"),
                }
            }
        }
    }
}

/// What a collect (or unmap query) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Successful REPORTs / IOMMU reads.
    pub reports: u64,
    /// Failed ones (each marked its whole range pending).
    pub report_errors: u64,
    /// Pages newly pending in the ledger.
    pub newly_pending: u64,
    /// Bits set in the reports, at the sources' page sizes.
    pub device_bits: u64,
}

impl CollectStats {
    /// Add another's counts.
    pub fn add(&mut self, other: &CollectStats) {
        self.reports += other.reports;
        self.report_errors += other.report_errors;
        self.newly_pending += other.newly_pending;
        self.device_bits += other.device_bits;
    }
}

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
    active: Option<Active>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("container", &self.container)
            .field("mode", &self.mode())
            .finish()
    }
}

/// A source of dirt.
#[derive(Clone, Copy)]
enum Source<'a> {
    Device(&'a dyn DmaLogger),
    Iommu(&'a dyn IommuDirtyTracker, bool),
}

impl Source<'_> {
    fn read(&self, range: IovaRange, page: u64, bm: &mut [u64]) -> Result<(), DeviceError> {
        match *self {
            Source::Device(d) => d.report(range, page, bm),
            Source::Iommu(i, clear) => i.read_dirty(range, page, bm, clear),
        }
    }

    fn name(&self) -> &str {
        match self {
            Source::Device(d) => d.name(),
            Source::Iommu(i, _) => i.name(),
        }
    }
}

/// Bytes `[lo, hi)` of `part` (inside `within`), widened to `page` and clipped to `within`.
fn widen(lo: u128, hi: u128, page: u64, within: IovaRange) -> IovaRange {
    let a = align_down(lo, page).max(within.iova as u128);
    let b = align_up(hi, page).min(within.end());
    IovaRange::new(a as u64, (b - a) as u64)
}

/// Read `range` from `src` at `page` in chunks of at most `chunk_bits` into the ledger. On
/// an error, `on_error` is marked pending whole and the rest of `range` is skipped.
#[allow(clippy::too_many_arguments)]
fn read_range(
    src: Source<'_>,
    range: IovaRange,
    page: u64,
    chunk_bits: u64,
    on_error: IovaRange,
    scratch: &mut [u64],
    ledger: &mut DirtLedger,
    stats: &mut CollectStats,
) -> Result<(), TrackError> {
    let chunk_bytes = (chunk_bits as u128 * page as u128).min(u64::MAX as u128) as u64;
    let mut off = 0u64;
    while off < range.length {
        let n = (range.length - off).min(chunk_bytes);
        let chunk = IovaRange::new(range.iova + off, n);
        let bits = n.div_ceil(page);
        let words = bits.div_ceil(64) as usize;
        let bm = &mut scratch[..words];
        // The sources only OR into the buffer.
        bm.fill(0);
        if let Err(e) = src.read(chunk, page, bm) {
            log::warn!(
                "{}: reading {chunk} failed ({e}): marking {on_error} dirty",
                src.name()
            );
            stats.report_errors += 1;
            stats.newly_pending += ledger.mark_range(on_error);
            return Ok(());
        }
        stats.reports += 1;
        let set: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
        stats.device_bits += set;
        if set > 0 {
            match Geometry::new(chunk.iova, page, bits) {
                Ok(geo) => stats.newly_pending += ledger.or_report(bm, &geo)?,
                // The last page sticks out past 2^64: mark the chunk whole (conservative).
                Err(_) => stats.newly_pending += ledger.mark_range(chunk),
            }
        }
        off += n;
    }
    Ok(())
}

impl Tracker {
    /// A tracker for `container`, planning with `planner` (its `max_ranges` is the first
    /// START's cap).
    pub fn new(container: Container, planner: Planner) -> Self {
        Self {
            container,
            planner,
            chunk_bits: REPORT_CHUNK_BITS,
            active: None,
        }
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

    fn choose(&self, layout: &Layout) -> Result<Active, TrackError> {
        let c = &self.container;
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
                if c.iommu.is_none() {
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
        self.fallback(layout, reason)
    }

    /// START every device with the same plan, re-planning on E2BIG/EOPNOTSUPP.
    /// `Ok(Err(reason))`: every attempt refused, nothing left started.
    fn start_devices(&self, layout: &Layout) -> Result<Result<Active, FallbackReason>, TrackError> {
        let mut plan = self.planner.plan(layout)?;
        let mut replans = 0u32;
        loop {
            match self.start_all(&plan) {
                Ok(device_page_sizes) => {
                    let report_pages: Vec<u64> = device_page_sizes
                        .iter()
                        .map(|&p| report_page(p, plan.page_size))
                        .collect();
                    let scratch = self.scratch_for(&plan.ranges, &report_pages);
                    return Ok(Ok(Active {
                        mode: TrackingMode::Device {
                            page_size: plan.page_size,
                            ranges: plan.ranges.clone(),
                            device_page_sizes,
                            replans,
                        },
                        plan: Some(plan),
                        report_pages,
                        scratch,
                    }));
                }
                Err((device, error)) => {
                    let retry = matches!(error.errno, Errno::E2BIG | Errno::EOPNOTSUPP)
                        && plan.ranges.len() > 1;
                    log::warn!(
                        "container {}: {device} refused START with {} range(s): {error}{}",
                        self.container.name,
                        plan.ranges.len(),
                        if retry {
                            "; re-planning with fewer"
                        } else {
                            ""
                        }
                    );
                    if !retry {
                        return Ok(Err(FallbackReason::StartRefused {
                            device,
                            error,
                            ranges: plan.ranges.len(),
                            replans,
                        }));
                    }
                    let cap = (plan.ranges.len() / 2).max(1) as u32;
                    // Only `optimal` honours a cap; the others ignore it.
                    plan = self
                        .planner
                        .clone()
                        .strategy(Strategy::Optimal)
                        .max_ranges(cap)
                        .plan(layout)?;
                    replans += 1;
                }
            }
        }
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

    fn scratch_for(&self, ranges: &[IovaRange], pages: &[u64]) -> Vec<u64> {
        let max_len = ranges.iter().map(|r| r.length).max().unwrap_or(0);
        let bits = pages
            .iter()
            .map(|&p| max_len.div_ceil(p.max(1)).min(self.chunk_bits))
            .max()
            .unwrap_or(0);
        vec![0; bits.div_ceil(64) as usize]
    }

    fn fallback(&self, layout: &Layout, reason: FallbackReason) -> Result<Active, TrackError> {
        // The DMA-able set; behind a vIOMMU its IOMMU regions count whole.
        let plan = self.planner.clone().allow_viommu(true).plan(layout)?;
        let ranges = plan.dma;
        let iommu_error = match &self.container.iommu {
            None => None,
            Some(iommu) => match iommu.set_tracking(true) {
                Ok(()) => {
                    let page = self.host_page();
                    let scratch = self.scratch_for(&ranges, &[page]);
                    return Ok(Active {
                        mode: TrackingMode::Iommu {
                            page_size: page,
                            ranges,
                            reason,
                        },
                        plan: None,
                        report_pages: Vec::new(),
                        scratch,
                    });
                }
                Err(e) => Some(e),
            },
        };
        Ok(Active {
            mode: TrackingMode::AllDirty {
                ranges,
                reason,
                iommu_error,
            },
            plan: None,
            report_pages: Vec::new(),
            scratch: Vec::new(),
        })
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
    /// read marks its whole range pending and collection goes on.
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
        let chunk_bits = self.chunk_bits;
        let Some(a) = self.active.as_mut() else {
            return Err(TrackError::NotStarted);
        };
        let mut stats = CollectStats::default();
        // The parts of `r` to read at `page`: all of it, or its overlap with `only`.
        let part = |r: IovaRange, page: u64| match only {
            None => Some(r),
            Some(u) if u.overlaps(&r) => Some(widen(
                (u.iova as u128).max(r.iova as u128),
                u.end().min(r.end()),
                page,
                r,
            )),
            Some(_) => None,
        };
        match &a.mode {
            TrackingMode::Device { ranges, .. } => {
                for (d, &page) in self.container.devices.iter().zip(&a.report_pages) {
                    for &r in ranges {
                        let Some(p) = part(r, page) else { continue };
                        let src = Source::Device(d.as_ref());
                        read_range(
                            src,
                            p,
                            page,
                            chunk_bits,
                            r,
                            &mut a.scratch,
                            ledger,
                            &mut stats,
                        )?;
                    }
                }
            }
            TrackingMode::Iommu {
                page_size, ranges, ..
            } => {
                let Some(iommu) = &self.container.iommu else {
                    return Err(TrackError::NotStarted);
                };
                // Unmap: a final read without clearing, then a clearing one so a later
                // mapping at this IOVA starts clean.
                let passes: &[bool] = if only.is_some() {
                    &[false, true]
                } else {
                    &[true]
                };
                for &r in ranges {
                    let Some(p) = part(r, *page_size) else {
                        continue;
                    };
                    for &clear in passes {
                        let src = Source::Iommu(iommu.as_ref(), clear);
                        read_range(
                            src,
                            p,
                            *page_size,
                            chunk_bits,
                            r,
                            &mut a.scratch,
                            ledger,
                            &mut stats,
                        )?;
                    }
                }
            }
            TrackingMode::AllDirty { ranges, .. } => {
                for &r in ranges {
                    if let Some(p) = part(r, 1) {
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
        match a.mode {
            TrackingMode::Device { .. } => {
                for d in &self.container.devices {
                    if let Err(e) = d.stop() {
                        log::warn!("{}: STOP failed: {e}", d.name());
                    }
                }
            }
            TrackingMode::Iommu { .. } => {
                if let Some(i) = &self.container.iommu {
                    if let Err(e) = i.set_tracking(false) {
                        log::warn!("{}: disabling dirty tracking failed: {e}", i.name());
                    }
                }
            }
            TrackingMode::AllDirty { .. } => {}
        }
        log::info!("container {}: dirty tracking stopped", self.container.name);
    }

    /// Stop, then start again with ranges planned from `layout` (which may have changed).
    /// The ledger is not touched: its pending dirt stays for the retry.
    pub fn restart(&mut self, layout: &Layout) -> Result<&TrackingMode, TrackError> {
        self.stop();
        self.start(layout)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
    }
}
