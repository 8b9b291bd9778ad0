//! DMA logging on a real VFIO device fd (`VFIO_DEVICE_FEATURE`, kernel 6.1+).
//!
//! The payloads are the `vfio-bindings` structs behind a `vfio_device_feature` header; the
//! ioctl number is `_IO(';', 100 + 17)`. vfio-ioctls has `VfioDevice::report_dma_logging`,
//! but it allocates a fresh `Vec<u64>` on every call; a pre-copy loop reports many times per
//! second, so REPORT here is a raw ioctl writing straight into the caller's reused bitmap,
//! with the feature buffer on the stack.

use super::{check_bitmap, DeviceError, DeviceOp, DmaLogger, Errno, Rule};
use crate::plan::limits::StartRefusal;
use crate::range::IovaRange;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_dma_logging_control,
    vfio_device_feature_dma_logging_range, vfio_device_feature_dma_logging_report,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};

/// `VFIO_DEVICE_FEATURE` = `_IO(';', 100 + 17)` (also `VFIO_IOMMU_DIRTY_PAGES` on a container).
pub const VFIO_DEVICE_FEATURE: u64 = 0x3B75;

/// The ioctl numbers as vmm-sys-util computes them (checked against the constants in tests).
mod nr {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);
}

#[cfg(test)]
pub(crate) fn device_feature_nr() -> u64 {
    nr::VFIO_DEVICE_FEATURE() as u64
}

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
        std::mem::offset_of!(FeatureBuf<vfio_device_feature_dma_logging_control>, payload) == HDR
    );
    assert!(
        std::mem::offset_of!(FeatureBuf<vfio_device_feature_dma_logging_report>, payload) == HDR
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

/// The PROBE request for DMA logging: `PROBE | SET | START`, argsz 8.
pub(crate) fn encode_probe() -> vfio_device_feature {
    header(
        HDR as u32,
        VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    )
}

/// The STOP request: `SET | STOP`, argsz 8.
pub(crate) fn encode_stop() -> vfio_device_feature {
    header(
        HDR as u32,
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    )
}

/// The START request; `array` receives the ranges and must outlive the ioctl (the control
/// block holds its address).
pub(crate) fn encode_start(
    page_size: u64,
    ranges: &[IovaRange],
    array: &mut Vec<vfio_device_feature_dma_logging_range>,
) -> FeatureBuf<vfio_device_feature_dma_logging_control> {
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
        num_ranges: ranges.len() as u32,
        __reserved: 0,
        ranges: array.as_ptr() as u64,
    };
    FeatureBuf::new(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        control,
    )
}

/// The REPORT request writing into `bitmap`.
pub(crate) fn encode_report(
    range: IovaRange,
    page_size: u64,
    bitmap: &mut [u64],
) -> FeatureBuf<vfio_device_feature_dma_logging_report> {
    let report = vfio_device_feature_dma_logging_report {
        iova: range.iova,
        length: range.length,
        page_size,
        bitmap: bitmap.as_mut_ptr() as u64,
    };
    FeatureBuf::new(
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        report,
    )
}

/// DMA logging through a VFIO device fd.
#[derive(Debug)]
pub struct VfioDmaLogger {
    fd: OwnedFd,
    name: String,
}

impl VfioDmaLogger {
    /// From an open VFIO device fd (group `GET_DEVICE_FD` or a bound cdev).
    pub fn new(device: File, name: impl Into<String>) -> Self {
        Self {
            fd: device.into(),
            name: name.into(),
        }
    }

    /// From a vfio-ioctls device: duplicates its fd (the device keeps its own). This
    /// bypasses `VfioDevice`'s own started/not-started bookkeeping; the kernel driver
    /// enforces the same rules (double START, REPORT before START: EINVAL).
    pub fn from_vfio_device(
        dev: &vfio_ioctls::VfioDevice,
        name: impl Into<String>,
    ) -> Result<Self, DeviceError> {
        // SAFETY: `dev` owns this fd and keeps it open for the duration of the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
        let fd = fd.try_clone_to_owned().map_err(|e| {
            DeviceError::new(
                DeviceOp::Open,
                Errno(e.raw_os_error().unwrap_or(libc::EBADF)),
                Rule::Ioctl { request: 0 },
            )
        })?;
        Ok(Self {
            fd,
            name: name.into(),
        })
    }

    fn feature<T>(&self, op: DeviceOp, buf: &mut T) -> Result<(), DeviceError> {
        // SAFETY: `buf` is a live, correctly laid-out feature buffer (header + payload, argsz
        // set to its size); every user pointer inside it is valid for the ioctl's duration
        // (checked by the callers), and the fd is ours.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, nr::VFIO_DEVICE_FEATURE(), buf)
        };
        if ret < 0 {
            Err(DeviceError::last_ioctl(op, VFIO_DEVICE_FEATURE))
        } else {
            Ok(())
        }
    }
}

impl DmaLogger for VfioDmaLogger {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self) -> Result<(), DeviceError> {
        self.feature(DeviceOp::Probe, &mut encode_probe())
    }

    fn start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        if u32::try_from(ranges.len()).is_err() {
            return Err(DeviceError::start(StartRefusal::TooManyRanges {
                count: ranges.len(),
                max: u32::MAX as usize,
            }));
        }
        let mut array = Vec::new();
        let mut buf = encode_start(page_size, ranges, &mut array);
        self.feature(DeviceOp::Start, &mut buf)?;
        // The driver writes its chosen page size back into the control block.
        Ok(buf.payload.page_size)
    }

    fn report(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        // The kernel writes up to ceil(length / page_size) bits through the pointer.
        check_bitmap(DeviceOp::Report, range, page_size, bitmap)?;
        let mut buf = encode_report(range, page_size, bitmap);
        self.feature(DeviceOp::Report, &mut buf)
    }

    fn stop(&self) -> Result<(), DeviceError> {
        self.feature(DeviceOp::Stop, &mut encode_stop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a `repr(C)` value.
    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading `size_of::<T>()` initialised bytes of a plain-data repr(C) value
        // with no padding (asserted by the sizes above).
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn ioctl_number() {
        assert_eq!(device_feature_nr(), VFIO_DEVICE_FEATURE);
    }

    #[test]
    fn probe_and_stop_payloads() {
        let p = bytes(&encode_probe());
        assert_eq!(p.len(), 8);
        assert_eq!(u32_at(&p, 0), 8);
        assert_eq!(u32_at(&p, 4), 0x0004_0000 | 0x0002_0000 | 6);
        let s = bytes(&encode_stop());
        assert_eq!((u32_at(&s, 0), u32_at(&s, 4)), (8, 0x0002_0000 | 7));
    }

    #[test]
    fn start_payload() {
        let ranges = [
            IovaRange::new(0, 0x8000_0000),
            IovaRange::new(0x1_0000_0000, 0x4000_0000),
        ];
        let mut array = Vec::new();
        let buf = encode_start(4096, &ranges, &mut array);
        let b = bytes(&buf);
        assert_eq!(b.len(), 32);
        assert_eq!(u32_at(&b, 0), 32); // argsz = header + control
        assert_eq!(u32_at(&b, 4), 0x0002_0000 | 6);
        assert_eq!(u64_at(&b, 8), 4096); // page_size
        assert_eq!(u32_at(&b, 16), 2); // num_ranges
        assert_eq!(u32_at(&b, 20), 0); // __reserved
        assert_eq!(u64_at(&b, 24), array.as_ptr() as u64);
        let a = bytes(&array[1]);
        assert_eq!((u64_at(&a, 0), u64_at(&a, 8)), (0x1_0000_0000, 0x4000_0000));
    }

    #[test]
    fn report_payload() {
        let mut bitmap = vec![0u64; 4];
        let ptr = bitmap.as_ptr() as u64;
        let buf = encode_report(IovaRange::new(0x10_0000, 0x40_0000), 0x1000, &mut bitmap);
        let b = bytes(&buf);
        assert_eq!(b.len(), 40);
        assert_eq!((u32_at(&b, 0), u32_at(&b, 4)), (40, 0x0001_0000 | 8));
        assert_eq!((u64_at(&b, 8), u64_at(&b, 16)), (0x10_0000, 0x40_0000));
        assert_eq!((u64_at(&b, 24), u64_at(&b, 32)), (0x1000, ptr));
    }

    #[test]
    fn non_vfio_fd_is_enotty() {
        let dev = VfioDmaLogger::new(File::open("/dev/null").unwrap(), "null");
        for e in [
            dev.probe().unwrap_err(),
            dev.start(4096, &[IovaRange::new(0, 4096)]).unwrap_err(),
            dev.report(IovaRange::new(0, 4096), 4096, &mut [0])
                .unwrap_err(),
            dev.stop().unwrap_err(),
        ] {
            assert_eq!(e.errno, Errno::ENOTTY, "{e}");
            assert_eq!(
                e.rule,
                Rule::Ioctl {
                    request: VFIO_DEVICE_FEATURE
                }
            );
        }
        let e = dev.probe().unwrap_err();
        assert_eq!(
            e.to_string(),
            "DMA_LOGGING probe: ENOTTY: ioctl 0x3b75 failed"
        );
        // A short bitmap is refused before the kernel could write past it.
        let e = dev
            .report(IovaRange::new(0, 65 * 4096), 4096, &mut [0])
            .unwrap_err();
        assert_eq!(
            e.rule,
            Rule::BitmapTooSmall {
                words: 1,
                needed: 2
            }
        );
    }

    /// Finds a real VFIO device to probe; there is none on CI machines.
    #[test]
    fn real_vfio_device_if_present() {
        let cdevs: Vec<_> = std::fs::read_dir("/dev/vfio/devices")
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if cdevs.is_empty() {
            crate::report_skip("real VFIO DMA logging: no VFIO device on this machine (no /dev/vfio/devices/vfio*)");
            return;
        }
        for path in cdevs {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                // An unbound cdev refuses feature ioctls; report, do not assert.
                Ok(f) => eprintln!(
                    "{}: probe -> {:?}",
                    path.display(),
                    VfioDmaLogger::new(f, "real").probe()
                ),
                Err(e) => eprintln!("{}: cannot open: {e}", path.display()),
            }
        }
    }
}
