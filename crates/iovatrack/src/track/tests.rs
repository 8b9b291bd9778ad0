use super::*;
use crate::bitmap::Geometry;
use crate::device::{DmaLogger, IommuDirtyTracker};
use crate::device::{EmulatedDevice, EmulatedIommu};
use crate::layout::{Section, SectionKind};
use crate::plan::limits::{DeviceLimits, PageSizePolicy};
use proptest::prelude::*;
use proptest::strategy::Strategy as PropStrategy;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;

fn r(iova: u64, length: u64) -> IovaRange {
    IovaRange::new(iova, length)
}

fn layout(regions: &[IovaRange]) -> Layout {
    let secs = regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Section::new(
                r.iova,
                r.last().unwrap(),
                SectionKind::Ram,
                format!("ram{i}"),
            )
        })
        .collect();
    Layout::new("memory", secs).unwrap()
}

fn dev(name: &str) -> Arc<EmulatedDevice> {
    Arc::new(EmulatedDevice::new(DeviceLimits::generic()).named(name))
}

fn container(name: &str, devs: &[&Arc<EmulatedDevice>]) -> Container {
    let mut c = Container::new(name);
    for d in devs {
        c = c.device(Arc::clone(*d) as Arc<dyn DmaLogger>);
    }
    c
}

/// Five 1 MiB regions 1 MiB apart: the optimal plan has five ranges.
fn five() -> Vec<IovaRange> {
    (0..5).map(|i| r(i * (2 << 20), 1 << 20)).collect()
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

fn inflight_set(l: &DirtLedger) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (i, reg) in l.regions().iter().enumerate() {
        for (first, len) in l.inflight(i).runs() {
            s.extend((first..first + len).map(|k| reg.iova / K4 + k));
        }
    }
    s
}

// ---- ledger ----

#[test]
fn ledger_rejects_bad_regions() {
    let bad = |regions: &[IovaRange], page| DirtLedger::new(regions, page).unwrap_err();
    assert!(matches!(
        bad(&[r(0, 0)], K4),
        TrackError::Region {
            problem: RegionProblem::Empty,
            ..
        }
    ));
    assert!(matches!(
        bad(&[r(0, K4), r(K4 + 512, K4)], K4),
        TrackError::Region {
            index: 1,
            problem: RegionProblem::Misaligned,
            ..
        }
    ));
    assert!(matches!(
        bad(&[r(K4, K4), r(0, 2 * K4)], K4),
        TrackError::Region {
            index: 1,
            problem: RegionProblem::Overlap,
            ..
        }
    ));
    assert!(matches!(bad(&[r(0, K4)], 3000), TrackError::Bitmap(_)));
    // The last page of the space is fine.
    let l = DirtLedger::new(&[r(u64::MAX - K4 + 1, K4)], K4).unwrap();
    assert_eq!(l.total_pages(), 1);
}

#[test]
fn ledger_marks_and_counts_new_pages() {
    let mut l = DirtLedger::new(&[r(0, 16 * K4), r(32 * K4, 16 * K4)], K4).unwrap();
    // Clipped to regions; pages touched by a byte count.
    assert_eq!(l.mark_range(r(15 * K4 + 1, 18 * K4)), 1 + 2);
    assert_eq!(l.mark_range(r(15 * K4, K4)), 0);
    assert_eq!(l.pending_pages(), 3);
    assert_eq!(l.region_of(33 * K4), Some(1));
    assert_eq!(l.region_of(20 * K4), None);
    // A 2 MiB report bit based at 0 covers both regions whole.
    let geo = Geometry::new(0, M2, 1).unwrap();
    assert_eq!(l.or_report(&[1], &geo).unwrap(), 32 - 3);
    assert_eq!(l.pending_pages(), 32);
    assert!(matches!(l.or_report(&[], &geo), Err(TrackError::Bitmap(_))));
    // KVM-style whole-region words.
    let mut l = DirtLedger::new(&[r(0, 128 * K4)], K4).unwrap();
    assert_eq!(l.or_region_words(0, &[0b101, 1 << 63]).unwrap(), 3);
    assert_eq!(l.or_region_words(0, &[0b111, 0]).unwrap(), 1);
    assert!(matches!(
        l.or_region_words(0, &[0]),
        Err(TrackError::Bitmap(_))
    ));
    assert!(matches!(
        l.or_region_words(1, &[0, 0]),
        Err(TrackError::NoSuchRegion {
            region: 1,
            regions: 1
        })
    ));
    l.mark_all();
    assert_eq!(l.pending_pages(), 128);
}

#[test]
fn ledger_pass_ack_rollback() {
    let mut l = DirtLedger::new(&[r(0, 64 * K4)], K4).unwrap();
    l.mark_range(r(0, 4 * K4));
    assert_eq!(l.begin_pass().unwrap(), 4);
    assert!(matches!(l.begin_pass(), Err(TrackError::PassInFlight)));
    assert_eq!((l.pending_pages(), l.inflight_pages()), (0, 4));
    assert_eq!(l.inflight(0).runs().collect::<Vec<_>>(), [(0, 4)]);
    // Dirtied again during the pass: pending for the next one.
    l.mark_range(r(2 * K4, 4 * K4));
    l.rollback();
    assert_eq!((l.pending_pages(), l.inflight_pages()), (6, 0));
    assert_eq!(l.begin_pass().unwrap(), 6);
    l.ack();
    assert_eq!((l.pending_pages(), l.inflight_pages()), (0, 0));
    assert_eq!(l.begin_pass().unwrap(), 0);
}

// ---- mode choice ----

#[test]
fn all_capable_devices_log() {
    let (a, b) = (dev("a"), dev("b"));
    let regions = five();
    let mut t = Tracker::new(container("c0", &[&a, &b]), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap().clone();
    let TrackingMode::Device {
        ranges,
        device_page_sizes,
        replans,
        page_size,
    } = &mode
    else {
        panic!("{mode}")
    };
    assert_eq!(ranges, &regions);
    assert_eq!(
        (device_page_sizes.as_slice(), *replans, *page_size),
        (&[K4, K4][..], 0, K4)
    );
    assert_eq!(a.tracked_ranges().as_deref(), Some(&regions[..]));
    assert_eq!(b.tracked_ranges().as_deref(), Some(&regions[..]));
    assert_eq!(
        mode.to_string(),
        "device DMA logging: 2 device(s), 5 range(s) (5 MiB) at 4 KiB"
    );
    assert_eq!(t.plan().unwrap().ranges, regions);
    assert!(matches!(
        t.start(&layout(&regions)),
        Err(TrackError::AlreadyStarted)
    ));
    t.stop();
    t.stop();
    assert!(a.tracked_ranges().is_none() && b.tracked_ranges().is_none());
    assert!(t.mode().is_none());
}

#[test]
fn device_without_logging_uses_iommu() {
    let regions = five();
    let a = dev("a");
    let b = Arc::new(
        EmulatedDevice::new(DeviceLimits::generic())
            .without_logging()
            .named("b"),
    );
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let c = container("c0", &[&a, &b]).iommu(iommu.clone());
    let mut t = Tracker::new(c, Planner::new());
    let mode = t.start(&layout(&regions)).unwrap().clone();
    assert!(matches!(
        &mode,
        TrackingMode::Iommu { reason: FallbackReason::NoDeviceLogging { device, .. }, ranges, .. }
            if device == "b" && ranges == &regions
    ));
    assert!(mode.to_string().starts_with("IOMMU dirty tracking: 5 range(s) (5 MiB) at 4 KiB, because device b has no DMA logging (DMA_LOGGING probe: ENOTTY"), "{mode}");
    assert!(a.tracked_ranges().is_none(), "device a must not log");
    assert!(iommu.is_tracking());
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    iommu.dma_write(2 * M2 + 5 * K4, 2 * K4);
    let s = t.collect(&mut l).unwrap();
    assert_eq!(
        pending_set(&l),
        BTreeSet::from([(2 * M2) / K4 + 5, (2 * M2) / K4 + 6])
    );
    assert_eq!((s.reports, s.newly_pending, s.device_bits), (5, 2, 2));
    t.stop();
    assert!(!iommu.is_tracking());
}

#[test]
fn no_iommu_means_all_dirty() {
    let regions = five();
    let b = Arc::new(
        EmulatedDevice::new(DeviceLimits::generic())
            .without_logging()
            .named("b"),
    );
    let mut t = Tracker::new(container("c0", &[&b]), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap().clone();
    assert_eq!(mode.name(), "all-dirty");
    assert!(
        mode.to_string()
            .ends_with("and the container has no IOMMU dirty tracking"),
        "{mode}"
    );
    assert!(
        mode.to_string()
            .contains("because device b has no DMA logging"),
        "{mode}"
    );
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    let s = t.collect(&mut l).unwrap();
    assert_eq!(s.newly_pending, l.total_pages());
    assert_eq!(l.pending_pages(), l.total_pages());
    // Every collect marks everything again, after a pass too.
    l.begin_pass().unwrap();
    l.ack();
    t.collect(&mut l).unwrap();
    assert_eq!(l.pending_pages(), l.total_pages());
}

#[test]
fn iommu_enable_failure_falls_to_all_dirty() {
    let regions = five();
    let b = Arc::new(
        EmulatedDevice::new(DeviceLimits::generic())
            .without_logging()
            .named("b"),
    );
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    iommu.fail_set_tracking(Some(Errno::EOPNOTSUPP));
    let mut t = Tracker::new(container("c0", &[&b]).iommu(iommu), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap();
    assert!(
        matches!(mode, TrackingMode::AllDirty { iommu_error: Some(e), .. } if e.errno == Errno::EOPNOTSUPP)
    );
    assert!(
        mode.to_string()
            .contains("IOMMU dirty tracking failed (set dirty tracking: EOPNOTSUPP"),
        "{mode}"
    );
}

#[test]
fn no_devices_nothing_to_track() {
    let mut t = Tracker::new(Container::new("empty"), Planner::new());
    let mode = t.start(&layout(&five())).unwrap();
    assert_eq!(
        mode.to_string(),
        "device DMA logging: no devices, nothing to track"
    );
    let mut l = DirtLedger::new(&five(), K4).unwrap();
    assert_eq!(t.collect(&mut l).unwrap(), CollectStats::default());
    assert_eq!(l.pending_pages(), 0);
}

#[test]
fn collect_before_start_is_an_error() {
    let mut t = Tracker::new(container("c", &[&dev("a")]), Planner::new());
    let mut l = DirtLedger::new(&five(), K4).unwrap();
    assert!(matches!(t.collect(&mut l), Err(TrackError::NotStarted)));
    assert_eq!(t.unmap(r(0, K4), &mut l).unwrap(), CollectStats::default());
}

// ---- START refusals ----

#[test]
fn e2big_replans_down_to_what_the_device_takes() {
    let regions = five();
    let (a, b) = (dev("a"), dev("b"));
    b.refuse_start(Errno::E2BIG, Some(2));
    let mut t = Tracker::new(container("c0", &[&a, &b]), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap().clone();
    let TrackingMode::Device {
        ranges, replans, ..
    } = &mode
    else {
        panic!("{mode}")
    };
    assert!(ranges.len() <= 2 && *replans > 0, "{mode}");
    assert_eq!(*replans, 1, "5 -> 2 ranges is one halving");
    assert!(mode.to_string().ends_with(", after 1 re-plan(s)"), "{mode}");
    // Both devices got the same, covering ranges.
    assert_eq!(a.tracked_ranges().as_ref(), Some(ranges));
    assert_eq!(b.tracked_ranges().as_ref(), Some(ranges));
    assert_eq!(t.plan().unwrap().uncovered_bytes(), 0);
    // Every RAM byte is logged.
    for reg in &regions {
        b.dma_write(reg.iova, reg.length);
    }
    assert_eq!(b.untracked_writes(), 0);
}

#[test]
fn refusing_everything_falls_back_and_stops_the_others() {
    let regions = five();
    let (a, b, c) = (dev("a"), dev("b"), dev("c"));
    // E2BIG is about the count: halving is tried down to one range.
    b.refuse_start(Errno::E2BIG, None);
    let mut t = Tracker::new(container("c0", &[&a, &b, &c]), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap().clone();
    let Some(FallbackReason::StartRefused {
        device,
        error,
        ranges,
        replans,
    }) = mode.reason()
    else {
        panic!("{mode}")
    };
    assert_eq!(
        (device.as_str(), error.errno, *ranges),
        ("b", Errno::E2BIG, 1)
    );
    assert_eq!(*replans, 2, "5 -> 2 -> 1, then one range refused");
    assert_eq!(mode.name(), "all-dirty");
    // a was started each attempt and stopped again; c never started.
    assert!(a.tracked_ranges().is_none() && c.tracked_ranges().is_none());
    assert!(a.start(K4, &regions).is_ok(), "a must have been stopped");
}

#[test]
fn other_errno_falls_back_without_replanning() {
    let regions = five();
    let (a, b) = (dev("a"), dev("b"));
    b.refuse_start(Errno::EIO, None);
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t = Tracker::new(container("c0", &[&a, &b]).iommu(iommu), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap();
    assert!(
        matches!(
            mode,
            TrackingMode::Iommu {
                reason: FallbackReason::StartRefused {
                    replans: 0,
                    ranges: 5,
                    ..
                },
                ..
            }
        ),
        "{mode}"
    );
    assert!(
        mode.to_string()
            .contains("device b refused DMA logging of 5 range(s) after 0 re-plan(s)"),
        "{mode}"
    );
    assert!(a.tracked_ranges().is_none());
}

// ---- collect ----

#[test]
fn report_failure_marks_whole_range() {
    let regions = five();
    let (a, b) = (dev("a"), dev("b"));
    let mut t = Tracker::new(container("c0", &[&a, &b]), Planner::new().max_ranges(1));
    t.start(&layout(&regions)).unwrap();
    let hull = t.plan().unwrap().ranges[0];
    assert_eq!(hull, r(0, 9 << 20));
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    a.dma_write(0, 1);
    b.dma_write(4 * M2, 1);
    a.fail_report(1, Errno::EIO);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.rearms, s.fallbacks), (1, 1, 0));
    assert_eq!(
        l.pending_pages(),
        l.total_pages(),
        "every page of the planned range"
    );
    // Re-armed: a logs the same ranges again, from a clean log (page 0 was in the pass
    // just marked whole, so nothing is lost).
    assert_eq!(a.tracked_ranges(), Some(vec![hull]));
    assert_eq!(t.mode().unwrap().name(), "device");
    l.begin_pass().unwrap();
    l.ack();
    a.dma_write(M2, 1);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.rearms), (0, 0));
    assert_eq!(pending_set(&l), BTreeSet::from([M2 / K4]));
}

#[test]
fn iommu_read_failure_marks_whole_range() {
    let regions = five();
    let b = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t = Tracker::new(container("c", &[&b]).iommu(iommu.clone()), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    iommu.fail_read(2, Errno::EIO);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.reports), (1, 4));
    assert_eq!(pending_set(&l).len() as u64, regions[1].length / K4);
    assert_eq!(l.pending(1).count_ones(), regions[1].length / K4);
}

#[test]
fn chunked_reports_reuse_scratch_and_lose_nothing() {
    let regions = [r(0, 1000 * K4)];
    let a = dev("a");
    let mut t = Tracker::new(container("c", &[&a]), Planner::new()).chunk_bits(64);
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    let pages: BTreeSet<u64> = [0, 63, 64, 127, 128, 500, 999].into();
    for &p in &pages {
        a.dma_write(p * K4 + 7, 1);
    }
    let s = t.collect(&mut l).unwrap();
    assert_eq!(s.reports, 1000u64.div_ceil(64));
    assert_eq!(pending_set(&l), pages);
    assert_eq!((s.newly_pending, s.device_bits), (7, 7));
    // Cleared at the device: a second collect finds nothing.
    assert_eq!(t.collect(&mut l).unwrap().device_bits, 0);
}

#[test]
fn coarse_device_pages_mark_every_small_page() {
    let regions = [r(0, 8 * M2)];
    let limits = DeviceLimits {
        page_size: PageSizePolicy::FloorClamp {
            min_log2: 21,
            max_log2: 30,
        },
        ..DeviceLimits::mlx5()
    };
    let d = Arc::new(EmulatedDevice::new(limits).named("mlx5"));
    let c = Container::new("c").device(d.clone());
    let mut t = Tracker::new(c, Planner::new());
    let mode = t.start(&layout(&regions)).unwrap();
    assert!(
        matches!(mode, TrackingMode::Device { device_page_sizes, .. } if device_page_sizes == &[M2])
    );
    assert!(mode.to_string().contains("device pages 2 MiB"), "{mode}");
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    d.dma_write(3 * M2 + 5, 1);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.device_bits, s.newly_pending), (1, 512));
    assert_eq!(l.pending(0).runs().collect::<Vec<_>>(), [(3 * 512, 512)]);
}

// ---- unmap, restart ----

#[test]
fn unmap_queries_first_device_mode() {
    let regions = five();
    let a = dev("a");
    let mut t = Tracker::new(container("c", &[&a]), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    a.dma_write(2 * M2 + 3 * K4, 1);
    a.dma_write(4 * M2, 1); // elsewhere: not part of the unmap
    let s = t.unmap(r(2 * M2, 1 << 20), &mut l).unwrap();
    assert_eq!((s.reports, s.newly_pending), (1, 1));
    assert_eq!(pending_set(&l), BTreeSet::from([(2 * M2) / K4 + 3]));
    // The caller unmaps now; the dirt stays pending and the rest is collected later.
    t.collect(&mut l).unwrap();
    assert_eq!(
        pending_set(&l),
        BTreeSet::from([(2 * M2) / K4 + 3, (4 * M2) / K4])
    );
}

#[test]
fn unmap_queries_first_iommu_mode() {
    let regions = five();
    let b = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t = Tracker::new(container("c", &[&b]).iommu(iommu.clone()), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    let gone = regions[2];
    iommu.dma_write(gone.iova + 9 * K4, 1);
    // Without the query, unmapping loses the dirt (the check below can fail).
    let control = EmulatedIommu::new(&[gone]).unwrap();
    control.set_tracking(true).unwrap();
    control.dma_write(gone.iova, 1);
    control.unmap(gone).unwrap();
    assert_eq!(control.dirty_pages(), 0);

    let s = t.unmap(gone, &mut l).unwrap();
    assert_eq!(
        (s.reports, s.newly_pending),
        (2, 1),
        "NO_CLEAR read, then clearing read"
    );
    iommu.unmap(gone).unwrap();
    t.collect(&mut l).unwrap();
    assert_eq!(pending_set(&l), BTreeSet::from([(gone.iova + 9 * K4) / K4]));
}

/// type1 has no read without clearing: the query before an unmap is one clearing read,
/// not a failed read that marks the whole window dirty and counts a REPORT error.
#[test]
fn unmap_queries_first_on_type1() {
    let regions = five();
    let b = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap().type1_reads());
    let mut t = Tracker::new(container("c", &[&b]).iommu(iommu.clone()), Planner::new());
    t.start(&layout(&regions)).unwrap();
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    let gone = regions[2];
    iommu.dma_write(gone.iova + 9 * K4, 1);
    // The emulation is as harsh as type1: a read without clearing is refused.
    let mut bm = vec![0u64; (gone.length / K4).div_ceil(64) as usize];
    assert!(iommu.read_dirty(gone, K4, &mut bm, false).is_err());
    let s = t.unmap(gone, &mut l).unwrap();
    assert_eq!(
        (s.reports, s.report_errors, s.newly_pending),
        (1, 0, 1),
        "one clearing read, no error"
    );
    iommu.unmap(gone).unwrap();
    t.collect(&mut l).unwrap();
    assert_eq!(pending_set(&l), BTreeSet::from([(gone.iova + 9 * K4) / K4]));
}

#[test]
fn restart_recomputes_ranges_and_keeps_the_ledger() {
    let small = five()[..3].to_vec();
    let big = five();
    let a = dev("a");
    let mut t = Tracker::new(container("c", &[&a]), Planner::new());
    t.start(&layout(&small)).unwrap();
    let mut l = DirtLedger::new(&big, K4).unwrap();
    a.dma_write(0, 1);
    t.collect(&mut l).unwrap();
    l.begin_pass().unwrap();
    l.rollback(); // a cancelled migration
    a.dma_write(M2 * 4, 1); // region 4 is not tracked yet: lost by the device
    assert_eq!(a.untracked_writes(), 1);
    let mode = t.restart(&layout(&big)).unwrap();
    assert_eq!(mode.ranges(), big.as_slice());
    assert_eq!(a.tracked_ranges().as_deref(), Some(&big[..]));
    assert_eq!(pending_set(&l), BTreeSet::from([0]), "ledger kept");
    a.dma_write(M2 * 4, 1);
    assert_eq!(a.untracked_writes(), 1, "the new region is logged");
    t.collect(&mut l).unwrap();
    assert_eq!(pending_set(&l), BTreeSet::from([0, M2 * 4 / K4]));
    // finish collects before stopping.
    a.dma_write(K4, 1);
    t.finish(&mut l).unwrap();
    assert!(pending_set(&l).contains(&1));
    assert!(a.tracked_ranges().is_none());
}

// ---- vIOMMU ----

#[test]
fn viommu_blocks_device_logging_without_iommu() {
    let regions = five();
    let a = dev("a");
    let l = layout(&regions).with_viommu(true);
    let mut t = Tracker::new(container("vm0", &[&a]), Planner::new());
    let e = t.start(&l).unwrap_err();
    assert!(matches!(&e, TrackError::Viommu { container, .. } if container == "vm0"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("migration blocker: container \"vm0\" is behind a vIOMMU"),
        "{msg}"
    );
    assert!(a.tracked_ranges().is_none());
    assert!(t.mode().is_none());
}

#[test]
fn viommu_uses_iommu_tracking() {
    let regions = five();
    let a = dev("a");
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let l = layout(&regions).with_viommu(true);
    let mut t = Tracker::new(container("vm0", &[&a]).iommu(iommu.clone()), Planner::new());
    let mode = t.start(&l).unwrap();
    assert!(
        matches!(
            mode,
            TrackingMode::Iommu {
                reason: FallbackReason::Viommu { .. },
                ..
            }
        ),
        "{mode}"
    );
    assert!(mode.to_string().contains("behind a vIOMMU"), "{mode}");
    assert!(a.tracked_ranges().is_none());
    // Not a blocker when device logging would not be used anyway.
    let b = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let mut t2 = Tracker::new(container("vm1", &[&b]), Planner::new());
    assert_eq!(t2.start(&l).unwrap().name(), "all-dirty");
}

// ---- many containers ----

#[test]
fn two_containers_one_ledger() {
    let regions = five();
    let (a, b) = (dev("a"), dev("b"));
    let c = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
    let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
    let mut t0 = Tracker::new(container("c0", &[&a, &b]), Planner::new());
    let mut t1 = Tracker::new(container("c1", &[&c]).iommu(iommu.clone()), Planner::new());
    let lay = layout(&regions);
    assert_eq!(t0.start(&lay).unwrap().name(), "device");
    assert_eq!(t1.start(&lay).unwrap().name(), "iommu");
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    a.dma_write(0, 1);
    b.dma_write(0, 1);
    iommu.dma_write(0, 2 * K4);
    let s0 = t0.collect(&mut l).unwrap();
    let s1 = t1.collect(&mut l).unwrap();
    assert_eq!((s0.device_bits, s0.newly_pending), (2, 1));
    assert_eq!((s1.device_bits, s1.newly_pending), (2, 1));
    assert_eq!(pending_set(&l), BTreeSet::from([0, 1]));
}

// ---- property: nothing lost, nothing twice ----

#[derive(Clone, Debug)]
enum Op {
    /// (target 0..3, page index into the RAM pages, pages)
    Write(u8, u64, u64),
    Collect,
    Begin,
    Ack,
    Rollback,
    Restart,
    Unmap(u64),
}

fn op() -> impl PropStrategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, 0u64..128, 1u64..4).prop_map(|(t, p, n)| Op::Write(t, p, n)),
        3 => Just(Op::Collect),
        2 => Just(Op::Begin),
        2 => Just(Op::Ack),
        1 => Just(Op::Rollback),
        1 => Just(Op::Restart),
        1 => (0u64..128).prop_map(Op::Unmap),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Oracle: page → op index of its last write. A page leaves it only when a pass that
    /// began after that write (so holds the write's data) is acknowledged.
    #[test]
    fn nothing_lost_nothing_twice(ops in proptest::collection::vec(op(), 1..60)) {
        let regions = [r(0, 64 * K4), r(128 * K4, 64 * K4)];
        let page_of = |i: u64| if i < 64 { i } else { 64 + i };
        let lay = layout(&regions);
        let (a, b) = (dev("a"), dev("b"));
        let c = Arc::new(EmulatedDevice::new(DeviceLimits::generic()).without_logging());
        let iommu = Arc::new(EmulatedIommu::new(&regions).unwrap());
        let mut t0 = Tracker::new(container("c0", &[&a, &b]), Planner::new()).chunk_bits(64);
        let mut t1 = Tracker::new(container("c1", &[&c]).iommu(iommu.clone()), Planner::new());
        t0.start(&lay).unwrap();
        t1.start(&lay).unwrap();
        let mut l = DirtLedger::new(&regions, K4).unwrap();
        let mut unsent: BTreeMap<u64, usize> = BTreeMap::new();
        let mut ever = BTreeSet::new();
        let mut pass: Option<(usize, BTreeSet<u64>)> = None;
        for (now, op) in ops.iter().enumerate() {
            match *op {
                Op::Write(target, i, n) => {
                    for k in i..(i + n).min(128) {
                        let p = page_of(k);
                        match target {
                            0 => a.dma_write(p * K4, 1),
                            1 => b.dma_write(p * K4 + 100, 1),
                            _ => iommu.dma_write(p * K4, K4),
                        }
                        unsent.insert(p, now);
                        ever.insert(p);
                    }
                }
                Op::Collect => {
                    t0.collect(&mut l).unwrap();
                    t1.collect(&mut l).unwrap();
                    let have: BTreeSet<u64> = pending_set(&l).union(&inflight_set(&l)).copied().collect();
                    for p in unsent.keys() {
                        prop_assert!(have.contains(p), "page {} lost", p);
                    }
                    prop_assert!(have.is_subset(&ever), "phantom pages");
                }
                Op::Begin => {
                    let res = l.begin_pass();
                    if pass.is_some() {
                        prop_assert!(matches!(res, Err(TrackError::PassInFlight)));
                    } else {
                        let n = res.unwrap();
                        let mut set = BTreeSet::new();
                        let mut listed = 0;
                        for (ri, reg) in regions.iter().enumerate() {
                            let mut prev_end = 0;
                            for (first, len) in l.inflight(ri).runs() {
                                prop_assert!(first >= prev_end && len > 0);
                                prev_end = first + len + 1;
                                listed += len;
                                set.extend((first..first + len).map(|k| reg.iova / K4 + k));
                            }
                        }
                        prop_assert_eq!(listed, n, "a page listed twice or missed");
                        prop_assert_eq!(l.inflight_pages(), n);
                        prop_assert!(pending_set(&l).is_empty());
                        pass = Some((now, set));
                    }
                }
                Op::Ack => {
                    if let Some((began, set)) = pass.take() {
                        unsent.retain(|p, w| !(set.contains(p) && *w < began));
                    }
                    l.ack();
                }
                Op::Rollback => {
                    pass = None;
                    l.rollback();
                }
                Op::Restart => {
                    // A cancelled migration: collect what was logged, restart, keep the ledger.
                    t0.finish(&mut l).unwrap();
                    t1.finish(&mut l).unwrap();
                    t0.start(&lay).unwrap();
                    t1.start(&lay).unwrap();
                }
                Op::Unmap(i) => {
                    // Query only (the emulated devices keep the mapping).
                    let p = page_of(i);
                    t0.unmap(r(p * K4, K4), &mut l).unwrap();
                    t1.unmap(r(p * K4, K4), &mut l).unwrap();
                }
            }
            prop_assert_eq!(l.pending_pages(), pending_set(&l).len() as u64);
            prop_assert_eq!(l.inflight_pages(), inflight_set(&l).len() as u64);
        }
        prop_assert_eq!(a.untracked_writes() + b.untracked_writes() + iommu.faults(), 0);
    }
}

/// A device that claims a page size no REPORT accepts.
struct OddPage(EmulatedDevice);

impl DmaLogger for OddPage {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn probe(&self) -> Result<(), DeviceError> {
        self.0.probe()
    }
    fn start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        self.0.start(page_size, ranges).map(|_| 0)
    }
    fn report(&self, range: IovaRange, page_size: u64, bm: &mut [u64]) -> Result<(), DeviceError> {
        self.0.report(range, page_size, bm)
    }
    fn stop(&self) -> Result<(), DeviceError> {
        self.0.stop()
    }
}

#[test]
fn unusable_device_page_size_reports_at_requested() {
    let regions = five();
    let d = Arc::new(OddPage(EmulatedDevice::new(DeviceLimits::generic())));
    let mut t = Tracker::new(Container::new("c").device(d.clone()), Planner::new());
    let mode = t.start(&layout(&regions)).unwrap();
    assert!(
        matches!(mode, TrackingMode::Device { device_page_sizes, .. } if device_page_sizes == &[0])
    );
    let mut l = DirtLedger::new(&regions, K4).unwrap();
    d.0.dma_write(3 * K4, 1);
    let s = t.collect(&mut l).unwrap();
    assert_eq!((s.report_errors, s.newly_pending), (0, 1));
}
