//! The DMA-logging device seam and its backends.
//!
//! A device that logs its own DMA writes ([`DmaLogger`]: VFIO `DMA_LOGGING_START / REPORT /
//! STOP`) and an IOMMU that tracks dirt on its page tables ([`IommuDirtyTracker`]: iommufd
//! HWPT, legacy type1 container) are two seams, because their rules differ: a device logs
//! only inside the ranges it was given at START, an IOMMU sees every mapped page.
//!
//! Backends:
//! * [`VfioDmaLogger`]: a real VFIO device fd (`VFIO_DEVICE_FEATURE`).
//! * [`IommufdHwpt`]: iommufd HWPT dirty tracking over `/dev/iommu`.
//! * [`Type1Container`]: legacy `VFIO_IOMMU_DIRTY_PAGES` on a type1 container fd.
//! * [`EmulatedDevice`]: a software device enforcing the kernel core's and the drivers'
//!   rules errno for errno, fed DMA writes from many threads; the default everywhere.
//!
//! Every failure is a [`DeviceError`]: the operation, the errno a kernel would return and
//! the [`Rule`] that fired.
//!
//! Every ioctl the backends issue, and every `unsafe` block of this module, is in the private
//! `sys` module: it builds the pointer-carrying payloads from borrowed slices and checks
//! that a bitmap covers its range, so the backends call a safe API.

use crate::plan::limits::StartRefusal;
use crate::range::IovaRange;
use std::fmt;

pub mod emulated;
pub mod emulated_iommu;
pub mod iommufd;
pub mod migration;
mod sys;
#[cfg(feature = "vfio")]
pub mod type1;
#[cfg(feature = "vfio")]
pub mod vfio;

pub use emulated::EmulatedDevice;
pub use emulated_iommu::EmulatedIommu;
pub use iommufd::IommufdHwpt;
pub use migration::{MigFlags, MigState};
#[cfg(feature = "vfio")]
pub use type1::Type1Container;
#[cfg(feature = "vfio")]
pub use vfio::VfioDmaLogger;

/// A device that logs its own DMA writes (VFIO device DMA logging, `vfio_log_ops`).
pub trait DmaLogger: Send + Sync {
    /// A short name for messages.
    fn name(&self) -> &str;
    /// Whether the device supports DMA logging; `Err` with [`Errno::ENOTTY`] when it does not.
    fn probe(&self) -> Result<(), DeviceError>;
    /// Start logging writes to `ranges` at the hinted `page_size`; returns the page size the
    /// device chose (a driver may change it).
    fn start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError>;
    /// Read and clear the log for `range`: OR one bit per `page_size` page into `bitmap`
    /// (bit `k` = `range.iova + k * page_size`, u64 words LSB-first). Never clears a caller
    /// bit. On error the log must be considered lost for every tracked page.
    fn report(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError>;
    /// Stop logging. Succeeds even if logging was not started.
    fn stop(&self) -> Result<(), DeviceError>;
    /// What a REPORT reads and acknowledges around the range it is given, while logging.
    /// A caller that queries in these units never has an acknowledged bit dropped. The
    /// default, [`ReportGranule::DevicePage`], is what the vfio core and mlx5 do; a backend
    /// that knows its driver is pds must say so.
    fn report_granule(&self) -> ReportGranule {
        ReportGranule::DevicePage
    }
}

/// What a device's REPORT reads and acknowledges (clears) around the range it is given.
///
/// The core's rule (bits OR-ed for the range, log cleared for the range) is what a driver
/// promises; what it does is coarser, and bits the core's `iova_bitmap_set` cannot place
/// inside the caller's range are dropped after the device has forgotten them. Query in
/// these units and nothing is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportGranule {
    /// Every dirty device page (the page size START chose) that the range touches is read
    /// and acknowledged; `iova_bitmap_set` drops one that starts below the range's iova,
    /// and the part of one past the range's end. Query windows aligned to the device page
    /// (mlx5 `mlx5vf_tracker_read_and_clear`, the vfio core).
    DevicePage,
    /// pds (`pds_vfio_dirty_sync`): a REPORT must stay inside one region; it reads and
    /// acknowledges whole words of `word_pages` device pages counted from the region's
    /// start (offset rounded up to a byte, length to whole words). Query whole words from
    /// each region's start, at most [`ReportRegion::max_pages`] pages per REPORT.
    RegionWords {
        /// Device pages per acknowledged word (64).
        word_pages: u64,
        /// The regions the device tracks, ascending.
        regions: Vec<ReportRegion>,
    },
}

/// One region of a [`ReportGranule::RegionWords`] device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportRegion {
    /// Where a REPORT may go: `[dma_base, dma_base + region size)`.
    pub range: IovaRange,
    /// The region's page size.
    pub page_size: u64,
    /// The most pages one REPORT may cover (`bmp_bytes` must not exceed the region's
    /// bitmap, `page_count / 8` bytes): whole words of the region's page count.
    pub max_pages: u64,
}

/// Dirty tracking done by the IOMMU on its page tables (iommufd HWPT, type1 container).
pub trait IommuDirtyTracker: Send + Sync {
    /// A short name for messages.
    fn name(&self) -> &str;
    /// Turn dirty tracking on (the kernel clears all dirty bits first) or off.
    fn set_tracking(&self, on: bool) -> Result<(), DeviceError>;
    /// OR the dirty pages of `range` into `bitmap` at `page_size`; with `clear` the IOMMU's
    /// dirty bits are cleared too (without it, a final read before unmap).
    fn read_dirty(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), DeviceError>;
    /// Every read clears (type1's `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`: the kernel's
    /// `vfio_iova_dirty_bitmap` re-populates each mapping's bitmap after copying it out,
    /// and there is no read-only form). A caller's final read before an unmap is then one
    /// clearing read.
    fn clears_on_every_read(&self) -> bool {
        false
    }
    /// The mapped areas, sorted, if the backend knows them. iommufd's read stops at the
    /// first unmapped hole (`iopt_area_contig_next`), so a reader must never span one; a
    /// backend that cannot list its mappings returns `None` and the caller reads per
    /// DMA-able range.
    fn mapped_areas(&self) -> Option<Vec<IovaRange>> {
        None
    }
}

/// An errno value as the kernel returns it (positive).
///
/// The value vocabulary of this crate's device errors: unlike
/// [`vmm_sys_util::errno::Error`] (which system calls here are read through, and which it
/// converts to and from losslessly) it has named constants and symbolic names, which the
/// emulated backends and error texts need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl From<vmm_sys_util::errno::Error> for Errno {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Errno(e.errno())
    }
}

impl From<Errno> for vmm_sys_util::errno::Error {
    fn from(e: Errno) -> Self {
        vmm_sys_util::errno::Error::new(e.0)
    }
}

impl From<DeviceError> for vmm_sys_util::errno::Error {
    fn from(e: DeviceError) -> Self {
        e.errno.into()
    }
}

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// No such entry.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// I/O error (device or firmware failure).
    pub const EIO: Errno = Errno(libc::EIO);
    /// Argument list too long: more ranges than the core accepts.
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(libc::EBADF);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Permission denied (type1 without a v2 container).
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Bad address.
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// Already exists (pds: device already tracking).
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// Inappropriate ioctl: the feature or the ioctl is not supported.
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    /// No message: temporary end of the PRE_COPY stream.
    pub const ENOMSG: Errno = Errno(libc::ENOMSG);
    /// Value too large: `iova + length` overflows.
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    /// Operation not supported (mlx5 address space, iommufd flags).
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// Transport endpoint not connected (mlx5: device detached).
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);

    /// The symbolic name, if known.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::ENOTTY => "ENOTTY",
            libc::ENOMSG => "ENOMSG",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ENOTCONN => "ENOTCONN",
            _ => return None,
        })
    }

    /// The errno of the last failed system call on this thread.
    pub fn last() -> Errno {
        vmm_sys_util::errno::Error::last().into()
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "errno {}", self.0),
        }
    }
}

/// The operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceOp {
    /// `PROBE` of the DMA-logging feature.
    Probe,
    /// `DMA_LOGGING_START`.
    Start,
    /// `DMA_LOGGING_REPORT`.
    Report,
    /// `DMA_LOGGING_STOP`.
    Stop,
    /// IOMMU dirty tracking on/off (`IOMMU_HWPT_SET_DIRTY_TRACKING`, type1 START/STOP).
    SetTracking,
    /// IOMMU dirty bitmap read (`IOMMU_HWPT_GET_DIRTY_BITMAP`, type1 GET_BITMAP).
    ReadDirty,
    /// Duplicating a file descriptor.
    Open,
    /// Migration v2 `MIG_DEVICE_STATE` SET.
    SetState,
    /// Reading the migration data stream.
    ReadState,
    /// Writing the migration data stream.
    WriteState,
    /// `VFIO_MIG_GET_PRECOPY_INFO`.
    PrecopyInfo,
}

impl fmt::Display for DeviceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceOp::Probe => "DMA_LOGGING probe",
            DeviceOp::Start => "DMA_LOGGING_START",
            DeviceOp::Report => "DMA_LOGGING_REPORT",
            DeviceOp::Stop => "DMA_LOGGING_STOP",
            DeviceOp::SetTracking => "set dirty tracking",
            DeviceOp::ReadDirty => "read dirty bitmap",
            DeviceOp::Open => "open",
            DeviceOp::SetState => "MIG_DEVICE_STATE set",
            DeviceOp::ReadState => "migration data read",
            DeviceOp::WriteState => "migration data write",
            DeviceOp::PrecopyInfo => "MIG_GET_PRECOPY_INFO",
        })
    }
}

/// Which rule refused the operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rule {
    /// The device has no DMA-logging support (`log_ops` absent).
    NoLoggingSupport,
    /// The START rule engine ([`crate::plan::limits::check_start`]) refused: one of the
    /// vfio core's checks or a driver's, with its errno ([`StartRefusal::errno`]). The one
    /// vocabulary the planner predicts with and the devices enforce.
    Start(StartRefusal),
    /// A zero-length START range (the core lets it wrap; this device refuses it).
    ZeroLength {
        /// Index in the caller's order.
        index: usize,
    },
    /// The device cannot track at this page size (not a power of two, or zero).
    UnusablePageSize {
        /// The page size.
        page_size: u64,
    },
    /// The device would need more tracker memory than it has.
    TrackerMemory {
        /// Bytes of log needed.
        bytes: u128,
        /// The device's limit.
        max: u64,
    },
    /// A second START without STOP (driver).
    AlreadyStarted,
    /// REPORT while logging is not started (driver).
    NotStarted,
    /// REPORT page size below 4096 or not a power of two (core).
    ReportPageSize {
        /// The page size.
        page_size: u64,
    },
    /// REPORT `iova + length` reaches 2^64 (core).
    ReportOverflow {
        /// The range.
        range: IovaRange,
    },
    /// pds: the device already tracks (`num_regions != 0`, EEXIST): someone else started
    /// logging on it.
    DeviceBusy,
    /// mlx5: an earlier REPORT failed (`tracker->is_err`); every REPORT is EIO until STOP
    /// and a new START.
    TrackerError,
    /// pds: the REPORT's bitmap in whole words exceeds the region's bitmap (`bmp_bytes >
    /// region->bmp_bytes`), or the floor and ceiling page counts disagree on it.
    ReportBitmap {
        /// The report range.
        range: IovaRange,
        /// `bmp_bytes` of the REPORT.
        bytes: u64,
        /// The region's `bmp_bytes` (or the ceiling count's, when they disagree).
        max: u64,
    },
    /// iommufd `iommufd_check_iova_range`: iova or end not a multiple of the IOMMU page or
    /// of the bitmap page (mask test), a zero page size, or (a refusal where the kernel
    /// walks the whole space) a zero length at iova 0.
    IovaRange {
        /// The range.
        range: IovaRange,
        /// The granule it failed (IOMMU page or bitmap page size).
        page_size: u64,
    },
    /// pds: a REPORT whose start lies in no region.
    OutsideRegions {
        /// The report range.
        range: IovaRange,
    },
    /// pds: a REPORT of zero length, or running past the end of its region.
    CrossesRegion {
        /// The report range.
        range: IovaRange,
        /// The region its start lies in.
        region: IovaRange,
    },
    /// The caller's bitmap is shorter than the range needs.
    BitmapTooSmall {
        /// Words given.
        words: usize,
        /// Words needed.
        needed: u64,
    },
    /// A failure injected by a test.
    Injected,
    /// The kernel refused the ioctl.
    Ioctl {
        /// The ioctl request number.
        request: u64,
    },
    /// IOMMU tracking option this backend cannot honour (type1 has no NO_CLEAR).
    Unsupported {
        /// What is unsupported.
        what: &'static str,
    },
    /// A migration state the device does not support, or ERROR as a target.
    UnsupportedState {
        /// The state.
        state: MigState,
    },
    /// A migration transition the FSM forbids (STOP_COPY → PRE_COPY*).
    NoPath {
        /// From.
        from: MigState,
        /// To.
        to: MigState,
    },
    /// The migration data stream is not available in this state.
    WrongState {
        /// The device's state.
        state: MigState,
    },
    /// PRE_COPY: no more data for now (`ENOMSG`).
    EndOfPrecopy,
    /// RESUMING: the written stream is not a valid device state.
    BadStream {
        /// Bytes received.
        bytes: usize,
    },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::NoLoggingSupport => write!(f, "device has no DMA logging support"),
            Rule::Start(r) => start_text(f, r),
            Rule::ZeroLength { index } => write!(f, "range {index} has zero length"),
            Rule::UnusablePageSize { page_size } => {
                write!(f, "device cannot track at page size {page_size:#x}")
            }
            Rule::TrackerMemory { bytes, max } => {
                write!(f, "tracker needs {bytes} bytes of log, device has {max}")
            }
            Rule::AlreadyStarted => write!(f, "logging already started"),
            Rule::NotStarted => write!(f, "logging not started"),
            Rule::ReportPageSize { page_size } => write!(
                f,
                "report page size {page_size:#x} is below 4096 or not a power of two"
            ),
            Rule::ReportOverflow { range } => write!(
                f,
                "report iova {:#x} + length {:#x} overflows 2^64",
                range.iova, range.length
            ),
            Rule::DeviceBusy => write!(f, "device already tracks dirty pages"),
            Rule::TrackerError => write!(
                f,
                "tracker in error after a failed report (STOP and START again)"
            ),
            Rule::ReportBitmap { range, bytes, max } => write!(
                f,
                "report range {range} needs {bytes} bitmap bytes in whole words, region has {max}"
            ),
            Rule::IovaRange { range, page_size } => {
                write!(f, "range {range} not aligned to {page_size:#x}")
            }
            Rule::OutsideRegions { range } => {
                write!(
                    f,
                    "report range {range} starts outside every tracked region"
                )
            }
            Rule::CrossesRegion { range, region } => {
                write!(
                    f,
                    "report range {range} is empty or crosses region {region}"
                )
            }
            Rule::BitmapTooSmall { words, needed } => {
                write!(f, "bitmap of {words} words, range needs {needed}")
            }
            Rule::Injected => write!(f, "injected failure"),
            Rule::Ioctl { request } => write!(f, "ioctl {request:#x} failed"),
            Rule::Unsupported { what } => write!(f, "unsupported: {what}"),
            Rule::UnsupportedState { state } => {
                write!(f, "state {state:?} is not a supported target")
            }
            Rule::NoPath { from, to } => write!(f, "no transition {from:?} -> {to:?}"),
            Rule::WrongState { state } => {
                write!(f, "migration data not available in state {state:?}")
            }
            Rule::EndOfPrecopy => write!(f, "no more pre-copy data for now"),
            Rule::BadStream { bytes } => write!(f, "{bytes} bytes are not a valid device state"),
        }
    }
}

/// A START refusal in the device's words (the planner's text carries the errno, which a
/// [`DeviceError`] prints already).
fn start_text(f: &mut fmt::Formatter<'_>, r: &StartRefusal) -> fmt::Result {
    match r {
        StartRefusal::NoRanges => write!(f, "no ranges (num_ranges == 0)"),
        StartRefusal::TooManyRanges { count, max } => {
            write!(f, "{count} ranges exceed the core limit of {max}")
        }
        StartRefusal::Misaligned {
            index,
            range,
            page_size,
        } => write!(
            f,
            "range {index} {range} not aligned to page size {page_size:#x}"
        ),
        StartRefusal::Overflow { index, range } => write!(
            f,
            "range {index} iova {:#x} + length {:#x} overflows 2^64",
            range.iova, range.length
        ),
        StartRefusal::Overlap {
            index,
            range,
            other,
        } => write!(f, "range {index} {range} overlaps range {other}"),
        StartRefusal::AddressSpace {
            total,
            log2,
            min,
            max,
        } => write!(
            f,
            "tracked total {total:#x} bytes (log2 {log2}) outside device bounds [{min}, {max}]"
        ),
        // The planner's own words, without its errno prefix.
        other => {
            let text = other.to_string();
            let rest = text.split_once(": ").map_or(text.as_str(), |(_, t)| t);
            f.write_str(rest)
        }
    }
}

/// A device operation failed: what, the errno, and the rule that fired.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {errno}: {rule}")]
pub struct DeviceError {
    /// The operation.
    pub op: DeviceOp,
    /// The errno a kernel returns for it.
    pub errno: Errno,
    /// Which rule fired.
    pub rule: Rule,
}

impl DeviceError {
    /// A new error.
    pub fn new(op: DeviceOp, errno: Errno, rule: Rule) -> Self {
        Self { op, errno, rule }
    }

    /// A refused START: the rule engine's verdict and its errno.
    pub fn start(refusal: StartRefusal) -> Self {
        Self::new(
            DeviceOp::Start,
            Errno(refusal.errno()),
            Rule::Start(refusal),
        )
    }

    /// The errno of the last failed ioctl `request`.
    pub(crate) fn last_ioctl(op: DeviceOp, request: u64) -> Self {
        Self::new(op, Errno::last(), Rule::Ioctl { request })
    }
}

/// Words a bitmap needs for `length` bytes at `page_size` (`page_size > 0`).
pub(crate) fn needed_words(length: u64, page_size: u64) -> u64 {
    crate::bitmap::words_for(length.div_ceil(page_size)) as u64
}

/// The check every real backend makes before handing a user pointer to the kernel: the
/// bitmap must hold every bit the kernel may set, or the kernel writes past the slice.
pub(crate) fn check_bitmap(
    op: DeviceOp,
    range: IovaRange,
    page_size: u64,
    bitmap: &[u64],
) -> Result<(), DeviceError> {
    if page_size == 0 {
        // The kernel refuses page size 0 before it touches the bitmap.
        return Ok(());
    }
    let needed = needed_words(range.length, page_size);
    if (bitmap.len() as u64) < needed {
        return Err(DeviceError::new(
            op,
            Errno::EINVAL,
            Rule::BitmapTooSmall {
                words: bitmap.len(),
                needed,
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_names_rule_and_errno() {
        let e = DeviceError::start(StartRefusal::Misaligned {
            index: 3,
            range: IovaRange::new(0x1800, 0x1000),
            page_size: 0x1000,
        });
        assert_eq!(
            e.to_string(),
            "DMA_LOGGING_START: EINVAL: range 3 [0x1800, 0x27ff] not aligned to page size 0x1000"
        );
        assert_eq!(e.errno, Errno::EINVAL);
        assert_eq!(Errno(9999).to_string(), "errno 9999");
        assert_eq!(Errno::ENOTTY.name(), Some("ENOTTY"));
        // One errno, whichever type carries it.
        let v: vmm_sys_util::errno::Error = e.into();
        assert_eq!(v.errno(), libc::EINVAL);
        assert_eq!(Errno::from(v), Errno::EINVAL);
        let e = DeviceError::start(StartRefusal::NoRegions);
        assert_eq!(e.errno, Errno::EOPNOTSUPP);
        assert_eq!(
            e.to_string(),
            "DMA_LOGGING_START: EOPNOTSUPP: the device tracks no regions (max_regions == 0)"
        );
    }

    #[test]
    fn bitmap_size_check() {
        let r = IovaRange::new(0, 65 * 4096);
        assert!(check_bitmap(DeviceOp::Report, r, 4096, &[0; 2]).is_ok());
        let e = check_bitmap(DeviceOp::Report, r, 4096, &[0; 1]).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert_eq!(
            e.rule,
            Rule::BitmapTooSmall {
                words: 1,
                needed: 2
            }
        );
    }
}
