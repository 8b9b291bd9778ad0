//! pds rules, each named after the driver function it mirrors, and the REPORT against a
//! brute-force oracle.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const K4: u64 = 4096;

fn r(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length)
}

fn bits(bm: &[u64]) -> Vec<u64> {
    (0..bm.len() as u64 * 64)
        .filter(|k| bm[(k / 64) as usize] >> (k % 64) & 1 == 1)
        .collect()
}

/// `pds_vfio_dirty_sync` / `pds_vfio_dirty_process_bitmaps`: the offset is rounded up to
/// a byte from the region's start and the length to whole u64 words; every page of those
/// words is acknowledged, and `iova_bitmap_set` drops the ones outside the range.
#[test]
fn pds_vfio_dirty_sync_acknowledges_whole_words() {
    let d = EmulatedDevice::with_profile(DeviceProfile::Pds);
    d.start(K4, &[r(0, 256 * K4)]).unwrap();
    for p in [3, 64, 69, 70, 71, 127, 128] {
        d.dma_write(p * K4, 1);
    }
    // Query page 70 alone: offset 70 pages, rounded up to byte 9, so the word read is
    // pages 72..=135: 127 and 128 are acknowledged and dropped, 70 itself is not read.
    let mut bm = [0u64; 1];
    d.report(r(70 * K4, K4), K4, &mut bm).unwrap();
    assert_eq!(bits(&bm), Vec::<u64>::new());
    // One whole word from a word boundary: 64, 69, 70, 71; 127 is gone.
    let mut bm = [0u64; 1];
    d.report(r(64 * K4, 64 * K4), K4, &mut bm).unwrap();
    assert_eq!(bits(&bm), [0, 5, 6, 7]);
    let mut bm = [0u64; 4];
    d.report(r(0, 256 * K4), K4, &mut bm).unwrap();
    assert_eq!(bits(&bm), [3], "127 and 128 were lost, 3 never read before");
}

/// `pds_vfio_dirty_sync`: `bmp_bytes > region->bmp_bytes` is EINVAL, and so is a length
/// whose floor and ceiling page counts need different whole words.
#[test]
fn pds_vfio_dirty_sync_bitmap_bounds() {
    let limits = DeviceLimits {
        page_count_align: 8,
        ..DeviceLimits::pds_6_6()
    };
    let d = EmulatedDevice::new(limits);
    // 104 pages: a 13-byte bitmap; a REPORT of more than 64 pages needs 16.
    d.start(K4, &[r(0, 104 * K4)]).unwrap();
    let mut bm = [0u64; 2];
    let e = d.report(r(0, 100 * K4), K4, &mut bm).unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(
        matches!(
            e.rule,
            Rule::ReportBitmap {
                bytes: 16,
                max: 13,
                ..
            }
        ),
        "{e}"
    );
    assert!(d.report(r(0, 64 * K4), K4, &mut bm).is_ok());
    assert!(d.report(r(64 * K4, 40 * K4), K4, &mut bm).is_ok());
    // 64 pages and a byte: ceil says two words, floor one.
    let e = d.report(r(0, 64 * K4 + 1), K4, &mut bm).unwrap_err();
    assert!(
        matches!(
            e.rule,
            Rule::ReportBitmap {
                bytes: 8,
                max: 16,
                ..
            }
        ),
        "{e}"
    );
}

/// `pds_vfio_dirty_enable`: EEXIST when the device already tracks, EOPNOTSUPP when it
/// has no regions, one region on 6.6, several on 6.8+; `page_count` is a `u32` and the
/// device may round it; 6.8+ refuses a device bitmap offset off a word; an empty host
/// bitmap is ENOMEM.
#[test]
fn pds_vfio_dirty_enable_rules() {
    let two = [r(0, 64 * K4), r(1 << 30, 64 * K4)];
    let d = EmulatedDevice::with_profile(DeviceProfile::Pds);
    d.set_tracking_elsewhere(true);
    let e = d.start(K4, &two).unwrap_err();
    assert_eq!((e.errno, e.rule), (Errno::EEXIST, Rule::DeviceBusy));
    d.set_tracking_elsewhere(false);
    d.start(K4, &two).unwrap();
    assert_eq!(
        d.tracked_ranges().unwrap(),
        two,
        "6.8+: one region per range"
    );
    // Double start is the driver's first check, before the device status.
    d.set_tracking_elsewhere(true);
    assert_eq!(d.start(K4, &two).unwrap_err().rule, Rule::AlreadyStarted);
    d.stop().unwrap();

    let six = EmulatedDevice::with_profile(DeviceProfile::Pds66);
    six.start(K4, &two).unwrap();
    assert_eq!(
        six.tracked_ranges().unwrap().len(),
        1,
        "6.6 forces one region"
    );

    let none = EmulatedDevice::new(DeviceLimits {
        max_ranges: 0,
        ..DeviceLimits::pds()
    });
    let e = none.start(K4, &two).unwrap_err();
    assert_eq!(
        (e.errno, e.rule),
        (Errno::EOPNOTSUPP, Rule::Start(StartRefusal::NoRegions))
    );

    // Without the firmware's rounding: 100 pages leave the next region's device bitmap
    // at byte 12 (6.8+ EINVAL); 4 pages an empty bitmap (ENOMEM).
    let raw = DeviceLimits {
        page_count_align: 1,
        ..DeviceLimits::pds()
    };
    let e = EmulatedDevice::new(raw)
        .start(K4, &[r(0, 100 * K4), r(1 << 30, 64 * K4)])
        .unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(matches!(
        e.rule,
        Rule::Start(StartRefusal::DeviceBitmapOffset {
            index: 0,
            offset: 12
        })
    ));
    let e = EmulatedDevice::new(raw)
        .start(K4, &[r(0, 4 * K4)])
        .unwrap_err();
    assert_eq!(e.errno, Errno::ENOMEM);

    // 2^32 + 64 pages: the u32 count wraps to 64 and the device tracks 64 pages only.
    let huge = r(0, ((1u64 << 32) + 64) * K4);
    let regions = pds_regions(&DeviceLimits::pds(), K4, &[huge]).unwrap();
    assert_eq!(regions[0].page_count, 64);
    let accepted = check_start(&DeviceLimits::pds(), K4, &[huge]).unwrap();
    assert_eq!(
        accepted.ranges,
        [r(0, 64 * K4)],
        "the rest is logged nowhere"
    );
}

/// Oracle: dirty region pages as a set; a REPORT is the driver's arithmetic written out.
struct Model {
    start: u64,
    size: u64,
    pages: u64,
    bmp_bytes: u64,
    dirty: BTreeSet<u64>,
}

impl Model {
    fn report(&mut self, iova: u64, len: u64, out: &mut [u64]) -> bool {
        if iova < self.start || iova - self.start >= self.size {
            return false;
        }
        let off = iova - self.start;
        if len == 0 || off + len > self.size {
            return false;
        }
        let ceil_bytes = len.div_ceil(K4).div_ceil(64) * 8;
        let floor_bytes = (len / K4).div_ceil(8).div_ceil(8) * 8;
        if floor_bytes != ceil_bytes || floor_bytes > self.bmp_bytes {
            return false;
        }
        let first = (off / K4).div_ceil(8) * 8;
        for k in first..first + floor_bytes * 8 {
            if k < self.pages && self.dirty.remove(&k) {
                let a = self.start + k * K4;
                if a >= iova && a < iova + len {
                    let b = (a - iova) / K4;
                    out[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
        }
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// REPORTs at any offset and length inside the region equal the oracle, errors
    /// included; the caller's bits are kept.
    #[test]
    fn pds_report_matches_oracle(
        npages in 64u64..400,
        acts in prop::collection::vec((any::<bool>(), 0u64..400, 0u64..300), 1..60),
    ) {
        let start = 1u64 << 30;
        let d = EmulatedDevice::with_profile(DeviceProfile::Pds);
        d.start(K4, &[r(start, npages * K4)]).unwrap();
        let g = pds_regions(&DeviceLimits::pds(), K4, &[r(start, npages * K4)]).unwrap()[0];
        let mut m = Model {
            start,
            size: g.size,
            pages: u64::from(g.page_count),
            bmp_bytes: g.bmp_bytes(),
            dirty: BTreeSet::new(),
        };
        for (write, a, n) in acts {
            if write {
                d.dma_write(start + a * K4, 1);
                if a < m.pages {
                    m.dirty.insert(a);
                }
            } else {
                let (iova, len) = (start + a * K4, n * K4);
                let words = crate::range::bitmap_words(len, K4).max(1);
                let mut got = vec![0x8000_0000_0000_0000u64; words];
                let mut want = got.clone();
                let ok = d.report(r(iova, len), K4, &mut got).is_ok();
                prop_assert_eq!(ok, m.report(iova, len, &mut want));
                prop_assert_eq!(got, want);
            }
        }
    }
}

/// Negative control: REPORTing each planned range (what a tracker that ignores the
/// granule does) loses a neighbour's dirt on pds: the word around a range's edge is
/// acknowledged, and the page outside the range dropped. Querying whole words from the
/// region's start (the stated granule) loses nothing.
#[test]
fn per_range_report_on_pds_loses_dirt() {
    // One region (6.6) over two ranges with a 16-page gap; the device merged them.
    let ranges = [r(0, 40 * K4), r(56 * K4, 72 * K4)];
    let write_all = |d: &EmulatedDevice| {
        for p in [5, 39, 56, 60, 100] {
            d.dma_write(p * K4, 1);
        }
    };
    let naive = EmulatedDevice::with_profile(DeviceProfile::Pds66);
    naive.start(K4, &ranges).unwrap();
    write_all(&naive);
    let mut seen = BTreeSet::new();
    for g in &ranges {
        let mut bm = vec![0u64; crate::range::bitmap_words(g.length, K4)];
        naive.report(*g, K4, &mut bm).unwrap();
        seen.extend(bits(&bm).into_iter().map(|k| g.iova / K4 + k));
    }
    // The first range's word (pages 0..64) acknowledged 56 and 60; the second range's
    // query starts at byte 7 (page 56), so never reads them again.
    assert_eq!(
        seen,
        BTreeSet::from([5, 39, 100]),
        "the naive reader lost 56 and 60"
    );

    let whole = EmulatedDevice::with_profile(DeviceProfile::Pds66);
    whole.start(K4, &ranges).unwrap();
    write_all(&whole);
    let ReportGranule::RegionWords { regions, .. } = whole.report_granule() else {
        panic!("pds states whole words")
    };
    let mut seen = BTreeSet::new();
    for g in regions {
        let mut bm = vec![0u64; crate::range::bitmap_words(g.range.length, K4)];
        whole.report(g.range, K4, &mut bm).unwrap();
        seen.extend(bits(&bm).into_iter().map(|k| g.range.iova / K4 + k));
    }
    assert_eq!(seen, BTreeSet::from([5, 39, 56, 60, 100]));
}
