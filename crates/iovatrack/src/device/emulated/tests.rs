use super::*;
use crate::device::MigState;
use crate::plan::limits::{pds_logged, PageSizePolicy};
use proptest::prelude::*;
use std::collections::BTreeSet;

const K4: u64 = 4096;

fn r(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length)
}

#[derive(Clone, Debug)]
enum Op {
    Probe,
    Start(u64, Vec<IovaRange>),
    Report(IovaRange, u64),
    Stop,
}

fn run(d: &EmulatedDevice, op: &Op) -> Result<(), DeviceError> {
    match op {
        Op::Probe => d.probe(),
        Op::Start(ps, ranges) => d.start(*ps, ranges).map(|_| ()),
        Op::Report(range, ps) => {
            let mut bm = vec![0u64; range.length.div_ceil((*ps).max(K4)).div_ceil(64) as usize + 1];
            d.report(*range, *ps, &mut bm)
        }
        Op::Stop => d.stop(),
    }
}

fn mlx5_addr_space(min: u8, max: u8) -> DeviceLimits {
    DeviceLimits {
        addr_space_log2: Some((min, max)),
        ..DeviceLimits::mlx5()
    }
}

/// Every rule of linux-kernel.md §2 (core) and §3 (mlx5, pds): case -> expected errno.
#[test]
fn kernel_rules_table() {
    let g = DeviceLimits::generic();
    let top = u64::MAX - K4 + 1; // last 4 KiB page: iova + length == 2^64
    let many: Vec<IovaRange> = (0..257).map(|i| r(i * 2 * K4, K4)).collect();
    let started = || vec![Op::Start(K4, vec![r(0, 16 * K4), r(64 * K4, 16 * K4)])];
    type Case = (&'static str, DeviceLimits, Vec<Op>, Op, Option<Errno>);
    let cases: Vec<Case> = vec![
        // START, core
        (
            "start: n == 0",
            g,
            vec![],
            Op::Start(K4, vec![]),
            Some(Errno::EINVAL),
        ),
        (
            "start: n > 256",
            g,
            vec![],
            Op::Start(K4, many.clone()),
            Some(Errno::E2BIG),
        ),
        (
            "start: n == 256 ok",
            g,
            vec![],
            Op::Start(K4, many[..256].to_vec()),
            None,
        ),
        (
            "start: E2BIG before per-range checks",
            g,
            vec![],
            Op::Start(K4, (0..300).map(|_| r(1, 1)).collect()),
            Some(Errno::E2BIG),
        ),
        (
            "start: core cap follows kernel page size",
            DeviceLimits {
                core_max_ranges: 1024,
                max_ranges: 1024,
                ..g
            },
            vec![],
            Op::Start(K4, many.clone()),
            None,
        ),
        (
            "start: iova misaligned",
            g,
            vec![],
            Op::Start(K4, vec![r(0x800, K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: length misaligned",
            g,
            vec![],
            Op::Start(K4, vec![r(0, 0x1800)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: page size 0 masks all",
            g,
            vec![],
            Op::Start(0, vec![r(K4, K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: reaching 2^64",
            g,
            vec![],
            Op::Start(K4, vec![r(top, K4)]),
            Some(Errno::EOVERFLOW),
        ),
        (
            "start: wrapping",
            g,
            vec![],
            Op::Start(K4, vec![r(1 << 63, 1 << 63)]),
            Some(Errno::EOVERFLOW),
        ),
        (
            "start: just below 2^64 ok",
            g,
            vec![],
            Op::Start(K4, vec![r(top - K4, K4)]),
            None,
        ),
        (
            "start: first offender decides (misaligned first)",
            g,
            vec![],
            Op::Start(K4, vec![r(0, 0x10), r(top, K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: first offender decides (overflow first)",
            g,
            vec![],
            Op::Start(K4, vec![r(top, K4), r(0, 0x10)]),
            Some(Errno::EOVERFLOW),
        ),
        (
            "start: overlap",
            g,
            vec![],
            Op::Start(K4, vec![r(0, 2 * K4), r(K4, 2 * K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: overlap before a later overflow",
            g,
            vec![],
            Op::Start(K4, vec![r(0, 2 * K4), r(K4, K4), r(top, K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: adjacent ok",
            g,
            vec![],
            Op::Start(K4, vec![r(K4, K4), r(0, K4)]),
            None,
        ),
        (
            "start: zero length at 0 wraps and overlaps",
            g,
            vec![],
            Op::Start(K4, vec![r(8 * K4, K4), r(0, 0)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: zero length refused by device",
            g,
            vec![],
            Op::Start(K4, vec![r(K4, 0)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: twice (driver)",
            g,
            started(),
            Op::Start(K4, vec![r(0, K4)]),
            Some(Errno::EINVAL),
        ),
        (
            "start: after stop ok",
            g,
            [started(), vec![Op::Stop]].concat(),
            Op::Start(K4, vec![r(0, K4)]),
            None,
        ),
        (
            "start: non-pow2 page size unusable",
            g,
            vec![],
            Op::Start(3 * K4, vec![r(0, 3 * K4)]),
            Some(Errno::EINVAL),
        ),
        // REPORT, core then driver
        (
            "report: before start",
            g,
            vec![],
            Op::Report(r(0, K4), K4),
            Some(Errno::EINVAL),
        ),
        (
            "report: page size 2048",
            g,
            started(),
            Op::Report(r(0, K4), 2048),
            Some(Errno::EINVAL),
        ),
        (
            "report: page size 12288",
            g,
            started(),
            Op::Report(r(0, 3 * K4), 3 * K4),
            Some(Errno::EINVAL),
        ),
        (
            "report: page size 0",
            g,
            started(),
            Op::Report(r(0, K4), 0),
            Some(Errno::EINVAL),
        ),
        (
            "report: overflow",
            g,
            started(),
            Op::Report(r(top, K4), K4),
            Some(Errno::EOVERFLOW),
        ),
        (
            "report: overflow checked before started",
            g,
            vec![],
            Op::Report(r(top, K4), K4),
            Some(Errno::EOVERFLOW),
        ),
        (
            "report: other page size ok",
            g,
            started(),
            Op::Report(r(0, 1 << 21), 1 << 21),
            None,
        ),
        (
            "report: unaligned and outside ok",
            g,
            started(),
            Op::Report(r(0x123, 1 << 30), K4),
            None,
        ),
        (
            "report: zero length ok (core)",
            g,
            started(),
            Op::Report(r(0, 0), K4),
            None,
        ),
        (
            "report: after stop",
            g,
            [started(), vec![Op::Stop]].concat(),
            Op::Report(r(0, K4), K4),
            Some(Errno::EINVAL),
        ),
        // STOP
        ("stop: without start", g, vec![], Op::Stop, None),
        (
            "stop: twice",
            g,
            [started(), vec![Op::Stop]].concat(),
            Op::Stop,
            None,
        ),
        // mlx5
        (
            "mlx5: total above 2^42",
            DeviceLimits::mlx5(),
            vec![],
            Op::Start(1 << 21, vec![r(0, (1 << 42) + (1 << 21))]),
            Some(Errno::EOPNOTSUPP),
        ),
        (
            "mlx5: total exactly 2^42 ok",
            DeviceLimits::mlx5(),
            vec![],
            Op::Start(1 << 30, vec![r(0, 1 << 41), r(1 << 43, 1 << 41)]),
            None,
        ),
        (
            "mlx5: merge adds gaps to the total",
            mlx5_addr_space(12, 30),
            vec![],
            // 5 ranges of 4 KiB (total 2^15 alone), 4 max: the leftmost smallest gap closes
            // and the total becomes 2^30 + 16 KiB, rounded up to 2^31.
            Op::Start(
                K4,
                vec![
                    r(0, K4),
                    r(1 << 30, K4),
                    r(1 << 31, K4),
                    r(1 << 32, K4),
                    r(1 << 33, K4),
                ],
            ),
            Some(Errno::EOPNOTSUPP),
        ),
        (
            "mlx5: total below minimum",
            mlx5_addr_space(20, 30),
            vec![],
            Op::Start(K4, vec![r(0, K4)]),
            Some(Errno::EOPNOTSUPP),
        ),
        (
            "mlx5: core checks first",
            DeviceLimits::mlx5(),
            vec![],
            Op::Start(K4, vec![r(0, 0x10)]),
            Some(Errno::EINVAL),
        ),
        (
            "mlx5: report outside ok",
            DeviceLimits::mlx5(),
            started(),
            Op::Report(r(1 << 40, K4), K4),
            None,
        ),
        // pds
        (
            "pds: report inside region",
            DeviceLimits::pds(),
            started(),
            Op::Report(r(K4, 15 * K4), K4),
            None,
        ),
        // 6.8+: the region is `page_count * page_size`, and the firmware rounds the 16
        // pages up to a word: regions [0, 64) and [64, 128) pages.
        (
            "pds: report outside any region",
            DeviceLimits::pds(),
            started(),
            Op::Report(r(128 * K4, K4), K4),
            Some(Errno::EINVAL),
        ),
        (
            "pds: report crossing a region",
            DeviceLimits::pds(),
            started(),
            Op::Report(r(0, 65 * K4), K4),
            Some(Errno::EINVAL),
        ),
        // 6.6 merges into one region and keeps its length, 80 pages, as the size.
        (
            "pds 6.6: report crossing a region",
            DeviceLimits::pds_6_6(),
            started(),
            Op::Report(r(0, 81 * K4), K4),
            Some(Errno::EINVAL),
        ),
        (
            "pds 6.6: report inside the merged gap",
            DeviceLimits::pds_6_6(),
            started(),
            Op::Report(r(32 * K4, K4), K4),
            None,
        ),
        (
            "pds: report zero length",
            DeviceLimits::pds(),
            started(),
            Op::Report(r(0, 0), K4),
            Some(Errno::EINVAL),
        ),
        (
            "pds: report before start",
            DeviceLimits::pds(),
            vec![],
            Op::Report(r(0, K4), K4),
            Some(Errno::EINVAL),
        ),
        (
            "pds: page size check before region",
            DeviceLimits::pds(),
            started(),
            Op::Report(r(32 * K4, K4), 2048),
            Some(Errno::EINVAL),
        ),
    ];
    for (name, limits, pre, op, want) in cases {
        let d = EmulatedDevice::new(limits).max_log_bytes(1 << 30);
        for p in &pre {
            run(&d, p).unwrap_or_else(|e| panic!("{name}: setup {p:?} failed: {e}"));
        }
        let got = run(&d, &op);
        assert_eq!(got.as_ref().err().map(|e| e.errno), want, "{name}: {got:?}");
        if let Err(e) = got {
            assert!(!e.to_string().is_empty());
        }
    }
    // Without logging support every operation is ENOTTY, STOP included (core check).
    let d = EmulatedDevice::new(g).without_logging();
    for op in [
        Op::Probe,
        Op::Start(K4, vec![r(0, K4)]),
        Op::Report(r(0, K4), K4),
        Op::Stop,
    ] {
        assert_eq!(run(&d, &op).unwrap_err().errno, Errno::ENOTTY, "{op:?}");
    }
}

#[test]
fn rule_details_name_the_offender() {
    let d = EmulatedDevice::new(DeviceLimits::generic());
    let e = d
        .start(K4, &[r(0, K4), r(8 * K4, K4), r(0x3800, K4)])
        .unwrap_err();
    assert_eq!(
        e.rule,
        Rule::Start(StartRefusal::Misaligned {
            index: 2,
            range: r(0x3800, K4),
            page_size: K4
        })
    );
    assert_eq!(
        e.to_string(),
        "DMA_LOGGING_START: EINVAL: range 2 [0x3800, 0x47ff] not aligned to page size 0x1000"
    );
    let e = d
        .start(K4, &[r(0, 4 * K4), r(8 * K4, K4), r(3 * K4, K4)])
        .unwrap_err();
    assert_eq!(
        e.rule,
        Rule::Start(StartRefusal::Overlap {
            index: 2,
            range: r(3 * K4, K4),
            other: 0
        })
    );
    let e = d.start(K4, &[]).unwrap_err();
    assert_eq!(
        (e.op, e.rule),
        (DeviceOp::Start, Rule::Start(StartRefusal::NoRanges))
    );
}

#[test]
fn mlx5_page_size_merge_and_write_back() {
    let d = EmulatedDevice::with_profile(DeviceProfile::Mlx5);
    let ranges: Vec<_> = [0u64, 10, 12, 40, 41, 100]
        .iter()
        .map(|&p| r(p * 0x10000, 0x8000))
        .collect();
    // 12288 floors to 8192; ranges are 64 KiB aligned so they stay aligned.
    assert_eq!(d.start(12288, &ranges).unwrap(), 8192);
    assert_eq!(d.page_size(), Some(8192));
    let tracked = d.tracked_ranges().unwrap();
    assert_eq!(tracked, combine(&ranges, 4));
    assert_eq!(tracked.len(), 4);
    d.stop().unwrap();
    assert_eq!(d.start(512, &ranges[..1]).unwrap(), 4096);
    d.stop().unwrap();
    assert_eq!(d.start(1 << 40, &[r(0, 1 << 40)]).unwrap(), 1 << 30);
    d.stop().unwrap();
    // pds keeps the page size and merges to its regions.
    let limits = DeviceLimits {
        max_ranges: 2,
        ..DeviceLimits::pds()
    };
    let p = EmulatedDevice::new(limits);
    assert_eq!(p.start(8192, &ranges).unwrap(), 8192);
    // Each region is as many pages as the firmware rounds its page count up to.
    let merged = combine(&ranges, 2);
    let regions = pds_regions(&limits, 8192, &merged).unwrap();
    let logged = p.tracked_ranges().unwrap();
    assert_eq!(logged, pds_logged(&regions, 8192));
    for (l, m) in logged.iter().zip(&merged) {
        assert!(l.iova == m.iova && l.end() >= m.end(), "{l} covers {m}");
    }
}

#[test]
fn faults_and_memory() {
    let d = EmulatedDevice::new(DeviceLimits::generic());
    d.refuse_start(Errno::E2BIG, Some(2));
    let three = [r(0, K4), r(4 * K4, K4), r(8 * K4, K4)];
    let e = d.start(K4, &three).unwrap_err();
    assert_eq!((e.errno, e.rule), (Errno::E2BIG, Rule::Injected));
    // Core checks still come first.
    assert_eq!(d.start(K4, &[]).unwrap_err().errno, Errno::EINVAL);
    d.start(K4, &three[..2]).unwrap();
    d.fail_report(2, Errno::EIO);
    let mut bm = [0u64; 1];
    d.dma_write(0, 1);
    d.report(r(0, K4), K4, &mut bm).unwrap();
    assert_eq!(bm[0], 1);
    d.dma_write(0, 1);
    let e = d.report(r(0, K4), K4, &mut bm).unwrap_err();
    assert_eq!((e.errno, e.rule), (Errno::EIO, Rule::Injected));
    bm[0] = 0;
    d.report(r(0, K4), K4, &mut bm).unwrap(); // one-shot; the failed report cleared nothing
    assert_eq!(bm[0], 1);
    d.stop().unwrap();
    d.clear_faults();
    d.start(K4, &three).unwrap();
    d.stop().unwrap();
    let small = EmulatedDevice::new(DeviceLimits::generic()).max_log_bytes(8);
    assert!(small.start(K4, &[r(0, 64 * K4)]).is_ok());
    small.stop().unwrap();
    let e = small.start(K4, &[r(0, 65 * K4)]).unwrap_err();
    assert_eq!(e.errno, Errno::ENOMEM);
    // A huge range the core accepts is refused with ENOMEM, not an abort.
    let e = EmulatedDevice::new(DeviceLimits::generic())
        .start(K4, &[r(0, 1 << 62)])
        .unwrap_err();
    assert_eq!(e.errno, Errno::ENOMEM);
}

#[test]
fn report_bits_fold_replicate_clamp_and_or() {
    let d = EmulatedDevice::new(DeviceLimits::generic());
    d.start(K4, &[r(0, 1 << 21)]).unwrap();
    d.dma_write(5 * K4 + 7, 1);
    d.dma_write(20 * K4 - 1, 2); // pages 19 and 20
                                 // Fold to 64 KiB: pages 5 -> bit 0, 19 and 20 -> bit 1; the caller's bit 7 is kept.
    let mut bm = [1u64 << 7];
    d.report(r(0, 1 << 21), 1 << 16, &mut bm).unwrap();
    assert_eq!(bm[0], (1 << 7) | 0b11);
    // Cleared: a second report is empty.
    let mut bm = [0u64];
    d.report(r(0, 1 << 21), 1 << 16, &mut bm).unwrap();
    assert_eq!(bm[0], 0);
    // Clears only the queried range.
    d.dma_write(K4, 1);
    d.dma_write(100 * K4, 1);
    let mut bm = [0u64; 1];
    d.report(r(0, 64 * K4), K4, &mut bm).unwrap();
    assert_eq!(bm[0], 1 << 1);
    let mut bm = [0u64; 1];
    d.report(r(64 * K4, 64 * K4), K4, &mut bm).unwrap();
    assert_eq!(bm[0], 1 << 36);
    d.stop().unwrap();

    // Replication: a 2 MiB device page sets 512 bits at 4 KiB, clamped to the report range.
    let big = EmulatedDevice::new(DeviceLimits {
        page_size: PageSizePolicy::FloorClamp {
            min_log2: 21,
            max_log2: 21,
        },
        ..DeviceLimits::mlx5()
    });
    assert_eq!(big.start(K4, &[r(0, 4 << 20)]).unwrap(), 2 << 20);
    big.dma_write((2 << 20) + 5, 1);
    let mut bm = vec![0u64; 8];
    // Report [1 MiB + 4 KiB, 3 MiB + 4 KiB): device page [2 MiB, 4 MiB) covers bits 255..=511.
    big.report(r((1 << 20) + K4, 2 << 20), K4, &mut bm).unwrap();
    let set: Vec<u64> = (0..512)
        .filter(|k| bm[*k as usize / 64] >> (k % 64) & 1 == 1)
        .collect();
    assert_eq!(set, (255..512).collect::<Vec<_>>());
    // The device page was only partly queried, yet acknowledged whole: the part past
    // the report's end is gone (mlx5 reports device pages, not bytes).
    let mut bm = vec![0u64; 8];
    big.report(r(2 << 20, 2 << 20), K4, &mut bm).unwrap();
    assert!(bm.iter().all(|w| *w == 0));
}

/// `iova_bitmap_set` cannot index a dirty span that starts below the REPORT's iova: the
/// device has acknowledged the page, the core drops it. mlx5 rounds the page size up, so a
/// range's start need not be a device page's; querying from there loses the page.
#[test]
fn iova_bitmap_set_drops_pages_below_report_iova() {
    let m2 = 2u64 << 20;
    let d = EmulatedDevice::new(DeviceLimits {
        page_size: PageSizePolicy::FloorClamp {
            min_log2: 21,
            max_log2: 21,
        },
        ..DeviceLimits::mlx5()
    });
    assert_eq!(d.start(K4, &[r(0, 2 * m2)]).unwrap(), m2);
    // A write at the very end of the first device page, a report from its middle.
    d.dma_write(m2 - 1, 1);
    let mut bm = vec![0u64; 4];
    d.report(r(m2 / 2, m2 / 2), K4, &mut bm).unwrap();
    assert!(bm.iter().all(|w| *w == 0), "dropped: starts below the iova");
    let mut bm = vec![0u64; 8];
    d.report(r(0, m2), K4, &mut bm).unwrap();
    assert!(
        bm.iter().all(|w| *w == 0),
        "and acknowledged: lost for good"
    );
    // Queried from its start, the same write is reported.
    d.dma_write(m2 - 1, 1);
    let mut bm = vec![0u64; 8];
    d.report(r(0, m2), K4, &mut bm).unwrap();
    assert_eq!(bm.iter().map(|w| w.count_ones()).sum::<u32>(), 512);
}

/// `mlx5vf_tracker_read_and_clear`: once a REPORT failed (`tracker->is_err`), every
/// REPORT is EIO until STOP and a new START; the injected failure sticks on mlx5 only.
#[test]
fn mlx5vf_tracker_read_and_clear_error_sticks() {
    let d = EmulatedDevice::with_profile(DeviceProfile::Mlx5);
    d.start(K4, &[r(0, 64 * K4)]).unwrap();
    d.fail_report(1, Errno::ENOMEM);
    let mut bm = [0u64; 1];
    let e = d.report(r(0, 64 * K4), K4, &mut bm).unwrap_err();
    assert_eq!((e.errno, e.rule), (Errno::ENOMEM, Rule::Injected));
    for _ in 0..3 {
        let e = d.report(r(0, 64 * K4), K4, &mut bm).unwrap_err();
        assert_eq!((e.errno, e.rule), (Errno::EIO, Rule::TrackerError));
    }
    d.stop().unwrap();
    d.start(K4, &[r(0, 64 * K4)]).unwrap();
    d.dma_write(0, 1);
    d.report(r(0, 64 * K4), K4, &mut bm).unwrap();
    assert_eq!(bm, [1]);
    // The generic device's injected failure is one-shot.
    let g = EmulatedDevice::new(DeviceLimits::generic());
    g.start(K4, &[r(0, 64 * K4)]).unwrap();
    g.fail_report(1, Errno::EIO);
    assert!(g.report(r(0, 64 * K4), K4, &mut bm).is_err());
    assert!(g.report(r(0, 64 * K4), K4, &mut bm).is_ok());
}

/// The DMA-able regions of a small guest, and the writes a device makes into them.
fn guest_regions() -> Vec<IovaRange> {
    vec![r(0, 640 << 10), r(1 << 20, 63 << 20), r(4 << 30, 64 << 20)]
}

#[test]
fn plan_missing_a_region_loses_writes() {
    let regions = guest_regions();
    let writes: Vec<(u64, u64)> = regions
        .iter()
        .flat_map(|g| (0..50u64).map(move |i| (g.iova + (i * 7919 * K4) % g.length, 100)))
        .collect();
    // A plan without the high region (QEMU-like 32-bit bucket only).
    let partial = EmulatedDevice::new(DeviceLimits::generic());
    partial.start(K4, &regions[..2]).unwrap();
    for &(a, l) in &writes {
        partial.dma_write(a, l);
    }
    assert_eq!(partial.untracked_writes(), 50);
    assert_eq!(partial.untracked_pages(), 50);
    // A full plan loses nothing, and every write is reported.
    let full = EmulatedDevice::new(DeviceLimits::generic());
    full.start(K4, &regions).unwrap();
    for &(a, l) in &writes {
        full.dma_write(a, l);
    }
    assert_eq!((full.untracked_writes(), full.untracked_pages()), (0, 0));
    let mut seen = 0;
    for g in &regions {
        let mut bm = vec![0u64; crate::range::bitmap_words(g.length, K4)];
        full.report(*g, K4, &mut bm).unwrap();
        seen += bm.iter().map(|w| w.count_ones()).sum::<u32>();
    }
    assert_eq!(seen, 150);
    // Writes straddling a tracked edge count only their outside pages; logging off counts
    // nothing.
    full.dma_write((640 << 10) - 1, 2 * K4);
    assert_eq!((full.untracked_writes(), full.untracked_pages()), (1, 2));
    full.stop().unwrap();
    full.dma_write(8 << 30, K4);
    assert_eq!(full.untracked_writes(), 1);
}

/// Oracle: dirty device pages as a set, reports computed by the iova_bitmap_set formula.
struct Model {
    shift: u32,
    regions: Vec<IovaRange>,
    dirty: BTreeSet<u64>,
    lost_pages: u64,
}

impl Model {
    fn write(&mut self, a: u64, len: u64) {
        let end = a as u128 + len as u128;
        let mut lost = BTreeSet::new();
        // Byte intervals inside / outside the regions, by a sweep over sorted region edges.
        let mut cur = a as u128;
        for g in &self.regions {
            let (gs, ge) = (g.iova as u128, g.end());
            if ge <= cur || gs >= end {
                continue;
            }
            if gs > cur {
                lost.extend((cur >> self.shift)..=((gs - 1) >> self.shift));
            }
            let (s, e) = (cur.max(gs), end.min(ge));
            self.dirty
                .extend(((s >> self.shift) as u64)..=(((e - 1) >> self.shift) as u64));
            cur = e;
        }
        if cur < end {
            lost.extend((cur >> self.shift)..=((end - 1) >> self.shift));
        }
        self.lost_pages += lost.len() as u64;
    }

    fn report(&mut self, rg: IovaRange, ps: u64, bm: &mut [u64]) {
        let (rs, re) = (rg.iova as u128, rg.end());
        if rs == re {
            return;
        }
        let mut cleared = Vec::new();
        for &p in &self.dirty {
            let (us, ue) = ((p as u128) << self.shift, ((p as u128) + 1) << self.shift);
            if ue <= rs || us >= re {
                continue;
            }
            // Every touched device page is acknowledged; iova_bitmap_set drops one that
            // starts below the report.
            cleared.push(p);
            if us < rs {
                continue;
            }
            let k0 = (us - rs) / ps as u128;
            let k1 = (ue.min(re) - 1 - rs) / ps as u128;
            for k in k0..=k1 {
                bm[(k / 64) as usize] |= 1 << (k % 64);
            }
        }
        for p in cleared {
            self.dirty.remove(&p);
        }
    }
}

fn disjoint_ranges() -> impl Strategy<Value = Vec<IovaRange>> {
    prop::collection::vec((0u64..512, 1u64..64), 1..6).prop_map(|v| {
        let mut out: Vec<IovaRange> = Vec::new();
        for (p, n) in v {
            let c = r(p * K4, n * K4);
            if out.iter().all(|o| !o.overlaps(&c)) {
                out.push(c);
            }
        }
        out
    })
}

#[derive(Clone, Debug)]
enum Act {
    Write(u64, u64),
    Report(u64, u64, u32, u64),
}

fn acts() -> impl Strategy<Value = Vec<Act>> {
    let w = (0u64..620 * K4, 1u64..20_000).prop_map(|(a, l)| Act::Write(a, l));
    let rep = (0u64..620 * K4, 0u64..400_000, 12u32..18, any::<u64>())
        .prop_map(|(a, l, s, fill)| Act::Report(a, l, s, fill));
    prop::collection::vec(prop_oneof![3 => w, 1 => rep], 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Reports equal the brute-force model, for any device page size (clamped up or not),
    /// any report page size and alignment, with the caller's bits preserved.
    #[test]
    fn reports_match_model(ranges in disjoint_ranges(), min_log2 in 12u8..17, acts in acts()) {
        let limits = DeviceLimits {
            page_size: PageSizePolicy::FloorClamp { min_log2, max_log2: 30 },
            max_ranges: 3,
            addr_space_log2: None,
            ..DeviceLimits::mlx5()
        };
        let d = EmulatedDevice::new(limits);
        let ps = d.start(K4, &ranges).unwrap();
        prop_assert_eq!(ps, 1u64 << min_log2);
        let mut m = Model {
            shift: ps.trailing_zeros(),
            regions: d.tracked_ranges().unwrap(),
            dirty: BTreeSet::new(),
            lost_pages: 0,
        };
        let mut sorted = ranges.clone();
        sorted.sort();
        prop_assert_eq!(&m.regions, &combine(&sorted, 3));
        for act in acts {
            match act {
                Act::Write(a, l) => {
                    d.dma_write(a, l);
                    m.write(a, l);
                }
                Act::Report(a, l, s, fill) => {
                    let rps = 1u64 << s;
                    let words = crate::range::bitmap_words(l, rps);
                    let mut got = vec![fill; words];
                    let mut want = got.clone();
                    d.report(r(a, l), rps, &mut got).unwrap();
                    m.report(r(a, l), rps, &mut want);
                    prop_assert_eq!(got, want);
                }
            }
        }
        prop_assert_eq!(d.untracked_pages(), m.lost_pages);
        // Everything left is reported by one report over all.
        let all = r(0, 1 << 30);
        let mut got = vec![0; crate::range::bitmap_words(all.length, K4)];
        let mut want = got.clone();
        d.report(all, K4, &mut got).unwrap();
        m.report(all, K4, &mut want);
        prop_assert_eq!(got, want);
    }
}

/// 8 writers hammer the device while a reporter reads and clears in a loop. Oracle: the
/// reporter bumps a SeqCst round counter before each report; a writer notes the round
/// before (`b`) and after (`a`) its `dma_write`. Its page must appear in some report
/// `k` in `b..=a + 1` (none lost), and every reported (round, page) must be explained by
/// such a write (none invented).
#[test]
fn concurrent_writers_and_reporter_lose_and_invent_nothing() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    const WRITERS: u64 = 8;
    const WRITES: u64 = 4000;
    let ranges = vec![
        r(0, 256 * K4),
        r(1024 * K4, 512 * K4),
        r(4096 * K4, 128 * K4),
    ];
    let dev = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
    dev.start(K4, &ranges).unwrap();
    let round = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let reporter = {
        let (dev, round, done, ranges) = (dev.clone(), round.clone(), done.clone(), ranges.clone());
        std::thread::spawn(move || {
            let mut bitmaps: Vec<Vec<u64>> = ranges
                .iter()
                .map(|g| vec![0; crate::range::bitmap_words(g.length, K4)])
                .collect();
            let mut seen: Vec<(u64, u64)> = Vec::new(); // (round, page)
            let mut k = 0;
            loop {
                let last = done.load(Ordering::SeqCst);
                k += 1;
                round.store(k, Ordering::SeqCst);
                for (g, bm) in ranges.iter().zip(bitmaps.iter_mut()) {
                    bm.fill(0);
                    dev.report(*g, K4, bm).unwrap();
                    for (w, &word) in bm.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let b = bits.trailing_zeros() as u64;
                            bits &= bits - 1;
                            seen.push((k, g.iova / K4 + w as u64 * 64 + b));
                        }
                    }
                }
                if last {
                    return (seen, k);
                }
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (dev, round, ranges) = (dev.clone(), round.clone(), ranges.clone());
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1); // xorshift, no shared RNG
                                                                // Even pages only: odd pages are never written, so an invented one shows.
                let total: u64 = ranges.iter().map(|g| g.length / K4 / 2).sum();
                let mut log = Vec::with_capacity(WRITES as usize);
                for _ in 0..WRITES {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let mut i = x % total;
                    let g = ranges.iter().find(|g| {
                        let n = g.length / K4 / 2;
                        if i < n {
                            true
                        } else {
                            i -= n;
                            false
                        }
                    });
                    let page = g.unwrap().iova / K4 + 2 * i;
                    let before = round.load(Ordering::SeqCst);
                    dev.dma_write(page * K4 + (x >> 52) % (K4 - 64), 1 + (x >> 40) % 64);
                    let after = round.load(Ordering::SeqCst);
                    log.push((page, before, after));
                }
                log
            })
        })
        .collect();
    let mut writes: Vec<(u64, u64, u64)> = Vec::new();
    for w in writers {
        writes.extend(w.join().unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let (seen, rounds) = reporter.join().unwrap();
    let seen_set: BTreeSet<(u64, u64)> = seen.iter().map(|&(k, p)| (p, k)).collect();
    assert_eq!(
        seen_set.len(),
        seen.len(),
        "a page reported twice in one round"
    );
    for &(page, b, a) in &writes {
        let hit = seen_set.range((page, b)..=(page, a + 1)).next().is_some();
        assert!(
            hit,
            "write to page {page} in rounds {b}..={a} never reported (of {rounds})"
        );
    }
    let by_page: BTreeSet<(u64, u64, u64)> = writes.iter().copied().collect();
    for &(k, page) in &seen {
        let explained = by_page
            .range((page, 0, 0)..=(page, k, u64::MAX))
            .any(|&(_, b, a)| b <= k && k <= a + 1);
        assert!(
            explained,
            "page {page} reported in round {k} without a write"
        );
    }
    assert_eq!(dev.untracked_writes(), 0);
    eprintln!(
        "{} writes, {} rounds, {} reported pages",
        writes.len(),
        rounds,
        seen.len()
    );
}

#[test]
fn migration_through_the_device() {
    let d = EmulatedDevice::new(DeviceLimits::generic())
        .migration_flags(MigFlags::STOP_COPY | MigFlags::P2P);
    d.migration().set_data(vec![7; 100]);
    assert_eq!(
        d.migration().set_state(MigState::StopCopy).unwrap(),
        vec![MigState::RunningP2p, MigState::Stop, MigState::StopCopy]
    );
    assert_eq!(
        d.migration()
            .set_state(MigState::PreCopy)
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    let mut buf = vec![0; 200];
    assert_eq!(d.migration().read(&mut buf).unwrap(), 108);
    // DMA logging is independent of the migration state.
    d.start(K4, &[r(0, K4)]).unwrap();
    assert_eq!(d.migration().state(), MigState::StopCopy);
}
