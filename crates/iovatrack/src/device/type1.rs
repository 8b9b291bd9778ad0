//! Legacy type1 container dirty tracking: `VFIO_IOMMU_DIRTY_PAGES` (kernel 5.8+).
//!
//! With any ordinary passthrough device in the container, every GET_BITMAP reports every
//! mapped page dirty (the IOMMU has no dirty bits here), so pre-copy never converges; this
//! backend exists for mdev containers and as the last resort before "all dirty". It has no
//! NO_CLEAR read, and `page_size` must be the container's smallest IOMMU page.

use super::{check_bitmap, DeviceError, DeviceOp, Errno, IommuDirtyTracker, Rule};
use crate::range::IovaRange;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use vfio_bindings::bindings::vfio::{
    vfio_bitmap, vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
};

/// `VFIO_IOMMU_DIRTY_PAGES` = `_IO(';', 100 + 17)` on the container fd.
pub const VFIO_IOMMU_DIRTY_PAGES: u64 = 0x3B75;
/// `VFIO_IOMMU_MAP_DMA` = `_IO(';', 100 + 13)`.
pub const VFIO_IOMMU_MAP_DMA: u64 = 0x3B71;
/// `VFIO_IOMMU_UNMAP_DMA` = `_IO(';', 100 + 14)`.
pub const VFIO_IOMMU_UNMAP_DMA: u64 = 0x3B72;

mod nr {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO_TYPE as u32, VFIO_BASE + 17);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
}

#[cfg(test)]
pub(crate) fn ioctl_nrs() -> [u64; 3] {
    [
        nr::VFIO_IOMMU_DIRTY_PAGES() as u64,
        nr::VFIO_IOMMU_MAP_DMA() as u64,
        nr::VFIO_IOMMU_UNMAP_DMA() as u64,
    ]
}

/// Header + GET_BITMAP payload in one buffer.
#[repr(C)]
pub(crate) struct DirtyGet {
    pub(crate) hdr: vfio_iommu_type1_dirty_bitmap,
    pub(crate) get: vfio_iommu_type1_dirty_bitmap_get,
}

const _: () = {
    assert!(
        std::mem::offset_of!(DirtyGet, get) == std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>()
    );
    assert!(std::mem::size_of::<DirtyGet>() == 48);
};

/// START or STOP: the bare header.
pub(crate) fn encode_flag(flags: u32) -> vfio_iommu_type1_dirty_bitmap {
    vfio_iommu_type1_dirty_bitmap {
        argsz: std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>() as u32,
        flags,
        ..Default::default()
    }
}

/// GET_BITMAP into `bitmap`: `bitmap.size` is the bytes the range needs.
pub(crate) fn encode_get(range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> DirtyGet {
    let bytes = if page_size == 0 {
        0
    } else {
        super::needed_words(range.length, page_size) * 8
    };
    let mut hdr = encode_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
    hdr.argsz = std::mem::size_of::<DirtyGet>() as u32;
    DirtyGet {
        hdr,
        get: vfio_iommu_type1_dirty_bitmap_get {
            iova: range.iova,
            size: range.length,
            bitmap: vfio_bitmap {
                pgsize: page_size,
                size: bytes,
                data: bitmap.as_mut_ptr(),
            },
        },
    }
}

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
        // SAFETY: `c` owns this fd and keeps it open for the duration of the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) };
        let fd = fd.try_clone_to_owned().map_err(|e| {
            DeviceError::new(
                DeviceOp::Open,
                Errno(e.raw_os_error().unwrap_or(libc::EBADF)),
                Rule::Ioctl { request: 0 },
            )
        })?;
        Ok(Self { fd })
    }

    fn dirty_pages<T>(&self, op: DeviceOp, arg: &mut T) -> Result<(), DeviceError> {
        // SAFETY: `arg` is a complete dirty-pages buffer with argsz = its size; any bitmap
        // pointer in it was checked to cover the range by the caller and outlives the call.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, nr::VFIO_IOMMU_DIRTY_PAGES(), arg)
        };
        if ret < 0 {
            Err(DeviceError::last_ioctl(op, VFIO_IOMMU_DIRTY_PAGES))
        } else {
            Ok(())
        }
    }
}

impl IommuDirtyTracker for Type1Container {
    fn name(&self) -> &str {
        "vfio-type1"
    }

    fn set_tracking(&self, on: bool) -> Result<(), DeviceError> {
        let flag = if on {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START
        } else {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        };
        self.dirty_pages(DeviceOp::SetTracking, &mut encode_flag(flag))
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
        check_bitmap(DeviceOp::ReadDirty, range, page_size, bitmap)?;
        let mut arg = encode_get(range, page_size, bitmap);
        self.dirty_pages(DeviceOp::ReadDirty, &mut arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(
            ioctl_nrs(),
            [
                VFIO_IOMMU_DIRTY_PAGES,
                VFIO_IOMMU_MAP_DMA,
                VFIO_IOMMU_UNMAP_DMA
            ]
        );
    }

    #[test]
    fn payloads() {
        let s = encode_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_START);
        assert_eq!((s.argsz, s.flags), (8, 1));
        assert_eq!(encode_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP).flags, 2);
        let mut bm = vec![0u64; 3];
        let g = encode_get(IovaRange::new(0x10000, 130 * 4096), 4096, &mut bm);
        assert_eq!((g.hdr.argsz, g.hdr.flags), (48, 4));
        assert_eq!((g.get.iova, g.get.size), (0x10000, 130 * 4096));
        assert_eq!((g.get.bitmap.pgsize, g.get.bitmap.size), (4096, 24));
        assert_eq!(g.get.bitmap.data, bm.as_mut_ptr());
        // Field offsets inside the whole buffer, as the kernel reads them.
        let base = &g as *const DirtyGet as usize;
        assert_eq!(&g.get.iova as *const u64 as usize - base, 8);
        assert_eq!(&g.get.bitmap.pgsize as *const u64 as usize - base, 24);
        assert_eq!(&g.get.bitmap.data as *const *mut u64 as usize - base, 40);
    }

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
