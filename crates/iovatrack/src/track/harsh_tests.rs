//! The tracker against the harsh emulators: each real-driver behaviour, the tracker
//! correct on it, and a negative control showing the naive way losing dirt.

use super::collect::{read_chunk, Source};
use super::*;
use crate::device::ReportGranule;
use crate::device::{DmaLogger, EmulatedDevice, EmulatedIommu, IommuDirtyTracker};
use crate::layout::{Section, SectionKind};
use crate::plan::limits::{DeviceLimits, PageSizePolicy};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;

const K4: u64 = 4096;
const M1: u64 = 1 << 20;
const M2: u64 = 2 << 20;

fn r(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length)
}

fn layout(regions: &[IovaRange]) -> Layout {
    let secs = regions
        .iter()
        .enumerate()
        .map(|(i, g)| {
            Section::new(
                g.iova,
                g.last().unwrap(),
                SectionKind::Ram,
                format!("ram{i}"),
            )
        })
        .collect();
    Layout::new("memory", secs).unwrap()
}

fn one(d: &Arc<EmulatedDevice>) -> Container {
    Container::new("c0").device(Arc::clone(d) as Arc<dyn DmaLogger>)
}

/// Five 1 MiB regions 1 MiB apart.
fn five() -> Vec<IovaRange> {
    (0..5).map(|i| r(i * M2, M1)).collect()
}

fn pending_set(l: &DirtLedger) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (i, reg) in l.regions().iter().enumerate() {
        for (first, len) in l.pending(i).runs() {
            s.extend((first..first + len).map(|k| reg.iova / K4 + k));
        }
    }
    s
}

fn mlx5(addr_max: u8) -> Arc<EmulatedDevice> {
    Arc::new(EmulatedDevice::new(DeviceLimits {
        addr_space_log2: Some((12, addr_max)),
        ..DeviceLimits::mlx5()
    }))
}

// ---- START refused with EOPNOTSUPP ----

/// mlx5's bound is on the sum of the merged lengths, gaps included: fewer ranges only
/// add bytes, so the tracker falls back at the first EOPNOTSUPP instead of halving.
#[test]
fn mlx5vf_create_tracker_eopnotsupp_falls_back_at_once() {
    let regions = five();
    // 5 MiB of RAM, merged by the device to 4 ranges: 6 MiB, over a 2 MiB bound.
    let d = mlx5(21);
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t = Tracker::new(one(&d).iommu(iommu), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap();
    let Some(FallbackReason::StartRefused {
        error,
        ranges,
        replans,
        ..
    }) = mode.reason()
    else {
        panic!("{mode}")
    };
    assert_eq!((error.errno, *ranges, *replans), (Errno::EOPNOTSUPP, 5, 0));
    assert_eq!(mode.name(), "iommu");
}

/// pds with `max_regions == 0` never takes any range: no re-plan, whatever the cap.
#[test]
fn pds_vfio_dirty_enable_without_regions_falls_back_at_once() {
    let regions = five();
    let d = Arc::new(EmulatedDevice::new(DeviceLimits {
        max_ranges: 0,
        ..DeviceLimits::pds()
    }));
    for cap in [256, 1] {
        let mut t = Tracker::new(one(&d), Planner::new().max_ranges(cap));
        let mode = t.start(&layout(&regions)).unwrap();
        assert!(
            matches!(
                mode.reason(),
                Some(FallbackReason::StartRefused { replans: 0, error, .. }) if error.errno == Errno::EOPNOTSUPP
            ),
            "{mode}"
        );
    }
}

/// A plan that is not the fewest bytes for its count (QEMU's buckets, stretched by a ROM)
/// is re-planned once by tracked bytes, and the device takes it.
#[test]
fn eopnotsupp_replans_by_tracked_bytes() {
    let l = Layout::new(
        "memory",
        vec![
            Section::new(0, M1 - 1, SectionKind::Ram, "low"),
            Section::new(0xfff0_0000, 0xffff_ffff, SectionKind::Rom, "pc.bios"),
            Section::new(1 << 32, (1 << 32) + M1 - 1, SectionKind::Ram, "high"),
        ],
    )
    .unwrap();
    let d = mlx5(22);
    let mut t = Tracker::new(
        one(&d),
        Planner::new().strategy(crate::plan::Strategy::Qemu),
    );
    let mode = t.start(&l).unwrap().clone();
    let TrackingMode::Device {
        ranges, replans, ..
    } = &mode
    else {
        panic!("{mode}")
    };
    assert_eq!(*replans, 1, "{mode}");
    assert_eq!(ranges, &[r(0, M1), r(1 << 32, M1)]);
}

// ---- REPORT errors: re-arm ----

/// `mlx5vf_tracker_read_and_clear`'s sticky `is_err`: the tracker re-arms (STOP, START
/// the same ranges), marks the tracked set dirty, and reads normally afterwards.
#[test]
fn rearm_after_sticky_mlx5_report_error() {
    let regions = five();
    let d = mlx5(42);
    let mut t = Tracker::new(one(&d), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    d.fail_report(1, Errno::EIO);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.rearms, s.fallbacks), (1, 1, 0));
    assert_eq!(l.pending_pages(), l.total_pages());
    l.begin_pass().unwrap();
    l.ack();
    d.dma_write(4 * M2 + 5 * K4, 1);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.rearms), (0, 0));
    assert_eq!(pending_set(&l), BTreeSet::from([4 * M2 / K4 + 5]));

    // Negative control: without re-arming, the device never reports again.
    let naive = mlx5(42);
    naive.start(K4, &regions).unwrap();
    naive.fail_report(1, Errno::EIO);
    let mut bm = vec![0u64; 4];
    for _ in 0..4 {
        assert!(naive.report(regions[0], K4, &mut bm).is_err());
    }
}

/// A device that refuses to re-arm: the container falls back to IOMMU tracking, says so,
/// and marks the DMA-able set dirty.
#[test]
fn rearm_refused_falls_back_to_iommu() {
    let regions = five();
    let d = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t = Tracker::new(one(&d).iommu(iommu.clone()), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    d.refuse_start(Errno::EIO, None);
    d.fail_report(1, Errno::EIO);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.rearms, s.fallbacks), (1, 0, 1));
    let mode = t.mode().unwrap();
    assert!(
        matches!(mode.reason(), Some(FallbackReason::RearmFailed { .. })),
        "{mode}"
    );
    assert_eq!(mode.name(), "iommu");
    assert!(mode.to_string().contains("refused to re-arm"), "{mode}");
    assert!(d.tracked_ranges().is_none(), "the device was stopped");
    assert_eq!(l.pending_pages(), l.total_pages());
    l.begin_pass().unwrap();
    l.ack();
    iommu.dma_write(3 * M2, 1);
    t.collect(&mut l).unwrap();
    assert_eq!(pending_set(&l), BTreeSet::from([3 * M2 / K4]));
}

// ---- forced modes ----

#[test]
fn force_mode_runs_the_mode_or_fails_start() {
    let regions = five();
    let lay = layout(&regions);
    let d = Arc::new(EmulatedDevice::new(DeviceLimits::generic()));
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let c = one(&d).iommu(iommu.clone());
    let mut t = Tracker::new(c.clone(), Planner::new()).force_mode(ModeChoice::Iommu);
    let mode = t.start(&lay).unwrap();
    assert_eq!(mode.name(), "iommu");
    assert_eq!(mode.reason(), Some(&FallbackReason::Forced));
    assert!(d.tracked_ranges().is_none() && iommu.is_tracking());
    t.stop();
    let mut t = Tracker::new(c.clone(), Planner::new()).force_mode(ModeChoice::AllDirty);
    let mode = t.start(&lay).unwrap();
    assert_eq!(mode.name(), "all-dirty");
    assert!(!mode.to_string().contains("no IOMMU"), "{mode}");
    t.stop();
    let mut t = Tracker::new(c, Planner::new()).force_mode(ModeChoice::Device);
    assert_eq!(t.start(&lay).unwrap().name(), "device");
    t.stop();
    // Unavailable forced modes fail start.
    let off = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let mut t = Tracker::new(one(&off), Planner::new()).force_mode(ModeChoice::Device);
    assert!(matches!(
        t.start(&lay),
        Err(TrackError::ModeUnavailable { mode: "device", .. })
    ));
    let mut t = Tracker::new(one(&d), Planner::new()).force_mode(ModeChoice::Iommu);
    let e = t.start(&lay).unwrap_err();
    assert!(e.to_string().contains("no IOMMU dirty tracking"), "{e}");
    assert_eq!("all-dirty".parse::<ModeChoice>(), Ok(ModeChoice::AllDirty));
    assert!("both".parse::<ModeChoice>().is_err());
}

// ---- reading in the sources' granules ----

/// IOMMU mode reads per mapped area: an unplugged virtio-mem block is not mapped, and an
/// iommufd read across it would stop there (`iopt_area_contig_next`).
#[test]
fn iommu_mode_reads_per_mapped_area() {
    // One DMA-able section (virtio-mem counts whole), its middle 2 MiB unplugged.
    let ram = [r(0, 8 * M1)];
    let iommu = Arc::new(EmulatedIommu::new(&[r(0, 2 * M1), r(4 * M1, 4 * M1)]).unwrap());
    let off = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let mut t = Tracker::new(one(&off).iommu(iommu.clone()), Planner::new());
    assert_eq!(t.start(&layout(&ram)).unwrap().name(), "iommu");
    let mut l = DirtLedger::new(&ram, K4).unwrap();
    iommu.dma_write(M1, 1);
    iommu.dma_write(5 * M1, 1);
    let s = t.collect(&mut l).unwrap();
    assert_eq!(pending_set(&l), BTreeSet::from([M1 / K4, 5 * M1 / K4]));
    assert_eq!(s.report_errors, 0);

    // Negative control: one read over the DMA-able range stops at the hole.
    iommu.dma_write(M1, 1);
    iommu.dma_write(5 * M1, 1);
    let mut bm = vec![0u64; (8 * M1 / K4 / 64) as usize];
    iommu.read_dirty(ram[0], K4, &mut bm, true).unwrap();
    let got: u32 = bm.iter().map(|w| w.count_ones()).sum();
    assert_eq!(got, 1, "the page after the hole is not reported");
}

/// A device and the pages it is given to write, for the property below.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Generic,
    Mlx5Huge,
    Pds,
    Pds66,
}

fn device(kind: Kind) -> Arc<EmulatedDevice> {
    let limits = match kind {
        Kind::Generic => DeviceLimits::generic(),
        // mlx5 clamping the page up to 2 MiB: ranges do not start on device pages.
        Kind::Mlx5Huge => DeviceLimits {
            page_size: PageSizePolicy::FloorClamp {
                min_log2: 21,
                max_log2: 30,
            },
            max_ranges: 3,
            ..DeviceLimits::mlx5()
        },
        Kind::Pds => DeviceLimits {
            max_ranges: 3,
            ..DeviceLimits::pds()
        },
        Kind::Pds66 => DeviceLimits::pds_6_6(),
    };
    Arc::new(EmulatedDevice::new(limits))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Against a brute-force oracle (the set of pages written since they were last made
    /// pending): after every collect each written page is pending, on every harsh device,
    /// with small chunks, misaligned ranges and injected REPORT failures (re-armed).
    #[test]
    fn harsh_devices_lose_nothing(
        kind in prop_oneof![Just(Kind::Generic), Just(Kind::Mlx5Huge), Just(Kind::Pds), Just(Kind::Pds66)],
        spans in prop::collection::vec((1u64..300, 1u64..200), 1..6),
        ops in prop::collection::vec((0u8..8, 0u64..1 << 20), 1..50),
        chunk in prop_oneof![Just(64u64), Just(128), Just(1 << 20)],
    ) {
        let mut regions = Vec::new();
        let mut at = 0;
        for (gap, len) in spans {
            at += gap * K4;
            regions.push(r(at, len * K4));
            at += len * K4;
        }
        let d = device(kind);
        let mut t = Tracker::new(one(&d), Planner::new()).chunk_bits(chunk);
        let mode = t.start(&layout(&regions)).unwrap().clone();
        // pds 6.8 refuses regions its firmware cannot round to whole words (EINVAL); the
        // tracker then falls back, which must lose nothing either.
        if !matches!(kind, Kind::Pds) {
            prop_assert_eq!(mode.name(), "device", "{}", mode);
        }
        let mut l = DirtLedger::new(&regions, K4).unwrap();
        let total: u64 = regions.iter().map(|g| g.length / K4).sum();
        let page_at = |i: u64| {
            let mut i = i % total;
            for g in &regions {
                let n = g.length / K4;
                if i < n {
                    return g.iova / K4 + i;
                }
                i -= n;
            }
            unreachable!()
        };
        let mut written = BTreeSet::new();
        for (op, x) in ops {
            match op {
                0..=4 => {
                    let p = page_at(x);
                    d.dma_write(p * K4 + x % K4, 1);
                    written.insert(p);
                }
                5 => d.fail_report(1 + x % 3, Errno::EIO),
                6 => {
                    // The pass sends what is pending now; later writes stay to be found.
                    let sent = pending_set(&l);
                    l.begin_pass().unwrap();
                    l.ack();
                    written.retain(|p| !sent.contains(p));
                }
                _ => {
                    t.collect(&mut l).unwrap();
                    let have = pending_set(&l);
                    for p in &written {
                        prop_assert!(have.contains(p), "page {:#x} lost on {:?}", p * K4, kind);
                    }
                }
            }
        }
        t.collect(&mut l).unwrap();
        let have = pending_set(&l);
        prop_assert!(written.is_subset(&have));
        prop_assert_eq!(d.untracked_pages(), 0);
    }
}

/// Negative control at the tracker's level: the windows a tracker makes when it ignores
/// the device's stated granule (each planned range, at the requested 4 KiB page) lose
/// dirt on pds and on an mlx5 with 2 MiB pages; the stated granule loses none of it.
#[test]
fn ignoring_the_report_granule_loses_dirt() {
    let regions = [r(0, 40 * K4), r(56 * K4, 72 * K4), r(M2 + 40 * K4, 8 * K4)];
    let writes = [5, 39, 56, 60, 100, M2 / K4 + 41];
    for kind in [Kind::Pds66, Kind::Mlx5Huge] {
        let run = |granule: Option<ReportGranule>| {
            let d = device(kind);
            let ps = d.start(K4, &regions).unwrap();
            for p in writes {
                d.dma_write(p * K4, 1);
            }
            let (g, page) = match granule {
                Some(g) => (g, K4),
                None => (d.report_granule(), ps),
            };
            let mut l = DirtLedger::new(&regions, K4).unwrap();
            let (mut scratch, mut stats) = (Vec::new(), CollectStats::default());
            for w in collect::device_windows(&g, &regions, page, 1 << 20, None) {
                let src = Source::Device(d.as_ref());
                read_chunk(src, w, page, &mut scratch, &mut l, &mut stats)
                    .unwrap()
                    .unwrap();
            }
            pending_set(&l)
        };
        let naive = run(Some(ReportGranule::DevicePage));
        let stated = run(None);
        for p in writes {
            assert!(
                stated.contains(&p),
                "{kind:?}: stated granule lost page {p}"
            );
        }
        assert!(
            writes.iter().any(|p| !naive.contains(p)),
            "{kind:?}: the naive windows should lose a page: {naive:?}"
        );
    }
}
