//! What a device accepts at `DMA_LOGGING_START`: the kernel core's rules plus a driver's.
//!
//! Real limits are firmware-reported (mlx5's `pg_track_*` capabilities, pds' `max_regions`),
//! so every number here is a parameter; the profiles only choose defaults.

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
            page_size: PageSizePolicy::FloorClamp { min_log2: 12, max_log2: 30 },
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
                let log = if requested == 0 { 0 } else { 63 - requested.leading_zeros() as u8 };
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
}
