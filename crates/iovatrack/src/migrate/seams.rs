//! The seams between the migration engine and a VMM: the engine talks only to these
//! traits, so a VMM hands it its own guest memory, vCPUs, CPU dirty log and migratable
//! devices (as Cloud Hypervisor's `vm-migration` does with `Pausable`, `Snapshottable` and
//! `Migratable`).
//!
//! * [`GuestRam`]: the guest's RAM regions, read and written a page at a time.
//! * [`Vcpus`]: pause, resume and save the vCPUs.
//! * [`CpuDirtyLog`]: the CPU's dirty log per RAM region (KVM's `KVM_GET_DIRTY_LOG`).
//! * [`DeviceMigration`]: one device's VFIO migration v2 state machine and data stream.
//!
//! Device dirt comes from [`crate::track::Tracker`], which drives the device backends
//! (real VFIO, iommufd, type1, emulated) through [`crate::device::DmaLogger`].
//!
//! Implementations here: [`GuestMemory`] (and, through
//! [`crate::migrate::vm_memory::VmMemory`], any `vm-memory` guest memory), every
//! [`GuestCpu`] (the KVM and software guests), the emulated device
//! ([`EmulatedMigration`]) and, with the `vfio` feature, a real
//! `vfio_ioctls::VfioDevice`.

use crate::device::{DeviceError, EmulatedDevice, Errno, MigFlags, MigState};
use crate::migrate::guest::{self, GuestCpu, GuestError, GuestMemory};
use crate::range::IovaRange;
use std::sync::Arc;

/// A VMM's own error behind a seam, kept whole (downcast it to get it back).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What failed behind a seam, and the implementation's own error.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Pausing the vCPUs failed.
    #[error("pausing the vCPUs: {0}")]
    Pause(#[source] BoxError),
    /// Resuming the vCPUs failed.
    #[error("resuming the vCPUs: {0}")]
    Resume(#[source] BoxError),
    /// Saving the vCPU state failed.
    #[error("saving the vCPU state: {0}")]
    SaveState(#[source] BoxError),
    /// Reading the CPU dirty log failed.
    #[error("reading the CPU dirty log: {0}")]
    DirtyLog(#[source] BoxError),
    /// Reading or writing guest memory failed.
    #[error("guest memory: {0}")]
    Memory(#[source] BoxError),
}

impl VmError {
    fn memory(e: GuestError) -> Self {
        VmError::Memory(Box::new(e))
    }
}

/// Guest RAM as the engine sees it: sorted, disjoint, 4 KiB-aligned regions; region `i`
/// is dirty-log slot `i` of [`CpuDirtyLog`] and the ledger's region `i`.
pub trait GuestRam: Send + Sync {
    /// The RAM regions, in address order.
    fn regions(&self) -> &[IovaRange];
    /// Copy the 4 KiB page at `gpa` into `buf` (4096 bytes).
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;
    /// Overwrite the 4 KiB page at `gpa` with `buf` (4096 bytes).
    fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError>;
    /// Whether the page at `gpa` is all zero (pass 0 leaves such pages out: the
    /// destination starts zeroed).
    fn is_zero_page(&self, gpa: u64) -> Result<bool, VmError> {
        let mut buf = [0u8; 4096];
        self.read_page(gpa, &mut buf)?;
        Ok(buf.iter().all(|&b| b == 0))
    }
    /// Pages of region `index` known never written (bit k = page k), so pass 0 need not
    /// even read them; `None` when unknown (every page is looked at).
    fn never_written(&self, _index: usize) -> Option<Vec<u64>> {
        None
    }
    /// One hash per page of region `index` (verification).
    fn page_hashes(&self, index: usize) -> Result<Vec<u64>, VmError> {
        let r = *self
            .regions()
            .get(index)
            .ok_or_else(|| VmError::memory(GuestError::NoSuchRegion { index }))?;
        self.page_hashes_in(index, 0, r.length / 4096)
    }
    /// One hash per page of pages `first..first + count` of region `index` (verification
    /// of a large region, a run at a time).
    fn page_hashes_in(&self, index: usize, first: u64, count: u64) -> Result<Vec<u64>, VmError> {
        let r = *self
            .regions()
            .get(index)
            .ok_or_else(|| VmError::memory(GuestError::NoSuchRegion { index }))?;
        if first
            .checked_add(count)
            .is_none_or(|end| end > r.length / 4096)
        {
            return Err(VmError::memory(GuestError::OutOfRange {
                gpa: r.iova.saturating_add(first.saturating_mul(4096)),
                len: count.saturating_mul(4096),
            }));
        }
        let mut buf = [0u8; 4096];
        (first..first + count)
            .map(|p| {
                self.read_page(r.iova + p * 4096, &mut buf)?;
                Ok(guest::hash_page_bytes(&buf))
            })
            .collect()
    }
    /// Total bytes of RAM.
    fn total_bytes(&self) -> u64 {
        self.regions().iter().map(|r| r.length).sum()
    }
}

impl GuestRam for GuestMemory {
    fn regions(&self) -> &[IovaRange] {
        GuestMemory::regions(self)
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        GuestMemory::read_page(self, gpa, buf).map_err(VmError::memory)
    }
    fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
        GuestMemory::write_page(self, gpa, buf).map_err(VmError::memory)
    }
    fn is_zero_page(&self, gpa: u64) -> Result<bool, VmError> {
        GuestMemory::is_zero_page(self, gpa).map_err(VmError::memory)
    }
    fn never_written(&self, index: usize) -> Option<Vec<u64>> {
        GuestMemory::never_written(self, index)
    }
    fn page_hashes(&self, index: usize) -> Result<Vec<u64>, VmError> {
        GuestMemory::page_hashes(self, index).map_err(VmError::memory)
    }
    fn page_hashes_in(&self, index: usize, first: u64, count: u64) -> Result<Vec<u64>, VmError> {
        GuestMemory::page_hashes_in(self, index, first, count).map_err(VmError::memory)
    }
}

/// The guest's vCPUs.
pub trait Vcpus: Send + Sync {
    /// A short name of the vCPU kind for the peer's check (`kvm`, `software`, ...): the
    /// destination refuses state of another kind.
    fn kind(&self) -> &str;
    /// Stop every vCPU; returns once none can write guest memory until [`Vcpus::resume`].
    fn pause(&self) -> Result<(), VmError>;
    /// Continue after [`Vcpus::pause`].
    fn resume(&self) -> Result<(), VmError>;
    /// Saved state of each vCPU (needs them paused), in vCPU order.
    fn save(&self) -> Result<Vec<Vec<u8>>, VmError>;
    /// Keep the vCPUs out of the guest `pct`% of the time (0 = off, at most 99) for
    /// auto-converge, as QEMU's `cpu-throttle-percentage`. The default does nothing (a VMM
    /// without throttling).
    fn throttle(&self, _pct: u8) -> Result<(), VmError> {
        Ok(())
    }
}

/// The CPU's dirty log, one bitmap per RAM region (u64 words, LSB first, bit k = the
/// region's page k, 4 KiB pages: KVM's format).
pub trait CpuDirtyLog: Send + Sync {
    /// Fill `buf` (overwritten, not OR-ed) with the pages of region `slot` dirtied since
    /// the previous call, and clear that log.
    fn read_and_clear(&self, slot: usize, buf: &mut [u64]) -> Result<(), VmError>;
}

impl<T: GuestCpu> Vcpus for T {
    fn kind(&self) -> &str {
        GuestCpu::kind(self)
    }
    fn pause(&self) -> Result<(), VmError> {
        GuestCpu::pause(self).map_err(|e| VmError::Pause(Box::new(e)))
    }
    fn resume(&self) -> Result<(), VmError> {
        GuestCpu::resume(self).map_err(|e| VmError::Resume(Box::new(e)))
    }
    fn save(&self) -> Result<Vec<Vec<u8>>, VmError> {
        GuestCpu::state_bytes(self)
            .map(|s| vec![s])
            .map_err(|e| VmError::SaveState(Box::new(e)))
    }
    fn throttle(&self, pct: u8) -> Result<(), VmError> {
        GuestCpu::set_throttle(self, pct);
        Ok(())
    }
}

impl<T: GuestCpu> CpuDirtyLog for T {
    fn read_and_clear(&self, slot: usize, buf: &mut [u64]) -> Result<(), VmError> {
        GuestCpu::dirty_log(self, slot, buf).map_err(|e| VmError::DirtyLog(Box::new(e)))
    }
}

/// A boxed guest CPU (what [`guest::start_guest`] returns) is one too.
impl Vcpus for Box<dyn GuestCpu> {
    fn kind(&self) -> &str {
        self.as_ref().kind()
    }
    fn pause(&self) -> Result<(), VmError> {
        self.as_ref()
            .pause()
            .map_err(|e| VmError::Pause(Box::new(e)))
    }
    fn resume(&self) -> Result<(), VmError> {
        self.as_ref()
            .resume()
            .map_err(|e| VmError::Resume(Box::new(e)))
    }
    fn save(&self) -> Result<Vec<Vec<u8>>, VmError> {
        self.as_ref()
            .state_bytes()
            .map(|s| vec![s])
            .map_err(|e| VmError::SaveState(Box::new(e)))
    }
    fn throttle(&self, pct: u8) -> Result<(), VmError> {
        self.as_ref().set_throttle(pct);
        Ok(())
    }
}

impl CpuDirtyLog for Box<dyn GuestCpu> {
    fn read_and_clear(&self, slot: usize, buf: &mut [u64]) -> Result<(), VmError> {
        self.as_ref()
            .dirty_log(slot, buf)
            .map_err(|e| VmError::DirtyLog(Box::new(e)))
    }
}

/// One device's VFIO migration v2 interface (`VFIO_DEVICE_FEATURE_MIGRATION`,
/// `MIG_DEVICE_STATE`, the data fd and `VFIO_MIG_GET_PRECOPY_INFO`).
pub trait DeviceMigration: Send {
    /// The device's name; device-state records travel under it.
    fn name(&self) -> &str;
    /// The migration flags the device reports.
    fn flags(&self) -> Result<MigFlags, DeviceError>;
    /// Move the device to `state` (the kernel walks the arcs between).
    fn set_state(&mut self, state: MigState) -> Result<(), DeviceError>;
    /// `read()` on the data fd: 0 at the end of a STOP_COPY stream, `ENOMSG` when a
    /// PRE_COPY stream has nothing more for now.
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError>;
    /// `write()` on the data fd in RESUMING.
    fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError>;
    /// `(initial_bytes, dirty_bytes)` still to read in PRE_COPY*.
    fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError>;

    /// Read the data fd until it has nothing more now (PRE_COPY: `ENOMSG`) or ever
    /// (STOP_COPY: end of stream), appending to `out`.
    fn drain(&mut self, out: &mut Vec<u8>) -> Result<(), DeviceError> {
        let mut buf = [0u8; 4096];
        loop {
            match self.read_data(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.errno == Errno::ENOMSG => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The emulated device's migration interface.
pub struct EmulatedMigration {
    name: String,
    device: Arc<EmulatedDevice>,
}

impl EmulatedMigration {
    /// The migration side of `device`, under `name`.
    pub fn new(name: impl Into<String>, device: Arc<EmulatedDevice>) -> Self {
        Self {
            name: name.into(),
            device,
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<EmulatedDevice> {
        &self.device
    }
}

impl DeviceMigration for EmulatedMigration {
    fn name(&self) -> &str {
        &self.name
    }
    fn flags(&self) -> Result<MigFlags, DeviceError> {
        Ok(self.device.migration().flags())
    }
    fn set_state(&mut self, state: MigState) -> Result<(), DeviceError> {
        let mut m = self.device.migration();
        if state == MigState::Resuming && m.state() != MigState::Resuming {
            // A destination reused for a retry starts from a clean device.
            m.reset();
        }
        m.set_state(state).map(|_| ())
    }
    fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.device.migration().read(buf)
    }
    fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
        self.device.migration().write(buf).map(|_| ())
    }
    fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError> {
        self.device.migration().precopy_info()
    }
}

#[cfg(feature = "vfio")]
mod vfio_impl {
    use super::*;
    use crate::device::{DeviceOp, Rule};
    use vfio_ioctls::{VfioDevice, VfioError};

    /// `VFIO_DEVICE_FEATURE` = `_IO(';', 100 + 17)`.
    const VFIO_DEVICE_FEATURE: u64 = 0x3B75;

    fn err(op: DeviceOp, e: VfioError) -> DeviceError {
        let errno = match &e {
            VfioError::VfioDeviceFeature(e) => e.errno(),
            VfioError::VfioMigrationDataIo(e) => e.raw_os_error().unwrap_or(libc::EIO),
            VfioError::NoMigrationDataFd => libc::EBADF,
            _ => libc::EIO,
        };
        let request = if op == DeviceOp::PrecopyInfo {
            crate::device::migration::VFIO_MIG_GET_PRECOPY_INFO
        } else {
            VFIO_DEVICE_FEATURE
        };
        log::debug!("vfio migration {op}: {e}");
        DeviceError::new(op, Errno(errno), Rule::Ioctl { request })
    }

    /// A real VFIO device, named for its device-state records.
    pub struct VfioMigration {
        name: String,
        device: Arc<VfioDevice>,
    }

    impl VfioMigration {
        /// The migration side of `device`.
        pub fn new(name: impl Into<String>, device: Arc<VfioDevice>) -> Self {
            Self {
                name: name.into(),
                device,
            }
        }
    }

    impl DeviceMigration for VfioMigration {
        fn name(&self) -> &str {
            &self.name
        }
        fn flags(&self) -> Result<MigFlags, DeviceError> {
            match self.device.query_migration_support() {
                Ok(Some(f)) => Ok(MigFlags(f as u32)),
                Ok(None) => Err(DeviceError::new(
                    DeviceOp::Probe,
                    Errno::ENOTTY,
                    Rule::Ioctl {
                        request: VFIO_DEVICE_FEATURE,
                    },
                )),
                Err(e) => Err(err(DeviceOp::Probe, e)),
            }
        }
        fn set_state(&mut self, state: MigState) -> Result<(), DeviceError> {
            self.device
                .set_migration_state(state as u32)
                .map_err(|e| err(DeviceOp::SetState, e))
        }
        fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
            self.device
                .read_migration_data(buf)
                .map_err(|e| err(DeviceOp::ReadState, e))
        }
        fn write_data(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
            self.device
                .write_migration_data(buf)
                .map_err(|e| err(DeviceOp::WriteState, e))
        }
        fn precopy_info(&mut self) -> Result<(u64, u64), DeviceError> {
            self.device
                .mig_get_precopy_info()
                .map(|i| (i.initial_bytes, i.dirty_bytes))
                .map_err(|e| err(DeviceOp::PrecopyInfo, e))
        }
    }
}

#[cfg(feature = "vfio")]
pub use vfio_impl::VfioMigration;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::limits::DeviceLimits;

    #[test]
    fn emulated_migration_streams_through_the_trait() {
        let dev = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
        dev.migration().set_data(b"state".to_vec());
        let mut src = EmulatedMigration::new("d0", dev);
        src.set_state(MigState::PreCopy).unwrap();
        let mut out = Vec::new();
        src.drain(&mut out).unwrap();
        src.set_state(MigState::StopCopy).unwrap();
        src.drain(&mut out).unwrap();
        let dst_dev = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
        let mut dst = EmulatedMigration::new("d0", dst_dev.clone());
        dst.set_state(MigState::Resuming).unwrap();
        dst.write_data(&out).unwrap();
        dst.set_state(MigState::Running).unwrap();
        assert_eq!(dst_dev.migration().data(), b"state");
    }

    #[test]
    fn default_page_hashes_match_guest_memory() {
        struct Plain(GuestMemory);
        impl GuestRam for Plain {
            fn regions(&self) -> &[IovaRange] {
                self.0.regions()
            }
            fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
                GuestRam::read_page(&self.0, gpa, buf)
            }
            fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
                GuestRam::write_page(&self.0, gpa, buf)
            }
        }
        let m = GuestMemory::new(&[(0, 64 << 10)]).unwrap();
        m.write_u64(0x3008, 42).unwrap();
        let fast = GuestRam::page_hashes(&m, 0).unwrap();
        let plain = Plain(m);
        assert_eq!(plain.page_hashes(0).unwrap(), fast);
        // A run is the same slice of the region's hashes, read or through pagemap.
        assert_eq!(plain.page_hashes_in(0, 2, 5).unwrap(), fast[2..7]);
        assert_eq!(
            GuestRam::page_hashes_in(&plain.0, 0, 2, 5).unwrap(),
            fast[2..7]
        );
        assert!(plain.page_hashes_in(0, 15, 2).is_err());
        assert!(GuestRam::page_hashes_in(&plain.0, 0, 16, 1).is_err());
        assert!(!plain.is_zero_page(0x3000).unwrap());
        assert!(plain.is_zero_page(0x4000).unwrap());
        assert!(plain.page_hashes(1).is_err());
    }
}
