//! Legacy type1 container dirty tracking: `VFIO_IOMMU_DIRTY_PAGES` (kernel 5.8+).
//!
//! With any ordinary passthrough device in the container, every GET_BITMAP reports every
//! mapped page dirty (the IOMMU has no dirty bits here), so pre-copy never converges; this
//! backend exists for mdev containers and as the last resort before "all dirty". It has no
//! NO_CLEAR read, and `page_size` must be the container's smallest IOMMU page.

use super::{sys, DeviceError, DeviceOp, Errno, IommuDirtyTracker, Rule};
use crate::range::IovaRange;
use std::fs::File;
use std::os::fd::OwnedFd;

/// `VFIO_IOMMU_DIRTY_PAGES` = `_IO(';', 100 + 17)` on the container fd.
pub const VFIO_IOMMU_DIRTY_PAGES: u64 = 0x3B75;
/// `VFIO_IOMMU_MAP_DMA` = `_IO(';', 100 + 13)`.
pub const VFIO_IOMMU_MAP_DMA: u64 = 0x3B71;
/// `VFIO_IOMMU_UNMAP_DMA` = `_IO(';', 100 + 14)`.
pub const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3B72;

/// Dirty tracking of a legacy type1 (v2) container.
#[derive(Debug)]
pub struct Type1Container {
    fd: OwnedFd,
}

impl Type1Container {
    /// Over an open `/dev/vfio/vfio` container with `VFIO_TYPE1v2_IOMMU` set.
    pub fn new(container: File) -> Self {
        Self {
            fd: container.into(),
        }
    }

    /// Over a vfio-ioctls container (its fd is duplicated).
    pub fn from_container(c: &vfio_ioctls::VfioContainer) -> Result<Self, DeviceError> {
        let fd = sys::dup_container_fd(c)?;
        Ok(Self { fd })
    }
}

impl IommuDirtyTracker for Type1Container {
    fn name(&self) -> &str {
        "vfio-type1"
    }

    fn set_tracking(&self, on: bool) -> Result<(), DeviceError> {
        sys::type1_set_tracking(&self.fd, on)
    }

    fn read_dirty(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), DeviceError> {
        if !clear {
            // GET_BITMAP always re-arms the per-mapping bitmaps; there is no read-only form.
            return Err(DeviceError::new(
                DeviceOp::ReadDirty,
                Errno::EOPNOTSUPP,
                Rule::Unsupported {
                    what: "type1 GET_BITMAP without clearing",
                },
            ));
        }
        // sys refuses a bitmap that does not hold every bit of the range.
        sys::type1_get_bitmap(&self.fd, range, page_size, bitmap)
    }

    fn clears_on_every_read(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors() {
        let t = Type1Container::new(File::open("/dev/null").unwrap());
        let e = t.set_tracking(true).unwrap_err();
        assert_eq!((e.op, e.errno), (DeviceOp::SetTracking, Errno::ENOTTY));
        let e = t
            .read_dirty(IovaRange::new(0, 4096), 4096, &mut [0], true)
            .unwrap_err();
        assert_eq!(
            (e.errno, e.rule),
            (
                Errno::ENOTTY,
                Rule::Ioctl {
                    request: VFIO_IOMMU_DIRTY_PAGES
                }
            )
        );
        let e = t
            .read_dirty(IovaRange::new(0, 4096), 4096, &mut [0], false)
            .unwrap_err();
        assert_eq!(e.errno, Errno::EOPNOTSUPP);
    }
}
