//! iommufd HWPT dirty tracking (kernel 6.7+): the IOMMU records DMA writes in its page
//! tables, for every mapped page, whatever the device.
//!
//! Debian's 6.1 headers have no `linux/iommufd.h`, so the two structures are defined here
//! from include/uapi/linux/iommufd.h (6.7+), with size/offset assertions against that header.

use super::{sys, DeviceError, IommuDirtyTracker};
use crate::range::IovaRange;
use std::fs::File;
use std::os::fd::OwnedFd;

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` = `_IO(';', 0x80 + 0x0B)`.
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = 0x3B8B;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP` = `_IO(';', 0x80 + 0x0C)`.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = 0x3B8C;
/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read without clearing (final read before unmap).
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1;

/// `struct iommu_hwpt_set_dirty_tracking` (include/uapi/linux/iommufd.h, 6.7+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuHwptSetDirtyTracking {
    /// `sizeof(struct iommu_hwpt_set_dirty_tracking)`.
    pub size: u32,
    /// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE` or 0.
    pub flags: u32,
    /// The HWPT.
    pub hwpt_id: u32,
    /// Must be 0.
    pub reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap` (include/uapi/linux/iommufd.h, 6.7+).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuHwptGetDirtyBitmap {
    /// `sizeof(struct iommu_hwpt_get_dirty_bitmap)`.
    pub size: u32,
    /// The HWPT.
    pub hwpt_id: u32,
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` or 0.
    pub flags: u32,
    /// Must be 0 (else EOPNOTSUPP).
    pub reserved: u32,
    /// First IOVA.
    pub iova: u64,
    /// Bytes.
    pub length: u64,
    /// Bit granularity.
    pub page_size: u64,
    /// User pointer to the `u64[]` bitmap.
    pub data: u64,
}

// Layouts from include/uapi/linux/iommufd.h (6.7+), as reported in linux-kernel.md §5.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<IommuHwptSetDirtyTracking>() == 16);
    assert!(offset_of!(IommuHwptSetDirtyTracking, flags) == 4);
    assert!(offset_of!(IommuHwptSetDirtyTracking, hwpt_id) == 8);
    assert!(offset_of!(IommuHwptSetDirtyTracking, reserved) == 12);
    assert!(size_of::<IommuHwptGetDirtyBitmap>() == 48);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, hwpt_id) == 4);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, flags) == 8);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, reserved) == 12);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, iova) == 16);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, length) == 24);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, page_size) == 32);
    assert!(offset_of!(IommuHwptGetDirtyBitmap, data) == 40);
    // _IO(';', 0x80 + k): no size or direction bits.
    assert!(IOMMU_HWPT_SET_DIRTY_TRACKING == ((b';' as u64) << 8) | 0x8B);
    assert!(IOMMU_HWPT_GET_DIRTY_BITMAP == ((b';' as u64) << 8) | 0x8C);
};

/// Dirty tracking of one iommufd HWPT (allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
#[derive(Debug)]
pub struct IommufdHwpt {
    fd: OwnedFd,
    hwpt_id: u32,
    name: String,
}

impl IommufdHwpt {
    /// Over an open `/dev/iommu` fd and a HWPT id.
    pub fn new(iommufd: File, hwpt_id: u32) -> Self {
        Self {
            fd: iommufd.into(),
            hwpt_id,
            name: format!("iommufd-hwpt-{hwpt_id}"),
        }
    }

    /// The HWPT id.
    pub fn hwpt_id(&self) -> u32 {
        self.hwpt_id
    }
}

impl IommuDirtyTracker for IommufdHwpt {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_tracking(&self, on: bool) -> Result<(), DeviceError> {
        sys::hwpt_set_dirty_tracking(&self.fd, self.hwpt_id, on)
    }

    fn read_dirty(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), DeviceError> {
        // sys refuses a bitmap that does not hold every bit of the range.
        sys::hwpt_get_dirty_bitmap(&self.fd, self.hwpt_id, range, page_size, bitmap, clear)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceOp, Errno, Rule};

    #[test]
    fn non_iommufd_fd_is_enotty() {
        let t = IommufdHwpt::new(File::open("/dev/null").unwrap(), 1);
        let e = t.set_tracking(true).unwrap_err();
        assert_eq!((e.op, e.errno), (DeviceOp::SetTracking, Errno::ENOTTY));
        let e = t
            .read_dirty(IovaRange::new(0, 4096), 4096, &mut [0], false)
            .unwrap_err();
        assert_eq!((e.op, e.errno), (DeviceOp::ReadDirty, Errno::ENOTTY));
        assert_eq!(
            e.rule,
            Rule::Ioctl {
                request: IOMMU_HWPT_GET_DIRTY_BITMAP
            }
        );
    }
}
