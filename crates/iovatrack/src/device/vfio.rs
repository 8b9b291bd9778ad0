//! DMA logging on a real VFIO device fd (`VFIO_DEVICE_FEATURE`, kernel 6.1+).
//!
//! The payloads are the `vfio-bindings` structs behind a `vfio_device_feature` header; the
//! ioctl number is `_IO(';', 100 + 17)`. vfio-ioctls has `VfioDevice::report_dma_logging`,
//! but it allocates a fresh `Vec<u64>` on every call; a pre-copy loop reports many times per
//! second, so REPORT here is a raw ioctl writing straight into the caller's reused bitmap,
//! with the feature buffer on the stack. The ioctls themselves, their payloads and their
//! `unsafe` are in the private `device::sys` module; this file is the policy.

use super::{sys, DeviceError, DmaLogger};
use crate::range::IovaRange;
use std::fs::File;
use std::os::fd::OwnedFd;

/// `VFIO_DEVICE_FEATURE` = `_IO(';', 100 + 17)` (also `VFIO_IOMMU_DIRTY_PAGES` on a container).
pub const VFIO_DEVICE_FEATURE: u64 = 0x3B75;

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
        let fd = sys::dup_device_fd(dev)?;
        Ok(Self {
            fd,
            name: name.into(),
        })
    }
}

impl DmaLogger for VfioDmaLogger {
    fn name(&self) -> &str {
        &self.name
    }

    fn probe(&self) -> Result<(), DeviceError> {
        sys::dma_logging_probe(&self.fd)
    }

    fn start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        // A range count past u32 is refused (TooManyRanges) before anything is sent.
        sys::dma_logging_start(&self.fd, page_size, ranges)
    }

    fn report(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        // The kernel writes up to ceil(length / page_size) bits through the pointer; sys
        // refuses a shorter bitmap before the call.
        sys::dma_logging_report(&self.fd, range, page_size, bitmap)
    }

    fn stop(&self) -> Result<(), DeviceError> {
        sys::dma_logging_stop(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Errno, Rule};

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
