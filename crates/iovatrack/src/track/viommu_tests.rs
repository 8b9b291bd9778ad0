//! The rules of tracking in IOVA space, one by one, on the emulated device and IOMMU.

use super::viommu::{Controls, Headroom, HostMapping, IovaSpace, VIOMMU_PAGE};
use super::{DirtLedger, TrackingMode};
use crate::device::{DmaLogger, EmulatedDevice, EmulatedIommu, Errno, IommuDirtyTracker};
use crate::plan::limits::DeviceLimits;
use crate::plan::Planner;
use crate::range::IovaRange;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

const P: u64 = VIOMMU_PAGE;
const LIMIT: u64 = 1 << 32;
const RAM: u64 = 64 << 20;

fn r(iova: u64, pages: u64) -> IovaRange {
    IovaRange::new(iova, pages * P)
}

struct Rig {
    dev: Arc<EmulatedDevice>,
    iommu: Arc<EmulatedIommu>,
    space: Arc<IovaSpace>,
    ledger: DirtLedger,
}

fn rig_with(
    limits: DeviceLimits,
    controls: Controls,
    hook: Option<Box<dyn Fn() + Send + Sync>>,
) -> Rig {
    let dev = Arc::new(EmulatedDevice::new(limits));
    let iommu = Arc::new(EmulatedIommu::new(&[]).unwrap());
    let mut space = IovaSpace::new(
        "t",
        LIMIT,
        vec![dev.clone() as Arc<dyn DmaLogger>],
        Some(iommu.clone() as Arc<dyn IommuDirtyTracker>),
    )
    .headroom(Headroom { below: 4 * P })
    .host(iommu.clone() as Arc<dyn HostMapping>)
    .controls(controls);
    if let Some(h) = hook {
        space = space.window_hook(h);
    }
    Rig {
        dev,
        iommu,
        space: Arc::new(space),
        ledger: DirtLedger::new(&[IovaRange::new(0, RAM)], P).unwrap(),
    }
}

fn rig() -> Rig {
    rig_with(DeviceLimits::generic(), Controls::default(), None)
}

impl Rig {
    /// The device writes at `iova` through the vIOMMU: data, then its log and the IOMMU's.
    fn dma(&self, iova: u64) -> bool {
        self.space
            .dma(iova, |_gpa| {
                self.dev.dma_write(iova + 8, 8);
                self.iommu.dma_write(iova + 8, 8);
            })
            .is_some()
    }

    fn start(&self) -> TrackingMode {
        self.space.start(&Planner::new(), 1 << 20, false).unwrap()
    }

    fn pending(&self, gpa: u64) -> bool {
        self.ledger.pending(0).is_set(gpa / P)
    }

    fn collect(&mut self) {
        self.space.collect(&mut self.ledger).unwrap();
    }
}

#[test]
fn bits_are_translated_to_guest_pages() {
    let mut t = rig();
    let iova = LIMIT - 4 * P;
    t.space.map(r(iova, 4), 0x10_0000).unwrap();
    assert!(matches!(t.start(), TrackingMode::Device { .. }));
    assert!(t.dma(iova + 2 * P));
    t.collect();
    assert!(t.pending(0x10_0000 + 2 * P));
    assert_eq!(t.ledger.pending_pages(), 1);
    assert_eq!(t.dev.untracked_writes(), 0);
}

#[test]
fn a_dma_to_an_unmapped_iova_faults_and_writes_nothing() {
    let t = rig();
    assert!(!t.dma(LIMIT - P));
}

#[test]
fn a_map_inside_the_logged_ranges_is_not_held() {
    let t = rig();
    t.space.map(r(LIMIT - P, 1), 0).unwrap();
    t.start();
    // The headroom reaches 4 pages below the lowest mapping.
    t.space.map(r(LIMIT - 3 * P, 1), P).unwrap();
    assert_eq!(t.space.stats().rearms, 0);
}

#[test]
fn a_map_outside_rearms_covers_it_and_marks_the_window() {
    let mut t = rig();
    t.space.map(r(LIMIT - P, 1), 5 * P).unwrap();
    t.start();
    let far = LIMIT - 64 * P;
    t.space.map(r(far, 2), 9 * P).unwrap();
    let st = t.space.stats();
    assert_eq!((st.rearms, st.held_maps), (1, 1));
    // The page mapped during the window is marked; the new one was not mapped yet.
    assert_eq!(st.rearm_pages, 1);
    assert!(t
        .space
        .logged_ranges()
        .iter()
        .any(|c| c.iova <= far && c.end() >= (far + 2 * P) as u128));
    assert!(t.dma(far + P));
    t.collect();
    assert!(t.pending(5 * P) && t.pending(10 * P));
    assert_eq!(t.dev.untracked_writes(), 0);
}

/// A device write inside the STOP→START window is covered by the marking; the naive
/// re-arm loses it.
#[test]
fn the_window_is_covered_and_the_naive_rearm_is_not() {
    for naive in [false, true] {
        let fire = Arc::new(AtomicBool::new(false));
        let f = fire.clone();
        let mut t = rig_with(
            DeviceLimits::generic(),
            Controls {
                naive_rearm: naive,
                ..Controls::default()
            },
            Some(Box::new(move || f.store(true, SeqCst))),
        );
        t.space.map(r(LIMIT - P, 1), 7 * P).unwrap();
        t.start();
        t.collect();
        t.ledger.begin_pass().unwrap();
        t.ledger.ack();
        t.space.map(r(LIMIT - 64 * P, 1), 8 * P).unwrap();
        // The hook ran between STOP and START: what the device wrote then is not logged.
        assert!(fire.load(SeqCst));
        t.collect();
        assert_eq!(t.pending(7 * P), !naive, "naive {naive}");
    }
}

#[test]
fn an_unmap_is_queried_first_and_the_control_loses_it() {
    for skip in [false, true] {
        let mut t = rig_with(
            DeviceLimits::generic(),
            Controls {
                no_unmap_query: skip,
                ..Controls::default()
            },
            None,
        );
        let iova = LIMIT - P;
        t.space.map(r(iova, 1), 3 * P).unwrap();
        t.start();
        assert!(t.dma(iova));
        t.space.unmap(r(iova, 1)).unwrap();
        // The IOVA is reused for another page before the collect.
        t.space.map(r(iova, 1), 4 * P).unwrap();
        t.collect();
        assert_eq!(t.pending(3 * P), !skip);
        assert_eq!(t.space.stats().unmap_queries, u64::from(!skip));
    }
}

#[test]
fn aliases_mark_the_shared_page() {
    let mut t = rig();
    t.space.map(r(LIMIT - P, 1), 6 * P).unwrap();
    t.space.map(r(LIMIT - 2 * P, 1), 6 * P).unwrap();
    t.start();
    assert!(t.dma(LIMIT - 2 * P));
    t.collect();
    assert!(t.pending(6 * P));
    assert_eq!(t.ledger.pending_pages(), 1);
}

#[test]
fn no_translate_marks_the_iova_not_the_page() {
    let mut t = rig_with(
        DeviceLimits::generic(),
        Controls {
            no_translate: true,
            ..Controls::default()
        },
        None,
    );
    t.space.map(r(P, 1), 6 * P).unwrap();
    t.start();
    assert!(t.dma(P));
    t.collect();
    assert!(!t.pending(6 * P));
}

/// The window from below the lowest mapping to the DMA limit is one range, however
/// scattered the mappings (the allocator reuses the gaps between them).
#[test]
fn the_window_is_one_range_under_e2big() {
    let t = rig_with(DeviceLimits::generic(), Controls::default(), None);
    t.dev.refuse_start(Errno::E2BIG, Some(1));
    t.space.map(r(LIMIT - P, 1), 0).unwrap();
    t.space.map(r(LIMIT - 1024 * P, 1), P).unwrap();
    match t.start() {
        TrackingMode::Device { ranges, .. } => {
            assert_eq!(ranges, [IovaRange::new(LIMIT - 1028 * P, 1028 * P)]);
        }
        m => panic!("{m:?}"),
    }
}

/// A window past mlx5's span bound is dropped for what is mapped, merged to its ranges.
#[test]
fn a_window_the_device_refuses_falls_back_to_the_mapped_set() {
    let t = rig_with(DeviceLimits::mlx5(), Controls::default(), None);
    let top = 1u64 << 60;
    let space = IovaSpace::new("w", top, vec![t.dev.clone() as Arc<dyn DmaLogger>], None);
    space.map(r(top - P, 1), 0).unwrap();
    space.map(r(1 << 20, 1), P).unwrap();
    match space
        .start(&Planner::new().device(DeviceLimits::mlx5()), 1 << 20, false)
        .unwrap()
    {
        TrackingMode::Device { ranges, .. } => {
            let bytes: u64 = ranges.iter().map(|r| r.length).sum();
            assert!(bytes <= 1 << 42, "{ranges:?}");
            assert!(ranges.iter().any(|c| c.contains(top - P)));
            assert!(ranges.iter().any(|c| c.contains(1 << 20)));
        }
        m => panic!("{m:?}"),
    }
}

#[test]
fn a_failed_report_rearms_and_marks_every_mapped_page() {
    let mut t = rig();
    t.space.map(r(LIMIT - 2 * P, 2), 10 * P).unwrap();
    t.start();
    assert!(t.dma(LIMIT - P));
    t.dev.fail_report(1, Errno::EIO);
    let st = t.space.collect(&mut t.ledger).unwrap();
    assert_eq!((st.report_errors, st.rearms), (1, 1));
    assert!(t.pending(10 * P) && t.pending(11 * P));
    // Logging runs again.
    assert!(t.dma(LIMIT - P));
    t.collect();
    assert_eq!(t.space.stats().error_rearms, 1);
}

#[test]
fn iommu_mode_translates_and_never_holds_a_map() {
    let mut t = rig();
    t.space.map(r(LIMIT - P, 1), 12 * P).unwrap();
    let m = t.space.start(&Planner::new(), 1 << 20, true).unwrap();
    assert!(matches!(m, TrackingMode::Iommu { .. }));
    t.space.map(r(LIMIT - 512 * P, 1), 13 * P).unwrap();
    assert_eq!(t.space.stats().rearms, 0);
    assert!(t.dma(LIMIT - P) && t.dma(LIMIT - 512 * P));
    // Unmap reads the range before the host unmap drops its bits.
    t.space.unmap(r(LIMIT - 512 * P, 1)).unwrap();
    t.collect();
    assert!(t.pending(12 * P) && t.pending(13 * P));
}
