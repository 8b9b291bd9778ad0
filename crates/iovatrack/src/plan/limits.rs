//! What a device accepts at `DMA_LOGGING_START`: the kernel core's rules plus a driver's.
//!
//! Real limits are firmware-reported (mlx5's `pg_track_*` capabilities, pds' `max_regions`),
//! so every number here is a parameter; the profiles only choose defaults.

use super::combine::combine;
use crate::range::IovaRange;
use serde::Serialize;

/// Kernel `LOG_MAX_RANGES` for a kernel page size: `PAGE_SIZE / sizeof(range)`.
pub const fn kernel_max_ranges(kernel_page_size: u64) -> u32 {
    (kernel_page_size / 16) as u32
}

/// How a driver treats the requested tracking page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageSizePolicy {
    /// Use as given (core only; pds).
    AsIs,
    /// mlx5: floor to a power of two, clamp to `[2^min_log2, 2^max_log2]`, write back.
    FloorClamp {
        /// log2 of the smallest page the device tracks.
        min_log2: u8,
        /// log2 of the largest page the device tracks.
        max_log2: u8,
    },
}

/// Which driver a device's behaviour follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    /// Only the vfio core's checks; the device takes every range the core accepts.
    Generic,
    /// `mlx5_vfio_pci`: merge to max ranges, total-size check (EOPNOTSUPP), page clamp.
    Mlx5,
    /// `pds_vfio_pci` 6.8+: merge to the device's `max_regions`; a REPORT must stay inside
    /// one region and acknowledges whole 64-page words of it.
    Pds,
    /// `pds_vfio_pci` 6.6: as [`DriverKind::Pds`], but the driver forces one region (it
    /// merges everything into one span) and keeps the merged length as the region size.
    Pds66,
}

impl DriverKind {
    /// Either pds variant.
    pub fn is_pds(self) -> bool {
        matches!(self, DriverKind::Pds | DriverKind::Pds66)
    }
}

/// A device's DMA-logging limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceLimits {
    /// Which driver rules apply.
    pub driver: DriverKind,
    /// The core's cap on `num_ranges` (E2BIG above it): 256 on 4 KiB kernels.
    pub core_max_ranges: u32,
    /// How many ranges the device itself tracks; the driver merges down to this.
    pub max_ranges: u32,
    /// Page-size negotiation.
    pub page_size: PageSizePolicy,
    /// mlx5: bounds on `ilog2(roundup_pow_of_two(sum of lengths))` after merging.
    pub addr_space_log2: Option<(u8, u8)>,
    /// pds: the firmware rounds each region's `page_count` up to a multiple of this (1: it
    /// keeps the driver's count). The driver says the device "might adjust" it; 6.8+
    /// refuses a device bitmap offset that is not whole u64 words, so a device that can
    /// take more than one region must round to 64, the default.
    pub page_count_align: u32,
}

impl DeviceLimits {
    /// The vfio core alone (a driver with no limit of its own), on a 4 KiB kernel.
    pub const fn generic() -> Self {
        Self {
            driver: DriverKind::Generic,
            core_max_ranges: kernel_max_ranges(4096),
            max_ranges: kernel_max_ranges(4096),
            page_size: PageSizePolicy::AsIs,
            addr_space_log2: None,
            page_count_align: 1,
        }
    }

    /// An mlx5 (ConnectX) VF. Defaults: 4 ranges, pages 4 KiB..1 GiB, tracked total
    /// 2^12..2^42 bytes. The 2^42 ceiling is the one QEMU cites for mlx5 (commit
    /// a31fe5daea); the firmware reports the others, and they are chosen here so that the
    /// device, not the core, is the binding constraint. Override them with what the
    /// device's `pg_track_*` caps say.
    pub const fn mlx5() -> Self {
        Self {
            driver: DriverKind::Mlx5,
            core_max_ranges: kernel_max_ranges(4096),
            max_ranges: 4,
            page_size: PageSizePolicy::FloorClamp {
                min_log2: 12,
                max_log2: 30,
            },
            addr_space_log2: Some((12, 42)),
            page_count_align: 1,
        }
    }

    /// An AMD/Pensando pds VF on a 6.8+ kernel (multi-region). Default 8 regions:
    /// `max_regions` is a device-reported u8 (0: no dirty tracking, EOPNOTSUPP).
    pub const fn pds() -> Self {
        Self {
            driver: DriverKind::Pds,
            core_max_ranges: kernel_max_ranges(4096),
            max_ranges: 8,
            page_size: PageSizePolicy::AsIs,
            addr_space_log2: None,
            page_count_align: 64,
        }
    }

    /// The same pds VF on a 6.6 kernel: the driver forces one region whatever the device
    /// reports (`max_ranges` is still the device's `max_regions`; 0 is still EOPNOTSUPP).
    pub const fn pds_6_6() -> Self {
        Self {
            driver: DriverKind::Pds66,
            ..Self::pds()
        }
    }

    /// How many ranges the driver ends up tracking at most (pds on 6.6: one).
    pub fn tracked_max_ranges(&self) -> u32 {
        match self.driver {
            DriverKind::Pds66 => self.max_ranges.min(1),
            _ => self.max_ranges,
        }
    }

    /// The page size the driver would choose for a requested one (mlx5 writes it back).
    pub fn negotiate_page_size(&self, requested: u64) -> u64 {
        match self.page_size {
            PageSizePolicy::AsIs => requested,
            PageSizePolicy::FloorClamp { min_log2, max_log2 } => {
                // `ilog2(0)` is -1, which the driver's unsigned clamp takes as huge: the
                // maximum page.
                let log = if requested == 0 {
                    u8::MAX
                } else {
                    63 - requested.leading_zeros() as u8
                };
                1u64 << log.clamp(min_log2, max_log2)
            }
        }
    }
}

/// Named profiles for the CLI and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceProfile {
    /// [`DeviceLimits::generic`].
    Generic,
    /// [`DeviceLimits::mlx5`].
    Mlx5,
    /// [`DeviceLimits::pds`] (6.8+, multi-region).
    Pds,
    /// [`DeviceLimits::pds_6_6`] (6.6, one region).
    Pds66,
}

impl DeviceProfile {
    /// The default limits of this profile.
    pub const fn limits(self) -> DeviceLimits {
        match self {
            DeviceProfile::Generic => DeviceLimits::generic(),
            DeviceProfile::Mlx5 => DeviceLimits::mlx5(),
            DeviceProfile::Pds => DeviceLimits::pds(),
            DeviceProfile::Pds66 => DeviceLimits::pds_6_6(),
        }
    }
}

/// Why a device refuses `DMA_LOGGING_START`, with the kernel's errno.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum StartRefusal {
    /// `num_ranges == 0` (EINVAL).
    #[error("EINVAL: no ranges")]
    NoRanges,
    /// More ranges than the core takes (E2BIG).
    #[error("E2BIG: {count} ranges, the kernel takes at most {max} ({} too many)", count - max)]
    TooManyRanges {
        /// Ranges given.
        count: usize,
        /// `LOG_MAX_RANGES`.
        max: usize,
    },
    /// A range not aligned to the page size (EINVAL).
    #[error("EINVAL: range {index} {range} is not aligned to the page size {page_size:#x}")]
    Misaligned {
        /// Position in the request.
        index: usize,
        /// The range.
        range: IovaRange,
        /// The requested page size.
        page_size: u64,
    },
    /// `iova + length` reaches or passes 2^64 (EOVERFLOW).
    #[error("EOVERFLOW: range {index} {range} ends at or past 2^64")]
    Overflow {
        /// Position in the request.
        index: usize,
        /// The range.
        range: IovaRange,
    },
    /// Two ranges share a byte (EINVAL).
    #[error("EINVAL: range {index} {range} overlaps range {other}")]
    Overlap {
        /// Position of the later range.
        index: usize,
        /// The later range.
        range: IovaRange,
        /// Position of the earlier range it meets.
        other: usize,
    },
    /// mlx5: the tracked total, rounded up to a power of two, is outside the device's
    /// address-space bounds (EOPNOTSUPP).
    #[error("EOPNOTSUPP: tracked total {total:#x} rounds up to 2^{log2}, outside the device's 2^{min}..2^{max}{}",
        if *log2 > *max as u32 { format!(" (over by {:#x} bytes)", *total - (1u128 << *max)) } else { String::new() })]
    AddressSpace {
        /// Sum of lengths after the driver's merge.
        total: u128,
        /// `ilog2(roundup_pow_of_two(total))`.
        log2: u32,
        /// Lower bound (log2).
        min: u8,
        /// Upper bound (log2).
        max: u8,
    },
    /// pds: the device reports `max_regions == 0`, no dirty tracking (EOPNOTSUPP). No plan
    /// helps.
    #[error("EOPNOTSUPP: the device tracks no regions (max_regions == 0)")]
    NoRegions,
    /// pds: a region's host bitmap would be empty (`page_count / 8 == 0`, ENOMEM).
    #[error("ENOMEM: region {index} has {page_count} pages, an empty bitmap")]
    RegionBitmap {
        /// Region index, ascending.
        index: usize,
        /// Its page count after the device's adjustment.
        page_count: u32,
    },
    /// pds 6.8+: a region's device bitmap ends off a u64 word (EINVAL).
    #[error("EINVAL: device bitmap offset {offset} after region {index} is not whole u64 words")]
    DeviceBitmapOffset {
        /// Region index, ascending.
        index: usize,
        /// Bytes of device bitmap after it.
        offset: u64,
    },
}

impl StartRefusal {
    /// The errno the kernel returns.
    pub fn errno(&self) -> i32 {
        match self {
            StartRefusal::TooManyRanges { .. } => libc::E2BIG,
            StartRefusal::Overflow { .. } => libc::EOVERFLOW,
            StartRefusal::AddressSpace { .. } | StartRefusal::NoRegions => libc::EOPNOTSUPP,
            StartRefusal::RegionBitmap { .. } => libc::ENOMEM,
            _ => libc::EINVAL,
        }
    }

    /// The errno's name.
    pub fn errno_name(&self) -> &'static str {
        match self.errno() {
            libc::E2BIG => "E2BIG",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ENOMEM => "ENOMEM",
            _ => "EINVAL",
        }
    }

    /// Whether the vfio core makes this refusal, before the driver sees the request.
    pub fn is_core(&self) -> bool {
        matches!(
            self,
            StartRefusal::NoRanges
                | StartRefusal::TooManyRanges { .. }
                | StartRefusal::Misaligned { .. }
                | StartRefusal::Overflow { .. }
                | StartRefusal::Overlap { .. }
        )
    }
}

/// One pds region as `pds_vfio_dirty_enable` sets it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PdsRegion {
    /// `dma_base`: the merged range's start.
    pub start: u64,
    /// Pages the device tracks: `DIV_ROUND_UP(len, page_size)` stored in a `u32` (it
    /// wraps past 2^32 pages), then rounded up by the firmware.
    pub page_count: u32,
    /// Where a REPORT may go from `start`: 6.6 keeps the merged length, 6.8+ uses
    /// `page_count * page_size`.
    pub size: u64,
}

impl PdsRegion {
    /// The region's host bitmap, `page_count / 8` bytes: no REPORT may need more.
    pub fn bmp_bytes(&self) -> u64 {
        u64::from(self.page_count) / 8
    }
}

/// pds's per-region setup for merged, sorted `ranges` at `page_size` (a power of two):
/// the wrapped `u32` page count, the firmware's rounding, the empty-bitmap allocation
/// (`vzalloc(0)` fails: ENOMEM) and 6.8's whole-word device bitmap offsets (EINVAL).
pub fn pds_regions(
    limits: &DeviceLimits,
    page_size: u64,
    ranges: &[IovaRange],
) -> Result<Vec<PdsRegion>, StartRefusal> {
    let align = limits.page_count_align.max(1);
    let mut offset_bytes = 0u64;
    let mut out = Vec::with_capacity(ranges.len());
    for (index, r) in ranges.iter().enumerate() {
        let pages = r.length.div_ceil(page_size.max(1));
        // The driver's `u32 page_count = DIV_ROUND_UP(...)` keeps the low 32 bits.
        let wrapped = pages as u32;
        // The firmware rounds up, but (this model's choice: the real rule is not public)
        // never into the next region, so no page is tracked twice; a region then left off
        // a whole word fails 6.8's offset check below.
        let room = ranges
            .get(index + 1)
            .map_or(u64::MAX, |next| (next.iova - r.iova) / page_size.max(1));
        let rounded = u64::from(wrapped.div_ceil(align).saturating_mul(align));
        let page_count = rounded.min(room.max(u64::from(wrapped))) as u32;
        let region = PdsRegion {
            start: r.iova,
            page_count,
            size: if limits.driver == DriverKind::Pds66 {
                r.length
            } else {
                u64::from(page_count) * page_size
            },
        };
        if region.bmp_bytes() == 0 {
            return Err(StartRefusal::RegionBitmap { index, page_count });
        }
        if limits.driver == DriverKind::Pds {
            offset_bytes += region.bmp_bytes();
            if !offset_bytes.is_multiple_of(8) {
                return Err(StartRefusal::DeviceBitmapOffset {
                    index,
                    offset: offset_bytes,
                });
            }
        }
        out.push(region);
    }
    Ok(out)
}

/// What a pds device logs for each region: `page_count` pages from its start, cut at the
/// next region's start (a rounded-up region may reach into the next; a page is logged
/// once).
pub fn pds_logged(regions: &[PdsRegion], page_size: u64) -> Vec<IovaRange> {
    regions
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut end = g.start as u128 + u128::from(g.page_count) * page_size as u128;
            end = end.min(u64::MAX as u128);
            if let Some(next) = regions.get(i + 1) {
                end = end.min(next.start as u128);
            }
            IovaRange::new(g.start, (end - g.start as u128) as u64)
        })
        .collect()
}

/// What a device tracks once it accepted a START.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Accepted {
    /// The page size the driver chose (written back to the caller).
    pub page_size: u64,
    /// The ranges the device really tracks, after the driver's merge, ascending.
    pub ranges: Vec<IovaRange>,
    /// Whether the driver had to merge (the device tracks more than asked).
    pub merged: bool,
}

impl Accepted {
    /// Bytes the device tracks.
    pub fn tracked_bytes(&self) -> u128 {
        self.ranges.iter().map(|r| r.length as u128).sum()
    }
}

/// The kernel's START path for a device with these limits, in the kernel's order: the vfio
/// core's checks (`vfio_ioctl_device_feature_logging_start`; the first offending range
/// decides), then the driver's `log_start` (page-size negotiation, the smallest-gap merge
/// to its own maximum, mlx5's address-space check).
///
/// This is the one rule engine: the planner predicts with it and the emulated device
/// enforces it.
pub fn check_start(
    limits: &DeviceLimits,
    page_size: u64,
    ranges: &[IovaRange],
) -> Result<Accepted, StartRefusal> {
    if ranges.is_empty() {
        return Err(StartRefusal::NoRanges);
    }
    if ranges.len() > limits.core_max_ranges as usize {
        return Err(StartRefusal::TooManyRanges {
            count: ranges.len(),
            max: limits.core_max_ranges as usize,
        });
    }
    // IS_ALIGNED with a mask: a zero or non-power-of-two page size gives the kernel's odd results.
    let mask = page_size.wrapping_sub(1);
    // Inclusive [start, last] as in the kernel's interval tree; a zero length wraps, as there.
    let mut nodes: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (index, r) in ranges.iter().enumerate() {
        let range = *r;
        if r.iova & mask != 0 || r.length & mask != 0 {
            return Err(StartRefusal::Misaligned {
                index,
                range,
                page_size,
            });
        }
        if !r.fits_u64() {
            return Err(StartRefusal::Overflow { index, range });
        }
        let (start, last) = (r.iova, r.iova.wrapping_add(r.length).wrapping_sub(1));
        if let Some(other) = nodes.iter().position(|&(s, l)| s <= last && start <= l) {
            return Err(StartRefusal::Overlap {
                index,
                range,
                other,
            });
        }
        nodes.push((start, last));
    }
    let chosen = limits.negotiate_page_size(page_size);
    // pds asks the device first: no regions at all is EOPNOTSUPP, whatever the ranges.
    if limits.driver.is_pds() && limits.max_ranges == 0 {
        return Err(StartRefusal::NoRegions);
    }
    let mut sorted: Vec<IovaRange> = ranges.to_vec();
    sorted.sort_unstable();
    let target = limits.tracked_max_ranges() as usize;
    let merged = sorted.len() > target && limits.driver != DriverKind::Generic;
    let mut tracked = if merged {
        combine(&sorted, target)
    } else {
        sorted
    };
    // pds tracks what its regions' page counts say, which may differ from the ranges.
    if limits.driver.is_pds() && chosen.is_power_of_two() {
        tracked = pds_logged(&pds_regions(limits, chosen, &tracked)?, chosen);
    }
    if let Some((min, max)) = limits.addr_space_log2 {
        let total: u128 = tracked.iter().map(|r| r.length as u128).sum();
        let log2 = total.next_power_of_two().trailing_zeros();
        if log2 < min as u32 || log2 > max as u32 {
            return Err(StartRefusal::AddressSpace {
                total,
                log2,
                min,
                max,
            });
        }
    }
    Ok(Accepted {
        page_size: chosen,
        ranges: tracked,
        merged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlx5_page_size() {
        let l = DeviceLimits::mlx5();
        assert_eq!(l.negotiate_page_size(4096), 4096);
        assert_eq!(l.negotiate_page_size(12288), 8192);
        assert_eq!(l.negotiate_page_size(512), 4096);
        assert_eq!(l.negotiate_page_size(1 << 40), 1 << 30);
        assert_eq!(DeviceLimits::pds().negotiate_page_size(12288), 12288);
        assert_eq!(kernel_max_ranges(65536), 4096);
    }

    fn r(a: u64, b: u64) -> IovaRange {
        IovaRange::new(a, b)
    }

    #[test]
    fn core_rules_in_kernel_order() {
        let g = DeviceLimits::generic();
        let e = |ps, v: &[IovaRange]| check_start(&g, ps, v).unwrap_err().errno_name();
        assert_eq!(e(4096, &[]), "EINVAL");
        assert_eq!(e(4096, &vec![r(0, 4096); 257]), "E2BIG");
        assert_eq!(e(4096, &[r(0, 4096), r(4097, 4096)]), "EINVAL");
        assert_eq!(e(4096, &[r(u64::MAX - 4095, 4096)]), "EOVERFLOW");
        assert_eq!(e(4096, &[r(0, 8192), r(4096, 4096)]), "EINVAL");
        // first offending range decides: misaligned #0 before overflow #1
        assert!(matches!(
            check_start(&g, 4096, &[r(1, 4096), r(u64::MAX - 4095, 4096)]),
            Err(StartRefusal::Misaligned { index: 0, .. })
        ));
        // zero length at iova 0 wraps to the whole space and overlaps anything after it
        assert!(matches!(
            check_start(&g, 4096, &[r(0, 0), r(1 << 20, 4096)]),
            Err(StartRefusal::Overlap {
                index: 1,
                other: 0,
                ..
            })
        ));
        // zero page size: mask of all ones
        assert_eq!(e(0, &[r(4096, 4096)]), "EINVAL");
        // adjacent ranges are accepted as two
        let ok = check_start(&g, 4096, &[r(4096, 4096), r(0, 4096)]).unwrap();
        assert_eq!(ok.ranges, vec![r(0, 4096), r(4096, 4096)]);
        assert!(!ok.merged);
    }

    #[test]
    fn drivers() {
        let m = DeviceLimits::mlx5();
        let v: Vec<_> = (0..6).map(|i| r(i << 30, 4096)).collect();
        let ok = check_start(&m, 4096, &v).unwrap();
        assert_eq!(ok.ranges.len(), 4);
        assert!(ok.merged);
        let big = [r(0, 1 << 42), r(1 << 43, 4096)];
        let err = check_start(&m, 4096, &big).unwrap_err();
        assert!(
            matches!(err, StartRefusal::AddressSpace { log2: 43, .. }),
            "{err}"
        );
        assert_eq!(err.errno_name(), "EOPNOTSUPP");
        assert!(err.to_string().contains("over by 0x1000"), "{err}");
        assert_eq!(
            check_start(&m, 12288, &[r(0, 12288 * 4)])
                .unwrap()
                .page_size,
            8192
        );
        let p = check_start(
            &DeviceLimits::pds(),
            4096,
            &(0..10).map(|i| r(i << 20, 4096)).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(p.ranges.len(), 8);
    }
}
