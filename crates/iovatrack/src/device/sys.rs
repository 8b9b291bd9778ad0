//! Every device ioctl of the crate, and every `unsafe` it needs, behind a safe API.
//!
//! The kernel reads and writes through user pointers carried inside the ioctl payloads
//! (REPORT and GET_BITMAP bitmaps, the START range array). Those payloads are built only
//! here, only from borrowed Rust slices, and each carries a `PhantomData` of that borrow,
//! so the pointer cannot outlive the memory it names. The coverage checks the kernel relies
//! on (the bitmap holds every bit of the range; `argsz`/`size` is the buffer's size) are
//! made here too, when the payload is built, so a payload the [`IoctlArg`] functions accept
//! is sound to pass to the kernel by construction. The backends (`vfio`, `type1`,
//! `iommufd`) hold the fds and the policy, and never see a raw pointer.

use super::iommufd::{
    IommuHwptGetDirtyBitmap, IommuHwptSetDirtyTracking, IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
};
use super::{check_bitmap, DeviceError, DeviceOp};
use crate::range::IovaRange;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};

/// The ioctl numbers as vmm-sys-util computes them (checked against the public constants
/// in tests).
mod nr {
    const IOMMUFD_TYPE: u32 = b';' as u32;
    vmm_sys_util::ioctl_io_nr!(IOMMU_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE, 0x8B);
    vmm_sys_util::ioctl_io_nr!(IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMUFD_TYPE, 0x8C);
    #[cfg(feature = "vfio")]
    pub(super) use vfio::*;
    #[cfg(feature = "vfio")]
    mod vfio {
        use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
        vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);
        vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO_TYPE as u32, VFIO_BASE + 17);
        vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
        vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);
    }
}

/// A payload this module built: fully initialised, `repr(C)` as the uAPI lays it out, its
/// size field equal to its size, and every user pointer in it borrowed for the payload's
/// lifetime and covering what the kernel may touch. Private, and implemented only below,
/// so nothing outside this module can hand [`ioctl`] an arbitrary buffer.
trait IoctlArg {}

/// Issue `request` (`number` as vmm-sys-util encodes it) on `fd` with `arg`; a failure is
/// the errno of the call, reported as `op`.
fn ioctl<A: IoctlArg>(
    fd: BorrowedFd<'_>,
    number: std::os::raw::c_ulong,
    request: u64,
    op: DeviceOp,
    arg: &mut A,
) -> Result<(), DeviceError> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow. `arg` is an
    // `IoctlArg`, so (see the trait) it is a complete, correctly sized uAPI structure built
    // in this module, and every user pointer inside it points into a slice that is borrowed
    // for at least as long as `arg` and large enough for what the kernel reads or writes
    // (the range array's length is `num_ranges`; a bitmap holds every bit of its range).
    // The kernel may write back into `arg` itself, which is exclusively borrowed here.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, number, arg) };
    if ret < 0 {
        Err(DeviceError::last_ioctl(op, request))
    } else {
        Ok(())
    }
}

// ---- iommufd HWPT dirty tracking ------------------------------------------------------

impl IoctlArg for IommuHwptSetDirtyTracking {}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP` into a borrowed bitmap.
#[repr(C)]
pub(crate) struct HwptGetDirtyArg<'a> {
    // Read by the kernel through the pointer `ioctl` passes (and by the layout tests).
    #[allow(dead_code)]
    raw: IommuHwptGetDirtyBitmap,
    _bitmap: PhantomData<&'a mut [u64]>,
}

impl IoctlArg for HwptGetDirtyArg<'_> {}

// The wrapper is the uAPI struct at offset 0 and nothing more: the kernel sees exactly it.
const _: () = assert!(
    std::mem::size_of::<HwptGetDirtyArg<'static>>()
        == std::mem::size_of::<IommuHwptGetDirtyBitmap>()
);

/// Encode SET_DIRTY_TRACKING (no pointers: plain data).
pub(crate) fn encode_hwpt_set(hwpt_id: u32, on: bool) -> IommuHwptSetDirtyTracking {
    IommuHwptSetDirtyTracking {
        size: std::mem::size_of::<IommuHwptSetDirtyTracking>() as u32,
        flags: if on {
            IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id,
        reserved: 0,
    }
}

impl<'a> HwptGetDirtyArg<'a> {
    /// GET_DIRTY_BITMAP of `range` into `bitmap`, refused unless `bitmap` holds every bit.
    pub(crate) fn new(
        hwpt_id: u32,
        range: IovaRange,
        page_size: u64,
        bitmap: &'a mut [u64],
        clear: bool,
    ) -> Result<Self, DeviceError> {
        check_bitmap(DeviceOp::ReadDirty, range, page_size, bitmap)?;
        Ok(Self::encode(hwpt_id, range, page_size, bitmap, clear))
    }

    /// The encoding alone, without the coverage check: for the layout tests only.
    fn encode(
        hwpt_id: u32,
        range: IovaRange,
        page_size: u64,
        bitmap: &'a mut [u64],
        clear: bool,
    ) -> Self {
        Self {
            raw: IommuHwptGetDirtyBitmap {
                size: std::mem::size_of::<IommuHwptGetDirtyBitmap>() as u32,
                hwpt_id,
                flags: if clear {
                    0
                } else {
                    IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
                },
                reserved: 0,
                iova: range.iova,
                length: range.length,
                page_size,
                data: bitmap.as_mut_ptr() as u64,
            },
            _bitmap: PhantomData,
        }
    }
}

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` on an iommufd.
pub(crate) fn hwpt_set_dirty_tracking(
    fd: &impl AsFd,
    hwpt_id: u32,
    on: bool,
) -> Result<(), DeviceError> {
    ioctl(
        fd.as_fd(),
        nr::IOMMU_HWPT_SET_DIRTY_TRACKING(),
        IOMMU_HWPT_SET_DIRTY_TRACKING,
        DeviceOp::SetTracking,
        &mut encode_hwpt_set(hwpt_id, on),
    )
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP` of `range` into `bitmap` (checked to cover it).
pub(crate) fn hwpt_get_dirty_bitmap(
    fd: &impl AsFd,
    hwpt_id: u32,
    range: IovaRange,
    page_size: u64,
    bitmap: &mut [u64],
    clear: bool,
) -> Result<(), DeviceError> {
    let mut arg = HwptGetDirtyArg::new(hwpt_id, range, page_size, bitmap, clear)?;
    ioctl(
        fd.as_fd(),
        nr::IOMMU_HWPT_GET_DIRTY_BITMAP(),
        IOMMU_HWPT_GET_DIRTY_BITMAP,
        DeviceOp::ReadDirty,
        &mut arg,
    )
}

#[cfg(feature = "vfio")]
pub(crate) use vfio::*;

/// The VFIO side: device feature (DMA logging), type1 container dirty pages, fd duplication.
#[cfg(feature = "vfio")]
mod vfio {
    use super::*;
    use crate::device::type1::VFIO_IOMMU_DIRTY_PAGES;
    use crate::device::vfio::VFIO_DEVICE_FEATURE;
    use crate::device::{Errno, Rule};
    use crate::plan::limits::StartRefusal;
    use std::os::fd::{AsRawFd, OwnedFd};
    use vfio_bindings::bindings::vfio::{
        vfio_bitmap, vfio_device_feature, vfio_device_feature_dma_logging_control,
        vfio_device_feature_dma_logging_range, vfio_device_feature_dma_logging_report,
        vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get,
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_PROBE,
        VFIO_DEVICE_FEATURE_SET, VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    };

    #[cfg(test)]
    pub(crate) fn device_feature_nr() -> u64 {
        nr::VFIO_DEVICE_FEATURE() as u64
    }

    #[cfg(test)]
    pub(crate) fn type1_ioctl_nrs() -> [u64; 3] {
        [
            nr::VFIO_IOMMU_DIRTY_PAGES() as u64,
            nr::VFIO_IOMMU_MAP_DMA() as u64,
            nr::VFIO_IOMMU_UNMAP_DMA() as u64,
        ]
    }

    // ---- fd duplication ----------------------------------------------------------------

    /// A vfio-ioctls object that owns the fd `as_raw_fd` returns and keeps it open while
    /// borrowed. vfio-ioctls 0.10 implements `AsRawFd` but not `AsFd`, so the ownership is
    /// asserted here, per type, from its source (`VfioDevice::device`,
    /// `VfioContainer::container` are `File`s it owns). Private: implemented only below.
    trait OwnsItsFd: AsRawFd {}
    impl OwnsItsFd for vfio_ioctls::VfioDevice {}
    impl OwnsItsFd for vfio_ioctls::VfioContainer {}

    fn dup_owned<T: OwnsItsFd>(owner: &T) -> Result<OwnedFd, DeviceError> {
        // SAFETY: `T: OwnsItsFd`, so `owner` owns this fd and keeps it open for at least the
        // borrow of `owner`, which outlives the `BorrowedFd` (used only on the next line).
        let fd = unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) };
        fd.try_clone_to_owned().map_err(|e| {
            DeviceError::new(
                DeviceOp::Open,
                Errno(e.raw_os_error().unwrap_or(libc::EBADF)),
                Rule::Ioctl { request: 0 },
            )
        })
    }

    /// A duplicate of a vfio-ioctls device's fd (the device keeps its own).
    pub(crate) fn dup_device_fd(dev: &vfio_ioctls::VfioDevice) -> Result<OwnedFd, DeviceError> {
        dup_owned(dev)
    }

    /// A duplicate of a vfio-ioctls container's fd (the container keeps its own).
    pub(crate) fn dup_container_fd(c: &vfio_ioctls::VfioContainer) -> Result<OwnedFd, DeviceError> {
        dup_owned(c)
    }

    // ---- VFIO_DEVICE_FEATURE: DMA logging ----------------------------------------------

    /// A `vfio_device_feature` header followed by its payload, as one buffer.
    #[repr(C)]
    #[derive(Default)]
    pub(crate) struct FeatureBuf<T> {
        pub(crate) hdr: vfio_device_feature,
        pub(crate) payload: T,
    }

    const HDR: usize = std::mem::size_of::<vfio_device_feature>();
    // The payload must start right at `data[]` (offset 8) for every payload we send.
    const _: () = {
        assert!(HDR == 8);
        assert!(
            std::mem::offset_of!(FeatureBuf<vfio_device_feature_dma_logging_control>, payload)
                == HDR
        );
        assert!(
            std::mem::offset_of!(FeatureBuf<vfio_device_feature_dma_logging_report>, payload)
                == HDR
        );
        assert!(std::mem::size_of::<FeatureBuf<vfio_device_feature_dma_logging_control>>() == 32);
        assert!(std::mem::size_of::<FeatureBuf<vfio_device_feature_dma_logging_report>>() == 40);
        assert!(std::mem::size_of::<vfio_device_feature_dma_logging_range>() == 16);
    };

    impl<T> FeatureBuf<T> {
        fn new(flags: u32, payload: T) -> Self {
            Self {
                hdr: header(std::mem::size_of::<Self>() as u32, flags),
                payload,
            }
        }
    }

    fn header(argsz: u32, flags: u32) -> vfio_device_feature {
        vfio_device_feature {
            argsz,
            flags,
            ..Default::default()
        }
    }

    // A bare header: no pointers, argsz = its size.
    impl IoctlArg for vfio_device_feature {}

    /// The PROBE request for DMA logging: `PROBE | SET | START`, argsz 8.
    pub(crate) fn encode_probe() -> vfio_device_feature {
        header(
            HDR as u32,
            VFIO_DEVICE_FEATURE_PROBE
                | VFIO_DEVICE_FEATURE_SET
                | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        )
    }

    /// The STOP request: `SET | STOP`, argsz 8.
    pub(crate) fn encode_stop() -> vfio_device_feature {
        header(
            HDR as u32,
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        )
    }

    /// The START request; its control block points at `array`, borrowed for `'a`.
    #[repr(C)]
    pub(crate) struct StartArg<'a> {
        buf: FeatureBuf<vfio_device_feature_dma_logging_control>,
        _array: PhantomData<&'a [vfio_device_feature_dma_logging_range]>,
    }

    impl IoctlArg for StartArg<'_> {}

    // Each wrapper is its uAPI buffer at offset 0 and nothing more (`repr(C)`, the other
    // field a ZST): the kernel sees exactly the buffer.
    const _: () = {
        use std::mem::size_of;
        assert!(
            size_of::<StartArg<'static>>()
                == size_of::<FeatureBuf<vfio_device_feature_dma_logging_control>>()
        );
        assert!(
            size_of::<ReportArg<'static>>()
                == size_of::<FeatureBuf<vfio_device_feature_dma_logging_report>>()
        );
        assert!(size_of::<DirtyGetArg<'static>>() == size_of::<DirtyGet>());
    };

    /// The START request for `ranges`: `array` receives them (reused by a caller that
    /// starts often) and `num_ranges` is its length, so the kernel reads exactly `array`.
    pub(crate) fn encode_start<'a>(
        page_size: u64,
        ranges: &[IovaRange],
        array: &'a mut Vec<vfio_device_feature_dma_logging_range>,
    ) -> Result<StartArg<'a>, DeviceError> {
        let num_ranges = u32::try_from(ranges.len()).map_err(|_| {
            DeviceError::start(StartRefusal::TooManyRanges {
                count: ranges.len(),
                max: u32::MAX as usize,
            })
        })?;
        array.clear();
        array.extend(
            ranges
                .iter()
                .map(|r| vfio_device_feature_dma_logging_range {
                    iova: r.iova,
                    length: r.length,
                }),
        );
        let control = vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges,
            __reserved: 0,
            ranges: array.as_ptr() as u64,
        };
        Ok(StartArg {
            buf: FeatureBuf::new(
                VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                control,
            ),
            _array: PhantomData,
        })
    }

    /// The REPORT request writing into a bitmap borrowed for `'a`.
    #[repr(C)]
    pub(crate) struct ReportArg<'a> {
        // Read by the kernel through the pointer `ioctl` passes (and by the layout tests).
        #[allow(dead_code)]
        buf: FeatureBuf<vfio_device_feature_dma_logging_report>,
        _bitmap: PhantomData<&'a mut [u64]>,
    }

    impl IoctlArg for ReportArg<'_> {}

    impl<'a> ReportArg<'a> {
        /// REPORT of `range` into `bitmap`, refused unless `bitmap` holds every bit the
        /// kernel writes (ceil(length / page_size)).
        pub(crate) fn new(
            range: IovaRange,
            page_size: u64,
            bitmap: &'a mut [u64],
        ) -> Result<Self, DeviceError> {
            check_bitmap(DeviceOp::Report, range, page_size, bitmap)?;
            Ok(encode_report(range, page_size, bitmap))
        }
    }

    /// The REPORT encoding alone, without the coverage check: for the layout tests only.
    fn encode_report(range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> ReportArg<'_> {
        let report = vfio_device_feature_dma_logging_report {
            iova: range.iova,
            length: range.length,
            page_size,
            bitmap: bitmap.as_mut_ptr() as u64,
        };
        ReportArg {
            buf: FeatureBuf::new(
                VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
                report,
            ),
            _bitmap: PhantomData,
        }
    }

    fn feature<A: IoctlArg>(
        fd: BorrowedFd<'_>,
        op: DeviceOp,
        arg: &mut A,
    ) -> Result<(), DeviceError> {
        ioctl(fd, nr::VFIO_DEVICE_FEATURE(), VFIO_DEVICE_FEATURE, op, arg)
    }

    /// `VFIO_DEVICE_FEATURE` PROBE of DMA logging.
    pub(crate) fn dma_logging_probe(fd: &impl AsFd) -> Result<(), DeviceError> {
        feature(fd.as_fd(), DeviceOp::Probe, &mut encode_probe())
    }

    /// `VFIO_DEVICE_FEATURE` DMA_LOGGING_START; returns the page size the driver wrote back.
    pub(crate) fn dma_logging_start(
        fd: &impl AsFd,
        page_size: u64,
        ranges: &[IovaRange],
    ) -> Result<u64, DeviceError> {
        let mut array = Vec::new();
        let mut arg = encode_start(page_size, ranges, &mut array)?;
        feature(fd.as_fd(), DeviceOp::Start, &mut arg)?;
        Ok(arg.buf.payload.page_size)
    }

    /// `VFIO_DEVICE_FEATURE` DMA_LOGGING_REPORT of `range` into `bitmap` (checked to cover it).
    pub(crate) fn dma_logging_report(
        fd: &impl AsFd,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let mut arg = ReportArg::new(range, page_size, bitmap)?;
        feature(fd.as_fd(), DeviceOp::Report, &mut arg)
    }

    /// `VFIO_DEVICE_FEATURE` DMA_LOGGING_STOP.
    pub(crate) fn dma_logging_stop(fd: &impl AsFd) -> Result<(), DeviceError> {
        feature(fd.as_fd(), DeviceOp::Stop, &mut encode_stop())
    }

    // ---- VFIO_IOMMU_DIRTY_PAGES: type1 container ---------------------------------------

    // START or STOP: the bare header, no pointers.
    impl IoctlArg for vfio_iommu_type1_dirty_bitmap {}

    /// Header + GET_BITMAP payload in one buffer.
    #[repr(C)]
    pub(crate) struct DirtyGet {
        pub(crate) hdr: vfio_iommu_type1_dirty_bitmap,
        pub(crate) get: vfio_iommu_type1_dirty_bitmap_get,
    }

    const _: () = {
        assert!(
            std::mem::offset_of!(DirtyGet, get)
                == std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>()
        );
        assert!(std::mem::size_of::<DirtyGet>() == 48);
    };

    /// GET_BITMAP into a bitmap borrowed for `'a`.
    #[repr(C)]
    pub(crate) struct DirtyGetArg<'a> {
        // Read by the kernel through the pointer `ioctl` passes (and by the layout tests).
        #[allow(dead_code)]
        raw: DirtyGet,
        _bitmap: PhantomData<&'a mut [u64]>,
    }

    impl IoctlArg for DirtyGetArg<'_> {}

    /// START or STOP: the bare header.
    pub(crate) fn encode_type1_flag(flags: u32) -> vfio_iommu_type1_dirty_bitmap {
        vfio_iommu_type1_dirty_bitmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>() as u32,
            flags,
            ..Default::default()
        }
    }

    impl<'a> DirtyGetArg<'a> {
        /// GET_BITMAP of `range` into `bitmap`, refused unless `bitmap` holds every bit.
        pub(crate) fn new(
            range: IovaRange,
            page_size: u64,
            bitmap: &'a mut [u64],
        ) -> Result<Self, DeviceError> {
            check_bitmap(DeviceOp::ReadDirty, range, page_size, bitmap)?;
            Ok(encode_type1_get(range, page_size, bitmap))
        }
    }

    /// The GET_BITMAP encoding alone (`bitmap.size` is the bytes the range needs), without
    /// the coverage check: for the layout tests only.
    fn encode_type1_get(range: IovaRange, page_size: u64, bitmap: &mut [u64]) -> DirtyGetArg<'_> {
        let bytes = if page_size == 0 {
            0
        } else {
            crate::device::needed_words(range.length, page_size) * 8
        };
        let mut hdr = encode_type1_flag(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
        hdr.argsz = std::mem::size_of::<DirtyGet>() as u32;
        DirtyGetArg {
            raw: DirtyGet {
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
            },
            _bitmap: PhantomData,
        }
    }

    fn dirty_pages<A: IoctlArg>(
        fd: BorrowedFd<'_>,
        op: DeviceOp,
        arg: &mut A,
    ) -> Result<(), DeviceError> {
        ioctl(
            fd,
            nr::VFIO_IOMMU_DIRTY_PAGES(),
            VFIO_IOMMU_DIRTY_PAGES,
            op,
            arg,
        )
    }

    /// `VFIO_IOMMU_DIRTY_PAGES` START (`on`) or STOP.
    pub(crate) fn type1_set_tracking(fd: &impl AsFd, on: bool) -> Result<(), DeviceError> {
        let flag = if on {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_START
        } else {
            VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
        };
        dirty_pages(
            fd.as_fd(),
            DeviceOp::SetTracking,
            &mut encode_type1_flag(flag),
        )
    }

    /// `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP of `range` into `bitmap` (checked to cover it).
    pub(crate) fn type1_get_bitmap(
        fd: &impl AsFd,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let mut arg = DirtyGetArg::new(range, page_size, bitmap)?;
        dirty_pages(fd.as_fd(), DeviceOp::ReadDirty, &mut arg)
    }

    #[cfg(test)]
    mod tests;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::iommufd::IommuHwptSetDirtyTracking;

    #[test]
    fn iommufd_ioctl_numbers() {
        assert_eq!(
            nr::IOMMU_HWPT_SET_DIRTY_TRACKING() as u64,
            IOMMU_HWPT_SET_DIRTY_TRACKING
        );
        assert_eq!(
            nr::IOMMU_HWPT_GET_DIRTY_BITMAP() as u64,
            IOMMU_HWPT_GET_DIRTY_BITMAP
        );
    }

    #[test]
    fn iommufd_payloads() {
        assert_eq!(
            encode_hwpt_set(7, true),
            IommuHwptSetDirtyTracking {
                size: 16,
                flags: 1,
                hwpt_id: 7,
                reserved: 0
            }
        );
        assert_eq!(encode_hwpt_set(7, false).flags, 0);
        let mut bm = vec![0u64; 2];
        let ptr = bm.as_ptr() as u64;
        let g =
            HwptGetDirtyArg::encode(9, IovaRange::new(0x1000, 0x80000), 0x1000, &mut bm, false).raw;
        assert_eq!((g.size, g.hwpt_id, g.flags, g.reserved), (48, 9, 1, 0));
        assert_eq!(
            (g.iova, g.length, g.page_size, g.data),
            (0x1000, 0x80000, 0x1000, ptr)
        );
        assert_eq!(
            HwptGetDirtyArg::encode(9, IovaRange::new(0, 4096), 4096, &mut bm, true)
                .raw
                .flags,
            0
        );
    }

    #[test]
    fn iommufd_short_bitmap_is_refused_before_the_kernel() {
        let mut bm = [0u64; 1];
        let Err(e) = HwptGetDirtyArg::new(1, IovaRange::new(0, 65 * 4096), 4096, &mut bm, true)
        else {
            panic!("a 1-word bitmap cannot hold 65 bits");
        };
        assert_eq!(
            e.rule,
            crate::device::Rule::BitmapTooSmall {
                words: 1,
                needed: 2
            }
        );
    }
}
