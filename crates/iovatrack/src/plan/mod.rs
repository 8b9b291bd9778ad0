//! From a memory map to the IOVA ranges a device must log.
//!
//! The planner runs once, at migration start: [`filter`] picks the DMA-able bytes, a
//! [`Strategy`] turns them into at most `max_ranges` page-aligned ranges, and
//! [`limits::check_start`] says what a device with given limits would do with them.
//!
//! ```
//! use iovatrack::layout::presets;
//! use iovatrack::plan::{limits::DeviceProfile, Planner, Strategy};
//!
//! let layout = presets::get("q35-16g").unwrap();
//! let plan = Planner::new().device(DeviceProfile::Mlx5.limits()).plan(&layout).unwrap();
//! assert!(plan.ranges.len() <= 4);
//! assert!(plan.device.as_ref().unwrap().accepted());
//! ```

pub mod combine;
pub mod filter;
pub mod limits;
// The report runs START on an emulated device, so it needs the `track` feature.
#[cfg(feature = "track")]
pub mod report;
mod strategy;

use crate::layout::Layout;
use crate::range::{is_pow2, IovaRange};
use filter::{DmaSet, FilterOptions, SkipReason};
use limits::{Accepted, DeviceLimits, StartRefusal};
use serde::Serialize;

/// How the DMA-able set becomes ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Minimum tracked bytes for the range cap: merge touching intervals, then close the
    /// smallest gaps (ties: lowest address) until at most `max_ranges` remain.
    #[default]
    Optimal,
    /// QEMU's buckets as released (8.2 to 10.x): 32-bit, 64-bit, and pci64 for vfio-pci
    /// BARs above 4 GiB. `vfio_listener_valid_section(section, "tracking_update")` keeps
    /// read-only RAM, so a BIOS ROM at the top of 4 GiB stretches the 32-bit bucket to
    /// `0xffffffff`. Includes `ram_device`, ignores the range cap; may overlap.
    Qemu,
    /// [`Strategy::Qemu`] with the later readonly-bypass patch (`5c9da3d65d`, posted for
    /// 11.0): read-only sections are left out of the buckets.
    QemuBypassRo,
    /// Cloud Hypervisor's one range per RAM region; no cap.
    PerSection,
    /// One hull over everything.
    Single,
}

impl Strategy {
    /// Every strategy, in display order.
    pub const ALL: [Strategy; 5] = [
        Strategy::Optimal,
        Strategy::Qemu,
        Strategy::QemuBypassRo,
        Strategy::PerSection,
        Strategy::Single,
    ];

    /// Whether this is one of QEMU's bucket strategies (QEMU's filter, fixed bucket order,
    /// possibly overlapping).
    pub fn is_qemu(self) -> bool {
        matches!(self, Strategy::Qemu | Strategy::QemuBypassRo)
    }

    /// The CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Optimal => "optimal",
            Strategy::Qemu => "qemu",
            Strategy::QemuBypassRo => "qemu-bypass-ro",
            Strategy::PerSection => "per-section",
            Strategy::Single => "single",
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// The container is behind a vIOMMU: the mapping set changes at run time, so no range
    /// set computed at start covers it (QEMU's migration blocker).
    #[error("migration blocker: address space {0:?} is translated by a vIOMMU, so its DMA mappings change at run time and cannot be given to the device at start (QEMU refuses too); use IOMMU dirty tracking, track in IOVA space at run time, or waive the blocker to track the IOMMU regions whole")]
    Viommu(String),
    /// A page size that is not a power of two of at least 4 KiB.
    #[error("page size {0:#x} is not a power of two of at least 4 KiB")]
    PageSize(u64),
    /// The tracking page is smaller than the host page.
    #[error("tracking page size {page:#x} is smaller than the host page size {host:#x}")]
    PageBelowHost {
        /// Tracking page size.
        page: u64,
        /// Host page size.
        host: u64,
    },
    /// `max_ranges` of zero.
    #[error("max ranges must be at least 1")]
    ZeroRanges,
    /// Nothing is DMA-able: every section was skipped.
    #[error("no DMA-able memory: all {0} sections were skipped")]
    NothingToTrack(usize),
    /// A range would cover all 2^64 bytes, which a length cannot express.
    #[error("a range would cover the whole 2^64 address space, which no u64 length can express")]
    WholeSpace,
}

/// A section the filter left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Index in the layout.
    pub index: usize,
    /// Region name.
    pub name: String,
    /// First byte.
    pub start: u64,
    /// Last byte.
    pub last: u64,
    /// Why.
    pub reason: SkipReason,
}

/// Section counts of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SectionCounts {
    /// Sections in the layout.
    pub total: usize,
    /// Sections contributing DMA-able bytes.
    pub tracked: usize,
    /// Sections left out.
    pub skipped: usize,
}

/// What a device would do with a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceView {
    /// The device's limits.
    pub limits: DeviceLimits,
    /// What it would track, or why it refuses.
    #[serde(flatten)]
    pub outcome: DeviceOutcome,
}

/// The result of START on a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "start")]
pub enum DeviceOutcome {
    /// START succeeds.
    Accepted {
        /// What the device tracks.
        #[serde(flatten)]
        accepted: Accepted,
        /// Bytes it tracks.
        tracked_bytes: u128,
    },
    /// START fails.
    Refused {
        /// The errno name.
        errno: &'static str,
        /// The rule and by how much.
        refusal: StartRefusal,
        /// Human message.
        message: String,
    },
}

impl DeviceView {
    /// Run the kernel's START rules for `limits` on `plan`'s ranges.
    pub fn new(limits: DeviceLimits, page_size: u64, ranges: &[IovaRange]) -> Self {
        let outcome = match limits::check_start(&limits, page_size, ranges) {
            Ok(accepted) => DeviceOutcome::Accepted {
                tracked_bytes: accepted.tracked_bytes(),
                accepted,
            },
            Err(refusal) => DeviceOutcome::Refused {
                errno: refusal.errno_name(),
                message: refusal.to_string(),
                refusal,
            },
        };
        DeviceView { limits, outcome }
    }

    /// Whether START would succeed.
    pub fn accepted(&self) -> bool {
        matches!(self.outcome, DeviceOutcome::Accepted { .. })
    }
}

/// The ranges to hand to `DMA_LOGGING_START`, and what they cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Tracking page size; every range is aligned to it.
    pub page_size: u64,
    /// Strategy used.
    pub strategy: Strategy,
    /// Sorted; disjoint except for the `qemu` strategy (see `overlapping`).
    pub ranges: Vec<IovaRange>,
    /// DMA-able bytes (after inward host-page alignment).
    pub dma_bytes: u128,
    /// Sum of range lengths.
    pub tracked_bytes: u128,
    /// Section counts.
    pub sections: SectionCounts,
    /// Whether two ranges share bytes (QEMU's buckets can; the kernel then refuses).
    pub overlapping: bool,
    /// The DMA-able set, merged, at the host page size.
    #[serde(skip)]
    pub dma: Vec<IovaRange>,
    /// Sections left out and why.
    pub skipped: Vec<Skipped>,
    /// The device's view, when planned for one.
    pub device: Option<DeviceView>,
}

impl Plan {
    /// Tracked bytes that are not DMA-able.
    pub fn overhead_bytes(&self) -> u128 {
        self.tracked_bytes.saturating_sub(self.dma_bytes)
    }

    /// DMA-able bytes no range covers (must be zero for a sound plan). Exact, O(n + m).
    pub fn uncovered_bytes(&self) -> u128 {
        uncovered(&self.dma, &self.ranges)
    }
}

/// Bytes of `need` (sorted, disjoint) that no range of `have` covers. Ranges of `have` may
/// overlap and come in any order.
pub fn uncovered(need: &[IovaRange], have: &[IovaRange]) -> u128 {
    let mut cov: Vec<(u128, u128)> = have.iter().map(|r| (r.iova as u128, r.end())).collect();
    cov.sort_unstable();
    let mut missing = 0u128;
    let mut j = 0;
    let mut reach = 0u128; // max end among cov[..j]
    for n in need {
        let (mut at, end) = (n.iova as u128, n.end());
        while at < end {
            while j < cov.len() && cov[j].0 <= at {
                reach = reach.max(cov[j].1);
                j += 1;
            }
            if reach > at {
                at = reach.min(end);
            } else {
                let next = if j < cov.len() {
                    cov[j].0.min(end)
                } else {
                    end
                };
                missing += next - at;
                at = next;
            }
        }
    }
    missing
}

/// Builder for plans.
#[derive(Clone, Debug)]
pub struct Planner {
    strategy: Strategy,
    max_ranges: u32,
    page_size: Option<u64>,
    filter: FilterOptions,
    device: Option<DeviceLimits>,
    allow_viommu: bool,
}

impl Default for Planner {
    fn default() -> Self {
        Self::new()
    }
}

impl Planner {
    /// Optimal strategy, 256 ranges, 4 KiB host and tracking pages, no device.
    pub fn new() -> Self {
        Planner {
            strategy: Strategy::Optimal,
            max_ranges: limits::kernel_max_ranges(4096),
            page_size: None,
            filter: FilterOptions::default(),
            device: None,
            allow_viommu: false,
        }
    }

    /// The strategy.
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }

    /// Range cap for `optimal` (the device's own maximum also applies when one is set).
    pub fn max_ranges(mut self, n: u32) -> Self {
        self.max_ranges = n;
        self
    }

    /// Tracking page size (default: the host page size).
    pub fn page_size(mut self, bytes: u64) -> Self {
        self.page_size = Some(bytes);
        self
    }

    /// Host page size for the inward alignment of sections.
    pub fn host_page_size(mut self, bytes: u64) -> Self {
        self.filter.host_page_size = bytes;
        self
    }

    /// Keep `ram_device` sections (P2P).
    pub fn include_ram_device(mut self, yes: bool) -> Self {
        self.filter.include_ram_device = yes;
        self
    }

    /// Keep read-only sections.
    pub fn include_readonly(mut self, yes: bool) -> Self {
        self.filter.include_readonly = yes;
        self
    }

    /// Plan for a device: its range maximum caps `optimal`, and the plan carries the
    /// device's view (accepted or refused, what it tracks).
    pub fn device(mut self, limits: DeviceLimits) -> Self {
        self.device = Some(limits);
        self
    }

    /// Waive the vIOMMU blocker: IOMMU regions are tracked whole.
    pub fn allow_viommu(mut self, yes: bool) -> Self {
        self.allow_viommu = yes;
        self
    }

    /// The filter options in force.
    pub fn filter(&self) -> FilterOptions {
        FilterOptions {
            include_iommu: self.allow_viommu,
            ..self.filter
        }
    }

    /// The effective range cap of `optimal`.
    pub fn effective_max_ranges(&self) -> u32 {
        match self.device {
            // A pds device with no regions still gets a one-range plan, which it refuses.
            Some(d) => self
                .max_ranges
                .min(d.tracked_max_ranges().max(1))
                .min(d.core_max_ranges),
            None => self.max_ranges,
        }
    }

    /// Compute the plan. O(n log n) in the number of sections.
    pub fn plan(&self, layout: &Layout) -> Result<Plan, PlanError> {
        let host = self.filter.host_page_size;
        if !is_pow2(host) || host < 4096 {
            return Err(PlanError::PageSize(host));
        }
        let page = self.page_size.unwrap_or(host);
        if !is_pow2(page) || page < 4096 {
            return Err(PlanError::PageSize(page));
        }
        if page < host {
            return Err(PlanError::PageBelowHost { page, host });
        }
        if self.max_ranges == 0 {
            return Err(PlanError::ZeroRanges);
        }
        if layout.viommu() && !self.allow_viommu {
            return Err(PlanError::Viommu(layout.address_space().to_string()));
        }
        let filter = self.filter();
        let set = filter::dma_able(layout, &filter);
        // QEMU's buckets use QEMU's own filter and the host page, whatever our flags say.
        let (ranges, page_size, basis) = match self.strategy {
            Strategy::Qemu | Strategy::QemuBypassRo => {
                let rules = if self.strategy == Strategy::Qemu {
                    FilterOptions::qemu(host)
                } else {
                    FilterOptions::qemu_bypass_ro(host)
                };
                let q = filter::dma_able(
                    layout,
                    &FilterOptions {
                        include_iommu: self.allow_viommu,
                        ..rules
                    },
                );
                (strategy::qemu(layout, &q), host, q)
            }
            Strategy::Optimal => {
                let mut v = strategy::optimal(&set, page, self.effective_max_ranges() as usize)?;
                if let Some(d) = self.device.filter(|d| d.driver.is_pds()) {
                    v = strategy::pds_room(v, page, u64::from(d.page_count_align.max(1)));
                }
                (v, page, set)
            }
            Strategy::PerSection => (strategy::per_section(&set, page)?, page, set),
            Strategy::Single => (strategy::optimal(&set, page, 1)?, page, set),
        };
        if basis.ranges.is_empty() {
            return Err(PlanError::NothingToTrack(layout.sections().len()));
        }
        let overlapping = ranges.windows(2).any(|w| w[0].overlaps(&w[1]))
            || (self.strategy.is_qemu() && has_overlap(&ranges));
        let mut sorted = ranges.clone();
        sorted.sort_unstable();
        let dma = strategy::merge_touching(basis.ranges.iter().map(|r| r.1), host)?;
        let skipped = skipped_list(layout, &basis);
        let device = self.device.map(|d| DeviceView::new(d, page_size, &ranges));
        Ok(Plan {
            page_size,
            strategy: self.strategy,
            tracked_bytes: ranges.iter().map(|r| r.length as u128).sum(),
            ranges: if self.strategy.is_qemu() {
                ranges
            } else {
                sorted
            },
            dma_bytes: basis.bytes,
            sections: SectionCounts {
                total: layout.sections().len(),
                tracked: basis.ranges.len(),
                skipped: basis.skipped.len(),
            },
            overlapping,
            dma,
            skipped,
            device,
        })
    }
}

fn has_overlap(ranges: &[IovaRange]) -> bool {
    ranges
        .iter()
        .enumerate()
        .any(|(i, a)| ranges[i + 1..].iter().any(|b| a.overlaps(b)))
}

fn skipped_list(layout: &Layout, set: &DmaSet) -> Vec<Skipped> {
    set.skipped
        .iter()
        .map(|&(index, reason)| {
            let s = &layout.sections()[index];
            Skipped {
                index,
                name: s.name.clone(),
                start: s.start,
                last: s.last,
                reason,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
