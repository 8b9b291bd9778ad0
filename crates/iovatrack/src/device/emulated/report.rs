//! `DMA_LOGGING_REPORT` on the emulated device, as harsh as the drivers.
//!
//! * Core (`vfio_ioctl_device_feature_logging_report`): page size below 4 KiB or not a
//!   power of two is EINVAL; `iova + length` past 2^64 is EOVERFLOW.
//! * Driver state: not started is EINVAL. mlx5 (`mlx5vf_tracker_read_and_clear`): once a
//!   REPORT failed (`tracker->is_err`), every REPORT is EIO until STOP and a new START.
//! * Generic and mlx5: every dirty device page the range touches is read and
//!   acknowledged, even one only partly inside it; the core's `iova_bitmap_set` then drops
//!   a page that starts below the range's iova, and the part of a page past its end. mlx5
//!   rounds the page size up, so a range need not start on a device page: what sticks out
//!   is lost.
//! * pds (`pds_vfio_dirty_sync`, `pds_vfio_dirty_process_bitmaps`): the range must start in
//!   a region and stay inside it; the bitmap offset is rounded up to a byte (8 pages) from
//!   the region start and the length to whole u64 words (`bmp_bytes`), which must agree
//!   with the ceiling page count and not exceed the region's bitmap; every page of those
//!   words is acknowledged, and `iova_bitmap_set` drops those outside the range.

use super::{EmulatedDevice, Region, Session};
use crate::bitmap::{fill_range, words_for};
use crate::device::{check_bitmap, DeviceError, DeviceOp, Errno, Rule};
use crate::plan::limits::DriverKind;
use crate::range::{is_pow2, IovaRange};
use std::sync::atomic::Ordering;

/// The smallest REPORT page size the core accepts (`SZ_4K`, not the kernel's PAGE_SIZE).
const MIN_REPORT_PAGE: u64 = 4096;

fn err(errno: Errno, rule: Rule) -> DeviceError {
    DeviceError::new(DeviceOp::Report, errno, rule)
}

/// The caller's bitmap for one REPORT: `iova_bitmap_set` with the core's bounds.
struct Out<'a> {
    bitmap: &'a mut [u64],
    start: u128,
    end: u128,
    shift: u32,
}

impl Out<'_> {
    /// `iova_bitmap_set(addr, len)`: a span starting below the range is dropped (the
    /// bitmap cannot index it), and so is one starting at or past its end; the rest sets
    /// its bits up to the range's end.
    fn set(&mut self, addr: u128, len: u128) {
        if addr < self.start || addr >= self.end {
            return;
        }
        let k0 = ((addr - self.start) >> self.shift) as u64;
        let k1 = (((addr + len).min(self.end) - 1 - self.start) >> self.shift) as u64;
        fill_range(self.bitmap, k0, k1 - k0 + 1);
    }
}

/// The device's REPORT. See the module documentation for the rules.
pub(super) fn report(
    dev: &EmulatedDevice,
    s: Option<&Session>,
    range: IovaRange,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<(), DeviceError> {
    if page_size < MIN_REPORT_PAGE || !is_pow2(page_size) {
        return Err(err(Errno::EINVAL, Rule::ReportPageSize { page_size }));
    }
    if !range.fits_u64() {
        return Err(err(Errno::EOVERFLOW, Rule::ReportOverflow { range }));
    }
    let Some(s) = s else {
        return Err(err(Errno::EINVAL, Rule::NotStarted));
    };
    let mlx5 = dev.limits.driver == DriverKind::Mlx5;
    if mlx5 && s.is_err.load(Ordering::SeqCst) {
        return Err(err(Errno::EIO, Rule::TrackerError));
    }
    if let Some(errno) = dev.take_report_fault() {
        if mlx5 {
            s.is_err.store(true, Ordering::SeqCst);
        }
        return Err(err(errno, Rule::Injected));
    }
    if dev.limits.driver.is_pds() {
        return pds_sync(s, range, page_size, bitmap);
    }
    check_bitmap(DeviceOp::Report, range, page_size, bitmap)?;
    let Some(last) = range.last() else {
        return Ok(());
    };
    let shift = s.shift;
    let mut out = Out {
        bitmap,
        start: range.iova as u128,
        end: range.end(),
        shift: page_size.trailing_zeros(),
    };
    // Whole device pages are the unit (a region's first and last page may stick out of it
    // when the driver clamped the page size up), so select regions by page span.
    let span_end = |r: &Region| ((r.first_page + r.npages) as u128) << shift;
    let (rstart, rend) = (out.start, out.end);
    let first = s.regions.partition_point(|r| span_end(r) <= rstart);
    for r in s.regions[first..]
        .iter()
        .take_while(|r| ((r.first_page as u128) << shift) < rend)
    {
        let p_lo = (range.iova >> shift).max(r.first_page);
        let p_hi = (last >> shift).min(r.first_page + r.npages - 1);
        if p_lo > p_hi {
            continue;
        }
        r.take(p_lo - r.first_page, p_hi - r.first_page, |p| {
            out.set((p as u128) << shift, 1u128 << shift);
        });
    }
    Ok(())
}

/// `pds_vfio_dirty_sync`.
fn pds_sync(
    s: &Session,
    range: IovaRange,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<(), DeviceError> {
    // pds_vfio_get_region: the first region whose [start, start + size) holds the iova.
    let found = s.regions.iter().find_map(|r| {
        let g = r.pds?;
        (range.iova >= g.start && range.iova - g.start < g.size).then_some((r, g))
    });
    let Some((r, g)) = found else {
        return Err(err(Errno::EINVAL, Rule::OutsideRegions { range }));
    };
    let region = IovaRange::new(g.start, g.size);
    let off = range.iova - g.start;
    if range.length == 0 || off as u128 + range.length as u128 > g.size as u128 {
        return Err(err(Errno::EINVAL, Rule::CrossesRegion { range, region }));
    }
    let ps = 1u64 << s.shift;
    let pages = range.length.div_ceil(ps);
    let bitmap_size = words_for(pages) as u64 * 8;
    // "bitmap is modified in 64 bit chunks": the floor page count, in whole words.
    let bmp_bytes = (range.length / ps).div_ceil(8).div_ceil(8) * 8;
    if bmp_bytes != bitmap_size {
        return Err(err(
            Errno::EINVAL,
            Rule::ReportBitmap {
                range,
                bytes: bmp_bytes,
                max: bitmap_size,
            },
        ));
    }
    if bmp_bytes > g.bmp_bytes() {
        return Err(err(
            Errno::EINVAL,
            Rule::ReportBitmap {
                range,
                bytes: bmp_bytes,
                max: g.bmp_bytes(),
            },
        ));
    }
    check_bitmap(DeviceOp::Report, range, page_size, bitmap)?;
    // The byte offset rounds *up*: a range starting mid-byte skips to the next byte.
    let bmp_offset = (off / ps).div_ceil(8);
    let k0 = bmp_offset * 8;
    let k1 = k0 + bmp_bytes * 8 - 1;
    let mut out = Out {
        bitmap,
        start: range.iova as u128,
        end: range.end(),
        shift: page_size.trailing_zeros(),
    };
    // Region pages k0..=k1 are acknowledged (ack := seq); each dirty one is handed to
    // iova_bitmap_set, which keeps only those inside the range.
    r.take(k0, k1, |p| out.set((p as u128) << s.shift, ps as u128));
    Ok(())
}
