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
    /// `pds_vfio_pci`: merge to max regions; a REPORT must stay inside one region.
    Pds,
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
        }
    }

    /// An AMD/Pensando pds VF (6.8+ multi-region). Default 8 regions: `max_regions` is a
    /// device-reported u8; 6.6 kernels force 1 (set `max_ranges = 1` to model those).
    pub const fn pds() -> Self {
        Self {
            driver: DriverKind::Pds,
            core_max_ranges: kernel_max_ranges(4096),
            max_ranges: 8,
            page_size: PageSizePolicy::AsIs,
            addr_space_log2: None,
        }
    }

    /// The page size the driver would choose for a requested one (mlx5 writes it back).
    pub fn negotiate_page_size(&self, requested: u64) -> u64 {
        match self.page_size {
            PageSizePolicy::AsIs => requested,
            PageSizePolicy::FloorClamp { min_log2, max_log2 } => {
                let log = if requested == 0 {
                    0
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
    /// [`DeviceLimits::pds`].
    Pds,
}

impl DeviceProfile {
    /// The default limits of this profile.
    pub const fn limits(self) -> DeviceLimits {
        match self {
            DeviceProfile::Generic => DeviceLimits::generic(),
            DeviceProfile::Mlx5 => DeviceLimits::mlx5(),
            DeviceProfile::Pds => DeviceLimits::pds(),
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
}

impl StartRefusal {
    /// The errno the kernel returns.
    pub fn errno(&self) -> i32 {
        match self {
            StartRefusal::TooManyRanges { .. } => libc::E2BIG,
            StartRefusal::Overflow { .. } => libc::EOVERFLOW,
            StartRefusal::AddressSpace { .. } => libc::EOPNOTSUPP,
            _ => libc::EINVAL,
        }
    }

    /// The errno's name.
    pub fn errno_name(&self) -> &'static str {
        match self.errno() {
            libc::E2BIG => "E2BIG",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            _ => "EINVAL",
        }
    }
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
    let mut sorted: Vec<IovaRange> = ranges.to_vec();
    sorted.sort_unstable();
    let merged = sorted.len() > limits.max_ranges as usize && limits.driver != DriverKind::Generic;
    let tracked = if merged {
        combine(&sorted, limits.max_ranges as usize)
    } else {
        sorted
    };
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
