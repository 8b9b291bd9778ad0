//! A software IOMMU with dirty tracking, following iommufd's HWPT rules
//! (`IOMMU_HWPT_SET_DIRTY_TRACKING`, `IOMMU_HWPT_GET_DIRTY_BITMAP`, linux-kernel.md §5),
//! as harshly as the kernel:
//!
//! * `iommufd_check_iova_range`: `iova + length - 1` overflowing is EOVERFLOW (so length 0
//!   at a non-zero iova is too); iova and end must be multiples of the IOMMU page and of
//!   the bitmap page size, tested as masks (a page size that is not a power of two passes
//!   when the mask test does, and `iova_bitmap` then uses its lowest set bit).
//! * `iopt_area_contig_init` / `iopt_area_contig_next`: the read walks mapped areas from
//!   the one holding `iova` while they are contiguous; at the first hole it stops, and
//!   `iommu_read_and_clear_dirty` discards the error: the ioctl returns 0 and nothing after
//!   the hole is reported or cleared (nothing at all when `iova` is unmapped).
//! * With tracking disabled the driver's `read_and_clear_dirty` fails, the error is
//!   discarded: 0, no bits, nothing cleared.
//!
//! The IOMMU sees every DMA write to a mapped page, whatever the device, so there are no
//! ranges to choose. A write to an unmapped IOVA is blocked by the IOMMU (an IOMMU fault):
//! no memory changes, so it is counted, not logged. Dirty bits live at the IOMMU page
//! (4 KiB) in atomic words per mapped area; unmapping an area drops its bits, as the
//! kernel drops the PTEs (hence "query before unmap").

use super::{check_bitmap, DeviceError, DeviceOp, Errno, IommuDirtyTracker, Rule};
use crate::bitmap::{fill_range, AtomicDirtyBitmap};
use crate::range::IovaRange;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

/// The IOMMU page (`iopt.iova_alignment`): the granule of mapping and of dirty bits.
pub const IOMMU_PAGE: u64 = 4096;
const SHIFT: u32 = IOMMU_PAGE.trailing_zeros();

/// Why a map or unmap of the emulated IOMMU was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IommuMapError {
    /// Empty, not aligned to the IOMMU page, or ending past 2^64.
    #[error("range {0} is empty, not aligned to {IOMMU_PAGE:#x}, or past 2^64")]
    Misaligned(IovaRange),
    /// Shares bytes with an existing mapping (iommufd: EEXIST).
    #[error("range {0} overlaps an existing mapping")]
    Overlap(IovaRange),
    /// Unmap of part of a mapped area (iommufd cannot split an area).
    #[error("range {range} cuts mapped area {area}")]
    PartialArea {
        /// The unmap range.
        range: IovaRange,
        /// The area it cuts.
        area: IovaRange,
    },
}

struct Area {
    range: IovaRange,
    /// One bit per IOMMU page of the area.
    bits: AtomicDirtyBitmap,
}

/// A software IOMMU with dirty tracking. See the module documentation.
pub struct EmulatedIommu {
    name: String,
    tracking: AtomicBool,
    areas: RwLock<Vec<Area>>,
    faults: AtomicU64,
    read_fault: Mutex<Option<(u64, Errno)>>,
    set_fault: Mutex<Option<Errno>>,
    /// Refuse reads without clearing, as type1 does.
    type1_reads: bool,
}

impl std::fmt::Debug for EmulatedIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedIommu")
            .field("name", &self.name)
            .field("tracking", &self.is_tracking())
            .field("mapped", &self.mapped())
            .finish()
    }
}

impl EmulatedIommu {
    /// An IOMMU with `mapped` areas (each aligned to 4 KiB, disjoint), tracking off.
    pub fn new(mapped: &[IovaRange]) -> Result<Self, IommuMapError> {
        let me = Self {
            name: "emulated-iommu".to_string(),
            tracking: AtomicBool::new(false),
            areas: RwLock::new(Vec::new()),
            faults: AtomicU64::new(0),
            read_fault: Mutex::new(None),
            set_fault: Mutex::new(None),
            type1_reads: false,
        };
        for &r in mapped {
            me.map(r)?;
        }
        Ok(me)
    }

    /// Read as a type1 container does: every read clears, and a read without clearing is
    /// EOPNOTSUPP (type1 has no NO_CLEAR flag; `vfio_iova_dirty_bitmap` always re-arms).
    pub fn type1_reads(mut self) -> Self {
        self.type1_reads = true;
        self
    }

    /// Rename.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Map an area (`IOMMU_IOAS_MAP`); its dirty bits start clear.
    pub fn map(&self, range: IovaRange) -> Result<(), IommuMapError> {
        if range.length == 0 || !range.is_aligned(IOMMU_PAGE) || range.end() > 1u128 << 64 {
            return Err(IommuMapError::Misaligned(range));
        }
        let mut areas = self.areas.write().unwrap_or_else(PoisonError::into_inner);
        let i = areas.partition_point(|a| a.range.end() <= range.iova as u128);
        if areas.get(i).is_some_and(|a| a.range.overlaps(&range)) {
            return Err(IommuMapError::Overlap(range));
        }
        let bits = AtomicDirtyBitmap::new(range.length >> SHIFT);
        areas.insert(i, Area { range, bits });
        Ok(())
    }

    /// Unmap every area inside `range` (`IOMMU_IOAS_UNMAP`): their dirty bits are gone.
    /// Returns the bytes unmapped. An area only partly inside is refused, nothing changes.
    pub fn unmap(&self, range: IovaRange) -> Result<u64, IommuMapError> {
        let mut areas = self.areas.write().unwrap_or_else(PoisonError::into_inner);
        let inside = |a: &Area| a.range.iova >= range.iova && a.range.end() <= range.end();
        if let Some(a) = areas
            .iter()
            .find(|a| a.range.overlaps(&range) && !inside(a))
        {
            return Err(IommuMapError::PartialArea {
                range,
                area: a.range,
            });
        }
        let before: u64 = areas.iter().map(|a| a.range.length).sum();
        areas.retain(|a| !inside(a));
        Ok(before - areas.iter().map(|a| a.range.length).sum::<u64>())
    }

    /// The mapped areas, sorted.
    pub fn mapped(&self) -> Vec<IovaRange> {
        let areas = self.areas.read().unwrap_or_else(PoisonError::into_inner);
        areas.iter().map(|a| a.range).collect()
    }

    /// Whether dirty tracking is on.
    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// DMA writes that touched an unmapped IOVA (blocked by the IOMMU, not memory).
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Dirty IOMMU pages right now.
    pub fn dirty_pages(&self) -> u64 {
        let areas = self.areas.read().unwrap_or_else(PoisonError::into_inner);
        areas.iter().map(|a| a.bits.count_ones()).sum()
    }

    /// Fail the `nth` `read_dirty` from now (1 = the next) with `errno`.
    pub fn fail_read(&self, nth: u64, errno: Errno) {
        *self
            .read_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((nth.max(1), errno));
    }

    /// Fail every `set_tracking` with `errno` (`None`: stop failing).
    pub fn fail_set_tracking(&self, errno: Option<Errno>) {
        *self
            .set_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = errno;
    }

    /// A device DMA-writes `len` bytes at `iova`: mapped pages are marked dirty while
    /// tracking is on; bytes in no mapping make the write an IOMMU fault.
    pub fn dma_write(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = (iova as u128 + len as u128).min(1u128 << 64);
        let tracking = self.is_tracking();
        let areas = self.areas.read().unwrap_or_else(PoisonError::into_inner);
        let mut i = areas.partition_point(|a| a.range.end() <= iova as u128);
        let mut cur = iova as u128;
        let mut fault = false;
        while cur < end {
            match areas.get(i) {
                Some(a) if (a.range.iova as u128) < end => {
                    let (s, e) = (a.range.iova as u128, a.range.end());
                    fault |= s > cur;
                    let lo = cur.max(s);
                    let hi = end.min(e);
                    if tracking {
                        let k0 = ((lo - s) >> SHIFT) as u64;
                        let k1 = ((hi - 1 - s) >> SHIFT) as u64;
                        // One SeqCst fetch_or per word under the read guard, as the
                        // emulated device's log.
                        a.bits
                            .set_range(k0, k1 - k0 + 1)
                            .expect("DMA pages clipped to the area");
                    }
                    cur = hi;
                    i += 1;
                }
                _ => {
                    fault = true;
                    cur = end;
                }
            }
        }
        if fault {
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take_read_fault(&self) -> Option<Errno> {
        let mut f = self
            .read_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *f {
            Some((1, e)) => {
                *f = None;
                Some(e)
            }
            Some((n, e)) => {
                *f = Some((n - 1, e));
                None
            }
            None => None,
        }
    }
}

impl IommuDirtyTracker for EmulatedIommu {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_tracking(&self, on: bool) -> Result<(), DeviceError> {
        if let Some(e) = *self
            .set_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(DeviceError::new(DeviceOp::SetTracking, e, Rule::Injected));
        }
        let areas = self.areas.write().unwrap_or_else(PoisonError::into_inner);
        if on {
            // The kernel clears every dirty bit before enabling: a clean snapshot.
            for a in areas.iter() {
                a.bits.clear_all();
            }
        }
        self.tracking.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP`: `iommufd_check_iova_range` in the kernel's order,
    /// then the contiguous-area walk, which stops at the first hole. One refusal where the
    /// kernel would walk the whole address space with an empty bitmap: length 0 at iova 0
    /// is EINVAL.
    fn read_dirty(
        &self,
        range: IovaRange,
        page_size: u64,
        bitmap: &mut [u64],
        clear: bool,
    ) -> Result<(), DeviceError> {
        let e = |errno, rule| DeviceError::new(DeviceOp::ReadDirty, errno, rule);
        // check_add_overflow(iova, length - 1): length 0 wraps to 2^64 - 1.
        if range
            .iova
            .checked_add(range.length.wrapping_sub(1))
            .is_none()
        {
            return Err(e(Errno::EOVERFLOW, Rule::ReportOverflow { range }));
        }
        if range.length == 0 {
            return Err(e(
                Errno::EINVAL,
                Rule::IovaRange {
                    range,
                    page_size: IOMMU_PAGE,
                },
            ));
        }
        // `last + 1` wraps to 0 at the top of the space, which every mask passes.
        let end = range.iova.wrapping_add(range.length);
        let misaligned =
            |g: u64| range.iova & g.wrapping_sub(1) != 0 || end & g.wrapping_sub(1) != 0;
        if misaligned(IOMMU_PAGE) {
            return Err(e(
                Errno::EINVAL,
                Rule::IovaRange {
                    range,
                    page_size: IOMMU_PAGE,
                },
            ));
        }
        if page_size == 0 || misaligned(page_size) {
            return Err(e(Errno::EINVAL, Rule::IovaRange { range, page_size }));
        }
        // iova_bitmap_alloc: pgshift = __ffs(page_size).
        let ps = page_size.trailing_zeros();
        check_bitmap(DeviceOp::ReadDirty, range, 1 << ps, bitmap)?;
        if let Some(errno) = self.take_read_fault() {
            return Err(e(errno, Rule::Injected));
        }
        if self.type1_reads && !clear {
            return Err(e(
                Errno::EOPNOTSUPP,
                Rule::Unsupported {
                    what: "type1 GET_BITMAP without clearing",
                },
            ));
        }
        if !self.is_tracking() {
            // The driver refuses, iommu_read_and_clear_dirty drops the error.
            return Ok(());
        }
        let (rs, re) = (range.iova as u128, range.end());
        let areas = self.areas.read().unwrap_or_else(PoisonError::into_inner);
        // iopt_area_contig_init: the area holding iova, or nothing at all.
        let mut i = areas.partition_point(|a| a.range.end() <= rs);
        let mut cur = rs;
        while cur < re {
            let Some(a) = areas.get(i).filter(|a| a.range.contains(cur as u64)) else {
                // iopt_area_contig_next found a hole: stop, error discarded.
                break;
            };
            let s = a.range.iova as u128;
            let k0 = ((cur - s) >> SHIFT) as u64;
            let k1 = ((re.min(a.range.end()) - 1 - s) >> SHIFT) as u64;
            // Each dirty IOMMU page sets every bitmap bit it overlaps (a page larger than
            // `page_size` replicates, smaller ones fold onto one bit).
            a.bits
                .visit_range(k0, k1 - k0 + 1, clear, |k| {
                    let addr = s + ((k as u128) << SHIFT);
                    let b0 = ((addr - rs) >> ps) as u64;
                    let b1 = ((addr + IOMMU_PAGE as u128 - 1 - rs) >> ps) as u64;
                    fill_range(bitmap, b0, b1 - b0 + 1);
                })
                .expect("pages clipped to the area");
            cur = a.range.end();
            i += 1;
        }
        Ok(())
    }

    fn clears_on_every_read(&self) -> bool {
        self.type1_reads
    }

    fn mapped_areas(&self) -> Option<Vec<IovaRange>> {
        Some(self.mapped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const K4: u64 = 4096;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange::new(iova, length)
    }

    fn read(m: &EmulatedIommu, range: IovaRange, ps: u64, clear: bool) -> Vec<u64> {
        let mut bm = vec![0u64; (range.length / ps).div_ceil(64) as usize];
        m.read_dirty(range, ps, &mut bm, clear).unwrap();
        bm
    }

    #[test]
    fn map_rules() {
        let m = EmulatedIommu::new(&[r(0, 16 * K4)]).unwrap();
        assert_eq!(m.map(r(K4, K4)), Err(IommuMapError::Overlap(r(K4, K4))));
        assert_eq!(m.map(r(1, K4)), Err(IommuMapError::Misaligned(r(1, K4))));
        assert_eq!(
            m.map(r(0x10_0000, 0)),
            Err(IommuMapError::Misaligned(r(0x10_0000, 0)))
        );
        m.map(r(32 * K4, K4)).unwrap();
        assert_eq!(m.mapped(), [r(0, 16 * K4), r(32 * K4, K4)]);
        assert!(matches!(
            m.unmap(r(0, K4)),
            Err(IommuMapError::PartialArea { .. })
        ));
        assert_eq!(m.unmap(r(0, 16 * K4)), Ok(16 * K4));
        assert_eq!(m.mapped(), [r(32 * K4, K4)]);
    }

    #[test]
    fn tracking_clear_and_no_clear() {
        let m = EmulatedIommu::new(&[r(0, 64 * K4)]).unwrap();
        m.dma_write(0, 1);
        assert_eq!(m.dirty_pages(), 0, "tracking off: nothing logged");
        m.set_tracking(true).unwrap();
        m.dma_write(3 * K4 + 5, K4); // pages 3 and 4
        m.dma_write(100 * K4, 1); // unmapped
        assert_eq!(m.faults(), 1);
        let range = r(0, 64 * K4);
        assert_eq!(read(&m, range, K4, false), [0b11000]);
        assert_eq!(read(&m, range, K4, false), [0b11000], "NO_CLEAR keeps bits");
        // 8 KiB pages: pages 3,4 -> bits 1,2.
        assert_eq!(read(&m, range, 2 * K4, true), [0b110]);
        assert_eq!(read(&m, range, K4, true), [0]);
        // A partial read clears only its part.
        m.dma_write(0, 2 * K4);
        assert_eq!(read(&m, r(0, K4), K4, true), [1]);
        assert_eq!(read(&m, range, K4, false), [0b10]);
        // Enabling again starts from a clean snapshot.
        m.set_tracking(true).unwrap();
        assert_eq!(m.dirty_pages(), 0);
    }

    #[test]
    fn read_errors() {
        let m = EmulatedIommu::new(&[r(0, 64 * K4)]).unwrap();
        let mut bm = [0u64; 4];
        let errno =
            |range, ps, bm: &mut [u64]| m.read_dirty(range, ps, bm, true).unwrap_err().errno;
        assert_eq!(
            errno(r(u64::MAX - K4 + 1, 2 * K4), K4, &mut bm),
            Errno::EOVERFLOW
        );
        assert_eq!(errno(r(512, K4), K4, &mut bm), Errno::EINVAL);
        assert_eq!(errno(r(0, K4), 0, &mut bm), Errno::EINVAL);
        assert_eq!(errno(r(K4, 2 * K4), 2 * K4, &mut bm), Errno::EINVAL);
        assert_eq!(errno(r(0, 0), K4, &mut bm), Errno::EINVAL);
        assert_eq!(
            errno(r(0, 64 * 64 * K4 + K4), K4, &mut bm),
            Errno::EINVAL,
            "bitmap too small"
        );
        // The last page of the space is addressable (last == u64::MAX).
        let top = r(u64::MAX - K4 + 1, K4);
        m.map(top).unwrap();
        m.set_tracking(true).unwrap();
        m.dma_write(u64::MAX, 1);
        assert_eq!(read(&m, top, K4, true), [1]);
        // An unmapped iova reads nothing, and is no error.
        assert_eq!(read(&m, r(1 << 40, K4), K4, true), [0]);
        m.fail_read(1, Errno::EIO);
        assert_eq!(errno(r(0, K4), K4, &mut bm), Errno::EIO);
        m.fail_set_tracking(Some(Errno::EOPNOTSUPP));
        assert_eq!(m.set_tracking(true).unwrap_err().errno, Errno::EOPNOTSUPP);
    }

    /// `iopt_area_contig_init` / `iopt_area_contig_next`: the walk stops at the first
    /// unmapped hole; the error is discarded (`iommu_read_and_clear_dirty`), the read
    /// returns 0, and nothing after the hole is reported or cleared.
    #[test]
    fn iopt_area_contig_next_stops_at_hole() {
        // Two touching areas (contiguous: one walk), a hole, a third area.
        let m = EmulatedIommu::new(&[r(0, 4 * K4), r(4 * K4, 4 * K4), r(16 * K4, 4 * K4)]).unwrap();
        m.set_tracking(true).unwrap();
        for p in [1, 5, 17] {
            m.dma_write(p * K4, 1);
        }
        assert_eq!(read(&m, r(0, 20 * K4), K4, true), [0b10_0010]);
        assert_eq!(
            m.dirty_pages(),
            1,
            "page 17, after the hole, neither read nor cleared"
        );
        // Read from the far side, the page is there.
        assert_eq!(read(&m, r(16 * K4, 4 * K4), K4, true), [0b10]);
        // A read starting in the hole reads nothing at all.
        m.dma_write(17 * K4, 1);
        assert_eq!(read(&m, r(12 * K4, 8 * K4), K4, true), [0]);
        assert_eq!(m.dirty_pages(), 1);
    }

    /// `iommufd_check_iova_range`: EOVERFLOW from `check_add_overflow(iova, length - 1)`,
    /// so length 0 at a non-zero iova; the page size is checked as a mask, not as a power
    /// of two, and the bitmap then counts in its lowest set bit (`__ffs`).
    #[test]
    fn iommufd_check_iova_range_masks_and_overflow() {
        let m = EmulatedIommu::new(&[r(0, 64 * K4)]).unwrap();
        m.set_tracking(true).unwrap();
        let mut bm = [0u64; 4];
        let errno =
            |range, ps, bm: &mut [u64]| m.read_dirty(range, ps, bm, true).map_err(|e| e.errno);
        assert_eq!(errno(r(K4, 0), K4, &mut bm), Err(Errno::EOVERFLOW));
        assert_eq!(errno(r(0, 0), K4, &mut bm), Err(Errno::EINVAL));
        // 12 KiB = 0x3000: the mask 0x2fff (bits 0-11 and 13) refuses iova 0x2000,
        // passes 0x4000..0x10000.
        assert_eq!(
            errno(r(2 * K4, 3 * K4), 3 * K4, &mut bm),
            Err(Errno::EINVAL)
        );
        m.dma_write(5 * K4, 1);
        let mut bm = [0u64; 1];
        assert_eq!(errno(r(4 * K4, 12 * K4), 3 * K4, &mut bm), Ok(()));
        assert_eq!(bm, [0b10], "4 KiB bits: __ffs(0x3000) = 12");
    }

    /// With tracking disabled the driver's `read_and_clear_dirty` fails and iommufd drops
    /// the error: 0, no bits, nothing cleared.
    #[test]
    fn read_and_clear_dirty_after_disable_reads_nothing() {
        let m = EmulatedIommu::new(&[r(0, 64 * K4)]).unwrap();
        m.set_tracking(true).unwrap();
        m.dma_write(3 * K4, 1);
        m.set_tracking(false).unwrap();
        assert_eq!(read(&m, r(0, 64 * K4), K4, true), [0]);
        assert_eq!(m.dirty_pages(), 1, "not cleared either");
    }

    proptest! {
        /// Against a page-set oracle: reads with and without clear, at 4 and 8 KiB.
        #[test]
        fn matches_oracle(
            writes in proptest::collection::vec((0u64..80, 1u64..3 * K4), 0..20),
            reads in proptest::collection::vec((0u64..40, 1u64..40, any::<bool>(), any::<bool>()), 1..10),
        ) {
            let areas = [r(0, 32 * K4), r(48 * K4, 16 * K4)];
            let m = EmulatedIommu::new(&areas).unwrap();
            m.set_tracking(true).unwrap();
            let mut oracle = BTreeSet::new();
            let mapped = |p: u64| areas.iter().any(|a| a.contains(p * K4));
            for (i, &(p, len)) in writes.iter().enumerate() {
                let iova = p * K4 + (i as u64 * 97) % K4;
                m.dma_write(iova, len);
                for q in iova / K4..=(iova + len - 1) / K4 {
                    if mapped(q) { oracle.insert(q); }
                }
            }
            for &(first, n, big, clear) in &reads {
                let ps = if big { 2 * K4 } else { K4 };
                let first = first * 2;
                let range = r(first * K4, n * ps);
                let got = read(&m, range, ps, clear);
                let mut want = vec![0u64; got.len()];
                // The walk covers the mapped pages from `first` up to the first hole.
                let np = (first..first + range.length / K4)
                    .take_while(|&q| mapped(q))
                    .count() as u64;
                for q in first..first + np {
                    if oracle.contains(&q) {
                        let b = (q - first) * K4 / ps;
                        want[(b / 64) as usize] |= 1 << (b % 64);
                    }
                }
                prop_assert_eq!(&got, &want);
                if clear {
                    oracle.retain(|&q| q < first || q >= first + np);
                }
            }
        }
    }
}
